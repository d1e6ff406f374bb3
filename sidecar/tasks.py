"""Tasks: what ties the hops of one piece of work to the business event that started it.

A task is opened by an inbound request carrying a verified human token, or by
``POST /tasks``. The agent receives its id (128 random bits) instead of the human's token
and sends it back on its outbound calls (``X-Sidecar-Task``). A task ends at the first of:
its inbound request completing (``tasks.end: response``), its TTL, the subject token's
``exp``, revocation. Ended tasks leave a tombstone until ``max_ttl`` so a late call gets
``task_ended`` or ``revoked`` rather than ``unknown_task``.

Any task id the agent presents is accepted: a compromised agent can use one open task for
another's purpose (PRODUCT.md). Every use is logged through the trust-decision event.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

import structlog

from sidecar.credentials.base import TaskRef
from sidecar.errors import TaskRefused
from sidecar.fields import Secret

log = structlog.get_logger("sidecar.tasks")
TASK_HEADER = "X-Sidecar-Task"


@dataclass(slots=True)
class Task:
    id: str
    principal: tuple[str, str] | None  # (iss, sub)
    subject_token: Secret | None = field(repr=False)
    delegation: str  # delegated (a verified human token) | asserted (a bare principal)
    actor_type: str | None
    trigger: str | None
    opened_at: float
    expires_at: float
    act_chain: tuple[str, ...] = ()
    ended: str | None = None  # None while open; "task_ended" | "revoked"
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    def ref(self) -> TaskRef:
        iss, sub = self.principal or (None, None)
        return TaskRef(self.id, iss, sub, self.subject_token, self.delegation)


class TaskRegistry:
    def __init__(self, *, max_ttl: float, clock: Callable[[], float] = time.time) -> None:
        self._tasks: dict[str, Task] = {}
        self._max_ttl = max_ttl
        self._clock = clock
        self._on_end: list[Callable[[Task], None]] = []
        self.open_count = 0

    def on_end(self, callback: Callable[[Task], None]) -> None:
        self._on_end.append(callback)

    def open(self, *, principal: tuple[str, str] | None, subject_token: Secret | None, delegation: str,
             actor_type: str | None, trigger: str | None, ttl: float, token_exp: float | None = None,
             act_chain: tuple[str, ...] = ()) -> Task:
        now = self._clock()
        expires = now + min(ttl, self._max_ttl)
        if token_exp is not None:
            expires = min(expires, token_exp)
        task = Task(secrets.token_hex(16), principal, subject_token, delegation, actor_type, trigger, now, expires,
                    act_chain)
        self._tasks[task.id] = task
        self.open_count += 1
        self._arm(task)
        self._sweep(now)
        return task

    def _arm(self, task: Task) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task.timer = loop.call_later(max(task.expires_at - self._clock(), 0.0), self.end, task.id, "task_ended")

    def get(self, task_id: str) -> Task:
        """The open task with this id, or a refusal saying why it cannot be used."""
        task = self._tasks.get(task_id)
        if task is None:
            raise TaskRefused("unknown_task", "tasks: the X-Sidecar-Task id names no task of this sidecar")
        if task.ended is None and task.expires_at <= self._clock():
            self.end(task_id, "task_ended")
        if task.ended == "revoked":
            raise TaskRefused("revoked", "tasks: this task was revoked")
        if task.ended is not None:
            raise TaskRefused("task_ended", "tasks: this task has ended")
        return task

    def end(self, task_id: str, how: str = "task_ended") -> Task | None:
        task = self._tasks.get(task_id)
        if task is None or (task.ended is not None and not (how == "revoked" and task.ended != how)):
            return task
        was_open = task.ended is None
        task.ended = how
        task.subject_token = None  # the human's token is not kept past the task
        if task.timer is not None:
            task.timer.cancel()
        if was_open:
            self.open_count -= 1
            for callback in self._on_end:
                callback(task)
        return task

    def revoke(self, task_id: str) -> bool:
        return self.end(task_id, "revoked") is not None

    def revoke_subject(self, subject: str) -> list[str]:
        ids = [t.id for t in self._tasks.values() if t.principal and t.principal[1] == subject and t.ended is None]
        for task_id in ids:
            self.end(task_id, "revoked")
        return ids

    def open_tasks(self) -> list[Task]:
        now = self._clock()
        return [t for t in self._tasks.values() if t.ended is None and t.expires_at > now]

    def _sweep(self, now: float) -> None:
        """Forget tombstones older than max_ttl (bounded memory)."""
        if len(self._tasks) % 256:
            return
        horizon = now - self._max_ttl
        for task_id in [t.id for t in self._tasks.values() if t.ended and t.expires_at < horizon]:
            del self._tasks[task_id]

    def close(self) -> None:
        for task in self._tasks.values():
            if task.timer is not None:
                task.timer.cancel()
