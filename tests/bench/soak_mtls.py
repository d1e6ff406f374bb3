"""New inbound mTLS connections to a real ``sidecar run`` process, from three TLS stacks, and under a flood.

    python -m tests.bench.soak_mtls                 # 500 sequential + 500 concurrent per client, 30 s flood
    python -m tests.bench.soak_mtls --count 100 --flood-seconds 10

1. ``sidecar run`` (uvloop, as in production) with its inbound listener on 127.0.0.1, forwarding to a
   loopback agent that answers ``ok``; a development SVID for the caller.
2. Python ``ssl`` (blocking sockets, Nagle on), ``curl`` and Node's ``tls``: ``--count`` new connections
   one after another, then ``--count`` sixteen at a time. Each is one GET that must return 200.
3. While ``--flood-rate`` silent TCP connections per second arrive for ``--flood-seconds`` (they connect
   and never send a byte), a Python ``ssl`` caller opens a new connection every 100 ms; every one of its
   handshakes must succeed within ``--budget`` seconds.

Prints one line per scenario and exits 1 if any connection failed or a flood-time handshake went over
the budget. Every connection is to 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from aiohttp import web

CALLER = "spiffe://sidecar.local/orchestrator"
TIMEOUT = 10.0

NODE_CLIENT = r"""
const tls = require('tls'); const fs = require('fs');
const [port, count, parallel, cert, key] = process.argv.slice(1);
const opts = {host: '127.0.0.1', port: +port, cert: fs.readFileSync(cert), key: fs.readFileSync(key),
              rejectUnauthorized: false};
function one() { return new Promise((resolve) => {
  const s = tls.connect(opts, () => s.write('GET /tasks/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n'));
  let data = ''; s.setTimeout(10000, () => { s.destroy(); resolve(false); });
  s.on('data', (d) => { data += d; }); s.on('error', () => resolve(false));
  s.on('close', () => resolve(data.startsWith('HTTP/1.1 200'))); }); }
(async () => { let ok = 0, next = 0; const n = +count;
  async function worker() { while (next < n) { next++; if (await one()) ok++; } }
  await Promise.all(Array.from({length: +parallel}, worker)); console.log(JSON.stringify({ok, n})); })();
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sidecar:
    """A ``sidecar run`` process with an inbound listener, in a temporary directory."""

    def __init__(self, tmp: Path, agent_port: int, *, upstreams: dict | None = None,
                 rules: list[dict] | None = None) -> None:
        self.tmp = tmp
        self.ports = {name: free_port() for name in ("inbound", "outbound", "health", "metrics", "admin")}
        policy = tmp / "policy.yaml"
        policy.write_text(yaml.safe_dump({"version": 1, "default": "deny", "rules": [
            {"id": "caller", "direction": "inbound", "callers": [CALLER], "effect": "allow"}, *(rules or [])]}))
        self.config = tmp / "sidecar.yaml"
        self.config.write_text(yaml.safe_dump({
            "state_dir": str(tmp / "state"), "policy": {"files": [str(policy)]},
            "inbound": {"listen": f"127.0.0.1:{self.ports['inbound']}", "forward_to": f"http://127.0.0.1:{agent_port}",
                        "trust_domains": ["sidecar.local"]},
            "outbound": {"listen": f"127.0.0.1:{self.ports['outbound']}", "upstreams": upstreams or {}},
            **{name: {"listen": f"127.0.0.1:{self.ports[name]}"} for name in ("health", "metrics", "admin")}}))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, log: Path | None = None, source: Path | None = None) -> None:
        """Run it; its output (events, warnings such as the loop watchdog's) to ``log`` when given; the
        ``sidecar`` package from the tree ``source`` when given (another checkout: a baseline)."""
        out = log.open("wb") if log is not None else subprocess.DEVNULL
        env = None if source is None else {**os.environ, "PYTHONPATH": str(source)}
        self.process = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", str(self.config)],
                                        stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.ports["health"]), timeout=1) as s:
                    s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if s.recv(64).startswith(b"HTTP/1.1 200"):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit("soak: sidecar run did not become ready within 30s")

    def caller_svid(self) -> tuple[str, str]:
        from sidecar.identity.ca import ca_issue

        paths = ca_issue(self.tmp / "state", CALLER, self.tmp / "caller")
        return str(paths["cert"]), str(paths["key"])

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()


