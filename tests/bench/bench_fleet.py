"""How long a fleet-wide revocation takes to be enforced by every sidecar of a real fleet.

Run: ``python -m tests.bench.bench_fleet [--size 10] [--rounds 20] [--interval-ms 5]``
(not part of the test run; needs ``redis-server``). It starts a real Redis, a real upstream
and ``--size`` ``sidecar run`` processes (as ``tests/fleet/test_fleet.py`` does), then per
round opens a task for a fresh subject on every member, revokes the subject on member 0 and
polls every member's outbound listener until it refuses that task (403 ``revoked``, or the
call in flight is cut). It prints, over all rounds, p50/p99/max of "revoke call sent ->
member refuses" for member 0 (in force before the admin call returns) and for the other
members (over Redis), and the fleet-wide ``sidecar_revocation_propagation_seconds``
histogram (receive time minus the publisher's timestamp) summed over the members' /metrics.
Target: p99 <= 1 s for the other members. Polling adds up to one call plus ``--interval-ms``.

``--sentinel`` (issue 12 item 2): the fleet uses a Redis Sentinel group instead (one primary,
one replica, three sentinels, ``tests/peers/redis.py``), and each round ``kill -9``s the
primary and revokes the subject on member 0 right after, while no primary is reachable. Per
round it reports the failover (kill -> every sentinel names the replica), revoke -> enforced by
every member, and how much of that came after the failover (the bus's reconnect: its backoff
doubles from 0.2 s to at most 5 s while Redis is unreachable). Then the killed node is restarted
as the new primary's replica for the next round.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from tests.fleet import Fleet, Member, PlainUpstream, metric_samples
from tests.peers.redis import DOWN_AFTER_MS, FAILOVER_TIMEOUT_MS, SERVICE, RedisServer, SentinelGroup, free_port

TARGET_P99_S = 1.0
MAX_POLLS = 20_000  # per member and round: bounded even if a member never refuses


async def time_to_refusal(session: aiohttp.ClientSession, member: Member, task: str, t0: float,
                          interval: float) -> tuple[float, str]:
    """Seconds from t0 until the member refuses the task, and how (revoked or cut)."""
    for _ in range(MAX_POLLS):
        status, reason = await member.call(session, task)
        if (status, reason) in ((403, "revoked"), (0, "cut")):
            return time.perf_counter() - t0, reason
        await asyncio.sleep(interval)
    return float("inf"), "never"


async def one_round(session: aiohttp.ClientSession, fleet: Fleet, interval: float) -> list[tuple[float, str]]:
    members = fleet.members
    subject = f"bench-{secrets.token_hex(4)}@example.com"
    tasks = await asyncio.gather(*(m.open_task(session, subject) for m in members))
    t0 = time.perf_counter()
    revoke = members[0].admin(session, "POST", "/revocations", {"kind": "subject", "id": subject, "ttl": "10m"})
    pollers = [time_to_refusal(session, m, t, t0, interval) for m, t in zip(members, tasks)]
    (status, body), *results = await asyncio.gather(revoke, *pollers)
    assert status == 201, body
    return list(results)


async def call_latency(session: aiohttp.ClientSession, member: Member, calls: int = 100) -> list[float]:
    """Round trips of allowed calls through one member, one at a time: the polling resolution."""
    task = await member.open_task(session, f"calibrate-{secrets.token_hex(4)}@example.com")
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        assert await member.call(session, task) == (200, "ok")
        times.append(time.perf_counter() - started)
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def summary(label: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (f"{label:<34} n={len(ms):4d}  p50={percentile(ms, 0.5):8.2f} ms  p99={percentile(ms, 0.99):8.2f} ms"
            f"  max={max(ms):8.2f} ms  mean={statistics.fmean(ms):8.2f} ms")


async def histogram(session: aiohttp.ClientSession, fleet: Fleet) -> None:
    """Print sidecar_revocation_propagation_seconds summed over every member's /metrics."""
    totals: dict[str, float] = {}
    for member in fleet.members:
        text = await member.metrics(session)
        for key, value in metric_samples(text, "sidecar_revocation_propagation_seconds").items():
            if "_created" not in key:
                totals[key] = totals.get(key, 0.0) + value
    count = totals.get("sidecar_revocation_propagation_seconds_count", 0.0)
    total = totals.get("sidecar_revocation_propagation_seconds_sum", 0.0)
    print("\nsidecar_revocation_propagation_seconds, summed over the fleet (receive time - publisher's timestamp):")
    for key, value in totals.items():
        if "_bucket" in key:
            le = key.split('le="')[1].rstrip('"}')
            print(f"  le={le:<6} {int(value):6d}  ({value / count * 100 if count else 0:5.1f} %)")
    print(f"  count={int(count)}  sum={total:.4f} s  mean={total / count * 1000 if count else 0:.2f} ms")


