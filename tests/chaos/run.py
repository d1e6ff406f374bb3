"""The chaos harness: a real ``sidecar run`` under steady traffic while faults are injected one at a time.

    python -m tests.chaos.run                        # every fault
    python -m tests.chaos.run --only token-down,svid-garbage --fault-seconds 12

Set-up (all on 127.0.0.1, in a temporary directory): a ``sidecar run`` process (uvloop) with its SVID
in files it watches, an inbound mTLS listener in front of a loopback agent, two outbound upstreams on a
misbehaving server (``plain`` with a static key, ``oauth`` with client-credentials tokens from a
misbehaving token endpoint), a revocation bus on a real ``redis-server`` when one is installed, and a
policy file it watches. Traffic: about 40 requests a second, round robin: an allowed GET on each
upstream, a GET policy denies, and an allowed inbound mTLS call.

Then several at once (``together``: a slow upstream, the token endpoint down, a garbage SVID and Redis
down). Per fault: steady traffic, the fault for ``--fault-seconds``, the fault cleared, traffic until every
kind of request succeeds again. Printed per fault, and the exit status 1 if any promise broke:
- **lost**: requests that got no HTTP answer at all (must be 0; a refusal with its reason is an answer);
- **wrong**: decisions other than policy's (an allowed request refused by policy, a denied one served: 0);
- **recovery**: seconds from clearing the fault to every kind of request succeeding again;
- **events / exchanges**: trust-decision events written against requests sent (must be equal);
- the refusals seen during the fault, by reason, against the ones the fault is expected to cause.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp
import yaml

from tests.bench.soak_mtls import free_port
from tests.chaos.peers import Agent, TokenEndpoint, Upstream
from tests.harness import wait_ready

CALLER = "spiffe://sidecar.local/orchestrator"
OURS = "spiffe://sidecar.local/chaos-agent"
POLICY_DENIALS = frozenset({"no_matching_rule", "rule_denied", "condition_error"})
KINDS = ("plain", "oauth", "denied", "inbound")
RATE = 40.0  # requests a second, all kinds together
REQUEST_TIMEOUT = 15.0


@dataclass
class Outcome:
    kind: str
    at: float
    status: int | None = None
    reason: str | None = None
    error: str | None = None


class Traffic:
    """Steady requests of every kind; each outcome kept with the time it was sent."""

    def __init__(self, ports: dict[str, int], inbound_tls: ssl.SSLContext) -> None:
        self.ports, self.inbound_tls = ports, inbound_tls
        self.outcomes: list[Outcome] = []
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self._pending, return_exceptions=True)

    async def _run(self) -> None:
        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(connector=connector) as session:
            for n in range(10**9):
                task = asyncio.ensure_future(self._one(session, KINDS[n % len(KINDS)]))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
                await asyncio.sleep(1 / RATE)

    async def _one(self, session: aiohttp.ClientSession, kind: str) -> None:
        outcome = Outcome(kind, time.monotonic())
        self.outcomes.append(outcome)
        if kind == "inbound":
            url, tls = f"https://127.0.0.1:{self.ports['inbound']}/tasks/x", self.inbound_tls
        else:
            upstream, path = ("plain", "denied") if kind == "denied" else (kind, "ok")
            url, tls = f"http://127.0.0.1:{self.ports['outbound']}/{upstream}/{path}", None
        try:
            async with session.get(url, ssl=tls, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)) as r:
                outcome.status = r.status
                body = await r.read()
                if r.status >= 300 and r.content_type == "application/json":
                    outcome.reason = json.loads(body).get("error")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            outcome.error = type(exc).__name__


@dataclass
class Fault:
    name: str
    inject: Callable[[], Awaitable[None] | None]
    clear: Callable[[], Awaitable[None] | None]
    expect: frozenset[str] = frozenset()  # refusal reasons the fault may cause (any others count as unexpected)
    cut_ok: bool = False  # responses broken off mid-body are the fault's own outcome (reported, not lost)


@dataclass
class Row:
    fault: str
    sent: int = 0
    lost: int = 0
    wrong: int = 0
    recovery: float | None = None
    events: int = 0
    refusals: collections.Counter[str] = field(default_factory=collections.Counter)
    unexpected: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def held(self) -> bool:
        return (self.lost == 0 and self.wrong == 0 and self.recovery is not None and self.events == self.sent
                and not self.unexpected)


class World:
    """Everything the faults act on, started once."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.upstream, self.tokens, self.agent = Upstream(), TokenEndpoint(), Agent()
        self.ports = {name: free_port() for name in ("inbound", "outbound", "health", "metrics", "admin")}
        self.redis_port = free_port()
        self.redis: subprocess.Popen[bytes] | None = None
        self.sidecar: subprocess.Popen[bytes] | None = None
        self.log = tmp / "sidecar.out"
        self.policy = tmp / "policy.yaml"
        self.svid_dir = tmp / "svid"

    async def start(self) -> None:
        for peer in (self.upstream, self.tokens, self.agent):
            await peer.start()
        self.start_redis()
        from sidecar.identity.ca import ca_issue

        state = self.tmp / "state"
        ca_issue(state, OURS, self.svid_dir)
        self.caller = ca_issue(state, CALLER, self.tmp / "caller")
        self.svid = {name: self.svid_dir / Path(path).name for name, path in
                     ca_issue(state, OURS, self.svid_dir).items()}
        self.good_svid = {name: path.read_bytes() for name, path in self.svid.items()}
        self.write_policy()
        (self.tmp / "sidecar.yaml").write_text(yaml.safe_dump(self.config(state)))
        self.sidecar = self.spawn([sys.executable, "-m", "sidecar", "run", "-c", str(self.tmp / "sidecar.yaml")])
        await self.wait_ready()

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        """The sidecar process, its output (events included) to ``self.log``."""
        return subprocess.Popen(argv, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)

    def rotate_svid(self) -> None:
        """A new SVID for the same ID, written over the watched files (as cert-manager renews one)."""
        from sidecar.identity.ca import ca_issue

        ca_issue(self.tmp / "state", OURS, self.svid_dir)

    def config(self, state: Path) -> dict:
        up = self.upstream.url
        config = {
            "agent": {"name": "chaos-agent"}, "state_dir": str(state), "policy": {"files": [str(self.policy)]},
            "identity": {"svid": {"cert": str(self.svid["cert"]), "key": str(self.svid["key"]),
                                  "bundle": str(self.svid["bundle"])}},
            "inbound": {"listen": f"127.0.0.1:{self.ports['inbound']}", "forward_to": self.agent.url,
                        "trust_domains": ["sidecar.local"]},
            "outbound": {"listen": f"127.0.0.1:{self.ports['outbound']}",
                         "timeouts": {"connect": "2s", "first_byte": "1s", "idle": "2s"},
                         "upstreams": {"plain": {"url": up, "credential": "key"},
                                       "oauth": {"url": f"http://localhost:{self.upstream.port}",
                                                 "credential": "tokens"}}},
            "credentials": {
                "key": {"type": "static", "header": "X-API-Key", "value": {"value": "chaos-static-key"}},
                "tokens": {"type": "oauth2_client_credentials", "token_url": f"{self.tokens.url}/token",
                           "client_id": "chaos", "auth": "client_secret_post",
                           "client_secret": {"value": "chaos-secret"}, "timeout": "2s"}},
            **{name: {"listen": f"127.0.0.1:{self.ports[name]}"} for name in ("health", "metrics", "admin")}}
        if self.redis is not None:
            config["revocation"] = {"redis_url": f"redis://127.0.0.1:{self.redis_port}/0", "require_sync": False}
        return config

    def write_policy(self, comment: str = "") -> None:
        self.policy.write_text(f"# {comment}\n" + yaml.safe_dump({"version": 1, "default": "deny", "rules": [
            {"id": "plain-ok", "direction": "outbound", "upstream": "plain", "paths": ["/ok"], "effect": "allow"},
            {"id": "oauth-ok", "direction": "outbound", "upstream": "oauth", "paths": ["/ok"], "effect": "allow"},
            {"id": "no-denied", "direction": "outbound", "upstream": "plain", "paths": ["/denied"], "effect": "deny"},
            {"id": "caller", "direction": "inbound", "callers": [CALLER], "effect": "allow"}]}))

    def start_redis(self) -> None:
        if shutil.which("redis-server") is None:
            return
        self.redis = subprocess.Popen(["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)

    async def wait_ready(self) -> None:
        async with aiohttp.ClientSession() as session:
            try:
                await wait_ready(session, self.ports["health"], tries=300)
            except AssertionError:
                raise SystemExit(f"chaos: sidecar run did not become ready; its output is in {self.log}") from None

    async def metric(self, name: str) -> float:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{self.ports['metrics']}/metrics") as r:
                text = await r.text()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    def events(self) -> int:
        count = 0
        for line in self.log.read_bytes().splitlines():
            if line.startswith(b"{") and b'"event":"trust_decision"' in line.replace(b" ", b""):
                count += 1
        return count

    def inbound_tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.caller["bundle"]))
        context.check_hostname = False
        context.load_cert_chain(str(self.caller["cert"]), str(self.caller["key"]))
        return context

    async def stop(self) -> None:
        for process in (self.sidecar, self.redis):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
        for peer in (self.upstream, self.tokens, self.agent):
            await peer.stop()


