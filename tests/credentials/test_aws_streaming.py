"""Signed streaming uploads (STREAMING-AWS4-HMAC-SHA256-PAYLOAD and -TRAILER) through the whole pipeline: the
agent's chunks, signed with its placeholder key, are re-signed with the sidecar's as they stream; moto with IAM
auth on stores exactly the object, a recording upstream verifies every chunk signature independently, and a
broken framing is refused with nothing stored (issue 14 item 1)."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest
from aiohttp import web

from tests.credentials.aws_chunks import PAYLOAD, TRAILER, Chain, agent_chain, crc32, derived_key, framed, verified
from tests.credentials.s3_setup import BOTO3_POLICY, recording_config, s3_config
from tests.harness import Upstream
from tests.peers.moto import BUCKET, REGION

pytestmark = pytest.mark.peer("moto")
KIB = 1024
SIZES = [0, 1, 64 * KIB - 1, 64 * KIB, 1024 * KIB + 7]
CHECKSUM = "x-amz-checksum-crc32"


def agent_headers(mode: str, data: bytes) -> dict[str, str]:
    """What an SDK sends with a signed streaming upload; its Authorization is made with its own key."""
    headers = {"Authorization": "AWS4-HMAC-SHA256 Credential=AKIDAGENT/20260101/us-east-1/s3/aws4_request, "
                                "SignedHeaders=host, Signature=" + "0" * 64,
               "X-Amz-Date": "20260101T000000Z", "X-Amz-Content-Sha256": mode, "Content-Encoding": "aws-chunked",
               "X-Amz-Decoded-Content-Length": str(len(data)), "Content-Type": "application/octet-stream"}
    if mode == TRAILER:
        headers |= {"X-Amz-Trailer": CHECKSUM, "x-amz-sdk-checksum-algorithm": "CRC32"}
    return headers


def agent_body(mode: str, data: bytes) -> bytes:
    return framed(data, agent_chain(), trailer=(CHECKSUM, crc32(data)) if mode == TRAILER else None)


@pytest.mark.parametrize("mode", [PAYLOAD, TRAILER])
async def test_a_signed_streaming_upload_is_stored_byte_for_byte(make_sidecar, moto, iam_auth, mode):
    """moto (IAM auth on: the agent's key would be refused) stores exactly the object, at every size around the
    64 KiB chunk and past a MiB, and GetObject returns it."""
    h = await make_sidecar(s3_config(moto), BOTO3_POLICY)
    iam_auth()
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        for size in SIZES:
            data = bytes(range(256)) * (size // 256) + b"t" * (size % 256)
            url = f"{h.outbound}/s3/{BUCKET}/reports/signed-{size}.bin"
            async with s.put(url, data=agent_body(mode, data), headers=agent_headers(mode, data)) as r:
                assert r.status == 200, (size, await r.text())
            async with s.get(url) as r:
                assert (r.status, await r.read()) == (200, data), size
    events = await h.settle()
    assert {(e["decision"], e["status"]) for e in events} == {("allow", 200)}


def sidecar_chain(seen) -> Chain:
    """The chain a recording upstream checks: the sidecar's key, from the seed in the Authorization it got."""
    authz, date_time = seen.header("Authorization"), seen.header("X-Amz-Date")
    seed = re.search(r"Signature=([0-9a-f]{64})", authz).group(1)
    assert "Credential=AKIDSIDECAR/" in authz
    return Chain(derived_key("sidecar-secret-canary", date_time[:8], REGION, "s3"), date_time,
                 f"{date_time[:8]}/{REGION}/s3/aws4_request", seed)


@pytest.mark.parametrize("mode", [PAYLOAD, TRAILER])
async def test_every_chunk_is_resigned_as_it_streams(make_sidecar, mode):
    """The upstream reads the first re-signed chunk before the agent has sent the rest; every chunk and the trailer
    verify under the sidecar's key chained from its seed; none of the agent's signatures arrives; the framed length
    (Content-Length) is the agent's."""
    first_chunk_seen = asyncio.Event()
    received: list[bytes] = []

    async def s3(request: web.Request) -> web.Response:
        received.append(await request.content.readexactly(64 * KIB))  # less than the first re-signed chunk
        first_chunk_seen.set()
        received.append(await request.read())
        return web.Response(headers={"ETag": '"e"'})

    upstream = await Upstream(s3).start()
    data = bytes(range(256)) * 1024 + b"tail"
    body = agent_body(mode, data)
    try:
        h = await make_sidecar(recording_config(upstream), BOTO3_POLICY)
        head = "".join(f"{k}: {v}\r\n" for k, v in agent_headers(mode, data).items())
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port("outbound"))
        writer.write(f"PUT /s3/{BUCKET}/reports/streamed.bin HTTP/1.1\r\nHost: 127.0.0.1:{h.port('outbound')}\r\n"
                     f"Connection: close\r\n"
                     f"Content-Length: {len(body)}\r\n{head}\r\n".encode() + body[:64 * KIB + 200])
        await asyncio.wait_for(first_chunk_seen.wait(), 10)  # one chunk held, never the whole body
        writer.write(body[64 * KIB + 200:])
        response = await reader.readuntil(b"\r\n\r\n")
        writer.close()
    finally:
        await upstream.stop()
    assert response.startswith(b"HTTP/1.1 200")
    [seen] = upstream.seen
    sent = b"".join(received)
    assert seen.header("Content-Length") == str(len(body)) == str(len(sent))
    assert seen.header("X-Amz-Content-Sha256") == mode
    assert verified(sent, sidecar_chain(seen), CHECKSUM if mode == TRAILER else None) == data
    agent_signatures = set(re.findall(rb"signature[=:]([0-9a-f]{64})", body))
    assert agent_signatures and not agent_signatures & set(re.findall(rb"signature[=:]([0-9a-f]{64})", sent))


