"""The parts of ``bench_proxy`` beyond the per-round proxy modes (issue 16 item 4).

- inbound mTLS, every round: kept-alive CPU µs/request through the sidecar's inbound listener to
  the loopback agent (nginx) against nginx terminating mTLS in front of the same agent, and the same
  client on the sidecar's outbound listener (the outbound path); then new mTLS connections per
  second, full handshakes and resumed sessions, against both, with failures and CPU µs per
  connection;
- agent-rate latency, once per run: sequential, kept-alive requests at 20 and 200 ticks a second,
  each tick one request to every subject and to direct, so each subject's latency is paired with a
  direct request made within milliseconds of it; the paired differences' p50 and p99, with their
  spread over four blocks of the samples;
- RSS and open FDs of every Python proxy at ready and after ``rss_requests`` requests;
- start to ready of fresh sidecars (and their CPU time to get there).
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.bench.bench_proxy import (
    CALLER, LABELS, Fleet, Results, Settings, Subject, cpu_ns, cpu_seconds, free_port, http_ok, percentile,
    run_client, run_wrk, sidecar_config, start_nginx_proxy, stop, wait_until,
)

TLS_SUBJECTS = ("sidecar_in", "nginx_mtls")


@dataclass
class Mtls:
    """Where the mTLS runs go: the sidecar's inbound listener and nginx terminating mTLS."""

    sidecar_in: Subject
    nginx_mtls: Subject
    outbound: Subject  # the sidecar's outbound listener, driven by the same client
    files: dict[str, str]  # ca, cert, key of the caller


