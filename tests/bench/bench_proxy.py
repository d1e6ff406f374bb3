"""What the sidecar's data path costs, against nginx direct, nginx as a reverse proxy and a bare aiohttp proxy.

Run: ``python -m tests.bench.bench_proxy`` (about 20 minutes; ``--quick`` about 5; ``--rounds N``).
Not part of the test run. Needs ``nginx``, ``wrk`` and ``taskset`` on the PATH, and 2 cores.

Five subjects, all on 127.0.0.1, measured alternately (the order rotates every round):

- ``direct``: nginx itself (``worker_processes 1``, keep-alive, a fixed 67-byte body);
- ``bare``: ``tests/bench/bare_proxy.py`` in front of that nginx (aiohttp's server and ``ClientSession``);
- ``lean``: ``tests/bench/lean_proxy.py``, the same pass-through on the sidecar's own forwarding
  leg (``sidecar.forward.http11``) instead of ``ClientSession``: sidecar/lean is the cost of the
  sidecar's own work over an equally lean forwarder;
- ``sidecar``: ``python -m sidecar run`` in front of it, route-prefix mode (``/bench/...``), a
  static credential, one allow rule, one trust-decision line and the metrics per request; its
  inbound listener forwards mTLS callers to the same nginx (the agent);
- ``nginx_proxy``: nginx as a reverse proxy (kept-alive upstream, one worker): the limit; the same
  worker terminates mTLS for the inbound comparison.

The measured process (the proxy; nginx's worker for ``direct``) runs on CPU 1; nginx as the
upstream, wrk and the clients (``tests/bench/proxy_clients.py``) run on CPU 0 (PERFORMANCE.md).
Each round and subject: saturated (``wrk -t1 -c16 --latency``), paced at 200 req/s and at 1,000
req/s (vCPU per 1,000 req/s), each with the measured process's exact CPU time per request; then
the inbound mTLS runs (``tests/bench/proxy_sections.py``: kept-alive CPU per request, new
connections per second, full and resumed). Once per run: agent-rate latency at 20 and 200 req/s
(sequential, kept alive, paired with direct), RSS and FDs at ready and after 100k requests, start
to ready. Ratios are taken within each round and then summarized (median, min-max): the machine
is noisy, so only figures from one run compare. The sidecar's stdout is counted to check one
trust-decision event per request.

``--profile FILE [--profile-subject bare]`` instead runs the sidecar (or the bare proxy) under
cProfile with a CPU-time clock, saturates it, and prints its top functions by cumulative and
by own time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

PROXY_CPU, LOAD_CPU = "1", "0"
BODY = '{"ok":true,"service":"bench","items":[1,2,3],"note":"fixed body."}\n'
assert len(BODY) == 67, len(BODY)
SECRET = "bench-static-secret-3c9e1f"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SUBJECTS = ("direct", "bare", "lean", "sidecar", "nginx_proxy")
LABELS = {"direct": "direct (nginx)", "bare": "bare aiohttp", "lean": "lean", "sidecar": "sidecar",
          "nginx_proxy": "nginx as proxy", "baseline": "baseline"}
RATIOS = (("sidecar", "bare"), ("sidecar", "lean"), ("sidecar", "nginx_proxy"), ("bare", "direct"))
TARGET_RATIO = 1.3
CALLER = "spiffe://sidecar.local/bench-caller"  # the inbound caller's SVID, from the sidecar's dev CA


@dataclass(frozen=True)
class Settings:
    rounds: int = 5
    saturated_s: float = 5.0
    connections: int = 16
    paced_rate: float = 200.0
    paced_s: float = 5.0
    paced1000_s: float = 5.0  # paced at 1,000 req/s: vCPU per 1,000 req/s
    agent_rates: tuple[float, ...] = (20.0, 200.0)  # agent-rate latency: sequential, kept alive, paired with direct
    agent_samples: int = 2000
    tls_s: float = 4.0  # inbound mTLS kept-alive load, per round and subject
    tls_connections: int = 8
    handshake_s: float = 4.0  # new mTLS connections, per round, subject and kind (full, resumed)
    handshake_threads: int = 4
    rss_requests: int = 100_000  # RSS and FDs after this many requests through each proxy
    starts: int = 3  # start-to-ready measurements (fresh sidecars)
    warmup_s: float = 2.0


QUICK = Settings(rounds=2, saturated_s=2.0, paced_s=2.0, paced1000_s=2.0, agent_samples=300, tls_s=2.0,
                 handshake_s=2.0, rss_requests=20_000, starts=2, warmup_s=1.0)
MODES = ("saturated", "paced", "paced1000")


# -- processes ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_ns(pid: int) -> int:
    """Exact on-CPU time of the process's live threads (ns), from /proc/<pid>/task/*/schedstat.

    utime + stime are charged in whole 10 ms ticks to whoever is running when the tick fires:
    fine for a saturated run, too coarse for 200 requests of a few hundred µs each.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return total


