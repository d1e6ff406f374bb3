"""What both ends of an HTTP/2 connection share: the ``h2`` state machine and its configuration,
flow-controlled sends, the header list's encoding. ``server.py`` (the listeners) and
``sidecar.forward.http2`` (the upstreams) subclass :class:`H2Endpoint`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h2.config
import h2.connection
import h2.exceptions
from multidict import CIMultiDict, CIMultiDictProxy

# RFC 9113 §8.2.2: connection-specific fields are never sent on HTTP/2 (TE only as "trailers"); Host is :authority
CONNECTION_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade",
                                "te", "host"})


def encode_headers(headers: CIMultiDict[str] | dict[str, str] | CIMultiDictProxy[str],
                   **pseudo: str) -> list[tuple[bytes, bytes]]:
    """An HTTP/2 header list: pseudo-headers first, names lowercased, connection-specific ones left out.
    ``ValueError``: a name or value with CR, LF or NUL (a peer would reset the whole connection)."""
    block = [(b":" + name.encode(), value.encode()) for name, value in pseudo.items()]
    for name, value in headers.items():
        lower = name.lower()
        if lower not in CONNECTION_HEADERS:
            block.append((lower.encode("ascii"), value.encode("utf-8", "surrogateescape")))
    blob = b" ".join(part for field in block for part in field)  # one scan of every byte, not one per part
    if b"\r" in blob or b"\n" in blob or b"\0" in blob:
        raise ValueError("http2: a header would split the header block")
    return block


def h2_config(client_side: bool) -> h2.config.H2Configuration:
    """Bytes in and out (no decoding guesses), every header normalized by ``h2``. A client's responses are
    validated by ``h2``; a server validates each request itself (``server.py``), so that a malformed one is
    the stream error RFC 9113 §8.1.1 says it is, not the end of the connection."""
    return h2.config.H2Configuration(client_side=client_side, header_encoding=None,
                                     validate_inbound_headers=client_side, normalize_inbound_headers=True)


class H2Endpoint(asyncio.Protocol):
    """One HTTP/2 connection's frames, either side: what ``h2`` has to send goes out at :meth:`flush`."""

    def __init__(self, *, client_side: bool) -> None:
        self.h2 = h2.connection.H2Connection(config=h2_config(client_side=client_side))
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Any] = {}
        self.window = asyncio.Event()  # set whenever the peer may have opened a window (or changed settings)
        self._writable: asyncio.Future[None] | None = None
        self._flushing = False

    def flush(self) -> None:
        """Send what ``h2`` has queued, once, at the end of this loop iteration: the frames of every
        stream that spoke meanwhile go out in one write (a write per frame cost ~150 µs each)."""
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self.flush_now)

    def flush_now(self) -> None:
        """Send what ``h2`` has queued now (before a close)."""
        self._flushing = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def let_go(self) -> None:
        """The connection is gone: its ``h2`` state is freed now, by reference counting. An ``H2Connection``
        holds itself (its frame dispatch table is of its own bound methods), a cycle that only a full
        collection (rare, ``tune_gc``) frees, and every stream's state with it: about 100 KiB for a
        connection that carried 100 streams. Nothing reads frames after ``connection_lost``."""
        self.h2.streams.clear()
        table = getattr(self.h2, "_frame_dispatch_table", None)
        if isinstance(table, dict):
            table.clear()

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    def is_open(self, stream_id: int) -> bool:
        return self.transport is not None and stream_id in self.streams

    async def send_data(self, stream_id: int, data: bytes, stall: float) -> None:
        """``data`` as the peer's windows allow, minding the socket's buffer. ``TimeoutError``: the peer
        kept its window closed for ``stall``; ``ConnectionResetError``: the stream or connection is gone."""
        view = memoryview(data)
        try:
            while view:
                async with asyncio.timeout(stall):
                    size = await self._room(stream_id, len(view))
                self.h2.send_data(stream_id, view[:size].tobytes())
                view = view[size:]
                self.flush()
                if self._writable is not None:
                    await self._writable
        except h2.exceptions.ProtocolError:
            raise ConnectionResetError("http2: the stream is gone") from None

    async def _room(self, stream_id: int, wanted: int) -> int:
        """How much of ``wanted`` the windows let us send now, waiting while they are closed."""
        while True:
            if not self.is_open(stream_id):
                raise ConnectionResetError("http2: the stream is gone")
            room = self.h2.local_flow_control_window(stream_id)
            if room > 0:
                return min(wanted, room, self.h2.max_outbound_frame_size)
            self.window.clear()
            await self.window.wait()