def svids(state_dir: Path, tmp: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """The caller's SVID and nginx's server certificate, from the sidecar's own dev CA."""
    from sidecar.identity.ca import ca_issue

    caller = ca_issue(state_dir, CALLER, tmp / "caller")
    server = ca_issue(state_dir, "spiffe://sidecar.local/bench-nginx", tmp / "nginx-svid")
    return caller, server


def add_nginx_proxy(tmp: Path, fleet: Fleet, nginx_port: int, subjects: dict[str, Subject],
                    sidecar_ports: dict[str, int]) -> Mtls:
    """nginx as reverse proxy (a subject of the rounds) and the mTLS subjects."""
    from tests.bench.bench_proxy import children

    caller, server = svids(tmp / "sidecar" / "state", tmp)
    port, tls_port = free_port(), free_port()
    proc = fleet.add(start_nginx_proxy(tmp, port, tls_port, nginx_port, server))
    [worker] = children(proc.pid)
    subjects["nginx_proxy"] = Subject("nginx_proxy", f"http://127.0.0.1:{port}/v1/bench", worker)
    sidecar = subjects["sidecar"]
    files = {"ca": str(caller["bundle"]), "cert": str(caller["cert"]), "key": str(caller["key"])}
    return Mtls(Subject("sidecar_in", f"https://127.0.0.1:{sidecar_ports['inbound']}/v1/bench", sidecar.pid,
                        sidecar.events),
                Subject("nginx_mtls", f"https://127.0.0.1:{tls_port}/v1/bench", worker),
                Subject("outbound", sidecar.url, sidecar.pid), files)


def mtls_round(m: Mtls, s: Settings, n: int, results: Results) -> None:
    """One round of the inbound mTLS runs, recorded as modes ``tls`` and ``handshake_full|resumed``."""
    for subject in (m.sidecar_in, m.nginx_mtls, m.outbound):
        before = cpu_ns(subject.pid)
        run = run_client("tls", s.tls_s, url=subject.url, seconds=s.tls_s, connections=s.tls_connections,
                         **m.files)
        time.sleep(0.2)
        ns = cpu_ns(subject.pid) - before
        run["cpu_us"] = ns / 1e3 / max(run["requests"], 1)
        results.add(round=n, mode="tls", subject=subject.name, **run)
        _say(n, s, "tls", subject.name, f"{run['requests'] / run['seconds']:7.0f} req/s  cpu {run['cpu_us']:.0f} "
                                        f"us/req  errors {run['errors']}")
    for kind in ("full", "resumed"):
        for subject in (m.sidecar_in, m.nginx_mtls):
            host, port = subject.url.split("/")[2].split(":")
            before = cpu_ns(subject.pid)
            run = run_client("handshakes", s.handshake_s, host=host, port=int(port), seconds=s.handshake_s,
                             threads=s.handshake_threads, resume=kind == "resumed", **m.files)
            time.sleep(0.2)
            ns = cpu_ns(subject.pid) - before
            run["per_s"] = run["connections"] / run["seconds"]
            run["cpu_us"] = ns / 1e3 / max(run["connections"], 1)
            results.add(round=n, mode=f"handshake_{kind}", subject=subject.name, **run)
            _say(n, s, f"hs {kind}", subject.name, f"{run['per_s']:6.0f} conn/s  cpu {run['cpu_us']:.0f} us/conn  "
                                                  f"resumed {run['resumed']}  failures {run['failures']}")


def _say(n: int, s: Settings, mode: str, name: str, text: str) -> None:
    print(f"  round {n + 1}/{s.rounds} {mode:9} {name:11} {text}", file=sys.stderr, flush=True)


def agent_latency(subjects: dict[str, Subject], s: Settings) -> dict[float, dict[str, Any]]:
    """Per rate, every subject's and direct's samples from one sequential, interleaved run."""
    urls = {name: subject.url for name, subject in subjects.items()}
    out = {}
    for rate in s.agent_rates:
        print(f"  agent-rate {rate:g}/s: {s.agent_samples} ticks x {len(urls)} requests", file=sys.stderr, flush=True)
        out[rate] = run_client("agent", s.agent_samples / rate, urls=urls, rate=rate, samples=s.agent_samples)
    return out


def paired(times: dict[str, list[float]], name: str) -> dict[str, list[float]]:
    """p50 and p99 of (subject - direct) per tick, over the whole run and over four blocks of it."""
    diffs = [a - b for a, b in zip(times[name], times["direct"]) if not (math.isnan(a) or math.isnan(b))]
    blocks = [diffs[i::4] for i in range(4)] if len(diffs) >= 40 else [diffs]
    return {q: [percentile(diffs, float(q[1:]))] + [percentile(b, float(q[1:])) for b in blocks]
            for q in ("p50", "p99")}


def rss_fds(pid: int) -> tuple[float, int]:
    """Resident set (MiB) and open file descriptors of a process."""
    rss_kb = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if line.startswith("VmRSS:"))
    return rss_kb / 1024, len(list(Path(f"/proc/{pid}/fd").iterdir()))


WARM_UP_S = 2.0


def warm_up(subject: Subject, s: Settings, mtls: Mtls | None = None) -> tuple[float, int]:
    """RSS and FDs once the subject has served a first burst (``wrk`` for WARM_UP_S; for the sidecar, new
    and kept-alive mTLS connections too: its first TLS connections take about 6 MiB, once): caches,
    pools and buffers allocated, the base that "flat" is measured from."""
    run_wrk(subject.url, WARM_UP_S, s.connections)
    if mtls is not None:
        host, port = mtls.sidecar_in.url.split("/")[2].split(":")
        for resume in (False, True):
            run_client("handshakes", 1.0, host=host, port=int(port), seconds=1.0, threads=s.handshake_threads,
                       resume=resume, **mtls.files)
        run_client("tls", 1.0, url=mtls.sidecar_in.url, seconds=1.0, connections=s.tls_connections, **mtls.files)
    return rss_fds(subject.pid)


def served(results: Results, name: str) -> int:
    """Requests a subject completed in the rounds so far."""
    return sum(int(r.get("requests", 0)) for r in results.runs if r["subject"] == name)


def top_up(subject: Subject, results: Results, s: Settings) -> int:
    """wrk on ``subject`` until it has served ``rss_requests`` since its warm-up (rounds included); the total."""
    total = served(results, subject.name)
    while total < s.rss_requests:
        total += int(run_wrk(subject.url, 3.0, s.connections)["requests"])
    return total


