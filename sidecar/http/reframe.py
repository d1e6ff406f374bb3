"""A body rewritten as it streams: the seam between a signer that must re-frame what it signs (S3's
signed aws-chunked uploads) and the forwarder that sends it.

    out = reframer.feed(piece)   # what may go upstream now (b"" until a unit is complete)
    out = reframer.end()         # the sender's body ended: the rest, or RequestRefused

A reframer holds at most one unit of the body (one chunk), never the whole of it, and raises
:class:`~sidecar.errors.RequestRefused` for framing it cannot rewrite faithfully: the forwarder
then stops sending, so the upstream never sees a complete body.
"""

from __future__ import annotations

from typing import Protocol


class Reframer(Protocol):
    def feed(self, data: bytes) -> bytes:
        """The rewritten bytes ready to send after ``data`` (possibly ``b""``)."""
        ...

    def end(self) -> bytes:
        """The last rewritten bytes, once the body is complete and checked."""
        ...
