"""Server-sent events read as they pass: the data of each complete event, for observers that only look.

Observers of a streamed answer (A2A task ids, LLM usage) read each event's ``data`` as it goes by
and never change a byte; the relay sends the chunks on as they came. Lines end in CRLF, LF or a bare
CR (the WHATWG grammar allows all three, and a CRLF split across two chunks is one line ending); an
event ends at a blank line. Of a ``data`` field one leading space is dropped; an event without a
``data`` field is not dispatched. A partial event waits for the next chunk, within a bound: one larger
than ``max_bytes`` is dropped unread.
"""

from __future__ import annotations

from collections.abc import Iterator

MAX_EVENT_BYTES = 4 * 1024 * 1024


def _data(event: bytes) -> bytes | None:
    """The joined data lines of one event (LF line endings), or None when it has no data field."""
    values = [line[5:].removeprefix(b" ") if line.startswith(b"data:") else b""
              for line in event.split(b"\n") if line.startswith(b"data:") or line == b"data"]
    return b"\n".join(values) if values else None


class SseData:
    """Feeds chunks of an event stream; yields the joined ``data`` lines of every complete event."""

    def __init__(self, max_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = b""
        self._max = max_bytes
        self._after_cr = False  # the last chunk ended in CR: an LF opening this one belongs to it

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        if chunk:
            self._after_cr = chunk.endswith(b"\r")
        text = (self._buffer + chunk).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        while (end := text.find(b"\n\n")) >= 0:
            event, text = text[:end], text[end + 2:]
            data = _data(event)
            if data is not None:
                yield data
        self._buffer = text if len(text) <= self._max else b""
