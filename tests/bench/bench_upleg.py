"""The upstream leg alone: kept-alive GETs through ``sidecar.forward.http11`` against nginx, 8 at a time.

Without a server side in front, what is counted is the leg (serializing the head, the pool, the
connection protocol, llhttp, the body read) plus the event loop's own work for it. ``--callgrind``
runs the loop twice under ``valgrind --tool=callgrind`` (N and 3N requests) and prints the
instructions per request from the difference (start-up and imports cancel out; repeatable to
about 0.1 %, unlike seconds on a shared machine). ``--root DIR`` measures another checkout's
``sidecar`` (e.g. ``/work/main``) with the same script.

Run: ``python -m tests.bench.bench_upleg [--requests N] [--callgrind] [--root DIR]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONCURRENCY = 8


async def _drive(port: int, requests: int) -> float:
    from multidict import CIMultiDict

    from sidecar.config_model import Timeouts
    from sidecar.forward.http11 import ConnectionPool, send

    pool = ConnectionPool("127.0.0.1", port, None, Timeouts())

    async def worker(n: int) -> None:
        for _ in range(n):
            headers = CIMultiDict({"Host": pool.host_header, "User-Agent": "bench", "Accept": "*/*"})
            response = await send(pool, "GET", "/v1/bench", headers, None)
            try:
                await response.read()
            finally:
                response.release()

    await asyncio.gather(*(worker(25) for _ in range(CONCURRENCY)))  # warm: connections open, code paths taken
    started = time.perf_counter()
    await asyncio.gather(*(worker(requests // CONCURRENCY) for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - started
    pool.close()
    return elapsed


def run_leg(requests: int) -> None:
    import uvloop

    from tests.bench import bench_proxy as b

    tmp = Path(tempfile.mkdtemp(prefix="upleg-"))
    port = b.free_port()
    nginx = b.start_nginx(tmp, port)
    try:
        elapsed = uvloop.run(_drive(port, requests))
    finally:
        b.stop(nginx)
    print(f"{requests} requests, {requests / elapsed:,.0f} req/s (wall clock: compare within one run only)")


def _instructions(root: Path, requests: int, out: Path) -> int:
    # run as a script from ``root``: its ``sidecar`` (and ``tests.bench.bench_proxy``) are imported, not ours
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONHASHSEED": "0"}
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__,
                    "--requests", str(requests)], check=True, env=env, cwd=root,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    totals = [int(m.group(1)) for m in re.finditer(r"^(?:summary|totals): (\d+)", out.read_text(), re.M)]
    return max(totals)


def run_callgrind(root: Path, requests: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="upleg-cg-"))
    low = _instructions(root, requests, tmp / "low.out")
    high = _instructions(root, 3 * requests, tmp / "high.out")
    print(f"{root}: {(high - low) / (2 * requests):,.0f} instructions per request of the upstream leg "
          f"(callgrind, {requests} and {3 * requests} requests)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--callgrind", action="store_true", help="instructions per request under valgrind")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the checkout whose sidecar is measured")
    args = parser.parse_args()
    if args.callgrind:
        run_callgrind(args.root.resolve(), args.requests)
    else:
        run_leg(args.requests)


if __name__ == "__main__":
    main()
