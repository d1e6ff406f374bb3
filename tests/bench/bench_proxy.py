"""What the sidecar's outbound path costs, against nginx direct and a bare aiohttp proxy.

Run: ``python -m tests.bench.bench_proxy`` (about 8 minutes; ``--quick`` about 2; ``--rounds N``).
Not part of the test run. Needs ``nginx``, ``wrk`` and ``taskset`` on the PATH, and 2 cores.

Four subjects, all on 127.0.0.1, measured alternately (the order rotates every round):

- ``direct``: nginx itself (``worker_processes 1``, keep-alive, a fixed 67-byte body);
- ``bare``: ``tests/bench/bare_proxy.py`` in front of that nginx (the baseline the target names:
  aiohttp's server and ``ClientSession``);
- ``lean``: ``tests/bench/lean_proxy.py``, the same pass-through on the sidecar's own forwarding
  leg (``sidecar.forward.http11``) instead of ``ClientSession``: sidecar/lean is the cost of the
  sidecar's own work over an equally lean forwarder;
- ``sidecar``: ``python -m sidecar run`` in front of it, route-prefix mode (``/bench/...``), a
  static credential, one allow rule, one trust-decision line and the metrics per request.

The measured process (the proxy; nginx's worker for ``direct``) runs on CPU 1; nginx as the
upstream, wrk and the paced client run on CPU 0 (PERFORMANCE.md). Each round and subject:

- saturated: ``wrk -t1 -c16 --latency`` -> req/s, p50, p99;
- paced: a fixed rate well under saturation (200 req/s) from an asyncio client -> p50, p99;
- sporadic: one request every 50 ms (agent-like) -> p50, p99;

and, for each run, the measured process's CPU time per completed request (utime + stime from
``/proc/<pid>/stat``). Ratios sidecar/bare and bare/direct are taken within each round and
then summarized (median, min-max): the machine is noisy, so only figures from one run compare.
The sidecar's stdout is counted to check one trust-decision event per request.

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
SUBJECTS = ("direct", "bare", "lean", "sidecar")
TARGET_RATIO = 1.3


@dataclass(frozen=True)
class Settings:
    rounds: int = 5
    saturated_s: float = 5.0
    connections: int = 16
    paced_rate: float = 200.0
    paced_s: float = 5.0
    sporadic_rate: float = 20.0  # one request every 50 ms
    sporadic_s: float = 10.0
    warmup_s: float = 2.0


QUICK = Settings(rounds=2, saturated_s=2.0, paced_s=2.0, sporadic_s=3.0, warmup_s=1.0)
MODES = ("saturated", "paced", "sporadic")


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


def wait_until(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bench: {what} exited with {proc.returncode} while starting")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
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
    ports = {name: free_port() for name in ("outbound", "health", "metrics", "admin")}
    policy = tmp / "policy.yaml"
    policy.write_text(json.dumps({"version": 1, "default": "deny", "rules": [
        {"id": "bench-allow", "direction": "outbound", "upstream": "bench", "methods": ["GET"],
         "paths": ["/**"], "effect": "allow"}]}))
    config = {
        "agent": {"name": "bench-agent", "environment": "bench"},
        "state_dir": str(tmp / "state"),
        "outbound": {"listen": f"127.0.0.1:{ports['outbound']}",
                     "upstreams": {"bench": {"url": f"http://127.0.0.1:{upstream}", "credential": "key"}}},
        "credentials": {"key": {"type": "static", "header": "X-API-Key", "value": {"value": SECRET}}},
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


def run_paced(url: str, rate: float, seconds: float) -> dict[str, float]:
    cmd = ["taskset", "-c", LOAD_CPU, sys.executable, "-m", "tests.bench.bench_proxy", "client",
           "--url", url, "--rate", str(rate), "--seconds", str(seconds)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    return json.loads(out)


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
        run = run_paced(subject.url, s.sporadic_rate, s.sporadic_s)
    wall = time.perf_counter() - start
    time.sleep(0.3)  # let in-flight requests finish and the log flush
    cpu, ns = cpu_seconds(subject.pid) - cpu, cpu_ns(subject.pid) - ns
    core = core_busy_seconds(PROXY_CPU) - core
    n = run["requests"] or float("nan")
    run["cpu_us"] = ns / 1e3 / n
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


def bench(subjects: dict[str, Subject], s: Settings) -> Results:
    for subject in subjects.values():
        run_wrk(subject.url, s.warmup_s, s.connections)
    results = Results()
    for n in range(s.rounds):
        for mode in MODES:
            for name in rotated(tuple(subjects), n):
                run = measure(subjects[name], mode, s)
                results.add(round=n, mode=mode, subject=name, **run)
                print(f"  round {n + 1}/{s.rounds} {mode:9} {name:7} " + _brief(run), file=sys.stderr, flush=True)
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
           "sporadic": (("p50 ms", "p50", ".3f"), ("p99 ms", "p99", ".3f"), ("CPU µs/req", "cpu_us", ".0f"))}


def report(results: Results, s: Settings, subjects: tuple[str, ...] = SUBJECTS) -> str:
    lines = [f"{s.rounds} rounds; median (min–max) over rounds; ratios taken within each round.",
             "CPU µs/req: on-CPU time of the measured process (nginx's worker for direct; schedstat, exact) / "
             "requests completed;",
             "(stat ticks): the same from utime+stime in /proc/<pid>/stat (10 ms ticks); core busy %: share "
             "of one core the measured process used.",
             ""]
    labels = {"saturated": f"saturated (wrk -t1 -c{s.connections} -d{s.saturated_s:g}s)",
              "paced": f"paced ({s.paced_rate:g} req/s for {s.paced_s:g} s)",
              "sporadic": f"sporadic (one request every {1000 / s.sporadic_rate:g} ms for {s.sporadic_s:g} s)"}
    for mode in MODES:
        baseline = "baseline" in subjects
        lines += [f"### {labels[mode]}", "",
                  "| metric | direct (nginx) | bare aiohttp | lean | sidecar | " + ("baseline | " if baseline else "")
                  + "sidecar/bare | sidecar/lean | bare/direct |" + (" sidecar/baseline |" if baseline else ""),
                  "|---|---|---|---|---|---|---|---|" + ("---|---|" if baseline else "")]
        for label, key, fmt in METRICS[mode]:
            cells = [_cell(results.values(mode, name, key), fmt) for name in subjects]
            cells += [_cell(results.ratios(mode, key, "sidecar", "bare"), ".2f"),
                      _cell(results.ratios(mode, key, "sidecar", "lean"), ".2f"),
                      _cell(results.ratios(mode, key, "bare", "direct"), ".2f")]
            if baseline:
                cells.append(_cell(results.ratios(mode, key, "sidecar", "baseline"), ".3f"))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _checks(results, s)
    return "\n".join(lines)


def _checks(results: Results, s: Settings) -> list[str]:
    out = []
    sidecar = [r for r in results.runs if r["subject"] == "sidecar"]
    extra = [r["events"] - r["requests"] for r in sidecar]
    errors = sum(r.get("errors", 0) for r in results.runs)
    foreign = [r["foreign_pct"] for r in results.runs if "foreign_pct" in r]
    out.append(f"other processes on cpu{PROXY_CPU} during proxy runs: median {statistics.median(foreign):.0f}% "
               f"(max {max(foreign):.0f}%) of the core; load average at the end: {_loadavg()}")
    out.append(f"trust-decision events: {sum(r['events'] for r in sidecar)} for {sum(r['requests'] for r in sidecar)} "
               f"completed sidecar requests (per run, events - requests: {min(extra)}..{max(extra)}: the paced client's "
               f"uncounted warm-up request is +1; wrk does not count its <= {s.connections} requests in flight at "
               f"its stop, which the sidecar still answers and logs)")
    out.append(f"errors (non-2xx, socket errors, client failures): {errors}")
    for mode in MODES:
        ratio = statistics.median(results.ratios(mode, "cpu_us", "sidecar", "bare"))
        verdict = "meets" if ratio <= TARGET_RATIO else "MISSES"
        lean = statistics.median(results.ratios(mode, "cpu_us", "sidecar", "lean"))
        out.append(f"target CPU/req sidecar <= {TARGET_RATIO}x bare, {mode}: {ratio:.2f}x -> {verdict} "
                   f"(sidecar/lean {lean:.2f}x: the sidecar's own work over the same forwarding leg)")
    return out


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


def _subjects(tmp: Path, fleet: Fleet, nginx_port: int, baseline: Path | None = None) -> dict[str, Subject]:
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
    return subjects


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        return _client_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m tests.bench.bench_proxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, help="rounds (default 5; 2 with --quick)")
    p.add_argument("--quick", action="store_true", help="2 rounds of shorter runs (about a minute)")
    p.add_argument("--json", type=Path, help="also write every run's figures to this file")
    p.add_argument("--profile", type=Path, metavar="FILE", help="profile a proxy under load with cProfile instead")
    p.add_argument("--profile-subject", choices=("sidecar", "bare"), default="sidecar")
    p.add_argument("--profile-seconds", type=float, default=15.0)
    p.add_argument("--baseline", type=Path, metavar="DIR",
                   help="also run the sidecar of another checkout (e.g. `git worktree add DIR HEAD~1`) as a fifth "
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
            subjects = _subjects(tmp, fleet, free_port(), args.baseline.resolve() if args.baseline else None)
            print(f"bench: {s}", file=sys.stderr)
            results = bench(subjects, s)
        finally:
            fleet.stop()
    print(report(results, s, tuple(subjects)))
    if args.json:
        args.json.write_text(json.dumps({"settings": s.__dict__, "runs": results.runs}, indent=1))
    return 0


def _client_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench_proxy client")
    p.add_argument("--url", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--seconds", type=float, required=True)
    args = p.parse_args(argv)
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    print(json.dumps(run(paced_client(args.url, args.rate, args.seconds))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
