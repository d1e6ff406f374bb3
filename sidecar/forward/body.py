"""The request body, read once: buffered within the limit (to sign, to parse MCP, to hold for an
approval) or streamed as it arrives; ``Expect: 100-continue`` answered here, once the request is
let on (a refused request gets its refusal, never ``100 Continue``).

An upload whose sender sends nothing for ``idle`` is refused (``request_timeout``), and one past the
limit (``body_too_large``), whether it was buffered or is being streamed upstream.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from sidecar.config_model import Limits
from sidecar.errors import RequestRefused
from sidecar.http.incoming import IncomingRequest
from sidecar.http.reframe import Reframer


class BodyTooLarge(Exception):
    """Raised inside the upload stream; the pipeline turns it into body_too_large."""


class BodyStalled(Exception):
    """The request's sender sent no body byte for ``idle``; the pipeline turns it into request_timeout."""


def declared_length(request: IncomingRequest, limits: Limits) -> int:
    """The declared body size, refused early when it is over the limit."""
    length = request.content_length or 0
    if length > limits.max_body_bytes:
        raise RequestRefused("body_too_large", f"request: body of {length} bytes exceeds the limit of "
                                               f"{limits.max_body_bytes} bytes")
    return length


async def read_body(request: IncomingRequest, limits: Limits, idle: float) -> bytes:
    """The whole body (for signing or MCP parsing), refused once it passes the limit or stalls for ``idle``."""
    declared_length(request, limits)
    await request.send_continue()
    chunks, size = [], 0
    stream = aiter(request.chunks())
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
    """The request body as an async iterator that stops at the limit and remembers it did, rewritten
    on the way by a signer's :class:`~sidecar.http.reframe.Reframer` when it has one.

    A transport may wrap exceptions raised by a body while it is being sent, so the flags, not
    the exception type, tell a body over the limit (``exceeded``) or one the reframer refused
    (``refused``) from an upstream failure.
    """

    def __init__(self, request: IncomingRequest, limits: Limits, reframe: Reframer | None = None,
                 whole: bytes | None = None) -> None:
        self._request, self._max = request, limits.max_body_bytes
        self._reframe, self._whole = reframe, whole
        self.exceeded = False
        self.refused: RequestRefused | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        await self._request.send_continue()
        if self._reframe is None:
            async for chunk in self._limited():
                yield chunk
            return
        try:
            async for chunk in self._limited():
                yield self._reframe.feed(chunk)  # b"" until a chunk is complete: the idle clock restarts per piece
            yield self._reframe.end()
        except RequestRefused as refused:
            self.refused = refused
            raise

    async def _limited(self) -> AsyncIterator[bytes]:
        if self._whole is not None:  # read already (held for an approval): rewritten all the same
            yield self._whole
            return
        size = 0
        async for chunk in self._request.chunks():
            size += len(chunk)
            if size > self._max:
                self.exceeded = True
                raise BodyTooLarge()
            yield chunk


class RequestBody:
    """One request's body: whether one follows, read whole once when a stage needs it (a form, MCP, a
    signer, an approval), else streamed to the upstream as it arrives. Built when the exchange first
    needs to know; a transfer coding other than chunked is refused there."""

    __slots__ = ("_request", "_limits", "_idle", "present", "form", "whole")

    def __init__(self, request: IncomingRequest, limits: Limits, idle: float) -> None:
        self._request, self._limits, self._idle = request, limits, idle
        self.present = has_body(request)
        self.form = self.present and is_form_type(request.headers.get("Content-Type", ""))
        self.whole: bytes | None = None

    async def read(self) -> bytes:
        """The whole body, read the first time (within the limit and the idle timeout), then kept."""
        if self.whole is None:
            self.whole = await read_body(self._request, self._limits, self._idle)
        return self.whole

    @property
    def size(self) -> int | None:
        """The size for policy: known when read or declared; None (unknown) for a chunked body not read,
        so that a condition on ``request.size`` cannot be evaded by leaving Content-Length out."""
        if self.whole is not None:
            return len(self.whole)
        if self._request.content_length is not None:
            return self._request.content_length
        return None if self.present else 0

    def to_send(self, reframe: Reframer | None = None) -> bytes | LimitedBody | None:
        """What goes upstream: the body read (framed with its length), else the stream, else nothing;
        streamed through ``reframe`` when a signer rewrites it."""
        if reframe is not None:
            if self.whole is None:
                declared_length(self._request, self._limits)
            if not self.present:
                reframe.end()  # nothing to rewrite: refused here, before a head is sent that has no body
            return LimitedBody(self._request, self._limits, reframe, self.whole)
        if self.whole is not None:
            return self.whole
        declared_length(self._request, self._limits)
        return LimitedBody(self._request, self._limits) if self.present else None


def has_body(request: IncomingRequest) -> bool:
    """A body follows: declared, chunked, or an HTTP/2 stream's DATA without a declared length. Other
    transfer codings are refused, never half-forwarded."""
    coding = request.headers.get("Transfer-Encoding")
    if coding is None:
        return bool(request.content_length) or request.unframed_body
    if coding.strip().lower() != "chunked":
        raise RequestRefused("bad_request", "request: only Transfer-Encoding: chunked is accepted")
    return True


def is_form_type(content_type: str) -> bool:
    return content_type.partition(";")[0].strip().lower() == "application/x-www-form-urlencoded"


async def next_chunk(chunks: AsyncIterator[bytes], idle: float) -> bytes | None:
    """The sender's next piece of the body (None at its end), due within ``idle`` (else BodyStalled)."""
    try:
        async with asyncio.timeout(idle):
            return await anext(chunks)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise BodyStalled() from None


def stalled() -> RequestRefused:
    """The refusal for a body whose sender stopped sending."""
    return RequestRefused("request_timeout", "request: no body byte arrived within the idle timeout; "
                                             "expected the rest of the declared body")
