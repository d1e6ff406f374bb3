"""The upstream's response to the client: short ones in one write, the rest streamed as they arrive
(server-sent events reach the client as the upstream sends them), through a chunk filter where
one applies (an MCP SSE answer), or read whole and bounded before the head is sent where the filter must see
it all (an MCP JSON answer, :class:`WholeAnswer`: over its bound, refused with nothing relayed), and an echo scrub (credentials an upstream echoes back in the headers, or in a
short body sent whole).

:func:`relay_exchange` is the forward stage's last step: it relays, records on the exchange how the
response ended (completed, upstream reset, client gone, cut) and always releases the upstream's
connection. A response cut short is broken off (a reset), never ended as if it were whole.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Awaitable, Callable, NamedTuple, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.errors import Refusal, UpstreamFailed
from sidecar.exchange import Exchange
from sidecar.forward.transport import UpstreamBroke, UpstreamResponse, failure
from sidecar.http.headers import VIA, clean_response_headers
from sidecar.http.incoming import Answer, ClientGone, IncomingRequest
from sidecar.observe.metrics import Metrics

SMALL_BODY = 64 * 1024
DECODED_LIMIT = 1024 * 1024  # a short gzip/deflate body is decoded this far to look for an echo
NO_BODY_STATUS = frozenset({204, 304})
DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}

ChunkFilter = Callable[[bytes, bool], bytes]  # (chunk, final) -> bytes to send
NO_TRAILERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


class WholeAnswer(NamedTuple):
    """A filter that reads the answer whole before anything of it is sent (an MCP JSON answer): at most
    ``limit`` bytes are read, else the exchange is refused ``upstream_answer_too_large`` and the upstream's
    connection closed, nothing relayed; ``read`` gives what the client gets, or raises a :class:`Refusal`
    (an answer it cannot read: refused ``upstream_answer_invalid``, nothing relayed)."""

    limit: int
    read: Callable[[bytes], bytes]


class EchoGuard(Protocol):
    """One attached secret's guard (``sidecar.credentials.echo.EchoGuard``)."""

    def scrub(self, headers: CIMultiDict[str]) -> tuple[CIMultiDict[str], tuple[str, ...]]: ...

    def scrub_body(self, body: bytes) -> bytes | None: ...


class AnswerEnds(Exception):
    """Raised by a chunk filter that cannot pass the rest of a streamed answer on but can end it in the client's
    protocol (an MCP SSE answer to a request: that request's JSON-RPC error as the last event): ``tail`` is
    written and the stream ended, the upstream's connection closed with the rest unread; ``why`` is recorded."""

    def __init__(self, tail: bytes, why: str) -> None:
        super().__init__(why)
        self.tail, self.why = tail, why


class UpstreamReset(Exception):
    """The upstream broke off while its response was being relayed (or went quiet past ``idle``)."""

    def __init__(self, started: Answer | None, *, timed_out: bool = False, unreadable: str | None = None,
                 ended: bool = False) -> None:
        self.started, self.timed_out = started, timed_out  # started: the answer whose head was sent
        self.unreadable = unreadable  # why the chunk filter could not pass the answer on (it broke it off)
        self.ended = ended  # the filter ended the client's stream in its protocol: no reset


async def relay_exchange(request: IncomingRequest, ex: Exchange, upstream: UpstreamResponse, metrics: Metrics,
                         transform: ChunkFilter | WholeAnswer | None) -> Answer:
    """Relay the response and say on the exchange how it ended; the connection is released either way."""
    ex.upstream_status = upstream.status
    try:
        answer = await relay(request, upstream, transform, on_prepared=lambda s: _set_status(ex, s),
                             scrub=echo_scrub(ex))
        ex.outcome = "completed"
        return answer
    except UpstreamReset as exc:
        ex.outcome = "upstream_reset"
        if exc.unreadable is not None:
            ended = "; ended with the request's JSON-RPC error" if exc.ended else ""
            ex.reason_detail = f"answer broken off, it could not be passed on: {exc.unreadable}{ended}"
            kind = "unreadable"
        elif exc.timed_out:
            ex.reason_detail, kind = "upstream sent nothing for the idle timeout mid-response", "idle_timeout"
        else:
            ex.reason_detail, kind = "upstream reset the connection mid-response", "reset"
        metrics.upstream_errors.labels(metrics.upstream_label(ex.upstream), kind).inc()
        if exc.started is None:
            raise UpstreamFailed("upstream_unreachable", "upstream: connection reset before the response") from None
        if not exc.ended:
            request.abort()
        return exc.started
    except ClientGone as gone:  # its own name: compiled (mypyc), one name holds one type in a function
        ex.outcome, ex.reason_detail = "cut", "client gone"
        return gone.answer
    except asyncio.CancelledError:  # cut (a revocation, the end of the drain): never a short "whole" response
        request.abort()
        raise
    finally:
        upstream.release()


def echo_scrub(ex: Exchange) -> EchoScrub | None:

    """The scrub of what a response echoes of the credential attached to its request, if any."""
    guard = ex.credential.echo if ex.credential is not None else None
    return EchoScrub(guard, ex) if guard is not None else None


