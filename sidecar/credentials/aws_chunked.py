"""Signed ``aws-chunked`` uploads, re-signed chunk by chunk with the sidecar's key as they stream.

An upload declared ``X-Amz-Content-Sha256: STREAMING-AWS4-HMAC-SHA256-PAYLOAD`` (or ``-TRAILER``)
carries a signature per chunk, chained from the request's own signature (AWS S3 API reference,
"Transferring Payload in Multiple Chunks" and "Signature calculations for trailing headers")::

    chunk    = SIZE ";chunk-signature=" SIG CRLF DATA CRLF      SIZE hex, DATA SIZE bytes
    final    = SIZE(0) ";chunk-signature=" SIG CRLF
    trailers = (NAME ":" VALUE CRLF)* "x-amz-trailer-signature:" SIG CRLF      -TRAILER only
    body     = chunk* final trailers? CRLF

The agent's signatures were made with its placeholder key: :class:`ChunkResigner` decodes the
framing as it arrives and writes each chunk with the sidecar's signature in place of the agent's,
seeded from the re-signed head and chained (the trailer's too). Sizes, data and trailer lines go
on byte for byte, so the framed length (the agent's ``Content-Length``) is unchanged.

Memory is one chunk (at most :data:`MAX_CHUNK`): a chunk's signature precedes its data, so the
whole chunk is held until it has been hashed. The final chunk and the trailer are held until the
body has ended, so an upload that breaks its framing anywhere (a chunk longer than its size, a
decoded length other than ``X-Amz-Decoded-Content-Length``, an undeclared trailer, bytes after
the end) is refused, ``aws_chunked_invalid`` 400, before the upstream has a complete body.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sidecar.credentials.sigv4 import ChunkSigner
from sidecar.errors import RequestRefused

MAX_CHUNK = 1024 * 1024  # SDKs write 8-128 KiB chunks; one chunk is what an upload holds in memory
_MAX_LINE = 256  # a chunk head is under 90 bytes, a checksum trailer line under 80
_CRLF = b"\r\n"
_HEAD = re.compile(rb"([0-9a-fA-F]{1,8});chunk-signature=[0-9a-f]{64}")
_TRAILER = re.compile(rb"(x-amz-[a-z0-9-]{1,64}):([A-Za-z0-9+/=]{1,128})")  # checksums: base64 values
_TRAILER_SIGNATURE = re.compile(rb"x-amz-trailer-signature:[0-9a-f]{64}")
_SIGNATURE_FIELD = b";chunk-signature="


@dataclass(frozen=True, slots=True)
class SignedUpload:
    """What the agent declared of a signed streaming upload."""

    mode: str  # STREAMING-AWS4-HMAC-SHA256-PAYLOAD or ...-TRAILER
    decoded_length: int  # X-Amz-Decoded-Content-Length
    trailers: frozenset[str]  # X-Amz-Trailer's names (the -TRAILER mode only), lowercase

    @property
    def trailing(self) -> bool:
        return self.mode.endswith("-TRAILER")


class ChunkResigner:
    """One signed upload's framing, decoded and re-signed as it arrives (a :class:`~sidecar.http.reframe.Reframer`)."""

    def __init__(self, upload: SignedUpload, signer: ChunkSigner) -> None:
        self._upload, self._signer = upload, signer
        self._buffer = bytearray()
        self._state = self._head
        self._token = b""  # the current chunk's size, as the agent spelled it
        self._size = 0
        self._decoded = 0
        self._chunks = 0
        self._trailers: dict[bytes, bytes] = {}
        self._lines: list[bytes] = []  # the trailer lines as received, forwarded unchanged
        self._final: bytes | None = None  # the final chunk and trailer, held until the body ends

    def __repr__(self) -> str:
        return f"ChunkResigner({self._upload.mode}, chunks={self._chunks})"

    def feed(self, data: bytes) -> bytes:
        if self._final is not None and data:
            raise self._refused("has bytes after the end of its framing")
        self._buffer += data
        out = []
        while (piece := self._state()) is not None:
            out.append(piece)
        return b"".join(out)

    def end(self) -> bytes:
        if self._final is None:
            raise self._refused(f"ended inside its framing (after {self._chunks} chunks, "
                                f"{self._decoded} decoded bytes)")
        return self._final

    # --- states: each returns what may be sent, or None when it needs more bytes ------------

    def _line(self) -> bytes | None:
        end = self._buffer.find(_CRLF, 0, _MAX_LINE + 2)
        if end < 0:
            if len(self._buffer) > _MAX_LINE:
                raise self._refused(f"has a line of more than {_MAX_LINE} bytes where a chunk head or trailer "
                                    f"was due")
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[:end + 2]
        return line

    def _head(self) -> bytes | None:
        line = self._line()
        if line is None:
            return None
        head = _HEAD.fullmatch(line)
        if head is None:
            raise self._refused(f"has a malformed head for chunk {self._chunks + 1}")
        self._token, self._size = head.group(1), int(head.group(1), 16)
        if self._size > MAX_CHUNK:
            raise self._refused(f"has a chunk of {self._size} bytes, over the {MAX_CHUNK} the sidecar re-signs")
        if self._decoded + self._size > self._upload.decoded_length:
            raise self._refused(f"decodes to more than X-Amz-Decoded-Content-Length "
                                f"({self._upload.decoded_length} bytes)")
        self._state = self._data if self._size else self._last
        return b""

    def _data(self) -> bytes | None:
        size = self._size
        if len(self._buffer) < size + 2:
            return None
        if self._buffer[size:size + 2] != _CRLF:
            raise self._refused(f"has a chunk {self._chunks + 1} longer than its declared size ({size} bytes)")
        with memoryview(self._buffer) as view:
            data = view[:size]
            signature = self._signer.chunk(data).encode()
            piece = b"".join((self._token, _SIGNATURE_FIELD, signature, _CRLF, data, _CRLF))
            data.release()
        del self._buffer[:size + 2]
        self._chunks += 1
        self._decoded += size
        self._state = self._head
        return piece

    def _last(self) -> bytes | None:
        """The final (empty) chunk's head has come: the decoded length must be complete."""
        if self._decoded != self._upload.decoded_length:
            raise self._refused(f"decodes to {self._decoded} bytes, not X-Amz-Decoded-Content-Length "
                                f"({self._upload.decoded_length})")
        self._signer.chunk(b"")
        self._state = self._trailer if self._upload.trailing else self._close
        return b""

    def _trailer(self) -> bytes | None:
        line = self._line()
        if line is None:
            return None
        if _TRAILER_SIGNATURE.fullmatch(line):
            self._state = self._close
            return b""
        trailer = _TRAILER.fullmatch(line)
        if trailer is None:
            raise self._refused("has a malformed trailer line; expected name:value with a name X-Amz-Trailer "
                                "declares")
        name = trailer.group(1)
        if name.decode() not in self._upload.trailers or name in self._trailers:
            raise self._refused(f"has a trailer {name.decode()} that X-Amz-Trailer does not declare, or twice")
        self._trailers[name] = trailer.group(2)
        self._lines.append(line + _CRLF)
        return b""

    def _close(self) -> bytes | None:
        if len(self._buffer) < 2:
            return None
        if self._buffer[:2] != _CRLF:
            raise self._refused("does not end with an empty line after its final chunk")
        del self._buffer[:2]
        if len(self._trailers) != len(self._upload.trailers):
            raise self._refused("lacks a trailer X-Amz-Trailer declares, or its x-amz-trailer-signature")
        self._final = self._closing()
        if self._buffer:
            raise self._refused("has bytes after the end of its framing")
        self._state = self._done
        return b""

    def _closing(self) -> bytes:
        """The final chunk and the trailer, with the sidecar's signatures (chained from the last chunk)."""
        final_signature = self._signer.previous.encode()
        pieces = [self._token, _SIGNATURE_FIELD, final_signature, _CRLF, *self._lines]
        if self._upload.trailing:
            canonical = b"".join(name + b":" + self._trailers[name] + b"\n" for name in sorted(self._trailers))
            pieces += [b"x-amz-trailer-signature:", self._signer.trailer(canonical).encode(), _CRLF]
        return b"".join(pieces) + _CRLF

    def _done(self) -> bytes | None:
        if self._buffer:
            raise self._refused("has bytes after the end of its framing")
        return None

    def _refused(self, problem: str) -> RequestRefused:
        return RequestRefused("aws_chunked_invalid", f"credentials: the {self._upload.mode} upload {problem}; "
                                                     f"expected aws-chunked framing (<hex size>;chunk-signature="
                                                     f"<64 hex>, the data, CRLF) decoding to "
                                                     f"X-Amz-Decoded-Content-Length bytes")