def core_busy_seconds(cpu: str) -> float:
    """Busy time of one core (all processes), from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, line.split()[1:9])
            return (user + nice + system + irq + softirq + steal) / CLK_TCK
    raise RuntimeError(f"bench: no cpu{cpu} in /proc/stat")


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            if int(text[text.rindex(")") + 2:].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def wait_until(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[bytes],
               poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bench: {what} exited with {proc.returncode} while starting")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(poll)
    raise RuntimeError(f"bench: {what} not ready after {timeout:.0f} s")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as r:
        return r.status == 200


def stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port} reuseport;
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""


NGINX_PROXY_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx-proxy.pid;
error_log {tmp}/nginx-proxy-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    client_body_temp_path {tmp}/proxy-client_body;
    proxy_temp_path {tmp}/proxy-proxy;
    fastcgi_temp_path {tmp}/proxy-fastcgi;
    uwsgi_temp_path {tmp}/proxy-uwsgi;
    scgi_temp_path {tmp}/proxy-scgi;
    upstream backend {{ server 127.0.0.1:{upstream}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    }}
    server {{  # the inbound comparison: mTLS terminated, then the agent (the same nginx) on loopback
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_tickets on;
        location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    }}
}}
"""


def start_nginx_proxy(tmp: Path, port: int, tls_port: int, upstream: int, svid: dict[str, Path]) -> subprocess.Popen[bytes]:
    """nginx as a reverse proxy (keep-alive upstream, one worker) on the proxy CPU, and terminating mTLS."""
    conf = tmp / "nginx-proxy.conf"
    conf.write_text(NGINX_PROXY_CONF.format(tmp=tmp, port=port, tls_port=tls_port, upstream=upstream,
                                            cert=svid["cert"], key=svid["key"], ca=svid["bundle"]))
    proc = subprocess.Popen(["taskset", "-c", PROXY_CPU, "nginx", "-p", str(tmp), "-c", str(conf),
                             "-e", str(tmp / "nginx-proxy-error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/v1/bench"), 10, "nginx proxy", proc)
    return proc


def start_nginx(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, body=BODY.rstrip("\n") + "\\n"))
    proc = subprocess.Popen(["taskset", "-c", LOAD_CPU, "nginx", "-p", str(tmp), "-c", str(conf),
                             "-e", str(tmp / "nginx-error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/"), 10, "nginx", proc)
    return proc


def sidecar_config(tmp: Path, upstream: int) -> tuple[Path, dict[str, int]]:
    """A config and policy in ``tmp``: upstream ``bench`` with a static credential, one allow rule."""
    ports = {name: free_port() for name in ("outbound", "inbound", "health", "metrics", "admin")}
    policy = tmp / "policy.yaml"
    policy.write_text(json.dumps({"version": 1, "default": "deny", "rules": [
        {"id": "bench-allow", "direction": "outbound", "upstream": "bench", "methods": ["GET"],
         "paths": ["/**"], "effect": "allow"},
        {"id": "bench-inbound", "direction": "inbound", "callers": [CALLER], "methods": ["GET"], "paths": ["/**"],
         "effect": "allow"}]}))
    config = {
        "agent": {"name": "bench-agent", "environment": "bench"},
        "state_dir": str(tmp / "state"),
        "outbound": {"listen": f"127.0.0.1:{ports['outbound']}",
                     "upstreams": {"bench": {"url": f"http://127.0.0.1:{upstream}", "credential": "key"}}},
        "credentials": {"key": {"type": "static", "header": "X-API-Key", "value": {"value": SECRET}}},
        "inbound": {"listen": f"127.0.0.1:{ports['inbound']}", "forward_to": f"http://127.0.0.1:{upstream}",
                    "trust_domains": ["sidecar.local"]},
        "policy": {"files": [str(policy)]},
        "admin": {"listen": f"127.0.0.1:{ports['admin']}"},
        "health": {"listen": f"127.0.0.1:{ports['health']}"},
        "metrics": {"listen": f"127.0.0.1:{ports['metrics']}"},
        "logging": {"level": "info"},
        "shutdown": {"drain": "1s"},
    }
    path = tmp / "sidecar.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path, ports


# cProfile with a CPU-time clock: wall time would charge the profiled process for the time
# other processes hold its core (the machine is shared); the process exits on SIGTERM.
PROFILED = """\
import cProfile, runpy, sys, time
out, module, sys.argv = sys.argv[1], sys.argv[2], sys.argv[2:]
profiler = cProfile.Profile(time.process_time)
profiler.enable()
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
finally:
    profiler.disable()
    profiler.dump_stats(out)
"""


def _python(module: str, profile: Path | None) -> list[str]:
    if profile is None:
        return [sys.executable, "-m", module]
    return [sys.executable, "-c", PROFILED, str(profile), module]


def start_bare(tmp: Path, port: int, upstream: int, profile: Path | None = None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["taskset", "-c", PROXY_CPU, *_python("tests.bench.bare_proxy", profile),
                             "--listen", f"127.0.0.1:{port}", "--upstream", f"http://127.0.0.1:{upstream}"],
                            stdout=open(tmp / "bare.out", "wb"), stderr=subprocess.STDOUT)
    wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/v1/bench"), 15, "bare_proxy", proc)
    return proc


def start_lean(tmp: Path, port: int, upstream: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["taskset", "-c", PROXY_CPU, *_python("tests.bench.lean_proxy", None),
                             "--listen", f"127.0.0.1:{port}", "--upstream", f"http://127.0.0.1:{upstream}"],
                            stdout=open(tmp / "lean.out", "wb"), stderr=subprocess.STDOUT,
                            cwd=Path(__file__).resolve().parents[2])
    wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/v1/bench"), 15, "lean_proxy", proc)
    return proc


def start_sidecar(tmp: Path, upstream: int, profile: Path | None = None, *, checkout: Path | None = None,
                  name: str = "sidecar") -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    """``sidecar run`` from this checkout, or from ``checkout`` (another commit's tree: its own package)."""
    work = tmp / name
    work.mkdir(exist_ok=True)
    config, ports = sidecar_config(work, upstream)
    root = checkout or Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)} if checkout else None
    proc = subprocess.Popen(["taskset", "-c", PROXY_CPU, *_python("sidecar", profile), "run", "-c", str(config)],
                            stdout=open(tmp / f"{name}.out", "wb"), stderr=open(tmp / f"{name}.err", "wb"),
                            cwd=root, env=env)
    wait_until(lambda: http_ok(f"http://127.0.0.1:{ports['health']}/readyz"), 60, "sidecar", proc)
    return proc, ports


