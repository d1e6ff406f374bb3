"""The forwarding leg's HTTP/1.1 client: kept-alive connections per upstream, requests written as built.

Why not ``aiohttp.ClientSession`` on this leg: a proxy uses none of its cookie jar, redirect
loop, automatic headers, URL re-quoting, auth, traces or middlewares, yet pays for them on
every request (about half the CPU of a bare aiohttp pass-through proxy, measured in
``tests/bench``). Here the request head is serialized from the headers the pipeline built
(so the path policy matched is byte for byte the path sent, and no redirect can ever be
followed: there is no code that would), and the response is read by :class:`Connection`, an
``asyncio.Protocol`` of our own around aiohttp's C response parser (llhttp does all the framing;
one parser per connection, a second for HEAD answers), with the body's flow control and one timer
per connection. A response whose body came with its head is handed over whole, without a wait.
WebSockets and the credential providers' token requests still use ``ClientSession``.

A connection goes back to its pool only when its response was read to the end, the upload
had finished before the response began and neither side asked to close; anything else (cut,
error, early answer) closes it. A byte the upstream sends while the connection is idle closes
it too: no answer can be taken for the next request's. A body without a length is read to the
close (RFC 9112 §6.3). A response head with a header name that is not an RFC 9110 token or a value
with a control character (other than HTAB) fails the exchange (``upstream_protocol_error``): llhttp's
lenient client parser would pass ``Content-Length : 2`` on next to the framing we write.

At most ``limit`` connections per upstream; a request finding them all busy waits for one at most
``first_byte`` (then ``upstream_timeout``). An upload whose sender (the agent, or a caller of the
agent) sends nothing for ``idle`` fails with :class:`BodyStalled`, so that a stalled client cannot
hold a connection for as long as it keeps its socket open.

The head is due within ``first_byte`` of the request all sent (bytes extend it; after a 1xx, once
the request is all sent, the final head is due within ``first_byte`` of that first interim answer
however busy the upstream keeps the line); a 101 is refused, and so is a status outside 100-599.
The body may go quiet for ``idle`` (not while our reader is behind: reading is paused then).

A request that fails on a reused connection before any response byte is retried once on a
new one when it is idempotent and its body can be sent again (RFC 9112 §9.3.1), as aiohttp does.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import Any, AsyncIterable, Awaitable

from aiohttp import ClientConnectionError, ClientOSError, ClientPayloadError, ServerDisconnectedError
from aiohttp.helpers import TimerNoop
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpResponseParser
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config_model import Timeouts
from sidecar.errors import RequestRefused
from sidecar.forward.body import BodyStalled, BodyTooLarge, next_chunk
from sidecar.forward.transport import Body, UpstreamBroke
from sidecar.http.headers import framed_length
from sidecar.http.target import format_authority

READ_CHUNK = 64 * 1024
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
MAX_RESPONSE_LINE = MAX_RESPONSE_FIELD = 8190  # aiohttp's client defaults
MAX_RESPONSE_HEADERS = 128
INFINITY = float("inf")
NO_TIMER = TimerNoop()  # stateless: shared by every body, instead of one made per StreamReader


# RFC 9110 §5.1 token characters, §5.5 field values: a name with anything else, or a value with a control
# character other than HTAB, is refused (llhttp's lenient client parser lets "Content-Length : 2" through).
# As translation tables (1: refused) built once: a translate through a table is one pass, where one that
# deletes characters first builds its table on every call.
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BAD_NAME = bytes(0 if b in _TCHAR else 1 for b in range(256))
_BAD_VALUE = bytes(0 if b == 0x09 or 0x20 <= b != 0x7F else 1 for b in range(256))


class MalformedResponse(HttpProcessingError):
    """The upstream's response head is not valid HTTP (names that are not tokens, control characters)."""

    says_why = True  # its message names the problem (never the value): the refusal's detail


