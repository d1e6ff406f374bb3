"""The seam on the client's side: one request as the pipeline sees it, whichever server received it.

The pipeline reads a request and answers it only through :class:`IncomingRequest`; it never sees
the server underneath. ``sidecar.http1.server.Http1Incoming`` is the HTTP/1.1 listeners' (their own
server, aiohttp's C parser; ``sidecar.server.AiohttpIncoming`` on the aiohttp fallback); the HTTP/2
server fills the same slot with one per stream.

An answer is whatever the server needs handed back when the exchange is over (``http1``: a whole
response or the stream whose head was sent; aiohttp: the ``web.StreamResponse``); the pipeline passes
it through untouched (:data:`Answer`).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any, AsyncIterator, Protocol, TypeAlias

from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.errors import Refusal, refusal_body, refusal_headers

RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a TCP reset

Answer: TypeAlias = object
"""What a handler hands back to the server that called it; opaque to the pipeline."""


class ClientGone(Exception):
    """The client went away while its response was being sent; ``answer`` goes back to the server."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer


class ResponseStream(Protocol):
    """A response whose head is sent: its body follows in pieces. Writes raise ``ConnectionError``
    once the client has gone."""

    async def write(self, data: bytes) -> None: ...

    async def write_eof(self) -> None: ...


class IncomingRequest(Protocol):
    """One request from a client: read once, answered once."""

    method: str
    target: str  # the request-target as received, raw (origin form: path and query; CONNECT: authority)
    headers: CIMultiDictProxy[str]
    content_length: int | None
    unframed_body: bool  # a body follows whose length was not declared and no coding frames (HTTP/2 DATA)

    @property
    def raw_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """Every header as received, in order (for limits and name checks)."""
        ...

    @property
    def remote(self) -> str | None:
        """The peer's address."""
        ...

    @property
    def connection(self) -> object:
        """The connection it came on: the key of the peer verified at its handshake."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (empty when there is none); read at most once."""
        ...

    async def send_continue(self) -> None:
        """Tell a client that waits (``Expect: 100-continue``) to send its body; nothing otherwise."""
        ...

    def respond(self, status: int, reason: str | None, headers: CIMultiDict[str] | dict[str, str],
                body: bytes | None) -> Answer:
        """A whole response, sent by the server once the handler returns it."""
        ...

    async def start(self, status: int, reason: str | None, headers: CIMultiDict[str]) -> ResponseStream:
        """Send the response head now; the body follows. :class:`ClientGone`: the client has gone."""
        ...

    async def accept_websocket(self, protocol: str | None) -> Any:
        """Complete the client's WebSocket upgrade; the socket it returns is relayed frame by frame."""
        ...

    async def finish(self, stream: ResponseStream, trailers: CIMultiDictProxy[str]) -> None:
        """End a streamed response, with the upstream's trailers where the protocol carries them
        (HTTP/2; an HTTP/1.1 response is not chunked with trailers here, so they are dropped)."""
        ...

    def abort(self) -> None:
        """Break the connection off (a reset): a response cut short must never look whole."""
        ...

    def answer_of(self, stream: ResponseStream) -> Answer:
        """What to hand back to the server for a response that was streamed."""
        ...


def refusal_answer(request: IncomingRequest, refusal: Refusal) -> Answer:
    """The one shape of every refusal, on whichever server: JSON body, reason code, Proxy-Status."""
    headers = refusal_headers(refusal)
    headers["Content-Type"] = "application/json"
    return request.respond(refusal.status, None, headers, refusal_body(refusal))


def reset(transport: asyncio.BaseTransport | None) -> None:
    """Break a connection off with a TCP reset (``IncomingRequest.abort``), never an orderly close: a
    response framed by the connection's close (an HTTP/1.0 client) would otherwise end as if whole."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")  # under TLS too: the TCP socket
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
        except OSError:  # already closed by the peer: nothing left to tell it
            pass
    transport.abort()  # type: ignore[attr-defined]  # every transport the servers hand out has it