def broken(data: bytes, change) -> tuple[bytes, dict[str, str]]:
    headers, body = agent_headers(PAYLOAD, data), framed(data, agent_chain(), chunk=8000)
    changed = change(body, headers)
    assert (changed, headers) != (body, agent_headers(PAYLOAD, data)), "the case breaks nothing"
    return changed, headers


BROKEN = {
    # the first chunk carries one byte more than its size says
    "chunk-longer-than-declared": lambda body, _: body[:100] + b"!" + body[100:],
    # the agent declares more than it sends: the final chunk comes too early
    "decoded-length-short": lambda body, headers: headers.update({"X-Amz-Decoded-Content-Length": "9001"}) or body,
    # a chunk head broken half-way through the upload
    "malformed-second-head": lambda body, _: body.replace(b"\r\n3e8;chunk-signature=", b"\r\n3e8;chunk-signatur=", 1),
    # bytes after the framing's end, within the declared Content-Length
    "bytes-after-end": lambda body, _: body + b"junk",
}


@pytest.mark.parametrize("change", BROKEN.values(), ids=BROKEN.keys())
async def test_a_broken_signed_upload_is_refused_and_nothing_is_stored(make_sidecar, moto, change):
    """A chunk longer than declared, a decoded length mismatch, a malformed head, trailing bytes: 400
    aws_chunked_invalid naming the mode, one deny event, and moto has no object."""
    h = await make_sidecar(s3_config(moto), BOTO3_POLICY)
    data = b"x" * 8000 + b"y" * 1000  # two chunks of 8000 (0x1f40) and 1000 (0x3e8) bytes
    body, headers = broken(data, change)
    key = f"{BUCKET}/reports/broken-{len(body)}-{headers['X-Amz-Decoded-Content-Length']}.bin"
    async with aiohttp.ClientSession() as s:
        async with s.put(f"{h.outbound}/s3/{key}", data=body, headers=headers) as r:
            refusal = await r.json()
            assert (r.status, refusal["error"]) == (400, "aws_chunked_invalid")
            assert PAYLOAD in refusal["message"]
        async with s.get(f"{h.outbound}/s3/{key}") as r:
            assert r.status == 404
    events = await h.settle()
    assert (events[0]["decision"], events[0]["reason"], events[0]["status"]) == ("deny", "aws_chunked_invalid", 400)


@pytest.mark.parametrize("decoded", [0, 9000])
async def test_a_signed_upload_without_a_body_is_refused_before_anything_is_sent(make_sidecar, upstream, decoded):
    """Signed chunks declared over an empty body: no framing to re-sign, so no request goes upstream (a server
    that decodes leniently would store an empty or zero-filled object)."""
    h = await make_sidecar(recording_config(upstream), BOTO3_POLICY)
    headers = agent_headers(PAYLOAD, b"") | {"X-Amz-Decoded-Content-Length": str(decoded)}
    async with aiohttp.ClientSession() as s:
        async with s.put(f"{h.outbound}/s3/{BUCKET}/reports/empty.bin", data=b"", headers=headers) as r:
            assert (r.status, (await r.json())["error"]) == (400, "aws_chunked_invalid")
    assert upstream.seen == []
