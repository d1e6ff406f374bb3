"""A thousand concurrent connections on each data listener of a real ``sidecar run``, and health meanwhile.

    python -m tests.bench.soak_overload                 # 1000 connections per listener
    python -m tests.bench.soak_overload --connections 300 --max-in-flight 100
    python -m tests.bench.soak_overload --listeners outbound --log /tmp/overload.log

The agent (a loopback server) holds every request for ``--hold`` seconds, so connections pile up.
``--connections`` clients open at once on the outbound listener (plain HTTP) and then on the inbound
listener (mTLS), each sending one request; the sidecar runs with ``max_in_flight`` set to
``--max-in-flight`` on both. Meanwhile ``/readyz`` is asked every 20 ms. Prints, per listener, how
many were answered 200, refused 503 ``overloaded`` or failed otherwise (hung: no answer within 30 s),
and the health latency; exits 1 if any connection hung or failed, or health took over 100 ms. The
sidecar's watchdog reports stalls over 50 ms (``--log`` keeps its output); the count of stalls and
the innermost frames of the longest are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml
from aiohttp import web

from tests.bench.soak_mtls import Sidecar, free_port

HUNG = 30.0
HEALTH_BUDGET = 0.1
OBSERVABILITY = {"stall_threshold": "50ms", "loop_sample_interval": "10ms", "stall_report_interval": "100ms"}


async def one(port: int, request: bytes, context: ssl.SSLContext | None) -> str:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=context), HUNG)
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        return f"connect: {type(exc).__name__}"
    try:
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), HUNG)
    except TimeoutError:
        return "hung"
    except (OSError, ssl.SSLError) as exc:
        return type(exc).__name__
    finally:
        writer.close()
    if not answer:
        return "closed"
    status = answer.split(b" ", 2)[1].decode()
    return "503 overloaded" if status == "503" and b"overloaded" in answer else status


def health(port: int, stop: threading.Event) -> list[float]:
    """``/readyz`` every 20 ms until ``stop`` is set: each answer's latency in seconds."""
    times = []
    while not stop.is_set():
        began = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=HUNG) as sock:
            sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            while sock.recv(65536):
                pass
        times.append(time.perf_counter() - began)
        time.sleep(0.02)
    return times


def probe(port: int) -> int:
    """``--probe PORT``: :func:`health` until stdin closes, then the latencies as JSON on stdout. A process
    of its own, so that the clients' loop (and its share of the GIL) does not delay what it measures."""
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print(json.dumps(health(port, stop)))
    return 0


def loop_lag(metrics_port: int) -> str:
    """The sidecar's loop-lag histogram so far, as ``<= bound: count`` for the buckets above 10 ms."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=HUNG) as answer:
        text = answer.read().decode()
    buckets = [(line.split('le="')[1].split('"')[0], float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("sidecar_event_loop_lag_seconds_bucket")]
    total = buckets[-1][1]
    return ", ".join(f"> {bound}s: {total - n:g}" for bound, n in buckets if bound in ("0.01", "0.05", "0.1", "0.25", "0.5", "1")) + f" of {total:g} samples"


async def burst(name: str, port: int, request: bytes, context: ssl.SSLContext | None, count: int,
                health_port: int, metrics_port: int) -> bool:
    prober = subprocess.Popen([sys.executable, "-m", "tests.bench.soak_overload", "--probe", str(health_port)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    await asyncio.sleep(0.5)  # it is probing before the burst begins
    outcomes = collections.Counter(await asyncio.gather(*(one(port, request, context) for _ in range(count))))
    out, _ = await asyncio.to_thread(prober.communicate)
    times = sorted(json.loads(out))
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    print(f"{name:>8}: {dict(outcomes)}; /readyz median {statistics.median(times) * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms, max {times[-1] * 1000:.1f} ms over {len(times)} checks")
    print(f"          loop lag: {loop_lag(metrics_port)}")
    bad = sum(n for outcome, n in outcomes.items() if outcome not in ("200", "503 overloaded"))
    return bad == 0 and times[-1] <= HEALTH_BUDGET


async def main_async(args: argparse.Namespace) -> int:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(args.hold)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", slow)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    agent_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", agent_port, backlog=4096).start()
    with tempfile.TemporaryDirectory() as tmp:
        sidecar = Sidecar(Path(tmp), agent_port, upstreams={"agent": {"url": f"http://127.0.0.1:{agent_port}"}},
                          rules=[{"id": "out", "direction": "outbound", "upstream": "agent", "effect": "allow"}])
        config = yaml.safe_load(sidecar.config.read_text())
        for listener in ("inbound", "outbound"):
            config[listener]["limits"] = {"max_in_flight": args.max_in_flight}
        config["observability"] = OBSERVABILITY
        sidecar.config.write_text(yaml.safe_dump(config))
        log = Path(args.log or Path(tmp) / "sidecar.out")
        await asyncio.to_thread(sidecar.start, log)
        assert sidecar.process is not None
        print(f"sidecar run: pid {sidecar.process.pid}", flush=True)
        await asyncio.sleep(args.settle)
        try:
            cert, key = sidecar.caller_svid()
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            context.load_cert_chain(cert, key)
            out = f"GET /agent/x HTTP/1.1\r\nHost: 127.0.0.1:{sidecar.ports['outbound']}\r\nConnection: close\r\n\r\n"
            held = f"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            ok = True
            if "outbound" in args.listeners:
                ok &= await burst("outbound", sidecar.ports["outbound"], out.encode(), None, args.connections,
                                  sidecar.ports["health"], sidecar.ports["metrics"])
            if "inbound" in args.listeners:
                ok &= await burst("inbound", sidecar.ports["inbound"], held.encode(), context, args.connections,
                                  sidecar.ports["health"], sidecar.ports["metrics"])
        finally:
            sidecar.stop()
            await runner.cleanup()
        stalls(log)
    print("overload: passed" if ok else "overload: FAILED")
    return 0 if ok else 1


def stalls(log: Path) -> None:
    """The watchdog's reports in the sidecar's output: how many, and where the longest one was."""
    reports = [json.loads(line) for line in log.read_bytes().splitlines()
               if line.startswith(b"{") and b'"event_loop_stalled"' in line]
    if not reports:
        print("   stalls: none over 50 ms reported")
        return
    worst = max(reports, key=lambda r: r["late_ms"])
    print(f"   stalls: {len(reports)} reported (+{sum(r['unreported_stalls'] for r in reports)} unreported); "
          f"longest {worst['late_ms']} ms at:")
    for frame in worst["stack"][-6:]:
        print(f"     {frame}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--max-in-flight", type=int, default=256)
    parser.add_argument("--hold", type=float, default=1.0)
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds between ready and the first burst: just after ready, `sidecar run`'s "
                             "gc.collect() and gc.freeze() (app.tune_gc) hold the GIL for 150-300 ms here")
    parser.add_argument("--listeners", default="outbound,inbound", help="comma-separated: outbound, inbound")
    parser.add_argument("--log", default="", help="keep the sidecar's output in this file")
    parser.add_argument("--probe", type=int, default=0, help=argparse.SUPPRESS)  # the health prober's own process
    args = parser.parse_args()
    return probe(args.probe) if args.probe else asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
