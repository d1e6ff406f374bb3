"""Server-sent events read as they pass: the data of each complete event, for observers that only look.

Observers of a streamed answer (A2A task ids, LLM usage) read each event's ``data`` as it goes by
and never change a byte; the relay sends the chunks on as they came. Lines may end in CRLF or LF
(the SSE grammar allows both); an event ends at a blank line. A partial event waits for the next
chunk, within a bound: one larger than ``max_bytes`` is dropped unread.
"""

from __future__ import annotations

from collections.abc import Iterator

MAX_EVENT_BYTES = 4 * 1024 * 1024


class SseData:
    """Feeds chunks of an event stream; yields the joined ``data`` lines of every complete event."""

    def __init__(self, max_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_bytes

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        self._buffer += chunk
        normalized = self._buffer.replace(b"\r\n", b"\n")
        while (end := normalized.find(b"\n\n")) >= 0:
            event, normalized = bytes(normalized[:end]), normalized[end + 2:]
            yield b"\n".join(line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:"))
        self._buffer = normalized if len(normalized) <= self._max else bytearray()
