"""HTTP/1.1 responses on the listeners' own server: one write per head (head and body together when
the body is whole), chunked or length-delimited streams that wait for the client's window.

A header value or name carrying CR or LF is never written (response splitting): the response is
refused as a defect instead (``ValueError``), before a byte of it reaches the wire.
"""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import Iterable, Mapping

from aiohttp.base_protocol import BaseProtocol

from sidecar.errors import PROXY_NAME

NO_BODY_STATUS = frozenset({204, 304})
SERVER = f"Server: {PROXY_NAME}\r\n"
PHRASES = {status.value: status.phrase for status in HTTPStatus}
STATUS_LINES = {(minor, code): f"HTTP/1.{minor} {code} {phrase}\r\n".encode("latin-1")
                for minor in (0, 1) for code, phrase in PHRASES.items()}
_date: tuple[int, str] = (0, "")


def http_date() -> str:
    """``Date: ...\\r\\n``, formatted once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, f"Date: {formatdate(now, usegmt=True)}\r\n")
    return _date[1]


def bodiless(status: int, method: str) -> bool:
    """A response that never has a body (RFC 9112 §6.3): 1xx, 204, 304, and any answer to HEAD."""
    return status < 200 or status in NO_BODY_STATUS or method == "HEAD"


def status_line(minor: int, status: int, reason: str | None) -> bytes:
    if reason is None:
        line = STATUS_LINES.get((minor, status))
        if line is not None:
            return line
        reason = PHRASES.get(status, "")
    if "\r" in reason or "\n" in reason:
        raise ValueError("response: the reason phrase holds a line break")
    return f"HTTP/1.{minor} {status} {reason}\r\n".encode("latin-1", "replace")


def header_block(headers: Iterable[tuple[str, str]], framing: str, connection: str) -> bytes:
    """Every header line, ``Server`` and ``Date`` where absent, the framing and connection lines, the blank line.

    The whole block is scanned once for a stray CR or LF (two counts, in C) rather than each value."""
    lines = [f"{name}: {value}\r\n" for name, value in headers]
    count = len(lines)
    block = "".join(lines)
    if block.count("\n") != count or block.count("\r") != count:
        raise ValueError("response: a header holds a line break")
    lowered = block.lower()
    extra = ("" if "\nserver:" in "\n" + lowered else SERVER) + ("" if "\ndate:" in "\n" + lowered else http_date())
    return (block + extra + framing + connection + "\r\n").encode("latin-1", "replace")


class Wire(BaseProtocol):
    """A connection as its responses (and a WebSocket) write to it: the transport while it is open, and
    the client's window (``pause_writing``/``resume_writing``, kept by aiohttp's ``BaseProtocol``)."""

    def live_transport(self) -> asyncio.Transport:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("http1: the client has gone")
        return transport

    async def drained(self) -> None:
        """Returns once the client has taken what was written (at once unless writing is paused)."""
        if self._paused:
            await self._drain_helper()

    def close(self) -> None:
        raise NotImplementedError


class Whole:
    """A whole response (``respond``): head and body sent in one write once the handler returns it."""

    __slots__ = ("status", "reason", "headers", "body")

    def __init__(self, status: int, reason: str | None, headers: Mapping[str, str], body: bytes | None) -> None:
        self.status, self.reason, self.headers, self.body = status, reason, headers, body


class Http1Stream:
    """A streamed response whose head is written: chunked (HTTP/1.1, no length), length-delimited, or
    delimited by the connection's close (an HTTP/1.0 client, no length)."""

    __slots__ = ("_conn", "status", "chunked", "bodiless", "ended")

    def __init__(self, connection: Wire, status: int, *, chunked: bool, bodiless: bool) -> None:
        self._conn, self.status = connection, status
        self.chunked, self.bodiless, self.ended = chunked, bodiless, False

    async def write(self, data: bytes) -> None:
        if not data or self.bodiless:
            return
        transport = self._conn.live_transport()
        if self.chunked:
            transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            transport.write(data)
        await self._conn.drained()

    async def write_eof(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.chunked and not self.bodiless:
            self._conn.live_transport().write(b"0\r\n\r\n")
            await self._conn.drained()

