"""A long soak of a real ``sidecar run``: a million requests with refreshes, reloads and rotations.

    python -m tests.bench.soak_long                       # 1,000,000 requests (3-5 minutes here), not warmed up
    python -m tests.bench.soak_long --requests 1000000 --min-seconds 1800 --rate 150   # warmed up, then 15 minutes
    python -m tests.bench.soak_long --requests 300000 --trace-memory /tmp/mem   # snapshots: tests/bench/memtrace.py

The chaos harness's world (tests/chaos/run.py: watched SVID files, inbound mTLS, a static and an OAuth
upstream, a Redis bus) with: ``wrk`` on the outbound listener (the static upstream, kept-alive) for the
bulk, the harness's mixed traffic beside it (every kind of tests/chaos/run.py: OAuth, a denied path, inbound
mTLS with and without a human token, SSE, WebSocket, CONNECT, MCP), OAuth tokens that live 65 s (a refresh
about every 60 s), a policy reload every 10 s and an SVID rotation every 30 s. The sidecar's output is
counted by a process of its own; its watchdog reports every stall over 50 ms.

Every ``--sample`` seconds a row: requests so far, the sidecar's RSS and open file descriptors, its
asyncio tasks and pooled upstream connections (``sidecar_asyncio_tasks``, ``sidecar_upstream_connections``),
the share of a core it ran and waited runnable for one (``schedstat``: a stall while it waited is the
machine's), the load average. At the end: whether RSS, FDs, tasks and pooled connections stayed flat after
the warm-up (the median of the last three samples within 10 % / 16 / 16 / 16 of that of the first three
after it), the loop-lag p99 and histogram over the whole run and the watchdog's stall reports (count, and
where the loop was), trust-decision events against exchanges (equal: wrk's are counted at the upstream, those
in flight when a wrk run stops included), every mixed answer other than policy's and every wrk answer not
2xx. Exit 1 when something grew, was lost or was unexplained.

The warm-up is over once the sidecar's bounded tables are full, since until then they grow by design: the
interception leaves (1,024 host names, ~19.5 KiB each, most of it OpenSSL's: each CONNECT here names a new
host), the MCP session bindings (10,000: each ``initialize`` opens a session its client never ends), the
ended tasks' tombstones and the credential cache's ended-task ids (10,000 each: every human-token call
opens a task that ends with its answer) and the JWT result cache (1,024 tokens). The first sample after
10,000 MCP and human calls and 1,024 CONNECTs is the baseline: at the default ``--rate`` of 40 mixed
requests a second that takes 42 minutes, so a shorter run raises ``--rate``; one that never warms up
says so and fails.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import shutil
import subprocess
import tempfile
import signal
import statistics
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.chaos.run import REFUSED, Traffic, World, _as_policy_says

WRK_LUA = 'wrk.headers["Connection"] = "keep-alive"\n'
WRK_PATH = "/plain/ok?by=wrk"  # the upstream counts these: wrk's exchanges, those in flight at its stop included
# the watchdog reports every stall over 50 ms (at most one a second), so that the soak names what held the loop
OBSERVABILITY = {"stall_threshold": "50ms", "loop_sample_interval": "10ms", "stall_report_interval": "1s"}


class LongWorld(World):
    """The chaos world with its output counted as it streams (a million events would fill the disk), by a
    process of its own: a reader thread here shares the GIL with the peers and the traffic, falls behind at
    thousands of lines a second, and the sidecar's bounded log buffer then drops lines (as it should)."""

    def __init__(self, tmp: Path, trace_memory: Path | None = None) -> None:
        super().__init__(tmp)
        self.counted_file = tmp / "counted.json"
        self.counter: subprocess.Popen[bytes] | None = None
        self.trace_memory = trace_memory
        self.event_count = 0
        self.other_lines: collections.Counter[str] = collections.Counter()
        self.stalls: list[dict] = []  # the watchdog's reports (warnings, explained: not counted as other)
        self.other: list[bytes] = []  # the first warning and error lines, whole, to explain them
        self.wrk_hits = 0  # requests wrk made that reached the upstream
        serve = self.upstream._serve

        async def counted(request: web.Request) -> web.StreamResponse:
            if request.query.get("by") == "wrk":
                self.wrk_hits += 1
            return await serve(request)

        self.upstream._serve = counted  # type: ignore[method-assign]

    def config(self) -> dict:
        # the default log buffer, not the chaos world's 64 KiB (which it keeps small so that a stalled stdout is
        # felt within seconds): at thousands of lines a second that is ~70 ms of output, and a counter that waits
        # that long for a core on a loaded machine made the sidecar drop 12 non-decision lines in 30 minutes
        config = super().config() | {"observability": OBSERVABILITY}
        config["logging"] = {}
        return config

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        if self.trace_memory is not None:  # python -m tests.bench.memtrace DIR run ... instead of -m sidecar
            argv = [argv[0], "-m", "tests.bench.memtrace", str(self.trace_memory), *argv[3:]]
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.counter = subprocess.Popen([sys.executable, "-m", "tests.bench.soak_long", "--count",
                                         str(self.counted_file)], stdin=process.stdout)
        assert process.stdout is not None
        process.stdout.close()  # the counter's now
        return process

    def collect(self) -> None:
        """After the sidecar exited: what the counter counted."""
        assert self.counter is not None
        self.counter.wait(60)
        counted = json.loads(self.counted_file.read_text())
        self.event_count, self.stalls = counted["events"], counted["stalls"]
        self.other_lines.update(counted["other_lines"])
        self.other = [line.encode() for line in counted["other"]]

    def events(self) -> int:
        return self.event_count


