"""The forwarding leg's HTTP/1.1 connection: an ``asyncio.Protocol`` around aiohttp's C response parser.

llhttp (aiohttp's ``HttpResponseParser``, the C one) does all the framing, one parser per connection
for answers with a body and one for HEAD answers (``response_with_body=False``), made on first use
and kept: a response head is checked here (status 100-599, no 101, header names RFC 9110 tokens and
values without control characters) and handed to ``sidecar.forward.http11.send`` from
``data_received``, with whatever of its body came in the same segment, so that a short answer is
read without a wait. The body keeps aiohttp's ``StreamReader`` and its flow control (reading pauses
while the relay is behind). One timer per connection bounds the silence of each phase.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import ClientConnectionError, ClientOSError, ClientPayloadError, ServerDisconnectedError
from aiohttp.helpers import TimerNoop
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpResponseParser
from aiohttp.streams import StreamReader

from sidecar.config_model import Timeouts
from sidecar.forward.transport import UpstreamBroke

READ_CHUNK = 64 * 1024
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
