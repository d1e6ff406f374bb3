"""The log's way to stdout: batched on the event loop, written by a thread, bounded in memory.

The loop never writes to the stream itself. Lines gather into a batch that is handed to one
writer thread every FLUSH_AFTER seconds or FLUSH_BYTES (a quarter of the buffer if that is less; at
once after a quiet spell, or outside a loop); the thread does the blocking ``write``. A consumer that stops reading stdout therefore
blocks that thread, never the loop: health, metrics and admin keep answering.

What waits for the stream (the batch and what was handed over) is bounded by
``logging.buffer_bytes``. When it is full, ``logging.on_backpressure`` decides (PRODUCT.md):

    block    a new exchange waits for room (``admission()``), at most ``block_timeout``, then is
             refused ``log_unavailable``
    refuse   a new exchange is refused ``log_unavailable`` at once
    drop     exchanges go on; lines that do not fit are dropped

Under ``block`` and ``refuse`` the event of an exchange that was let in is always kept (it may go
past the bound by the events of the exchanges in flight); under every policy any other line that
does not fit is dropped. Every dropped line is counted (``sidecar_log_lines_dropped_total``) and,
once the stream takes lines again, one ``log_lines_dropped`` line says how many went missing.
Lines are whole: one thread writes whole batches, a line is dropped whole or written whole.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, Awaitable, Callable

import orjson

from sidecar.config_model import Backpressure
from sidecar.errors import RequestRefused

FLUSH_AFTER = 0.02  # seconds: at most this much of the log waits on the loop before it is handed over
FLUSH_BYTES = 512 * 1024  # a hand-over wakes the writer thread: at 10 MB/s of events, 20 a second, not 160
FLUSH_TIMEOUT = 5.0  # seconds flush() waits for the stream (shutdown, exit) before giving up
EVENT_MARK = b'"event":"trust_decision"'
UNAVAILABLE = ("log: the decision log cannot take this exchange's event (stdout is not being read); "
               "expected room in logging.buffer_bytes")


class _Clock:
    """RFC 3339 UTC timestamps, with the second-resolution prefix formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        t = time.time()
        second = int(t)
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{int((t - second) * 1000):03d}Z"


CLOCK = _Clock()


@dataclass(frozen=True, slots=True)
class LogStats:
    """What the metrics read at scrape time."""

    queued_bytes: int
    waiting: int
    dropped_events: int
    dropped_other: int


