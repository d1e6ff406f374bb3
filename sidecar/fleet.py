"""The fleet inventory: every sidecar sharing a revocation bus registers itself in its Redis.

Each sidecar writes, every ``fleet.heartbeat``, in one transaction:

    sidecar:fleet:member:<instance>   its record (JSON), expiring ``fleet.keep_stale`` after this write
    sidecar:fleet:live:<instance>     a marker, expiring ``fleet.expiry`` after this write

so a sidecar is *live* while its marker exists, *stale* once the marker expired but its record
has not (it stopped, crashed or lost Redis), and forgotten after that: Redis's expiry keeps the
index bounded, nobody has to prune it. Liveness is Redis's clock, not a comparison of two
sidecars' clocks. ``instance`` is new on every start: a restarted sidecar is a new entry, and
the one it replaced is listed as stale until it is forgotten.

The registration runs in a background task on the bus's own client (one pool, one Sentinel
manager, the same TLS and ACL): a failed heartbeat is logged once and counted
(``sidecar_fleet_registered`` drops to 0, ``sidecar_fleet_heartbeats_total{outcome="error"}``), the next one tries again,
so a Redis that was stopped and restarted (empty) gets every record back within a heartbeat.
The record names what the sidecar holds (agent, upstreams, credential types), never a secret:
it is built from names and types only (``sidecar.inventory.fleet_record``).

Reading (``GET /inventory?scope=fleet``) lists live and stale sidecars and flags each whose
policy version is not the one most live sidecars of its environment run; with Redis unreachable
the answer says so (``available: false`` and why) instead of failing.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from typing import Any, Callable

import orjson
import structlog

from sidecar.config_model import FleetConfig
from sidecar.inventory import iso_utc
from sidecar.observe.metrics import Metrics
from sidecar.revocation import cancel_and_wait

log = structlog.get_logger("sidecar.fleet")
MEMBER_PREFIX = "sidecar:fleet:member:"
LIVE_PREFIX = "sidecar:fleet:live:"
READ_TIMEOUT_S = 3.0
BATCH = 500

Record = dict[str, Any]


class Registration:
    """This sidecar's entry in the fleet inventory, written every heartbeat off the request path."""

    def __init__(self, config: FleetConfig, client: Any, record: Callable[[], Record],
                 clock: Callable[[], float] = time.time, metrics: Metrics | None = None) -> None:
        self._config = config
        self._metrics = metrics
        self._client = client
        self._record = record
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self.instance = secrets.token_hex(8)
        self.last_heartbeat: float | None = None
        self.failure: str | None = "fleet: no heartbeat written yet"
        self._warned = False  # one warning per outage, not one per heartbeat

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self.beat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down or refusing: the sidecar serves on, the next beat retries
                self._failed(exc)
            await asyncio.sleep(self._config.heartbeat)

    async def beat(self) -> None:
        """Write the record and the live marker in one transaction."""
        now = self._clock()
        record = {**self._record(), "instance": self.instance, "last_seen": now}
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.set(MEMBER_PREFIX + self.instance, orjson.dumps(record), px=_ms(self._config.keep_stale))
            pipe.set(LIVE_PREFIX + self.instance, b"1", px=_ms(self._config.expiry))
            await pipe.execute()
        if self.failure is not None:
            log.info("fleet_registered", instance=self.instance)
        self.last_heartbeat, self.failure, self._warned = now, None, False
        if self._metrics is not None:
            self._metrics.fleet_registered.set(1)
            self._metrics.fleet_heartbeats.labels("ok").inc()
            self._metrics.fleet_last_heartbeat.set(now)

    def _failed(self, exc: Exception) -> None:
        if not self._warned:
            log.warning("fleet_registration_failed", instance=self.instance, error_type=type(exc).__name__,
                        retry_in_s=self._config.heartbeat)
        self.failure, self._warned = unavailable(exc), True
        if self._metrics is not None:
            self._metrics.fleet_registered.set(0)
            self._metrics.fleet_heartbeats.labels("error").inc()

    def status(self) -> Record:
        """For the local inventory: whether this sidecar is registered now, and why not."""
        return {"registered": self.failure is None, "instance": self.instance,
                "last_heartbeat": iso_utc(self.last_heartbeat), "reason": self.failure}

    async def view(self) -> Record:
        """Every live and stale sidecar, or ``available: false`` and why when Redis does not answer."""
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):  # not wait_for: it can lose a cancellation (gh-86296)
                records, live = await self._read()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the fleet view is unavailable; the local inventory is not
            return {**self._timing(), **unavailable_view(unavailable(exc))}
        return {**self._timing(), **fleet_view(records, live, self.instance)}

    async def _read(self) -> tuple[list[Record], set[str]]:
        keys = [key async for key in self._client.scan_iter(match=MEMBER_PREFIX + "*", count=BATCH)]
        records: list[Record] = []
        live: set[str] = set()
        for start in range(0, len(keys), BATCH):
            chunk = [_text(key)[len(MEMBER_PREFIX):] for key in keys[start:start + BATCH]]
            found = await self._client.mget([MEMBER_PREFIX + i for i in chunk])
            markers = await self._client.mget([LIVE_PREFIX + i for i in chunk])
            records += [record for value in found if (record := _parsed(value)) is not None]
            live |= {instance for instance, marker in zip(chunk, markers) if marker is not None}
        return records, live

    def _timing(self) -> Record:
        c = self._config
        return {"heartbeat_s": c.heartbeat, "expiry_s": c.expiry, "keep_stale_s": c.keep_stale}

    async def aclose(self) -> None:
        """Stop the heartbeat; the entry expires on its own and is listed as stale meanwhile."""
        if self._task is not None:
            await cancel_and_wait(self._task)  # a heartbeat cancelled mid-write may not notice (revocation.py)


