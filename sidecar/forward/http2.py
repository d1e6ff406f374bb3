"""The forwarding leg's HTTP/2 client: one connection per upstream, its streams multiplexed.

An upstream with ``http2: true`` (every ``protocol: grpc`` one) is reached over HTTP/2: ``h2`` by
ALPN over TLS (an upstream that does not select ``h2`` fails the exchange,
``upstream_protocol_error``), h2c with prior knowledge on ``http://``; with ``http2: auto``
(:class:`AlpnPool`) the upstream's TLS handshake chooses between HTTP/2 and HTTP/1.1. :class:`H2Pool` is a
:class:`~sidecar.forward.transport.Transport` beside HTTP/1.1's ``ConnectionPool``: the request is
sent as the pipeline built it (``:path`` is the path policy matched, ``:authority`` the request's
``Host``, the name it was routed and matched by), the response comes back as an :class:`H2Response` whose trailers are relayed.

At most ``limit`` streams (and never more than the upstream's ``MAX_CONCURRENT_STREAMS``) are open
at once; a request finding them all busy waits at most ``first_byte`` (then ``upstream_timeout``).
Flow control both ways: a response's window is given back only as the relay reads it, and an upload
waits for the upstream's window (``idle`` at most). After an SVID rotation (:meth:`H2Pool.renew`) new
streams go on a new connection; the old one finishes its streams and then closes.
"""

from __future__ import annotations

import asyncio
import ssl
from ssl import SSLContext

import h2.events
import h2.exceptions
from aiohttp.http_exceptions import HttpProcessingError
from h2.errors import ErrorCodes
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config_model import Timeouts
from sidecar.errors import RequestRefused
from sidecar.forward.body import next_chunk
from sidecar.forward.http11 import ConnectionPool
from sidecar.forward.transport import Body, UpstreamBroke, UpstreamResponse
from sidecar.http.target import format_authority
from sidecar.http2.side import H2Endpoint, encode_headers

Item = tuple[bytes, int] | BaseException | None  # a DATA frame (data, flow-controlled length), a failure, the end


class NotHttp2(HttpProcessingError):
    """The upstream did not agree to HTTP/2 (ALPN), or broke the protocol."""

    says_why = True


class ChoseHttp11(NotHttp2):
    """The upstream's TLS handshake selected ``http/1.1`` where both were offered (``http2: auto``)."""


class H2Client(H2Endpoint):
    """One HTTP/2 connection to an upstream: the ``h2`` state machine and its open streams."""

    def __init__(self) -> None:
        super().__init__(client_side=True)
        self.streams: dict[int, H2Response] = {}
        self.gone = False  # closed, or told us (GOAWAY) to open no new stream
        self.generation = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.h2.initiate_connection()
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.fail(NotHttp2(message=f"upstream: broke the HTTP/2 protocol ({type(exc).__name__})"))
            self.flush_now()
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            self._on(event)
        self.flush()

    def _on(self, event: h2.events.Event) -> None:
        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.ResponseReceived) and stream is not None:
            stream.got_head(event.headers or [])
        elif isinstance(event, h2.events.DataReceived):
            if stream is None:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:
                stream.body.put_nowait((event.data or b"", event.flow_controlled_length))
        elif isinstance(event, h2.events.TrailersReceived) and stream is not None:
            stream.trailers = CIMultiDictProxy(fields_of(event.headers or []))
        elif isinstance(event, h2.events.StreamEnded) and stream is not None:
            stream.ended()
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            stream.broken(UpstreamBroke())
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self.window.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.gone = True

    def fail(self, exc: BaseException) -> None:
        self.gone = True
        self.window.set()
        for stream in list(self.streams.values()):
            stream.broken(exc)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self.fail(ConnectionResetError("upstream: connection closed"))
        self.let_go()

    def retire(self) -> None:
        """No new streams here; closed once the open ones are done."""
        self.gone = True
        if not self.streams and self.transport is not None:
            self.h2.close_connection()
            self.flush_now()
            self.transport.close()


