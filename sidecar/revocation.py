"""Revocation of agents, tasks, credentials and subjects: local at once, fleet-wide over Redis.

A revocation takes effect before ``POST /revocations`` returns: the local list is updated,
cached credentials are dropped, open exchanges of that kind are cut (:class:`Enforcement`, the one
place that happens).
With ``revocation.redis_url`` it is also stored (a key with the revocation's TTL, so that a
sidecar that was disconnected catches up when it reconnects) and published (pub/sub, so
that connected sidecars apply it within milliseconds). Pub/sub loses messages for
disconnected subscribers, hence the keys.

Redis is one server (``redis_url``, ``rediss://`` for TLS) or the primary that Redis Sentinel names
(``sentinel``), both through redis-py's own support (:func:`redis_client`), with ACL credentials
and a CA for TLS. A failover is an outage like any other to the bus: the reconnect below lands on
the primary the sentinels name by then, and the outbox, the catch-up and the re-store make up for
what the dead primary took with it or never replicated.

With Redis down, local revocation still works, ``sidecar_revocation_bus_up`` is 0 and a
running sidecar stays ready; with ``require_sync`` a starting one is not ready before it
has read the stored revocations once.

Outages. Every local change (a revocation, or its lifting) goes through an outbox that
keeps the last change per revocation id until Redis took it. On (re)connect a sidecar, in
this order: subscribes; writes its outbox (SET + PUBLISH, so revocations made during the
outage reach the fleet); catches up on the stored keys; re-stores (SET NX, then PUBLISH of
those it set) the live revocations it holds that Redis lacks, so a Redis that lost its data
is refilled by the fleet. Lifting stores a tombstone under the same key for the rest of the revocation's
TTL, so a sidecar that missed the lift forgets the entry when it catches up, and the
re-store cannot bring it back. If Redis lost its data *and* missed a lift, the revocation
comes back (fail closed) until it is lifted again or expires.

``sidecar_revocation_propagation_seconds`` observes entries received live and on
reconnect catch-ups (a sidecar cut off from the bus was enforcing without them); the first
sync after start is not observed (the sidecar was not running when they were made).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import orjson
import structlog

from sidecar.config_model import RedisTls, RevocationConfig
from sidecar.credentials.base import Credential
from sidecar.credentials.cache import CredentialCache
from sidecar.errors import Refusal, TaskRefused
from sidecar.exchange import ActiveExchanges
from sidecar.fields import Secret
from sidecar.observe.metrics import Metrics
from sidecar.tasks import Task, TaskRegistry

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
        self._lifted: dict[str, Revocation] = {}  # rid -> the version that was lifted (until it would expire)
        self._appliers: list[Callable[[Revocation], None]] = []
        self.bus: RedisBus | None = None

    def on_apply(self, applier: Callable[[Revocation], None]) -> None:
        self._appliers.append(applier)

    # -- the request path: set lookups -----------------------------------------------
    def check_agent(self, agent_id: str) -> None:
        if agent_id in self._ids["agent"] and self._live(f"agent:{agent_id}"):
            raise revoked("revocation: this agent is revoked")

    def check_caller(self, spiffe_id: str) -> None:
        """A caller is revoked by an ``agent`` revocation of its SPIFFE ID: agents call each other."""
        if spiffe_id in self._ids["agent"] and self._live(f"agent:{spiffe_id}"):
            raise revoked("revocation: this caller's SPIFFE ID is revoked")

    def check_task(self, task: Task) -> None:
        if task.id in self._ids["task"] and self._live(f"task:{task.id}"):
            raise revoked("revocation: this task is revoked")
        if task.principal is not None:
            self.check_subject(task.principal)

    def check_subject(self, principal: tuple[str, str] | None) -> None:
        if principal is not None and principal[1] in self._ids["subject"] and self._live(f"subject:{principal[1]}"):
            raise revoked("revocation: the human this request acts for is revoked")

    def check_credential(self, credential: Credential) -> None:
        """A credential is revoked by its id (jti or keyed hash) or by its provider's name (all of them)."""
        ids = self._ids["credential"]
        if not ids:
            return
        for ident in (credential.id, credential.provider):
            if ident and ident in ids and self._live(f"credential:{ident}"):
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
        self._lifted.pop(entry.rid, None)  # an operator's revocation here always applies, whatever was lifted
        self.apply(entry, received_at=None)
        if self.bus is not None:
            self.bus.publish(entry)
        return entry

    def apply(self, entry: Revocation, *, received_at: float | None, observe: bool = True) -> bool:
        """Apply a revocation (made here or received from the bus); False if known, lifted or expired."""
        if entry.kind not in KINDS or entry.expires_at <= self._clock() or self._was_lifted(entry):
            return False
        known = self._entries.get(entry.rid)
        if known is not None:
            if entry.created_at >= known.created_at:  # a newer version (say, a longer TTL) replaces it
                self._entries[entry.rid] = entry
            return False
        self._entries[entry.rid] = entry
        self._ids[entry.kind].add(entry.id)
        if received_at is not None and observe:
            self._metrics.revocation_propagation.observe(max(received_at - entry.created_at, 0.0))
        self._metrics.revocations.labels(entry.kind).inc()
        log.info("revocation_applied", kind=entry.kind, id=entry.id, remote=received_at is not None)
        for applier in self._appliers:
            applier(entry)
        return True

    def remove(self, rid: str) -> bool:
        """Lift a revocation here, then on the bus (a tombstone for the rest of its TTL)."""
        entry = self._entries.get(rid)
        if entry is None or not self.lift(entry):
            return False
        if self.bus is not None:
            self.bus.delete(entry)
        return True

    def lift(self, entry: Revocation) -> bool:
        """Forget this version of a revocation (and older ones); a stale copy cannot bring it back."""
        now = self._clock()
        self._lifted = {rid: e for rid, e in self._lifted.items() if e.expires_at > now}
        previous = self._lifted.get(entry.rid)
        if previous is None or entry.created_at > previous.created_at:
            self._lifted[entry.rid] = entry
        known = self._entries.get(entry.rid)
        if known is None or known.created_at > entry.created_at:  # a newer revocation stays in force
            return False
        self._forget(entry.rid)
        log.info("revocation_lifted", kind=entry.kind, id=entry.id)
        return True

    def _was_lifted(self, entry: Revocation) -> bool:
        lifted = self._lifted.get(entry.rid)
        return lifted is not None and entry.created_at <= lifted.created_at

    def _forget(self, rid: str) -> Revocation | None:
        entry = self._entries.pop(rid, None)
        if entry is not None:
            self._ids[entry.kind].discard(entry.id)
        return entry

    def list(self) -> list[Revocation]:
        now = self._clock()
        return [e for e in self._entries.values() if e.expires_at > now]