def check_response_head(raw_headers: tuple[tuple[bytes, bytes], ...]) -> None:
    """Refuse a response header whose name is not a token or whose value holds a control character.

    All names, then all values, are checked as one joined string each (one ``translate`` in C, not two per
    header): joining adds no byte, so a refused byte belongs to one name or one value."""
    if not raw_headers:
        return
    names, values = zip(*raw_headers)
    if not all(names) or 1 in b"".join(names).translate(_BAD_NAME):
        raise MalformedResponse(message="upstream: a response header name is not an RFC 9110 token")
    if 1 in b"".join(values).translate(_BAD_VALUE):
        raise MalformedResponse(message="upstream: a response header value contains a control character")


class Connection(asyncio.Protocol):
    """One connection to an upstream: llhttp (aiohttp's C response parser, one per connection and kind of
    request) for all framing, one lazily extended deadline per phase, and the final head handed over from
    ``data_received`` with whatever of its body came with it.

    A phase is the wait for the head (``first_byte``, from the request all sent) or for the body's next
    byte (``idle``, from the head). Bytes only note the time (``_last``): the one timer, armed at most
    ``_tick`` ahead, compares on firing and re-arms for the remainder, so a kept-alive connection under
    load arms about one timer per ``_tick`` instead of one per segment. A byte that comes while no
    request is out closes the connection.
    """

    __slots__ = ("transport", "generation", "_loop", "_first_byte", "_idle", "_tick", "_parsers", "_active",
                 "_waiter", "_payload", "_close", "_got", "_sent", "_timeout", "_last", "_deadline", "_timer",
                 "_reading_paused", "_drain")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeouts: Timeouts, generation: int = 0) -> None:
        self.transport: asyncio.Transport | None = None
        self.generation = generation  # the pool's TLS generation it was opened under (see ConnectionPool.renew)
        self._loop = loop
        self._first_byte, self._idle = timeouts.first_byte, timeouts.idle
        self._tick = min(t for t in (self._first_byte, self._idle, 60.0) if t > 0)
        self._parsers: dict[bool, Any] = {}  # response_with_body -> its parser, made on first use
        self._active: Any = None  # the parser of the request out, None while there is none
        self._waiter: asyncio.Future[tuple[Any, StreamReader]] | None = None  # the final head's
        self._payload: StreamReader | None = None  # the final response's body
        self._close = False  # not to carry another request
        self._got = False  # a byte of this request's response came
        self._sent = False  # the whole request was written
        self._timeout: float | None = None  # the current phase's longest silence, None: no phase
        self._last = 0.0  # when the phase began or its last byte came
        self._deadline = INFINITY  # after a 1xx: the final head's, however busy the upstream is
        self._timer: asyncio.TimerHandle | None = None
        self._reading_paused = False  # the body's reader is behind (StreamReader's flow control)
        self._drain: asyncio.Future[None] | None = None  # the upload's wait for the socket to drain

    # -- the request --------------------------------------------------------------------------------

    def request(self, data: bytes, head_only: bool, streamed: bool) -> asyncio.Future[tuple[Any, StreamReader]]:
        """Write the request (its head, and the body when it is bytes); the future is the final response head
        and its body, or the reason there is none (the exceptions ``send`` maps and retries on)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ServerDisconnectedError()
        parser = self._parsers.get(not head_only)
        if parser is None:
            parser = self._parsers[not head_only] = self._parser(not head_only)
        self._active, self._payload, self._got, self._deadline = parser, None, False, INFINITY
        self._waiter = waiter = self._loop.create_future()
        transport.write(data)
        self._sent = not streamed
        if not streamed:
            self._phase(self._first_byte)
        return waiter

    def _parser(self, with_body: bool) -> Any:
        return HttpResponseParser(self, self._loop, READ_CHUNK, timer=NO_TIMER,  # type: ignore[arg-type]
                                  payload_exception=ClientPayloadError,
                                  response_with_body=with_body, read_until_eof=True, auto_decompress=False,
                                  max_line_size=MAX_RESPONSE_LINE, max_field_size=MAX_RESPONSE_FIELD,
                                  max_headers=MAX_RESPONSE_HEADERS)

    def sent(self) -> None:
        """The streamed body is all written: the head is due within ``first_byte``."""
        self._sent = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._phase(self._first_byte)

    def upload_failed(self, exc: BaseException) -> None:
        """The upload broke off: the exchange fails with ``exc`` if its head has not come; never reused."""
        self._close = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
            self._stop()

    async def drain(self) -> None:
        """Wait until the socket takes more of the upload (``ConnectionResetError`` if it closed)."""
        if self._drain is not None:
            await self._drain

    @property
    def should_close(self) -> bool:
        return self._close

    @property
    def connected(self) -> bool:  # read by StreamReader
        return self.transport is not None

    def is_connected(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def finished(self) -> bool:
        """The response was read to its end and nothing came after it: the connection may carry another request.

        Bytes after the response in its last segment leave llhttp inside a next message; ``feed_eof`` tells
        (on a parser between messages it does nothing)."""
        payload, parser = self._payload, self._active
        self._active = self._waiter = self._payload = None
        self._timeout = None
        if self._close or self.transport is None or payload is None or not payload.is_eof():
            return False
        try:
            return parser.feed_eof() is None
        except Exception:
            return False

    def close(self) -> None:
        self._close = True
        self._stop()

    def _stop(self) -> None:
        self._timeout = None
        if self.transport is not None:
            self.transport.close()

    # -- asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        parser = self._active
        if parser is None:  # an answer nobody asked for (desync, or a body longer than framed)
            self.close()
            return
        self._got = True
        self._last = self._loop.time()
        try:
            messages, _, _ = parser.feed_data(data)
        except Exception as exc:  # framing llhttp refused: before the head, the exchange; after, the body
            self._fail(exc if isinstance(exc, HttpProcessingError) else HttpProcessingError(), UpstreamBroke())
            return
        if messages:
            self._heads(messages)

    def _heads(self, messages: list[tuple[Any, StreamReader]]) -> None:
        """Heads llhttp completed: interim ones skipped, the final one handed over, any after it closes."""
        waiter = self._waiter
        for message, payload in messages:
            if waiter is None or waiter.done():  # a second response to one request: dropped with its connection
                self._close = True
                return
            code = message.code
            if not 100 <= code <= 599:
                return self._fail(HttpProcessingError(message=f"upstream: status {code} is outside 100-599"))
            try:
                check_response_head(message.raw_headers)
            except MalformedResponse as exc:
                return self._fail(exc)
            if code >= 200:
                if message.should_close:
                    self._close = True
                self._payload = payload
                self._phase(self._idle)
                waiter.set_result((message, payload))
            elif code == 101:  # not retried: an answer came
                return self._fail(HttpProcessingError(message="upstream: switched protocols without being asked"))
            elif self._deadline == INFINITY and self._sent:  # 1xx or not, the final head is due within first_byte
                self._deadline = self._loop.time() + self._first_byte

    def _fail(self, head: BaseException, body: BaseException | None = None) -> None:
        """The exchange fails: ``head`` for a head still awaited, ``body`` for a body still being read."""
        self._close = True
        waiter, payload = self._waiter, self._payload
        if waiter is not None and not waiter.done():
            waiter.set_exception(head)
        elif payload is not None and not payload.is_eof() and payload.exception() is None:
            payload.set_exception(body if body is not None else UpstreamBroke())
        self._stop()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self._close = True
        self._timeout = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiter, payload, parser = self._waiter, self._payload, self._active
        if waiter is not None and not waiter.done():  # before the head: retried (see send) if nothing came
            if self._got:
                waiter.set_exception(ClientConnectionError("upstream: connection closed within the response head"))
            else:
                waiter.set_exception(ClientOSError(*exc.args) if isinstance(exc, OSError)
                                     else ServerDisconnectedError())
        elif payload is not None and not payload.is_eof() and payload.exception() is None:
            try:
                parser.feed_eof()  # a body read to the close ends here
            except Exception:
                pass
            if not payload.is_eof():  # framed, and cut short
                payload.set_exception(UpstreamBroke())
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError())
        self._parsers.clear()  # they and the body hold this protocol: no cycle left for the collector
        self._active = self._payload = self._waiter = None

    def pause_writing(self) -> None:
        if self._drain is None:
            self._drain = self._loop.create_future()

    def resume_writing(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def pause_reading(self) -> None:  # StreamReader's, when the body's reader falls behind
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:  # StreamReader's, on every read
        if self._reading_paused:
            self._reading_paused = False
            if self.transport is not None:
                self.transport.resume_reading()
            if self._timeout is not None:  # the silence counts from now: the wait was ours
                self._phase(self._timeout)

    # -- the one timer ------------------------------------------------------------------------------

    def _phase(self, timeout: float) -> None:
        """A phase begins: at most ``timeout`` of silence from now (0: unbounded, as aiohttp's read timeout)."""
        if not timeout:
            self._timeout = None
            return
        self._timeout = timeout
        self._last = now = self._loop.time()
        if self._timer is None:  # else it fires within _tick, before this phase can be due: it checks then
            self._timer = self._loop.call_at(now + self._tick, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        timeout = self._timeout
        if timeout is None or self._reading_paused:  # no phase, or our reader's pause: resume_reading re-arms
            return
        payload = self._payload
        if payload is not None and payload.is_eof():  # the response is all in
            self._timeout = None
            return
        now = self._loop.time()
        due = min(self._last + timeout, self._deadline)
        if now >= due:
            self._fail(TimeoutError(), TimeoutError())
        else:
            self._timer = self._loop.call_at(min(due, now + self._tick), self._on_timer)


class ConnectionPool:
    """Kept-alive connections to one origin (newest reused first), at most ``limit`` open at once."""

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None, timeouts: Timeouts, *,
                 limit: int = 256) -> None:
        self.host, self.port, self.ssl, self.timeouts = host, port, ssl_context, timeouts
        self.host_header = format_authority(host, port, "https" if ssl_context is not None else "http")
        self.keepalive = min(timeouts.idle, 60.0)
        self._limit = limit
        self._idle: list[tuple[Connection, float]] = []
        self._open = 0
        self._waiters: deque[asyncio.Future[Connection | None]] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._generation = 0
        self.closed = False

    @property
    def counts(self) -> tuple[int, int]:
        """(open, idle) connections, for the pooled-connections gauge."""
        return self._open, len(self._idle)

    def take(self) -> Connection | None:
        """The newest idle connection still fit for use, if there is one (no wait: ``send``'s usual path)."""
        now = time.monotonic()
        while self._idle:
            proto, since = self._idle.pop()
            if proto.is_connected() and not proto.should_close and now - since <= self.keepalive:
                return proto
            self._discard(proto)
        return None

    async def acquire(self) -> tuple[Connection, bool]:
        """A connection and whether it was reused; a new one within ``timeouts.connect``.

        With every connection busy, requests queue in arrival order: a released connection, or the
        slot of a closed one, goes to the longest waiter, never to a newcomer. The wait is bounded
        by ``first_byte`` (then ``upstream_timeout``).
        """
        proto = self.take()
        if proto is not None:
            return proto, True
        while self._waiters and self._waiters[0].done():  # gone (cut, timed out) while waiting
            self._waiters.popleft()
        if self._open < self._limit and not self._waiters:
            self._open += 1
            return await self._connect(), False
        handed = await self._wait_turn()
        if handed is not None:
            if handed.is_connected() and not handed.should_close:
                return handed, True
            handed.close()  # closed (or spoke unasked) while handed over: a new one in its slot
        return await self._connect(), False  # a slot reserved for us

    async def _wait_turn(self) -> Connection | None:
        waiter: asyncio.Future[Connection | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.timeouts.first_byte):
                return await waiter
        except BaseException:  # cut, or timed out (upstream_timeout): pass on what was handed to us
            if waiter.done() and not waiter.cancelled():
                handed = waiter.result()
                if handed is not None:
                    self.release(handed, True)
                else:
                    self._free_slot()
            waiter.cancel()
            raise

    async def _connect(self) -> Connection:
        """A new connection in a slot already counted in ``_open``; the slot is freed if it fails."""
        loop, generation, timeouts = asyncio.get_running_loop(), self._generation, self.timeouts
        try:
            async with asyncio.timeout(timeouts.connect):
                _, proto = await loop.create_connection(
                    lambda: Connection(loop, timeouts, generation), self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None)
        except BaseException:
            self._free_slot()
            raise
        return proto

    def release(self, proto: Connection, reusable: bool) -> None:
        if reusable and not self.closed and proto.generation == self._generation and proto.is_connected() \
                and not proto.should_close:
            waiter = self._next_waiter()
            if waiter is not None:  # straight to the longest waiter
                waiter.set_result(proto)
                return
            self._idle.append((proto, time.monotonic()))
            if self._sweep is None:
                self._sweep = asyncio.get_running_loop().call_later(self.keepalive, self._expire)
        else:
            self._discard(proto)

    def _discard(self, proto: Connection) -> None:
        proto.close()
        self._free_slot()

    def _free_slot(self) -> None:
        """A connection slot is free: it passes to the longest waiter (who connects), or back to the pool."""
        waiter = self._next_waiter()
        if waiter is not None:
            waiter.set_result(None)
        else:
            self._open -= 1

    def _next_waiter(self) -> asyncio.Future[Connection | None] | None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                return waiter
        return None

    def _expire(self) -> None:
        """Close connections idle past the keep-alive time (oldest first), so none lingers unused."""
        self._sweep = None
        cutoff = time.monotonic() - self.keepalive
        while self._idle and self._idle[0][1] <= cutoff:
            self._discard(self._idle.pop(0)[0])
        if self._idle:
            self._sweep = asyncio.get_running_loop().call_later(self.keepalive, self._expire)

    def send(self, method: str, target: str, headers: CIMultiDict[str], body: Body) -> Awaitable[UpstreamResponse]:
        """The :class:`~sidecar.forward.transport.Transport` interface: :func:`send` on this pool."""
        return send(self, method, target, headers, body)

    def renew(self, ssl_context: ssl.SSLContext | None) -> None:
        """A new TLS context (our rotated SVID): new connections use it; older ones are not used again.

        Idle connections close now, the ones in use when released; requests queued for a slot
        connect with the new context.
        """
        self.ssl = ssl_context
        self._generation += 1
        while self._idle:
            self._discard(self._idle.pop()[0])

    def close(self) -> None:
        """Close the idle connections now; the ones in use close when released."""
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
        while self._idle:
            self._discard(self._idle.pop()[0])


class UpstreamResponse:
    """The upstream's response head, its body as a stream, and the connection it came on."""

    __slots__ = ("status", "reason", "headers", "content", "_pool", "_proto", "_upload", "_early")
    trailers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())  # a chunked body's trailers are not kept

    def __init__(self, pool: ConnectionPool, proto: Connection, message: Any, payload: StreamReader,
                 upload: asyncio.Task[None] | None) -> None:
        self.status: int = message.code
        self.reason: str = message.reason
        self.headers: CIMultiDictProxy[str] = message.headers
        self.content = payload
        self._pool, self._proto, self._upload = pool, proto, upload
        # answered before the body was all sent: the upstream may read the rest as another request
        self._early = upload is not None and not upload.done()

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    async def read(self) -> bytes:
        """The whole body: at once when it came with the head. ``UpstreamBroke``, or ``TimeoutError`` past idle
        (the connection puts them on the body)."""
        content = self.content
        if content.is_eof():
            return content.read_nowait()
        return await content.read()

    async def read_chunk(self) -> bytes:
        content = self.content
        if content.is_eof():
            return content.read_nowait()
        return await content.readany()

    def release(self) -> None:
        """Back to the pool if read to the end with the upload done first; closed otherwise."""
        upload = self._upload
        if upload is not None and not upload.done():
            upload.cancel()
        proto = self._proto
        self._pool.release(proto, proto.finished() and not self._early)