def faults(world: World) -> list[Fault]:
    def mode(peer: object, value: str) -> Callable[[], None]:
        return lambda: setattr(peer, "mode", value)

    def svid_write(content: dict[str, bytes | None]) -> Callable[[], None]:
        def write() -> None:
            for name, data in content.items():
                path = world.svid[name]
                if data is None:
                    path.unlink(missing_ok=True)
                else:
                    path.write_bytes(data)
        return write

    async def storm() -> None:
        for n in range(100):
            world.write_policy(f"reload {n}")
            await asyncio.sleep(0.1)

    def half_policy() -> None:
        text = world.policy.read_text()
        world.policy.write_text(text[: len(text) // 2])

    async def redis_down() -> None:
        assert world.redis is not None
        world.redis.kill()
        world.redis.wait()

    async def redis_up() -> None:
        world.start_redis()

    up, tokens = world.upstream, world.tokens
    refused_upstream = frozenset({"upstream_unreachable", "upstream_timeout"})
    table = [
        Fault("upstream-reset", mode(up, "reset"), mode(up, "normal"), refused_upstream),
        Fault("upstream-slow", mode(up, "slow"), mode(up, "normal"), frozenset({"upstream_timeout"})),
        Fault("upstream-cut", mode(up, "cut"), mode(up, "normal"), refused_upstream, cut_ok=True),
        Fault("token-down", mode(tokens, "down"), mode(tokens, "normal"), frozenset({"credential_unavailable"})),
        Fault("token-slow", mode(tokens, "slow"), mode(tokens, "normal"), frozenset({"credential_unavailable"})),
        Fault("token-garbage", mode(tokens, "garbage"), mode(tokens, "normal"), frozenset({"credential_unavailable"})),
        Fault("token-error", mode(tokens, "error"), mode(tokens, "normal"), frozenset({"credential_unavailable"})),
        Fault("policy-half-written", half_policy, lambda: world.write_policy("restored")),
        Fault("policy-reload-storm", storm, lambda: world.write_policy("after the storm")),
        Fault("svid-garbage", svid_write({"cert": b"garbage", "key": b"garbage"}), svid_write(world.good_svid)),
        Fault("svid-deleted", svid_write({"cert": None, "key": None}), svid_write(world.good_svid)),
    ]
    if world.redis is not None:
        table.append(Fault("redis-down", redis_down, redis_up))
    table.append(together("together", [table[i] for i in (1, 3, 9)] + table[-1:] * (world.redis is not None)))
    return table


def together(name: str, several: list[Fault]) -> Fault:
    """Several faults at once: injected in order, cleared in reverse."""
    async def inject() -> None:
        for fault in several:
            await maybe(fault.inject())

    async def clear() -> None:
        for fault in reversed(several):
            await maybe(fault.clear())

    return Fault(f"{name}({'+'.join(f.name for f in several)})", inject, clear,
                 frozenset().union(*(f.expect for f in several)), any(f.cut_ok for f in several))


async def maybe(result: Awaitable[None] | None) -> None:
    if result is not None:
        await result


async def run_fault(world: World, fault: Fault, fault_seconds: float) -> Row:
    traffic = Traffic(world.ports, world.inbound_tls())
    events_before = world.events()
    traffic.start()
    await asyncio.sleep(2.0)
    began = time.monotonic()
    await maybe(fault.inject())
    await asyncio.sleep(max(0.0, fault_seconds - (time.monotonic() - began)))
    await maybe(fault.clear())
    cleared = time.monotonic()
    recovery = await recovered(traffic, cleared)
    await asyncio.sleep(2.0)
    await traffic.stop()
    await asyncio.sleep(1.5)  # the last events reach the log
    return judge(fault, traffic.outcomes, began, cleared, recovery, world.events() - events_before)


async def recovered(traffic: Traffic, since: float, limit: float = 30.0) -> float | None:
    """Seconds from ``since`` until every kind has answered as policy says, in requests sent after it."""
    while time.monotonic() - since < limit:
        await asyncio.sleep(0.2)
        good = {o.kind for o in traffic.outcomes if o.at >= since and _as_policy_says(o)}
        if good >= set(KINDS):
            return max(min(o.at for o in traffic.outcomes if o.at >= since and o.kind == kind and _as_policy_says(o))
                       for kind in KINDS) - since
    return None


def _as_policy_says(o: Outcome) -> bool:
    return o.status == 403 and o.reason == "rule_denied" if o.kind == "denied" else o.status == 200 and not o.error


def judge(fault: Fault, outcomes: list[Outcome], began: float, cleared: float, recovery: float | None,
          events: int) -> Row:
    row = Row(fault.name, sent=len(outcomes), recovery=recovery, events=events)
    for o in outcomes:
        if o.status is None:
            row.lost += 1
            continue
        if o.error and not fault.cut_ok:
            row.lost += 1  # an answer broken off where the fault does not explain it
        if o.kind == "denied" and o.status < 300 or o.kind != "denied" and o.reason in POLICY_DENIALS:
            row.wrong += 1
        if o.status >= 300 and o.kind != "denied":
            row.refusals[o.reason or str(o.status)] += 1
            if o.reason not in fault.expect:
                row.unexpected[o.reason or str(o.status)] += 1
    return row


def show(rows: list[Row]) -> None:
    width = max([22, *(len(r.fault) + 2 for r in rows)])
    print(f"{'fault':<{width}}{'sent':>6}{'lost':>6}{'wrong':>7}{'recovery':>10}{'events':>8}  refusals (unexpected)")
    for r in rows:
        recovery = f"{r.recovery:.1f}s" if r.recovery is not None else "never"
        refusals = ", ".join(f"{k} {v}" for k, v in r.refusals.most_common()) or "-"
        unexpected = ", ".join(f"{k} {v}" for k, v in r.unexpected.most_common())
        mark = "" if r.held else "   <-- BROKEN"
        print(f"{r.fault:<{width}}{r.sent:>6}{r.lost:>6}{r.wrong:>7}{recovery:>10}{r.events:>5}/{r.sent:<4} {refusals}"
              f"{f' ({unexpected})' if unexpected else ''}{mark}")


async def main_async(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        world = World(Path(tmp))
        await world.start()
        try:
            chosen = [f for f in faults(world) if not args.only or f.name.split("(")[0] in args.only.split(",")]
            rows = [await run_fault(world, fault, args.fault_seconds) for fault in chosen]
            alive = world.sidecar is not None and world.sidecar.poll() is None
        finally:
            await world.stop()
            if args.keep_log:
                shutil.copy(world.log, args.keep_log)
    show(rows)
    broken = [r.fault for r in rows if not r.held] + ([] if alive else ["the sidecar process exited"])
    print("chaos: every promise held" if not broken else f"chaos: BROKEN: {', '.join(broken)}")
    return 1 if broken else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated fault names")
    parser.add_argument("--fault-seconds", type=float, default=12.0,
                        help="how long each fault lasts (token faults need more than a token's 8 s lifetime)")
    parser.add_argument("--keep-log", default="", help="copy the sidecar's output here")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
