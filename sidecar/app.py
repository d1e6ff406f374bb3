"""Builds the sidecar from a validated config and owns the lifecycle of everything in it.

    Sidecar.start()   identity -> policy -> providers -> runtime -> watches -> bus -> fleet -> loop monitor
                      -> health, metrics, admin -> outbound, inbound -> ready
    Sidecar.reload()  policy files (and identity files) re-read; a bad edit keeps the last good set
    Sidecar.stop()    not ready -> stop accepting -> drain requests in flight (shutdown.drain) -> cut
                      what outlives the drain -> close the rest

Each resource is registered on one exit stack as it starts, so teardown is the start order
reversed by construction: the listeners that carry exchanges started last and stop first (while
the bus, the watches and the admin API still run), and a start that fails half-way closes what
it had started.

Listeners: outbound (loopback, the agent's calls), inbound (mTLS, callers of the agent; only
with ``inbound:``), health, metrics, admin (loopback, token).
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import structlog
from aiohttp import web

from sidecar.approvals import Approvals
from sidecar.config_model import Config
from sidecar.connect import Interceptor
from sidecar.credentials.base import ProviderDeps
from sidecar.credentials.cache import CredentialCache
from sidecar.credentials.registry import PROVIDER_TYPES
from sidecar.errors import ConfigInvalid
from sidecar.fields import ListenAddress
from sidecar.exchange import ActiveExchanges, AgentInfo
from sidecar.identity.ca import SigningCA
from sidecar.identity.inbound import InboundIdentity
from sidecar.identity.jwt import JwtVerifier
from sidecar.identity.signing import Signer
from sidecar.identity.source import Candidate, IdentitySource
from sidecar.fleet import Registration, unavailable_view
from sidecar.inventory import fleet_record, inventory
from sidecar.listeners import ExchangeListeners
from sidecar.observe import decision_log
from sidecar.observe.decision_log import REDACTOR, Redactor
from sidecar.observe.headers import HeaderCapture
from sidecar.observe.loop import LoopMonitor
from sidecar.observe.metrics import Metrics
from sidecar.observe.record import Recorder
from sidecar.pipeline import Inbound, Outbound
from sidecar.policy.engine import PolicySet
from sidecar.policy.engine import load_policy
from sidecar.policy.ratelimit import RateLimiter
from sidecar.reload import FileWatcher, ReloadFailed, Reloaded, Reloader
from sidecar.revocation import Enforcement, RedisBus, Revocations
from sidecar.routing import Router
from sidecar.forward.sessions import Sessions
from sidecar.runtime import PolicyHolder, Runtime
from sidecar.http2.listen import AlpnChoice, H2cServer, h2_protocol, offering_h2
from sidecar.http2.front import WINDOW_STALL, H2Server
from sidecar.http1.server import Http1Server
from sidecar.server import ParseErrorHook, SidecarServer, start_tcp
from sidecar.tasks import TaskRegistry
from sidecar import admin, health

log = structlog.get_logger("sidecar.app")
T = TypeVar("T")
DEV_AGENT_PATH = "/agent/{name}"
GC_GEN0_THRESHOLD = 20_000
NO_FLEET = "fleet: needs revocation.redis_url or revocation.sentinel, and fleet.register"


def secret_values(config: Config) -> list[str]:
    """Every configured secret value, for the log redactor."""
    from sidecar.fields import Secret

    return [secret.reveal() for secret in _config_values(config, Secret)]


def credential_headers(config: Config) -> list[str]:
    """Every header a configured credential is placed in: never recorded in an event."""
    from sidecar.credentials.placement import Placement

    return [p.header for p in _config_values(config.credentials, Placement) if p.header is not None]


def _config_values(config: Any, kind: type[T]) -> list[T]:
    """Every value of type ``kind`` anywhere in ``config`` (dataclasses, mappings, sequences)."""
    found: list[T] = []

    def walk(value: Any) -> None:
        if isinstance(value, kind):
            found.append(value)
        elif hasattr(value, "__dataclass_fields__"):
            for name in value.__dataclass_fields__:
                walk(getattr(value, name, None))
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(config)
    return found


def build_policy(config: Config, limiter: RateLimiter | None) -> PolicySet:
    return load_policy(config.policy.files,
                       upstreams={n: u.protocol for n, u in config.outbound.upstreams.items()},
                       credentials={n: tuple(c.spec.scopes or ()) for n, c in config.credentials.items()},
                       mode=config.policy.mode, limiter=limiter,
                       inbound_protocol=config.inbound.protocol if config.inbound else None)


def ensure_identity(config: Config) -> tuple[IdentitySource, bool]:
    """The configured SVID, or a development CA and SVID in state_dir (True: created now)."""
    svid = config.identity.svid
    if svid is not None:
        return IdentitySource(svid.cert, svid.key, svid.bundle, dict(config.identity.federated_bundles)), False
    from sidecar.identity.ca import ensure_dev_identity
    from sidecar.identity.spiffe import parse_spiffe_id

    spiffe_id = parse_spiffe_id(f"spiffe://sidecar.local{DEV_AGENT_PATH.format(name=config.agent_name)}")
    paths = ensure_dev_identity(config.state_dir, spiffe_id)
    source = IdentitySource(paths.cert, paths.key, paths.bundle, dict(config.identity.federated_bundles))
    return source, paths.created


def credential_id_key(config: Config) -> bytes:
    """The key of credential ids that have no jti (static keys): kept in state_dir so ids survive restarts."""
    path = config.state_dir / "credential-id.key"
    if not path.exists():
        config.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_bytes()
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
    return path.read_bytes()


@dataclass
class PolicyFiles:
    """The policy files as a Reloadable: compiled whole in a worker thread, swapped in on the loop."""

    config: Config
    limiter: RateLimiter
    runtime: Runtime
    name: str = "policy"

    def files(self) -> tuple[Path, ...]:
        return tuple(self.config.policy.files)

    def build(self) -> PolicySet:
        try:
            return build_policy(self.config, self.limiter)
        except ConfigInvalid as exc:
            raise ReloadFailed([str(e) for e in exc.errors]) from None

    def apply(self, candidate: PolicySet) -> dict[str, object]:
        """The one place a running sidecar's policy set is swapped: requests read it once, so those in
        flight finish under the set they started with."""
        changed = candidate.version != self.runtime.policy.version
        self.runtime.policies.current = candidate
        return {"policy_version": candidate.version, "changed": changed}

    def in_force(self) -> str:
        return self.runtime.policy.version


@dataclass
class Sidecar:
    config: Config
    watch_policy: bool = False  # ``sidecar run`` watches the policy files; otherwise POST /reload reads them
    metrics: Metrics = field(init=False)
    runtime: Runtime = field(init=False)
    identity: IdentitySource = field(init=False)
    interceptor: Interceptor = field(init=False)  # CONNECT on the outbound listener
    identity_reloader: Reloader[Candidate] = field(init=False)
    intercept_ca_reloader: Reloader[SigningCA] = field(init=False)  # the interception CA's files, watched as the SVID's
    policy_reloader: Reloader[PolicySet] = field(init=False)
    ports: dict[str, int] = field(default_factory=dict)
    draining: bool = False
    _started: bool = False
    _stopped: bool = False
    _resources: AsyncExitStack = field(default_factory=AsyncExitStack)  # closed last-started first
    _listeners: ExchangeListeners | None = None
    _watcher: FileWatcher = field(default_factory=FileWatcher)
    _bus: RedisBus | None = None
    _fleet: Registration | None = None
    _limiter: RateLimiter = field(default_factory=RateLimiter)
    _monitor: LoopMonitor | None = None
    redactor: Redactor = field(init=False)  # this sidecar's secrets: its events, its approvals

    def __post_init__(self) -> None:
        self.redactor = Redactor(secret_values(self.config))

    # -- start ------------------------------------------------------------------------------
    async def start(self, *, before_ready: Callable[[], None] | None = None) -> None:
        """Start everything in order; a start that fails half-way closes what it had started.

        ``before_ready`` runs last, while the sidecar still reports not ready (``sidecar run``: the
        collector's freeze, which holds the interpreter for 150-300 ms)."""
        try:
            await self._start(before_ready)
        except BaseException:
            await self._resources.aclose()
            raise

    async def _start(self, before_ready: Callable[[], None] | None) -> None:
        cfg = self.config
        REDACTOR.attach(self.redactor)  # log lines: the process-wide net; events: this sidecar's own
        self._resources.callback(REDACTOR.detach, self.redactor)
        decision_log.WRITER.backpressure = cfg.log_backpressure
        self.metrics = Metrics(cfg.outbound.upstreams)
        agent = self._load_identity()
        self.metrics.describe_agent(agent.as_dict())
        self.runtime = await self._build_runtime(agent)
        self.metrics.watch_runtime(self.runtime.sessions.pooled)
        self._resources.push_async_callback(self._close_runtime)
        self._watch_files()
        await self._start_bus()
        self._start_fleet()
        self._start_monitor()
        await self._start_listeners()
        self.metrics.standing_credentials.set(sum(1 for p in self.runtime.providers.values() if p.standing))
        if before_ready is not None:
            before_ready()
        self._started = True
        log.info("sidecar_started", agent=agent.id, ports=self.ports, policy_version=self.runtime.policy.version)

    def _load_identity(self) -> AgentInfo:
        """Our SVID (the watch's stamp is taken as it is read) and the agent it names."""
        cfg = self.config
        self.identity, created = ensure_identity(cfg)
        self.identity_reloader = Reloader(self.identity, self.metrics.identity_reloads)
        if created:
            log.warning("dev_identity_created", state_dir=str(cfg.state_dir),
                        spiffe_id=str(self.identity.state.spiffe_id),
                        note="no identity configured: a development CA and SVID were created")
        return AgentInfo(str(self.identity.state.spiffe_id), cfg.agent_name, cfg.environment, cfg.agent)

    async def _build_runtime(self, agent: AgentInfo) -> Runtime:
        from sidecar.identity.signing import build_signer

        cfg = self.config
        policy = build_policy(cfg, self._limiter)
        signer = build_signer(cfg.identity.signing_key, cfg.state_dir, cfg.identity.issuer or agent.id)
        deps = ProviderDeps(agent_id=agent.id, signer=signer, svid=self.identity, id_key=credential_id_key(cfg))
        providers = {name: PROVIDER_TYPES[c.type].build(name, c.spec, deps) for name, c in cfg.credentials.items()}
        policies = PolicyHolder(policy)
        headers = HeaderCapture(cfg.event_headers, credential_headers(cfg), lambda: policies.current.headers_read,
                                self.redactor)
        rt = Runtime(cfg, agent, self.metrics, Recorder(self.metrics, agent, self.redactor, headers),
                     Router(cfg.outbound.upstreams, cfg.outbound.listen), policies, providers,
                     CredentialCache(self.metrics), TaskRegistry.from_config(cfg.tasks), Revocations(self.metrics),
                     Sessions(cfg, self.identity.client_files), ActiveExchanges(asyncio.get_running_loop()),
                     Approvals(self.metrics, cfg.policy.approval_timeout, self.redactor), signer, self.identity,
                     await self._verifier())
        Enforcement(agent.id, rt.tasks, rt.credentials, rt.exchanges, self.metrics).attach(rt.revocations)
        return rt

    async def _verifier(self) -> JwtVerifier | None:
        inbound = self.config.inbound
        if inbound is None or not inbound.jwt_issuers:
            return None
        verifier = JwtVerifier(inbound.jwt_issuers, metrics=self.metrics)
        await verifier.start()
        self._resources.push_async_callback(verifier.aclose)
        return verifier

    async def _close_runtime(self) -> None:
        """What the runtime holds open: cached credentials, providers, upstream sessions, task timers."""
        rt = self.runtime
        await rt.credentials.aclose()
        for provider in rt.providers.values():
            await provider.aclose()
        await rt.sessions.aclose()
        rt.tasks.close()

    def _watch_files(self) -> None:
        """The one file watcher: our SVID and bundles always, the policy files when ``watch_policy``."""
        sessions = self.runtime.sessions
        self.identity.on_change(lambda state, contexts: sessions.renew_client_certs(contexts),
                                prepare=lambda state: sessions.client_contexts((str(state.cert_path),
                                                                                str(state.key_path))))
        policy = PolicyFiles(self.config, self._limiter, self.runtime)
        self.policy_reloader = Reloader(policy, self.metrics.policy_reloads)
        self._watcher.watch(self.identity_reloader)
        if self.watch_policy:
            self._watcher.watch(self.policy_reloader)
        self._watcher.start()
        self._resources.push_async_callback(self._watcher.aclose)

    async def _start_bus(self) -> None:
        if not self.config.revocation.has_bus:
            return
        self._bus = RedisBus(self.config.revocation, self.runtime.revocations, self.metrics)
        self.runtime.revocations.bus = self._bus
        await self._bus.start()
        self._resources.push_async_callback(self._bus.aclose)

    def _start_fleet(self) -> None:
        """The fleet inventory's heartbeat, on the bus's client; stopped before the bus closes it."""
        if self._bus is None or not self.config.fleet.register:
            return
        started_at, runtime = time.time(), self.runtime
        self._fleet = Registration(self.config.fleet, self._bus.client, lambda: fleet_record(runtime, started_at),
                                   metrics=self.metrics)
        self._fleet.start()
        self._resources.push_async_callback(self._fleet.aclose)

    def _start_monitor(self) -> None:
        monitor = self._monitor = LoopMonitor(self.config.observability, self.metrics)
        monitor.start()
        self._resources.callback(monitor.stop)

    async def _start_listeners(self) -> None:
        """Health, metrics and admin first (they answer until the drain is over), then the listeners that
        carry exchanges, registered as one before the first of them binds."""
        cfg = self.config
        thread = health.HealthThread(health.build(self), cfg.health_listen)  # its own loop (health.py says why)
        self.ports["health"] = await thread.start()
        self._resources.push_async_callback(thread.stop)
        for name, app, listen in (("metrics", health.build_metrics(self), cfg.metrics_listen),
                                  ("admin", admin.build(self), cfg.admin.listen)):
            await self._start_app(name, app, listen)
        self._listeners = ExchangeListeners(cfg.drain, self._drain_over)
        self._resources.push_async_callback(self._listeners.aclose)
        await self._start_outbound(self._listeners)
        if cfg.inbound is not None:
            await self._start_inbound(self._listeners)

    async def _start_app(self, name: str, app: web.Application, listen: ListenAddress) -> None:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self._resources.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, listen.host, listen.port, reuse_address=True)
        await site.start()
        self.ports[name] = _port(site._server)

    async def _start_outbound(self, listeners: ExchangeListeners) -> None:
        cfg, rt = self.config, self.runtime
        own = own_http1_server()
        self.interceptor = Interceptor.from_runtime(rt, own_server=own)  # CONNECT: TLS interception, no blind tunnel
        self.intercept_ca_reloader = Reloader(self.interceptor.ca, self.metrics.intercept_ca_reloads)
        self._watcher.watch(self.intercept_ca_reloader)  # a rotated CA signs the next leaves, no restart
        tunnels = self.interceptor.server
        listeners.servers.append(tunnels)  # drained and closed with the listeners
        if isinstance(tunnels, Http1Server) and tunnels.http2 is not None:
            listeners.servers.append(tunnels.http2)  # the tunnels whose TLS chose h2, or that spoke h2c
        outbound, on_refusal = Outbound(rt), self._parse_error("outbound")
        http2 = H2Server(outbound.handle, protocol=h2_protocol, limits=cfg.outbound.limits,
                         on_refusal=on_refusal,
                         **self._http2_guard("outbound", cfg.outbound.timeouts.idle))
        out_server: Http1Server | H2cServer
        if own:
            out_server = Http1Server(self.interceptor.front(outbound), limits=cfg.outbound.limits,
                                     on_parse_error=on_refusal, keepalive=cfg.outbound.timeouts.idle, http2=http2)
            listeners.servers += (out_server, http2)
        else:
            out_server = H2cServer(self.interceptor.front(outbound), limits=cfg.outbound.limits,
                                   on_parse_error=on_refusal, http2=http2)
            listeners.servers.append(out_server)
        server = await start_tcp(out_server, cfg.outbound.listen.host, cfg.outbound.listen.port)
        listeners.accepting.append(server)
        self.ports["outbound"] = _port(server)
        rt.router.bound(ListenAddress(cfg.outbound.listen.host, self.ports["outbound"]))

    async def _start_inbound(self, listeners: ExchangeListeners) -> None:
        from sidecar.identity.mtls import MtlsAcceptor

        cfg, rt = self.config, self.runtime
        assert cfg.inbound is not None
        domains = frozenset(cfg.inbound.trust_domains) or frozenset({self.identity.state.spiffe_id.trust_domain})
        acceptor = MtlsAcceptor(context=offering_h2(self.identity.server_context), bundles=self.identity.bundles,
                                allowed_domains=domains, handler_factory=lambda: AlpnChoice(server, http2),
                                on_reject=rt.recorder.handshake_refused,
                                handshake_timeout=cfg.inbound.timeouts.connect)
        inbound = Inbound(rt, InboundIdentity(cfg.inbound, acceptor.peer_of, rt.verifier, rt.revocations))
        server: Http1Server | SidecarServer
        if own_http1_server():
            server = Http1Server(inbound.handle, limits=cfg.inbound.limits, on_parse_error=self._parse_error("inbound"),
                                 keepalive=cfg.inbound.timeouts.idle)
        else:
            server = SidecarServer(inbound.handle, limits=cfg.inbound.limits,
                                   on_parse_error=self._parse_error("inbound"))
        http2 = H2Server(inbound.handle, protocol=h2_protocol, limits=cfg.inbound.limits,
                         on_refusal=self._parse_error("inbound"),
                         **self._http2_guard("inbound", cfg.inbound.timeouts.idle))
        listeners.servers += (server, http2)
        listener = await acceptor.start(cfg.inbound.listen.host, cfg.inbound.listen.port)
        listeners.accepting.append(listener)
        listeners.after_drain.append(acceptor.close)
        self.ports["inbound"] = _port(listener)

    def _drain_over(self) -> None:
        self.runtime.exchanges.cut(lambda ex: True, "shutdown: drain time over")

    def _http2_guard(self, listener: str, idle: float) -> dict[str, Any]:
        """An HTTP/2 server's abuse metric, its zero-window stall bound (``idle``, at most a minute) and
        its idle connections' timeout (``idle``, as HTTP/1.1's keep-alive)."""
        abuse = self.runtime.metrics.http2_abuse
        return {"on_abuse": lambda kind: abuse.labels(listener, kind).inc(), "stall": min(WINDOW_STALL, idle),
                "idle": idle}

    def _parse_error(self, direction: str) -> ParseErrorHook:
        return lambda refusal: self.runtime.recorder.refused(direction, refusal)

    # -- the control protocol (sidecar.control): what admin and health may ask ------------------
    @property
    def ready(self) -> bool:
        if self.draining or not self._started:
            return False
        if self._bus is not None and self.config.revocation.require_sync and not self._bus.synced.is_set():
            return False
        verifier = self.runtime.verifier
        return verifier is None or verifier.ready

    @property
    def loop_silent_for(self) -> float:
        return self._monitor.silent_for() if self._monitor is not None else 0.0

    @property
    def policy_version(self) -> str:
        return self.runtime.policy.version

    @property
    def revocations(self) -> Revocations:
        return self.runtime.revocations

    @property
    def tasks(self) -> TaskRegistry:
        return self.runtime.tasks

    @property
    def approvals(self) -> Approvals:
        return self.runtime.approvals

    @property
    def verifier(self) -> JwtVerifier | None:
        return self.runtime.verifier

    @property
    def signer(self) -> Signer:
        return self.runtime.signer

    def inventory(self) -> dict[str, Any]:
        fleet = self._fleet.status() if self._fleet is not None else {"registered": False, "reason": NO_FLEET}
        return inventory(self.runtime, self.identity.state, fleet)

    async def fleet(self) -> dict[str, Any]:
        return await self._fleet.view() if self._fleet is not None else unavailable_view(NO_FLEET)

    async def reload(self) -> tuple[Reloaded, ...]:
        """Policy files, then identity and interception CA files if they changed, each read and compiled in a
        worker thread: compiling a policy set (CEL) takes up to hundreds of milliseconds, which the event loop
        must not spend (issue 12 item 5). A failed reload keeps the last good state and is in the result."""
        policy = await self.policy_reloader.reload()
        files: tuple[Reloader[Any], ...] = (self.identity_reloader, self.intercept_ca_reloader)
        others = [await reloader.reload_if_changed() for reloader in files]
        return (policy, *(result for result in others if result is not None))

    # -- stop -------------------------------------------------------------------------------------
    async def stop(self) -> None:
        """Not ready first, then everything start() registered, last started first: the exchange listeners
        stop accepting, drain and cut; then admin and health, the loop monitor, the bus, the watches,
        the runtime's sessions and providers. Idempotent, and safe after a start that failed."""
        if self._stopped:
            return
        self._stopped = True
        self.draining = True
        await self._resources.aclose()
        runtime: Runtime | None = getattr(self, "runtime", None)  # None: the start failed before building it
        if runtime is not None:
            runtime.recorder.flush()  # exchanges that ended in the last step of the drain
        decision_log.WRITER.flush()  # the last events reach stdout before the process exits


