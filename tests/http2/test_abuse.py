"""HTTP/2's own attacks (issue 17 item 5), from raw frames (``hyperframe``, HPACK by ``hpack``) over a real
socket to a real sidecar's outbound listener: each bound holds (GOAWAY ENHANCE_YOUR_CALM, or the one stream
reset), is one ``protocol_abuse`` event naming its kind and one count of ``sidecar_http2_abuse_total``; a
new connection (or the connection's other stream) is served meanwhile."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import aiohttp
import hpack
import pytest
from aiohttp import web
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame, PingFrame, PriorityFrame, RstStreamFrame,
    SettingsFrame, WindowUpdateFrame,
)

from sidecar.http2.guard import Bounds
from tests.harness import SidecarHarness, Upstream, assert_valid
from tests.http2.raw import streams
from tests.scenarios.outbound import POLICY, config_for

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
BOUNDS = Bounds()


def request_block(port: int, path: str = "/billing/v1/x", encoder: hpack.Encoder | None = None) -> bytes:
    return (encoder or hpack.Encoder()).encode([(":method", "GET"), (":scheme", "http"),
                                                (":authority", f"127.0.0.1:{port}"), (":path", path)])


async def send_raw(port: int, *frames: Frame | bytes, settings: dict[int, int] | None = None,
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The preface, our SETTINGS (and the ACK of the server's), then ``frames`` in one write."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    hello = SettingsFrame(0, settings=settings or {})
    ack = SettingsFrame(0, flags=["ACK"])
    writer.write(PREFACE + b"".join(f if isinstance(f, bytes) else f.serialize() for f in (hello, ack, *frames)))
    return reader, writer


async def frames_until_goaway(reader: asyncio.StreamReader) -> list[Frame]:
    """Frames from the server until its GOAWAY or the end of the connection."""
    seen: list[Frame] = []
    async with asyncio.timeout(10):
        while True:
            try:
                head = await reader.readexactly(9)
            except (asyncio.IncompleteReadError, ConnectionError):
                return seen
            frame, length = Frame.parse_frame_header(memoryview(head))
            frame.parse_body(memoryview(await reader.readexactly(length)))
            seen.append(frame)
            if isinstance(frame, GoAwayFrame):
                return seen


def goaway_code(frames: list[Frame]) -> int | None:
    return next((f.error_code for f in frames if isinstance(f, GoAwayFrame)), None)


async def abuse_count(h: SidecarHarness, kind: str) -> float:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{h.port('metrics')}/metrics") as response:
            text = await response.text()
    wanted = f'sidecar_http2_abuse_total{{kind="{kind}",listener="outbound"}}'
    return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(wanted)), 0.0)


async def still_served(h: SidecarHarness) -> None:
    """A new HTTP/2 connection beside the one that was ended gets its answer."""
    answers, goaway = await streams(*await asyncio.open_connection("127.0.0.1", h.port("outbound")), [[
        (":method", "GET"), (":scheme", "http"), (":authority", f"127.0.0.1:{h.port('outbound')}"),
        (":path", "/billing/v1/after")]])
    assert [status for status, _ in answers] == [200] and goaway is None


async def assert_bounded(h: SidecarHarness, frames: list[Frame], kind: str) -> None:
    assert goaway_code(frames) == ErrorCodes.ENHANCE_YOUR_CALM
    await still_served(h)
    abuse = [e for e in await h.settle() if e["reason"] == "protocol_abuse"]
    assert_valid(abuse)
    assert [(e["reason_detail"], e["decision"]) for e in abuse] == [(kind, "deny")]
    assert await abuse_count(h, kind) == 1


@pytest.fixture
async def sidecar(make_sidecar: Any, upstream: Upstream) -> SidecarHarness:
    return await make_sidecar(config_for(upstream), POLICY)


async def test_rapid_reset_past_the_budget_ends_the_connection(sidecar, upstream):
    """CVE-2023-44487: streams opened and reset at once, past the budget per window: GOAWAY
    ENHANCE_YOUR_CALM; the streams reset meanwhile never became requests upstream beyond the budget."""
    port, encoder = sidecar.port("outbound"), hpack.Encoder()
    burst: list[Frame] = []
    for n in range(BOUNDS.resets + 50):
        stream_id = 2 * n + 1
        burst += [HeadersFrame(stream_id, request_block(port, encoder=encoder), flags=["END_HEADERS", "END_STREAM"]),
                  RstStreamFrame(stream_id, error_code=ErrorCodes.CANCEL)]
    reader, writer = await send_raw(port, *burst)
    frames = await frames_until_goaway(reader)
    writer.close()
    await assert_bounded(sidecar, frames, "rapid_reset")
    assert len(upstream.seen) <= BOUNDS.resets + 1


async def test_a_continuation_flood_is_cut_before_the_block_is_decoded(sidecar, upstream):
    """CVE-2024-27316: a header block that never ends, CONTINUATION after CONTINUATION: cut once its
    bytes pass the advertised header list size, long before h2's 64-frame backlog would be."""
    junk = b"\x00" * 16000
    flood = [HeadersFrame(1, junk)] + [ContinuationFrame(1, junk) for _ in range(20)]
    reader, writer = await send_raw(sidecar.port("outbound"), *flood)
    frames = await frames_until_goaway(reader)
    writer.close()
    await assert_bounded(sidecar, frames, "continuation")
    assert [s.path for s in upstream.seen] == ["/api/v1/after"]  # still_served's request alone