def start_to_ready(tmp: Path, upstream: int, count: int) -> list[dict[str, float]]:
    """Fresh sidecars (new state dirs: a dev CA each) started one at a time: seconds to /readyz, CPU by then.

    As deployed: the bytecode compiled first (as ``pip install`` does), into a cache of this run's own
    (``PYTHONPYCACHEPREFIX``, which then holds every module's, the standard library's too), whatever
    ``PYTHONDONTWRITEBYTECODE`` says; else every start would compile the whole package again (0.3-0.4 s
    of CPU here) and the figure would measure the compiler. One uncounted import fills the cache."""
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
    subprocess.run([sys.executable, "-c", "import sidecar.app, sidecar.cli, sidecar.credentials.static"],
                   env=env, cwd=root, check=True)
    runs = []
    for i in range(count):
        work = tmp / f"start-{i}"
        work.mkdir()
        config, ports = sidecar_config(work, upstream)
        started = time.perf_counter()
        proc = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-m", "sidecar", "run", "-c", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root, env=env)
        try:
            wait_until(lambda: http_ok(f"http://127.0.0.1:{ports['health']}/readyz"), 60, "sidecar", proc, poll=0.005)
            runs.append({"seconds": time.perf_counter() - started, "cpu_s": cpu_seconds(proc.pid)})
        finally:
            stop(proc)
    return runs


# -- report -------------------------------------------------------------------------------------

