"""WebSocket upgrades: the upstream's handshake first (so a refusal is a plain HTTP error), then frames
relayed both ways. Handshakes go through a ``ClientSession`` that refuses redirect hops.
"""

from __future__ import annotations

import asyncio
import ssl
from contextvars import ContextVar
from typing import Any, Callable

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from sidecar.config_model import Timeouts
from sidecar.errors import UpstreamFailed
from sidecar.http.headers import connection_listed
from sidecar.http.incoming import Answer, IncomingRequest

_SENT_TO: ContextVar[object | None] = ContextVar("sidecar_sent_to", default=None)


class RedirectRefused(aiohttp.ClientError):
    """An upstream answered a WebSocket handshake with a redirect: never followed."""


async def _no_redirect_hops(request: aiohttp.ClientRequest, handler: Any) -> aiohttp.ClientResponse:
    """Session middleware: a request to any URL other than the one the pipeline sent is a redirect hop.

    Plain requests pass ``allow_redirects=False``; ``ws_connect`` cannot, so its hops stop here,
    before a credential or our client certificate reaches another origin or a path policy never saw.
    """
    expected = _SENT_TO.get()
    if expected is not None and request.url != expected:
        raise RedirectRefused("upstream: redirects are not followed")
    response: aiohttp.ClientResponse = await handler(request)
    return response


def websocket_session(ssl_context: ssl.SSLContext | None, timeouts: Timeouts) -> aiohttp.ClientSession:
    """A session for WebSocket handshakes only (plain requests go through ``sidecar.forward.http11``)."""
    connector = aiohttp.TCPConnector(ssl=ssl_context if ssl_context is not None else True, limit=256,
                                     keepalive_timeout=min(timeouts.idle, 60.0), enable_cleanup_closed=True)
    return aiohttp.ClientSession(
        connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding",
                                                                       "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect, sock_read=timeouts.first_byte),
        cookie_jar=aiohttp.DummyCookieJar(), trust_env=False, middlewares=(_no_redirect_hops,))


WS_HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                          "sec-websocket-protocol", "sec-websocket-accept"})


def is_websocket(request: IncomingRequest) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket" and "upgrade" in connection_listed(
        request.headers)


async def proxy_websocket(request: IncomingRequest, session: aiohttp.ClientSession, url: URL,
                          headers: CIMultiDict[str], timeouts: Timeouts, on_open: Callable[[int], None],
                          on_closed: Callable[[], None]) -> Answer:
    """Open the upstream WebSocket first (so a refusal is a plain HTTP error), then relay frames.

    ``on_closed`` is called as soon as either side sends a close frame (RFC 6455 §5.5.1): the session
    ended normally, even if the client's connection goes while the closing handshake finishes. A side
    that goes away without one leaves it uncalled (the session was broken off)."""
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    for name in list(headers.keys()):
        if name.lower() in WS_HANDSHAKE:
            headers.popall(name, None)
    sent_to = _SENT_TO.set(url)
    try:
        async with asyncio.timeout(timeouts.first_byte):
            upstream = await session.ws_connect(url, headers=headers, protocols=protocols, autoping=True)
    except RedirectRefused:
        raise UpstreamFailed("upstream_unreachable", "upstream: the WebSocket handshake was redirected; "
                             "redirects are not followed", detail="redirect") from None
    except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
        raise UpstreamFailed("upstream_timeout", "upstream: WebSocket handshake timed out") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamFailed("upstream_unreachable", "upstream: WebSocket handshake failed",
                             detail=type(exc).__name__) from None
    finally:
        _SENT_TO.reset(sent_to)
    client = await request.accept_websocket(upstream.protocol)
    on_open(101)
    try:
        await asyncio.gather(_pump(client, upstream, on_closed), _pump(upstream, client, on_closed))
    finally:
        await upstream.close()
        await client.close()
    return request.answer_of(client)


async def _pump(source: Any, sink: Any, on_closed: Callable[[], None]) -> None:
    """Data frames from source to sink until source ends: a close frame, an error, or its connection gone."""
    try:
        while True:
            message = await source.receive()
            if message.type == aiohttp.WSMsgType.TEXT:
                await sink.send_str(message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                await sink.send_bytes(message.data)
            else:
                if message.type == aiohttp.WSMsgType.CLOSE:
                    on_closed()
                break
    except (ConnectionError, aiohttp.ClientError):  # the sink went away mid-relay: broken off
        pass
    await sink.close()