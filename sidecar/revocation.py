"""Revocation of agents, tasks, credentials and subjects: local at once, fleet-wide over Redis.

A revocation takes effect before ``POST /revocations`` returns: the local list is updated,
cached credentials are dropped, open exchanges of that kind are cut (the appliers do that).
With ``revocation.redis_url`` it is also stored (a key with the revocation's TTL, so that a
sidecar that was disconnected catches up when it reconnects) and published (pub/sub, so
that connected sidecars apply it within milliseconds). Pub/sub loses messages for
disconnected subscribers, hence the keys.

With Redis down, local revocation still works, ``sidecar_revocation_bus_up`` is 0 and a
running sidecar stays ready; with ``require_sync`` a starting one is not ready before it
has read the stored revocations once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Callable

import orjson
import structlog

from sidecar.credentials.base import Credential
from sidecar.errors import Refusal, TaskRefused
from sidecar.observe.metrics import Metrics

log = structlog.get_logger("sidecar.revocation")
KINDS = ("agent", "task", "credential", "subject")
CHANNEL = "sidecar:revocations"
KEY_PREFIX = "sidecar:revocation:"


@dataclass(frozen=True, slots=True)
class Revocation:
    kind: str
    id: str
    created_at: float  # the publisher's clock
    expires_at: float

    @property
    def rid(self) -> str:
        return f"{self.kind}:{self.id}"

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "id": self.id, "rid": self.rid, "created_at": self.created_at,
                "expires_at": self.expires_at}


def revoked(message: str) -> Refusal:
    return TaskRefused("revoked", message)


class Revocations:
    """The revocation list of one sidecar, and the hooks that enforce a new entry."""

    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.time) -> None:
        self._metrics = metrics
        self._clock = clock
        self._entries: dict[str, Revocation] = {}
        self._ids: dict[str, set[str]] = {kind: set() for kind in KINDS}
        self._appliers: list[Callable[[Revocation], None]] = []
        self.bus: RedisBus | None = None

    def on_apply(self, applier: Callable[[Revocation], None]) -> None:
        self._appliers.append(applier)

    # -- the request path: set lookups -----------------------------------------------
    def check_agent(self, agent_id: str) -> None:
        if agent_id in self._ids["agent"] and self._live(f"agent:{agent_id}"):
            raise revoked("revocation: this agent is revoked")

    def check_task(self, task: Any) -> None:
        if task.id in self._ids["task"] and self._live(f"task:{task.id}"):
            raise revoked("revocation: this task is revoked")
        if task.principal is not None:
            self.check_subject(task.principal)

    def check_subject(self, principal: tuple[str, str] | None) -> None:
        if principal is not None and principal[1] in self._ids["subject"] and self._live(f"subject:{principal[1]}"):
            raise revoked("revocation: the human this request acts for is revoked")

    def check_credential(self, credential: Credential) -> None:
        if credential.id and credential.id in self._ids["credential"] and self._live(f"credential:{credential.id}"):
            raise revoked("revocation: this credential is revoked")

    def _live(self, rid: str) -> bool:
        entry = self._entries.get(rid)
        if entry is None:
            return False
        if entry.expires_at > self._clock():
            return True
        self._forget(rid)
        return False

    # -- changes ------------------------------------------------------------------------
    def add(self, kind: str, ident: str, ttl: float, *, created_at: float | None = None) -> Revocation:
        """Apply a revocation made here: effective on return, then stored and published."""
        now = self._clock()
        entry = Revocation(kind, ident, created_at or now, now + ttl)
        self.apply(entry, received_at=None)
        if self.bus is not None:
            self.bus.publish(entry)
        return entry

    def apply(self, entry: Revocation, *, received_at: float | None) -> bool:
        """Apply a revocation (made here or received from the bus); False if already known."""
        if entry.kind not in KINDS or entry.expires_at <= self._clock():
            return False
        known = self._entries.get(entry.rid)
        self._entries[entry.rid] = entry
        self._ids[entry.kind].add(entry.id)
        if known is not None:
            return False
        if received_at is not None:
            self._metrics.revocation_propagation.observe(max(received_at - entry.created_at, 0.0))
        self._metrics.revocations.labels(entry.kind).inc()
        log.info("revocation_applied", kind=entry.kind, id=entry.id, remote=received_at is not None)
        for applier in self._appliers:
            applier(entry)
        return True

    def remove(self, rid: str) -> bool:
        existed = self._forget(rid)
        if existed and self.bus is not None:
            self.bus.delete(rid)
        return existed

    def _forget(self, rid: str) -> bool:
        entry = self._entries.pop(rid, None)
        if entry is not None:
            self._ids[entry.kind].discard(entry.id)
        return entry is not None

    def list(self) -> list[Revocation]:
        now = self._clock()
        return [e for e in self._entries.values() if e.expires_at > now]


class RedisBus:
    """Publishes and stores revocations in Redis; subscribes and catches up on (re)connect."""

    def __init__(self, url: str, revocations: Revocations, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        self._url = url
        self._revocations = revocations
        self._metrics = metrics
        self._clock = clock
        self._client: Any = None
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[Any]] = set()
        self.synced = asyncio.Event()
        self.up = False

    async def start(self) -> None:
        import redis.asyncio as redis

        self._client = redis.from_url(self._url, socket_connect_timeout=2, socket_timeout=5,
                                      health_check_interval=5)
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                await self._subscribe_and_listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any bus failure: mark down, keep serving, reconnect
                self._set_up(False)
                log.warning("revocation_bus_down", error_type=type(exc).__name__, retry_in_s=round(backoff, 2))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            else:
                backoff = 0.2

    async def _subscribe_and_listen(self) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(CHANNEL)
            await self._catch_up()  # after subscribing: nothing published in between is lost
            self._set_up(True)
            self.synced.set()
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    self._receive(message["data"])
        finally:
            await pubsub.aclose()

    async def _catch_up(self) -> None:
        async for key in self._client.scan_iter(match=KEY_PREFIX + "*", count=500):
            value = await self._client.get(key)
            if value is not None:
                self._receive(value)

    def _receive(self, data: bytes) -> None:
        try:
            raw = orjson.loads(data)
            entry = Revocation(str(raw["kind"]), str(raw["id"]), float(raw["created_at"]), float(raw["expires_at"]))
        except (ValueError, KeyError, TypeError):
            log.warning("revocation_message_malformed")
            return
        if raw.get("deleted"):
            self._revocations._forget(entry.rid)
            return
        self._revocations.apply(entry, received_at=self._clock())

    def _set_up(self, up: bool) -> None:
        self.up = up
        self._metrics.revocation_bus_up.set(1 if up else 0)

    def publish(self, entry: Revocation) -> None:
        self._spawn(self._publish(entry))

    def delete(self, rid: str) -> None:
        self._spawn(self._delete(rid))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _publish(self, entry: Revocation) -> None:
        payload = orjson.dumps(entry.as_dict())
        ttl_ms = max(int((entry.expires_at - self._clock()) * 1000), 1)
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.set(KEY_PREFIX + entry.rid, payload, px=ttl_ms)
                pipe.publish(CHANNEL, payload)
                await pipe.execute()
        except Exception as exc:  # local revocation already applied; the bus is best effort
            log.warning("revocation_publish_failed", rid=entry.rid, error_type=type(exc).__name__)

    async def _delete(self, rid: str) -> None:
        kind, _, ident = rid.partition(":")
        payload = orjson.dumps({"kind": kind, "id": ident, "created_at": self._clock(), "expires_at": 0,
                                "deleted": True})
        try:
            await self._client.delete(KEY_PREFIX + rid)
            await self._client.publish(CHANNEL, payload)
        except Exception as exc:
            log.warning("revocation_delete_failed", rid=rid, error_type=type(exc).__name__)

    async def flush(self) -> None:
        """Wait for pending publishes (tests and shutdown)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    async def aclose(self) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
