"""The listeners' own HTTP/1.1 server: an asyncio ``Protocol`` around aiohttp's C parser (llhttp).

One :class:`Http1Protocol` per connection: bytes go to the parser in ``data_received``; each parsed
request is an :class:`Http1Incoming` (the pipeline's ``IncomingRequest``) served in order by one task
per connection, so pipelined requests are answered in the order they came. Responses go out in
one write per head (head and body together for a whole response, ``http1/response.py``); a streamed
body waits for the client's window (``pause_writing``), and a body the client sends is read only as
fast as the pipeline takes it (the parser's payload pauses the transport past its high-water mark).

What the parser refuses (bad framing, CL with TE, obs-fold, NUL/CR/LF in a field, over-long
lines...) is answered with the JSON refusal of every other one and the connection closes: nothing
the client sent is echoed, no traceback is logged, only the error's type. After a refused or
unframed request nothing on the connection is parsed again: a CONNECT that got no tunnel, an
upgrade whose body was not taken, a request whose body was not read within ``LINGER``.

Connection caps (``max_connections``, ``max_connections_per_source``) answer one ``503 overloaded``
with ``Retry-After`` before anything is parsed; past ``max_in_flight`` requests being served a request
is answered the same way at once. A connection that says nothing for ``keepalive`` seconds while a
request head is awaited is closed; if it had started a head it gets ``408 request_timeout`` first
(a slowloris). A client that goes away cancels its request's handler: the exchange is recorded as
cut and its upstream connection closed. ``pre_shutdown`` closes idle connections and lets busy
ones finish their request (graceful drain); ``abort`` on a request resets the TCP connection.

On the outbound listener a connection whose first bytes are HTTP/2's preface is handed to the
listener's :class:`~sidecar.http2.server.H2Server` (h2c with prior knowledge).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable, Iterable, cast

import structlog
from aiohttp import HttpVersion10, HttpVersion11
from aiohttp.http_parser import HttpRequestParser  # the C parser (llhttp) where built, as aiohttp's server uses
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config_model import Limits
from sidecar.errors import RecordedFailure, Refusal, RequestRefused, refusal_body, refusal_headers, refusal_response
from sidecar.http.incoming import Answer, ClientGone, ResponseStream, reset
from sidecar.http1.response import Http1Stream, Whole, Wire, bodiless, header_block, status_line
from sidecar.http1.websocket import ServerWebSocket, accept_key
from sidecar.http2.listen import sniff
from sidecar.server import overloaded, parse_refusal, parser_limits, source_of

if TYPE_CHECKING:
    from sidecar.http2.front import H2Server

log = structlog.get_logger("sidecar.http1")

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CHUNK = 64 * 1024  # body pieces handed to the pipeline, and the payload's buffer before it pauses reading
MAX_QUEUED = 32  # parsed requests waiting on one connection (pipelined) before reading pauses
LINGER = 10.0  # seconds an unread request body is read and dropped for, so the connection stays usable
TIMED_OUT = RequestRefused("request_timeout", "request: the request head did not arrive within the idle timeout")

ParseErrorHook = Callable[[Refusal], None]
Handler = Callable[["Http1Incoming"], Awaitable[Answer]]


class Http1Server:
    """One listener's HTTP/1.1 side: the handler, its limits, its open connections, requests in flight."""

    def __init__(self, handler: Handler, *, limits: Limits, on_parse_error: ParseErrorHook | None = None,
                 keepalive: float = 300.0, http2: H2Server | None = None,
                 on_lost: Callable[[Http1Protocol], None] | None = None) -> None:
        self.handler, self.limits, self.on_parse_error = handler, limits, on_parse_error
        self.keepalive, self.http2, self.on_lost = keepalive, http2, on_lost
        self.parser_limits = parser_limits(limits)
        self.connections: set[Http1Protocol] = set()
        self._by_source: dict[str, int] = {}
        self.in_flight = 0
        self.draining = False

    def __call__(self) -> Http1Protocol:
        return Http1Protocol(self)

    def admit(self, transport: asyncio.BaseTransport) -> tuple[str, Refusal | None]:
        """A new connection's source and admission: None, or the overload refusal it gets (reported here)."""
        limits = self.limits
        source = source_of(transport)
        refusal = None
        if len(self.connections) >= limits.max_connections:
            refusal = overloaded(f"{limits.max_connections} connections are open on this listener")
        elif (limits.max_connections_per_source is not None
              and self._by_source.get(source, 0) >= limits.max_connections_per_source):
            refusal = overloaded(f"{limits.max_connections_per_source} connections from {source} are open")
        if refusal is not None:
            self.refused(refusal)
        return source, refusal

    def opened(self, connection: Http1Protocol) -> None:
        self.connections.add(connection)
        self._by_source[connection.source] = self._by_source.get(connection.source, 0) + 1

    def closed(self, connection: Http1Protocol, *, lost: bool = True) -> None:
        """A connection is gone (or, ``lost`` False, handed to HTTP/2, whose server then reports its end)."""
        if connection not in self.connections:
            return
        self.connections.discard(connection)
        left = self._by_source.get(connection.source, 1) - 1
        if left > 0:
            self._by_source[connection.source] = left
        else:
            self._by_source.pop(connection.source, None)
        if lost and self.on_lost is not None:
            self.on_lost(connection)

    def refused(self, refusal: Refusal) -> None:
        """A refusal made outside any exchange (a connection, a request never parsed): reported."""
        if self.on_parse_error is not None:
            self.on_parse_error(refusal)

    async def serve(self, request: Http1Incoming) -> Answer | None:
        """The handler, with at most ``max_in_flight`` requests served at once; None: a defect, recorded."""
        if self.in_flight >= self.limits.max_in_flight:
            refusal = overloaded(f"{self.limits.max_in_flight} requests are in flight on this listener")
            self.refused(refusal)
            request.keep_alive = False
            return refused_answer(refusal)
        self.in_flight += 1
        try:
            return await self.handler(request)
        except RecordedFailure:  # recorded by its exchange: answered internal_error, or reset once started
            return None
        except Exception as exc:  # a defect outside any exchange: fail closed, never a traceback
            log.error("handler_error", error_type=type(exc).__name__)
            self.refused(Refusal("internal_error", "sidecar: internal error"))
            return None
        finally:
            self.in_flight -= 1

    def pre_shutdown(self) -> None:
        """Draining: idle connections close now, busy ones after the response they are sending."""
        self.draining = True
        for connection in list(self.connections):
            connection.drain()

    async def shutdown(self, timeout: float | None = None) -> None:
        if not self.draining:
            self.pre_shutdown()
        await asyncio.gather(*(c.finished(timeout) for c in list(self.connections)))


