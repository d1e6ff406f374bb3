"""``sidecar.yaml`` -> typed, validated, frozen configuration (the model: ``sidecar.config_model``).

Every problem is collected with its path (``outbound.upstreams.billing-api.url: must be an
absolute http or https URL``) and reported at once through :class:`ConfigInvalid`; warnings
(``http://`` upstreams) are kept beside the config for ``validate`` to print. Relative file
paths are resolved against the working directory, as the example config assumes
(``config/policy.yaml``). Secret values are :class:`~sidecar.fields.Secret`: masked in
every repr and dump.

Credential entries are parsed by their type's entry in ``credentials.registry`` (the config
side only: no provider is loaded here); policy files by ``sidecar.policy``. Only references
between sections are checked here.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import SplitResult, parse_qs, urlsplit

import yaml

from sidecar.agent_meta import parse_agent
from sidecar.credentials.registry import PROVIDER_TYPES, ProviderType
from sidecar.errors import ConfigError, ConfigInvalid
from sidecar.config_model import (
    AdminConfig, Approver, Backpressure, Config, CredentialConfig, FleetConfig, IdentityConfig, InboundConfig, JwtIssuerConfig, Limits, Observability, OutboundConfig, PolicyConfig, RedisTls, RevocationConfig, SentinelConfig, SigningKeyConfig, SvidFiles, TasksConfig, Timeouts, Upstream,
)
from sidecar.fields import Fields, ListenAddress, Secret, is_loopback_host, read_secret
from sidecar.http.target import DEFAULT_PORTS, PathOptions
from sidecar.routing import host_pattern

DEFAULT_CONFIG = Path("config/sidecar.yaml")
JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
DEFAULT_STRIP = ("authorization", "proxy-authorization", "cookie")
INBOUND_PROTOCOLS = ("http", "a2a")  # what the agent serves its callers (inbound.protocol)


# -- loading ------------------------------------------------------------------------

def config_path(explicit: str | None, environ: Mapping[str, str]) -> Path:
    """``-c``, else ``$SIDECAR_CONFIG``, else ``config/sidecar.yaml``."""
    return Path(explicit or environ.get("SIDECAR_CONFIG") or DEFAULT_CONFIG)


def load_config(path: Path) -> Config:
    """Read and validate a config file; raises ConfigInvalid listing every problem."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigInvalid([ConfigError(str(path), f"cannot read config: {exc.strerror or exc}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigInvalid([ConfigError(str(path), f"not valid YAML: {_yaml_where(exc)}")]) from None
    return parse_config(raw, source=path)


def parse_config(raw: Any, *, source: Path | None = None, base_dir: Path | None = None) -> Config:
    errors: list[ConfigError] = []
    warnings: list[str] = []
    root = Fields(raw, "", errors, base_dir or Path.cwd())
    agent_name, environment, agent = parse_agent(root.sub("agent"))
    state_dir = root.path_value("state_dir") or root.base_dir / ".sidecar"
    identity = _identity(root.sub("identity"))
    inbound = _inbound(root.sub("inbound")) if root.has("inbound") else None
    credentials = _credentials(root.sub("credentials"))
    outbound = _outbound(root.sub("outbound"), warnings, credentials)
    policy = _policy(root.sub("policy"))
    tasks = _tasks(root.sub("tasks"))
    revocation = _revocation(root.sub("revocation"))
    fleet = _fleet(root.sub("fleet"))
    admin = _admin(root.sub("admin"), state_dir)
    health_listen = _single_listen(root, "health", "0.0.0.0:17021")
    metrics_listen = _single_listen(root, "metrics", "0.0.0.0:17090")
    log_level, backpressure, event_headers = _logging(root.sub("logging"))
    observability = _observability(root.sub("observability"))
    shutdown = root.sub("shutdown")
    drain = shutdown.duration("drain", "20s")
    shutdown.done()
    root.done()
    _check_references(errors, identity, outbound, credentials, admin, inbound)
    _check_loops(errors, inbound, outbound, admin, (health_listen, metrics_listen))
    if errors:
        raise ConfigInvalid(errors)
    return Config(agent_name, environment, state_dir, identity, inbound, outbound, credentials, policy, tasks,
                  revocation, admin, health_listen, metrics_listen, log_level, drain, source, tuple(warnings), agent,
                  log_backpressure=backpressure, observability=observability, fleet=fleet,
                  event_headers=event_headers)


