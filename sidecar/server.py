"""The HTTP server underneath every listener, with aiohttp's error path taken over.

aiohttp answers requests its parser rejects with a text 400 that echoes the offending
line, and logs a traceback containing it: a malformed ``Authorization`` header leaks its
token that way. :class:`SidecarServer` builds :class:`SafeRequestHandler` protocols whose
``handle_error`` answers with the same JSON refusal as every other one, reports it to the
listener (so it gets its trust-decision event and metrics) and logs only the error type.

The parser's own limits are raised above the configured ones, so that the configured
limits (checked by the pipeline) decide, with 431 rather than aiohttp's 400.

A client that goes away cancels its handler (aiohttp's ``handler_cancellation``): the exchange
is recorded as cut and its upstream connection closed at once, not held until the upstream
next writes (a quiet stream: up to the idle timeout).

Overload degrades into refusals, never into hung clients: past ``limits.max_connections`` open
connections (or ``max_connections_per_source`` from one address) a new connection gets one
``503 overloaded`` with ``Retry-After`` and is closed before anything it sends is parsed; past
``max_in_flight`` requests being served, a request is answered the same way at once. Each refusal
is reported to the listener (one trust-decision event, the metrics).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Awaitable, Callable, cast

import structlog
from aiohttp import HttpVersion11, web, web_response
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config_model import Limits
from sidecar.errors import (
    PROXY_NAME, RecordedFailure, Refusal, RequestRefused, refusal_body, refusal_headers, refusal_response,
)
from sidecar.http.incoming import Answer, ClientGone, ResponseStream, reset

log = structlog.get_logger("sidecar.server")

# aiohttp writes "Server: Python/3.x aiohttp/3.x" on every response that has no Server header
# (our refusals, and forwarded responses whose upstream sent none): whoever calls us could read
# our stack and its versions from it. One name instead, as in Via and Proxy-Status.
web_response.SERVER_SOFTWARE = PROXY_NAME  # type: ignore[attr-defined]  # aiohttp reads it; not exported
ParseErrorHook = Callable[[Refusal], None]
"""``on_parse_error(refusal)``: a refusal made outside any exchange (a connection, or a request never parsed)."""
RETRY_AFTER_OVERLOAD = 1  # seconds
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CHUNK = 64 * 1024


class AiohttpIncoming:
    """An :class:`~sidecar.http.incoming.IncomingRequest` over one request aiohttp's server parsed."""

    __slots__ = ("native", "method", "target", "headers", "content_length", "last")
    unframed_body = False  # HTTP/1.1 frames every body: Content-Length or chunked

    def __init__(self, request: web.BaseRequest) -> None:
        self.native = request  # for CONNECT only (sidecar.connect takes the connection over)
        self.method = request.method
        self.target = request.raw_path
        self.headers = request.headers
        self.content_length = request.content_length
        self.last = False  # the connection closes after this answer (a refused CONNECT)

    @property
    def raw_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        return self.native.raw_headers

    @property
    def remote(self) -> str | None:
        return self.native.remote

    @property
    def connection(self) -> object:
        return self.native.transport

    def chunks(self) -> AsyncIterator[bytes]:
        return self.native.content.iter_chunked(CHUNK)

    async def send_continue(self) -> None:
        """``100 Continue`` to a client that waits for it before its body (RFC 9110 §10.1.1)."""
        request = self.native
        if request.version == HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(CONTINUE)
            request.writer.output_size = 0  # the response has not started (as aiohttp's own expect handler)

    def respond(self, status: int, reason: str | None, headers: CIMultiDict[str] | dict[str, str],
                body: bytes | None) -> Answer:
        response = web.Response(status=status, reason=reason, headers=headers, body=body)
        if self.last:
            response.force_close()
        return response

    async def start(self, status: int, reason: str | None, headers: CIMultiDict[str]) -> ResponseStream:
        response = web.StreamResponse(status=status, reason=reason, headers=headers)
        try:
            await response.prepare(self.native)
        except ConnectionError:  # aiohttp's ClientConnectionResetError is one
            raise ClientGone(response) from None
        return response

    async def accept_websocket(self, protocol: str | None) -> web.WebSocketResponse:
        socket_ = web.WebSocketResponse(protocols=[protocol] if protocol else ())
        await socket_.prepare(self.native)
        return socket_

    async def finish(self, stream: ResponseStream, trailers: CIMultiDictProxy[str]) -> None:
        await stream.write_eof()

    def abort(self) -> None:
        """A reset, not an orderly close: a response framed by the connection's close (an HTTP/1.0
        client) would otherwise end as if whole."""
        reset(self.native.transport)

    def answer_of(self, stream: ResponseStream) -> Answer:
        return stream

    # -- CONNECT (sidecar.connect takes the connection over) --------------------------------------
    @property
    def protocol(self) -> object:
        return self.native.protocol

    def early_bytes(self) -> bool:
        """Bytes after the CONNECT head, read before the 200: asyncio's start_tls cannot be given them."""
        return bool(getattr(self.native.protocol, "_message_tail", b""))

    def take_over(self) -> asyncio.Transport | None:
        return self.native.transport

    def release(self) -> None:
        """Tell the protocol that parsed the CONNECT that its connection is gone (it was taken over)."""
        protocol = self.native.protocol
        if protocol.transport is not None:
            protocol.connection_lost(None)

    def refused_connect(self) -> None:
        self.native.content.feed_eof()  # what follows is not a body to linger over
        self.last = True


