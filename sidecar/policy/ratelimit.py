"""Token buckets for ``rate_limit`` rules, kept in one object that outlives policy reloads.

A rule's ``rate_limit: {requests: N, per: T}`` is a bucket of ``N`` tokens refilled at ``N / T``
per second, so a burst of ``N`` is allowed and the long-run rate is ``N`` per ``T``. Buckets are
keyed by ``(rule id, key kind, agent or task id)``; the capacity and rate are passed on every call,
so a reloaded rule with a new limit keeps its bucket and the new figures apply at once.

A :class:`RateLimiter` is created once by the application and handed to every
:func:`~sidecar.policy.engine.load_policy`, so limits survive a reload. Buckets that have been
full for a whole period hold no information and are swept from time to time, so per-task keys
do not accumulate. The limiter runs on the event loop's thread only: no locks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

SWEEP_EVERY = 4096  # calls to take() between sweeps of idle buckets
_EPSILON = 1e-9  # float refill error must not refuse a request that is exactly on time


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float
    idle_after: float  # seconds after `updated` at which the bucket is full again


@dataclass(frozen=True, slots=True)
class Limit:
    """One bucket to charge: its key, capacity and refill period (seconds)."""

    key: Hashable
    requests: int
    per: float


class RateLimiter:
    """Token buckets keyed by rule and agent or task; survives policy reloads."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[Hashable, _Bucket] = {}
        self._calls = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, limits: Iterable[Limit]) -> tuple[Limit, int] | None:
        """Charge one token to every bucket, or none of them if any is empty.

        Returns ``None`` when the request may pass; otherwise the first exhausted limit and the
        seconds (at least 1) until every exhausted bucket has a token again.
        """
        now = self._clock()
        self._maybe_sweep(now)
        pending = [(limit, self._refilled(limit, now)) for limit in limits]
        exhausted = [(limit, bucket) for limit, bucket in pending if bucket.tokens < 1.0 - _EPSILON]
        if exhausted:
            wait = max(_seconds_to_token(limit, bucket) for limit, bucket in exhausted)
            return exhausted[0][0], wait
        for limit, bucket in pending:
            _settle(bucket, limit, max(0.0, bucket.tokens - 1.0), now)
        return None

    def _refilled(self, limit: Limit, now: float) -> _Bucket:
        bucket = self._buckets.get(limit.key)
        if bucket is None:
            bucket = self._buckets[limit.key] = _Bucket(float(limit.requests), now, 0.0)
            return bucket
        elapsed = max(0.0, now - bucket.updated)
        _settle(bucket, limit, bucket.tokens + elapsed * limit.requests / limit.per, now)
        return bucket

    def _maybe_sweep(self, now: float) -> None:
        self._calls += 1
        if self._calls % SWEEP_EVERY:
            return
        self.sweep(now)

    def sweep(self, now: float | None = None) -> None:
        """Forget buckets that are full again: they would be recreated identical."""
        now = self._clock() if now is None else now
        idle = [k for k, b in self._buckets.items() if now - b.updated >= b.idle_after]
        for key in idle:
            del self._buckets[key]


def _settle(bucket: _Bucket, limit: Limit, tokens: float, now: float) -> None:
    bucket.tokens = min(float(limit.requests), tokens)
    bucket.updated = now
    bucket.idle_after = limit.per * (limit.requests - bucket.tokens) / limit.requests


def _seconds_to_token(limit: Limit, bucket: _Bucket) -> int:
    rate = limit.requests / limit.per
    return max(1, math.ceil((1.0 - bucket.tokens) / rate))
