"""What the admin, health and metrics listeners may ask of the running sidecar.

``sidecar.app.Sidecar`` builds those listeners and satisfies :class:`Control`; the listeners
depend on this protocol only, never on ``sidecar.app``, so there is no import cycle between
them. This module imports no stage: what it names of one (the task registry, the revocation
store, the token verifier, the signer) is described here by the few members the listeners use.
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol

from sidecar.config_model import Config
from sidecar.fields import Secret
from sidecar.observe.metrics import Metrics
from sidecar.reload import Reloaded


class Entry(Protocol):
    """A revocation as the admin API shows it."""

    def as_dict(self) -> dict[str, Any]: ...


class RevocationStore(Protocol):
    def add(self, kind: str, ident: str, ttl: float) -> Entry: ...

    def list(self) -> Iterable[Entry]: ...

    def remove(self, rid: str) -> bool: ...


class OpenedTask(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def delegation(self) -> str: ...

    @property
    def expires_at(self) -> float: ...


class TaskOpener(Protocol):
    @property
    def open_count(self) -> int: ...

    def open(self, *, principal: tuple[str, str] | None, subject_token: Secret | None, delegation: str,
             actor_type: str | None, trigger: str | None, ttl: float, token_exp: float | None = None,
             act_chain: tuple[str, ...] = ()) -> OpenedTask: ...

    def end(self, task_id: str) -> OpenedTask | None: ...


class Verified(Protocol):
    """A verified bearer token: who it names, for a task or an approver."""

    @property
    def issuer(self) -> str: ...

    @property
    def subject(self) -> str: ...

    @property
    def actor_type(self) -> str: ...

    @property
    def expires_at(self) -> float: ...

    @property
    def act_chain(self) -> tuple[str, ...]: ...

    @property
    def token(self) -> Secret: ...


class TokenVerifier(Protocol):
    async def verify(self, token: str, *, audience: str | None = None) -> Verified: ...


class ApprovalQueue(Protocol):
    def list(self) -> list[dict[str, Any]]: ...

    def decide(self, approval_id: str, approve: bool, approver: dict[str, str]) -> bool: ...


class PublicKey(Protocol):
    @property
    def algorithm(self) -> str: ...


class KeyPublisher(Protocol):
    """The signer, as the JWKS and discovery endpoints see it."""

    @property
    def key(self) -> PublicKey: ...

    def jwks(self) -> dict[str, Any]: ...


class Control(Protocol):
    """The running sidecar, as its admin, health and metrics listeners see it."""

    @property
    def config(self) -> Config: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def ready(self) -> bool: ...

    @property
    def draining(self) -> bool: ...

    @property
    def loop_silent_for(self) -> float:
        """Seconds the event loop serving exchanges has not run (about 0 while it runs); read from the
        health thread."""

    @property
    def policy_version(self) -> str: ...

    @property
    def revocations(self) -> RevocationStore: ...

    @property
    def tasks(self) -> TaskOpener: ...

    @property
    def approvals(self) -> ApprovalQueue: ...

    @property
    def verifier(self) -> TokenVerifier | None: ...

    @property
    def signer(self) -> KeyPublisher: ...

    async def reload(self) -> tuple[Reloaded, ...]:
        """Policy files, then identity files (when they changed): each outcome, failures included."""
        ...

    def inventory(self) -> dict[str, Any]:
        """``GET /inventory``: what this sidecar holds right now (never a secret value)."""
        ...

    async def fleet(self) -> dict[str, Any]:
        """``GET /inventory?scope=fleet``: every live and stale sidecar, or why the view is unavailable."""
        ...