async def test_an_hpack_bomb_stops_at_the_header_list_bound(sidecar, upstream):
    """A few KB that decode to megabytes (one large entry in the dynamic table, then referenced over and
    over): h2 stops decoding at our bound; the connection ends, counted as header_list."""
    port, encoder = sidecar.port("outbound"), hpack.Encoder()
    first = encoder.encode([("x-bomb", "b" * 4000)])  # indexed into the dynamic table (62)
    block = request_block(port, encoder=encoder) + first + bytes([0x80 | 62]) * 2000
    reader, writer = await send_raw(port, HeadersFrame(1, block, flags=["END_HEADERS", "END_STREAM"]))
    frames = await frames_until_goaway(reader)
    writer.close()
    await assert_bounded(sidecar, frames, "header_list")
    assert [s.path for s in upstream.seen] == ["/api/v1/after"]  # still_served's request alone


@pytest.mark.parametrize("kind, frame, count", [
    ("settings", lambda: SettingsFrame(0, settings={SettingsFrame.MAX_CONCURRENT_STREAMS: 10}), BOUNDS.settings),
    ("ping", lambda: PingFrame(0, opaque_data=b"12345678"), BOUNDS.pings),
    ("control", lambda: PriorityFrame(1, depends_on=0, stream_weight=1), BOUNDS.control),
])
async def test_control_frame_floods_end_the_connection(sidecar, kind, frame, count):
    """Each SETTINGS and PING makes us write an ACK, each PRIORITY costs a dispatch: past the budget
    per window, GOAWAY ENHANCE_YOUR_CALM."""
    reader, writer = await send_raw(sidecar.port("outbound"), *(frame() for _ in range(count + 1)))
    frames = await frames_until_goaway(reader)
    writer.close()
    await assert_bounded(sidecar, frames, kind)


async def test_empty_data_frames_are_charged_as_control_frames(sidecar):
    """Empty DATA frames on an open stream carry nothing and cost a dispatch each (CVE-2019-9518)."""
    port = sidecar.port("outbound")
    opened = HeadersFrame(1, request_block(port), flags=["END_HEADERS"])
    reader, writer = await send_raw(port, opened, *(DataFrame(1, b"") for _ in range(BOUNDS.control + 1)))
    frames = await frames_until_goaway(reader)
    writer.close()
    await assert_bounded(sidecar, frames, "control")