class BufferedLineWriter:
    """Lines into a bounded buffer written to ``stream`` (default stdout) by one thread."""

    def __init__(self, stream: IO[bytes] | None = None, backpressure: Backpressure = Backpressure(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._clock = clock  # when the last batch was handed over, and whether that was FLUSH_AFTER ago
        self.backpressure = backpressure
        self._lines: list[bytes] = []  # the batch gathering on the loop
        self._size = 0
        self._queued = 0  # bytes accepted and not yet written: the batch and what the thread holds
        self._handed: deque[bytes] = deque()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the thread waits here for batches
        self._written = threading.Condition(self._lock)  # flush() waits here for the stream
        self._thread: threading.Thread | None = None
        self._accepted = 0  # batches handed over, and written (or failed): flush() waits for them to meet
        self._done = 0
        self._scheduled = False
        self._flushed = float("-inf")  # clock() of the last hand-over
        self.dropped_events = 0
        self.dropped_other = 0
        self._unreported = 0  # dropped since the last log_lines_dropped line
        self._unreported_events = 0
        self.waiting = 0
        self._room: asyncio.Event | None = None
        self._room_loop: asyncio.AbstractEventLoop | None = None
        self._loop: tuple[asyncio.AbstractEventLoop, int] | None = None  # the last running loop seen, its thread

    @property
    def stream(self) -> IO[bytes]:
        return self._stream or sys.stdout.buffer

    @property
    def full(self) -> bool:
        return self._queued >= self.backpressure.buffer_bytes

    def stats(self) -> LogStats:
        return LogStats(self._queued, self.waiting, self.dropped_events, self.dropped_other)

    # -- the loop side ----------------------------------------------------------------------
    def write(self, line: bytes, *, kept: bool = False) -> None:
        """Queue one line; dropped (and counted) if the buffer is full and ``kept`` does not hold it.

        Off the loop (CLI commands, the stall watchdog while the loop is held) a line is handed over at once."""
        loop = self._running_loop()
        with self._lock:
            if self.full and not (kept and self.backpressure.on_backpressure != "drop"):
                self._drop(line)
                return
            self._add(line)
            if loop is None or self._size >= min(FLUSH_BYTES, self.backpressure.buffer_bytes // 4):
                self._hand_over()
                return
            if self._scheduled:
                return
            if self._clock() - self._flushed >= FLUSH_AFTER:
                self._hand_over()
                return
            self._scheduled = True
        loop.call_later(FLUSH_AFTER, self.hand_over)

    def _running_loop(self) -> asyncio.AbstractEventLoop | None:
        """This thread's running loop. A loop that runs and was last seen on this thread is it (one loop
        runs per thread), which spares ``asyncio._get_running_loop``'s ``getpid`` per line."""
        seen = self._loop
        if seen is not None and seen[1] == threading.get_ident() and seen[0].is_running():
            return seen[0]
        loop = asyncio._get_running_loop()
        if loop is not None:
            self._loop = (loop, threading.get_ident())
        return loop

    def _add(self, line: bytes) -> None:
        self._lines.append(line)
        self._size += len(line)
        self._queued += len(line)

    def _drop(self, line: bytes) -> None:
        event = EVENT_MARK in line
        self.dropped_events += event
        self.dropped_other += not event
        self._unreported += 1
        self._unreported_events += event

    def _note_drops(self) -> None:
        note = self._drop_note()
        self._handed.append(note)
        self._queued += len(note)
        self._accepted += 1

    def _drop_note(self) -> bytes:
        note = {"event": "log_lines_dropped", "level": "error", "logger": "sidecar.log", "ts": CLOCK.now(),
                "count": self._unreported, "trust_decisions": self._unreported_events,
                "on_backpressure": self.backpressure.on_backpressure,
                "message": "log: stdout did not take these lines in time; they are counted in "
                           "sidecar_log_lines_dropped_total"}
        self._unreported = self._unreported_events = 0
        return orjson.dumps(note) + b"\n"

    def hand_over(self) -> None:
        """Give the batch to the writer thread now, without waiting for it to be written."""
        with self._lock:
            self._hand_over()

    def _hand_over(self) -> None:
        self._scheduled = False
        self._flushed = self._clock()
        if not self._lines:
            return
        self._handed.append(b"".join(self._lines))
        self._lines, self._size = [], 0
        self._accepted += 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sidecar-log-writer", daemon=True)
            self._thread.start()
        self._work.notify()

    # -- admission: may a new exchange begin? ------------------------------------------------
    def admission(self) -> Awaitable[None] | None:
        """None while the log has room (or under ``drop``); else what a new exchange awaits first."""
        if not self.full or self.backpressure.on_backpressure == "drop":
            return None
        return self._admit()

    async def _admit(self) -> None:
        if self.backpressure.on_backpressure == "refuse":
            raise RequestRefused("log_unavailable", UNAVAILABLE, retry_after=1,
                                 detail="log: buffer full, on_backpressure refuse")
        self.waiting += 1
        try:
            async with asyncio.timeout(self.backpressure.block_timeout):
                await self._wait_for_room()
        except TimeoutError:
            raise RequestRefused("log_unavailable", UNAVAILABLE, retry_after=1,
                                 detail="log: buffer full for logging.block_timeout") from None
        finally:
            self.waiting -= 1

    async def _wait_for_room(self) -> None:
        loop = asyncio.get_running_loop()
        if self._room is None or self._room_loop is not loop:
            self._room, self._room_loop = asyncio.Event(), loop
        while True:
            self._room.clear()  # before looking: a wake-up from the thread after this is not lost
            if not self.full:
                return
            await self._room.wait()

    # -- the writer thread ------------------------------------------------------------------
    def _run(self) -> None:
        me = threading.current_thread()
        while True:
            with self._lock:
                while not self._handed and self._thread is me:
                    self._work.wait()
                if self._thread is not me:  # retired by close(): a later hand-over starts another
                    return
                batches = len(self._handed)
                data = b"".join(self._handed)
                self._handed.clear()
            self._write(data)
            with self._lock:
                self._queued -= len(data)
                self._done += batches
                if self._unreported and not self.full:  # the stream takes lines again: say what is missing
                    self._note_drops()
                self._written.notify_all()
            if self.waiting:
                self._wake_waiters()

    def _write(self, data: bytes) -> None:
        try:
            stream = self.stream
            stream.write(data)
            stream.flush()
        except (OSError, ValueError):  # the reader went away (EPIPE) or the stream was closed: counted
            events = data.count(EVENT_MARK)
            with self._lock:
                self.dropped_events += events
                self.dropped_other += data.count(b"\n") - events

    def _wake_waiters(self) -> None:
        loop, room = self._room_loop, self._room
        if loop is None or room is None:
            return
        try:
            loop.call_soon_threadsafe(room.set)
        except RuntimeError:  # that loop is closed
            pass

    # -- flush and close --------------------------------------------------------------------
    def flush(self, timeout: float = FLUSH_TIMEOUT) -> bool:
        """Hand over the batch and wait until the stream took everything; False if it did not in time."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._hand_over()
            target = self._accepted
            while self._done < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._written.wait(left)
        return True

    def close(self, timeout: float = FLUSH_TIMEOUT) -> bool:
        """Flush, then retire the writer thread (a later line starts a new one)."""
        written = self.flush(timeout)
        with self._lock:
            self._thread = None
            self._work.notify_all()
        return written