def _logging(f: Fields) -> tuple[str, Backpressure, tuple[str, ...]]:
    d = Backpressure()
    level = f.choice("level", ("debug", "info", "warning", "error"), "info")
    backpressure = Backpressure(f.choice("on_backpressure", ("block", "drop", "refuse"), d.on_backpressure),
                                f.integer("buffer_bytes", d.buffer_bytes, minimum=4096),
                                f.duration("block_timeout", d.block_timeout))
    event_headers = _event_headers(f)
    f.done()
    return level, backpressure, event_headers


def _event_headers(f: Fields) -> tuple[str, ...]:
    """``logging.event_headers``: more request headers whose values events record (for ``sidecar replay``)."""
    from sidecar.http.headers import recordable

    names = f.text_list("event_headers")
    for i, name in enumerate(names):
        if not _HEADER_NAME.match(name) or "_" in name:
            f.error(f"event_headers[{i}]", f"must be a header name (letters, digits and -), got {name!r}")
        elif not recordable(name.lower()):
            f.error(f"event_headers[{i}]", f"{name} is never recorded: it may carry a credential")
    return tuple(n.lower() for n in names)


def _observability(f: Fields) -> Observability:
    d = Observability()
    sample = f.duration("loop_sample_interval", d.loop_sample_interval)
    threshold = f.duration("stall_threshold", d.stall_threshold)
    if sample <= 0 or threshold <= sample:
        f.error("stall_threshold", "must be longer than loop_sample_interval, which must be above 0")
    observability = Observability(sample, threshold, f.duration("stall_report_interval", d.stall_report_interval))
    f.done()
    return observability


def _single_listen(root: Fields, key: str, default: str) -> ListenAddress:
    f = root.sub(key)
    value = f.listen("listen", default)
    f.done()
    return value


