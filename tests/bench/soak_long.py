"""A long soak of a real ``sidecar run``: a million requests with refreshes, reloads and rotations.

    python -m tests.bench.soak_long                       # 1,000,000 requests (about 10 minutes here)
    python -m tests.bench.soak_long --requests 200000

The chaos harness's world (tests/chaos/run.py: watched SVID files, inbound mTLS, a static and an OAuth
upstream, a Redis bus) with: ``wrk`` on the outbound listener (the static upstream, kept-alive) for the
bulk, the harness's mixed traffic beside it (OAuth, a denied path, inbound mTLS), OAuth tokens that
live 65 s (a refresh about every 60 s), a policy reload every 10 s and an SVID rotation every 30 s.

Every ``--sample`` seconds a row: requests so far, the sidecar's RSS and open file descriptors, its
asyncio tasks and pooled upstream connections (``sidecar_asyncio_tasks``, ``sidecar_upstream_connections``).
At the end: whether RSS, FDs, tasks and pooled connections stayed flat after the warm-up (the last
sample within 10 % / 16 / 16 / 16 of the first after warm-up), the loop-lag p99 over the whole run
and the watchdog's stall reports (count, and where the longest was), trust-decision events against
exchanges, and every answer that was not 200 or the denied path's 403. Exit 1 when something grew,
was lost or was unexplained.
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
import threading
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
    """The chaos world with its output counted as it streams (a million events would fill the disk)."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
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
        return super().config() | {"observability": OBSERVABILITY}

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._count, args=(process,), daemon=True).start()
        return process

    def _count(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if b'"event":"trust_decision"' in line:
                self.event_count += 1
            elif b'"event":"event_loop_stalled"' in line:
                self.stalls.append(json.loads(line))
            elif b'"level":"error"' in line or b'"level":"warning"' in line:
                match = re.search(rb'"event":"([^"]+)"', line)
                self.other_lines[match.group(1).decode() if match else "?"] += 1
                if len(self.other) < 20:
                    self.other.append(line)

    def events(self) -> int:
        return self.event_count


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
        world = LongWorld(Path(tmp))
        world.tokens.lifetime = 65
        await world.start()
        assert world.sidecar is not None
        script = Path(tmp) / "keepalive.lua"
        script.write_text(WRK_LUA)
        traffic = Traffic(world.clients())
        traffic.start()
        stop = asyncio.Event()
        rotating = asyncio.ensure_future(rotations(world, stop))
        rows, total, refused, began = [], 0, 0, time.monotonic()
        try:
            while total < args.requests:
                completed, not2xx = await asyncio.to_thread(wrk, world.ports["outbound"], args.sample, script)
                total, refused = total + completed, refused + not2xx
                rss, fds = sample(world.sidecar.pid)
                tasks, pooled = gauges(await metrics(world))
                rows.append((time.monotonic() - began, total + len(traffic.outcomes), rss, fds, tasks, pooled))
                print(f"{rows[-1][0]:7.0f}s {rows[-1][1]:>9} requests  RSS {rss:6.1f} MiB  FDs {fds:4}  "
                      f"tasks {tasks:4}  pooled {pooled:3}  load {Path('/proc/loadavg').read_text().split()[0]}",
                      flush=True)
        finally:
            stop.set()
            done = await rotating
            await traffic.stop()
            await asyncio.sleep(2.0)
            text = await metrics(world)
            lag, lags = loop_lag_p99(text), loop_lag_buckets(text)
            tokens = world.tokens.hits
            events = world.events()
            alive = world.sidecar.poll() is None
            await world.stop()
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


Row = tuple[float, int, float, int, int, int]  # seconds, requests, RSS MiB, FDs, asyncio tasks, pooled connections


def report(rows: list[Row], wrk_total: int, wrk_refused: int, traffic: Traffic, events: int,
           done: collections.Counter[str], world: LongWorld, alive: bool) -> int:
    warm = rows[min(1, len(rows) - 1)]
    last = rows[-1]
    grew = (last[2] > warm[2] * 1.10 or last[3] > warm[3] + 16 or last[4] > warm[4] + 16
            or last[5] > warm[5] + 16)
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
    print(f"RSS {warm[2]:.1f} -> {last[2]:.1f} MiB, FDs {warm[3]} -> {last[3]}, asyncio tasks {warm[4]} -> {last[4]}, "
          f"pooled connections {warm[5]} -> {last[5]} after warm-up; {dict(done)}")
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
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
