"""The credential cache: single-flight, refreshed off the request path, bounded.

Requests read the cache. A miss starts one fetch that every concurrent request for the
same key awaits (single-flight). A credential with a lifetime is refreshed in the
background at about 80 % of it (with jitter), but only if it was used since it was
minted: idle credentials simply expire. A failed refresh is retried with backoff while the
cached credential is still valid; once it has expired, requests fetch themselves and a
failure refuses them with ``credential_unavailable``.

Keys are ``(provider, provider.cache_key(req))``; a task-bound provider's key includes the
task, and :meth:`drop_task` drops them when the task ends.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterator

import structlog

from sidecar.credentials.base import Credential, CredentialProvider, CredentialRequest
from sidecar.errors import CredentialUnavailable
from sidecar.observe.metrics import Metrics

log = structlog.get_logger("sidecar.credentials")

REFRESH_AT = 0.8
JITTER = 0.05
MIN_BACKOFF, MAX_BACKOFF = 0.5, 30.0
EXPIRY_MARGIN = 5.0  # never hand out a token that expires within this many seconds


@dataclass(slots=True)
class _Entry:
    credential: Credential
    provider: CredentialProvider
    request: CredentialRequest
    deadline: float | None  # the monotonic clock's time at credential.expires_at (None: it does not expire)
    used: bool = False
    refresher: asyncio.TimerHandle | None = None
    failures: int = 0
    refreshing: asyncio.Task[None] | None = field(default=None, repr=False)


class CredentialCache:
    def __init__(self, metrics: Metrics, *, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        """``clock`` reads the wall clock credentials' expiries are stated in, once, when one is stored;
        from then on its lifetime runs on ``monotonic``, so that a wall clock stepped back cannot hand out
        an expired token, nor one stepped forward drop every cached one (issue 12)."""
        self._metrics = metrics
        self._max = max_entries
        self._clock = clock
        self._monotonic = monotonic
        self._entries: OrderedDict[tuple[str, Hashable], _Entry] = OrderedDict()
        self._inflight: dict[tuple[str, Hashable], asyncio.Future[Credential]] = {}
        self._ended_tasks: OrderedDict[str, None] = OrderedDict()  # bounded like the entries

    # -- the request path ----------------------------------------------------------
    def cached(self, provider: CredentialProvider, req: CredentialRequest) -> tuple[Credential, str] | None:
        """A fresh cached credential without awaiting anything (the common case), or None."""
        entry = self._entries.get((provider.name, provider.cache_key(req)))
        if entry is None or not self._fresh(entry):
            return None
        entry.used = True
        self._metrics.count_cache(provider.name, "hit")
        return entry.credential, "static" if entry.credential.standing else "cache"

    async def get(self, provider: CredentialProvider, req: CredentialRequest) -> tuple[Credential, str]:
        """A valid credential and where it came from: ``cache``, ``minted`` or ``static``."""
        hit = self.cached(provider, req)
        if hit is not None:
            return hit
        self._metrics.count_cache(provider.name, "miss")
        credential = await self._single_flight((provider.name, provider.cache_key(req)), provider, req)
        return credential, "static" if credential.standing else "minted"

    def _fresh(self, entry: _Entry) -> bool:
        return entry.deadline is None or self._remaining(entry) > EXPIRY_MARGIN

    def _remaining(self, entry: _Entry) -> float:
        """Seconds the entry's credential is still valid (0 past its expiry; never-expiring: infinite)."""
        return float("inf") if entry.deadline is None else max(entry.deadline - self._monotonic(), 0.0)

    async def _single_flight(self, key: tuple[str, Hashable], provider: CredentialProvider,
                             req: CredentialRequest) -> Credential:
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._inflight[key] = future
            asyncio.ensure_future(self._fetch_into(key, provider, req, future))
        return await asyncio.shield(future)

    async def _fetch_into(self, key: tuple[str, Hashable], provider: CredentialProvider,
                          req: CredentialRequest, future: asyncio.Future[Credential]) -> None:
        try:
            credential = await self._fetch(provider, req)
        except BaseException as exc:  # handed to every waiter, never swallowed
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters may all have gone
        else:
            self._store(key, provider, req, credential)
            future.set_result(credential)
        finally:
            self._inflight.pop(key, None)

    async def _fetch(self, provider: CredentialProvider, req: CredentialRequest) -> Credential:
        started = time.perf_counter()
        try:
            credential = await provider.fetch(req)
        except CredentialUnavailable:
            self._metrics.credentials_issued.labels(provider.name, provider.type, "error").inc()
            raise
        except Exception as exc:  # a provider bug must still fail closed, with a clear reason
            self._metrics.credentials_issued.labels(provider.name, provider.type, "error").inc()
            log.error("credential_fetch_failed", provider=provider.name, error_type=type(exc).__name__)
            raise CredentialUnavailable(f"credentials: provider {provider.name} failed",
                                        detail=type(exc).__name__) from None
        finally:
            self._metrics.credential_fetch_duration.labels(provider.name).observe(time.perf_counter() - started)
        self._metrics.credentials_issued.labels(provider.name, provider.type, "ok").inc()
        return credential

    # -- storage and background refresh ---------------------------------------------
    def _store(self, key: tuple[str, Hashable], provider: CredentialProvider, req: CredentialRequest,
               credential: Credential) -> None:
        if req.task is not None and req.task.id in self._ended_tasks:
            return  # fetched while its task ended: handed to the waiting request, never kept or refreshed
        old = self._entries.pop(key, None)
        if old is not None and old.refresher is not None:
            old.refresher.cancel()
        deadline = None if credential.expires_at is None else \
            self._monotonic() + credential.expires_at - self._clock()
        entry = _Entry(credential, provider, req, deadline, used=True)
        self._entries[key] = entry
        self._schedule(key, entry)
        self._evict()
        self._count_ephemeral()

    def _schedule(self, key: tuple[str, Hashable], entry: _Entry, delay: float | None = None) -> None:
        cred = entry.credential
        if cred.expires_at is None:
            return
        if delay is None:
            start = cred.issued_at or self._clock()
            lifetime = max(cred.expires_at - start, 1.0)
            at = start + lifetime * (REFRESH_AT + random.uniform(-JITTER, JITTER))
            delay = max(at - self._clock(), 0.0)
        loop = asyncio.get_running_loop()
        entry.refresher = loop.call_later(delay, self._refresh_due, key, entry)

    def _refresh_due(self, key: tuple[str, Hashable], entry: _Entry) -> None:
        if self._entries.get(key) is not entry:
            return
        if not entry.used:  # idle: let it expire rather than keep minting for nobody
            self._drop_at_expiry(key, entry)
            return
        entry.refreshing = asyncio.ensure_future(self._refresh(key, entry))

    async def _refresh(self, key: tuple[str, Hashable], entry: _Entry) -> None:
        try:
            credential = await self._fetch(entry.provider, entry.request)
        except Exception as exc:
            entry.failures += 1
            backoff = min(MIN_BACKOFF * 2 ** entry.failures, MAX_BACKOFF) * random.uniform(0.8, 1.2)
            remaining = self._remaining(entry)
            log.warning("credential_refresh_failed", provider=entry.provider.name, attempt=entry.failures,
                        reason=getattr(exc, "reason", type(exc).__name__),
                        detail=getattr(exc, "detail", None), valid_for_s=round(remaining, 1))
            if remaining > backoff and self._entries.get(key) is entry:
                self._schedule(key, entry, backoff)
            return
        if self._entries.get(key) is entry:
            self._store(key, entry.provider, entry.request, credential)
            self._entries[key].used = False

    def _drop_at_expiry(self, key: tuple[str, Hashable], entry: _Entry) -> None:
        loop = asyncio.get_running_loop()
        entry.refresher = loop.call_later(self._remaining(entry), self._remove_if, key, entry)

    def _remove_if(self, key: tuple[str, Hashable], entry: _Entry) -> None:
        if self._entries.get(key) is entry:
            self._remove(key)
            self._count_ephemeral()

    def _remove(self, key: tuple[str, Hashable]) -> None:
        """Drop one entry and its timers; the caller recounts once (a count is O(entries))."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            if entry.refresher is not None:
                entry.refresher.cancel()
            if entry.refreshing is not None:
                entry.refreshing.cancel()

    def _evict(self) -> None:
        while len(self._entries) > self._max:
            self._remove(next(iter(self._entries)))

    def _count_ephemeral(self) -> None:
        self._metrics.ephemeral_credentials.set(
            sum(1 for e in self._entries.values() if not e.credential.standing))

    # -- revocation and inventory ---------------------------------------------------
    def drop_where(self, predicate: Callable[[Credential, CredentialRequest], bool]) -> int:
        keys = [k for k, e in self._entries.items() if predicate(e.credential, e.request)]
        for key in keys:
            self._remove(key)
        if keys:
            self._count_ephemeral()
        return len(keys)

    def drop_task(self, task_id: str) -> int:
        self._ended_tasks[task_id] = None
        while len(self._ended_tasks) > self._max:
            self._ended_tasks.popitem(last=False)
        return self.drop_where(lambda c, r: r.task is not None and r.task.id == task_id)

    def drop_credential(self, credential_id: str) -> int:
        return self.drop_where(lambda c, r: c.id == credential_id)

    def drop_all(self) -> int:
        return self.drop_where(lambda c, r: True)

    def held(self) -> Iterator[tuple[Credential, CredentialRequest]]:
        for entry in list(self._entries.values()):
            yield entry.credential, entry.request

    async def aclose(self) -> None:
        for key in list(self._entries):
            self._remove(key)
        self._count_ephemeral()