def fleet_view(records: list[Record], live: set[str], self_instance: str | None) -> Record:
    """The listing: live sidecars first, each flagged when its policy is not its environment's majority."""
    majority = policy_majority([r for r in records if r.get("instance") in live])
    members = [_member(r, r.get("instance") in live, majority) for r in records]
    members.sort(key=lambda m: (m["status"] != "live", str(_agent(m).get("id")), m["instance"]))
    return {"scope": "fleet", "available": True, "reason": None, "self": self_instance,
            "live": sum(1 for m in members if m["status"] == "live"),
            "stale": sum(1 for m in members if m["status"] == "stale"),
            "policy_majority": majority, "sidecars": members}


def _member(record: Record, is_live: bool, majority: dict[str, str | None]) -> Record:
    expected = majority.get(_environment(record))
    return {**record, "status": "live" if is_live else "stale", "last_seen": _iso(record.get("last_seen")),
            "started_at": _iso(record.get("started_at")),
            "policy_differs": expected is not None and record.get("policy_version") != expected}


def policy_majority(live: list[Record]) -> dict[str, str | None]:
    """Per environment, the policy version more than half of its live sidecars run (None: no majority)."""
    by_environment: dict[str, Counter[str]] = {}
    for record in live:
        by_environment.setdefault(_environment(record), Counter())[str(record.get("policy_version"))] += 1
    majority: dict[str, str | None] = {}
    for environment, versions in by_environment.items():
        version, count = versions.most_common(1)[0]
        majority[environment] = version if count * 2 > sum(versions.values()) else None
    return majority


def unavailable_view(reason: str) -> Record:
    return {"scope": "fleet", "available": False, "reason": reason, "live": 0, "stale": 0,
            "policy_majority": {}, "sidecars": []}


def unavailable(exc: BaseException) -> str:
    """Why the fleet inventory cannot be read or written, by the error's type (its text may name a host)."""
    if isinstance(exc, asyncio.TimeoutError):
        return "fleet: redis did not answer in time"
    return f"fleet: redis unavailable ({type(exc).__name__})"


def _agent(record: Record) -> Record:
    agent = record.get("agent")
    return agent if isinstance(agent, dict) else {}


def _environment(record: Record) -> str:
    return str(_agent(record).get("environment", ""))


def _parsed(value: bytes | None) -> Record | None:
    """A stored record, or None when it expired between SCAN and MGET or is not one of ours."""
    try:
        record = orjson.loads(value) if value is not None else None
    except orjson.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("instance"), str) else None


def _iso(ts: Any) -> str | None:
    return iso_utc(float(ts)) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else None


def _ms(seconds: float) -> int:
    return max(int(seconds * 1000), 1)


def _text(key: bytes | str) -> str:
    return key.decode() if isinstance(key, bytes) else key
