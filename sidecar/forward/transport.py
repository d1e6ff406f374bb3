"""The seam between the pipeline and a wire protocol, and the one place transport errors become refusals.

A :class:`Transport` sends one request upstream and returns an :class:`UpstreamResponse`: its head,
with the body still to be read. ``sidecar.forward.http11.ConnectionPool`` is HTTP/1.1's (kept-alive
connections per upstream); ``sidecar.forward.http2.H2Pool`` is its HTTP/2 sibling behind the same two types.

:func:`open_upstream` is the pipeline's only way to send, and maps whatever a transport raises to
one refusal: ``body_too_large``, ``request_timeout``, ``upstream_timeout``,
``upstream_protocol_error`` or ``upstream_unreachable``. Once the response has begun, a transport
raises :class:`UpstreamBroke` (or ``TimeoutError`` for a body gone quiet) and the relay decides.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import AsyncIterable, Awaitable, Protocol

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.errors import RequestRefused, UpstreamFailed
from sidecar.forward.body import BodyStalled, BodyTooLarge, LimitedBody, stalled

Body = bytes | AsyncIterable[bytes] | None


class UpstreamBroke(Exception):
    """The upstream broke off while its response body was being read."""


class UpstreamResponse(Protocol):
    """An upstream's response head, its body to be read, and the connection it holds until released."""

    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    trailers: CIMultiDictProxy[str]  # complete once the body has been read to its end (HTTP/1.1: none)

    @property
    def content_length(self) -> int | None: ...

    async def read(self) -> bytes:
        """The whole body (short responses). ``UpstreamBroke``, or ``TimeoutError`` past ``idle``."""
        ...

    async def read_chunk(self) -> bytes:
        """The next piece of the body as it arrives; ``b""`` at its end. Raises as :meth:`read`."""
        ...

    def release(self) -> None:
        """Done with it: the connection is kept for reuse if the exchange ended cleanly, else closed."""
        ...


class Transport(Protocol):
    """Where requests to one upstream go."""

    @property
    def host_header(self) -> str:
        """The ``Host`` (or ``:authority``) the upstream is sent."""
        ...

    def send(self, method: str, target: str, headers: CIMultiDict[str], body: Body) -> Awaitable[UpstreamResponse]:
        """Send one request; return once the response head has come (within ``first_byte``)."""
        ...


async def open_upstream(transport: Transport, method: str, target: str, headers: CIMultiDict[str],
                        data: bytes | LimitedBody | None) -> UpstreamResponse:
    """Send the request; headers must come within ``first_byte``, then the body may idle for ``idle``."""
    try:
        return await transport.send(method, target, headers, data)
    except (BodyTooLarge, BodyStalled, aiohttp.ClientError, HttpProcessingError, OSError,
            asyncio.TimeoutError) as exc:
        if isinstance(exc, BodyTooLarge) or getattr(data, "exceeded", False):
            raise RequestRefused("body_too_large", "request: body exceeds the configured limit") from None
        refused = getattr(data, "refused", None)
        if refused is not None:  # the signer's reframer stopped the body: the upstream has no complete one
            raise refused from None
        if isinstance(exc, BodyStalled):
            raise stalled() from None
        raise failure(exc) from None


def failure(exc: BaseException) -> UpstreamFailed:
    """The refusal for a failed upstream exchange: timeout, TLS verification, or unreachable."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return UpstreamFailed("upstream_timeout", "upstream: no response within the configured timeout")
    if isinstance(exc, HttpProcessingError):
        return UpstreamFailed("upstream_protocol_error", "upstream: the response is not valid HTTP; nothing "
                              "of it was relayed", detail=exc.message if getattr(exc, "says_why", False)
                              else type(exc).__name__)
    if isinstance(exc, ssl.SSLError):
        return UpstreamFailed("upstream_unreachable", "upstream: TLS verification of the upstream failed",
                              detail=f"ClientConnectorCertificateError: {type(exc).__name__}")
    return UpstreamFailed("upstream_unreachable", "upstream: connection refused, reset or closed",
                          detail=type(exc).__name__)
