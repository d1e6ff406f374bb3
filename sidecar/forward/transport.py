"""The seam between the pipeline and a wire protocol, and the one place transport errors become refusals.

A :class:`Transport` sends one request upstream and returns its response head with the body to
come; ``sidecar.forward.http11`` is today's (kept-alive HTTP/1.1 connections per upstream).
:func:`open_upstream` is the only caller, and maps whatever a transport raises to a refusal:
``body_too_large``, ``request_timeout``, ``upstream_timeout``, ``upstream_protocol_error`` or
``upstream_unreachable``.
"""

from __future__ import annotations

import asyncio
import ssl

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict

from sidecar.errors import RequestRefused, UpstreamFailed
from sidecar.forward.body import BodyStalled, BodyTooLarge, LimitedBody, stalled
from sidecar.forward.http11 import ConnectionPool, MalformedResponse, UpstreamResponse, send


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


def failure(exc: BaseException) -> UpstreamFailed:
    """The refusal for a failed upstream exchange: timeout, TLS verification, or unreachable."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return UpstreamFailed("upstream_timeout", "upstream: no response within the configured timeout")
    if isinstance(exc, HttpProcessingError):
        return UpstreamFailed("upstream_protocol_error", "upstream: the response is not valid HTTP/1.1; nothing "
                              "of it was relayed", detail=exc.message if isinstance(exc, MalformedResponse)
                              else type(exc).__name__)
    if isinstance(exc, ssl.SSLError):
        return UpstreamFailed("upstream_unreachable", "upstream: TLS verification of the upstream failed",
                              detail=f"ClientConnectorCertificateError: {type(exc).__name__}")
    return UpstreamFailed("upstream_unreachable", "upstream: connection refused, reset or closed",
                          detail=type(exc).__name__)