def refused_answer(refusal: Refusal) -> Whole:
    headers = refusal_headers(refusal)
    headers["Content-Type"] = "application/json"
    return Whole(refusal.status, None, headers, refusal_body(refusal))


class Http1Protocol(Wire):
    """One HTTP/1.1 connection: the parser, the queue of parsed requests, the task that serves them."""

    def __init__(self, server: Http1Server) -> None:
        loop = asyncio.get_running_loop()
        self.server = server
        limits = server.parser_limits
        parser = HttpRequestParser(self, loop, CHUNK, max_line_size=limits["max_line_size"],
                                   max_field_size=limits["max_field_size"], max_headers=limits["max_headers"],
                                   payload_exception=RequestPayloadError, auto_decompress=False,
                                   max_msg_queue_size=MAX_QUEUED)
        super().__init__(loop, parser)
        self.parser = parser
        self.source = "unknown"
        self.carrier: asyncio.BaseTransport | None = None
        self._queue: deque[tuple[RawRequestMessage | HttpProcessingError, StreamReader]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None  # see _next
        self._idle_from = 0.0  # loop time the current (or last) wait for a request began
        self._task: asyncio.Task[None] | None = None
        self._tail = b""  # bytes after an upgrade (CONNECT, WebSocket) request, held until it is decided
        self._started_head = False  # bytes arrived that are not yet a whole request head
        self._body: StreamReader = EMPTY_PAYLOAD  # the body of the request parsed last
        self._sniffing = server.http2 is not None
        self._seen = b""
        self._done = False  # no more requests are read: an error, a close, a takeover
        self._draining = False
        self.websocket: ServerWebSocket | None = None
        self._current: Http1Incoming | None = None  # the request being served
        self.taken = False  # the connection was taken over (CONNECT): its transport is no longer ours

    # -- asyncio callbacks ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.carrier = transport  # kept after the connection is lost: what a CONNECT tunnel is known by
        self.source, refusal = self.server.admit(transport)
        if refusal is not None:  # never parsed, never handled: one answer, then closed
            self._done = True
            self.live_transport().write(refusal_response(refusal.reason, refusal.message,
                                                         retry_after=refusal.retry_after))
            transport.close()
            return
        self.server.opened(self)
        if self.server.draining:
            self._draining = True
        self._task = self._loop.create_task(self._serve())
        self._task.add_done_callback(self._served)  # also for a task cancelled before it ever ran

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        if self.websocket is not None:
            self.websocket.feed_data(data)
            return
        if self._sniffing:
            if not self._sniff(data):
                return
            data, self._seen = self._seen, b""
        if self._upgraded:
            self._tail += data  # what follows CONNECT or an upgrade waits for the handler's decision
            if len(self._tail) > CHUNK and not self._buffer_paused:
                self._pause_reading_for_buffer()
            return
        try:
            messages, upgraded, tail = self.parser.feed_data(data)
        except HttpProcessingError as exc:
            self._fail_current(f"malformed body ({type(exc).__name__})")
            self._queue.append((exc, EMPTY_PAYLOAD))
            self._done = True
            self._wake()
            return
        if messages:
            self._queue.extend(messages)
            self._body = messages[-1][1]
            self._started_head = False
            self._wake()
            if not self._buffer_paused and len(self._queue) >= MAX_QUEUED:
                self._pause_reading_for_buffer()
        elif data and self._body.is_eof():
            self._started_head = True  # bytes that are no body's: the start of a head
        if upgraded:
            self._upgraded = True
            self._tail = tail
            if len(tail) > CHUNK:
                self._pause_reading_for_buffer()

    def eof_received(self) -> bool:
        """Half-close: requests received whole are still answered, then the connection closes. A client
        that closes while its response streams, or before its body's end, has gone: its exchange is cut."""
        current = self._current
        if self.websocket is not None or self.taken:
            return False
        if current is not None and (current.stream is not None or not current.payload.is_eof()):
            return False  # the transport closes: connection_lost cancels the exchange
        if current is None and not self._queue:
            return False
        self._done = True
        self._wake()
        return True  # our side stays open until the answers are written

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._done = True
        if self.taken:
            self.server.closed(self)
            if self._task is None:
                self._forget()
            return
        if self.websocket is not None:
            self.websocket.feed_eof()
        self._fail_current("the client went before the body's end")
        self._wake()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client has gone: its exchange is cut, its upstream closed
        self.server.closed(self)
        if self._task is None:
            self._forget()  # else once the serving task has ended

    # -- the serving task -----------------------------------------------------------------------
    async def _serve(self) -> None:
        try:
            while await self._next():
                message, payload = self._queue.popleft()
                self.parser.message_consumed()
                if self._buffer_paused and len(self._queue) < MAX_QUEUED:
                    self._resume_reading_if_drained()
                if isinstance(message, HttpProcessingError):
                    self._refuse_unparsed(message)
                    return
                if not await self._exchange(message, payload):
                    return
        except asyncio.CancelledError:
            pass
        finally:
            self._stop_idle_timer()
            self.close()

    def _served(self, task: asyncio.Task[None]) -> None:
        self._task = None
        if self.transport is None:  # lost: nothing will use it again
            self._forget()

    async def _next(self) -> bool:
        """Wait (at most ``keepalive``) for the next parsed request; False: the connection is over.

        One idle timer per connection, not one per request: it is armed when a wait begins and none is
        armed, and when it fires early (the connection was busy, or waited again since) it is armed again
        for what is left of the current wait."""
        while not self._queue:
            if self._done or self._draining or self.transport is None:
                return False
            self._waiter = self._loop.create_future()
            self._idle_from = self._loop.time()
            if self._idle_timer is None:
                self._idle_timer = self._loop.call_at(self._idle_from + self.server.keepalive, self._expire)
            try:
                await self._waiter
            finally:
                self._waiter = None
        return True

    def _stop_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _expire(self) -> None:
        self._idle_timer = None
        if self._done:
            return
        waiting = self._waiter is not None and not self._waiter.done()
        now = self._loop.time()
        # busy since the timer was armed (a wait that begins now ends no earlier), or waiting for less than keepalive
        due = self._idle_from + self.server.keepalive if waiting else now + self.server.keepalive
        if now < due:
            self._idle_timer = self._loop.call_at(due, self._expire)
            return
        if self._started_head and self.transport is not None:  # a head begun and never finished
            self.server.refused(TIMED_OUT)
            self._write_refusal(TIMED_OUT)
        self._done = True
        assert self._waiter is not None
        self._waiter.set_result(None)

    async def _exchange(self, message: RawRequestMessage, payload: StreamReader) -> bool:
        """Serve one request and send its answer; True: the connection goes on to the next one."""
        request = self._current = Http1Incoming(self, message, payload)
        try:
            answer = await self.server.serve(request)
        finally:
            self._current = None
        if self.taken:
            return False
        if self.websocket is not None or request.upgraded_to is not None:
            return False
        if answer is None:
            return self._failed(request)
        if isinstance(answer, Whole):
            try:
                self._send_whole(request, answer)
            except ValueError as exc:  # a line break in a header: never written (response splitting)
                log.error("response_refused", error_type=type(exc).__name__)
                request.abort()
                return False
        elif isinstance(answer, Http1Stream):
            if not answer.ended:
                return False  # cut short: never ends as if whole
        if not request.keep_alive or self._draining or self.transport is None:
            return False
        if self._upgraded:  # a CONNECT without a tunnel, an upgrade without 101: nothing after it is parsed
            return False
        if not payload.is_eof():
            return await self._linger(payload)
        return True

    def _failed(self, request: Http1Incoming) -> bool:
        """A defect while serving: 500 internal_error if nothing was sent yet, else the connection is reset."""
        if request.stream is not None:
            request.abort()
            return False
        refusal = Refusal("internal_error", "sidecar: internal error")
        request.keep_alive = False
        self._send_whole(request, refused_answer(refusal))
        return False

    async def _linger(self, payload: StreamReader) -> bool:
        """An unread body is read and dropped (``LINGER`` at most), so the next request parses cleanly."""
        try:
            async with asyncio.timeout(LINGER):
                while not payload.is_eof():
                    await payload.readany()
        except (TimeoutError, RequestPayloadError, ConnectionError):
            return False
        return payload.is_eof() and payload.exception() is None

    def _refuse_unparsed(self, exc: HttpProcessingError) -> None:
        """The parser's refusal: the JSON refusal, logged by error type only, reported, then closed."""
        refusal = parse_refusal(exc, getattr(exc, "code", 400))
        log.warning("request_rejected", reason=refusal.reason, status=refusal.status, error_type=type(exc).__name__)
        self.server.refused(refusal)
        self._write_refusal(refusal)

    # -- writing --------------------------------------------------------------------------------
    def _send_whole(self, request: Http1Incoming, answer: Whole) -> None:
        body = answer.body or b""
        length = len(body)
        none = bodiless(answer.status, request.method)
        framing = "" if answer.status < 200 or answer.status in (204, 304) else f"Content-Length: {length}\r\n"
        headers = answer.headers
        if "Content-Length" in headers or "content-length" in headers:  # ours is the one framing
            headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
        head = request.head(answer.status, answer.reason, headers.items(), framing)
        if self.transport is None or self.transport.is_closing():
            return
        if none or not body:
            self.transport.write(head)
        elif length <= CHUNK:
            self.transport.write(head + body)
        else:
            self.transport.writelines((head, body))

    def _write_refusal(self, refusal: Refusal) -> None:
        """A refusal outside any request (none was parsed): the one JSON shape, then the connection closes."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        answer = refused_answer(refusal)
        body = answer.body or b""
        transport.write(status_line(1, answer.status, None) + header_block(
            answer.headers.items(), f"Content-Length: {len(body)}\r\n", "Connection: close\r\n") + body)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail_current(self, why: str) -> None:
        """A body cut short or badly framed: the request reading it learns so (never a short body as whole)."""
        if not self._body.is_eof():
            self._body.set_exception(RequestPayloadError(f"request: {why}"))

    def _resume_reading_if_drained(self) -> None:
        if not self._upgraded:
            self.data_received(b"")
            if len(self._queue) >= MAX_QUEUED:
                return
        self._resume_reading_for_buffer()

    def _sniff(self, data: bytes) -> bool:
        """Outbound: True once the first bytes are not HTTP/2's preface; the connection is HTTP/2's if they are."""
        seen = self._seen + data
        verdict = sniff(seen)
        self._seen = seen
        if verdict is None:
            return False
        self._sniffing = False
        if not verdict:
            return True
        self._hand_over_h2(seen)
        return False

    def _hand_over_h2(self, seen: bytes) -> None:
        transport, http2 = self.transport, self.server.http2
        assert transport is not None and http2 is not None
        self._done, self.taken = True, True
        if self._task is not None:
            self._task.cancel()
        self.server.closed(self, lost=False)
        protocol = http2()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(seen)
        self.let_go()

    def let_go(self) -> None:
        """The connection is another protocol's now (h2c), or its tunnel has ended: this one is over
        and is never told (its ``connection_lost`` is not called), so it forgets here."""
        self.transport = None
        if self._task is None:
            self._forget()  # else once its (cancelled) serving task has ended

    # -- lifecycle ------------------------------------------------------------------------------
    def _forget(self) -> None:
        """A connection that is over holds nothing that points back at it. The parser, the queued and
        last bodies and the request being served each reference this protocol, and the TLS transport
        (``carrier``) its SSL protocol, which references this one: cycles that only the collector
        frees, and ``tune_gc`` runs it rarely, so every closed mTLS connection's SSL buffers (about
        40 KiB) stayed until it did. Called once the connection is lost and its serving task has ended."""
        self._queue.clear()
        self._body = EMPTY_PAYLOAD
        self._current = self.websocket = None
        self.parser = cast(HttpRequestParser, None)  # never fed again: data_received returns at ``_done``
        self._parser = None
        self.carrier = None  # reported (``server.closed``): no tunnel or identity is looked up by it again

    def close(self) -> None:
        """Close once what was written is flushed (never after a takeover: the transport is not ours)."""
        self._done = True
        self._wake()
        if not self.taken and self.transport is not None:
            self.transport.close()

    def last_answer(self) -> bool:
        """The answer being written is the connection's last: it is draining, the client half-closed and
        nothing else is queued, or it answers an upgrade (CONNECT, WebSocket) without taking it, after which
        nothing is parsed: said with ``Connection: close``, else a client keeps the connection and loses the
        next request it sends on it."""
        return self._draining or self._done and not self._queue or self._upgraded

    def drain(self) -> None:
        """Stop after the request being served; an idle connection closes now."""
        self._draining = True
        self._wake()

    async def finished(self, timeout: float | None) -> None:
        """Wait for the request being served (at most ``timeout``), then close."""
        task = self._task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=timeout)
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        if not self.taken:
            self.close()

    def take_over(self) -> asyncio.Transport:
        """CONNECT: the raw transport; this protocol lets go of it (never writes or closes it again)."""
        transport = self.live_transport()
        self.taken, self._done = True, True
        return transport

    def early_bytes(self) -> bool:
        return bool(self._tail)

    def accept_websocket(self) -> ServerWebSocket:
        """After the ``101``: frames in and out on this connection; the held bytes are its first frames."""
        socket_ = self.websocket = ServerWebSocket(self)
        self._upgraded = True
        tail, self._tail = self._tail, b""
        if tail:
            socket_.feed_data(tail)
        if self._buffer_paused:
            self._resume_reading_for_buffer()
        return socket_


class Http1Incoming:
    """One parsed request as the pipeline sees it (:class:`~sidecar.http.incoming.IncomingRequest`)."""

    __slots__ = ("conn", "message", "payload", "method", "target", "headers", "content_length", "keep_alive",
                 "stream", "upgraded_to")
    unframed_body = False  # HTTP/1.1 frames every body: Content-Length or chunked

    def __init__(self, connection: Http1Protocol, message: RawRequestMessage, payload: StreamReader) -> None:
        self.conn, self.message, self.payload = connection, message, payload
        self.method = message.method
        self.target = message.path
        self.headers: CIMultiDictProxy[str] = message.headers
        length = message.headers.get("Content-Length")
        self.content_length = int(length) if length is not None else None
        self.keep_alive = not message.should_close
        self.stream: Http1Stream | None = None
        self.upgraded_to: str | None = None

    @property
    def raw_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        return self.message.raw_headers

    @property
    def remote(self) -> str | None:
        transport = self.conn.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return str(peer[0]) if isinstance(peer, (tuple, list)) and peer else None

    @property
    def connection(self) -> object:
        return self.conn.transport

    def chunks(self) -> AsyncIterator[bytes]:
        return self.payload.iter_chunked(CHUNK)

    async def send_continue(self) -> None:
        """``100 Continue`` to a client that waits for it before its body (RFC 9110 §10.1.1)."""
        if (self.message.version == HttpVersion11 and self.stream is None and not self.payload.is_eof()
                and self.headers.get("Expect", "").lower() == "100-continue"):
            self.conn.live_transport().write(CONTINUE)

    def respond(self, status: int, reason: str | None, headers: CIMultiDict[str] | dict[str, str],
                body: bytes | None) -> Answer:
        return Whole(status, reason, headers, body)

    def head(self, status: int, reason: str | None, headers: Iterable[tuple[str, str]], framing: str) -> bytes:
        """The status line and header block, with the framing and the connection's fate."""
        minor = 0 if self.message.version == HttpVersion10 else 1  # HTTP/1.1 to any other version (RFC 9110 §6.2)
        if self.conn.last_answer():
            self.keep_alive = False
        if not self.keep_alive:
            connection = "Connection: close\r\n"
        elif minor == 0:
            connection = "Connection: keep-alive\r\n"
        else:
            connection = ""
        return status_line(minor, status, reason) + header_block(headers, framing, connection)

    async def start(self, status: int, reason: str | None, headers: CIMultiDict[str]) -> ResponseStream:
        none = bodiless(status, self.method)
        chunked = False
        if status < 200 or status in (204, 304):
            framing = ""
        elif "Content-Length" in headers:
            framing = ""  # the upstream's, among the headers
        elif self.message.version != HttpVersion10:
            framing, chunked = ("Transfer-Encoding: chunked\r\n", True) if not none else ("", False)
        else:
            framing, self.keep_alive = "", False  # HTTP/1.0: the body ends with the connection
        stream = Http1Stream(self.conn, status, chunked=chunked, bodiless=none)
        head = self.head(status, reason, headers.items(), framing)
        try:
            transport = self.conn.live_transport()
        except ConnectionError:
            raise ClientGone(stream) from None
        transport.write(head)
        self.stream = stream
        try:
            await self.conn.drained()
        except ConnectionError:
            raise ClientGone(stream) from None
        return stream

    async def accept_websocket(self, protocol: str | None) -> ServerWebSocket:
        headers = {"Upgrade": "websocket", "Connection": "upgrade", "Sec-WebSocket-Accept": accept_key(self.headers)}
        if protocol:
            headers["Sec-WebSocket-Protocol"] = protocol
        self.keep_alive = True  # no Connection: close on a 101
        head = status_line(1, 101, None) + header_block(headers.items(), "", "")
        self.conn.live_transport().write(head)
        self.upgraded_to = "websocket"
        return self.conn.accept_websocket()

    async def finish(self, stream: ResponseStream, trailers: CIMultiDictProxy[str]) -> None:
        await stream.write_eof()

    def abort(self) -> None:
        """A reset, not an orderly close: a response framed by the connection's close (an HTTP/1.0
        client) would otherwise end as if whole."""
        reset(self.conn.transport)

    def answer_of(self, stream: ResponseStream) -> Answer:
        return stream

    # -- CONNECT (sidecar.connect takes the connection over) --------------------------------------
    @property
    def protocol(self) -> object:
        return self.conn

    def early_bytes(self) -> bool:
        """Bytes after the CONNECT head, read before the 200: asyncio's start_tls cannot be given them."""
        return self.conn.early_bytes()

    def take_over(self) -> asyncio.Transport | None:
        try:
            return self.conn.take_over()
        except ConnectionError:
            return None

    def release(self) -> None:
        """The tunnel is over: the connection is counted gone on this server."""
        self.conn.server.closed(self.conn)
        self.conn.let_go()

    def refused_connect(self) -> None:
        self.keep_alive = False

