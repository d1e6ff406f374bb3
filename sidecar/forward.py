"""The forwarding leg: header hygiene, streaming both ways, pooled upstream sessions.

- Hop-by-hop headers (RFC 9110 §7.6.1) are removed both ways, with every header named in
  ``Connection``; ``Via`` and ``X-Forwarded-*`` are written here, never trusted from a client;
  identity headers a fronting proxy would set (``X-Forwarded-User``, ``X-Auth-Request-*``, ...)
  are removed from requests both ways unless ``pass_headers`` lists them. What is left is
  what policy sees (:func:`clean_request_headers`).
- ``Expect: 100-continue`` is answered here, once the request is let on and its body is
  read (a refused request gets its refusal, never ``100 Continue``), and is not forwarded.
- Bodies stream without buffering (chunked uploads, server-sent events reach the client as
  the upstream sends them); a provider that signs the body gets it buffered, within the
  body limit.
- Requests go out through ``sidecar.upstream`` (kept-alive connections per upstream, each
  with its own TLS context: verification is never off); WebSocket handshakes through a
  ``ClientSession`` that refuses redirect hops. Redirects are passed back, never followed.
"""

from __future__ import annotations

import asyncio
import ssl
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable

import aiohttp
from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config import Limits, Timeouts
from sidecar.errors import RequestRefused, UpstreamFailed
from sidecar.upstream import (
    BodyStalled, BodyTooLarge, ConnectionPool, UpstreamResponse, failure, next_chunk, send, stalled,
)

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade",
})
# Headers the sidecar writes itself: whatever a client sent under these names is dropped.
SIDECAR_WRITTEN = frozenset({
    "via", "forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port",
    "x-forwarded-client-cert", "x-sidecar-task", "host", "traceparent", "tracestate",
})
# Expectations the sidecar answers itself (as Envoy does): never forwarded.
ANSWERED_HERE = frozenset({"expect"})
# Methods whose answer is the request as received, credentials included (TRACK: IIS's TRACE; aiohttp's
# C parser refuses it and a lowercase trace, its pure-Python parser does not).
ECHO_METHODS = frozenset({"TRACE", "TRACK"})
VIA = "1.1 sidecar"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CHUNK = 64 * 1024


# Identity that upstreams trust from a fronting proxy (oauth2-proxy, Authelia, Kubernetes' front proxy,
# Grafana's auth proxy, cloud identity-aware proxies): asserted by no agent and no caller, either way.
IDENTITY_HEADERS = frozenset({
    "x-forwarded-user", "x-forwarded-email", "x-forwarded-preferred-username", "x-forwarded-groups",
    "x-forwarded-access-token", "x-remote-user", "x-remote-group", "x-remote-email", "remote-user",
    "remote-groups", "remote-email", "remote-name", "x-webauth-user", "x-authenticated-user",
    "x-authenticated-userid", "x-consumer-id", "x-consumer-username", "x-credential-identifier",
})
IDENTITY_PREFIXES = ("x-auth-request-", "x-remote-extra-", "x-amzn-oidc-", "x-ms-client-principal",
                     "x-goog-authenticated-user-", "cf-access-")


