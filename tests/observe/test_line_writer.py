"""The trust-decision log writer: batched under load, immediate when quiet, nothing lost."""

from __future__ import annotations

import asyncio
import io

from sidecar.observe.decision_log import FLUSH_AFTER, BufferedLineWriter


class CountingStream(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes += 1
        return super().write(data)


async def test_a_line_after_a_quiet_spell_is_written_at_once():
    """At an agent's sporadic pace each line is on the stream when write returns: no timer, no wait."""
    stream = CountingStream()
    writer = BufferedLineWriter(stream)
    writer.write(b"one\n")
    assert stream.getvalue() == b"one\n"


async def test_a_burst_is_batched_and_flushed_within_the_interval():
    """Lines arriving together share one write, which happens within FLUSH_AFTER; none is lost."""
    stream = CountingStream()
    writer = BufferedLineWriter(stream)
    writer.write(b"first\n")  # quiet before: written at once
    for i in range(100):
        writer.write(b"line %d\n" % i)
    assert stream.writes == 1
    await asyncio.sleep(FLUSH_AFTER * 3)
    assert stream.writes == 2
    assert stream.getvalue().count(b"\n") == 101


def test_outside_an_event_loop_lines_are_written_at_once():
    """CLI commands have no loop: every line goes out immediately."""
    stream = CountingStream()
    writer = BufferedLineWriter(stream)
    writer.write(b"a\n")
    writer.write(b"b\n")
    assert stream.getvalue() == b"a\nb\n"