async def send(pool: ConnectionPool, method: str, target: str, headers: CIMultiDict[str],
               body: bytes | AsyncIterable[bytes] | None) -> UpstreamResponse:
    """Send one request and wait for its response head (``first_byte``); the body stays to be read."""
    streamed = body is not None and not isinstance(body, bytes)
    chunked = streamed and "Content-Length" not in headers
    data = serialize_head(method, target, headers, body, chunked)
    if body and not streamed:
        data += body  # type: ignore[operator]
    retry = method in IDEMPOTENT and not streamed
    head_only = method == "HEAD"
    while True:
        proto = pool.take()
        reused = proto is not None
        if proto is None:
            proto, reused = await pool.acquire()
        upload = None
        try:
            answer = proto.request(data, head_only, streamed)
            if streamed:
                upload = asyncio.ensure_future(_upload(proto, body, chunked, pool.timeouts.idle))  # type: ignore[arg-type]
            message, payload = await answer
        except (ServerDisconnectedError, ClientOSError):
            _stop(upload)
            pool.release(proto, False)
            if not (reused and retry):
                raise
            retry = False
            continue
        except BaseException:
            _stop(upload)
            pool.release(proto, False)
            raise
        if upload is not None and not upload.done() and message.code >= 300:
            # refused before the body was read: send no more of it, so that no byte of it can be taken
            # for another request by an upstream that keeps the connection (the connection is not reused)
            upload.cancel()
        return UpstreamResponse(pool, proto, message, payload, upload)


