"""Signed aws-chunked uploads re-signed chunk by chunk: against AWS's published streaming examples
(tests/credentials/vectors/aws-sigv4-streaming, from the S3 API reference), and every way the framing
can be broken refused before the upstream could have a complete body (issue 14 item 1)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from sidecar.credentials.aws_chunked import MAX_CHUNK, ChunkResigner, SignedUpload
from sidecar.credentials.sigv4 import AwsCredentials, chunk_signer, signing_steps
from sidecar.errors import RequestRefused
from tests.credentials.aws_chunks import PAYLOAD, TRAILER, Chain, agent_chain, crc32, derived_key, framed, verified

VECTORS = json.loads((Path(__file__).parent / "vectors" / "aws-sigv4-streaming" / "streaming.json").read_text())
EXAMPLE_TIME = datetime(2013, 5, 24, tzinfo=timezone.utc)
EXAMPLE_KEY = AwsCredentials(VECTORS["access_key_id"], VECTORS["secret_access_key"])


def example_steps(example: dict):
    headers = [(name, value) for name, value in example["headers"]]
    return signing_steps(VECTORS["method"], VECTORS["host"], VECTORS["path"], "", headers,
                         example["x_amz_content_sha256"], EXAMPLE_KEY, VECTORS["region"], VECTORS["service"],
                         EXAMPLE_TIME)


def example_body(example: dict) -> bytes:
    """The body AWS shows, rebuilt from its sizes and signatures."""
    sizes = [*VECTORS["chunk_sizes"], 0]
    body = b"".join(b"%x;chunk-signature=%s\r\n%b\r\n" % (size, sig.encode(), b"a" * size)
                    for size, sig in zip(sizes, example["chunk_signatures"]))
    if "trailer" not in example:
        return body
    name, value = example["trailer"]
    return body[:-2] + f"{name}:{value}\r\nx-amz-trailer-signature:{example['trailer_signature']}\r\n\r\n".encode()


def upload_of(mode: str, decoded: int, trailers: frozenset[str] = frozenset()) -> SignedUpload:
    return SignedUpload(mode, decoded, trailers)


def resigner(mode: str = PAYLOAD, decoded: int = 66560, trailers: frozenset[str] = frozenset(),
             seed: str = "1" * 64) -> ChunkResigner:
    steps = example_steps(VECTORS["examples"]["payload"])
    signer = chunk_signer(steps, EXAMPLE_KEY, "us-east-1", "s3")
    signer.previous = seed
    return ChunkResigner(upload_of(mode, decoded, trailers), signer)


def run(resign: ChunkResigner, body: bytes, piece: int = 1000) -> bytes:
    out = [resign.feed(body[i:i + piece]) for i in range(0, len(body), piece)]
    return b"".join(out) + resign.end()


@pytest.mark.parametrize("name", VECTORS["examples"])
def test_the_seed_and_every_chunk_signature_are_awss(name):
    """The head signs to AWS's seed signature, and the chain gives AWS's chunk (and trailer) signatures."""
    example = VECTORS["examples"][name]
    steps = example_steps(example)
    assert steps.signature == example["seed_signature"]
    assert f"SignedHeaders={example['signed_headers']}," in dict(steps.headers)["Authorization"]
    signer = chunk_signer(steps, EXAMPLE_KEY, VECTORS["region"], VECTORS["service"])
    chain = [signer.chunk(b"a" * size) for size in [*VECTORS["chunk_sizes"], 0]]
    assert chain == example["chunk_signatures"]
    if "trailer" in example:
        name_, value = example["trailer"]
        assert signer.trailer(f"{name_}:{value}\n".encode()) == example["trailer_signature"]


@pytest.mark.parametrize("name", VECTORS["examples"])
@pytest.mark.parametrize("piece", [1, 7, 4096, 70_000])  # how the agent's bytes happen to arrive
def test_an_agents_upload_is_rewritten_into_awss_example_byte_for_byte(name, piece):
    """The agent's chunks, signed with its own key, come out as the body AWS publishes for the example key."""
    example = VECTORS["examples"][name]
    trailer = tuple(example["trailer"]) if "trailer" in example else None
    agent = framed(b"a" * 66560, agent_chain(), chunk=65536, trailer=trailer)
    steps = example_steps(example)
    upload = SignedUpload(example["x_amz_content_sha256"], 66560,
                          frozenset({trailer[0]}) if trailer else frozenset())
    resign = ChunkResigner(upload, chunk_signer(steps, EXAMPLE_KEY, VECTORS["region"], VECTORS["service"]))
    body = run(resign, agent, piece)
    assert body == example_body(example)
    assert len(body) == len(agent)  # the framed length (the agent's Content-Length) is unchanged
    if name == "payload":
        assert len(body) == example["content_length"]


def test_the_independent_verifier_agrees_with_aws():
    """The tests' own chunk verifier (tests/credentials/aws_chunks.py) accepts AWS's example body."""
    example = VECTORS["examples"]["trailer"]
    chain = Chain(derived_key(VECTORS["secret_access_key"], "20130524", "us-east-1", "s3"), VECTORS["time"],
                  "20130524/us-east-1/s3/aws4_request", example["seed_signature"])
    assert verified(example_body(example), chain, "x-amz-checksum-crc32c") == b"a" * 66560


def body_of(data: bytes, *, trailer: bool = False) -> bytes:
    return framed(data, agent_chain(), chunk=8, trailer=("x-amz-checksum-crc32", crc32(data)) if trailer else None)


