"""The upstream's response to the client: short ones in one write, the rest streamed as they arrive
(server-sent events reach the client as the upstream sends them), through a chunk filter where
one applies (``tools/list``) and a header scrub (credentials an upstream echoes back).

:func:`relay_exchange` is the forward stage's last step: it relays, records on the exchange how the
response ended (completed, upstream reset, client gone, cut) and always releases the upstream's
connection. A response cut short is broken off (a reset), never ended as if it were whole.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.errors import UpstreamFailed
from sidecar.exchange import Exchange
from sidecar.forward.transport import UpstreamBroke, UpstreamResponse, failure
from sidecar.http.headers import VIA, clean_response_headers
from sidecar.http.incoming import Answer, ClientGone, IncomingRequest
from sidecar.observe.metrics import Metrics

SMALL_BODY = 64 * 1024
NO_BODY_STATUS = frozenset({204, 304})

ChunkFilter = Callable[[bytes, bool], bytes]  # (chunk, final) -> bytes to send
HeaderFilter = Callable[[CIMultiDict[str]], CIMultiDict[str]]  # the same object back when it changed nothing


class UpstreamReset(Exception):
    """The upstream broke off while its response was being relayed (or went quiet past ``idle``)."""

    def __init__(self, started: Answer | None, *, timed_out: bool = False) -> None:
        self.started, self.timed_out = started, timed_out  # started: the answer whose head was sent


async def relay_exchange(request: IncomingRequest, ex: Exchange, upstream: UpstreamResponse, metrics: Metrics,
                         transform: ChunkFilter | None) -> Answer:
    """Relay the response and say on the exchange how it ended; the connection is released either way."""
    ex.upstream_status = upstream.status
    try:
        answer = await relay(request, upstream, transform, on_prepared=lambda s: _set_status(ex, s),
                             scrub=echo_scrub(ex))
        ex.outcome = "completed"
        return answer
    except UpstreamReset as exc:
        ex.outcome = "upstream_reset"
        ex.reason_detail = ("upstream sent nothing for the idle timeout mid-response" if exc.timed_out
                            else "upstream reset the connection mid-response")
        metrics.upstream_errors.labels(metrics.upstream_label(ex.upstream),
                                       "idle_timeout" if exc.timed_out else "reset").inc()
        if exc.started is None:
            raise UpstreamFailed("upstream_unreachable", "upstream: connection reset before the response") from None
        request.abort()
        return exc.started
    except ClientGone as exc:
        ex.outcome, ex.reason_detail = "cut", "client gone"
        return exc.answer
    except asyncio.CancelledError:  # cut (a revocation, the end of the drain): never a short "whole" response
        request.abort()
        raise
    finally:
        upstream.release()


def echo_scrub(ex: Exchange) -> HeaderFilter | None:
    """Response headers never hand the agent the credential attached to its request; the event says what went."""
    guard = ex.credential.echo if ex.credential is not None else None
    if guard is None:
        return None

    def scrub(headers: CIMultiDict[str]) -> CIMultiDict[str]:
        kept, done = guard.scrub(headers)
        if done:
            note = "response headers echoed the attached credential: " + "; ".join(done)
            ex.reason_detail = f"{ex.reason_detail}; {note}" if ex.reason_detail else note
        return kept

    return scrub


def _scrubbed(trailers: CIMultiDictProxy[str], scrub: HeaderFilter | None) -> CIMultiDictProxy[str]:
    if scrub is None or not trailers:
        return trailers
    fields = CIMultiDict(trailers)
    kept = scrub(fields)
    return trailers if kept is fields else CIMultiDictProxy(kept)


def _set_status(ex: Exchange, status: int) -> None:
    ex.status = status


def relay(request: IncomingRequest, upstream: UpstreamResponse, transform: ChunkFilter | None,
          on_prepared: Callable[[int], None], scrub: HeaderFilter | None = None) -> Awaitable[Answer]:
    """The upstream's response to the client: short ones in one write, the rest streamed as they arrive.

    ``scrub`` removes what the headers echo of the attached credential; a redirect it changed goes
    without its body (which repeats the URL it had)."""
    headers = clean_response_headers(upstream.headers)
    if scrub is not None and (scrubbed := scrub(headers)) is not headers:
        headers = scrubbed
        if 300 <= upstream.status < 400:
            return _relay_bodiless(request, upstream, scrubbed, on_prepared)
    headers.add("Via", VIA)
    if transform is None and _small(request, upstream):
        return _relay_whole(request, upstream, headers, on_prepared)
    return _relay_stream(request, upstream, headers, transform, on_prepared, scrub)


def _small(request: IncomingRequest, upstream: UpstreamResponse) -> bool:
    """A short, length-delimited response: sent in one write (headers and body together)."""
    length = upstream.content_length
    return (length is not None and length <= SMALL_BODY and request.method != "HEAD"
            and upstream.status not in NO_BODY_STATUS and upstream.status >= 200
            and "Transfer-Encoding" not in upstream.headers)


async def _relay_whole(request: IncomingRequest, upstream: UpstreamResponse, headers: CIMultiDict[str],
                       on_prepared: Callable[[int], None]) -> Answer:
    try:
        body = await upstream.read()
    except asyncio.TimeoutError as exc:  # the body stalled past the idle timeout: not a reset
        raise failure(exc) from None
    except UpstreamBroke:
        raise UpstreamReset(None) from None
    headers.popall("Content-Length", None)
    answer = request.respond(upstream.status, upstream.reason, headers, body)
    on_prepared(upstream.status)
    return answer


async def _relay_bodiless(request: IncomingRequest, upstream: UpstreamResponse, headers: CIMultiDict[str],
                          on_prepared: Callable[[int], None]) -> Answer:
    for name in ("Content-Length", "Content-Type", "Content-Encoding"):
        headers.popall(name, None)
    headers.add("Via", VIA)
    answer = request.respond(upstream.status, upstream.reason, headers, None)
    on_prepared(upstream.status)
    return answer


async def _relay_stream(request: IncomingRequest, upstream: UpstreamResponse, headers: CIMultiDict[str],
                        transform: ChunkFilter | None, on_prepared: Callable[[int], None],
                        scrub: HeaderFilter | None = None) -> Answer:
    """Stream as the upstream sends (SSE-safe), through the transform when there is one; the trailers
    (HTTP/2: ``grpc-status``, ``grpc-message``) through the same scrub as the headers."""
    if transform is not None:
        headers.popall("Content-Length", None)
    stream = await request.start(upstream.status, upstream.reason, headers)
    answer = request.answer_of(stream)
    on_prepared(upstream.status)
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
        except Exception:  # a response the filter cannot read is not passed on (fail closed)
            raise UpstreamReset(answer) from None
        try:
            if data:
                await stream.write(data)
            if final:
                await request.finish(stream, _scrubbed(upstream.trailers, scrub))
                return answer
        except ConnectionError:
            raise ClientGone(answer) from None