def _cell(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def mtls_report(results: Results, s: Settings) -> list[str]:
    lines = [f"### inbound mTLS (kept alive: {s.tls_connections} connections, {s.tls_s:g} s; new connections: "
             f"{s.handshake_threads} threads, {s.handshake_s:g} s, one GET each)", "",
             "| metric | sidecar inbound | nginx terminating mTLS | sidecar outbound (same client) | "
             "inbound/outbound | sidecar/nginx |", "|---|---|---|---|---|---|"]
    tls = ("sidecar_in", "nginx_mtls", "outbound")
    lines.append("| kept-alive CPU µs/req | " + " | ".join(_cell(results.values("tls", n, "cpu_us"), ".0f") for n in tls)
                 + f" | {_cell(results.ratios('tls', 'cpu_us', 'sidecar_in', 'outbound'), '.2f')} | "
                 f"{_cell(results.ratios('tls', 'cpu_us', 'sidecar_in', 'nginx_mtls'), '.2f')} |")
    for kind in ("full", "resumed"):
        mode = f"handshake_{kind}"
        for label, key, fmt in ((f"new connections/s, {kind}", "per_s", ".0f"),
                                (f"CPU µs per new connection, {kind}", "cpu_us", ".0f")):
            cells = [_cell(results.values(mode, n, key), fmt) for n in TLS_SUBJECTS]
            lines.append(f"| {label} | {cells[0]} | {cells[1]} | - | - | "
                         f"{_cell(results.ratios(mode, key, 'sidecar_in', 'nginx_mtls'), '.2f')} |")
        fails = {n: sum(int(v) for v in results.values(mode, n, "failures")) for n in TLS_SUBJECTS}
        resumed = {n: sum(int(v) for v in results.values(mode, n, "resumed")) for n in TLS_SUBJECTS}
        lines.append(f"| failures / resumed, {kind} | {fails['sidecar_in']} / {resumed['sidecar_in']} | "
                     f"{fails['nginx_mtls']} / {resumed['nginx_mtls']} | - | - | - |")
    errors = {n: sum(int(v) for v in results.values("tls", n, "errors")) for n in tls}
    lines += [f"kept-alive errors: {errors}", ""]
    ratio = statistics.median(results.ratios("tls", "cpu_us", "sidecar_in", "outbound") or [math.nan])
    hs = statistics.median(results.ratios("handshake_full", "per_s", "sidecar_in", "nginx_mtls") or [math.nan])
    lines.append(f"issue 16: inbound kept-alive <= 2x outbound CPU/req: {ratio:.2f}x -> "
                 + ("meets" if ratio <= 2 else "MISSES")
                 + f"; new mTLS connections >= 50 % of nginx's: {hs * 100:.0f} % -> " + ("meets" if hs >= 0.5 else "MISSES")
                 + " (failures must be 0)")
    return lines + [""]


def agent_report(latency: dict[float, dict[str, Any]], subjects: tuple[str, ...]) -> list[str]:
    lines = []
    others = [n for n in subjects if n != "direct"]
    for rate, run in latency.items():
        times = run["times_ms"]
        n = len(times["direct"])
        lines += [f"### agent rate: {rate:g} req/s, sequential, kept alive, {n} samples per subject, each paired "
                  f"with a direct request of the same tick", "",
                  "| metric | direct (nginx) | " + " | ".join(LABELS[x] for x in others) + " |",
                  "|---|" + "---|" * (len(others) + 1)]
        for q in ("p50", "p99"):
            raw = [percentile([t for t in times[x] if not math.isnan(t)], float(q[1:])) for x in ("direct", *others)]
            lines.append(f"| {q} ms | " + " | ".join(f"{v:.3f}" for v in raw) + " |")
        for q in ("p50", "p99"):
            cells = []
            for x in others:
                whole, *blocks = paired(times, x)[q]
                cells.append(f"+{whole:.3f} ({min(blocks):.3f}–{max(blocks):.3f})")
            lines.append(f"| added {q} ms (paired; spread over 4 blocks) | - | " + " | ".join(cells) + " |")
        lines.append(f"| errors | " + " | ".join(str(run["errors"][x]) for x in ("direct", *others)) + " |")
        if rate == 20 and "sidecar" in others:
            p50, p99 = paired(times, "sidecar")["p50"][0], paired(times, "sidecar")["p99"][0]
            lines += ["", f"issue 16: added latency at 20 req/s p50 <= 0.4 ms, p99 <= 2.0 ms: +{p50:.3f} / +{p99:.3f} "
                          "-> " + ("meets" if p50 <= 0.4 and p99 <= 2.0 else "MISSES")]
        lines.append("")
    return lines


def memory_report(memory: dict[str, dict[str, float]], starts: list[dict[str, float]]) -> list[str]:
    lines = ["### memory and start", "",
             "| subject | RSS MiB at ready | after warm-up | after the requests | requests | FDs at ready | "
             "after warm-up | after the requests |", "|---|---|---|---|---|---|---|---|"]
    for name, m in memory.items():
        lines.append(f"| {LABELS.get(name, name)} | {m['rss0']:.1f} | {m['rss_warm']:.1f} | {m['rss1']:.1f} | "
                     f"{int(m['requests'])} | {int(m['fds0'])} | {int(m['fds_warm'])} | {int(m['fds1'])} |")
    seconds = [r["seconds"] for r in starts]
    cpu = [r["cpu_s"] for r in starts]
    lines += ["", f"start to ready (fresh sidecar, /readyz polled every 5 ms): {_cell(seconds, '.3f')} s, "
                  f"CPU by then {_cell(cpu, '.2f')} s (10 ms ticks), {len(starts)} starts"]
    side = memory.get("sidecar")
    if side:
        flat = abs(side["rss1"] - side["rss_warm"]) <= 2
        lines.append(f"issue 16: RSS <= 60 MiB at ready and flat (± 2 MiB after warm-up): {side['rss0']:.1f} at ready, "
                     f"{side['rss_warm']:.1f} -> {side['rss1']:.1f} MiB -> "
                     + ("meets" if side["rss0"] <= 60 and flat else "MISSES")
                     + f"; start to ready <= 0.5 s: {statistics.median(seconds):.3f} s -> "
                     + ("meets" if statistics.median(seconds) <= 0.5 else "MISSES"))
    return lines + [""]
