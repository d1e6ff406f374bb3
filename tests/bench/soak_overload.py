"""A thousand concurrent connections on each data listener of a real ``sidecar run``, and health meanwhile.

    python -m tests.bench.soak_overload                 # 1000 connections per listener
    python -m tests.bench.soak_overload --connections 300 --max-in-flight 100

The agent (a loopback server) holds every request for ``--hold`` seconds, so connections pile up.
``--connections`` clients open at once on the outbound listener (plain HTTP) and then on the inbound
listener (mTLS), each sending one request; the sidecar runs with ``max_in_flight`` set to
``--max-in-flight`` on both. Meanwhile ``/readyz`` is asked every 20 ms. Prints, per listener, how
many were answered 200, refused 503 ``overloaded`` or failed otherwise (hung: no answer within 30 s),
and the health latency; exits 1 if any connection hung or failed, or health took over 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import socket
import ssl
import statistics
import tempfile
import threading
import time
from pathlib import Path

import yaml
from aiohttp import web

from tests.bench.soak_mtls import Sidecar, free_port

HUNG = 30.0
HEALTH_BUDGET = 0.1


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
    """``/readyz`` every 20 ms from a thread of its own, so that the clients' loop does not delay it."""
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


async def burst(name: str, port: int, request: bytes, context: ssl.SSLContext | None, count: int,
                health_port: int) -> bool:
    stop = threading.Event()
    watcher = asyncio.ensure_future(asyncio.to_thread(health, health_port, stop))
    outcomes = collections.Counter(await asyncio.gather(*(one(port, request, context) for _ in range(count))))
    stop.set()
    times = sorted(await watcher)
    print(f"{name:>8}: {dict(outcomes)}; /readyz median {statistics.median(times) * 1000:.1f} ms, "
          f"max {times[-1] * 1000:.1f} ms over {len(times)} checks")
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
        sidecar.config.write_text(yaml.safe_dump(config))
        await asyncio.to_thread(sidecar.start)
        try:
            cert, key = sidecar.caller_svid()
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            context.load_cert_chain(cert, key)
            out = f"GET /agent/x HTTP/1.1\r\nHost: 127.0.0.1:{sidecar.ports['outbound']}\r\nConnection: close\r\n\r\n"
            held = f"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            ok = await burst("outbound", sidecar.ports["outbound"], out.encode(), None, args.connections,
                             sidecar.ports["health"])
            ok &= await burst("inbound", sidecar.ports["inbound"], held.encode(), context, args.connections,
                              sidecar.ports["health"])
        finally:
            sidecar.stop()
            await runner.cleanup()
    print("overload: passed" if ok else "overload: FAILED")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--max-in-flight", type=int, default=256)
    parser.add_argument("--hold", type=float, default=1.0)
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
