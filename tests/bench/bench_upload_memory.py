"""Memory held per in-flight signed S3 upload: N concurrent 8 MiB PutObjects through a real ``sidecar run``,
each body mode in a fresh process.

    python -m tests.bench.bench_upload_memory [--uploads 16] [--mib 8]      (from the repository root)

The upstream (a loopback aiohttp server) reads the first MiB of each upload, then holds every one until
all N have arrived: at that moment all N are in flight, and the sidecar's RSS (``/proc/<pid>/status``) is
read against its RSS before (after one warm-up upload). Modes:

- signed-chunks: ``STREAMING-AWS4-HMAC-SHA256-PAYLOAD``, 64 KiB chunks re-signed as they stream (one chunk held);
- unsigned-trailer: ``STREAMING-UNSIGNED-PAYLOAD-TRAILER`` (boto3's default over TLS), streamed untouched;
- whole-body: a plain PUT, buffered whole to sign its SHA-256 (bounded by ``max_body_bytes``).

RSS moves with the allocator (freed memory is not always returned), so read the figures as an order of
magnitude per mode, compared within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

from tests.bench.soak_mtls import Sidecar, free_port
from tests.credentials.aws_chunks import PAYLOAD, agent_chain, crc32, framed

MIB = 1024 * 1024
BUCKET = "bench-bucket"
MODES = ("signed-chunks", "unsigned-trailer", "whole-body")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit("bench: no VmRSS")


def unsigned_trailer(data: bytes) -> bytes:
    frames = b"".join(b"%x\r\n%b\r\n" % (len(data[i:i + 65536]), data[i:i + 65536])
                      for i in range(0, len(data), 65536))
    return frames + b"0\r\nx-amz-checksum-crc32:" + crc32(data).encode() + b"\r\n\r\n"


def upload(mode: str, data: bytes) -> tuple[bytes, dict[str, str]]:
    """The body and headers an agent sends in ``mode`` (its own signature, which the sidecar replaces)."""
    headers = {"Authorization": "AWS4-HMAC-SHA256 Credential=AKIDAGENT/20260101/us-east-1/s3/aws4_request, "
                                "SignedHeaders=host, Signature=" + "0" * 64, "Content-Type": "application/octet-stream"}
    if mode == "whole-body":
        return data, headers
    headers |= {"Content-Encoding": "aws-chunked", "X-Amz-Decoded-Content-Length": str(len(data))}
    if mode == "signed-chunks":
        return framed(data, agent_chain()), headers | {"X-Amz-Content-Sha256": PAYLOAD}
    return unsigned_trailer(data), headers | {"X-Amz-Content-Sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
                                              "X-Amz-Trailer": "x-amz-checksum-crc32"}


class HoldingUpstream:
    """Reads a MiB of each upload, then holds them all until ``expected`` have come; ``all_in`` says so."""

    def __init__(self) -> None:
        self.expected, self.arrived = 1, 0
        self.all_in, self.release = asyncio.Event(), asyncio.Event()

    def reset(self, expected: int) -> None:
        self.expected, self.arrived = expected, 0
        self.all_in, self.release = asyncio.Event(), asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        await request.content.readexactly(MIB)
        self.arrived += 1
        if self.arrived == self.expected:
            self.all_in.set()
        await self.release.wait()
        await request.read()
        return web.Response(headers={"ETag": '"e"'})


async def measure(mode: str, uploads: int, size: int, upstream: HoldingUpstream, upstream_port: int) -> tuple[int, int]:
    """(RSS before, RSS with every upload in flight), KiB, for one fresh sidecar."""
    with tempfile.TemporaryDirectory() as tmp:
        sidecar = Sidecar(Path(tmp), free_port(), upstreams={"s3": {"url": f"http://127.0.0.1:{upstream_port}",
                                                                    "credential": "aws"}},
                          rules=[{"id": "put", "direction": "outbound", "upstream": "s3", "methods": ["PUT"],
                                  "effect": "allow"}])
        config = yaml.safe_load(sidecar.config.read_text())
        config["logging"] = {"level": "warning"}
        config["outbound"]["limits"] = {"max_body_bytes": 2 * size}
        config["credentials"] = {"aws": {"type": "aws_sigv4", "region": "us-east-1", "service": "s3", "source": {
            "type": "static", "access_key_id": {"value": "AKIDSIDECAR"}, "secret_access_key": {"value": "s"}}}}
        sidecar.config.write_text(yaml.safe_dump(config))
        await asyncio.to_thread(sidecar.start)
        assert sidecar.process is not None
        url = f"http://127.0.0.1:{sidecar.ports['outbound']}/s3/{BUCKET}/object"
        body, headers = upload(mode, bytes(range(256)) * (size // 256))
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
                upstream.reset(1)
                upstream.release.set()
                await put(session, url, body, headers)  # warm-up: imports, pools, first-use allocations
                before = rss_kib(sidecar.process.pid)
                upstream.reset(uploads)
                sending = [asyncio.ensure_future(put(session, url, body, headers)) for _ in range(uploads)]
                await asyncio.wait_for(upstream.all_in.wait(), 120)
                during = rss_kib(sidecar.process.pid)
                upstream.release.set()
                await asyncio.gather(*sending)
        finally:
            sidecar.stop()
        return before, during


async def put(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]) -> None:
    async with session.put(url, data=body, headers=headers) as response:
        if response.status != 200:
            raise SystemExit(f"bench: upload answered {response.status}: {(await response.text())[:300]}")


async def run(uploads: int, size: int) -> None:
    upstream = HoldingUpstream()
    app = web.Application(client_max_size=4 * size)
    app.router.add_put("/{tail:.*}", upstream.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"{uploads} concurrent uploads of {size // MIB} MiB, each held by the upstream after its first MiB")
    print(f"{'mode':18} {'RSS before':>11} {'in flight':>10} {'per upload':>11}")
    try:
        for mode in MODES:
            before, during = await measure(mode, uploads, size, upstream, port)
            print(f"{mode:18} {before / 1024:8.1f} MiB {during / 1024:6.1f} MiB "
                  f"{(during - before) / uploads:8.0f} KiB")
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--uploads", type=int, default=16)
    parser.add_argument("--mib", type=int, default=8)
    args = parser.parse_args()
    asyncio.run(run(args.uploads, args.mib * MIB))


if __name__ == "__main__":
    main()
