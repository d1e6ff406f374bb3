"""The trust-decision log writer: batched under load, immediate when quiet, bounded, nothing lost unsaid."""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import os
import threading
import time

import pytest

from sidecar.config_model import Backpressure
from sidecar.errors import RequestRefused
from sidecar.observe.decision_log import BufferedLineWriter

PIPE_BYTES = 4096  # the smallest pipe Linux allows: a consumer that stops reading is felt at once
BUFFER = 8192


class CountingStream(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.written = threading.Event()

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes += 1
        n = super().write(data)
        self.written.set()
        return n


async def test_a_line_after_a_quiet_spell_is_written_at_once():
    """At an agent's sporadic pace a line goes to the stream without waiting for a timer of the loop."""
    stream = CountingStream()
    writer = BufferedLineWriter(stream)
    writer.write(b"one\n")
    assert stream.written.wait(10)  # the loop is held here: a line waiting for its timer could not arrive
    assert stream.getvalue() == b"one\n"


async def test_a_burst_is_batched_and_flushed_within_the_interval():
    """Lines arriving together share one write, handed over by the loop's FLUSH_AFTER timer; none is lost.

    The writer's clock stands still: the burst is one instant whatever the scheduler does, so no line of it
    can find the last hand-over FLUSH_AFTER old and go out on its own."""
    stream = CountingStream()
    writer = BufferedLineWriter(stream, clock=lambda: 1000.0)
    writer.write(b"first\n")  # quiet before: handed over at once
    assert stream.written.wait(10)
    stream.written.clear()
    for i in range(100):
        writer.write(b"line %d\n" % i)
    assert stream.getvalue() == b"first\n"  # the burst waits for the timer
    assert writer.stats().queued_bytes == sum(len(b"line %d\n" % i) for i in range(100))
    assert await asyncio.to_thread(stream.written.wait, 10)  # the loop runs: its timer hands the batch over
    assert writer.flush()
    assert stream.writes == 2
    assert stream.getvalue() == b"first\n" + b"".join(b"line %d\n" % i for i in range(100))


def test_outside_an_event_loop_lines_are_written_at_once():
    """CLI commands have no loop: every line is handed over immediately, in order."""
    stream = CountingStream()
    writer = BufferedLineWriter(stream)
    writer.write(b"a\n")
    writer.write(b"b\n")
    assert writer.flush()
    assert stream.getvalue() == b"a\nb\n"


# -- a consumer that stops reading (issue 12 item 4) ---------------------------------------------

class StalledPipe:
    """A real pipe whose reader reads nothing until ``drain()``; then everything, to the end."""

    def __init__(self) -> None:
        read_fd, write_fd = os.pipe()
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self.writer = os.fdopen(write_fd, "wb")
        self._read_fd = read_fd
        self._chunks: list[bytes] = []
        self._reader: threading.Thread | None = None

    def drain(self) -> None:
        self._reader = threading.Thread(target=self._read_all, daemon=True)
        self._reader.start()

    def _read_all(self) -> None:
        while chunk := os.read(self._read_fd, 65536):
            self._chunks.append(chunk)

    def close(self) -> list[bytes]:
        """Close the writing end, wait for the reader, return the lines read."""
        self.writer.close()
        assert self._reader is not None
        self._reader.join(10)
        os.close(self._read_fd)
        return b"".join(self._chunks).splitlines()


def event_line(i: int) -> bytes:
    return json.dumps({"event": "trust_decision", "n": i, "pad": "x" * 200}, separators=(",", ":")).encode() + b"\n"


def fill(writer: BufferedLineWriter, count: int, *, kept: bool = False) -> None:
    for i in range(count):
        writer.write(event_line(i), kept=kept)
        writer.hand_over()


@pytest.fixture
def pipe():
    stalled = StalledPipe()
    yield stalled
    if stalled._reader is None:
        stalled.drain()
        stalled.close()


async def test_a_stalled_reader_never_blocks_the_caller_and_drops_are_counted_and_said(pipe):
    """drop: writes return at once while nobody reads; what did not fit is counted, and said once the reader
    drains, in whole lines (issue 12 item 4)."""
    writer = BufferedLineWriter(pipe.writer, Backpressure("drop", BUFFER, 1.0))
    fill(writer, 200)  # ~46 KB into 4 KB of pipe and 8 KB of buffer: returns, the loop is not held
    assert writer.dropped_events > 100 and writer.admission() is None  # drop never holds an exchange
    dropped = writer.dropped_events
    pipe.drain()
    assert writer.flush()
    lines = [json.loads(line) for line in pipe.close()]  # every line whole: no torn or interleaved JSON
    events = [line for line in lines if line["event"] == "trust_decision"]
    notes = [line for line in lines if line["event"] == "log_lines_dropped"]
    assert len(events) + dropped == 200
    assert sum(note["trust_decisions"] for note in notes) == dropped and notes[0]["on_backpressure"] == "drop"
    assert [e["n"] for e in events] == sorted(e["n"] for e in events)


async def test_refuse_turns_new_exchanges_away_while_kept_events_are_never_dropped(pipe):
    """refuse: a full log refuses a new exchange (log_unavailable, 503, Retry-After) while the events of
    exchanges already let in are kept past the bound (issue 12 item 4)."""
    writer = BufferedLineWriter(pipe.writer, Backpressure("refuse", BUFFER, 1.0))
    fill(writer, 100, kept=True)
    assert writer.full and writer.dropped_events == 0
    waiting = writer.admission()
    assert waiting is not None
    with pytest.raises(RequestRefused) as refused:
        await waiting
    assert (refused.value.reason, refused.value.status, refused.value.retry_after) == ("log_unavailable", 503, 1)
    assert refused.value.message.startswith("log: the decision log cannot take this exchange's event")
    writer.write(event_line(100))  # the refused exchange's own event: not kept, counted
    assert writer.dropped_events == 1
    pipe.drain()
    assert writer.flush()
    assert sum(json.loads(line)["event"] == "trust_decision" for line in pipe.close()) == 100


async def test_block_holds_a_new_exchange_until_the_reader_drains(pipe):
    """block: a full log holds a new exchange, which goes on once the reader takes lines again (issue 12 item 4)."""
    writer = BufferedLineWriter(pipe.writer, Backpressure("block", BUFFER, 60.0))
    fill(writer, 100, kept=True)
    admitted = asyncio.ensure_future(writer.admission())  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert not admitted.done() and writer.stats().waiting == 1
    pipe.drain()
    await asyncio.wait_for(admitted, 30)
    assert writer.stats().waiting == 0 and writer.dropped_events == 0
    assert writer.flush()
    pipe.close()


async def test_block_is_bounded_by_block_timeout(pipe):
    """block: a new exchange waits at most logging.block_timeout, then is refused log_unavailable (issue 12 item 4)."""
    writer = BufferedLineWriter(pipe.writer, Backpressure("block", BUFFER, 0.05))
    fill(writer, 100, kept=True)
    with pytest.raises(RequestRefused) as refused:
        await writer.admission()  # type: ignore[misc]
    assert refused.value.reason == "log_unavailable" and writer.stats().waiting == 0


async def test_a_line_from_another_thread_is_not_held_for_the_loops_timer():
    """The stall watchdog logs from its thread while the loop is held: its line goes out at once, not when the
    held loop runs its flush timer (issue 12 item 5)."""
    stream = CountingStream()
    writer = BufferedLineWriter(stream)
    writer.write(b"first\n")  # quiet: handed over at once
    writer.write(b"second\n")  # waits for the loop's timer
    from_thread = threading.Thread(target=writer.write, args=(b"event_loop_stalled\n",))
    from_thread.start()
    from_thread.join()
    for _ in range(200):  # the loop is held here: only a hand-over by that thread can bring the line
        if b"event_loop_stalled" in stream.getvalue():
            break
        time.sleep(0.01)
    assert stream.getvalue().endswith(b"event_loop_stalled\n")