async def test_frames_within_the_budget_are_served(sidecar, upstream):
    """The bounds leave ordinary clients alone: as many PINGs and SETTINGS as the budget allows, then a
    request, answered on the same connection."""
    port = sidecar.port("outbound")
    chatter = [PingFrame(0, opaque_data=b"12345678") for _ in range(BOUNDS.pings // 2)]
    chatter += [SettingsFrame(0, settings={SettingsFrame.MAX_CONCURRENT_STREAMS: 10})
                for _ in range(BOUNDS.settings // 2)]
    request = HeadersFrame(1, request_block(port), flags=["END_HEADERS", "END_STREAM"])
    reader, writer = await send_raw(port, *chatter, request)
    async with asyncio.timeout(10):
        while True:
            frame, length = Frame.parse_frame_header(memoryview(await reader.readexactly(9)))
            frame.parse_body(memoryview(await reader.readexactly(length)))
            assert not isinstance(frame, GoAwayFrame)
            if frame.stream_id == 1 and "END_STREAM" in frame.flags:
                break
    writer.close()
    assert [s.path for s in upstream.seen] == ["/api/v1/x"]


@pytest.fixture
async def large_upstream() -> AsyncIterator[Upstream]:
    """An upstream whose answers are streamed back (longer than one write)."""
    async def large(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 300_000)

    server = await Upstream(large).start()
    yield server
    await server.stop()


async def test_a_zero_window_stall_resets_that_stream_alone(make_sidecar, large_upstream):
    """A client that never opens its window for one stream (initial window 0) has that stream reset
    after the stall bound (outbound.timeouts.idle here); the other stream, whose window it opens, is
    answered whole on the same connection; the stalled exchange is recorded cut."""
    config = config_for(large_upstream)
    config["outbound"]["timeouts"] = {"idle": "1s"}
    h = await make_sidecar(config, POLICY)
    port, encoder = h.port("outbound"), hpack.Encoder()
    stalled = HeadersFrame(1, request_block(port, "/billing/v1/stalled", encoder), flags=["END_HEADERS", "END_STREAM"])
    opened = HeadersFrame(3, request_block(port, "/billing/v1/opened", encoder), flags=["END_HEADERS", "END_STREAM"])
    windows = [WindowUpdateFrame(stream_id, window_increment=1_000_000) for stream_id in (0, 3)]
    reader, writer = await send_raw(port, stalled, opened, *windows, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 0})
    ended: dict[int, str] = {}
    received = 0
    async with asyncio.timeout(10):
        while len(ended) < 2:
            frame, length = Frame.parse_frame_header(memoryview(await reader.readexactly(9)))
            frame.parse_body(memoryview(await reader.readexactly(length)))
            if isinstance(frame, DataFrame):
                received += len(frame.data) if frame.stream_id == 3 else 0
                assert frame.stream_id == 3, "nothing is sent past a closed window"
            if isinstance(frame, RstStreamFrame):
                ended[frame.stream_id] = "reset"
            elif frame.stream_id in (1, 3) and "END_STREAM" in frame.flags:
                ended[frame.stream_id] = "ended"
    writer.close()
    assert ended == {1: "reset", 3: "ended"} and received == 300_000
    events = {e["target"]["path"]: e for e in await h.settle() if e["target"]["path"]}
    assert events["/v1/opened"]["outcome"] == "completed" and events["/v1/stalled"]["outcome"] == "cut"
    assert await abuse_count(h, "window_stall") == 1


async def test_an_idle_connection_is_closed_after_the_idle_timeout(make_sidecar, upstream):
    """A connection that opens, asks once and then sends nothing is closed after timeouts.idle with GOAWAY
    NO_ERROR (as HTTP/1.1's keep-alive ends), instead of holding a connection slot for ever."""
    config = config_for(upstream)
    config["outbound"]["timeouts"] = {"idle": "300ms"}
    h = await make_sidecar(config, POLICY)
    port = h.port("outbound")
    request = HeadersFrame(1, request_block(port), flags=["END_HEADERS", "END_STREAM"])
    reader, writer = await send_raw(port, request)
    frames = await frames_until_goaway(reader)  # returns at the GOAWAY: the wait is the sidecar's
    writer.close()
    assert goaway_code(frames) == ErrorCodes.NO_ERROR
    assert any(f.stream_id == 1 and "END_STREAM" in f.flags for f in frames)  # answered first
    assert [s.path for s in upstream.seen] == ["/api/v1/x"]


async def test_reset_streams_leave_no_cycle_for_the_collector(make_sidecar):
    """Streams the client resets while their upstream is still answering are freed by reference counting:
    nothing of them waits for the cyclic collector, which ``sidecar run`` tunes to run rarely. Before, each
    cancelled stream's task stayed in a cycle with its own exception's frames (about 22 KiB a stream),
    which a client resetting within the rapid-reset budget could pile up, and the HTTP/1.1 protocol that
    handed the connection to h2c stayed in one with its parser."""
    import gc

    seen, release = asyncio.Queue[None](), asyncio.Event()

    async def hold(request: web.Request) -> web.Response:
        seen.put_nowait(None)
        await release.wait()  # answers only once the test is over
        return web.Response(text="late")

    upstream = await Upstream(hold).start()
    try:
        h = await make_sidecar(config_for(upstream), POLICY)
        port, encoder = h.port("outbound"), hpack.Encoder()
        opened = [HeadersFrame(i, request_block(port, f"/billing/v1/{i}", encoder), flags=["END_HEADERS", "END_STREAM"])
                  for i in range(1, 40, 2)]
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)  # from before the connection: its hand-over from HTTP/1.1 (h2c) too
        try:
            reader, writer = await send_raw(port, *opened)
            async with asyncio.timeout(10):
                for _ in opened:
                    await seen.get()
            writer.write(b"".join(RstStreamFrame(f.stream_id, error_code=ErrorCodes.CANCEL).serialize() for f in opened))
            async with asyncio.timeout(10):
                while len([e for e in h.events() if e["outcome"] == "cut"]) < len(opened):
                    await asyncio.sleep(0.02)
            gc.collect()
            left = [type(o).__name__ for o in gc.garbage if type(o).__module__.startswith("sidecar")
                    or isinstance(o, asyncio.Task)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        writer.close()
        assert left == []
    finally:
        release.set()
        await upstream.stop()


async def test_a_closed_connection_leaves_nothing_behind(make_sidecar):
    """Once an HTTP/2 connection has closed, nothing of it stays: not its protocol, which the idle check's
    timer held (with its ``h2`` state and every stream's) for ``timeouts.idle`` (300 s by default) after the
    client had gone, nor its ``h2`` state as garbage for the collector that ``sidecar run`` runs rarely (an
    ``H2Connection`` holds itself through its frame dispatch table, and every stream it carried with it).
    Before, bench_grpc's open-and-cancel rounds kept about 1 MiB per 1,000 cancelled streams."""
    import gc

    import h2.connection

    from sidecar.http2.server import H2Protocol

    upstream = await Upstream().start()
    try:
        h = await make_sidecar(config_for(upstream), POLICY)
        port = h.port("outbound")
        blocks = [[(":method", "GET"), (":scheme", "http"), (":authority", f"127.0.0.1:{port}"),
                   (":path", f"/billing/v1/{i}")] for i in range(3)]
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            answers, _ = await streams(*await asyncio.open_connection("127.0.0.1", port), blocks)  # closes it
            alive: list[str] = ["not looked at"]
            for _ in range(100):  # until the sidecar has seen the connection end (its stream tasks too)
                await asyncio.sleep(0.05)
                alive = [type(o).__name__ for o in gc.get_objects() if isinstance(o, H2Protocol)]
                if not alive:
                    break
            gc.collect()
            left = [type(o).__name__ for o in gc.garbage if type(o).__module__.startswith("sidecar")
                    or isinstance(o, h2.connection.H2Connection) and not o.config.client_side]  # not the test's own
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert [status for status, _ in answers] == [200, 200, 200]
        assert alive == []
        assert left == []
    finally:
        await upstream.stop()
