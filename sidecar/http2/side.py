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
import hpack
from hpack import NeverIndexedHeaderTuple
from multidict import CIMultiDict, CIMultiDictProxy

# RFC 9113 §8.2.2: connection-specific fields are never sent on HTTP/2 (TE only as "trailers"); Host is :authority
CONNECTION_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade",
                                "te", "host"})
# kept out of the HPACK compression context (RFC 7541 §7.1.3), as h2's outbound normalization would keep them
NEVER_INDEXED = frozenset({b"authorization", b"proxy-authorization",
                           # and values new on every request: indexed, each would push a field that repeats
                           # out of the dynamic table (and make every header block's encoding a new one)
                           b"traceparent", b"tracestate", b"grpc-timeout"})
SHORT_COOKIE = 20  # a cookie shorter than this is never indexed either (h2's, after Firefox and nghttp2)
MEMO_FIELDS = 256  # fields whose encoding MemoEncoder keeps, per connection (each in the table: 4 KiB in all)
MEMO_BLOCKS = 32  # header blocks MemoDecoder keeps, per connection,
MEMO_BLOCK_BYTES = 1024  # each of at most this many bytes of fields: 32 KiB a connection at most


class MemoEncoder(hpack.Encoder):
    """HPACK's encoder, remembering each field's encoding while the dynamic table stays as it was.

    A field's bytes depend only on the table (its index there, or its name's), so they stay right until
    the table changes: a field added to it (a literal with incremental indexing) or a new table size.
    Then everything remembered is forgotten. Only indexed fields are kept (tiny, each in a table; not a
    literal: a credential, or a value new every time). The fields of a gRPC call repeat (the same
    method, content type, status, trailers), so after the first calls each is a dictionary look-up
    instead of ``hpack``'s search of its tables in Python (several µs a field)."""

    def __init__(self) -> None:
        super().__init__()
        self._memo: dict[tuple[bytes, bytes, bool, bool], bytes] = {}

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        if self.header_table.resized:  # a new size: indexes moved (hpack signals it in this block)
            self._memo.clear()
        return super().encode(headers, huffman)

    def add(self, to_add: tuple[bytes, bytes], sensitive: bool, huffman: bool = False) -> bytes:
        key = (to_add[0], to_add[1], sensitive, huffman)
        if (known := self._memo.get(key)) is not None:
            return known
        encoded = super().add(to_add, sensitive, huffman)
        if encoded[0] & 0xC0 == 0x40:  # a literal with incremental indexing: the table changed
            self._memo.clear()
        elif encoded[0] & 0x80 and len(self._memo) < MEMO_FIELDS:  # indexed: the field is in a table
            self._memo[key] = encoded  # (a literal, a credential or a value new each time, is not kept)
        return encoded


class MemoDecoder(hpack.Decoder):
    """HPACK's decoder, remembering a whole block's fields while the dynamic table stays as it was: the
    upstream side's (``H2Client``), where an upstream's response heads and trailers repeat byte for byte.

    A block that neither adds to the table nor resizes it (only indexed fields and literals not
    indexed: an upstream's response head and trailers after its first answer) decodes to the same
    fields as long as the table is unchanged; any block that changes it forgets every block
    remembered, and so does a new bound (``max_header_list_size``, the table size allowed), so what
    was checked against one bound is never handed out under another. At most ``MEMO_BLOCKS`` blocks of
    ``MEMO_BLOCK_BYTES`` each, none with a never-indexed field (a credential is not kept for later)."""

    def __init__(self, max_header_list_size: int) -> None:
        super().__init__(max_header_list_size)
        self._memo: dict[tuple[bytes, bool], list[Any]] = {}
        self._bounds = (self.max_header_list_size, self.max_allowed_table_size)

    def decode(self, data: bytes, raw: bool = False) -> Any:
        bounds = (self.max_header_list_size, self.max_allowed_table_size)
        if bounds != self._bounds:
            self._memo.clear()
            self._bounds = bounds
        key = (bytes(data), raw)
        if (known := self._memo.get(key)) is not None:
            return list(known)
        table = self.header_table
        entries = table.dynamic_entries
        before = (table.maxsize, len(entries), entries[0] if entries else None)
        headers = list(super().decode(data, raw))
        if (table.maxsize, len(entries)) != before[:2] or (entries[0] if entries else None) is not before[2]:
            self._memo.clear()  # the table changed: indexes moved
        elif len(self._memo) < MEMO_BLOCKS and sum(len(n) + len(v) for n, v in headers) <= MEMO_BLOCK_BYTES \
                and not any(isinstance(field, NeverIndexedHeaderTuple) for field in headers):
            self._memo[key] = list(headers)
        return headers