# -- load ---------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if m is None:
        raise ValueError(f"bench: unreadable wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(url: str, seconds: float, connections: int) -> dict[str, float]:
    cmd = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency",
           "--timeout", "5s", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
            "p50": _ms(latency["50"]), "p99": _ms(latency["99"]), "requests": requests,
            "errors": (int(bad.group(1)) if bad else 0) + (sum(map(int, errors.groups())) if errors else 0)}


def run_client(kind: str, timeout: float, **args: Any) -> dict[str, Any]:
    """One of ``tests.bench.proxy_clients``' load clients, as its own process on the load CPU."""
    cmd = ["taskset", "-c", LOAD_CPU, sys.executable, "-m", "tests.bench.proxy_clients", kind, json.dumps(args)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def run_paced(url: str, rate: float, seconds: float) -> dict[str, Any]:
    return run_client("paced", seconds, url=url, rate=rate, seconds=seconds)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


async def paced_client(url: str, rate: float, seconds: float) -> dict[str, float]:
    """Send GETs at a fixed rate (open loop), each timed from when it is issued."""
    import aiohttp

    async def one(session: aiohttp.ClientSession) -> float | None:
        start = time.perf_counter()
        try:
            async with session.get(url) as r:
                await r.read()
                ok = r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return None
        return (time.perf_counter() - start) * 1e3 if ok else None

    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=64)) as session:
        await one(session)  # open the connection; not counted
        loop = asyncio.get_running_loop()
        count, t0, late = int(rate * seconds), loop.time(), 0.0
        tasks = []
        for i in range(count):
            delay = t0 + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                late = max(late, -delay)
            tasks.append(asyncio.create_task(one(session)))
        results = await asyncio.gather(*tasks)
    ok = [r for r in results if r is not None]
    return {"requests": len(ok), "errors": count - len(ok), "p50": percentile(ok, 50) if ok else float("nan"),
            "p99": percentile(ok, 99) if ok else float("nan"), "max_late_ms": late * 1e3}


