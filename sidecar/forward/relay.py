"""The upstream's response to the client: short ones in one write, the rest streamed as they arrive
(server-sent events reach the client as the upstream sends them), through a chunk filter where
one applies (``tools/list``) and a header scrub (credentials an upstream echoes back).
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from sidecar.forward.http11 import UpstreamResponse
from sidecar.forward.transport import failure
from sidecar.http.headers import VIA, clean_response_headers

SMALL_BODY = 64 * 1024


NO_BODY_STATUS = frozenset({204, 304})


def _small(request: web.BaseRequest, upstream: UpstreamResponse) -> bool:
    """A short, length-delimited response: sent in one write (headers and body together)."""
    length = upstream.content_length
    return (length is not None and length <= SMALL_BODY and request.method != "HEAD"
            and upstream.status not in NO_BODY_STATUS and upstream.status >= 200
            and "Transfer-Encoding" not in upstream.headers)


async def _relay_whole(request: web.BaseRequest, upstream: UpstreamResponse, headers: CIMultiDict[str],
                       on_prepared: Callable[[int], None]) -> web.StreamResponse:
    try:
        body = await upstream.read()
    except asyncio.TimeoutError as exc:  # the body stalled past the idle timeout: not a reset
        raise failure(exc) from None
    except (aiohttp.ClientError, OSError):
        raise UpstreamReset(False, None) from None
    headers.popall("Content-Length", None)
    response = web.Response(status=upstream.status, reason=upstream.reason, headers=headers, body=body)
    on_prepared(upstream.status)
    return response


async def _relay_bodiless(upstream: UpstreamResponse, headers: CIMultiDict[str],
                          on_prepared: Callable[[int], None]) -> web.StreamResponse:
    for name in ("Content-Length", "Content-Type", "Content-Encoding"):
        headers.popall(name, None)
    headers.add("Via", VIA)
    response = web.Response(status=upstream.status, reason=upstream.reason, headers=headers)
    on_prepared(upstream.status)
    return response


class UpstreamReset(Exception):
    """The upstream broke off while its response was being relayed (or went quiet past ``idle``)."""

    def __init__(self, started: bool, response: web.StreamResponse | None, *, timed_out: bool = False) -> None:
        self.started, self.response, self.timed_out = started, response, timed_out


class ClientGone(Exception):
    """The client went away while its response was being relayed."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response


ChunkFilter = Callable[[bytes, bool], bytes]  # (chunk, final) -> bytes to send


HeaderFilter = Callable[[CIMultiDict[str]], CIMultiDict[str]]  # the same object back when it changed nothing


def relay(request: web.BaseRequest, upstream: UpstreamResponse, transform: ChunkFilter | None,
          on_prepared: Callable[[int], None], scrub: HeaderFilter | None = None) -> Awaitable[web.StreamResponse]:
    """The upstream's response to the client: short ones in one write, the rest streamed as they arrive.

    ``scrub`` removes what the headers echo of the attached credential; a redirect it changed goes
    without its body (which repeats the URL it had)."""
    headers = clean_response_headers(upstream.headers)
    if scrub is not None and (scrubbed := scrub(headers)) is not headers:
        headers = scrubbed
        if 300 <= upstream.status < 400:
            return _relay_bodiless(upstream, scrubbed, on_prepared)
    headers.add("Via", VIA)
    if transform is None and _small(request, upstream):
        return _relay_whole(request, upstream, headers, on_prepared)
    return _relay_stream(request, upstream, headers, transform, on_prepared)


async def _relay_stream(request: web.BaseRequest, upstream: UpstreamResponse, headers: CIMultiDict[str],
                        transform: ChunkFilter | None, on_prepared: Callable[[int], None]) -> web.StreamResponse:
    """Stream as the upstream sends (SSE-safe), through the transform when there is one."""
    if transform is not None:
        headers.popall("Content-Length", None)
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    try:
        await response.prepare(request)
    except (ConnectionError, aiohttp.ClientConnectionResetError):
        raise ClientGone(response) from None
    on_prepared(upstream.status)
    while True:
        try:
            chunk = await upstream.content.readany()
        except asyncio.TimeoutError:
            raise UpstreamReset(True, response, timed_out=True) from None
        except (aiohttp.ClientError, OSError):
            raise UpstreamReset(True, response) from None
        final = not chunk
        try:
            data = transform(chunk, final) if transform is not None else chunk
        except Exception:  # a response the filter cannot read is not passed on (fail closed)
            raise UpstreamReset(True, response) from None
        try:
            if data:
                await response.write(data)
            if final:
                await response.write_eof()
                return response
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            raise ClientGone(response) from None