MAX_TTL = 30 * 86400.0
MAX_ID = 2048


class Enforcement:
    """Where a revocation, or a task's end, takes effect: tasks ended, cached credentials dropped,
    exchanges in flight that it names cut. The one place; the bus and the admin API only record."""

    def __init__(self, agent_id: str, tasks: TaskRegistry, credentials: CredentialCache,
                 exchanges: ActiveExchanges, metrics: Metrics) -> None:
        self._agent_id, self._tasks, self._credentials = agent_id, tasks, credentials
        self._exchanges, self._metrics = exchanges, metrics

    def attach(self, revocations: Revocations) -> None:
        self._tasks.on_end(self.task_ended)
        revocations.on_apply(self.apply)

    def task_ended(self, task: Task) -> None:
        self._credentials.drop_task(task.id)
        self._metrics.active_tasks.set(self._tasks.open_count)
        if task.ended == "revoked":
            self._exchanges.cut(lambda ex: ex.task_id == task.id, "revoked: task")

    def apply(self, entry: Revocation) -> None:
        kind, ident, cut = entry.kind, entry.id, self._exchanges.cut
        if kind == "task":
            self._tasks.revoke(ident)
        elif kind == "subject":
            self._tasks.revoke_subject(ident)
            cut(lambda ex: ex.principal is not None and ex.principal[1] == ident, "revoked: subject")
        elif kind == "credential":
            self._credentials.drop_where(lambda c, r: ident in (c.id, c.provider))
            cut(lambda ex: ex.credential is not None and ident in (ex.credential.id, ex.credential.provider),
                "revoked: credential")
        elif kind == "agent" and ident == self._agent_id:
            self._credentials.drop_all()
            cut(lambda ex: True, "revoked: agent")
        elif kind == "agent":  # another agent: cut its calls into ours
            cut(lambda ex: ex.caller_id == ident, "revoked: caller")


def parse_message(data: bytes, now: float) -> tuple[Revocation | None, dict[str, Any]]:
    """A bus message as a Revocation, or None when malformed.

    Times must be finite JSON numbers, the TTL at most MAX_TTL, ids bounded; a publisher's clock
    ahead of ours is clamped to now, so a message "from the future" cannot outrank what comes later
    (a tombstone dated ahead would otherwise silence every later revocation of that id).
    """
    try:
        raw = orjson.loads(data)
        kind, ident, created, expires = raw["kind"], raw["id"], raw["created_at"], raw["expires_at"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None, {}
    if not (isinstance(kind, str) and isinstance(ident, str) and 0 < len(ident) <= MAX_ID):
        return None, raw
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in (created, expires)):
        return None, raw
    created = min(float(created), now)
    if expires - created > MAX_TTL:
        return None, raw
    return Revocation(kind, ident, created, float(expires)), raw


