"""The event loop's health: how late it runs (a lag histogram) and a watchdog for stalls.

A timer on the loop, every ``observability.loop_sample_interval``, records how late it ran
(``sidecar_event_loop_lag_seconds``) and when. A daemon thread looks twice per
``stall_threshold``: when the loop has not run that timer for ``stall_threshold`` past its due
time, something blocks the loop, and the thread logs ``event_loop_stalled`` once for that stall
with the loop thread's stack as it is at that moment (file, line and function of each frame;
never locals or source text, which may hold request data). At most one report per
``stall_report_interval``; every stall is counted (``sidecar_event_loop_stalls_total``) and a
report says how many went unreported since the last one.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback

import structlog

from sidecar.config_model import Observability
from sidecar.observe.metrics import Metrics

log = structlog.get_logger("sidecar.loop")
STACK_LIMIT = 40  # innermost frames reported


def thread_stack(ident: int) -> list[str]:
    """A thread's stack, outermost call first, as ``file:line in function`` (no locals, no source)."""
    frame = sys._current_frames().get(ident)
    if frame is None:
        return []
    frames = traceback.StackSummary.extract(traceback.walk_stack(frame), limit=STACK_LIMIT, lookup_lines=False)
    return [f"{f.filename}:{f.lineno} in {f.name}" for f in reversed(frames)]


class LoopMonitor:
    """Samples the running loop's lag; its watchdog thread reports stalls with the loop's stack."""

    def __init__(self, settings: Observability, metrics: Metrics) -> None:
        self.settings = settings
        self._metrics = metrics
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._ticked = 0.0  # time.monotonic() of the last tick
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported_tick = -1.0  # the tick a stall was last noticed after: one report per stall
        self._last_report = float("-inf")
        self._unreported = 0

    def start(self) -> None:
        """Called on the loop to watch."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._ticked = time.monotonic()
        self._next(self._loop.time())
        self._thread = threading.Thread(target=self._watch, name="sidecar-loop-watchdog", daemon=True)
        self._thread.start()

    def silent_for(self) -> float:
        """Seconds since the loop last ran its sampling timer, beyond one interval (0 while it runs); safe
        to read from any thread."""
        if self._loop is None:
            return 0.0
        return max(0.0, time.monotonic() - self._ticked - self.settings.loop_sample_interval)

    def stop(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.cancel()
        if self._thread is not None:
            self._thread.join(1.0)

    # -- on the loop ------------------------------------------------------------------------
    def _next(self, now: float) -> None:
        assert self._loop is not None
        self._due = now + self.settings.loop_sample_interval
        self._timer = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self._metrics.loop_lag.observe(max(0.0, now - self._due))
        self._ticked = time.monotonic()
        self._next(now)

    # -- the watchdog thread ----------------------------------------------------------------
    def _watch(self) -> None:
        threshold = self.settings.stall_threshold
        while not self._stop.wait(threshold / 2):
            ticked = self._ticked
            late = time.monotonic() - ticked - self.settings.loop_sample_interval
            if late >= threshold and ticked != self._reported_tick:
                self._reported_tick = ticked
                self._stalled(late)

    def _stalled(self, late: float) -> None:
        self._metrics.loop_stalls.inc()
        now = time.monotonic()
        if now - self._last_report < self.settings.stall_report_interval:
            self._unreported += 1
            return
        self._last_report = now
        unreported, self._unreported = self._unreported, 0
        log.warning("event_loop_stalled", late_ms=round(late * 1000), threshold_ms=round(self.settings.stall_threshold
                    * 1000), unreported_stalls=unreported, stack=thread_stack(self._loop_thread),
                    message="loop: a callback held the event loop past observability.stall_threshold; "
                            "the stack shows where the loop thread was")
