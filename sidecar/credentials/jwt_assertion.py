"""``jwt_assertion``: a short-lived JWT this sidecar signs for one audience.

Signed with ``identity.signing_key`` (ES256 or EdDSA) when the cache asks for one, and reused
for most of its life (the cache refreshes it at about 80 %):
``iss`` = the signer's issuer (``identity.issuer``, else the SPIFFE ID), ``sub`` = the agent's
SPIFFE ID, ``aud``, ``jti``, ``iat``, ``nbf``, ``exp``, and where they apply ``scope`` (the rule's
narrowed scopes, else the configured ones) and, for a request in a task, ``task`` (its id) and
``principal`` ``{iss, sub}`` with ``delegation`` (``delegated`` for a verified human token,
``asserted`` for a principal only named). There is no ``act`` claim: the agent is the subject
of this token, not an actor for another subject; a verifier that needs an RFC 8693 delegation
token uses ``oauth2_token_exchange``.

In a task the token is cached under the task (one per task, audience and scopes); without
one, one token per audience and scopes.

Config keys: ``audience`` (required), ``ttl`` (default 60s, 10s..1h), ``header`` (default
``Authorization``), ``scheme`` (default ``"Bearer "`` for Authorization, else ``""``),
``scopes``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Hashable

from sidecar.credentials.base import Credential, CredentialRequest, OutboundRequest, ProviderDeps, TaskRef
from sidecar.credentials.specs import JwtAssertionSpec
from sidecar.errors import CredentialUnavailable
from sidecar.fields import Secret


def _task_claims(task: TaskRef) -> dict[str, Any]:
    claims: dict[str, Any] = {"task": task.id}
    if task.principal_sub is not None:
        claims["principal"] = {"iss": task.principal_iss, "sub": task.principal_sub}
        claims["delegation"] = task.delegation
    return claims


class JwtAssertionProvider:
    type: ClassVar[str] = JwtAssertionSpec.type
    needs_body: ClassVar[bool] = False
    standing: ClassVar[bool] = False
    task_bound: ClassVar[bool] = True  # when a request has a task; else one token per audience and scopes

    def __init__(self, name: str, spec: JwtAssertionSpec, deps: ProviderDeps) -> None:
        self.name = name
        self.spec = spec
        self._deps = deps

    def cache_key(self, req: CredentialRequest) -> Hashable:
        return req.task.id if req.task is not None else None, req.scopes or self.spec.scopes

    async def fetch(self, req: CredentialRequest) -> Credential:
        signer = self._deps.signer
        if signer is None:
            raise CredentialUnavailable(f"credentials: {self.name}: no signing key (identity.signing_key)")
        scopes = req.scopes or self.spec.scopes
        claims: dict[str, Any] = {"sub": self._deps.agent_id, "aud": self.spec.audience}
        if scopes:
            claims["scope"] = " ".join(scopes)
        if req.task is not None:
            claims.update(_task_claims(req.task))
        token, jti, exp = signer.sign(claims, ttl=self.spec.ttl)
        return Credential(type=self.type, provider=self.name, id=jti, scopes=scopes, audience=self.spec.audience,
                          expires_at=exp, issued_at=exp - int(self.spec.ttl), token=Secret(token, "signed"),
                          material=self.spec.placement.format(token))

    def apply(self, out: OutboundRequest, credential: Credential) -> None:
        self.spec.placement.apply(out, credential.material)

    async def aclose(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"JwtAssertionProvider({self.name!r}, audience={self.spec.audience!r})"