# -- one run ------------------------------------------------------------------------------------

@dataclass
class Subject:
    name: str
    url: str
    pid: int  # the process whose CPU time is counted
    events: Path | None = None  # the sidecar's stdout: one trust-decision line per request

    def count_events(self) -> int:
        return self.events.read_bytes().count(b'"trust_decision"') if self.events else 0


@dataclass
class Results:
    runs: list[dict[str, Any]] = field(default_factory=list)

    def add(self, **run: Any) -> None:
        self.runs.append(run)

    def values(self, mode: str, subject: str, key: str) -> list[float]:
        return [r[key] for r in sorted(self.runs, key=lambda r: r["round"])
                if r["mode"] == mode and r["subject"] == subject]

    def ratios(self, mode: str, key: str, top: str, bottom: str) -> list[float]:
        a, b = self.values(mode, top, key), self.values(mode, bottom, key)
        return [x / y for x, y in zip(a, b) if y]


def measure(subject: Subject, mode: str, s: Settings) -> dict[str, Any]:
    events, cpu, ns, core = subject.count_events(), cpu_seconds(subject.pid), cpu_ns(subject.pid), \
        core_busy_seconds(PROXY_CPU)
    start = time.perf_counter()
    if mode == "saturated":
        run = run_wrk(subject.url, s.saturated_s, s.connections)
    elif mode == "paced":
        run = run_paced(subject.url, s.paced_rate, s.paced_s)
    else:
        run = run_paced(subject.url, 1000.0, s.paced1000_s)
    wall = time.perf_counter() - start
    time.sleep(0.3)  # let in-flight requests finish and the log flush
    cpu, ns = cpu_seconds(subject.pid) - cpu, cpu_ns(subject.pid) - ns
    core = core_busy_seconds(PROXY_CPU) - core
    n = run["requests"] or float("nan")
    run["cpu_us"] = ns / 1e3 / n
    run["vcpu_per_krps"] = ns / 1e6 / n  # CPU seconds per second per 1,000 req/s: CPU ms per request
    run["stat_cpu_us"] = cpu * 1e6 / n
    run["busy_pct"] = ns / 1e9 / wall * 100  # how much of a core the measured process got
    if subject.name != "direct":  # the proxy is alone on its core only if nothing else runs there
        run["foreign_pct"] = max(0.0, core - ns / 1e9) / wall * 100
    if subject.events is not None:
        run["events"] = subject.count_events() - events
    return run


def rotated(items: tuple[str, ...], k: int) -> tuple[str, ...]:
    k %= len(items)
    return items[k:] + items[:k]


def bench(subjects: dict[str, Subject], s: Settings, extra: Callable[[int, Results], None] | None = None) -> Results:
    for subject in subjects.values():
        run_wrk(subject.url, s.warmup_s, s.connections)
    results = Results()
    for n in range(s.rounds):
        for mode in MODES:
            for name in rotated(tuple(subjects), n):
                run = measure(subjects[name], mode, s)
                results.add(round=n, mode=mode, subject=name, **run)
                print(f"  round {n + 1}/{s.rounds} {mode:9} {name:11} " + _brief(run), file=sys.stderr, flush=True)
        if extra is not None:  # the inbound mTLS runs of this round
            extra(n, results)
    return results


