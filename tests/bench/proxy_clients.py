"""The load clients ``bench_proxy`` runs as their own processes (pinned to the load CPU).

``python -m tests.bench.proxy_clients KIND JSON`` prints one JSON object:

- ``paced``: GETs at a fixed rate (open loop, aiohttp) -> p50, p99, errors;
- ``agent``: agent-rate latency, sequential and kept-alive: every tick sends one GET to each of
  several URLs in turn (the order rotates each tick), one connection per URL, so a subject and
  direct are measured within milliseconds of each other -> every sample, per URL;
- ``tls``: kept-alive HTTPS GETs as fast as they go on ``connections`` connections, with a client
  certificate (aiohttp) -> requests, errors;
- ``handshakes``: new TLS connections, one GET each, from ``threads`` threads of blocking Python
  ``ssl``; ``resume``: each thread offers the session of its previous connection -> connections,
  failures, how many were resumed.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import ssl
import sys
import threading
import time
from typing import Any

from tests.bench.bench_proxy import paced_client


def agent_rate(urls: dict[str, str], rate: float, samples: int) -> dict[str, Any]:
    """``samples`` ticks at ``rate`` per second; each tick one sequential GET per URL (kept alive)."""
    conns = {name: _connection(url) for name, url in urls.items()}
    paths = {name: "/" + url.split("/", 3)[3] for name, url in urls.items()}
    times: dict[str, list[float]] = {name: [] for name in urls}
    errors = {name: 0 for name in urls}
    names = list(urls)
    for name in names:  # open every connection first: not counted
        _get(conns[name], paths[name])
    start = time.perf_counter()
    for i in range(samples):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        k = i % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            ok = _get(conns[name], paths[name])
            elapsed = (time.perf_counter() - t0) * 1e3
            times[name].append(elapsed if ok else float("nan"))
            errors[name] += not ok
    return {"times_ms": times, "errors": errors}


def _connection(url: str) -> http.client.HTTPConnection:
    host, port = url.split("/")[2].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _get(conn: http.client.HTTPConnection, path: str) -> bool:
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status == 200
    except (OSError, http.client.HTTPException):
        conn.close()
        conn.connect()
        return False


def client_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    context.check_hostname = False  # SVIDs name SPIFFE IDs, not hosts
    context.load_cert_chain(cert, key)
    return context


async def tls_load(url: str, seconds: float, connections: int, ca: str, cert: str, key: str) -> dict[str, Any]:
    """Closed loop: ``connections`` workers, each GETting over its kept-alive connection until time is up."""
    import aiohttp

    context = client_context(ca, cert, key)
    counts = {"requests": 0, "errors": 0}
    connector = aiohttp.TCPConnector(ssl=context, limit=connections)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as session:
        async def worker(deadline: float) -> None:
            while time.monotonic() < deadline:
                try:
                    async with session.get(url) as r:
                        await r.read()
                        counts["requests" if r.status == 200 else "errors"] += 1
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    counts["errors"] += 1

        await asyncio.gather(*(worker(time.monotonic() + 0.3) for _ in range(connections)))  # warm: not counted
        counts = {"requests": 0, "errors": 0}
        started = time.monotonic()
        await asyncio.gather(*(worker(started + seconds) for _ in range(connections)))
        counts["seconds"] = time.monotonic() - started
    return counts


def handshakes(host: str, port: int, seconds: float, threads: int, resume: bool, ca: str, cert: str,
               key: str) -> dict[str, Any]:
    """New connections for ``seconds`` from ``threads`` threads; each sends one GET and reads the answer."""
    context = client_context(ca, cert, key)
    totals = {"connections": 0, "failures": 0, "resumed": 0}
    lock = threading.Lock()
    request = f"GET /hello HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()

    def run(deadline: float) -> None:
        session: ssl.SSLSession | None = None
        done = {"connections": 0, "failures": 0, "resumed": 0}
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((host, port), timeout=5) as raw:
                    with context.wrap_socket(raw, session=session if resume else None) as tls:
                        tls.sendall(request)
                        answer = b""
                        while chunk := tls.recv(65536):
                            answer += chunk
                        ok = answer.startswith(b"HTTP/1.1 200")
                        done["resumed"] += tls.session_reused
                        session = tls.session
                done["connections" if ok else "failures"] += 1
            except (OSError, ssl.SSLError):
                done["failures"] += 1
                session = None
        with lock:
            for k, v in done.items():
                totals[k] += v

    started = time.monotonic()
    workers = [threading.Thread(target=run, args=(started + seconds,)) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return {**totals, "seconds": time.monotonic() - started}


def main(argv: list[str]) -> int:
    kind, args = argv[0], json.loads(argv[1])
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    if kind == "paced":
        result = run(paced_client(**args))
    elif kind == "agent":
        result = agent_rate(**args)
    elif kind == "tls":
        result = run(tls_load(**args))
    elif kind == "handshakes":
        result = handshakes(**args)
    else:
        raise SystemExit(f"proxy_clients: unknown client {kind!r}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
