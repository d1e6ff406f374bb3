"""The running sidecar's state, as the pipeline stages see it: data, not behaviour.

Built once from a validated config by ``sidecar.app`` and frozen. The one thing that changes is
the policy set, swapped whole on reload through :class:`PolicyHolder` (a request reads it once, so
requests in flight finish under the policy they started with). The stages live in the packages
they belong to (``identity/inbound.py``, ``policy/``, ``credentials/``, ``forward/``,
``revocation.py``, ``observe/record.py``); ``sidecar.pipeline`` runs them in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sidecar.approvals import Approvals
from sidecar.config_model import Config
from sidecar.credentials.base import CredentialProvider
from sidecar.credentials.cache import CredentialCache
from sidecar.errors import CredentialUnavailable
from sidecar.exchange import ActiveExchanges, AgentInfo
from sidecar.forward.sessions import Sessions
from sidecar.http.headers import DropSet, inbound_drop_set, request_drop_set
from sidecar.policy.llm import AGENT_KEY_HEADERS
from sidecar.identity.jwt import JwtVerifier
from sidecar.identity.signing import Signer
from sidecar.identity.source import IdentitySource
from sidecar.observe.metrics import Metrics
from sidecar.observe.record import Recorder
from sidecar.policy.engine import PolicySet
from sidecar.revocation import Revocations
from sidecar.routing import Router
from sidecar.tasks import TaskRegistry


@dataclass(slots=True)
class PolicyHolder:
    """The policy set in force; replaced whole by a reload that compiled (never edited in place)."""

    current: PolicySet


@dataclass(frozen=True)
class Runtime:
    config: Config
    agent: AgentInfo
    metrics: Metrics
    recorder: Recorder
    router: Router
    policies: PolicyHolder
    providers: dict[str, CredentialProvider]
    credentials: CredentialCache
    tasks: TaskRegistry
    revocations: Revocations
    sessions: Sessions
    exchanges: ActiveExchanges
    approvals: Approvals
    signer: Signer
    identity: IdentitySource  # our SVID
    verifier: JwtVerifier | None = None  # when inbound.jwt has issuers
    drop_sets: dict[str, DropSet] = field(init=False)  # per upstream: request headers never forwarded there
    inbound_drop: DropSet = field(init=False)
    upstream_credentials: frozenset[tuple[str, str]] = field(init=False)  # (credential, upstream) configured

    @property
    def policy(self) -> PolicySet:
        return self.policies.current

    def __post_init__(self) -> None:
        """The derived lookups, built once here (never on a request)."""
        out, inbound = self.config.outbound, self.config.inbound
        object.__setattr__(self, "drop_sets", {
            name: request_drop_set((*out.strip_headers, *AGENT_KEY_HEADERS.get(up.protocol, ())), up.pass_headers)
            for name, up in out.upstreams.items()})
        object.__setattr__(self, "inbound_drop", inbound_drop_set(inbound.pass_headers if inbound else ()))
        object.__setattr__(self, "upstream_credentials",
                           frozenset((up.credential, name) for name, up in out.upstreams.items() if up.credential))

    def check_credential_for(self, credential: str, upstream: str) -> None:
        """A credential goes only to an upstream it is configured for: the upstream's own
        ``credential:``, or a rule that names both (a check of its own, after policy's)."""
        pair = (credential, upstream)
        if pair not in self.upstream_credentials and pair not in self.policy.credential_upstreams:
            raise CredentialUnavailable(f"credentials: {credential} is not configured for upstream {upstream}; "
                                        "it is never sent there", detail="credential not configured for upstream")
