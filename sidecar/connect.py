"""CONNECT with TLS interception: the agent's ``HTTPS_PROXY`` traffic, decrypted and run through
the same pipeline as every other outbound request. There are no blind tunnels.

    CONNECT host:port ─ authority form ─ trust boundary ─ agent revoked? ─ host mapped (``hosts``)?
      ├─ refused: a JSON 4xx on the plain connection, one trust-decision event; no tunnel opens
      └─ mapped: tunnel slot ─ "200 Connection Established" ─ start_tls(a leaf for host, timeout)
           ├─ handshake failed: logged, tls_handshake_failures_total{outbound,handshake_failed}, one event
           │  (reason handshake_failed, outcome cut: the agent got its 200, then no TLS came up)
           └─ each decrypted request: Host must name the CONNECT authority (``host_mismatch``), then
              route (``for_host(..., "connect")``) -> task -> policy -> credential -> forward -> record

The request's server lets the handler take the connection over (``take_over``) and keep it until the
tunnel ends: the raw transport's protocol becomes asyncio's TLS protocol (``loop.start_tls``), and
the TLS transport gets a protocol of the tunnel server (the listeners' own HTTP/1.1 server, or
aiohttp's on the fallback). When the tunnel has ended the server that parsed the CONNECT is told
(``release``): it counts the connection gone and writes nothing after the TLS stream.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import structlog
from aiohttp.web_protocol import RequestHandler

from sidecar.errors import Refusal, RequestRefused
from sidecar.exchange import Exchange
from sidecar.http.incoming import Answer, IncomingRequest, refusal_answer
from sidecar.http1.server import Http1Incoming, Http1Protocol, Http1Server
from sidecar.http.target import normalize_host
from sidecar.identity.ca import CERT_FILE, InterceptionCA
from sidecar.identity.mtls import Holding, hand_over
from sidecar.pipeline import Outbound, check_headers, serve_exchange
from sidecar.runtime import Runtime
from sidecar.server import AiohttpIncoming, SidecarServer

Connect = AiohttpIncoming | Http1Incoming  # a CONNECT, on whichever HTTP/1.1 server parsed it

log = structlog.get_logger("sidecar.connect")

ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"
MAX_TUNNELS = 256
HANDSHAKE_FAILED = "connect: tls handshake inside the tunnel failed; expected a client that trusts the interception ca"


@dataclass(frozen=True, slots=True)
class Tunnel:
    """One intercepted CONNECT: the authority the agent named and the pipeline to run requests on."""

    host: str  # normalized: lowercase, no brackets or trailing dot
    port: int
    upstream: str
    outbound: Outbound


def parse_authority(target: str) -> tuple[str, int]:
    """``host:port`` (authority form, RFC 9110 9.3.6) -> (normalized host, port); else bad_request."""
    _, colon, port = target.rpartition(":")
    if not colon or not port.isdigit():
        raise RequestRefused("bad_request", "connect: expected an authority-form target host:port")
    name, number = normalize_host(target, "https")
    if not 0 < number < 65536:
        raise RequestRefused("bad_request", "connect: expected a port between 1 and 65535")
    return name, number


def origin_form(raw_target: str) -> tuple[str, str]:
    """A decrypted request's target -> (raw path, raw query); only origin form is accepted."""
    if not raw_target.startswith("/"):
        raise RequestRefused("bad_request", "connect: expected an origin-form target (/path) inside the tunnel")
    path, _, query = raw_target.partition("?")
    return path, query


def check_host(request: IncomingRequest, tunnel: Tunnel) -> None:
    """The decrypted request's Host header must name the authority the tunnel was opened for."""
    values = request.headers.getall("Host", ())
    try:
        agrees = len(values) == 1 and normalize_host(values[0], "https") == (tunnel.host, tunnel.port)
    except RequestRefused:
        agrees = False
    if not agrees:
        raise RequestRefused("host_mismatch", "connect: the Host header inside the tunnel must name the "
                                              "CONNECT authority")


class _TunnelServer(SidecarServer):
    """The server behind the TLS transports; reports each connection's end to the interceptor."""

    def __init__(self, interceptor: Interceptor, **kwargs: Any) -> None:
        super().__init__(interceptor.handle_decrypted, **kwargs)
        self._interceptor = interceptor

    async def shutdown(self, timeout: float | None = None) -> None:
        """Idle tunnels close at once (as aiohttp's runner does); requests in flight get ``timeout``."""
        self.pre_shutdown()
        await super().shutdown(timeout)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self._interceptor.tunnel_ended(handler)


