"""``static``: a fixed header or query value. It works, and it is counted as standing."""

from __future__ import annotations

from typing import ClassVar, Hashable

from sidecar.credentials.base import Credential, CredentialRequest, OutboundRequest, ProviderDeps, keyed_id
from sidecar.credentials.specs import StaticSpec


class StaticProvider:
    type: ClassVar[str] = StaticSpec.type
    needs_body: ClassVar[bool] = False
    standing: ClassVar[bool] = True
    task_bound: ClassVar[bool] = False

    def __init__(self, name: str, spec: StaticSpec, deps: ProviderDeps) -> None:
        self.name = name
        self._spec = spec
        self._credential = Credential(
            type=self.type, provider=name, id=keyed_id(deps.id_key, spec.value.reveal()), standing=True,
            token=spec.value,
        )
        self._placed = spec.placement.format(spec.value.reveal())  # built once; apply() only sets it

    def cache_key(self, req: CredentialRequest) -> Hashable:
        return self.name

    async def fetch(self, req: CredentialRequest) -> Credential:
        return self._credential

    def apply(self, out: OutboundRequest, credential: Credential) -> None:
        self._spec.placement.apply(out, self._placed)

    async def aclose(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"StaticProvider({self.name!r})"
