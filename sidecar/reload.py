"""One reload contract, and the one file watcher that drives it.

A :class:`Reloadable` is state read from files (the policy set, this sidecar's SVID and bundles, the
CONNECT interception CA).
A :class:`Reloader` reloads it the same way whoever asks (the watch, ``POST /reload``, a test):

    build()   in a worker thread: read, parse, compile (the loop never waits for a disk or a key)
    apply()   on the loop, only when build() succeeded: the candidate is in force from here on
    failed    build() raised ReloadFailed: the last good state stays, counted ({outcome="error"}),
              logged (``<name>_reload_failed``) and returned to the caller

The :class:`FileWatcher` is the one watch loop: once a second it compares each registered
reloader's file stamps (inode, mtime, size of every path resolved, so an atomic symlink swap
counts) and starts a reload of those that changed; a reload still in flight is not started again.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, Sequence, TypeVar

import structlog
from prometheus_client import Counter

log = structlog.get_logger("sidecar.reload")
POLL_SECONDS = 1.0
Stamp = tuple[tuple[int, int, int], ...]
C = TypeVar("C")


class ReloadFailed(Exception):
    """A candidate that cannot be put in force; ``errors`` say why, one message each; ``reason``, when the
    Reloadable gives one, is a stable code for the whole failure (logged beside the messages)."""

    def __init__(self, errors: Sequence[str], reason: str | None = None) -> None:
        super().__init__("; ".join(errors))
        self.errors = tuple(errors)
        self.reason = reason


class Reloadable(Protocol[C]):
    """State read from files, rebuilt whole and swapped in, or not at all."""

    name: str  # "policy" | "identity" | "intercept_ca": the log events' prefix

    def files(self) -> Sequence[Path]:
        """The paths the state is read from (the watch stamps them)."""
        ...

    def build(self) -> C:
        """Read and check a complete candidate; runs in a worker thread; raises ReloadFailed."""
        ...

    def apply(self, candidate: C) -> dict[str, object]:
        """Put the candidate in force (on the loop); returns the fields of the ``<name>_reloaded`` log line."""
        ...

    def in_force(self) -> str:
        """What is in force now (a policy version, a SPIFFE ID): said when a failed reload keeps it."""
        ...


@dataclass(frozen=True)
class Reloaded:
    """The outcome of one reload, as the caller of ``POST /reload`` is told it."""

    name: str
    ok: bool
    in_force: str  # after the reload: the new state, or the one kept
    errors: tuple[str, ...] = ()


def stamp(paths: Sequence[Path]) -> Stamp:
    """Inode, mtime and size of each path's target (0s for one that cannot be read): any change shows."""
    return tuple(_stat(path) for path in paths)


def _stat(path: Path) -> tuple[int, int, int]:
    try:
        st = os.stat(os.path.realpath(path))
    except OSError:
        return (0, 0, 0)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class Reloader(Generic[C]):
    """Reloads one Reloadable: one reload at a time, the file stamp it was read at, counted and logged."""

    def __init__(self, target: Reloadable[C], counter: Counter) -> None:
        self.target = target
        self._counter = counter
        self._stamp = stamp(target.files())
        self._lock = asyncio.Lock()

    @property
    def busy(self) -> bool:
        """A reload is in flight."""
        return self._lock.locked()

    def changed(self) -> bool:
        """True once per change of the files: the stamp moves on whether or not the reload then succeeds."""
        now = stamp(self.target.files())
        if now == self._stamp:
            return False
        self._stamp = now
        return True

    async def reload(self) -> Reloaded:
        """Build in a worker thread, then apply; waits for a reload in flight to finish first."""
        async with self._lock:
            self._stamp = stamp(self.target.files())
            return self._settle(await asyncio.to_thread(self._build))

    async def reload_if_changed(self) -> Reloaded | None:
        """:meth:`reload` when the files changed since they were last read; None when they did not."""
        async with self._lock:
            if not self.changed():
                return None
            return self._settle(await asyncio.to_thread(self._build))

    def check(self) -> bool:
        """Reload on this thread if the files changed; True when a new state is in force."""
        return self.changed() and self._settle(self._build()).ok

    def _build(self) -> C | ReloadFailed:
        try:
            return self.target.build()
        except ReloadFailed as failed:
            return failed

    def _settle(self, built: C | ReloadFailed) -> Reloaded:
        name = self.target.name
        if isinstance(built, ReloadFailed):
            self._counter.labels("error").inc()
            reason = {} if built.reason is None else {"reason": built.reason}
            log.error(f"{name}_reload_failed", **reason, errors=list(built.errors), kept=self.target.in_force())
            return Reloaded(name, False, self.target.in_force(), built.errors)
        fields = self.target.apply(built)
        self._counter.labels("ok").inc()
        log.info(f"{name}_reloaded", **fields)
        return Reloaded(name, True, self.target.in_force())


class FileWatcher:
    """The one watch loop of the process: registered reloaders are reloaded when their files change."""

    def __init__(self, interval: float = POLL_SECONDS) -> None:
        self.interval = interval
        self._reloaders: list[Reloader[Any]] = []
        self._reloads: set[asyncio.Task[Reloaded]] = set()
        self._task: asyncio.Task[None] | None = None

    def watch(self, reloader: Reloader[Any]) -> None:
        self._reloaders.append(reloader)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.tick()

    def tick(self) -> None:
        """Start a reload of each reloader whose files changed, unless one is already in flight: a file that
        does not answer (a FIFO, a hung mount) holds its own reload, never the other watches."""
        for reloader in self._reloaders:
            if not reloader.busy and reloader.changed():
                self._start(reloader)

    def _start(self, reloader: Reloader[Any]) -> None:
        task = asyncio.ensure_future(reloader.reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def aclose(self) -> None:
        tasks = [t for t in (self._task, *self._reloads) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
