"""Builds the sidecar from a validated config and owns the lifecycle of everything in it.

    Sidecar.start()   identity -> policy -> providers -> runtime -> listeners -> watches -> ready
    Sidecar.reload()  policy files (and identity files) re-read; a bad edit keeps the last good set
    Sidecar.stop()    not ready -> stop accepting -> drain requests in flight (shutdown.drain) -> close

Listeners: outbound (loopback, the agent's calls), inbound (mTLS, callers of the agent; only
with ``inbound:``), health, metrics, admin (loopback, token).
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

from sidecar.approvals import Approvals
from sidecar.config import Config
from sidecar.connect import Interceptor
from sidecar.credentials.base import ProviderDeps
from sidecar.credentials.cache import CredentialCache
from sidecar.credentials.registry import PROVIDER_TYPES
from sidecar.errors import ConfigInvalid
from sidecar.fields import ListenAddress
from sidecar.exchange import ActiveExchanges, AgentInfo
from sidecar.identity.inbound import InboundIdentity
from sidecar.identity.jwt import JwtVerifier
from sidecar.identity.source import IdentitySource
from sidecar.observe import decision_log
from sidecar.observe.decision_log import REDACTOR
from sidecar.observe.loop import LoopMonitor
from sidecar.observe.metrics import Metrics
from sidecar.observe.record import Recorder
from sidecar.pipeline import Inbound, Outbound
from sidecar.policy.engine import PolicySet
from sidecar.policy.engine import load_policy
from sidecar.policy.ratelimit import RateLimiter
from sidecar.revocation import Enforcement, RedisBus, Revocations
from sidecar.routing import Router
from sidecar.forward.sessions import Sessions
from sidecar.runtime import PolicyHolder, Runtime
from sidecar.server import ParseErrorHook, SidecarServer, start_tcp
from sidecar.tasks import TaskRegistry

log = structlog.get_logger("sidecar.app")
DEV_AGENT_PATH = "/agent/{name}"
GC_GEN0_THRESHOLD = 20_000


def secret_values(config: Config) -> list[str]:
    """Every configured secret value, for the log redactor."""
    from sidecar.fields import Secret

    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, Secret):
            found.append(value.reveal())
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
                       credentials={n: tuple(getattr(c.spec, "scopes", ()) or ()) for n, c in config.credentials.items()},
                       mode=config.policy.mode, limiter=limiter)


def ensure_identity(config: Config, metrics: Metrics) -> tuple[IdentitySource, bool]:
    """The configured SVID, or a development CA and SVID in state_dir (True: created now)."""
    svid = config.identity.svid
    if svid is not None:
        return IdentitySource(svid.cert, svid.key, svid.bundle, dict(config.identity.federated_bundles), metrics), False
    from sidecar.identity.ca import ensure_dev_identity
    from sidecar.identity.spiffe import parse_spiffe_id

    spiffe_id = parse_spiffe_id(f"spiffe://sidecar.local{DEV_AGENT_PATH.format(name=config.agent_name)}")
    paths = ensure_dev_identity(config.state_dir, spiffe_id)
    source = IdentitySource(paths.cert, paths.key, paths.bundle, dict(config.identity.federated_bundles), metrics)
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
class Sidecar:
    config: Config
    metrics: Metrics = field(init=False)
    runtime: Runtime = field(init=False)
    identity: IdentitySource = field(init=False)
    interceptor: Interceptor = field(init=False)  # CONNECT on the outbound listener
    ports: dict[str, int] = field(default_factory=dict)
    draining: bool = False
    _servers: list[Any] = field(default_factory=list)
    _web_servers: list[web.Server] = field(default_factory=list)
    _runners: list[web.AppRunner] = field(default_factory=list)
    _bus: RedisBus | None = None
    _closables: list[Any] = field(default_factory=list)
    _limiter: RateLimiter = field(default_factory=RateLimiter)
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)
    _monitor: LoopMonitor | None = None
    _reloading: asyncio.Lock = field(default_factory=asyncio.Lock)  # one policy build at a time

    # -- start ------------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        REDACTOR.register(secret_values(cfg))
        decision_log.WRITER.backpressure = cfg.log_backpressure
        self.metrics = Metrics(cfg.outbound.upstreams)
        self.identity, created = ensure_identity(cfg, self.metrics)
        if created:
            log.warning("dev_identity_created", state_dir=str(cfg.state_dir),
                        spiffe_id=str(self.identity.state.spiffe_id),
                        note="no identity configured: a development CA and SVID were created")
        agent = AgentInfo(str(self.identity.state.spiffe_id), cfg.agent_name, cfg.environment, cfg.agent)
        self.metrics.describe_agent(agent.as_dict())
        self.runtime = await self._build_runtime(agent)
        await self._start_listeners()
        sessions = self.runtime.sessions
        self.identity.on_change(lambda state, contexts: sessions.renew_client_certs(contexts),
                                prepare=lambda state: sessions.client_contexts((str(state.cert_path),
                                                                                str(state.key_path))))
        self.identity.start()
        await self._start_bus()
        self.metrics.standing_credentials.set(sum(1 for p in self.runtime.providers.values() if p.standing))
        self._monitor = LoopMonitor(cfg.observability, self.metrics)
        self._monitor.start()
        log.info("sidecar_started", agent=agent.id, ports=self.ports, policy_version=self.runtime.policy.version)

    async def _build_runtime(self, agent: AgentInfo) -> Runtime:
        from sidecar.identity.signing import build_signer

        cfg = self.config
        policy = build_policy(cfg, self._limiter)
        signer = build_signer(cfg.identity.signing_key, cfg.state_dir, cfg.identity.issuer or agent.id)
        deps = ProviderDeps(agent_id=agent.id, signer=signer, svid=self.identity, id_key=credential_id_key(cfg))
        providers = {name: PROVIDER_TYPES[c.type].build(name, c.spec, deps) for name, c in cfg.credentials.items()}
        rt = Runtime(cfg, agent, self.metrics, Recorder(self.metrics, agent),
                     Router(cfg.outbound.upstreams, cfg.outbound.listen), PolicyHolder(policy), providers,
                     CredentialCache(self.metrics), TaskRegistry.from_config(cfg.tasks), Revocations(self.metrics),
                     Sessions(cfg, self.identity.client_files), ActiveExchanges(),
                     Approvals(self.metrics, cfg.policy.approval_timeout), signer, self.identity,
                     await self._verifier())
        Enforcement(agent.id, rt.tasks, rt.credentials, rt.exchanges, self.metrics).attach(rt.revocations)
        return rt

    async def _verifier(self) -> JwtVerifier | None:
        inbound = self.config.inbound
        if inbound is None or not inbound.jwt_issuers:
            return None
        verifier = JwtVerifier(inbound.jwt_issuers, metrics=self.metrics)
        await verifier.start()
        self._closables.append(verifier)
        return verifier

    async def _start_listeners(self) -> None:
        from sidecar import admin, health

        cfg, rt = self.config, self.runtime
        self.interceptor = Interceptor.from_runtime(rt)  # CONNECT: TLS interception, never a blind tunnel
        self._web_servers.append(self.interceptor.server)  # drained and closed with the listeners
        out_server = SidecarServer(self.interceptor.front(Outbound(rt)), limits=cfg.outbound.limits,
                                   on_parse_error=self._parse_error("outbound"))
        self._web_servers.append(out_server)
        self._servers.append(await start_tcp(out_server, cfg.outbound.listen.host, cfg.outbound.listen.port))
        self.ports["outbound"] = _port(self._servers[-1])
        rt.router.bound(ListenAddress(cfg.outbound.listen.host, self.ports["outbound"]))
        if cfg.inbound is not None:
            await self._start_inbound()
        for name, app, listen in (("health", health.build(self), cfg.health_listen),
                                  ("metrics", health.build_metrics(self), cfg.metrics_listen),
                                  ("admin", admin.build(self), cfg.admin.listen)):
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, listen.host, listen.port, reuse_address=True)
            await site.start()
            self._runners.append(runner)
            self.ports[name] = _port(site._server)  # type: ignore[arg-type]

    async def _start_inbound(self) -> None:
        from sidecar.identity.mtls import MtlsAcceptor

        cfg, rt = self.config, self.runtime
        assert cfg.inbound is not None
        domains = frozenset(cfg.inbound.trust_domains) or frozenset({self.identity.state.spiffe_id.trust_domain})
        acceptor = MtlsAcceptor(context=self.identity.server_context, bundles=self.identity.bundles,
                                allowed_domains=domains, handler_factory=lambda: server(),
                                on_reject=rt.recorder.handshake_refused,
                                handshake_timeout=cfg.inbound.timeouts.connect)
        inbound = Inbound(rt, InboundIdentity(cfg.inbound, acceptor.peer_of, rt.verifier, rt.revocations))
        server = SidecarServer(inbound.handle, limits=cfg.inbound.limits, on_parse_error=self._parse_error("inbound"))
        self._web_servers.append(server)
        self._servers.append(await acceptor.start(cfg.inbound.listen.host, cfg.inbound.listen.port))
        self._closables.append(acceptor)
        self.ports["inbound"] = _port(self._servers[-1])

    def _parse_error(self, direction: str) -> ParseErrorHook:
        return lambda refusal: self.runtime.recorder.refused(direction, refusal)

    async def _start_bus(self) -> None:
        if not self.config.revocation.has_bus:
            return
        self._bus = RedisBus(self.config.revocation, self.runtime.revocations, self.metrics)
        self.runtime.revocations.bus = self._bus
        await self._bus.start()

    # -- readiness and reload --------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        if self.draining:
            return False
        if self._bus is not None and self.config.revocation.require_sync and not self._bus.synced.is_set():
            return False
        verifier = self.runtime.verifier
        return verifier is None or verifier.ready

    def reload_policy(self) -> tuple[bool, str]:
        """Re-read the policy files on this thread; a bad set is rejected whole and the last good one stays."""
        return self._apply_policy(self._build_policy())

    async def reload(self) -> tuple[bool, str]:
        """Policy files, then identity files, each read and compiled in a worker thread: compiling a policy
        set (CEL) takes up to hundreds of milliseconds, which the event loop must not spend (issue 12 item 5)."""
        result = await self._reload_policy_in_thread()
        await self.identity.refresh()
        return result

    async def _reload_policy_in_thread(self) -> tuple[bool, str]:
        async with self._reloading:
            return self._apply_policy(await asyncio.to_thread(self._build_policy))

    def _build_policy(self) -> PolicySet | ConfigInvalid:
        try:
            return build_policy(self.config, self._limiter)
        except ConfigInvalid as exc:
            return exc

    def _apply_policy(self, built: PolicySet | ConfigInvalid) -> tuple[bool, str]:
        if isinstance(built, ConfigInvalid):
            self.metrics.policy_reloads.labels("error").inc()
            log.error("policy_reload_failed", errors=[str(e) for e in built.errors],
                      kept=self.runtime.policy.version)
            return False, "\n".join(str(e) for e in built.errors)
        changed = built.version != self.runtime.policy.version
        self.runtime.policies.current = built
        self.metrics.policy_reloads.labels("ok").inc()
        log.info("policy_reloaded", policy_version=built.version, changed=changed)
        return True, built.version

    async def watch_policy(self) -> None:
        from sidecar.identity.source import _stamp

        files = list(self.config.policy.files)
        stamp = _stamp(files)
        while True:
            await asyncio.sleep(1.0)
            now = _stamp(files)
            if now != stamp:
                stamp = now
                await self._reload_policy_in_thread()

    # -- stop -------------------------------------------------------------------------------------
    async def stop(self) -> None:
        """Not ready first, then stop accepting, drain what is in flight, then close."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.draining = True
        for server in self._servers:
            server.close()
        drain = self.config.drain
        for web_server in self._web_servers:
            web_server.pre_shutdown()  # idle keep-alive connections close now; busy ones finish
        shutdowns = asyncio.gather(*(s.shutdown(drain) for s in self._web_servers), return_exceptions=True)
        done, _ = await asyncio.wait({shutdowns}, timeout=drain)
        runtime = getattr(self, "runtime", None)  # None when start() failed before building it
        if not done and runtime is not None:  # drain is over: cut what still runs (aiohttp would wait again)
            runtime.exchanges.cut(lambda ex: True, "shutdown: drain time over")
        await shutdowns
        for runner in self._runners:
            await runner.cleanup()
        for closable in self._closables:
            await _close(closable)
        if self._bus is not None:
            await self._bus.aclose()
        await self.identity.aclose()
        await self.runtime.credentials.aclose()
        for provider in self.runtime.providers.values():
            await provider.aclose()
        await self.runtime.sessions.aclose()
        self.runtime.tasks.close()
        if self._monitor is not None:
            self._monitor.stop()
        decision_log.WRITER.flush()  # the last events reach stdout before the process exits


async def _close(obj: Any) -> None:
    for name in ("aclose", "close"):
        method = getattr(obj, name, None)
        if method is not None:
            result = method()
            if asyncio.iscoroutine(result):
                await result
            return


def _port(server: Any) -> int:
    return server.sockets[0].getsockname()[1]


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
    sidecar = Sidecar(config)
    await sidecar.start()
    tune_gc()
    watch = asyncio.ensure_future(sidecar.watch_policy())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("sidecar_stopping", drain_s=config.drain, in_flight=len(sidecar.runtime.exchanges))
    watch.cancel()
    await sidecar.stop()
    log.info("sidecar_stopped")
    return 0