TIMEOUTS = {"socket_connect_timeout": 2, "socket_timeout": 5}
RECANCEL_S = 0.1


async def cancel_and_wait(*tasks: asyncio.Task[None]) -> None:
    """Cancel background tasks that talk to Redis and wait until they ended, cancelling again while one runs on.

    On Python 3.11 a task cancelled while redis-py writes a command may never see the cancellation: redis-py
    bounds the write with ``asyncio.wait_for``, which returns the write's result instead of raising when the
    cancellation lands just after the write completed (CPython gh-86296, fixed in 3.12). The task then goes on
    (the fleet heartbeat sleeps and beats again), and one ``cancel()`` and a wait would wait forever: a sidecar
    whose start failed on a taken port never exited and said nothing (issue 12)."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
    await asyncio.gather(*tasks, return_exceptions=True)


def redis_client(config: RevocationConfig) -> tuple[Any, Any]:
    """The bus's client, through redis-py's own support, and the Sentinel manager to close (or None).

    With ``sentinel`` it is ``Sentinel.master_for``: every new connection asks the sentinels for the
    current primary, so the bus's reconnect after a failover lands on the new one. redis-py retries
    nothing itself (``Retry(NoBackoff(), 0)``): a subscription it reconnected on its own would skip
    the catch-up the bus does on every reconnect.
    """
    import redis.asyncio as redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    options = {**TIMEOUTS, "health_check_interval": 5, "retry": Retry(NoBackoff(), 0),
               **_auth(config.username, config.password)}
    if config.sentinel is None:
        assert config.redis_url is not None
        url = config.redis_url.reveal()
        return redis.from_url(url, **options, **_tls(config.tls, url.startswith("rediss:"))), None
    from redis.asyncio.sentinel import Sentinel

    s = config.sentinel
    tls = {"ssl": True, **_tls(config.tls, True)} if config.tls is not None else {}
    manager = Sentinel(list(s.sentinels), sentinel_kwargs={**TIMEOUTS, **_auth(s.username, s.password), **tls},  # type: ignore[no-untyped-call]
                       db=s.db, **options, **tls)
    return manager.master_for(s.service_name), manager


def _auth(username: Secret | None, password: Secret | None) -> dict[str, str]:
    named = {"username": username, "password": password}
    return {key: secret.reveal() for key, secret in named.items() if secret is not None}


def _tls(tls: RedisTls | None, enabled: bool) -> dict[str, Any]:
    """redis-py's TLS options, checks spelled out (redis-py 5 did not check host names by default)."""
    if not enabled:
        return {}
    files = {"ssl_ca_certs": tls.ca, "ssl_certfile": tls.cert, "ssl_keyfile": tls.key} if tls else {}
    return {"ssl_cert_reqs": "required", "ssl_check_hostname": True,
            **{key: str(path) for key, path in files.items() if path is not None}}