class EchoScrub:
    """The agent never gets back the credential attached to its request; the event says what went."""

    __slots__ = ("_guard", "_ex")

    def __init__(self, guard: EchoGuard, ex: Exchange) -> None:
        self._guard, self._ex = guard, ex

    def headers(self, headers: CIMultiDict[str]) -> CIMultiDict[str]:
        """The headers without it: the same object when they did not carry it."""
        kept, done = self._guard.scrub(headers)
        if done:
            self._note("response headers echoed the attached credential: " + "; ".join(done))
        return kept

    def body(self, body: bytes, headers: CIMultiDict[str]) -> bytes:
        """A whole body without it (decoded, and sent so, when gzip or deflate held it)."""
        scrubbed = self._guard.scrub_body(body)
        coding = headers.get("Content-Encoding", "").strip().lower()
        if scrubbed is None and coding in DECODERS:
            decoded = _decoded(body, DECODERS[coding])
            scrubbed = self._guard.scrub_body(decoded) if decoded is not None else None
            if scrubbed is not None:
                headers.popall("Content-Encoding")
        if scrubbed is None:
            return body
        self._note("response body echoed the attached credential: replaced")
        return scrubbed

    def _note(self, note: str) -> None:
        ex = self._ex
        ex.reason_detail = f"{ex.reason_detail}; {note}" if ex.reason_detail else note


def _decoded(body: bytes, wbits: int) -> bytes | None:
    """A compressed body decoded up to ``DECODED_LIMIT``; None when it is not what it claims or longer."""
    decoder = zlib.decompressobj(wbits)
    try:
        decoded = decoder.decompress(body, DECODED_LIMIT)
    except zlib.error:
        return None
    return decoded if decoder.eof and not decoder.unconsumed_tail else None


def _scrubbed(trailers: CIMultiDictProxy[str], scrub: EchoScrub | None) -> CIMultiDictProxy[str]:
    if scrub is None or not trailers:
        return trailers
    fields = CIMultiDict(trailers)
    kept = scrub.headers(fields)
    return trailers if kept is fields else CIMultiDictProxy(kept)


def _set_status(ex: Exchange, status: int) -> None:
    ex.status = status


def relay(request: IncomingRequest, upstream: UpstreamResponse, transform: ChunkFilter | WholeAnswer | None,
          on_prepared: Callable[[int], None], scrub: EchoScrub | None = None) -> Awaitable[Answer]:
    """The upstream's response to the client: short ones in one write, the rest streamed as they arrive.

    ``scrub`` removes what the headers, or a short body, echo of the attached credential; a redirect
    whose headers it changed goes without its body (which repeats the URL it had)."""
    headers = clean_response_headers(upstream.headers)
    if scrub is not None and (scrubbed := scrub.headers(headers)) is not headers:
        headers = scrubbed
        if 300 <= upstream.status < 400:
            return _relay_bodiless(request, upstream, scrubbed, on_prepared)
    headers.add("Via", VIA)
    if isinstance(transform, WholeAnswer):
        return _relay_read(request, upstream, headers, transform, on_prepared, scrub)
    if transform is None and _small(request, upstream):
        return _relay_whole(request, upstream, headers, on_prepared, scrub)
    if transform is None and scrub is not None and _unframed_error(request, upstream):
        return _relay_held(request, upstream, headers, on_prepared, scrub)
    return _relay_stream(request, upstream, headers, transform, on_prepared, scrub=scrub)


def _small(request: IncomingRequest, upstream: UpstreamResponse) -> bool:
    """A short, length-delimited response: sent in one write (headers and body together)."""
    length = upstream.content_length
    return (length is not None and length <= SMALL_BODY and request.method != "HEAD"
            and upstream.status not in NO_BODY_STATUS and upstream.status >= 200
            and "Transfer-Encoding" not in upstream.headers)


def _unframed_error(request: IncomingRequest, upstream: UpstreamResponse) -> bool:
    """An error answer whose length is not declared (chunked): an error page, not a stream."""
    return (upstream.status >= 400 and upstream.content_length is None and request.method != "HEAD")


async def _relay_held(request: IncomingRequest, upstream: UpstreamResponse, headers: CIMultiDict[str],
                      on_prepared: Callable[[int], None], scrub: EchoScrub) -> Answer:
    """An unframed error answer held up to ``SMALL_BODY`` so that its echo can be searched: sent whole
    when it ends within that, else streamed on from what was held (unsearched: long, the upstream's data)."""
    held, ended = await _read_up_to(upstream, SMALL_BODY)
    if ended:
        return _respond_whole(request, upstream, headers, scrub.body(held, headers), on_prepared)
    return await _relay_stream(request, upstream, headers, None, on_prepared, held, scrub)


