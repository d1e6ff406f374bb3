"""HTTP/2's own attacks on a listener, each bounded per connection (issue 17 item 5).

What the peer makes us do per frame is counted against a budget per window; past it the connection
ends with GOAWAY ``ENHANCE_YOUR_CALM``, is recorded as one ``protocol_abuse`` refusal (its kind in the
detail) and counted in ``sidecar_http2_abuse_total{listener,kind}``; other connections go on.

- ``rapid_reset`` (CVE-2023-44487): streams the client opens and resets at once each start an
  exchange; at most ``resets`` RST_STREAM per ``window`` seconds.
- ``settings`` and ``ping``: each SETTINGS and PING is acknowledged (frames we write unasked);
  ``control``: PRIORITY frames and empty DATA frames, which cost a dispatch and carry nothing.
- ``continuation`` (CVE-2024-27316): a header block's bytes across HEADERS and CONTINUATION frames are
  bounded by the header list size we advertise, counted as they arrive, before any of it is decoded
  (``h2`` alone bounds the number of frames, 64 of up to 16 KiB each).
- ``header_list``: an HPACK block decoding past that size (an HPACK bomb); ``h2`` stops decoding at
  the bound, the connection cannot go on (the peer's HPACK state is ahead of ours).
- ``window_stall``: a response stream whose window the client keeps closed past ``stall`` seconds is
  reset alone (its exchange cut); its bytes wait upstream, not here.
"""

from __future__ import annotations

import time

import h2.exceptions
from h2.frame_buffer import FrameBuffer
from hyperframe.frame import Frame

from sidecar.http2.front import Bounds

__all__ = ["KINDS", "Abuse", "BoundedFrames", "Bounds", "Budget"]

KINDS = ("rapid_reset", "settings", "ping", "control", "continuation", "header_list", "window_stall")


class Abuse(h2.exceptions.DenialOfServiceError):
    """A bound exceeded: ``h2`` answers it with GOAWAY ``ENHANCE_YOUR_CALM``."""

    def __init__(self, kind: str, what: str) -> None:
        super().__init__(what)
        self.kind, self.what = kind, what


class Budget:
    """The frames of each kind counted in the current window (a fixed window: cheap, and a burst of
    twice the bound across a window's edge is still bounded)."""

    def __init__(self, bounds: Bounds) -> None:
        self.bounds = bounds
        self._limits = {"rapid_reset": bounds.resets, "settings": bounds.settings, "ping": bounds.pings,
                        "control": bounds.control}
        self._counts = dict.fromkeys(self._limits, 0)
        self._start = time.monotonic()

    def spend(self, kind: str) -> None:
        """One more frame of ``kind``; raises :class:`Abuse` past the bound."""
        now = time.monotonic()
        if now - self._start >= self.bounds.window:
            self._start, self._counts = now, dict.fromkeys(self._limits, 0)
        count = self._counts[kind] = self._counts[kind] + 1
        if count > self._limits[kind]:
            raise Abuse(kind, f"more than {self._limits[kind]} {kind.replace('_', ' ')} frames in "
                              f"{self.bounds.window:g} s")


class BoundedFrames(FrameBuffer):
    """``h2``'s frame buffer (server side), with a header block's bytes bounded across CONTINUATIONs."""

    def __init__(self, header_block_bytes: int) -> None:
        super().__init__(server=True)
        self.header_block_bytes = header_block_bytes
        self._block = 0

    def _update_header_buffer(self, f: Frame | None) -> Frame | None:
        buffered = bool(self._headers_buffer)
        result = super()._update_header_buffer(f)
        if not self._headers_buffer:  # the block ended (or never began): nothing held
            self._block = 0
            return result
        if f is not None:
            self._block = self._block + len(getattr(f, "data", b"")) if buffered else len(getattr(f, "data", b""))
        if self._block > self.header_block_bytes:
            raise Abuse("continuation", f"a header block of more than {self.header_block_bytes} bytes "
                                        "across CONTINUATION frames")
        return result