def connection_listed(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    names: set[str] = set()
    for value in headers.getall("Connection", ()):
        names.update(token.strip().lower() for token in value.split(",") if token.strip())
    return names


@dataclass(frozen=True, slots=True)
class DropSet:
    """Request headers never forwarded: lowercase ``names``, and names starting with one of
    ``prefixes`` unless listed in ``keep`` (an upstream's ``pass_headers``)."""

    names: frozenset[str]
    prefixes: tuple[str, ...] = ()
    keep: frozenset[str] = frozenset()


def request_drop_set(strip: Iterable[str] = (), keep: Iterable[str] = ()) -> DropSet:
    """Hop-by-hop, the headers the sidecar writes or answers, and ``strip`` plus the identity
    headers less ``keep``: an upstream may be passed a stripped header, never a hop-by-hop one."""
    kept = frozenset(h.lower() for h in keep)
    removable = (frozenset(h.lower() for h in strip) | IDENTITY_HEADERS) - kept
    return DropSet(HOP_BY_HOP | SIDECAR_WRITTEN | ANSWERED_HERE | removable, IDENTITY_PREFIXES, kept)


def inbound_drop_set(pass_headers: Iterable[str] = ()) -> DropSet:
    """A caller's Authorization never reaches the agent, verified or not: the agent gets a task id instead."""
    return request_drop_set({"authorization"}, pass_headers)


DEFAULT_DROP = request_drop_set()
RESPONSE_DROP = HOP_BY_HOP | {"content-length"}


def clean_request_headers(headers: CIMultiDictProxy[str], drop: DropSet = DEFAULT_DROP) -> CIMultiDict[str]:
    """A copy without the ``drop`` set and any header named in ``Connection``: the headers that are
    forwarded, and the only ones policy sees (what is matched is what is forwarded)."""
    names, prefixes, keep = drop.names, drop.prefixes, drop.keep
    connection = headers.get("Connection")
    if connection is not None and connection.lower() not in ("keep-alive", "close"):
        listed = connection_listed(headers) - {"keep-alive", "close"}
        if listed:
            names = names | listed
    return CIMultiDict([(k, v) for k, v in headers.items()
                        if (n := k.lower()) not in names and not (n.startswith(prefixes) and n not in keep)])


def clean_response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    drop = RESPONSE_DROP
    connection = headers.get("Connection")
    if connection is not None and connection.lower() not in ("keep-alive", "close"):
        drop = drop | connection_listed(headers)
    out = CIMultiDict([(k, v) for k, v in headers.items() if k.lower() not in drop])
    if "Content-Length" in headers and "Transfer-Encoding" not in headers:
        out["Content-Length"] = headers["Content-Length"]
    return out


def declared_length(request: web.BaseRequest, limits: Limits) -> int:
    """The declared body size, refused early when it is over the limit."""
    length = request.content_length or 0
    if length > limits.max_body_bytes:
        raise RequestRefused("body_too_large", f"request: body of {length} bytes exceeds the limit of "
                                               f"{limits.max_body_bytes} bytes")
    return length


async def continue_if_expected(request: web.BaseRequest) -> None:
    """Send ``100 Continue`` to a client that waits for it before its body (RFC 9110 §10.1.1)."""
    if request.version == HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(CONTINUE)
        request.writer.output_size = 0  # the response has not started (as aiohttp's own expect handler)


async def read_body(request: web.BaseRequest, limits: Limits, idle: float) -> bytes:
    """The whole body (for signing or MCP parsing), refused once it passes the limit or stalls for ``idle``."""
    declared_length(request, limits)
    await continue_if_expected(request)
    chunks, size = [], 0
    stream = aiter(request.content.iter_chunked(CHUNK))
    try:
        while (chunk := await next_chunk(stream, idle)) is not None:
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise RequestRefused("body_too_large", f"request: body exceeds the limit of "
                                                       f"{limits.max_body_bytes} bytes")
            chunks.append(chunk)
    except BodyStalled:
        raise stalled() from None
    return b"".join(chunks)


class LimitedBody:
    """The request body as an async iterator that stops at the limit and remembers it did.

    aiohttp wraps exceptions raised by a payload while it is being sent, so the flag, not
    the exception type, tells a body over the limit from an upstream failure.
    """

    def __init__(self, request: web.BaseRequest, limits: Limits) -> None:
        self._request, self._max = request, limits.max_body_bytes
        self.exceeded = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        await continue_if_expected(self._request)
        size = 0
        async for chunk in self._request.content.iter_chunked(CHUNK):
            size += len(chunk)
            if size > self._max:
                self.exceeded = True
                raise BodyTooLarge()
            yield chunk


def stream_body(request: web.BaseRequest, limits: Limits) -> LimitedBody:
    return LimitedBody(request, limits)


def has_body(request: web.BaseRequest) -> bool:
    """A body follows: declared, or chunked. Other transfer codings are refused, never half-forwarded."""
    coding = request.headers.get("Transfer-Encoding")
    if coding is None:
        return bool(request.content_length)
    if coding.strip().lower() != "chunked":
        raise RequestRefused("bad_request", "request: only Transfer-Encoding: chunked is accepted")
    return True


def echo_method(method: str, allowed: bool) -> bool:
    """True for TRACE and TRACK, refused unless ``allowed`` (an upstream's ``allow_trace``); the
    pipeline then attaches no credential, so that the echo has none to hand back."""
    if method.upper() not in ECHO_METHODS:
        return False
    if not allowed:
        raise RequestRefused("method_not_allowed", f"request: {method.upper()} is refused: its answer echoes the "
                                                   "request with the credentials it carries (allow_trace opts in)")
    return True


def is_form_type(content_type: str) -> bool:
    return content_type.partition(";")[0].strip().lower() == "application/x-www-form-urlencoded"


def is_form(request: web.BaseRequest) -> bool:
    """A form body follows: its fields are read like query parameters (method overrides, tokens)."""
    return is_form_type(request.headers.get("Content-Type", "")) and has_body(request)


def client_ssl_context(ca: str | None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """Verification always on: the upstream's CA or the system store; our SVID when asked."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert and key:
        ctx.load_cert_chain(cert, key)
    return ctx


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
    return await handler(request)


def websocket_session(ssl_context: ssl.SSLContext | None, timeouts: Timeouts) -> aiohttp.ClientSession:
    """A session for WebSocket handshakes only (plain requests go through ``sidecar.upstream``)."""
    connector = aiohttp.TCPConnector(ssl=ssl_context if ssl_context is not None else True, limit=256,
                                     keepalive_timeout=min(timeouts.idle, 60.0), enable_cleanup_closed=True)
    return aiohttp.ClientSession(
        connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding",
                                                                       "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect, sock_read=timeouts.first_byte),
        cookie_jar=aiohttp.DummyCookieJar(), trust_env=False, middlewares=(_no_redirect_hops,))


async def open_upstream(pool: ConnectionPool, method: str, target: str, headers: CIMultiDict[str],
                        data: bytes | LimitedBody | None) -> UpstreamResponse:
    """Send the request; headers must come within ``first_byte``, then the body may idle for ``idle``."""
    try:
        return await send(pool, method, target, headers, data)
    except (BodyTooLarge, BodyStalled, aiohttp.ClientError, HttpProcessingError, OSError,
            asyncio.TimeoutError) as exc:
        if isinstance(exc, BodyTooLarge) or getattr(data, "exceeded", False):
            raise RequestRefused("body_too_large", "request: body exceeds the configured limit") from None
        if isinstance(exc, BodyStalled):
            raise stalled() from None
        raise failure(exc) from None


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


# -- WebSocket -------------------------------------------------------------------------------

WS_HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                          "sec-websocket-protocol", "sec-websocket-accept"})


def is_websocket(request: web.BaseRequest) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket" and "upgrade" in connection_listed(
        request.headers)


async def proxy_websocket(request: web.BaseRequest, session: aiohttp.ClientSession, url: object,
                          headers: CIMultiDict[str], timeouts: Timeouts, on_open: Callable[[int], None],
                          on_closed: Callable[[], None]) -> web.WebSocketResponse:
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
    client = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else ())
    await client.prepare(request)
    on_open(101)
    try:
        await asyncio.gather(_pump(client, upstream, on_closed), _pump(upstream, client, on_closed))
    finally:
        await upstream.close()
        await client.close()
    return client


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
