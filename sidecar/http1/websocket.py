"""The server end of a WebSocket on the listeners' own HTTP/1.1 server, after its ``101``.

aiohttp's frame reader and writer (the ones its ``WebSocketResponse`` uses) over our transport:
the same frame parsing, size limit (4 MiB a message, close code 1009 past it), masking rules and
close codes as before. Pings are answered, a close frame is answered with a close frame, and the
connection closes once the closing handshake is over (or ``CLOSE_TIMEOUT`` after our close).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
from aiohttp._websocket.reader import WebSocketDataQueue
from aiohttp.http_websocket import (
    WS_CLOSED_MESSAGE, WS_CLOSING_MESSAGE, WS_KEY, WebSocketError, WebSocketReader, WebSocketWriter, WSCloseCode, WSMessage, WSMessageTextBytes, WSMsgType,
)
from aiohttp.streams import EofStream
from multidict import CIMultiDictProxy

from sidecar.errors import RequestRefused
from sidecar.http1.response import Wire

MAX_MESSAGE = 4 * 1024 * 1024  # as aiohttp's WebSocketResponse
CLOSE_TIMEOUT = 10.0  # seconds our close waits for the client's
QUEUE_LIMIT = 64 * 1024


def accept_key(headers: CIMultiDictProxy[str]) -> str:
    """``Sec-WebSocket-Accept`` for the client's handshake (RFC 6455 §4.2.1); bad_request if it is not one."""
    if headers.get("Sec-WebSocket-Version", "") not in ("13", "8", "7"):
        raise RequestRefused("bad_request", "websocket: expected Sec-WebSocket-Version 13")
    key = headers.get("Sec-WebSocket-Key", "")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except (binascii.Error, ValueError):
        raise RequestRefused("bad_request", "websocket: expected a 16-byte base64 Sec-WebSocket-Key") from None
    return base64.b64encode(hashlib.sha1(key.encode() + WS_KEY).digest()).decode()


class ServerWebSocket:
    """What ``forward/websocket.py`` relays: ``receive``, ``send_str``, ``send_bytes``, ``close``."""

    def __init__(self, connection: Wire) -> None:
        transport = connection.live_transport()
        self._conn = connection
        self._queue = WebSocketDataQueue(connection, QUEUE_LIMIT, loop=asyncio.get_running_loop())
        self.reader = WebSocketReader(self._queue, MAX_MESSAGE, compress=False, decode_text=True)
        self._writer = WebSocketWriter(connection, transport)
        self._closed = self._closing = False  # closed: our close frame sent; closing: the client's received
        self._receiving = False
        self._receive_over: asyncio.Future[None] | None = None
        self.close_code: int | None = None

    def feed_data(self, data: bytes) -> None:
        self.reader.feed_data(data)

    def feed_eof(self) -> None:
        self.reader.feed_eof()

    async def receive(self) -> WSMessage | WSMessageTextBytes:
        while True:
            if self._closed:
                return WS_CLOSED_MESSAGE
            self._receiving = True
            try:
                message = await self._queue.read()
            except EofStream:
                self._closed = True
                self._conn.close()
                return WS_CLOSED_MESSAGE
            except WebSocketError as exc:  # a frame that breaks the protocol, or one past the size limit
                await self.close(code=exc.code)
                return WSMessage(WSMsgType.ERROR, exc, None)
            except ConnectionError as exc:
                self._closed = True
                return WSMessage(WSMsgType.ERROR, exc, None)
            finally:
                self._receiving = False
                if self._receive_over is not None and not self._receive_over.done():
                    self._receive_over.set_result(None)
            if message.type is WSMsgType.PING:
                await self._send(message.data, WSMsgType.PONG)
                continue
            if message.type is WSMsgType.PONG:
                continue
            if message.type is WSMsgType.CLOSE:
                self._closing = True
                await self.close(code=message.data if isinstance(message.data, int) else WSCloseCode.OK)
            return message  # CLOSING: our own close ended this receive (as aiohttp's WebSocketResponse)

    async def send_str(self, data: str) -> None:
        await self._send(data.encode("utf-8"), WSMsgType.TEXT)

    async def send_bytes(self, data: bytes) -> None:
        await self._send(data, WSMsgType.BINARY)

    async def _send(self, data: bytes, opcode: int) -> None:
        if self._closed or self._conn.transport is None:
            raise ConnectionResetError("websocket: the client has gone")
        await self._writer.send_frame(data, opcode)

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"") -> bool:
        """Send our close frame (once); a receive in progress ends with CLOSING; unless the client already
        sent its close, it is awaited (``CLOSE_TIMEOUT``); then the connection closes."""
        if self._closed:
            return False
        self._closed = True
        try:
            if self._conn.transport is None:
                return True
            await self._writer.close(code, message)
            if self._receiving:
                self._receive_over = asyncio.get_running_loop().create_future()
                self._queue.feed_data(WS_CLOSING_MESSAGE, 0)
                await self._receive_over
            if not self._closing:
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    while (await self._queue.read()).type is not WSMsgType.CLOSE:
                        pass
        except (ConnectionError, EofStream, WebSocketError, TimeoutError):
            pass
        finally:
            self._conn.close()
        return True