class H2Response:
    """One stream's response (:class:`~sidecar.forward.transport.UpstreamResponse`), its trailers at its end."""

    reason = ""

    def __init__(self, pool: H2Pool, client: H2Client, stream_id: int) -> None:
        self.pool, self.client, self.stream_id = pool, client, stream_id
        self.head: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.body: asyncio.Queue[Item] = asyncio.Queue()
        self.status = 0
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
        self.trailers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
        self.done = False  # the upstream ended the stream
        self.upload: asyncio.Future[None] | None = None
        self.opened = False  # its HEADERS went out (a stream never opened is not reset: h2 would close the connection)

    def got_head(self, block: list[tuple[bytes, bytes]]) -> None:
        status = next((v for n, v in block if n == b":status"), b"")
        self.status = int(status) if status.isdigit() else 0
        self.headers = CIMultiDictProxy(fields_of(block))
        if not self.head.done():
            self.head.set_result(None)

    def ended(self) -> None:
        self.done = True
        self.body.put_nowait(None)
        if not self.head.done():
            self.head.set_exception(NotHttp2(message="upstream: ended the stream without a response"))

    def broken(self, exc: BaseException) -> None:
        self.body.put_nowait(exc)
        if not self.head.done():
            self.head.set_exception(exc if not isinstance(exc, UpstreamBroke)
                                    else ConnectionResetError("upstream: reset the stream"))

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.read_chunk():
            parts.append(chunk)
        return b"".join(parts)

    async def read_chunk(self) -> bytes:
        """The next DATA frame's bytes (its window given back now), ``b""`` at the end."""
        while True:
            if self.body.empty():  # a timer only when there is something to wait for
                async with asyncio.timeout(self.pool.timeouts.idle):
                    item = await self.body.get()
            else:
                item = self.body.get_nowait()
            if item is None:
                self.body.put_nowait(None)  # read again: still the end
                return b""
            if isinstance(item, BaseException):
                raise UpstreamBroke() from item
            data, counted = item
            self._give_back(counted)
            if data:
                return data

    def _give_back(self, counted: int) -> None:
        if counted and self.stream_id in self.client.streams:
            self.client.h2.acknowledge_received_data(counted, self.stream_id)
            self.client.flush()

    def release(self) -> None:
        """The stream is done with: reset if the upstream had not ended it, its slot freed."""
        client = self.client
        if self.upload is not None and not self.upload.done():
            self.upload.cancel()
        if client.streams.pop(self.stream_id, None) is None:
            return
        if self.opened and not self.done and client.transport is not None:
            try:
                client.h2.reset_stream(self.stream_id, ErrorCodes.CANCEL)
            except h2.exceptions.ProtocolError:  # already closed on the upstream's side
                pass
            client.flush()
        self.pool.freed(client)


class H2Pool:
    """HTTP/2 to one upstream: one connection, at most ``limit`` streams at once on it."""

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None, timeouts: Timeouts, *,
                 limit: int = 100, alpn: tuple[str, ...] = ("h2",)) -> None:
        self.host, self.port, self.timeouts, self.limit, self.alpn = host, port, timeouts, limit, alpn
        self.scheme = "https" if ssl_context is not None else "http"
        self.host_header = format_authority(host, port, self.scheme)
        self.ssl = offer(ssl_context, alpn)
        self._client: H2Client | None = None
        self._connecting: asyncio.Future[H2Client] | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self.closed = False

    async def send(self, method: str, target: str, headers: CIMultiDict[str], body: Body) -> H2Response:
        """Open a stream, send the request, wait for the response head (``first_byte``)."""
        if (client := self._free_slot()) is None:  # no room now: wait in line (a timer only then)
            async with asyncio.timeout(self.timeouts.first_byte):
                client = await self._stream_slot()
        stream_id = client.h2.get_next_available_stream_id()
        response = client.streams[stream_id] = H2Response(self, client, stream_id)
        try:
            self._send_head(client, stream_id, method, target, headers, body)
            response.opened = True
            if body:
                response.upload = asyncio.ensure_future(self._upload(response, body))
            client.flush()  # after the upload's first step: a body already here leaves in the head's write
            async with asyncio.timeout(self.timeouts.first_byte):
                await response.head
        except BaseException:
            response.release()
            raise
        return response

    def _send_head(self, client: H2Client, stream_id: int, method: str, target: str, headers: CIMultiDict[str],
                   body: Body) -> None:
        try:
            authority = headers.get("Host", self.host_header)  # what was routed and matched, not the pool's
            block = encode_headers(headers, method=method, scheme=self.scheme, authority=authority, path=target)
            if headers.get("Content-Type", "").startswith("application/grpc"):
                block.append((b"te", b"trailers"))  # gRPC servers insist (TE's only HTTP/2 form, RFC 9113 §8.2.2)
            client.h2.send_headers(stream_id, block, end_stream=not body)
        except (h2.exceptions.ProtocolError, ValueError):
            raise RequestRefused("bad_request", "request: a header or the path is not valid in an HTTP/2 "
                                                "header block; expected lowercase-able names and values "
                                                "without CR, LF or NUL") from None

    async def _upload(self, response: H2Response, body: Body) -> None:
        """The body as the upstream's window allows; a failure (limit, stall) breaks the exchange."""
        client, stream_id, idle = response.client, response.stream_id, self.timeouts.idle
        try:
            if isinstance(body, bytes):
                await client.send_data(stream_id, body, idle)
            else:
                chunks = aiter(body)  # type: ignore[arg-type]
                while (chunk := await next_chunk(chunks, idle)) is not None:
                    await client.send_data(stream_id, chunk, idle)
            if stream_id in client.streams:
                client.h2.end_stream(stream_id)
                client.flush()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the agent's upload broke off, passed the limit or stalled: fail the exchange
            response.broken(exc)

    def _free_slot(self) -> H2Client | None:
        """The open connection, if it has room for one more stream now and nobody waits for one before us."""
        client = self._client
        if client is None or client.gone or self._waiters or not self._has_room(client):
            return None
        return client

    def _has_room(self, client: H2Client) -> bool:
        return min(self.limit, client.h2.remote_settings.max_concurrent_streams) > len(client.streams) and \
            (client.h2.highest_outbound_stream_id or 0) + 2 <= client.h2.HIGHEST_ALLOWED_STREAM_ID

    async def _stream_slot(self) -> H2Client:
        """A connection with room for one more stream, waiting in line while every slot is taken. A
        connection whose stream ids are spent (2^30 streams) is retired and the next one dialled."""
        while True:
            client = await self._connection()
            if (client.h2.highest_outbound_stream_id or 0) + 2 > client.h2.HIGHEST_ALLOWED_STREAM_ID:
                client.retire()
                continue
            if min(self.limit, client.h2.remote_settings.max_concurrent_streams) > len(client.streams):
                return client
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    async def _connection(self) -> H2Client:
        client = self._client
        if client is not None and not client.gone:
            return client
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done():
                self._connecting = None

    async def _connect(self) -> H2Client:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.timeouts.connect):
            transport, client = await loop.create_connection(
                H2Client, self.host, self.port, ssl=self.ssl, server_hostname=self.host if self.ssl else None)
        tls = transport.get_extra_info("ssl_object")
        selected = tls.selected_alpn_protocol() if tls is not None else "h2"
        if selected != "h2":
            transport.close()
            if selected == "http/1.1" and "http/1.1" in self.alpn:
                raise ChoseHttp11(message="upstream: selected http/1.1 by ALPN")
            raise NotHttp2(message="upstream: did not select h2 by ALPN; expected an HTTP/2 server (http2: true)")
        self._client = client
        return client

    def freed(self, client: H2Client) -> None:
        """A stream slot is free: the next waiter may open one; a retired connection closes once empty."""
        if client.gone and client is not self._client or self.closed:
            client.retire()
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return

    def renew(self, ssl_context: ssl.SSLContext | None) -> None:
        """A new TLS context (our rotated SVID): new streams go on a new connection; the old one finishes."""
        self.ssl = offer(ssl_context, self.alpn)
        old, self._client = self._client, None
        if old is not None:
            old.retire()

    def close(self) -> None:
        """Closed now if idle, else once its streams are done."""
        self.closed = True
        if self._client is not None:
            self._client.retire()


