"""Tasks: what ties the hops of one piece of work to the business event that started it.

A task is opened by an inbound request carrying a verified human token, or by
``POST /tasks``. The agent receives its id (128 random bits) instead of the human's token
and sends it back on its outbound calls (``X-Sidecar-Task``). A task ends at the first of:
its inbound request completing (``tasks.end: response``), its TTL, the subject token's
``exp``, revocation.

Memory is bounded whatever a caller replays:
- at most ``max_open_per_principal`` tasks are open at once per principal (issuer, subject);
  one more is refused with ``rate_limited`` (429, ``Retry-After``: when the earliest of them ends);
- an ended task leaves a tombstone for ``max_ttl`` after it **ended**, so a late call gets
  ``task_ended`` or ``revoked`` rather than ``unknown_task``; at most ``max_tombstones`` are
  kept, the oldest forgotten first (then a late call gets ``unknown_task``, still refused).

Any task id the agent presents is accepted: a compromised agent can use one open task for
another's purpose (PRODUCT.md). Every use is logged through the trust-decision event.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import structlog

from sidecar.config_model import TasksConfig
from sidecar.credentials.base import TaskRef
from sidecar.errors import TaskRefused
from sidecar.fields import Secret

log = structlog.get_logger("sidecar.tasks")
TASK_HEADER = "X-Sidecar-Task"

Principal = tuple[str, str]  # (iss, sub)


@dataclass(slots=True)
class Task:
    id: str
    principal: Principal | None
    subject_token: Secret | None = field(repr=False)
    delegation: str  # delegated (a verified human token) | asserted (a bare principal)
    actor_type: str | None
    trigger: str | None
    opened_at: float
    expires_at: float  # wall clock, for listings and events
    deadline: float  # the monotonic clock's time at expires_at: what ends the task (a stepped wall clock does not)
    act_chain: tuple[str, ...] = ()
    ended: str | None = None  # None while open; "task_ended" | "revoked"
    ended_at: float | None = None
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    def ref(self) -> TaskRef:
        iss, sub = self.principal or (None, None)
        return TaskRef(self.id, iss, sub, self.subject_token, self.delegation)


class TaskRegistry:
    """Open tasks by id and per principal, and a bounded LRU of the tombstones of ended ones."""

    def __init__(self, *, max_ttl: float, max_open_per_principal: int, max_tombstones: int,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._open: dict[str, Task] = {}
        self._by_principal: dict[Principal, set[str]] = {}
        self._ended: OrderedDict[str, Task] = OrderedDict()  # oldest end first
        self._max_ttl = max_ttl
        self._max_per_principal = max_open_per_principal
        self._max_tombstones = max_tombstones
        self._clock = clock
        self._monotonic = monotonic
        self._on_end: list[Callable[[Task], None]] = []

    @classmethod
    def from_config(cls, cfg: TasksConfig, clock: Callable[[], float] = time.time,
                    monotonic: Callable[[], float] = time.monotonic) -> TaskRegistry:
        return cls(max_ttl=cfg.max_ttl, max_open_per_principal=cfg.max_open_per_principal,
                   max_tombstones=cfg.max_tombstones, clock=clock, monotonic=monotonic)

    @property
    def open_count(self) -> int:
        return len(self._open)

    @property
    def tombstone_count(self) -> int:
        return len(self._ended)

    def on_end(self, callback: Callable[[Task], None]) -> None:
        self._on_end.append(callback)

    def open(self, *, principal: Principal | None, subject_token: Secret | None, delegation: str,
             actor_type: str | None, trigger: str | None, ttl: float, token_exp: float | None = None,
             act_chain: tuple[str, ...] = ()) -> Task:
        now = self._clock()
        self._forget_tombstones(now)
        if principal is not None:
            self._check_principal(principal)
        expires = now + min(ttl, self._max_ttl)
        if token_exp is not None:
            expires = min(expires, token_exp)
        deadline = self._monotonic() + (expires - now)
        task = Task(secrets.token_hex(16), principal, subject_token, delegation, actor_type, trigger, now, expires,
                    deadline, act_chain)
        self._open[task.id] = task
        if principal is not None:
            self._by_principal.setdefault(principal, set()).add(task.id)
        self._arm(task)
        return task

    def _check_principal(self, principal: Principal) -> None:
        """Refuse one more open task for a principal at its cap, saying when the earliest one ends."""
        ids = self._by_principal.get(principal, set())
        if len(ids) < self._max_per_principal:
            return
        for task_id in [i for i in ids if self._over(self._open[i])]:  # past its TTL, timer not yet run
            self.end(task_id, "task_ended")
        if len(ids) < self._max_per_principal:
            return
        first_end = min(self._open[task_id].deadline for task_id in ids)
        raise TaskRefused("rate_limited", f"tasks: this principal already has {len(ids)} open tasks; expected "
                                          f"at most tasks.max_open_per_principal ({self._max_per_principal})",
                          detail="tasks.max_open_per_principal",
                          retry_after=max(1, math.ceil(first_end - self._monotonic())))

    def _over(self, task: Task) -> bool:
        return task.deadline <= self._monotonic()

    def _arm(self, task: Task) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task.timer = loop.call_later(max(task.deadline - self._monotonic(), 0.0), self.end, task.id, "task_ended")

    def get(self, task_id: str) -> Task:
        """The open task with this id, or a refusal saying why it cannot be used."""
        task = self._open.get(task_id)
        if task is not None and self._over(task):
            self.end(task_id, "task_ended")
        if task is None:
            self._forget_tombstones(self._clock())
            task = self._ended.get(task_id)
        if task is None:
            raise TaskRefused("unknown_task", "tasks: the X-Sidecar-Task id names no task of this sidecar")
        if task.ended == "revoked":
            raise TaskRefused("revoked", "tasks: this task was revoked")
        if task.ended is not None:
            raise TaskRefused("task_ended", "tasks: this task has ended")
        return task

    def end(self, task_id: str, how: str = "task_ended") -> Task | None:
        """End an open task (its tombstone says how); a later revocation turns a tombstone into ``revoked``."""
        task = self._open.pop(task_id, None)
        if task is None:
            tombstone = self._ended.get(task_id)
            if tombstone is not None and how == "revoked":
                tombstone.ended = how
            return tombstone
        now = self._clock()
        task.ended, task.ended_at = how, now
        task.subject_token = None  # the human's token is not kept past the task
        if task.timer is not None:
            task.timer.cancel()
            task.timer = None
        self._release_principal(task)
        self._ended[task_id] = task
        self._forget_tombstones(now)
        for callback in self._on_end:
            callback(task)
        return task

    def _release_principal(self, task: Task) -> None:
        if task.principal is None:
            return
        ids = self._by_principal.get(task.principal)
        if ids is not None:
            ids.discard(task.id)
            if not ids:
                del self._by_principal[task.principal]

    def _forget_tombstones(self, now: float) -> None:
        """Drop tombstones past max_ttl since their end, and the oldest beyond max_tombstones."""
        horizon = now - self._max_ttl
        ended = self._ended
        while ended:
            oldest = next(iter(ended.values()))
            if len(ended) <= self._max_tombstones and (oldest.ended_at or 0.0) > horizon:
                return
            ended.popitem(last=False)

    def revoke(self, task_id: str) -> bool:
        return self.end(task_id, "revoked") is not None

    def revoke_subject(self, subject: str) -> list[str]:
        ids = [t.id for t in self._open.values() if t.principal and t.principal[1] == subject]
        for task_id in ids:
            self.end(task_id, "revoked")
        return ids

    def open_tasks(self) -> list[Task]:
        return [t for t in self._open.values() if not self._over(t)]

    def close(self) -> None:
        for task in self._open.values():
            if task.timer is not None:
                task.timer.cancel()