_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&*+.^`|~-]+$")
INBOUND_PER_SOURCE = 256  # connections from one caller address; the outbound listener has only the agent


def _limits(f: Fields, *, per_source: int | None = None) -> Limits:
    """A listener's limits; ``per_source`` is its default cap of connections from one address (None: none,
    as on the outbound listener, where every connection is the agent's)."""
    d = Limits()
    limits = Limits(f.integer("max_header_bytes", d.max_header_bytes, minimum=1024),
                    f.integer("max_headers", d.max_headers, minimum=1),
                    f.integer("max_body_bytes", d.max_body_bytes, minimum=0),
                    f.integer("max_connections", d.max_connections, minimum=1),
                    f.integer("max_in_flight", d.max_in_flight, minimum=1),
                    f.integer("max_connections_per_source", per_source, minimum=1))
    f.done()
    return limits


def _timeouts(f: Fields, base: Timeouts = Timeouts()) -> Timeouts:
    t = Timeouts(f.duration("connect", base.connect), f.duration("first_byte", base.first_byte),
                 f.duration("idle", base.idle))
    f.done()
    return t


def _identity(f: Fields) -> IdentityConfig:
    svid = None
    if f.has("svid"):
        s = f.sub("svid")
        cert = s.path_value("cert", required=True, must_exist=True)
        key = s.path_value("key", required=True, must_exist=True)
        bundle = s.path_value("bundle", required=True, must_exist=True)
        s.done()
        svid = SvidFiles(cert, key, bundle) if cert and key and bundle else None
    federated: dict[str, Path] = {}
    fb = f.sub("federated_bundles")
    for domain in fb.keys():
        path = fb.path_value(domain, required=True, must_exist=True)
        if path is not None:
            federated[domain] = path
    signing_key = None
    if f.has("signing_key"):
        sk = f.sub("signing_key")
        file = sk.path_value("file", required=True, must_exist=True)
        kid = sk.text("kid")
        sk.done()
        signing_key = SigningKeyConfig(file, kid) if file else None
    issuer = f.url("issuer", schemes=("https", "http"))
    f.done()
    return IdentityConfig(svid, federated, signing_key, issuer)


def _jwt_issuer(f: Fields) -> JwtIssuerConfig | None:
    issuer = f.text("issuer", required=True)
    jwks_uri = f.url("jwks_uri", https_unless_loopback=True)
    jwks_file = f.path_value("jwks_file", must_exist=True)
    if (jwks_uri is None) == (jwks_file is None):
        f.error("", "needs exactly one of jwks_uri or jwks_file")
    algorithms = f.text_list("algorithms", ("RS256", "ES256", "EdDSA"))
    for alg in algorithms:
        if alg not in JWT_ALGORITHMS:
            f.error("algorithms", f"{alg!r} is not allowed; use asymmetric algorithms only: "
                                  f"{', '.join(JWT_ALGORITHMS)}")
    cfg = JwtIssuerConfig(issuer or "", jwks_uri, jwks_file, f.path_value("ca", must_exist=True),
                          f.text_list("audiences", required=True), algorithms, f.text("typ"),
                          f.duration("leeway", "30s"), f.duration("max_lifetime", "24h"),
                          f.choice("actor", ("human", "workload", "auto"), "auto"))
    f.done()
    return cfg if issuer else None


def _inbound(f: Fields) -> InboundConfig:
    listen = f.listen("listen", "0.0.0.0:17443")
    forward_to = f.url("forward_to", required=True) or "http://127.0.0.1:8080"
    if not is_loopback_host(urlsplit(forward_to).hostname):
        f.error("forward_to", "must be a loopback address: the agent must not be reachable around the sidecar")
    trust_domains = f.text_list("trust_domains", ())
    jwt = f.sub("jwt")
    required = jwt.flag("required", False)
    issuers = [i for i in (_jwt_issuer(item) for item in jwt.items("issuers")) if i is not None]
    jwt.done()
    if required and not issuers:
        f.error("jwt.issuers", "at least one issuer is needed when jwt.required is true")
    cfg = InboundConfig(listen, forward_to, trust_domains, required, tuple(issuers),
                        f.text("task_trigger_header", "X-Task-Trigger"),
                        _limits(f.sub("limits"), per_source=INBOUND_PER_SOURCE),
                        _timeouts(f.sub("timeouts")), _pass_headers(f),
                        _http2(f, "http", urlsplit(forward_to).scheme),  # the leg to the agent, as an upstream's
                        f.choice("protocol", INBOUND_PROTOCOLS, "http"))
    f.done()
    return cfg


def _outbound(f: Fields, warnings: list[str], credentials: Mapping[str, CredentialConfig]) -> OutboundConfig:
    listen = f.listen("listen", "127.0.0.1:17001")
    if not listen.is_loopback:
        f.error("listen", "must be a loopback address (127.0.0.1 or ::1): everything reaching the outbound "
                          "listener is treated as the agent")
    strip = frozenset(h.lower() for h in f.text_list("strip_headers", DEFAULT_STRIP))
    intercept = f.sub("intercept")
    ca_cert = intercept.path_value("ca_cert", must_exist=True)
    ca_key = intercept.path_value("ca_key", must_exist=True)
    if (ca_cert is None) != (ca_key is None):
        intercept.error("", "ca_cert and ca_key go together")
    intercept.done()
    timeouts = _timeouts(f.sub("timeouts"))
    ups = f.sub("upstreams")
    upstreams = {}
    for name in ups.keys():
        upstream = _upstream(name, ups.sub(name), timeouts, warnings, credentials)
        if upstream is not None:
            upstreams[name] = upstream
    _check_unique_hosts(upstreams, ups)
    cfg = OutboundConfig(listen, strip, ca_cert, ca_key, _limits(f.sub("limits")), timeouts, upstreams)
    f.done()
    return cfg


def _loads_as_ca(path: Path) -> bool:
    try:
        ssl.create_default_context().load_verify_locations(cafile=str(path))
    except (ssl.SSLError, OSError, ValueError):
        return False
    return True


def _upstream(name: str, f: Fields, timeouts: Timeouts, warnings: list[str],
              credentials: Mapping[str, CredentialConfig]) -> Upstream | None:
    """One upstream; every problem of the entry is reported, those of a bad ``url`` included."""
    if not name or "/" in name or "%" in name or name in (".", ".."):
        f.error("", "upstream names must be non-empty and contain no '/', '%', or dot segments")
    url = f.url("url", required=True)
    hosts = _hosts(f)
    ca = f.path_value("ca", must_exist=True)
    if ca is not None and ca.is_file() and not _loads_as_ca(ca):  # a missing file is reported once
        f.error("ca", "expected a PEM file of CA certificates; none could be loaded from it")
    client_cert = f.choice("client_cert", ("svid",))
    credential = f.text("credential")
    if credential and credential not in credentials:
        f.error("credential", f"credential {credential!r} is not defined under credentials")
    protocol = f.choice("protocol", ("http", "mcp", "grpc", "a2a", "openai", "anthropic"), "http")
    http2 = _http2(f, protocol, urlsplit(url).scheme if url else None)
    p = f.sub("paths")
    paths = PathOptions(p.flag("allow_encoded_slash", False), p.flag("merge_slashes", True))
    p.done()
    pass_headers = _pass_headers(f)
    allow_trace = f.flag("allow_trace", False)
    up_timeouts = _timeouts(f.sub("timeouts"), timeouts)
    servers = _authorization_servers(f, protocol, credentials.get(credential or ""))
    f.done()
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.query or parts.fragment or parts.username:
        f.error("url", "must not carry a query, fragment or user info")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        warnings.append(f"{f.at('url')}: plain http upstream: traffic and credentials are not encrypted")
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    host = (parts.hostname or "").lower().rstrip(".")
    return Upstream(name, url, parts.scheme, host, port, parts.path.rstrip("/"), hosts, ca, client_cert,
                    credential, protocol, paths, pass_headers, up_timeouts, allow_trace, http2, servers)


def _authorization_servers(f: Fields, protocol: str, credential: CredentialConfig | None) -> tuple[str, ...]:
    """``authorization_servers`` (protocol mcp): the issuers an MCP server's protected-resource metadata may
    name; by default the upstream's OAuth credential's own ``issuer``. Its metadata may be served from the
    upstream's host or one of theirs (sidecar.mcp_auth)."""
    listed = f.text_list("authorization_servers")
    if listed and protocol != "mcp":
        f.error("authorization_servers", "applies only to protocol mcp upstreams")
    for i, server in enumerate(listed):
        parts = urlsplit(server)
        if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment or parts.username:
            f.error(f"authorization_servers[{i}]", f"must be an https issuer URL without query or fragment, "
                                                   f"got {server!r}")
    if listed:
        return tuple(s.rstrip("/") for s in listed)
    endpoint = getattr(credential.spec, "endpoint", None) if credential is not None else None
    issuer = getattr(endpoint, "issuer", None)
    return (issuer.rstrip("/"),) if protocol == "mcp" and isinstance(issuer, str) else ()


def _http2(f: Fields, protocol: str, scheme: str | None) -> bool | str:
    """``http2: true | false | auto``: HTTP/2 (h2 by ALPN over TLS, h2c on http://), HTTP/1.1, or the one
    the upstream's TLS handshake selects; a gRPC upstream always speaks HTTP/2."""
    value = f.raw_value("http2")
    if value is None:
        return protocol == "grpc"
    if value not in (True, False, "auto"):
        f.error("http2", f"must be true, false or auto, got {value!r}")
        return False
    if protocol == "grpc" and value is not True:
        f.error("http2", "a grpc upstream speaks HTTP/2: expected true (or no http2 key)")
    if value == "auto" and scheme != "https":
        f.error("http2", "auto chooses by ALPN, which needs an https url; expected true (h2c) or false")
    return value  # type: ignore[no-any-return]


def _hosts(f: Fields) -> tuple[str, ...]:
    """``hosts``: names, or leading-label wildcards, read as ``sidecar.routing`` matches them."""
    hosts = []
    for i, text in enumerate(f.text_list("hosts", ())):
        try:
            hosts.append(host_pattern(text))
        except ValueError as exc:
            f.error(f"hosts[{i}]", str(exc))
    return tuple(hosts)


def _pass_headers(f: Fields) -> frozenset[str]:
    """Headers (and the parameters ``_method``, ``access_token``) let through despite the strip set."""
    return frozenset(h.lower() for h in f.text_list("pass_headers", ()))


def _check_unique_hosts(upstreams: Mapping[str, Upstream], f: Fields) -> None:
    seen: dict[str, str] = {}
    for up in upstreams.values():
        for host in up.hosts:
            if host in seen and seen[host] != up.name:
                f.error(f"{up.name}.hosts", f"host {host} already maps to upstream {seen[host]}")
            seen[host] = up.name


def _credentials(f: Fields) -> dict[str, CredentialConfig]:
    result = {}
    for name in f.keys():
        c = f.sub(name)
        kind = _provider_type(c)
        if kind is None:
            continue
        spec = kind.parse(c)
        c.done()
        if spec is not None:
            result[name] = CredentialConfig(name, kind.type, spec)
    return result


def _provider_type(c: Fields) -> ProviderType[Any] | None:
    """The entry's ``type:`` from the one table; an unknown one names every valid one."""
    kind = c.text("type", required=True)
    if kind is None:
        return None
    if kind not in PROVIDER_TYPES:
        c.error("type", f"unknown credential type {kind!r}; valid types: {', '.join(sorted(PROVIDER_TYPES))}")
        return None
    return PROVIDER_TYPES[kind]


def _policy(f: Fields) -> PolicyConfig:
    files = tuple(f.base_dir / p for p in f.text_list("files", ("config/policy.yaml",)))
    cfg = PolicyConfig(files, f.choice("mode", ("enforce", "audit"), "enforce"),
                       f.duration("approval_timeout", "5m"))
    f.done()
    return cfg


def _tasks(f: Fields) -> TasksConfig:
    cfg = TasksConfig(f.choice("end", ("response", "ttl"), "response"), f.duration("ttl", "15m"),
                      f.duration("max_ttl", "1h"), f.integer("max_open_per_principal", 100, minimum=1),
                      f.integer("max_tombstones", 10000, minimum=0))
    if cfg.ttl > cfg.max_ttl:
        f.error("ttl", "must not exceed max_ttl")
    f.done()
    return cfg


def _revocation(f: Fields) -> RevocationConfig:
    """The bus: one Redis (``redis_url``) or the primary named by Redis Sentinel (``sentinel``), with
    ACL credentials and TLS for either; every problem with its path, no value echoed."""
    given = {key for key in ("redis_url", "sentinel", "username", "password", "tls") if f.raw.get(key) is not None}
    url = _redis_url(f)
    sentinel_fields, tls_fields = f.sub("sentinel"), f.sub("tls")
    sentinel = _sentinel(sentinel_fields) if "sentinel" in given else None
    tls = _redis_tls(tls_fields) if "tls" in given else None
    username, password = _redis_auth(f)
    if {"redis_url", "sentinel"} <= given:
        f.error("", "needs at most one of redis_url or sentinel")
    elif given & {"username", "password", "tls"} and not given & {"redis_url", "sentinel"}:
        f.error("", "username, password and tls need redis_url or sentinel")
    if url is not None:
        _check_redis_url(f, urlsplit(url.reveal()), tls, bool(given & {"username", "password"}))
    cfg = RevocationConfig(url, f.flag("require_sync", True), sentinel, username, password, tls)
    f.done()
    return cfg


def _fleet(f: Fields) -> FleetConfig:
    """The fleet inventory's timing: an entry must outlive at least one missed heartbeat to stay live."""
    d = FleetConfig()
    cfg = FleetConfig(f.flag("register", d.register), f.duration("heartbeat", d.heartbeat),
                      f.duration("expiry", d.expiry), f.duration("keep_stale", d.keep_stale))
    if cfg.heartbeat <= 0 or cfg.expiry < 2 * cfg.heartbeat:
        f.error("expiry", "must be at least twice heartbeat, which must be above 0")
    if cfg.keep_stale < cfg.expiry:
        f.error("keep_stale", "must be at least expiry")
    f.done()
    return cfg


def _redis_auth(f: Fields) -> tuple[Secret | None, Secret | None]:
    """An ACL user's username and password, both secret references; a username alone is an error."""
    username, password = f.secret("username"), f.secret("password")
    if f.raw.get("username") is not None and f.raw.get("password") is None:
        f.error("username", "needs a password too (Redis ACL: AUTH username password)")
    return username, password


def _redis_url(f: Fields) -> Secret | None:
    raw = f.raw_value("redis_url")  # a plain string, or a secret reference
    if isinstance(raw, str):
        return Secret(raw, "value")
    return None if raw is None else read_secret(raw, f.at("redis_url"), f.errors, f.base_dir)


def _check_redis_url(f: Fields, url: SplitResult, tls: RedisTls | None, credentials: bool) -> None:
    """Checks that name the URL's parts, never its text (it may hold a password)."""
    if url.scheme not in ("redis", "rediss", "unix"):
        f.error("redis_url", "must be a redis://, rediss:// or unix:// URL")
    elif tls is not None and url.scheme != "rediss":
        f.error("tls", "needs a rediss:// redis_url")
    if credentials and "@" in url.netloc:
        f.error("redis_url", "carries credentials: give them in the URL or as username/password, not both")
    if options := sorted(key for key in parse_qs(url.query) if key.startswith("ssl")):
        f.error("redis_url", f"must not set {', '.join(options)}: TLS is always verified; give the CA as tls.ca")


def _sentinel(f: Fields) -> SentinelConfig:
    texts = f.text_list("sentinels", required=True)
    if f.raw.get("sentinels") == []:
        f.error("sentinels", "needs at least one HOST:PORT")
    addresses = (_sentinel_address(f, i, text) for i, text in enumerate(texts))
    cfg = SentinelConfig(tuple(a for a in addresses if a is not None), f.text("service_name", "", required=True),
                         f.integer("db", 0), *_redis_auth(f))
    f.done()
    return cfg


def _sentinel_address(f: Fields, index: int, text: str) -> tuple[str, int] | None:
    host, sep, port = text.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) <= 65535:
        f.error(f"sentinels[{index}]", "must be HOST:PORT with a port from 1 to 65535, for example 10.0.0.11:26379")
        return None
    return host.strip("[]"), int(port)


def _redis_tls(f: Fields) -> RedisTls:
    ca = f.path_value("ca", must_exist=True)
    if ca is not None and ca.is_file() and not _loads_as_ca(ca):
        f.error("ca", "expected a PEM file of CA certificates; none could be loaded from it")
    cert, key = f.path_value("cert", must_exist=True), f.path_value("key", must_exist=True)
    if (cert is None) != (key is None):
        f.error("", "cert and key go together")
    f.done()
    return RedisTls(ca, cert, key)


def _admin(f: Fields, state_dir: Path) -> AdminConfig:
    listen = f.listen("listen", "127.0.0.1:17000")
    if not listen.is_loopback:
        f.error("listen", "must be a loopback address")
    token_file = f.path_value("token_file") or state_dir / "admin-token"
    approvers = []
    for a in f.items("approvers"):
        issuer, subject = a.text("issuer", required=True), a.text("subject", required=True)
        a.done()
        if issuer and subject:
            approvers.append(Approver(issuer, subject))
    cfg = AdminConfig(listen, token_file, f.text("approval_audience", "agent-approvals"), tuple(approvers))
    f.done()
    return cfg


def _check_references(errors: list[ConfigError], identity: IdentityConfig, outbound: OutboundConfig,
                      credentials: Mapping[str, CredentialConfig], admin: AdminConfig,
                      inbound: InboundConfig | None) -> None:
    needs_key = [c.name for c in credentials.values() if c.spec.needs_signing_key]
    if needs_key and identity.signing_key is None:
        errors.append(ConfigError("identity.signing_key", "is required: credentials "
                                  f"{', '.join(needs_key)} rely on a key registered with a verifier"))
    if identity.issuer and identity.signing_key is None:
        errors.append(ConfigError("identity.signing_key", "is required when identity.issuer is set"))
    issuers = {i.issuer for i in inbound.jwt_issuers} if inbound else set()
    for i, approver in enumerate(admin.approvers):
        if approver.issuer not in issuers:
            errors.append(ConfigError(f"admin.approvers[{i}].issuer",
                                      "must be one of the inbound.jwt.issuers (approver tokens are verified "
                                      "like inbound tokens)"))


def _own_ports(inbound: InboundConfig | None, outbound: OutboundConfig, admin: AdminConfig,
               others: tuple[ListenAddress, ...]) -> dict[int, str]:
    listeners = {"outbound": outbound.listen, "admin": admin.listen, "health": others[0], "metrics": others[1]}
    if inbound is not None:
        listeners["inbound"] = inbound.listen
    return {address.port: name for name, address in listeners.items() if address.port}


def _check_loops(errors: list[ConfigError], inbound: InboundConfig | None, outbound: OutboundConfig,
                 admin: AdminConfig, others: tuple[ListenAddress, ...]) -> None:
    """Configs that validate but would turn the sidecar on itself: the agent or an upstream that is one
    of the sidecar's own listeners (a caller's request would re-enter as the agent's, with its
    credentials), and approver tokens that are ordinary inbound tokens."""
    own = _own_ports(inbound, outbound, admin, others)

    def loops(host: str | None, port: int) -> str | None:
        return own.get(port) if is_loopback_host(host) else None

    forward = urlsplit(inbound.forward_to) if inbound is not None else None
    if forward is not None and (name := loops(forward.hostname, forward.port or DEFAULT_PORTS[forward.scheme])):
        errors.append(ConfigError("inbound.forward_to", f"is the sidecar's own {name} listener; expected the "
                                                        "agent's loopback address"))
    for up in outbound.upstreams.values():
        if name := loops(up.host, up.port):
            errors.append(ConfigError(f"outbound.upstreams.{up.name}.url", f"is the sidecar's own {name} listener"))
    audiences = {a for i in (inbound.jwt_issuers if inbound else ()) for a in i.audiences}
    if admin.approvers and admin.approval_audience in audiences:
        errors.append(ConfigError("admin.approval_audience", "must differ from every inbound.jwt audience: "
                                                             "otherwise any inbound token could approve requests"))


def _yaml_where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or "syntax error"
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem

