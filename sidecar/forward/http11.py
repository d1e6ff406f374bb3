"""The forwarding leg's HTTP/1.1 client: kept-alive connections per upstream, requests written as built.

Why not ``aiohttp.ClientSession`` on this leg: a proxy uses none of its cookie jar, redirect
loop, automatic headers, URL re-quoting, auth, traces or middlewares, yet pays for them on
every request (about half the CPU of a bare aiohttp pass-through proxy, measured in
``tests/bench``). Here the request head is serialized from the headers the pipeline built
(so the path policy matched is byte for byte the path sent, and no redirect can ever be
followed: there is no code that would), and the response is read by a
:class:`~sidecar.forward.connection.Connection`, an ``asyncio.Protocol`` of our own around
aiohttp's C response parser (llhttp does all the framing; one parser per connection, a second for
HEAD answers), with the body's flow control and one timer per connection. A response whose body came with its head is handed over whole, without a wait.
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

from aiohttp import ClientOSError, ServerDisconnectedError
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config_model import Timeouts
from sidecar.errors import RequestRefused
from sidecar.forward.body import BodyStalled, BodyTooLarge, next_chunk
from sidecar.forward.connection import Connection
from sidecar.forward.transport import Body
from sidecar.http.headers import framed_length
from sidecar.http.target import format_authority

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


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