def _brief(run: dict[str, Any]) -> str:
    text = f"p50 {run['p50']:.3f} ms  p99 {run['p99']:.3f} ms  cpu {run['cpu_us']:.0f} us/req  n={run['requests']}"
    if "rps" in run:
        text = f"{run['rps']:8.0f} req/s  " + text
    text += f"  (stat {run['stat_cpu_us']:.0f})  busy {run['busy_pct']:.0f}%"
    if "foreign_pct" in run:
        text += f"  others on cpu{PROXY_CPU} {run['foreign_pct']:.0f}%"
    if run.get("errors"):
        text += f"  ERRORS {run['errors']}"
    if "events" in run:
        text += f"  events {run['events']}"
    return text


# -- report -------------------------------------------------------------------------------------

def _cell(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


METRICS = {"saturated": (("req/s", "rps", ".0f"), ("p50 ms", "p50", ".3f"), ("p99 ms", "p99", ".3f"),
                         ("CPU µs/req", "cpu_us", ".0f"),
                         ("CPU µs/req (stat ticks)", "stat_cpu_us", ".0f"), ("core busy %", "busy_pct", ".0f")),
           "paced": (("p50 ms", "p50", ".3f"), ("p99 ms", "p99", ".3f"), ("CPU µs/req", "cpu_us", ".0f")),
           "paced1000": (("p50 ms", "p50", ".3f"), ("p99 ms", "p99", ".3f"), ("CPU µs/req", "cpu_us", ".0f"),
                         ("vCPU per 1,000 req/s", "vcpu_per_krps", ".3f"))}


def report(results: Results, s: Settings, subjects: tuple[str, ...] = SUBJECTS) -> str:
    lines = [f"{s.rounds} rounds; median (min–max) over rounds; ratios taken within each round.",
             "CPU µs/req: on-CPU time of the measured process (nginx's worker for direct and nginx as proxy; "
             "schedstat, exact) / requests completed;",
             "(stat ticks): the same from utime+stime in /proc/<pid>/stat (10 ms ticks); core busy %: share "
             "of one core the measured process used.",
             ""]
    labels = {"saturated": f"saturated (wrk -t1 -c{s.connections} -d{s.saturated_s:g}s)",
              "paced": f"paced ({s.paced_rate:g} req/s for {s.paced_s:g} s)",
              "paced1000": f"paced (1,000 req/s for {s.paced1000_s:g} s)"}
    ratios = [(a, b) for a, b in RATIOS if a in subjects and b in subjects]
    if "baseline" in subjects:
        ratios.append(("sidecar", "baseline"))
    for mode in MODES:
        lines += [f"### {labels[mode]}", "",
                  "| metric | " + " | ".join(LABELS[n] for n in subjects) + " | "
                  + " | ".join(f"{a}/{b}" for a, b in ratios) + " |",
                  "|---|" + "---|" * (len(subjects) + len(ratios))]
        for label, key, fmt in METRICS[mode]:
            cells = [_cell(results.values(mode, name, key), fmt) for name in subjects]
            cells += [_cell(results.ratios(mode, key, a, b), ".2f") for a, b in ratios]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _checks(results, s)
    return "\n".join(lines)


def _checks(results: Results, s: Settings) -> list[str]:
    out = []
    sidecar = [r for r in results.runs if r["subject"] == "sidecar" and r["mode"] in MODES]
    extra = [r["events"] - r["requests"] for r in sidecar]
    errors = sum(r.get("errors", 0) for r in results.runs if r["mode"] in MODES)
    foreign = [r["foreign_pct"] for r in results.runs if "foreign_pct" in r]
    out.append(f"other processes on cpu{PROXY_CPU} during proxy runs: median {statistics.median(foreign):.0f}% "
               f"(max {max(foreign):.0f}%) of the core; load average at the end: {_loadavg()}")
    out.append(f"trust-decision events: {sum(r['events'] for r in sidecar)} for {sum(r['requests'] for r in sidecar)} "
               f"completed sidecar requests (per run, events - requests: {min(extra)}..{max(extra)}: the paced client's "
               f"uncounted warm-up request is +1; wrk does not count its <= {s.connections} requests in flight at "
               f"its stop, which the sidecar still answers and logs)")
    out.append(f"errors (non-2xx, socket errors, client failures): {errors}")
    out.append(f"sidecar build: {build_of(Path(__file__).resolve().parents[2])} (SIDECAR_MYPYC=1 python setup.py "
               f"build_ext --inplace compiles it in place; find sidecar -name '*.so' -delete undoes it)")
    ratio = statistics.median(results.ratios("saturated", "cpu_us", "sidecar", "bare"))
    out.append(f"issue 16: outbound CPU/req saturated sidecar <= 0.6x bare: {ratio:.2f}x -> "
               + ("meets" if ratio <= 0.6 else "MISSES"))
    if results.values("paced1000", "nginx_proxy", "cpu_us"):
        ratio = statistics.median(results.ratios("paced1000", "cpu_us", "sidecar", "nginx_proxy"))
        out.append(f"issue 16: paced 1,000 req/s sidecar <= 1.5x nginx as proxy's vCPU: {ratio:.2f}x -> "
                   + ("meets" if ratio <= 1.5 else "MISSES"))
    return out


def build_of(checkout: Path) -> str:
    """Whether a checkout's sidecar runs compiled (mypyc modules built in place, setup.py) or pure Python."""
    built = sorted(checkout.glob("sidecar/**/*.so"))
    return f"compiled, {len(built) - 1} modules by mypyc" if built else "pure Python"


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# -- profile ------------------------------------------------------------------------------------

def profile(path: Path, subject: str, seconds: float, tmp: Path, nginx_port: int) -> None:
    """Saturate one proxy running under cProfile (CPU-time clock); print its top functions."""
    import pstats

    if subject == "sidecar":
        proc, ports = start_sidecar(tmp, nginx_port, profile=path)
        url = f"http://127.0.0.1:{ports['outbound']}/bench/v1/bench"
    else:
        port = free_port()
        proc, url = start_bare(tmp, port, nginx_port, profile=path), f"http://127.0.0.1:{port}/v1/bench"
    try:
        cpu = cpu_ns(proc.pid)
        run = run_wrk(url, seconds, 16)
        cpu = cpu_ns(proc.pid) - cpu
    finally:
        stop(proc, timeout=30)
    print(f"profiled {subject}: {run['requests']} requests, {run['rps']:.0f} req/s, "
          f"{cpu / 1e3 / run['requests']:.0f} CPU µs/req under cProfile (about 2-3x the unprofiled cost)")
    stats = pstats.Stats(str(path))
    for key in ("cumulative", "tottime"):
        print(f"\n--- {subject}: top 40 by {key} (CPU seconds) ---")
        stats.sort_stats(key).print_stats(40)


# -- main ---------------------------------------------------------------------------------------

def _tools() -> None:
    missing = [tool for tool in ("nginx", "wrk", "taskset") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"bench: needs {', '.join(missing)} on the PATH")
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("bench: needs 2 CPUs (proxy on CPU 1; load and upstream on CPU 0)")


@dataclass
class Fleet:
    """The processes of one bench run, stopped in reverse order."""

    procs: list[tuple[subprocess.Popen[bytes], int]] = field(default_factory=list)

    def add(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> subprocess.Popen[bytes]:
        self.procs.append((proc, sig))
        return proc

    def stop(self) -> None:
        for proc, sig in reversed(self.procs):
            stop(proc, sig)


def _subjects(tmp: Path, fleet: Fleet, nginx_port: int,
              baseline: Path | None = None) -> tuple[dict[str, Subject], dict[str, int]]:
    nginx = fleet.add(start_nginx(tmp, nginx_port), signal.SIGQUIT)
    workers = children(nginx.pid)
    if len(workers) != 1:
        raise RuntimeError(f"bench: expected one nginx worker, found {workers}")
    bare_port = free_port()
    bare = fleet.add(start_bare(tmp, bare_port, nginx_port))
    lean_port = free_port()
    lean = fleet.add(start_lean(tmp, lean_port, nginx_port))
    sidecar, ports = start_sidecar(tmp, nginx_port)
    fleet.add(sidecar)
    subjects = {"direct": Subject("direct", f"http://127.0.0.1:{nginx_port}/v1/bench", workers[0]),
                "bare": Subject("bare", f"http://127.0.0.1:{bare_port}/v1/bench", bare.pid),
                "lean": Subject("lean", f"http://127.0.0.1:{lean_port}/v1/bench", lean.pid),
                "sidecar": Subject("sidecar", f"http://127.0.0.1:{ports['outbound']}/bench/v1/bench", sidecar.pid,
                                   tmp / "sidecar.out")}
    if baseline is not None:  # the same sidecar from another commit's tree, measured in the same rounds
        other, other_ports = start_sidecar(tmp, nginx_port, checkout=baseline, name="baseline")
        fleet.add(other)
        subjects["baseline"] = Subject("baseline", f"http://127.0.0.1:{other_ports['outbound']}/bench/v1/bench",
                                       other.pid, tmp / "baseline.out")
    return subjects, ports


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m tests.bench.bench_proxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, help="rounds (default 5; 2 with --quick)")
    p.add_argument("--quick", action="store_true", help="2 rounds of shorter runs, fewer samples (a few minutes)")
    p.add_argument("--json", type=Path, help="also write every run's figures to this file")
    p.add_argument("--profile", type=Path, metavar="FILE", help="profile a proxy under load with cProfile instead")
    p.add_argument("--profile-subject", choices=("sidecar", "bare"), default="sidecar")
    p.add_argument("--profile-seconds", type=float, default=15.0)
    p.add_argument("--baseline", type=Path, metavar="DIR",
                   help="also run the sidecar of another checkout (e.g. `git worktree add DIR HEAD~1`) as another "
                        "subject: sidecar/baseline is the paired ratio of this tree against that one")
    args = p.parse_args(argv)
    _tools()
    s = QUICK if args.quick else Settings()
    if args.rounds:
        s = Settings(**{**s.__dict__, "rounds": args.rounds})
    fleet = Fleet()
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as name:
        tmp = Path(name)
        try:
            if args.profile:
                fleet.add(start_nginx(tmp, nginx_port := free_port()), signal.SIGQUIT)
                profile(args.profile.resolve(), args.profile_subject, args.profile_seconds, tmp, nginx_port)
                return 0
            text, figures = _run(tmp, fleet, s, args.baseline.resolve() if args.baseline else None)
        finally:
            fleet.stop()
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"settings": s.__dict__, **figures}, indent=1))
    return 0


