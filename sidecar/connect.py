"""CONNECT with TLS interception: the agent's ``HTTPS_PROXY`` traffic, decrypted and run through
the same pipeline as every other outbound request. There are no blind tunnels.

    CONNECT host:port ─ authority form ─ trust boundary ─ agent revoked? ─ host mapped (``hosts``)?
      ├─ refused: a JSON 4xx on the plain connection, one trust-decision event; no tunnel opens
      └─ mapped: tunnel slot ─ "200 Connection Established" ─ the first byte, peeked (timeout)
           ├─ a TLS record (a ClientHello) ─ start_tls(a leaf for host, ALPN h2 and http/1.1, timeout)
           │    ├─ handshake failed: logged, tls_handshake_failures_total{outbound,handshake_failed}, one
           │    │  event (reason handshake_failed, outcome cut: the agent got its 200, then no TLS came up)
           │    └─ ALPN ``h2``: HTTP/2 (``H2Server``), else HTTP/1.1 (or h2c by its preface)
           ├─ anything else: cleartext, HTTP/1.1 or h2c by its preface (``grpc.http_proxy`` on an insecure
           │  channel); served only for an ``http://`` upstream (the agent could not have used TLS to it),
           │  every request to an ``https://`` one is refused ``tls_required``
           └─ each request, on either protocol: Host (``:authority``) must name the CONNECT authority
              (``host_mismatch``), then route (``for_host(..., "connect")``) -> task -> policy -> credential
              -> forward -> record: the same pipeline whatever the tunnel carries

The request's server lets the handler take the connection over (``take_over``) and keep it until the
tunnel ends: the raw transport's protocol becomes asyncio's TLS protocol (``loop.start_tls``), or
stays raw for cleartext, and that transport gets a protocol of the tunnel server (the listeners' own
HTTP/1.1 server, or aiohttp's on the fallback; HTTP/2 by ALPN or preface). When the tunnel has ended
the server that parsed the CONNECT is told (``release``): it counts the connection gone and writes
nothing after the tunnel's stream.

Which protocol follows the 200 is read without consuming it: the raw transport stops reading and a
duplicate of its socket waits for the first byte and peeks at it (``MSG_PEEK``), so that TLS
(``start_tls``) or the cleartext server reads the tunnel from its first byte.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Awaitable, Callable

import structlog
from aiohttp.web_protocol import RequestHandler

from sidecar.errors import Refusal, RequestRefused
from sidecar.exchange import Exchange
from sidecar.http.incoming import Answer, IncomingRequest, refusal_answer
from sidecar.http1.server import Http1Incoming, Http1Protocol, Http1Server
from sidecar.http.target import normalize_host
from sidecar.http2.front import WINDOW_STALL, H2Connection, H2Server
from sidecar.http2.listen import H2cServer, h2_protocol
from sidecar.identity.ca import CERT_FILE, InterceptionCA
from sidecar.identity.mtls import Holding, hand_over
from sidecar.pipeline import Outbound, check_headers, serve_exchange
from sidecar.routing import Route
from sidecar.runtime import Runtime
from sidecar.server import AiohttpIncoming

Connect = AiohttpIncoming | Http1Incoming  # a CONNECT, on whichever HTTP/1.1 server parsed it

log = structlog.get_logger("sidecar.connect")

ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"
MAX_TUNNELS = 256
HANDSHAKE_FAILED = "connect: tls handshake inside the tunnel failed; expected a client that trusts the interception ca"
TLS_RECORD = 0x16  # the first byte of a TLS handshake record: a ClientHello (RFC 8446 §5.1)


@dataclass(frozen=True, slots=True)
class Tunnel:
    """One intercepted CONNECT: the authority the agent named and the pipeline to run requests on."""

    host: str  # normalized: lowercase, no brackets or trailing dot
    port: int
    upstream: str
    outbound: Outbound
    tls: bool = True  # False: the agent spoke cleartext (HTTP/1.1 or h2c) inside the tunnel


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
    """The request's Host header (HTTP/2: its ``:authority``) must name the authority the tunnel was
    opened for. Without a port it names the default one: 443, or in a cleartext tunnel also 80 (an
    insecure gRPC channel, whose default port is 443, sends its target's name without one)."""
    values = request.headers.getall("Host", ())
    schemes = ("https",) if tunnel.tls else ("https", "http")
    try:
        agrees = len(values) == 1 and any(normalize_host(values[0], scheme) == (tunnel.host, tunnel.port)
                                          for scheme in schemes)
    except RequestRefused:
        agrees = False
    if not agrees:
        raise RequestRefused("host_mismatch", "connect: the Host header inside the tunnel must name the "
                                              "CONNECT authority")


def check_cleartext(tunnel: Tunnel, route: Route) -> None:
    """Cleartext in a tunnel only to an ``http://`` upstream: to an ``https://`` one the agent must
    speak TLS (it gets our leaf), else it would be trusting us with what it meant to encrypt."""
    if not tunnel.tls and route.upstream.scheme != "http":
        raise RequestRefused("tls_required", f"connect: upstream {route.upstream.name} is https; expected "
                                             "tls (a ClientHello) inside the tunnel, got cleartext")


class _TunnelServer(H2cServer):
    """The server behind the tunnels' transports (HTTP/1.1, or h2c by its preface; ``http2`` for those whose
    TLS chose ``h2``); reports each connection's end to the interceptor."""

    def __init__(self, interceptor: Interceptor, **kwargs: Any) -> None:
        abuse = interceptor.rt.metrics.http2_abuse
        http2 = H2Server(interceptor.handle_decrypted, protocol=h2_protocol, limits=kwargs["limits"],
                         on_refusal=kwargs.get("on_parse_error"),
                         on_lost=interceptor.tunnel_ended, on_abuse=lambda kind: abuse.labels("outbound", kind).inc(),
                         stall=min(WINDOW_STALL, kwargs["keepalive_timeout"]), idle=kwargs["keepalive_timeout"])
        super().__init__(interceptor.handle_decrypted, http2=http2, **kwargs)
        self._interceptor = interceptor
        self._carriers: dict[RequestHandler, asyncio.Transport] = {}

    async def shutdown(self, timeout: float | None = None) -> None:
        """Idle tunnels close at once (as aiohttp's runner does); requests in flight get ``timeout``."""
        self.pre_shutdown()
        await super().shutdown(timeout)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self._carriers[handler] = transport

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        carrier = self._carriers.pop(handler, None)
        if carrier is not None and not isinstance(carrier.get_protocol(), H2Connection):  # else handed to h2c
            self._interceptor.tunnel_ended(carrier)


class Interceptor:
    """Answers CONNECT: refuses unmapped hosts, intercepts mapped ones with a minted certificate."""

    def __init__(self, rt: Runtime, ca: InterceptionCA, ca_cert_path: Path, *,
                 max_tunnels: int = MAX_TUNNELS, own_server: bool = True) -> None:
        outbound = rt.config.outbound
        self.rt, self.ca, self.ca_cert_path = rt, ca, ca_cert_path
        self._handshake_timeout = outbound.timeouts.connect
        self.max_tunnels, self._open = max_tunnels, 0  # a cap on concurrent tunnels
        self._tunnels: dict[object, Tunnel] = {}  # by the transport its requests come on (``request.connection``)
        self._ended: dict[object, asyncio.Future[None]] = {}
        self.server: Http1Server | _TunnelServer
        if own_server:
            abuse = rt.metrics.http2_abuse
            http2 = H2Server(self.handle_decrypted, protocol=h2_protocol, limits=outbound.limits,
                             on_refusal=self._parse_error,
                             on_lost=self.tunnel_ended, on_abuse=lambda kind: abuse.labels("outbound", kind).inc(),
                             stall=min(WINDOW_STALL, outbound.timeouts.idle), idle=outbound.timeouts.idle)
            self.server = Http1Server(self.handle_decrypted, limits=outbound.limits, on_parse_error=self._parse_error,
                                      keepalive=outbound.timeouts.idle, http2=http2, on_lost=self._carrier_lost)
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
        log.info("intercept_ca_ready", ca_cert=str(path), configured=cert is not None, ca_sha256=ca.sha256)
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
        try:
            first = await first_byte(raw, self._handshake_timeout)
        except (OSError, TimeoutError) as exc:
            raw.abort()
            self._handshake_failed(tunnel, type(exc).__name__, "nothing sent after the 200")
            return
        if not first:
            raw.abort()
            self._handshake_failed(tunnel, "EOFError", "closed after the 200, before any tls")
            return
        if first[0] == TLS_RECORD:
            carrier = await self._handshake(raw, holding, context, tunnel)
            if carrier is None:
                return
        else:
            carrier, tunnel = raw, replace(tunnel, tls=False)
        ended = self._attach(carrier, holding, tunnel)
        try:
            await ended
        finally:
            if not carrier.is_closing():
                carrier.abort()  # cancelled (shutdown, client gone): the tunnel ends with the handler

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

    def _attach(self, carrier: asyncio.Transport, holding: Holding, tunnel: Tunnel) -> asyncio.Future[None]:
        """Hand the tunnel's transport (TLS, or the raw one for cleartext) to a protocol of the tunnel
        server: HTTP/2 if its TLS chose ``h2``, else HTTP/1.1 (h2c by its preface). The future ends with it."""
        tls = carrier.get_extra_info("ssl_object")
        http2 = tls is not None and tls.selected_alpn_protocol() == "h2"
        http2_server = self.server.http2
        assert http2_server is not None  # the tunnel server always has its HTTP/2 side
        protocol = http2_server() if http2 else self.server()
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tunnels[carrier], self._ended[carrier] = tunnel, ended
        hand_over(carrier, holding, protocol)
        if tls is None:
            carrier.resume_reading()  # paused while its first byte was peeked at
        return ended

    def _carrier_lost(self, connection: Http1Protocol) -> None:
        self.tunnel_ended(connection.carrier)

    def tunnel_ended(self, carrier: object) -> None:
        self._tunnels.pop(carrier, None)
        ended = self._ended.pop(carrier, None)
        if ended is not None and not ended.done():
            ended.set_result(None)

    # -- requests inside the tunnel ---------------------------------------------------------
    def handle_decrypted(self, request: IncomingRequest) -> Awaitable[Answer]:
        ex = Exchange("outbound", protocol="connect", method=request.method)
        return serve_exchange(self.rt, request, ex, lambda: self._exchange(request, ex))

    async def _exchange(self, request: IncomingRequest, ex: Exchange) -> Answer:
        rt = self.rt
        tunnel = self._tunnels.get(request.connection)
        if tunnel is None:
            raise Refusal("internal_error", "connect: request on a connection that is not a tunnel")
        ex.host = tunnel.host
        limits = rt.config.outbound.limits
        check_headers(request, limits.max_headers, limits.max_header_bytes)
        rt.router.check_boundary(request.headers)
        raw_path, query = origin_form(request.target)
        check_host(request, tunnel)
        route = rt.router.for_host(tunnel.host, raw_path, query, "connect")
        check_cleartext(tunnel, route)
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


async def first_byte(raw: asyncio.Transport, timeout: float) -> bytes:
    """The tunnel's first byte, left unread: the transport stops reading, a duplicate of its socket
    waits (``timeout``) until a byte or the end arrives and peeks. ``b""``: the client closed."""
    loop = asyncio.get_running_loop()
    raw.pause_reading()
    peek = socket.socket(fileno=os.dup(raw.get_extra_info("socket").fileno()))
    try:
        ready: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(peek.fileno(), readable)
        try:
            async with asyncio.timeout(timeout):
                await ready
        finally:
            loop.remove_reader(peek.fileno())
        return peek.recv(1, socket.MSG_PEEK)
    finally:
        peek.close()  # the duplicate only: the connection stays the transport's

