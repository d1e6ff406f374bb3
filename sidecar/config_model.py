"""The typed, frozen configuration model: what ``sidecar.config`` builds from ``sidecar.yaml``.

Every value is parsed and checked once, at load; the rest of the sidecar only reads these.
Secret values are :class:`~sidecar.fields.Secret` (masked in every repr).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from sidecar.credentials.specs import CredentialSpec
from sidecar.fields import ListenAddress, Secret
from sidecar.http.target import PathOptions, format_authority


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = 32768
    max_headers: int = 100
    max_body_bytes: int = 10 * 1024 * 1024
    max_connections: int = 4096  # open client connections on the listener; one more is answered overloaded
    max_in_flight: int = 1024  # requests being served at once (CONNECT tunnels included)
    max_connections_per_source: int | None = None  # open connections from one address (inbound: 256)


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 5.0
    first_byte: float = 60.0
    idle: float = 300.0


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    url: str
    scheme: str
    host: str
    port: int
    base_path: str  # "" or "/api": no trailing slash
    hosts: tuple[str, ...]
    ca: Path | None
    client_cert: str | None  # "svid" or None
    credential: str | None
    protocol: str  # http | mcp | grpc
    paths: PathOptions
    pass_headers: frozenset[str]
    timeouts: Timeouts
    allow_trace: bool = False  # TRACE/TRACK forwarded (never with a credential); refused otherwise
    http2: bool | str = False  # True: h2 by ALPN over TLS, h2c prior knowledge on http://; "auto": ALPN chooses
    # protocol mcp: the authorization servers a 401's protected-resource metadata may name (RFC 9728)
    authorization_servers: tuple[str, ...] = ()
    host_header: str = field(init=False)  # the Host sent upstream, formatted once here, not per request

    def __post_init__(self) -> None:
        object.__setattr__(self, "host_header", format_authority(self.host, self.port, self.scheme))


@dataclass(frozen=True, slots=True)
class SvidFiles:
    cert: Path
    key: Path
    bundle: Path


@dataclass(frozen=True, slots=True)
class SigningKeyConfig:
    file: Path
    kid: str | None


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    svid: SvidFiles | None = None
    federated_bundles: Mapping[str, Path] = field(default_factory=dict)
    signing_key: SigningKeyConfig | None = None
    issuer: str | None = None


@dataclass(frozen=True, slots=True)
class JwtIssuerConfig:
    issuer: str
    jwks_uri: str | None
    jwks_file: Path | None
    ca: Path | None
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...]
    typ: str | None
    leeway: float
    max_lifetime: float
    actor: str  # human | workload | auto


@dataclass(frozen=True, slots=True)
class InboundConfig:
    listen: ListenAddress
    forward_to: str
    trust_domains: tuple[str, ...]
    jwt_required: bool
    jwt_issuers: tuple[JwtIssuerConfig, ...]
    task_trigger_header: str
    limits: Limits
    timeouts: Timeouts
    pass_headers: frozenset[str] = frozenset()  # caller headers the agent may receive despite the strip set
    http2: bool | str = False  # to the agent: True h2c (h2 by ALPN on https), "auto" ALPN chooses, False HTTP/1.1
    protocol: str = "http"  # what the agent serves its callers: http, or a2a (JSON-RPC parsed, a2a rules)


@dataclass(frozen=True, slots=True)
class OutboundConfig:
    listen: ListenAddress
    strip_headers: frozenset[str]
    intercept_ca_cert: Path | None
    intercept_ca_key: Path | None
    limits: Limits
    timeouts: Timeouts
    upstreams: Mapping[str, Upstream]


@dataclass(frozen=True, slots=True)
class CredentialConfig:
    name: str
    type: str
    spec: CredentialSpec  # the frozen spec its type's parser built (sidecar.credentials.specs)


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    files: tuple[Path, ...]
    mode: str = "enforce"
    approval_timeout: float = 300.0


@dataclass(frozen=True, slots=True)
class TasksConfig:
    end: str = "response"
    ttl: float = 900.0
    max_ttl: float = 3600.0
    max_open_per_principal: int = 100  # open tasks per (issuer, subject); one more is rate_limited
    max_tombstones: int = 10000  # ended tasks remembered (for max_ttl after their end), oldest forgotten first


@dataclass(frozen=True, slots=True)
class RedisTls:
    """TLS to Redis (and to its sentinels): the CA that signs their certificates, a client certificate."""

    ca: Path | None = None  # None: the system's CAs
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True, slots=True)
class SentinelConfig:
    """Redis Sentinel: the bus follows the primary that these sentinels name for ``service_name``."""

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int = 0
    username: Secret | None = None  # the sentinels' own ACL, if they have one
    password: Secret | None = None


@dataclass(frozen=True, slots=True)
class RevocationConfig:
    redis_url: Secret | None = None
    require_sync: bool = True
    sentinel: SentinelConfig | None = None
    username: Secret | None = None  # Redis ACL (AUTH username password)
    password: Secret | None = None
    tls: RedisTls | None = None

    @property
    def has_bus(self) -> bool:
        return self.redis_url is not None or self.sentinel is not None


@dataclass(frozen=True, slots=True)
class Approver:
    """An ``admin.approvers`` entry. ``subject`` is exact, or a pattern whose ``*`` matches one or more
    characters other than ``@``: ``*@example.com`` never matches ``mallory@evil.test@example.com``."""

    issuer: str
    subject: str
    _pattern: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pattern = None
        if "*" in self.subject:
            pattern = re.compile("[^@]+".join(re.escape(part) for part in self.subject.split("*")))
        object.__setattr__(self, "_pattern", pattern)

    def matches(self, issuer: str, subject: str) -> bool:
        if issuer != self.issuer:
            return False
        if self._pattern is None:
            return subject == self.subject
        return self._pattern.fullmatch(subject) is not None


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: ListenAddress
    token_file: Path
    approval_audience: str
    approvers: tuple[Approver, ...]


DEFAULT_TRUST_LEVELS = ("sandbox", "internal", "production")


@dataclass(frozen=True, slots=True)
class AgentMeta:
    """What an operator declares about the agent (``agent.*`` besides name and environment).

    ``trust_levels`` is the declared order, lowest first; ``trust_rank`` is ``trust_level``'s
    position in it (None without a level), what ordering comparisons in policy use.
    """

    owner: str | None = None
    purpose: str | None = None
    trust_level: str | None = None
    trust_levels: tuple[str, ...] = DEFAULT_TRUST_LEVELS
    data_classes: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()  # sorted (key, value) pairs

    @property
    def trust_rank(self) -> int | None:
        return None if self.trust_level is None else self.trust_levels.index(self.trust_level)


@dataclass(frozen=True, slots=True)
class Backpressure:
    """``logging``: what happens while stdout does not take the log (PRODUCT.md, "Logging")."""

    on_backpressure: str = "block"  # block | drop | refuse
    buffer_bytes: int = 8 * 1024 * 1024
    block_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class Observability:
    """``observability``: the event loop's lag sampling and the stall watchdog."""

    loop_sample_interval: float = 0.1
    stall_threshold: float = 0.25
    stall_report_interval: float = 60.0


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """``fleet``: this sidecar's entry in the fleet inventory, kept in the revocation bus's Redis.

    Each ``heartbeat`` the entry is written again; it is live while its ``expiry`` has not run out, then
    listed as stale until ``keep_stale`` after it was last seen, then Redis forgets it.
    """

    register: bool = True
    heartbeat: float = 10.0
    expiry: float = 30.0
    keep_stale: float = 3600.0


@dataclass(frozen=True, slots=True)
class Config:
    agent_name: str
    environment: str
    state_dir: Path
    identity: IdentityConfig
    inbound: InboundConfig | None
    outbound: OutboundConfig
    credentials: Mapping[str, CredentialConfig]
    policy: PolicyConfig
    tasks: TasksConfig
    revocation: RevocationConfig
    admin: AdminConfig
    health_listen: ListenAddress
    metrics_listen: ListenAddress
    log_level: str
    drain: float
    source: Path | None = None
    warnings: tuple[str, ...] = ()
    agent: AgentMeta = AgentMeta()
    log_backpressure: Backpressure = Backpressure()
    observability: Observability = Observability()
    fleet: FleetConfig = FleetConfig()
    event_headers: tuple[str, ...] = ()  # logging.event_headers: more headers events record (observe/headers.py)