def own_http1_server() -> bool:
    """The exchange listeners' HTTP/1.1 server: the sidecar's own (``sidecar/http1/``), or aiohttp's with
    ``SIDECAR_HTTP1_SERVER=aiohttp``: the fallback, kept for one release while the new one is proven (and
    what the differential test compares it with)."""
    return os.environ.get("SIDECAR_HTTP1_SERVER", "sidecar") != "aiohttp"


def _port(server: Any) -> int:
    port: int = server.sockets[0].getsockname()[1]
    return port


def tune_gc() -> None:
    """After start-up: freeze what exists (config, compiled policy, keys) out of the collector's view and
    collect the young generation less often. Requests allocate short-lived objects that reference
    counting frees; default settings spent a measurable share of each request in gen-0 passes, and
    paused 18-26 ms every few seconds under load (PERFORMANCE.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)


async def serve(config: Config) -> int:
    """``sidecar run``: start, serve until SIGTERM/SIGINT, drain, exit 0."""
    sidecar = Sidecar(config, watch_policy=True)
    await sidecar.start(before_ready=tune_gc)  # no probe or request waits out the freeze once ready
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("sidecar_stopping", drain_s=config.drain, in_flight=len(sidecar.runtime.exchanges))
    await sidecar.stop()
    log.info("sidecar_stopped")
    return 0
