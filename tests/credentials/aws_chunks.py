"""Signed aws-chunked bodies for the tests, written from AWS's description and independent of the sidecar's
code: :func:`framed` writes what an agent sends (its chunks signed with its own key), :func:`verified` checks
every chunk and trailer signature of what an upstream received and returns the decoded object."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import zlib
from dataclasses import dataclass

EMPTY = hashlib.sha256(b"").hexdigest()
CHUNK = 64 * 1024
PAYLOAD = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
_HEAD = re.compile(rb"([0-9a-f]+);chunk-signature=([0-9a-f]{64})\r\n")


def derived_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


@dataclass
class Chain:
    """One upload's chained signatures under a key (the agent's placeholder, or the sidecar's)."""

    key: bytes
    date_time: str
    scope: str
    previous: str  # the seed: the request's own signature

    def chunk(self, data: bytes) -> str:
        text = "\n".join(["AWS4-HMAC-SHA256-PAYLOAD", self.date_time, self.scope, self.previous, EMPTY,
                          hashlib.sha256(data).hexdigest()])
        return self._next(text)

    def trailer(self, name: str, value: str) -> str:
        canonical = f"{name}:{value}\n".encode()
        text = "\n".join(["AWS4-HMAC-SHA256-TRAILER", self.date_time, self.scope, self.previous,
                          hashlib.sha256(canonical).hexdigest()])
        return self._next(text)

    def _next(self, text: str) -> str:
        self.previous = hmac.new(self.key, text.encode(), hashlib.sha256).hexdigest()
        return self.previous


def agent_chain(seed: str = "0" * 64) -> Chain:
    """The agent's chain: its placeholder key, its own idea of the time (the sidecar ignores both)."""
    date = "20260101"
    return Chain(derived_key("agent-placeholder-secret", date, "us-east-1", "s3"), f"{date}T000000Z",
                 f"{date}/us-east-1/s3/aws4_request", seed)


def crc32(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def framed(data: bytes, chain: Chain, *, chunk: int = CHUNK, trailer: tuple[str, str] | None = None) -> bytes:
    """A signed aws-chunked body: each chunk, the final empty one, then the signed trailer if any."""
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)] + [b""]
    out = [b"%x;chunk-signature=%s\r\n%b\r\n" % (len(p), chain.chunk(p).encode(), p) for p in pieces]
    if trailer is None:
        return b"".join(out)
    name, value = trailer
    signature = chain.trailer(name, value)
    out[-1] = out[-1][:-2]  # the final chunk's empty line comes after the trailer
    return b"".join(out) + f"{name}:{value}\r\nx-amz-trailer-signature:{signature}\r\n\r\n".encode()


def verified(body: bytes, chain: Chain, trailer: str | None = None) -> bytes:
    """The object a signed aws-chunked body decodes to, each signature checked against ``chain``."""
    data, at = bytearray(), 0
    while True:
        head = _HEAD.match(body, at)
        assert head, f"no chunk head at byte {at}"
        size, at = int(head.group(1), 16), head.end()
        assert head.group(2).decode() == chain.chunk(body[at:at + size]), f"chunk signature at {head.start()}"
        data += body[at:at + size]
        at += size
        if size == 0:
            break
        assert body[at:at + 2] == b"\r\n"
        at += 2
    rest = body[at:]
    if trailer is None:
        assert rest == b"\r\n"
        return bytes(data)
    match = re.fullmatch(rb"([a-z0-9-]+):(\S+)\r\nx-amz-trailer-signature:([0-9a-f]{64})\r\n\r\n", rest)
    assert match and match.group(1).decode() == trailer, rest[:200]
    assert match.group(3).decode() == chain.trailer(trailer, match.group(2).decode()), "trailer signature"
    return bytes(data)