GOOD = body_of(b"0123456789abcdefghij")  # 8 + 8 + 4 bytes, then the final chunk
SIG = "9" * 64
BROKEN = {
    # a head that is not hex
    "head-not-hex": (b"zz;chunk-signature=" + SIG.encode() + b"\r\n", 20, "malformed head for chunk 1"),
    # a chunk without its signature
    "head-unsigned": (b"8\r\n01234567\r\n", 20, "malformed head for chunk 1"),
    # another chunk extension beside the signature
    "head-extension": (b"8;chunk-signature=" + SIG.encode() + b";x=1\r\n", 20, "malformed head"),
    # an uppercase signature: not what S3 would take
    "head-uppercase-signature": (b"8;chunk-signature=" + SIG.upper().encode().replace(b"9", b"A") + b"\r\n", 20,
                                 "malformed head"),
    # a chunk longer than its declared size
    "chunk-longer-than-declared": (GOOD.replace(b"01234567\r\n", b"012345678\r\n"), 20, "longer than its declared"),
    # the data ends before the declared decoded length
    "decoded-short": (GOOD, 21, "decodes to 20 bytes, not X-Amz-Decoded-Content-Length (21)"),
    # more data than the declared decoded length
    "decoded-long": (GOOD, 19, "decodes to more than X-Amz-Decoded-Content-Length"),
    # the body ends inside a chunk
    "truncated": (GOOD[:40], 20, "ended inside its framing"),
    # bytes after the final empty line
    "bytes-after-end": (GOOD + b"x", 20, "bytes after the end"),
    # a trailer in a mode that has none
    "trailer-without-trailer-mode": (GOOD[:-2] + b"x-amz-checksum-crc32:AAAAAA==\r\n\r\n", 20, "does not end with an"),
    # a chunk the sidecar will not hold in memory
    "chunk-over-limit": (b"%x;chunk-signature=%s\r\n" % (MAX_CHUNK + 1, SIG.encode()), MAX_CHUNK + 1, "over the"),
    # a head line with no end
    "endless-line": (b"8" * 400, 20, "a line of more than"),
}


@pytest.mark.parametrize(("body", "decoded", "problem"), BROKEN.values(), ids=BROKEN.keys())
def test_broken_framing_is_refused_before_the_final_chunk_goes(body, decoded, problem):
    """Each break is refused aws_chunked_invalid naming the mode and the problem; the final chunk, without which
    the upstream has no complete body, was never emitted."""
    resign = resigner(decoded=decoded)
    emitted = bytearray()
    with pytest.raises(RequestRefused) as refused:
        for i in range(0, len(body), 5):
            emitted += resign.feed(body[i:i + 5])
        emitted += resign.end()
    assert refused.value.reason == "aws_chunked_invalid"
    assert PAYLOAD in refused.value.message and problem in refused.value.message
    assert not emitted.startswith(b"0;") and b"\r\n0;chunk-signature=" not in emitted


TRAILERS_BROKEN = {
    # a trailer X-Amz-Trailer did not declare
    "undeclared": (lambda b: b.replace(b"x-amz-checksum-crc32:", b"x-amz-checksum-sha1:"), "does not declare"),
    # the trailer's signature left out
    "unsigned": (lambda b: b[:b.index(b"x-amz-trailer-signature")] + b"\r\n", "malformed trailer line"),
    # the declared trailer left out
    "missing": (lambda b: b[:b.index(b"x-amz-checksum-crc32")] + b[b.index(b"x-amz-trailer-signature"):], "lacks"),
    # a trailer value with a space: not a checksum
    "spaced-value": (lambda b: b.replace(b"x-amz-checksum-crc32:", b"x-amz-checksum-crc32: "), "malformed trailer"),
}


@pytest.mark.parametrize(("breaking", "problem"), TRAILERS_BROKEN.values(), ids=TRAILERS_BROKEN.keys())
def test_a_broken_trailer_is_refused(breaking, problem):
    """The -TRAILER mode's trailer must be the declared one, once, and signed."""
    resign = resigner(TRAILER, 20, frozenset({"x-amz-checksum-crc32"}))
    with pytest.raises(RequestRefused) as refused:
        run(resign, breaking(body_of(b"0123456789abcdefghij", trailer=True)), 3)
    assert refused.value.reason == "aws_chunked_invalid" and problem in refused.value.message
    assert TRAILER in refused.value.message


@pytest.mark.parametrize("data", [b"", b"x", b"0123456789abcdefghij"])
@pytest.mark.parametrize("trailer", [False, True])
def test_the_rewritten_chunks_chain_from_the_seed_under_the_sidecars_key(data, trailer):
    """Whatever the sizes, every chunk and the trailer verify under the sidecar's key from its seed; the
    sizes and data go on unchanged."""
    mode = TRAILER if trailer else PAYLOAD
    resign = resigner(mode, len(data), frozenset({"x-amz-checksum-crc32"}) if trailer else frozenset(),
                      seed="5" * 64)
    body = run(resign, body_of(data, trailer=trailer), 4)
    sidecar = Chain(derived_key(VECTORS["secret_access_key"], "20130524", "us-east-1", "s3"), VECTORS["time"],
                    "20130524/us-east-1/s3/aws4_request", "5" * 64)
    assert verified(body, sidecar, "x-amz-checksum-crc32" if trailer else None) == data