def error_response(refusal: Refusal) -> web.Response:
    """The one shape of every refusal (``sidecar.errors.refusal_body``), as an aiohttp response."""
    return web.Response(status=refusal.status, body=refusal_body(refusal), content_type="application/json",
                        headers=refusal_headers(refusal))


def parse_refusal(exc: BaseException | None, status: int) -> Refusal:
    """Turn a parser error into a refusal, without echoing what the client sent."""
    text = str(getattr(exc, "message", "")).lower()
    if isinstance(exc, LineTooLong) or "too many headers" in text or "header" in text and "too long" in text:
        return RequestRefused("headers_too_large", "request: headers exceed the configured limits")
    if status == 413 or "too large" in text:
        return RequestRefused("body_too_large", "request: body exceeds the configured limit")
    if isinstance(exc, BadHttpMessage) or status == 400:
        return RequestRefused("bad_request", "request: malformed HTTP request "
                                             f"({type(exc).__name__ if exc else 'parse error'}); "
                                             "expected a valid HTTP/1.1 request")
    return Refusal("internal_error", "sidecar: internal error")


def overloaded(what: str) -> Refusal:
    return Refusal("overloaded", f"sidecar: {what}; try again shortly", retry_after=RETRY_AFTER_OVERLOAD)


def source_of(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"


class SafeRequestHandler(RequestHandler):
    """aiohttp's protocol, with errors answered as JSON refusals and logged without content."""

    _refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        refusal = cast(SidecarServer, self._manager).admit(transport)
        if refusal is None:
            super().connection_made(transport)
            return
        self._refused = True  # never parsed, never handled: one answer, then closed
        cast(asyncio.Transport, transport).write(refusal_response(refusal.reason, refusal.message,
                                                                  retry_after=refusal.retry_after))
        transport.close()

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._refused:
            super().connection_lost(exc)

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        refusal = parse_refusal(exc, status)
        log.warning("request_rejected", reason=refusal.reason, status=refusal.status,
                    error_type=type(exc).__name__ if exc else None)
        manager = self._manager
        hook = getattr(manager, "on_parse_error", None)
        if hook is not None and not isinstance(exc, RecordedFailure):  # recorded once, by its exchange
            hook(refusal)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        response = error_response(refusal)
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        log.error("handler_error", error_type=type(exc).__name__ if isinstance(exc, BaseException) else None)


Handler = Callable[[AiohttpIncoming], Awaitable[Answer]]


class SidecarServer(web.Server):
    """A low-level aiohttp server whose protocols are :class:`SafeRequestHandler`."""

    def __init__(self, handler: Handler, *, limits: Limits, on_parse_error: ParseErrorHook | None = None,
                 **kwargs: Any) -> None:
        kwargs.update(parser_limits(limits))
        kwargs.setdefault("auto_decompress", False)  # a proxy passes bodies as they are
        kwargs.setdefault("access_log", None)
        kwargs.setdefault("handler_cancellation", True)  # client gone: the exchange is cut, not left running
        super().__init__(self._gated, **kwargs)
        self.on_parse_error = on_parse_error
        self._serve = handler
        self._limits = limits
        self._by_source: dict[str, int] = {}
        self._sources: dict[RequestHandler, str] = {}
        self.in_flight = 0

    def __call__(self) -> RequestHandler:
        return SafeRequestHandler(self, loop=self._loop, **self._kwargs)

    def admit(self, transport: asyncio.BaseTransport) -> Refusal | None:
        """A new connection's admission: None, or the overload refusal it gets (reported here)."""
        limits = self._limits
        refusal = None
        if len(self._connections) >= limits.max_connections:
            refusal = overloaded(f"{limits.max_connections} connections are open on this listener")
        elif (limits.max_connections_per_source is not None
              and self._by_source.get(source := source_of(transport), 0) >= limits.max_connections_per_source):
            refusal = overloaded(f"{limits.max_connections_per_source} connections from {source} are open")
        if refusal is not None and self.on_parse_error is not None:
            self.on_parse_error(refusal)
        return refusal

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        source = self._sources[handler] = source_of(transport)  # a closed transport may no longer say
        self._by_source[source] = self._by_source.get(source, 0) + 1

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        source = self._sources.pop(handler, None)
        if source is None:
            return
        left = self._by_source.get(source, 1) - 1
        if left > 0:
            self._by_source[source] = left
        else:
            self._by_source.pop(source, None)

    async def _gated(self, request: web.BaseRequest) -> web.StreamResponse:
        """The listener's handler, with at most ``max_in_flight`` requests served at once."""
        if self.in_flight >= self._limits.max_in_flight:
            refusal = overloaded(f"{self._limits.max_in_flight} requests are in flight on this listener")
            if self.on_parse_error is not None:
                self.on_parse_error(refusal)
            response = error_response(refusal)
            response.force_close()
            return response
        self.in_flight += 1
        try:
            return cast(web.StreamResponse, await self._serve(AiohttpIncoming(request)))
        finally:
            self.in_flight -= 1


def parser_limits(limits: Limits) -> dict[str, int]:
    """Parser limits above the configured ones, so that the configured limits decide."""
    return {"max_line_size": limits.max_header_bytes * 2, "max_field_size": limits.max_header_bytes * 2,
            "max_headers": limits.max_headers * 2 + 8}


async def start_tcp(server: Callable[[], asyncio.BaseProtocol], host: str, port: int, *, ssl: Any = None,
                    backlog: int = 512) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_server(server, host, port, ssl=ssl, backlog=backlog, reuse_address=True)