class RedisBus:
    """Publishes and stores revocations in Redis; subscribes and catches up on (re)connect."""

    def __init__(self, config: RevocationConfig, revocations: Revocations, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._revocations = revocations
        self._metrics = metrics
        self._clock = clock
        self._client: Any = None
        self._sentinel: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._outbox: dict[str, tuple[Revocation, bool]] = {}  # rid -> (entry, lifted): not yet in Redis
        self._wake = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self.synced = asyncio.Event()
        self.up = False

    async def start(self) -> None:
        self._client, self._sentinel = redis_client(self._config)
        self._tasks = [asyncio.ensure_future(self._run()), asyncio.ensure_future(self._write_loop())]

    @property
    def client(self) -> Any:
        """The bus's client (after start), shared by the fleet inventory: one pool, one Sentinel manager."""
        return self._client

    # -- subscribing and catching up -------------------------------------------------------
    async def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                await self._subscribe_and_listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any bus failure: mark down, keep serving, reconnect
                if self.up:  # it was connected: start over with a short delay
                    backoff = 0.2
                self._set_up(False)
                log.warning("revocation_bus_down", error_type=type(exc).__name__, retry_in_s=round(backoff, 2))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _subscribe_and_listen(self) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(CHANNEL)  # first: nothing published from here on is lost
            await self._write_outbox()  # changes made while disconnected reach the fleet
            stored = await self._catch_up(observe=self.synced.is_set())
            await self._restore(stored)
            self._set_up(True)
            self.synced.set()
            log.info("revocation_bus_synced", stored=len(stored), held=len(self._revocations.list()))
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    self._receive(message["data"], observe=True)
        finally:
            await pubsub.aclose()

    async def _catch_up(self, *, observe: bool) -> set[str]:
        """Apply every stored revocation and tombstone; the rids Redis holds."""
        keys = [key async for key in self._client.scan_iter(match=KEY_PREFIX + "*", count=500)]
        stored: set[str] = set()
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            for key, value in zip(chunk, await self._client.mget(chunk)):
                if value is not None:
                    stored.add(_text(key)[len(KEY_PREFIX):])
                    self._receive(value, observe=observe)
        return stored

    async def _restore(self, stored: set[str]) -> None:
        """Store (NX) and publish the live revocations held here that Redis lacks: it lost its data."""
        missing = [e for e in self._revocations.list() if e.rid not in stored]
        if not missing:
            return
        payloads = [orjson.dumps(e.as_dict()) for e in missing]
        async with self._client.pipeline(transaction=False) as pipe:
            for entry, payload in zip(missing, payloads):
                pipe.set(KEY_PREFIX + entry.rid, payload, px=max(self._ttl_ms(entry), 1), nx=True)
            written = await pipe.execute()
        async with self._client.pipeline(transaction=False) as pipe:
            for was_set, payload in zip(written, payloads):
                if was_set:  # another sidecar may have stored it (or a tombstone) first
                    pipe.publish(CHANNEL, payload)
            await pipe.execute()
        log.info("revocation_bus_restored", count=sum(1 for w in written if w))

    def _receive(self, data: bytes, *, observe: bool) -> None:
        now = self._clock()
        entry, raw = parse_message(data, now)
        if entry is None:
            log.warning("revocation_message_malformed")
            return
        if raw.get("deleted"):
            self._revocations.lift(entry)
            return
        self._revocations.apply(entry, received_at=now, observe=observe)

    def _set_up(self, up: bool) -> None:
        self.up = up
        self._metrics.revocation_bus_up.set(1 if up else 0)

    # -- writing: through the outbox ---------------------------------------------------------
    def publish(self, entry: Revocation) -> None:
        self._outbox[entry.rid] = (entry, False)
        self._wake.set()

    def delete(self, entry: Revocation) -> None:
        self._outbox[entry.rid] = (entry, True)
        self._wake.set()

    @property
    def unsent(self) -> int:
        """Local changes Redis has not taken yet."""
        return len(self._outbox)

    async def _write_loop(self) -> None:
        backoff = 0.2
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._write_outbox()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # local revocation already applied; kept for the next try
                log.warning("revocation_publish_failed", unsent=len(self._outbox), error_type=type(exc).__name__,
                            retry_in_s=round(backoff, 2))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                self._wake.set()
            else:
                backoff = 0.2

    async def _write_outbox(self) -> None:
        """Write every pending change in order; raise on the first failure (the rest stay)."""
        async with self._write_lock:
            for rid, item in list(self._outbox.items()):
                await self._write(*item)
                if self._outbox.get(rid) is item:
                    del self._outbox[rid]

    async def _write(self, entry: Revocation, lifted: bool) -> None:
        ttl_ms = self._ttl_ms(entry)
        if ttl_ms <= 0:
            return  # expired meanwhile: nothing to store or lift
        payload = orjson.dumps({**entry.as_dict(), "deleted": True} if lifted else entry.as_dict())
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.set(KEY_PREFIX + entry.rid, payload, px=ttl_ms)
            pipe.publish(CHANNEL, payload)
            await pipe.execute()

    def _ttl_ms(self, entry: Revocation) -> int:
        return int((entry.expires_at - self._clock()) * 1000)

    async def flush(self, timeout: float = 5.0) -> bool:
        """Try to write pending changes now (tests and shutdown); True when none are left."""
        try:
            async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can lose our cancellation (gh-86296)
                await self._write_outbox()
        except Exception as exc:
            log.warning("revocation_flush_failed", unsent=len(self._outbox), error_type=type(exc).__name__)
        return not self._outbox

    async def aclose(self) -> None:
        if self._client is not None and self.up:
            await self.flush(timeout=2.0)
        if self._outbox:
            log.warning("revocation_unsent_at_shutdown", unsent=len(self._outbox))
        await cancel_and_wait(*self._tasks)
        if self._client is not None:
            await self._client.aclose()
        for node in self._sentinel.sentinels if self._sentinel is not None else ():
            await node.aclose()


def _text(key: bytes | str) -> str:
    return key.decode() if isinstance(key, bytes) else key
