"""HTTP/2 on the listeners: one ``h2`` state machine per connection, each stream one exchange.

:class:`H2Protocol` reads frames off one connection (h2c with prior knowledge on the outbound
listener, ``h2`` by ALPN on the inbound one) and turns every request stream into an
:class:`H2Incoming`, the same :class:`~sidecar.http.incoming.IncomingRequest` the HTTP/1.1 server
hands the pipeline: routing, identity, policy, credentials and the one trust-decision event are
those of HTTP/1.1, per stream. A stream's refusal, reset or failure touches no other stream.

Flow control is honoured both ways: a request body's window is given back only as the pipeline
reads it (a slow upstream slows the client, nothing piles up here), and a response waits for the
client's window (at most ``WINDOW_STALL`` seconds of a closed window, then the stream is reset).

Limits, with the HTTP/1.1 listener's reason codes: ``max_connections`` (and
``max_connections_per_source``) HTTP/2 connections, counted apart from the HTTP/1.1 ones (a refused
one has its first stream answered ``overloaded``, then closes); at most ``MAX_STREAMS`` streams open on one
connection (more are reset with ``REFUSED_STREAM``, RFC 9113 §5.1.2: the client may retry them), at
most ``max_in_flight`` requests served on the listener (``overloaded``), the header list bounded
in HPACK itself at twice ``max_header_bytes`` (the configured limit then decides, per stream, with
``headers_too_large``), and the body by the pipeline (``body_too_large``). A malformed request
(RFC 9113 §8.1.1) is a stream error: that stream is reset, reported as ``bad_request``; a ``host``
naming another authority than ``:authority`` is that stream's ``host_mismatch``. A frame that breaks
the protocol ends the connection with GOAWAY and is reported as ``bad_request``; what a client makes
us do per frame is bounded by :mod:`~sidecar.http2.guard` (``protocol_abuse``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, AsyncIterator, cast

import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from h2.utilities import HeaderValidationFlags, validate_headers
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config_model import Limits
from sidecar.errors import RecordedFailure, Refusal, RequestRefused
from sidecar.http.incoming import Answer, ClientGone, IncomingRequest, ResponseStream, refusal_answer
from sidecar.http2.front import WINDOW_STALL, H2Connection, H2Server
from sidecar.http2.guard import Abuse, BoundedFrames, Budget
from sidecar.http2.side import H2Endpoint, encode_headers
from sidecar.server import overloaded, source_of

__all__ = ["WINDOW_STALL", "H2Incoming", "H2Protocol", "H2Server", "refusing"]

MAX_STREAMS = 128
REFUSED_GRACE = 5.0  # seconds a refused connection has to send the request it is answered on

CONNECT_REFUSED = RequestRefused("bad_request", "http2: CONNECT over HTTP/2 is not served; expected CONNECT "
                                                 "on an HTTP/1.1 connection")

REQUEST = HeaderValidationFlags(is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False)


@dataclass(frozen=True, slots=True)
class Whole:
    """A whole response (:meth:`H2Incoming.respond`), sent once the handler returns it."""

    status: int
    headers: CIMultiDict[str] | dict[str, str]
    body: bytes | None


async def serve(server: H2Server, request: H2Incoming) -> Answer:
    """The handler, with at most ``max_in_flight`` requests served at once on the listener."""
    if request.conn.refusal is not None:  # the connection was refused (reported once, when it was)
        return refusal_answer(request, request.conn.refusal)
    if request.refusal is not None:  # refused by its header block alone, before any exchange
        server.refused(request.refusal)
        return refusal_answer(request, request.refusal)
    if request.method == "CONNECT":  # refused before any exchange: reported as a parse error is
        server.refused(CONNECT_REFUSED)
        return refusal_answer(request, CONNECT_REFUSED)
    if server.in_flight >= server.limits.max_in_flight:
        refusal = overloaded(f"{server.limits.max_in_flight} requests are in flight on this listener")
        server.refused(refusal)
        return refusal_answer(request, refusal)
    server.in_flight += 1
    try:
        return await server.handler(request)
    finally:
        server.in_flight -= 1


class H2Protocol(H2Endpoint, H2Connection):
    """One HTTP/2 connection: frames in, a task per request stream, frames out."""

    def __init__(self, server: H2Server, refusal: Refusal | None = None) -> None:
        super().__init__(client_side=False)
        self.server = server
        self.streams: dict[int, H2Incoming] = {}
        self.budget = Budget(server.bounds)
        self.h2.incoming_buffer = BoundedFrames(header_list_size(server.limits))
        self.refusal = refusal  # the answer to every stream of a refused connection, which then closes
        self.source = "unknown"
        self._active = 0.0  # the loop time of the last frame or stream end (the idle timeout's start)
        self._timer: asyncio.TimerHandle | None = None  # the idle check (or a refused connection's grace)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.source = source_of(transport)
        if self.refusal is None:
            self.refusal = self.server.admit(self.source)
        if self.refusal is None:
            self.server.connections.add(self)
        limits = self.server.limits
        settings = h2.settings.SettingCodes
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            settings.MAX_CONCURRENT_STREAMS: min(MAX_STREAMS, limits.max_in_flight),
            settings.MAX_HEADER_LIST_SIZE: header_list_size(limits)})
        self.h2.initiate_connection()
        self.flush()
        loop = asyncio.get_running_loop()
        if self.refusal is not None:  # one answer, then closed (or closed after the grace without a request)
            self._timer = loop.call_later(REFUSED_GRACE, self.close)
        elif self.server.idle is not None:
            self._active = loop.time()
            self._timer = loop.call_later(self.server.idle, self._idle_check)

    def _idle_check(self) -> None:
        """No stream open and no frame for ``idle`` seconds: GOAWAY (NO_ERROR) and closed, as HTTP/1.1's
        keep-alive ends; a connection with streams open waits for them."""
        idle = self.server.idle
        if self.transport is None or self.transport.is_closing() or idle is None:
            return
        loop = asyncio.get_running_loop()
        quiet = loop.time() - self._active
        if not self.streams and quiet >= idle:
            self.close()
            return
        self._timer = loop.call_later(idle if self.streams else idle - quiet, self._idle_check)

    def close(self) -> None:
        """GOAWAY, then closed (what is buffered is sent first)."""
        if self.transport is not None and not self.transport.is_closing():
            self.go_away()
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # ended (GOAWAY sent): what the peer still sends is not read
        self._active = asyncio.get_running_loop().time()
        try:
            events = self.h2.receive_data(data)
            for event in events:
                self._on(event)
        except h2.exceptions.ProtocolError as exc:
            self._broken(exc)
            return
        self.flush()

    def _broken(self, exc: h2.exceptions.ProtocolError) -> None:
        """A frame that breaks HTTP/2, or a bound held (:mod:`~sidecar.http2.guard`): GOAWAY, one refusal
        (``bad_request``, ``protocol_abuse`` or ``headers_too_large``), the connection closed."""
        if isinstance(exc, Abuse):
            refusal = abuse_refusal(exc.kind, exc.what)
        elif isinstance(exc, h2.exceptions.DenialOfServiceError):  # h2 stopped an HPACK block at our bound
            exc = Abuse("header_list", f"a header list of more than {header_list_size(self.server.limits)} bytes")
            refusal = abuse_refusal(exc.kind, exc.what)
        else:
            refusal = RequestRefused("bad_request", "http2: the client broke the HTTP/2 protocol "
                                                    f"({type(exc).__name__}); expected RFC 9113 frames")
        if isinstance(exc, Abuse):
            self.server.abused(exc.kind)
        if self.h2.state_machine.state != h2.connection.ConnectionState.CLOSED:  # h2 has not sent its GOAWAY
            self.h2.close_connection(exc.error_code)
        self.server.refused(refusal)
        self.flush_now()
        if self.transport is not None:
            self.transport.close()

    def _on(self, event: h2.events.Event) -> None:
        """One event; frames the client makes us work for are charged to the budget (raises Abuse)."""
        if isinstance(event, h2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, h2.events.DataReceived):
            if not event.flow_controlled_length and event.stream_ended is None:
                self.budget.spend("control")  # an empty DATA frame: a dispatch for nothing
            self._data(event)
        elif isinstance(event, h2.events.StreamEnded):
            if (stream := self.streams.get(event.stream_id)) is not None:
                stream.body.put_nowait(None)
        elif isinstance(event, h2.events.StreamReset):
            if (stream := self.streams.pop(event.stream_id, None)) is not None:
                stream.reset_by_peer()  # no longer open: its slot is free now, not when its task has ended
            if event.remote_reset:
                self.budget.spend("rapid_reset")
        elif isinstance(event, h2.events.WindowUpdated):
            self.window.set()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self.budget.spend("settings")
            self.window.set()
        elif isinstance(event, h2.events.PingReceived):
            self.budget.spend("ping")
        elif isinstance(event, h2.events.PriorityUpdated):
            self.budget.spend("control")

    def _request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        if len(self.streams) >= MAX_STREAMS:
            self._reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        block, refusal = checked_block(event.headers or [])
        if block is None:  # malformed (RFC 9113 §8.1.1): a stream error, this stream alone
            assert refusal is not None
            self.server.refused(refusal)
            self._reset(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        stream = H2Incoming(self, stream_id, block, ended=event.stream_ended is not None)
        stream.refusal = refusal
        self.streams[stream_id] = stream
        stream.task = asyncio.get_running_loop().create_task(self._serve(stream))

    def _reset(self, stream_id: int, code: ErrorCodes) -> None:
        """RST_STREAM, unless a later frame of the same read already closed the stream (the client's reset)."""
        try:
            self.h2.reset_stream(stream_id, code)
        except h2.exceptions.StreamClosedError:
            pass

    def _data(self, event: h2.events.DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.body_taken is None:  # nobody reads it: its window goes back at once
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            return
        stream.body.put_nowait((event.data or b"", event.flow_controlled_length))

    async def _serve(self, stream: H2Incoming) -> None:
        try:
            try:
                answer = await serve(self.server, stream)
            except RecordedFailure:  # recorded by its exchange: answered internal_error, or reset
                answer = None
            await stream.deliver(answer)
        except asyncio.CancelledError:  # reset by the client, the connection gone, or cut (a revocation)
            stream.abort()
            raise
        except ConnectionError:  # the client went while its answer was sent: this stream alone ends
            stream.abort()
        finally:
            self.streams.pop(stream.stream_id, None)
            stream.task = None  # a cancelled task's exception holds this frame, whose ``stream`` held the task:
            # a cycle only the (rarely run, tune_gc) collector frees, about 22 KiB per reset stream
            self._active = asyncio.get_running_loop().time()
            self.flush()
            if self.refusal is not None:
                self.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:  # it holds this protocol, its h2 state and every stream's, for up to
            self._timer.cancel()  # ``idle`` seconds (300 by default) after the connection is gone
            self._timer = None
        self.server.connections.discard(self)
        transport, self.transport = self.transport, None
        if transport is not None and self.server.on_lost is not None:
            self.server.on_lost(transport)  # a CONNECT tunnel's HTTP/2: the tunnel has ended
        self.resume_writing()
        self.window.set()
        for stream in list(self.streams.values()):
            stream.reset_by_peer()
        self.let_go()

    def go_away(self) -> None:
        self.h2.close_connection()
        self.flush_now()

    async def respond_data(self, stream_id: int, data: bytes) -> None:
        """Response bytes; ``ConnectionError`` (the relay's "client gone") also for a window closed too long."""
        try:
            await self.send_data(stream_id, data, self.server.stall)
        except TimeoutError:
            self.server.abused("window_stall")
            raise ConnectionResetError("http2: the client kept its window closed") from None

    async def drained(self, timeout: float | None) -> None:
        """Once its open streams have finished (or ``timeout``), the connection closes."""
        tasks = [s.task for s in self.streams.values() if s.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        self.flush_now()
        if self.transport is not None:
            self.transport.close()


class H2Incoming:
    """One request stream as the pipeline sees it (:class:`~sidecar.http.incoming.IncomingRequest`).

    ``:path`` is the target and ``:authority`` the Host (``h2`` refuses a request whose ``host`` names
    another, RFC 9113 §8.3.1), so that what routing and policy read is what is forwarded. Cookies
    split across fields are joined again (§8.2.3)."""

    unframed_body = False  # True when a body follows whose length was not declared (no content-length)
    refusal: Refusal | None = None  # its header block alone refuses it (host_mismatch)

    def __init__(self, connection: H2Protocol, stream_id: int, block: list[tuple[bytes, bytes]], *,
                 ended: bool) -> None:
        self.conn, self.stream_id = connection, stream_id
        self.task: asyncio.Task[None] | None = None
        self.body: asyncio.Queue[tuple[bytes, int] | None] = asyncio.Queue()
        self.body_taken: bool | None = False if not ended else None
        self.started = self.closed = False
        pseudo, fields = split_block(block)
        self.method = pseudo.get(":method", "")
        self.target = pseudo.get(":path", "")
        self.headers = CIMultiDictProxy(request_headers(pseudo, fields))
        self._raw = tuple((n, v) for n, v in block if not n.startswith(b":"))
        length = self.headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self.unframed_body = not ended and self.content_length is None

    @property
    def raw_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        return self._raw

    @property
    def remote(self) -> str | None:
        transport = self.conn.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else None

    @property
    def connection(self) -> object:
        return self.conn.transport

    async def chunks(self) -> AsyncIterator[bytes]:
        """DATA frames as they come; each one's window is given back once it has been read."""
        if self.body_taken is None:
            return
        self.body_taken = True
        while (item := await self.body.get()) is not None:
            data, counted = item
            if not self.closed:
                self.conn.h2.acknowledge_received_data(counted, self.stream_id)
                self.conn.flush()
            if data:
                yield data

    async def send_continue(self) -> None:
        """``100`` to a client that waits for it (``expect: 100-continue``) before its body."""
        if self.headers.get("Expect", "").lower() == "100-continue" and not self.closed:
            self.conn.h2.send_headers(self.stream_id, [(b":status", b"100")])
            self.conn.flush()

    def respond(self, status: int, reason: str | None, headers: CIMultiDict[str] | dict[str, str],
                body: bytes | None) -> Answer:
        return Whole(status, headers, body)

    async def start(self, status: int, reason: str | None, headers: CIMultiDict[str]) -> ResponseStream:
        """The head now; a gRPC trailers-only head (its ``grpc-status`` in it) ends the stream as it was."""
        stream = H2ResponseStream(self)
        if self.closed:
            raise ClientGone(stream)
        self.started = True
        only = "grpc-status" in headers
        self.conn.h2.send_headers(self.stream_id, encode_headers(headers, status=str(status)), end_stream=only)
        self.conn.flush()
        if only:
            self.closed = stream.ended = True
        return stream

    async def accept_websocket(self, protocol: str | None) -> Any:
        raise RequestRefused("bad_request", "http2: WebSocket over HTTP/2 is not served; expected an HTTP/1.1 "
                                            "upgrade")

    def abort(self) -> None:
        """RST_STREAM: this stream alone is broken off, never ended as if whole."""
        if not self.closed:
            self.closed = True
            self.conn.h2.reset_stream(self.stream_id, ErrorCodes.INTERNAL_ERROR)
            self.conn.flush()

    def answer_of(self, stream: ResponseStream) -> Answer:
        return stream

    async def finish(self, stream: ResponseStream, trailers: CIMultiDictProxy[str]) -> None:
        await cast(H2ResponseStream, stream).write_eof(trailers)

    def reset_by_peer(self) -> None:
        """The client reset the stream (or the connection went): its exchange is cut."""
        self.closed = True
        self.body.put_nowait(None)
        if self.task is not None:
            self.task.cancel()

    async def deliver(self, answer: Answer | None) -> None:
        """Send a whole answer; a streamed one the relay did not end is reset. None: the handler
        failed, answered ``internal_error`` if nothing was sent yet, else reset."""
        if answer is None and not self.started:
            answer = refusal_answer(self, Refusal("internal_error", "sidecar: internal error"))
        if isinstance(answer, Whole):
            await self._send_whole(answer)
        elif not (isinstance(answer, H2ResponseStream) and answer.ended):
            self.abort()

    async def _send_whole(self, answer: Whole) -> None:
        """Head and body; an empty body is the head's END_STREAM (gRPC reads that as trailers-only)."""
        if self.closed:
            return
        body = answer.body or b""
        headers = CIMultiDict(answer.headers)
        if body:
            headers["content-length"] = str(len(body))
        self.conn.h2.send_headers(self.stream_id, encode_headers(headers, status=str(answer.status)),
                                end_stream=not body)
        self.started = True
        self.closed = not body
        if body:
            await self.conn.respond_data(self.stream_id, body)
            self.end()
        self.conn.flush()

    def end(self, trailers: CIMultiDictProxy[str] | None = None) -> None:
        if self.closed:
            raise ConnectionError("http2: the stream is gone")
        self.closed = True
        if trailers:
            self.conn.h2.send_headers(self.stream_id, encode_headers(trailers), end_stream=True)
        else:
            self.conn.h2.end_stream(self.stream_id)
        self.conn.flush()


class H2ResponseStream:
    """A streamed response's body (:class:`~sidecar.http.incoming.ResponseStream`), then trailers."""

    def __init__(self, request: H2Incoming) -> None:
        self.request = request
        self.ended = False

    async def write(self, data: bytes) -> None:
        if self.request.closed:
            raise ConnectionError("http2: the stream is gone")
        await self.request.conn.respond_data(self.request.stream_id, data)

    async def write_eof(self, trailers: CIMultiDictProxy[str] | None = None) -> None:
        if not self.ended:  # a trailers-only head ended it already
            self.request.end(trailers)
            self.ended = True


HOST_MISMATCH = RequestRefused("host_mismatch", "http2: the host field names another authority than :authority; "
                                                "expected one authority (RFC 9113 section 8.3.1)")


def checked_block(block: list[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]] | None, Refusal | None]:
    """A request's header block validated as ``h2`` validates it (RFC 9113 §8.2, §8.3), stream by stream:
    (the block, None); (None, bad_request) if malformed; a ``host`` naming another authority than
    ``:authority`` is (the block without it, host_mismatch), answered on its stream."""
    authority = [v for n, v in block if n == b":authority"]
    hosts = [v for n, v in block if n == b"host"]
    refusal = None
    if authority and len(hosts) == 1 and hosts != authority[:1]:
        block, refusal = [(n, v) for n, v in block if n != b"host"], HOST_MISMATCH
    try:
        return list(validate_headers(block, REQUEST)), refusal
    except h2.exceptions.ProtocolError as exc:
        return None, RequestRefused("bad_request", f"http2: a malformed request ({exc}); expected an RFC 9113 "
                                                   "header block")


def header_list_size(limits: Limits) -> int:
    """The header list we advertise (``SETTINGS_MAX_HEADER_LIST_SIZE``) and decode at most: twice the
    configured limit, so that the limit itself decides per stream, with ``headers_too_large``."""
    return limits.max_header_bytes * 2 + 1024


def abuse_refusal(kind: str, what: str) -> Refusal:
    return RequestRefused("protocol_abuse", f"http2: {what}; the connection is closed (ENHANCE_YOUR_CALM)",
                          detail=kind)


def split_block(block: list[tuple[bytes, bytes]]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Pseudo-headers and fields, decoded as aiohttp decodes HTTP/1.1 (UTF-8, raw bytes kept)."""
    pseudo: dict[str, str] = {}
    fields: list[tuple[str, str]] = []
    for name, value in block:
        text = value.decode("utf-8", "surrogateescape")
        if name.startswith(b":"):
            pseudo[name.decode("ascii")] = text
        else:
            fields.append((name.decode("latin-1"), text))
    return pseudo, fields


def request_headers(pseudo: dict[str, str], fields: list[tuple[str, str]]) -> CIMultiDict[str]:
    """The fields as HTTP/1.1 would carry them: ``Host`` from ``:authority``, one ``Cookie``."""
    headers: CIMultiDict[str] = CIMultiDict()
    cookies = [value for name, value in fields if name == "cookie"]
    authority = pseudo.get(":authority")
    for name, value in fields:
        if name not in ("cookie", "host"):
            headers.add(name, value)
    host = authority if authority is not None else next((v for n, v in fields if n == "host"), None)
    if host is not None:
        headers["Host"] = host
    if cookies:
        headers["Cookie"] = "; ".join(cookies)
    return headers


def refusing(refusal: Refusal) -> H2Protocol:
    """An HTTP/2 connection whose first stream is answered with ``refusal``, which then closes: a caller
    refused at the TLS handshake that chose ``h2`` reads the same JSON refusal as on HTTP/1.1."""
    async def never(request: IncomingRequest) -> Answer:
        raise AssertionError("a refused connection serves nothing")

    return H2Protocol(H2Server(never, protocol=H2Protocol, limits=Limits()), refusal)