def encode_headers(headers: CIMultiDict[str] | dict[str, str] | CIMultiDictProxy[str],
                   **pseudo: str) -> list[tuple[bytes, bytes]]:
    """An HTTP/2 header list, in the one pass that replaces ``h2``'s outbound normalization and validation
    (both off, :func:`h2_config`): pseudo-headers first (only those given here), names lowercased,
    connection-specific fields left out, values without surrounding whitespace, credentials and short
    cookies never indexed. ``ValueError``: an empty name, a name starting with ``:``, an empty ``:path``,
    or a name or value with CR, LF or NUL (a peer would reset the whole connection)."""
    block = [(b":" + name.encode(), value.encode()) for name, value in pseudo.items()]
    for name, value in headers.items():
        lower = name.lower()
        if lower in CONNECTION_HEADERS:
            continue
        if not lower or lower[0] == ":":
            raise ValueError("http2: an empty or pseudo-header name among the fields")
        key, raw = lower.encode("ascii"), value.encode("utf-8", "surrogateescape").strip()
        if key in NEVER_INDEXED or key == b"cookie" and len(raw) < SHORT_COOKIE:
            block.append(NeverIndexedHeaderTuple(key, raw))
        else:
            block.append((key, raw))
    blob = b" ".join(part for field in block for part in field)  # one scan of every byte, not one per part
    if blob.find(b"\r") != -1 or blob.find(b"\n") != -1 or blob.find(b"\0") != -1 or pseudo.get("path") == "":
        raise ValueError("http2: a header would split the header block")
    return block


def h2_config(client_side: bool) -> h2.config.H2Configuration:
    """Bytes in and out (no decoding guesses). What we send is normalized and checked by
    :func:`encode_headers` (``h2``'s own outbound passes, a chain of generators over every field, were
    10-15 % of ``h2``'s work to send a gRPC call's header blocks): the pseudo-headers are ours, so the rest of ``h2``'s outbound validation
    (their order, ``te``, connection-specific fields, ``:authority``) holds by construction. A client's
    responses are validated by ``h2``; a server validates each request itself (``server.py``), so that a
    malformed one is the stream error RFC 9113 §8.1.1 says it is, not the end of the connection."""
    return h2.config.H2Configuration(client_side=client_side, header_encoding=None,
                                     validate_outbound_headers=False, normalize_outbound_headers=False,
                                     validate_inbound_headers=client_side, normalize_inbound_headers=True)


class H2Endpoint(asyncio.Protocol):
    """One HTTP/2 connection's frames, either side: what ``h2`` has to send goes out at :meth:`flush`."""

    def __init__(self, *, client_side: bool) -> None:
        self.h2 = h2.connection.H2Connection(config=h2_config(client_side=client_side))
        self.h2.encoder = MemoEncoder()
        if client_side:  # an upstream's answers repeat; a caller's requests differ (and carry its credentials)
            self.h2.decoder = MemoDecoder(self.h2.decoder.max_header_list_size)
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
        kept its window closed for ``stall``; ``ConnectionResetError``: the stream or connection is gone.
        A timer is armed only while a window is closed (``asyncio.timeout`` was ~5 % of a unary gRPC call's
        profile, one per frame sent and read)."""
        view = memoryview(data)
        try:
            while view:
                size = self._room_now(stream_id, len(view))
                if not size:
                    async with asyncio.timeout(stall):
                        size = await self._room(stream_id, len(view))
                self.h2.send_data(stream_id, data if size == len(data) and type(data) is bytes else view[:size].tobytes())
                view = view[size:]
                self.flush()
                if self._writable is not None:
                    await self._writable
        except h2.exceptions.ProtocolError:
            raise ConnectionResetError("http2: the stream is gone") from None

    def _room_now(self, stream_id: int, wanted: int) -> int:
        """How much of ``wanted`` the windows let us send now (0: closed)."""
        if not self.is_open(stream_id):
            raise ConnectionResetError("http2: the stream is gone")
        room = self.h2.local_flow_control_window(stream_id)
        return min(wanted, room, self.h2.max_outbound_frame_size) if room > 0 else 0

    async def _room(self, stream_id: int, wanted: int) -> int:
        """How much of ``wanted`` the windows let us send, waiting while they are closed."""
        while not (size := self._room_now(stream_id, wanted)):
            self.window.clear()
            await self.window.wait()
        return size