async def bench(size: int, rounds: int, interval: float) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        redis = RedisServer(shutil.which("redis-server") or "redis-server", free_port()).start()
        upstream = PlainUpstream()
        fleet = Fleet(Path(tmp), {"redis_url": redis.url}, upstream.url, size)
        started = time.perf_counter()
        try:
            fleet.start()
            print(f"fleet: {size} sidecar processes ready in {time.perf_counter() - started:.1f} s "
                  f"(started at once); {rounds} rounds; poll interval {interval * 1000:.0f} ms")
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                print(summary("one allowed call (poll resolution)", await call_latency(session, fleet.members[1])))
                local: list[float] = []
                remote: list[float] = []
                cuts = 0
                for _ in range(rounds):
                    results = await one_round(session, fleet, interval)
                    local.append(results[0][0])
                    remote.extend(t for t, _ in results[1:])
                    cuts += sum(1 for _, how in results if how == "cut")
                    await asyncio.sleep(0.2)
                print(summary("member 0 (revoked there)", local))
                print(summary(f"members 1..{size - 1} (over Redis)", remote))
                print(f"calls cut in flight by the revocation: {cuts}; never refused: "
                      f"{sum(1 for t in remote + local if t == float('inf'))}")
                p99 = percentile(remote, 0.99)
                print(f"target p99 <= {TARGET_P99_S:.1f} s: {'met' if p99 <= TARGET_P99_S else 'NOT met'} "
                      f"({p99 * 1000:.1f} ms)")
                await histogram(session, fleet)
        finally:
            fleet.stop()
            upstream.stop()
            redis.stop()
    return 0


async def failover_round(session: aiohttp.ClientSession, fleet: Fleet, group: SentinelGroup,
                         interval: float) -> tuple[float, list[float]]:
    """kill -9 the primary, revoke on member 0 at once: (seconds until the sentinels name the new primary,
    seconds from the revoke call until each member refuses), both from the revoke call."""
    members = fleet.members
    subject = f"failover-{secrets.token_hex(4)}@example.com"
    tasks = await asyncio.gather(*(m.open_task(session, subject) for m in members))
    old = group.kill_primary()
    t0 = time.perf_counter()

    async def failover() -> float:
        await asyncio.to_thread(group.wait_for_failover, old)
        return time.perf_counter() - t0

    revoke = members[0].admin(session, "POST", "/revocations", {"kind": "subject", "id": subject, "ttl": "10m"})
    pollers = [time_to_refusal(session, m, t, t0, interval) for m, t in zip(members, tasks)]
    switched, (status, body), *results = await asyncio.gather(failover(), revoke, *pollers)
    assert status == 201, body
    return switched, [t for t, _ in results]


async def bus_up_everywhere(session: aiohttp.ClientSession, fleet: Fleet) -> None:
    """Wait (bounded) until every member's bus is connected again."""
    for _ in range(600):
        texts = await asyncio.gather(*(m.metrics(session) for m in fleet.members))
        if all("sidecar_revocation_bus_up 1.0" in t for t in texts):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("bench_fleet: a member's bus did not come back")


async def bench_sentinel(size: int, rounds: int, interval: float) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-fleet-sentinel-") as tmp:
        group = SentinelGroup(shutil.which("redis-server") or "redis-server", Path(tmp)).start()
        upstream = PlainUpstream()
        bus = {"sentinel": {"sentinels": group.addresses, "service_name": SERVICE}}
        fleet = Fleet(Path(tmp) / "fleet", bus, upstream.url, size)
        try:
            fleet.start()
            print(f"fleet: {size} sidecar processes over 3 sentinels (down-after {DOWN_AFTER_MS} ms, "
                  f"failover-timeout {FAILOVER_TIMEOUT_MS} ms); {rounds} failovers; poll interval "
                  f"{interval * 1000:.0f} ms")
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                switched: list[float] = []
                fleet_wide: list[float] = []
                for n in range(rounds):
                    await bus_up_everywhere(session, fleet)
                    failover, times = await failover_round(session, fleet, group, interval)
                    switched.append(failover)
                    fleet_wide.append(max(times))
                    print(f"  round {n + 1}: failover {failover:5.2f} s, revoke -> fleet-wide {max(times):5.2f} s "
                          f"(member 0 {times[0] * 1000:.1f} ms), after the failover {max(times) - failover:5.2f} s")
                    await asyncio.to_thread(group.revive)
                print(summary("failover (kill -> new primary)", switched))
                print(summary("revoke -> enforced fleet-wide", fleet_wide))
                print(summary("of which after the failover", [f - s for f, s in zip(fleet_wide, switched)]))
                print(f"never refused: {sum(1 for t in fleet_wide if t == float('inf'))}")
        finally:
            fleet.stop()
            upstream.stop()
            group.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=10)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--interval-ms", type=float, default=5.0)
    p.add_argument("--sentinel", action="store_true", help="revoke during a kill -9 failover of a Sentinel group")
    args = p.parse_args(argv)
    if shutil.which("redis-server") is None:
        print("bench_fleet: redis-server is not installed (apt-get install -y redis-server)", file=sys.stderr)
        return 2
    run = bench_sentinel if args.sentinel else bench
    return asyncio.run(run(args.size, args.rounds, args.interval_ms / 1000))


if __name__ == "__main__":
    sys.exit(main())