class Interceptor:
    """Answers CONNECT: refuses unmapped hosts, intercepts mapped ones with a minted certificate."""

    def __init__(self, rt: Runtime, ca: InterceptionCA, ca_cert_path: Path, *,
                 max_tunnels: int = MAX_TUNNELS, own_server: bool = True) -> None:
        outbound = rt.config.outbound
        self.rt, self.ca, self.ca_cert_path = rt, ca, ca_cert_path
        self._handshake_timeout = outbound.timeouts.connect
        self.max_tunnels, self._open = max_tunnels, 0  # a cap on concurrent tunnels
        self._tunnels: dict[object, Tunnel] = {}  # by the tunnel's protocol
        self._ended: dict[object, asyncio.Future[None]] = {}
        self.server: Http1Server | _TunnelServer
        if own_server:
            self.server = Http1Server(self.handle_decrypted, limits=outbound.limits, on_parse_error=self._parse_error,
                                      keepalive=outbound.timeouts.idle, on_lost=self.tunnel_ended)
        else:
            self.server = _TunnelServer(self, limits=outbound.limits, on_parse_error=self._parse_error,
                                        keepalive_timeout=outbound.timeouts.idle)

    @classmethod
    def from_runtime(cls, rt: Runtime, *, max_tunnels: int = MAX_TUNNELS, own_server: bool = True) -> Interceptor:
        """The operator's CA (``outbound.intercept``), else one kept in ``state_dir/intercept``."""
        cfg = rt.config
        cert, key = cfg.outbound.intercept_ca_cert, cfg.outbound.intercept_ca_key
        ca = InterceptionCA.load_or_create(cert, key, cfg.state_dir)
        path = cert if cert is not None else cfg.state_dir / "intercept" / CERT_FILE
        log.info("intercept_ca_ready", ca_cert=str(path), configured=cert is not None)
        return cls(rt, ca, path, max_tunnels=max_tunnels, own_server=own_server)

    @property
    def open_tunnels(self) -> int:
        return self._open

    def front(self, outbound: Outbound) -> Callable[[Connect], Awaitable[Answer]]:
        """The outbound listener's handler: CONNECT is answered here, every other request by ``outbound``."""
        def handle(request: Connect) -> Awaitable[Answer]:
            return self.handle(request, outbound) if request.method == "CONNECT" else outbound.handle(request)

        return handle

    # -- CONNECT on the plain listener ------------------------------------------------------
    async def handle(self, request: Connect, outbound: Outbound) -> Answer:
        ex = Exchange("outbound", protocol="connect", method="CONNECT")
        try:
            tunnel = self._admit(request, ex, outbound)
            context = await self.ca.context(tunnel.host)
        except Refusal as refusal:
            return self._refuse(request, ex, refusal)
        self._open += 1
        try:
            await self._run(request, tunnel, context)
        finally:
            self._open -= 1
            request.release()
        return request.respond(200, None, {}, None)  # never sent: the server no longer has the connection

    def _admit(self, request: Connect, ex: Exchange, outbound: Outbound) -> Tunnel:
        """Every check before the tunnel opens; raises the refusal that keeps it shut."""
        rt = self.rt
        limits = rt.config.outbound.limits
        check_headers(request, limits.max_headers, limits.max_header_bytes)
        host, port = parse_authority(request.target)
        ex.host = host
        rt.router.check_boundary(request.headers)
        rt.revocations.check_agent(rt.agent.id)
        upstream = rt.router.upstream_for_host(host)
        if upstream is None:
            raise RequestRefused("unknown_upstream", f"connect: host {host} is not mapped to any upstream; "
                                                     "no tunnel is opened")
        ex.upstream = upstream.name
        if self._open >= self.max_tunnels:
            raise RequestRefused("rate_limited", f"connect: {self.max_tunnels} tunnels are already open",
                                 retry_after=1)
        if request.early_bytes():
            raise RequestRefused("bad_request", "connect: expected the client to wait for the 200 response "
                                                "before starting tls")
        return Tunnel(host, port, upstream.name, outbound)

    def _refuse(self, request: Connect, ex: Exchange, refusal: Refusal) -> Answer:
        ex.refuse(refusal)
        self.rt.recorder.record(ex)
        request.refused_connect()  # what follows a refused CONNECT is never parsed, nor lingered over
        return refusal_answer(request, refusal)

    async def _run(self, request: Connect, tunnel: Tunnel, context: ssl.SSLContext) -> None:
        raw = request.take_over()
        if raw is None or raw.is_closing():
            self._handshake_failed(tunnel, "closed", "before the 200")
            return
        raw.write(ESTABLISHED)
        holding = Holding()
        tls = await self._handshake(raw, holding, context, tunnel)
        if tls is None:
            return
        ended = self._attach(tls, holding, tunnel)
        try:
            await ended
        finally:
            if not tls.is_closing():
                tls.abort()  # cancelled (shutdown, client gone): the tunnel ends with the handler

    async def _handshake(self, raw: asyncio.Transport, holding: Holding, context: ssl.SSLContext,
                         tunnel: Tunnel) -> asyncio.Transport | None:
        """TLS as the server, with the leaf for the tunnel's host; None if it failed (reported)."""
        loop = asyncio.get_running_loop()
        timeout = self._handshake_timeout
        try:
            async with asyncio.timeout(timeout):
                tls = await loop.start_tls(raw, holding, context, server_side=True,
                                           ssl_handshake_timeout=timeout, ssl_shutdown_timeout=timeout)
        except (OSError, EOFError, TimeoutError) as exc:
            raw.abort()
            self._handshake_failed(tunnel, type(exc).__name__, getattr(exc, "reason", None))
            return None
        if tls is None:
            raw.abort()
            self._handshake_failed(tunnel, "closed", None)
        return tls

    def _handshake_failed(self, tunnel: Tunnel, error: str, detail: str | None) -> None:
        """Counted, logged and one event: a tunnel whose TLS never came up is an exchange too."""
        self.rt.metrics.tls_handshake_failures.labels("outbound", "handshake_failed").inc()
        log.warning("tls_handshake_failed", listener="outbound", host=tunnel.host, port=tunnel.port,
                    error_type=error, detail=detail, message=HANDSHAKE_FAILED)
        self.rt.recorder.record(failed_tunnel(tunnel, f"{error}: {detail}" if detail else error))

    def _attach(self, tls: asyncio.Transport, holding: Holding, tunnel: Tunnel) -> asyncio.Future[None]:
        """Hand the TLS transport to a protocol of the tunnel server; the future ends with it."""
        protocol = self.server()
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tunnels[protocol], self._ended[protocol] = tunnel, ended
        hand_over(tls, holding, protocol)
        return ended

    def tunnel_ended(self, protocol: object) -> None:
        self._tunnels.pop(protocol, None)
        ended = self._ended.pop(protocol, None)
        if ended is not None and not ended.done():
            ended.set_result(None)

    # -- requests inside the tunnel ---------------------------------------------------------
    def handle_decrypted(self, request: Connect) -> Awaitable[Answer]:
        ex = Exchange("outbound", protocol="connect", method=request.method)
        return serve_exchange(self.rt, request, ex, lambda: self._exchange(request, ex))

    async def _exchange(self, request: Connect, ex: Exchange) -> Answer:
        rt = self.rt
        tunnel = self._tunnels.get(request.protocol)
        if tunnel is None:
            raise Refusal("internal_error", "connect: request on a connection that is not a tunnel")
        ex.host = tunnel.host
        limits = rt.config.outbound.limits
        check_headers(request, limits.max_headers, limits.max_header_bytes)
        rt.router.check_boundary(request.headers)
        raw_path, query = origin_form(request.target)
        check_host(request, tunnel)
        route = rt.router.for_host(tunnel.host, raw_path, query, "connect")
        return await tunnel.outbound.forward_route(request, ex, route)

    def _parse_error(self, refusal: Refusal) -> None:
        self.rt.recorder.refused("outbound", refusal, protocol="connect")


def failed_tunnel(tunnel: Tunnel, why: str) -> Exchange:
    """The event of a tunnel whose TLS handshake failed: no request ran in it, no HTTP status was sent in it."""
    ex = Exchange("outbound", protocol="connect", method="CONNECT")
    ex.host, ex.upstream = tunnel.host, tunnel.upstream
    ex.reason, ex.outcome = "handshake_failed", "cut"
    ex.reason_detail = f"{HANDSHAKE_FAILED} ({why})"
    return ex