def count(out: Path) -> int:
    """``--count FILE``: the sidecar's output on stdin, counted; at its end the counts as JSON in FILE."""
    events, stalls, lines, other = 0, [], collections.Counter[str](), []
    for line in sys.stdin.buffer:
        if b'"event":"trust_decision"' in line:
            events += 1
        elif b'"event":"event_loop_stalled"' in line:
            stalls.append(json.loads(line))
        elif b'"level":"error"' in line or b'"level":"warning"' in line:
            match = re.search(rb'"event":"([^"]+)"', line)
            lines[match.group(1).decode() if match else "?"] += 1
            if len(other) < 20:
                other.append(line.decode(errors="replace"))
    out.write_text(json.dumps({"events": events, "stalls": stalls, "other_lines": lines, "other": other}))
    return 0


def sched(pid: int) -> tuple[int, int]:
    """Nanoseconds ``pid``'s threads ran, and waited runnable for a core (``/proc/<pid>/task/*/schedstat``):
    a stall while the sidecar waited for a core is the machine's, not a blocking call's."""
    ran = waited = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "schedstat").read_text().split()
        except OSError:
            continue  # the thread ended
        ran, waited = ran + int(fields[0]), waited + int(fields[1])
    return ran, waited


def sample(pid: int) -> tuple[float, int]:
    """RSS in MiB and open file descriptors of ``pid``."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
    return rss, len(list(Path(f"/proc/{pid}/fd").iterdir()))


async def metrics(world: World) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{world.ports['metrics']}/metrics") as r:
            return await r.text()


def gauges(text: str) -> tuple[int, int]:
    """asyncio tasks and pooled upstream connections (open, every pool), from one scrape."""
    tasks = pooled = 0.0
    for line in text.splitlines():
        if line.startswith("sidecar_asyncio_tasks "):
            tasks = float(line.rsplit(" ", 1)[1])
        elif line.startswith("sidecar_upstream_connections{") and 'state="open"' in line:
            pooled += float(line.rsplit(" ", 1)[1])
    return int(tasks), int(pooled)


def loop_lag_p99(text: str) -> str:
    """The upper bound of the histogram bucket holding the 99th percentile of the loop's lag."""
    buckets = [(line.split('le="')[1].split('"')[0], float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("sidecar_event_loop_lag_seconds_bucket")]
    total = buckets[-1][1]
    bound = next(le for le, n in buckets if n >= 0.99 * total)
    return f"<= {float(bound) * 1000:g} ms over {total:g} samples" if bound != "+Inf" else f"over 60 s ({total:g})"


def wrk(port: int, seconds: int, script: Path) -> tuple[int, int]:
    """Requests completed by one wrk run of ``seconds`` on the static upstream's allowed path, and how many
    of those were not answered 2xx."""
    out = subprocess.run(["wrk", "-t1", "-c16", f"-d{seconds}s", "-s", str(script),
                          f"http://127.0.0.1:{port}{WRK_PATH}"], capture_output=True, text=True, timeout=seconds + 30)
    match = re.search(r"(\d+) requests in", out.stdout)
    if match is None:
        raise SystemExit(f"soak: wrk printed no request count: {out.stdout} {out.stderr}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out.stdout)
    errors = re.search(r"Socket errors: (.*)", out.stdout)
    if non2xx or errors:
        print(f"  wrk: {non2xx.group(1) if non2xx else 0} answers were not 2xx; {errors.group(1) if errors else ''}")
    return int(match.group(1)), int(non2xx.group(1)) if non2xx else 0


async def rotations(world: World, stop: asyncio.Event) -> collections.Counter[str]:
    """A policy reload every 10 s and an SVID rotation every 30 s, on a schedule (a late wake-up on a loaded
    machine neither skips one nor does one twice)."""
    done: collections.Counter[str] = collections.Counter()
    began = time.monotonic()
    tick = 0
    while not stop.is_set():
        tick += 1
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, began + 10 * tick - time.monotonic()))
            break
        except TimeoutError:
            pass
        world.write_policy(f"reload {tick}")
        done["policy reloads"] += 1
        if tick % 3 == 0:
            await asyncio.to_thread(world.rotate_svid)
            done["svid rotations"] += 1
    return done