def _run(tmp: Path, fleet: Fleet, s: Settings, baseline: Path | None) -> tuple[str, dict[str, Any]]:
    """Every section of one bench run, in one set of processes; the report and the raw figures."""
    from tests.bench import proxy_sections as extra

    nginx_port = free_port()
    subjects, sidecar_ports = _subjects(tmp, fleet, nginx_port, baseline)
    mtls = extra.add_nginx_proxy(tmp, fleet, nginx_port, subjects, sidecar_ports)
    proxies = [n for n in ("bare", "lean", "sidecar", "nginx_proxy", "baseline") if n in subjects]
    at_ready = {n: extra.rss_fds(subjects[n].pid) for n in proxies}
    warm = {n: extra.warm_up(subjects[n], s, mtls if n == "sidecar" else None) for n in proxies}
    print(f"bench: {s}", file=sys.stderr)
    results = bench(subjects, s, lambda n, res: extra.mtls_round(mtls, s, n, res))
    latency = extra.agent_latency(subjects, s)
    memory = {}
    for n in proxies:
        requests = extra.top_up(subjects[n], results, s)
        rss, fds = extra.rss_fds(subjects[n].pid)
        memory[n] = {"rss0": at_ready[n][0], "fds0": at_ready[n][1], "rss_warm": warm[n][0], "fds_warm": warm[n][1],
                     "rss1": rss, "fds1": fds, "requests": requests}
    starts = extra.start_to_ready(tmp, nginx_port, s.starts)
    names = tuple(subjects)
    text = "\n".join([report(results, s, names), "", *extra.mtls_report(results, s),
                      *extra.agent_report(latency, names), *extra.memory_report(memory, starts)])
    return text, {"runs": results.runs, "agent_rate": {str(k): v for k, v in latency.items()}, "memory": memory,
                  "starts": starts}


if __name__ == "__main__":
    sys.exit(main())