def _stop(upload: asyncio.Task[None] | None) -> None:
    if upload is not None and not upload.done():
        upload.cancel()


async def _upload(proto: Connection, body: AsyncIterable[bytes], chunked: bool, idle: float) -> None:
    """Stream the body (chunked unless the head declared its length), minding the socket's backpressure:
    an upstream that reads nothing of it for ``idle`` fails the exchange (a timeout), and so does a
    sender that sends nothing more of it for ``idle`` (:class:`BodyStalled`).

    A failure is put on the connection (the head's wait raises it; the connection is not reused), not
    raised here: nobody awaits this task.
    """
    transport = proto.transport
    chunks = aiter(body)
    try:
        while (chunk := await next_chunk(chunks, idle)) is not None:
            if not chunk or transport is None or transport.is_closing():
                continue
            transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            if proto._drain is not None:
                async with asyncio.timeout(idle):
                    await proto.drain()
        if chunked and transport is not None and not transport.is_closing():
            transport.write(b"0\r\n\r\n")
        proto.sent()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the agent's upload broke off, passed the limit or stalled: fail the exchange
        kept = isinstance(exc, (BodyTooLarge, BodyStalled, TimeoutError))
        proto.upload_failed(exc if kept else ClientOSError(type(exc).__name__))


def serialize_head(method: str, target: str, headers: CIMultiDict[str],
                   body: bytes | AsyncIterable[bytes] | None, chunked: bool) -> bytes:
    """The request line and headers, refused if anything in them would split the message."""
    if chunked:
        headers["Transfer-Encoding"] = "chunked"
    elif body is None or isinstance(body, bytes):
        length = framed_length(method, body)
        if length is not None:
            headers["Content-Length"] = length
        else:
            headers.popall("Content-Length", None)
    lines = [f"{method} {target} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    text = "\r\n".join(lines)
    breaks = len(lines) - 1
    if text.count("\n") != breaks or text.count("\r") != breaks or "\x00" in text or " " in target \
            or not target.startswith("/"):
        raise RequestRefused("bad_request", "request: a header or the path would split the upstream request; "
                                            "expected header names and values without CR, LF or NUL and an "
                                            "origin-form path without spaces")
    try:
        return (text + "\r\n\r\n").encode("utf-8")
    except UnicodeEncodeError:  # a raw byte the listener's parser kept (surrogate-escaped): not text
        raise RequestRefused("bad_request", "request: a header or the path is not valid UTF-8 text; "
                                            "expected ASCII or UTF-8 (percent-encode other bytes)") from None