async def main_async(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        raise SystemExit("soak: wrk is needed on the PATH (apt-get install wrk)")
    with tempfile.TemporaryDirectory() as tmp:
        world = LongWorld(Path(tmp), Path(args.trace_memory) if args.trace_memory else None)
        world.tokens.lifetime = 65
        await world.start()
        assert world.sidecar is not None
        script = Path(tmp) / "keepalive.lua"
        script.write_text(WRK_LUA)
        traffic = Traffic(world.clients(), args.rate)
        traffic.start()
        stop = asyncio.Event()
        rotating = asyncio.ensure_future(rotations(world, stop))
        rows, total, refused, began = [], 0, 0, time.monotonic()
        last, (ran, waited) = began, sched(world.sidecar.pid)
        try:
            while total < args.requests or time.monotonic() - began < args.min_seconds:
                completed, not2xx = await asyncio.to_thread(wrk, world.ports["outbound"], args.sample, script)
                total, refused = total + completed, refused + not2xx
                if args.trace_memory:
                    world.sidecar.send_signal(signal.SIGUSR1)
                rss, fds = sample(world.sidecar.pid)
                tasks, pooled = gauges(await metrics(world))
                now, (ran_now, waited_now) = time.monotonic(), sched(world.sidecar.pid)
                cpu, wait = ((n - o) / 1e9 / (now - last) * 100 for n, o in ((ran_now, ran), (waited_now, waited)))
                last, ran, waited = now, ran_now, waited_now
                rows.append((time.monotonic() - began, total + len(traffic.outcomes), rss, fds, tasks, pooled,
                             warmed(traffic)))
                print(f"{rows[-1][0]:7.0f}s {rows[-1][1]:>9} requests  RSS {rss:6.1f} MiB  FDs {fds:4}  "
                      f"tasks {tasks:4}  pooled {pooled:3}  CPU {cpu:3.0f}% waiting for a core {wait:3.0f}%  "
                      f"load {Path('/proc/loadavg').read_text().split()[0]}  mixed {len(traffic.outcomes)}"
                      f"{'' if rows[-1][6] else ' (warming up)'}",
                      flush=True)
        finally:
            stop.set()
            done = await rotating
            await traffic.stop()
            await asyncio.sleep(2.0)
            text = await metrics(world)
            lag, lags = loop_lag_p99(text), loop_lag_buckets(text)
            tokens = world.tokens.hits
            alive = world.sidecar.poll() is None
            await world.stop()
            world.collect()
            events = world.events()
    print(f"loop lag p99 {lag} ({lags}); {stall_summary(world.stalls)}")
    print(f"token endpoint calls {tokens} over {rows[-1][0]:.0f} s (tokens live {world.tokens.lifetime} s)")
    return report(rows, total, refused, traffic, events, done, world, alive)


def loop_lag_buckets(text: str) -> str:
    """How many of the loop-lag samples were later than each bound from 5 ms up."""
    buckets = [(line.split('le="')[1].split('"')[0], float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("sidecar_event_loop_lag_seconds_bucket")]
    total = buckets[-1][1]
    return ", ".join(f"> {float(le) * 1000:g} ms: {total - n:g}" for le, n in buckets
                     if le != "+Inf" and 0.005 <= float(le) <= 1)


def stall_summary(stalls: list[dict]) -> str:
    if not stalls:
        return "the watchdog reported no stall"
    worst = max(stalls, key=lambda r: r["late_ms"])
    where = collections.Counter(" <- ".join(reversed(r["stack"][-3:])) for r in stalls)
    return (f"the watchdog reported {len(stalls)} stalls over {stalls[0]['threshold_ms']} ms "
            f"(+{sum(r['unreported_stalls'] for r in stalls)} unreported); the longest, {worst['late_ms']} ms, in "
            f"{' <- '.join(reversed(worst['stack'][-3:]))}; where the loop was at each report:\n    "
            + "\n    ".join(f"{n} x {frames}" for frames, n in where.most_common()))


Row = tuple[float, int, float, int, int, int, bool]  # seconds, requests, RSS MiB, FDs, tasks, pooled, warmed up
# the sidecar's bounded tables, full once this many requests of a kind were made (the module's docstring)
FILLS = {"mcp": 10_000, "human": 10_000, "connect": 1_024}


def warmed(traffic: Traffic) -> bool:
    made = kinds(traffic)
    return all(made[kind] >= n for kind, n in FILLS.items())


def report(rows: list[Row], wrk_total: int, wrk_refused: int, traffic: Traffic, events: int,
           done: collections.Counter[str], world: LongWorld, alive: bool) -> int:
    warm = next((row for row in rows if row[6]), None)
    last = rows[-1]
    if warm is None or warm is last:
        print(f"never warmed up: the bounded tables were still filling at the end ({dict(kinds(traffic))} against "
              f"{FILLS}); RSS not judged (run longer, or raise --rate)")
        warm = rows[min(1, len(rows) - 1)]
    # the median of the last three samples against that of the first three after warm-up: FDs and tasks move
    # by the mixed requests in flight at the moment of a sample (tens at --rate 150), a trend does not
    begin, end = rows[rows.index(warm):][:3], rows[-3:]
    first, final = ([statistics.median(r[i] for r in part) for i in range(2, 6)] for part in (begin, end))
    grew = (final[0] > first[0] * 1.10 or any(b > a + 16 for a, b in zip(first[1:], final[1:]))
            or not last[6] or warm is last)
    # wrk does not count the requests in flight when it stops (the sidecar still answers and logs them: up to
    # 16 a run); the upstream counts every one that reached it, so that is wrk's exchanges, exactly, when the
    # sidecar refused none of them (any refusal of wrk's allowed path is unexplained, and fails the soak)
    exchanges = world.wrk_hits + len(traffic.outcomes)
    in_flight = world.wrk_hits - wrk_total
    odd = collections.Counter(f"{o.kind} {o.status} {o.reason or o.error}" for o in traffic.outcomes
                              if not _as_policy_says(o))
    print(f"requests {wrk_total + len(traffic.outcomes)} (wrk {wrk_total} in {len(rows)} runs, mixed "
          f"{len(traffic.outcomes)}: {', '.join(f'{k} {v}' for k, v in sorted(kinds(traffic).items()))})")
    print(f"exchanges {exchanges} (wrk's reaching the upstream {world.wrk_hits}: {in_flight} in flight at its "
          f"stops; mixed {len(traffic.outcomes)}); trust-decision events {events}: "
          f"{'equal' if events == exchanges else f'{events - exchanges:+} against exchanges'}")
    after = rows[rows.index(warm):]
    print("medians of the first and last three samples after warm-up: RSS {:.1f} -> {:.1f} MiB, FDs {:g} -> {:g}, "
          "tasks {:g} -> {:g}, pooled {:g} -> {:g}".format(*(v for pair in zip(first, final) for v in pair)))
    print(f"after warm-up ({warm[0]:.0f} s to {last[0]:.0f} s, {last[1] - warm[1]} requests): RSS {warm[2]:.1f} -> "
          f"{last[2]:.1f} MiB (max {max(r[2] for r in after):.1f}), FDs {warm[3]} -> {last[3]} (max "
          f"{max(r[3] for r in after)}), asyncio tasks {warm[4]} -> {last[4]} (max {max(r[4] for r in after)}), pooled "
          f"connections {warm[5]} -> {last[5]} (max {max(r[5] for r in after)}); {dict(done)}")
    print(f"mixed traffic answers other than policy's (200/101, or {REFUSED}): {dict(odd) or 'none'}")
    print(f"wrk answers not 2xx: {wrk_refused}")
    print(f"warnings and errors the sidecar logged: {dict(world.other_lines) or 'none'}")
    for line in world.other:
        print(f"    {line.decode(errors='replace').strip()[:400]}")
    broken = (grew or not alive or odd or wrk_refused or events != exchanges
              or not 0 <= in_flight <= 16 * len(rows))
    print("soak: FAILED" if broken else "soak: passed")
    return 1 if broken else 0


def kinds(traffic: Traffic) -> collections.Counter[str]:
    return collections.Counter(o.kind for o in traffic.outcomes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--sample", type=int, default=30, help="seconds per wrk run and sample")
    parser.add_argument("--min-seconds", type=float, default=0.0, help="go on past --requests until this long")
    parser.add_argument("--rate", type=float, default=40.0, help="mixed requests a second, every kind together")
    parser.add_argument("--trace-memory", default="", help="run the sidecar under tracemalloc (tests.bench.memtrace): "
                        "a snapshot into this directory at each sample; slower")
    parser.add_argument("--count", default="", help=argparse.SUPPRESS)  # the output counter's own process
    args = parser.parse_args()
    return count(Path(args.count)) if args.count else asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