async def _relay_whole(request: IncomingRequest, upstream: UpstreamResponse, headers: CIMultiDict[str],
                       on_prepared: Callable[[int], None], scrub: EchoScrub | None) -> Answer:
    try:
        body = await upstream.read()
    except asyncio.TimeoutError as exc:  # the body stalled past the idle timeout: not a reset
        raise failure(exc) from None
    except UpstreamBroke:
        raise UpstreamReset(None) from None
    if scrub is not None:
        body = scrub.body(body, headers)
    return _respond_whole(request, upstream, headers, body, on_prepared)


async def _relay_read(request: IncomingRequest, upstream: UpstreamResponse, headers: CIMultiDict[str],
                      whole: WholeAnswer, on_prepared: Callable[[int], None], scrub: EchoScrub | None) -> Answer:
    """An answer read whole (bounded) and filtered before its head is sent: a refusal the client can read in
    its protocol's shape instead of a reset, and one write."""
    if (upstream.content_length or 0) > whole.limit:  # declared so: not a byte of it read
        raise _too_large(whole.limit)
    read, ended = await _read_up_to(upstream, whole.limit)
    if not ended:  # stop reading: the connection is closed on release (its body unread)
        raise _too_large(whole.limit)
    try:
        body = whole.read(read)
    except Refusal as exc:
        raise UpstreamFailed("upstream_answer_invalid", f"upstream: {exc.message}; nothing was relayed") from None
    if scrub is not None:
        body = scrub.body(body, headers)
    return _respond_whole(request, upstream, headers, body, on_prepared)


async def _read_up_to(upstream: UpstreamResponse, limit: int) -> tuple[bytes, bool]:
    """A body whose head was not sent yet, read until it ends or passes ``limit`` bytes: what was read, and
    whether that is all of it."""
    parts: list[bytes] = []
    size = 0
    while chunk := await _next(upstream):
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(parts), False
    return b"".join(parts), True


def _respond_whole(request: IncomingRequest, upstream: UpstreamResponse, headers: CIMultiDict[str], body: bytes,
                   on_prepared: Callable[[int], None]) -> Answer:
    """A body read whole goes in one write, framed by its (new) length."""
    for name in ("Content-Length", "Transfer-Encoding"):
        headers.popall(name, None)
    answer = request.respond(upstream.status, upstream.reason, headers, body)
    on_prepared(upstream.status)
    return answer


def _too_large(limit: int) -> UpstreamFailed:
    return UpstreamFailed("upstream_answer_too_large", f"upstream: the answer is larger than {limit} bytes, the "
                                                       "most the sidecar reads; nothing was relayed")


async def _next(upstream: UpstreamResponse) -> bytes:
    """The next piece of a body whose head was not sent yet (a stall or a reset fails the exchange)."""
    try:
        return await upstream.read_chunk()
    except asyncio.TimeoutError as exc:
        raise failure(exc) from None
    except UpstreamBroke:
        raise UpstreamReset(None) from None


async def _relay_bodiless(request: IncomingRequest, upstream: UpstreamResponse, headers: CIMultiDict[str],
                          on_prepared: Callable[[int], None]) -> Answer:
    for name in ("Content-Length", "Content-Type", "Content-Encoding"):
        headers.popall(name, None)
    headers.add("Via", VIA)
    answer = request.respond(upstream.status, upstream.reason, headers, None)
    on_prepared(upstream.status)
    return answer


async def _relay_stream(request: IncomingRequest, upstream: UpstreamResponse, headers: CIMultiDict[str],
                        transform: ChunkFilter | None, on_prepared: Callable[[int], None], held: bytes = b"",
                        scrub: EchoScrub | None = None) -> Answer:
    """Stream as the upstream sends (SSE-safe), through the transform when there is one; ``held``: what was
    read of the body before the head was sent; the trailers (HTTP/2: ``grpc-status``, ``grpc-message``)
    through the same scrub as the headers."""
    if transform is not None:
        headers.popall("Content-Length", None)
    stream = await request.start(upstream.status, upstream.reason, headers)
    answer = request.answer_of(stream)
    on_prepared(upstream.status)
    if held:
        try:
            await stream.write(held)
        except ConnectionError:
            raise ClientGone(answer) from None
    while True:
        try:
            chunk = await upstream.read_chunk()
        except asyncio.TimeoutError:
            raise UpstreamReset(answer, timed_out=True) from None
        except UpstreamBroke:
            raise UpstreamReset(answer) from None
        final = not chunk
        try:
            data = transform(chunk, final) if transform is not None else chunk
        except AnswerEnds as end:
            try:
                await stream.write(end.tail)
                await request.finish(stream, NO_TRAILERS)
            except ConnectionError:
                raise ClientGone(answer) from None
            raise UpstreamReset(answer, unreadable=end.why, ended=True) from None
        except Exception as exc:  # a response the filter cannot read is not passed on (fail closed)
            why = exc.message if isinstance(exc, Refusal) else type(exc).__name__
            raise UpstreamReset(answer, unreadable=why) from None
        try:
            if data:
                await stream.write(data)
            if final:
                await request.finish(stream, _scrubbed(upstream.trailers, scrub))
                return answer
        except ConnectionError:
            raise ClientGone(answer) from None