def offer(context: ssl.SSLContext | None, alpn: tuple[str, ...]) -> ssl.SSLContext | None:
    """The upstream's TLS context, offering these protocols by ALPN."""
    if context is not None:
        context.set_alpn_protocols(list(alpn))
    return context


class AlpnPool:
    """``http2: auto``: HTTP/2 when the upstream's TLS handshake selects ``h2``, else HTTP/1.1.

    The first connection offers both; an upstream that selects ``http/1.1`` is sent every request
    over the HTTP/1.1 pool from then on (the choice is made before any of the request is sent, so
    the request goes there as it is), until a renewal asks again. Both pools share one context."""

    def __init__(self, host: str, port: int, ssl_context: SSLContext | None, timeouts: Timeouts) -> None:
        self.http2 = H2Pool(host, port, ssl_context, timeouts, alpn=("h2", "http/1.1"))
        self.http11 = ConnectionPool(host, port, ssl_context, timeouts)
        self.host_header = self.http11.host_header
        self.speaks_http11 = False

    @property
    def ssl(self) -> SSLContext | None:
        return self.http11.ssl

    @property
    def closed(self) -> bool:
        return self.http11.closed

    async def send(self, method: str, target: str, headers: CIMultiDict[str], body: Body) -> UpstreamResponse:
        if not self.speaks_http11:
            try:
                return await self.http2.send(method, target, headers, body)
            except ChoseHttp11:
                self.speaks_http11 = True
        return await self.http11.send(method, target, headers, body)

    def renew(self, ssl_context: SSLContext | None) -> None:
        self.http2.renew(ssl_context)
        self.http11.renew(ssl_context)
        self.speaks_http11 = False

    def close(self) -> None:
        self.http2.close()
        self.http11.close()


def fields_of(block: list[tuple[bytes, bytes]]) -> CIMultiDict[str]:
    """A header block's fields (pseudo-headers left out), decoded as the HTTP/1.1 reader decodes them."""
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in block:
        if not name.startswith(b":"):
            headers.add(name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
    return headers