def python_get(port: int, context: ssl.SSLContext) -> float | None:
    """One GET on a new connection; its handshake time in seconds, or None if it failed."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
            began = time.perf_counter()
            with context.wrap_socket(raw) as tls:
                handshake = time.perf_counter() - began
                tls.sendall(b"GET /tasks/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                answer = b""
                while chunk := tls.recv(65536):
                    answer += chunk
        return handshake if answer.startswith(b"HTTP/1.1 200") else None
    except OSError:
        return None


def curl_get(port: int, cert: str, key: str) -> bool:
    result = subprocess.run(["curl", "-sk", "--max-time", str(TIMEOUT), "--cert", cert, "--key", key, "-o",
                             "/dev/null", "-w", "%{http_code}", f"https://127.0.0.1:{port}/tasks/x"],
                            capture_output=True, text=True, timeout=TIMEOUT + 5)
    return result.stdout == "200"


def run_many(call, count: int, parallel: int) -> int:
    """How many of ``count`` calls succeeded, ``parallel`` at a time."""
    with ThreadPoolExecutor(parallel) as pool:
        return sum(1 for ok in pool.map(lambda _: call(), range(count)) if ok)


def node_many(port: int, cert: str, key: str, count: int, parallel: int) -> int:
    result = subprocess.run(["node", "-e", NODE_CLIENT, str(port), str(count), str(parallel), cert, key],
                            capture_output=True, text=True, timeout=TIMEOUT * count)
    return json.loads(result.stdout)["ok"]


def flood(port: int, rate: int, seconds: float, stop: threading.Event) -> int:
    """Open ``rate`` silent connections a second for ``seconds``; each is held until the server closes it."""
    opened: list[socket.socket] = []
    began = time.monotonic()
    while not stop.is_set() and time.monotonic() - began < seconds:
        due = int((time.monotonic() - began) * rate) - len(opened)
        for _ in range(max(due, 0)):
            try:
                opened.append(socket.create_connection(("127.0.0.1", port), timeout=1))
            except OSError:
                pass
        time.sleep(0.005)
    for sock in opened:
        sock.close()
    return len(opened)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--flood-rate", type=int, default=200)
    parser.add_argument("--flood-seconds", type=float, default=30.0)
    parser.add_argument("--budget", type=float, default=0.25)
    args = parser.parse_args()
    for tool in ("curl", "node"):
        if shutil.which(tool) is None:
            raise SystemExit(f"soak: {tool} is needed on the PATH")
    return asyncio.run(soak(args))


async def soak(args: argparse.Namespace) -> int:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", lambda request: web.Response(text="ok"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    agent_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", agent_port).start()
    with tempfile.TemporaryDirectory() as tmp:
        sidecar = Sidecar(Path(tmp), agent_port)
        await asyncio.to_thread(sidecar.start)
        try:
            failed = await asyncio.to_thread(scenarios, sidecar, args)
        finally:
            sidecar.stop()
            await runner.cleanup()
    return 1 if failed else 0


def scenarios(sidecar: Sidecar, args: argparse.Namespace) -> bool:
    port, n = sidecar.ports["inbound"], args.count
    cert, key = sidecar.caller_svid()
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # the client's side is not under test
    context.load_cert_chain(cert, key)
    failed = False
    clients = {
        "python ssl": lambda parallel: run_many(lambda: python_get(port, context) is not None, n, parallel),
        "curl": lambda parallel: run_many(lambda: curl_get(port, cert, key), n, parallel),
        "node tls": lambda parallel: node_many(port, cert, key, n, parallel),
    }
    for name, client in clients.items():
        for parallel in (1, 16):
            ok = client(parallel)
            failed |= ok != n
            print(f"{name:>10}, {'sequential' if parallel == 1 else '16 at a time':>12}: {ok}/{n} served")
    stop = threading.Event()
    flooder = threading.Thread(target=lambda: print(
        f"flood: {flood(port, args.flood_rate, args.flood_seconds, stop)} silent connections opened"))
    flooder.start()
    times: list[float | None] = []
    began = time.monotonic()
    while time.monotonic() - began < args.flood_seconds:
        times.append(python_get(port, context))
        time.sleep(0.1)
    stop.set()
    flooder.join()
    served = sorted(t for t in times if t is not None)
    over = sum(1 for t in served if t > args.budget)
    failed |= len(served) != len(times) or over > 0
    if served:
        p99 = served[min(len(served) - 1, int(len(served) * 0.99))]
        print(f"caller during the flood: {len(served)}/{len(times)} served; handshake median "
              f"{statistics.median(served) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {served[-1] * 1000:.1f} ms; "
              f"{over} over {args.budget * 1000:.0f} ms")
    else:
        print(f"caller during the flood: 0/{len(times)} served")
    print("soak: FAILED" if failed else "soak: passed")
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
