"""The listeners' HTTP/1.1 server: which C parser, and what the server costs per request (issue 16 item 1).

1. Parsing: µs to parse one typical agent request (a 9-header GET, and a POST with a 2 KiB body)
   into what the ``IncomingRequest`` slot needs (method, raw target, a case-insensitive header
   view, the raw header pairs, the body), with aiohttp's C parser (llhttp) and with httptools
   (llhttp too, Python callbacks per field), N requests pipelined per feed and one per feed.
2. Serving: CPU µs per request of a server process answering a trivial handler, driven by wrk
   (kept-alive, 8 connections) on another core: aiohttp's low-level server (the fallback) against
   the sidecar's ``Http1Server``, both with the same handler shape, in the same run, medians of rounds.

    python -m tests.bench.bench_http1 [--requests N] [--seconds S] [--rounds R]

httptools is not a dependency: install it (``pip install httptools``) to see its row.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

from multidict import CIMultiDict, CIMultiDictProxy

GET = (b"GET /billing/v1/invoices?page=2&limit=50 HTTP/1.1\r\nHost: 127.0.0.1:17001\r\n"
       b"User-Agent: python-httpx/0.27.0\r\nAccept: application/json\r\nAccept-Encoding: gzip, deflate\r\n"
       b"Connection: keep-alive\r\nX-Sidecar-Task: 3f2a9c0d1e8b4a7f\r\ntraceparent: "
       b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nX-Request-Id: 8d7e6f5a\r\n"
       b"Content-Type: application/json\r\n\r\n")
POST = GET.replace(b"GET ", b"POST ").replace(b"\r\n\r\n", b"\r\nContent-Length: 2048\r\n\r\n") + b"x" * 2048


def bench_aiohttp(data: bytes, per_feed: int, total: int) -> float:
    from aiohttp.base_protocol import BaseProtocol
    from aiohttp.http_parser import HttpRequestParser

    loop = asyncio.new_event_loop()
    protocol = BaseProtocol(loop)
    parser = HttpRequestParser(protocol, loop, 65536, max_line_size=65536, max_field_size=65536, max_headers=208,
                               auto_decompress=False)
    protocol._parser = parser  # type: ignore[assignment]
    chunk = data * per_feed
    start = time.perf_counter()
    for _ in range(total // per_feed):
        messages, _, _ = parser.feed_data(chunk)
        for message, payload in messages:
            message.headers, message.raw_headers, message.path  # what the slot reads
            if payload.is_eof() is False:
                payload.read_nowait(-1)
    elapsed = time.perf_counter() - start
    loop.close()
    return elapsed / total * 1e6


def bench_httptools(data: bytes, per_feed: int, total: int) -> float | None:
    try:
        import httptools  # type: ignore[import-not-found]
    except ImportError:
        return None

    class Slot:
        def __init__(self) -> None:
            self.raw: list[tuple[bytes, bytes]] = []
            self.url = b""
            self.body: list[bytes] = []
            self.done: list[object] = []

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.raw.append((name, value))

        def on_headers_complete(self) -> None:
            raw = tuple(self.raw)
            headers = CIMultiDictProxy(CIMultiDict((n.decode("utf-8", "surrogateescape"),
                                                    v.decode("utf-8", "surrogateescape")) for n, v in raw))
            self.done.append((parser.get_method().decode(), self.url.decode("utf-8", "surrogateescape"), headers,
                              raw, parser.should_keep_alive()))
            self.raw, self.url = [], b""

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

    slot = Slot()
    parser = httptools.HttpRequestParser(slot)
    chunk = data * per_feed
    start = time.perf_counter()
    for _ in range(total // per_feed):
        parser.feed_data(chunk)
        slot.done.clear()
        slot.body.clear()
    return (time.perf_counter() - start) / total * 1e6


# -- serving ---------------------------------------------------------------------------------------
SERVER = r'''
import asyncio, os, sys, resource
kind, port_file = sys.argv[1], sys.argv[2]
import uvloop
from multidict import CIMultiDict

async def main():
    loop = asyncio.get_running_loop()
    body = b'{"ok":true}'
    if kind == "aiohttp":
        from aiohttp import web
        from sidecar.server import SidecarServer
        from sidecar.config_model import Limits
        async def handle(request):
            return web.Response(status=200, headers={"Content-Type": "application/json"}, body=body)
        server = SidecarServer(handle, limits=Limits())
    else:
        from sidecar.http1.server import Http1Server
        from sidecar.config_model import Limits
        async def handle(request):
            return request.respond(200, None, {"Content-Type": "application/json"}, body)
        server = Http1Server(handle, limits=Limits())
    listening = await loop.create_server(server, "127.0.0.1", 0)
    with open(port_file + ".tmp", "w") as f:
        f.write(str(listening.sockets[0].getsockname()[1]))
    os.rename(port_file + ".tmp", port_file)
    await asyncio.Event().wait()

uvloop.run(main())
'''


def cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve_round(kind: str, seconds: float, tmp: str) -> float:
    port_file = os.path.join(tmp, f"port-{kind}")
    if os.path.exists(port_file):
        os.remove(port_file)
    proc = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", SERVER, kind, port_file])
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(port_file):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{kind} server did not start")
            time.sleep(0.02)
        port = int(open(port_file).read())
        subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c8", "-d1s", f"http://127.0.0.1:{port}/x"],
                       capture_output=True, check=True)  # warm-up
        before = cpu_of(proc.pid)
        out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c8", f"-d{seconds:g}s",
                              f"http://127.0.0.1:{port}/x"], capture_output=True, text=True, check=True).stdout
        used = cpu_of(proc.pid) - before
        requests = int(next(line for line in out.splitlines() if "requests in" in line).split()[0])
        return used / requests * 1e6
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args.add_argument("--requests", type=int, default=200_000)
    args.add_argument("--seconds", type=float, default=4.0)
    args.add_argument("--rounds", type=int, default=3)
    opts = args.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} (the machine is shared: compare within this run only)")
    print("parse, µs per request          aiohttp C parser   httptools")
    for name, data in (("GET, 9 headers", GET), ("POST, 2 KiB body", POST)):
        for per_feed in (1, 16):
            a = statistics.median(bench_aiohttp(data, per_feed, opts.requests) for _ in range(3))
            h = [bench_httptools(data, per_feed, opts.requests) for _ in range(3)]
            shown = f"{statistics.median(h):9.2f}" if h[0] is not None else "   (not installed)"
            print(f"  {name:18} x{per_feed:<3}   {a:9.2f}        {shown}")
    if not (shutil.which("wrk") and shutil.which("taskset")):
        print("serving: needs wrk and taskset")
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rounds = {"aiohttp": [], "sidecar": []}
        for _ in range(opts.rounds):
            for kind in rounds:
                rounds[kind].append(serve_round(kind, opts.seconds, tmp))
    ratios = [s / a for s, a in zip(rounds["sidecar"], rounds["aiohttp"])]
    print("serve a trivial handler, CPU µs per request (server pinned to core 0, wrk -c8 on core 1)")
    for kind, values in rounds.items():
        print(f"  {kind:8} median {statistics.median(values):7.1f}  ({min(values):.1f}-{max(values):.1f})")
    print(f"  sidecar / aiohttp: median {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
