"""Bodies stream both ways: SSE arrives as sent, chunked uploads pass, WebSockets work (and never follow a
redirect), SIGTERM drains, and a stream broken off or left by its client ends at once, never shown complete."""

from __future__ import annotations

import asyncio
from typing import Callable

import aiohttp
import pytest
from aiohttp import web

from tests.harness import BOUND, Upstream, admin, open_outbound, read_to_close, read_until
from tests.scenarios.outbound import ALLOW_ALL, POLICY, SECRET, config_for, outbound_to


async def test_first_sse_event_reaches_the_client_before_the_upstream_finishes(make_sidecar):
    """An LLM-style token stream: the first event is readable while the upstream still holds the response."""
    release = asyncio.Event()

    async def sse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await release.wait()
        await response.write(b"data: last\n\n")
        await response.write_eof()
        return response

    up = await Upstream(sse).start()
    try:
        h = await make_sidecar(config_for(up), POLICY)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{h.outbound}/billing/v1/stream") as r:
                first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10)
                assert first == b"data: first\n\n"
                assert not release.is_set()
                release.set()
                assert await r.content.read() == b"data: last\n\n"
        event = (await h.settle())[-1]
        assert event["outcome"] == "completed" and event["upstream_status"] == 200
    finally:
        release.set()
        await up.stop()


async def test_a_chunked_upload_streams_through(make_sidecar):
    """A chunked request body of unknown length arrives whole at the upstream."""
    received = bytearray()

    async def sink(request: web.Request) -> web.Response:
        async for chunk in request.content.iter_any():
            received.extend(chunk)
        return web.json_response({"bytes": len(received)})

    async def chunks():
        for i in range(20):
            yield bytes([65 + i % 26]) * 4096

    up = await Upstream(sink).start()
    try:
        h = await make_sidecar(config_for(up), POLICY)
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{h.outbound}/billing/v1/upload", data=chunks()) as r:
                assert r.status == 200 and (await r.json())["bytes"] == 20 * 4096
        assert bytes(received[:4096]) == b"A" * 4096
    finally:
        await up.stop()


async def echo(request: web.Request) -> web.WebSocketResponse:
    """An upstream WebSocket: text echoed, binary reversed; on "close" it closes normally, on "drop" its
    connection goes without a close frame."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        if message.data == "close":
            await ws.close()
        elif message.data == "drop":
            request.transport.abort()  # no close frame: broken off
        elif message.type == aiohttp.WSMsgType.TEXT:
            await ws.send_str("echo:" + message.data)
        elif message.type == aiohttp.WSMsgType.BINARY:
            await ws.send_bytes(message.data[::-1])
    return ws


async def test_a_websocket_echo_works_through_the_proxy(make_sidecar):
    """A WebSocket upgrade passes through: text and binary frames echo both ways."""
    up = await Upstream(echo).start()
    try:
        h = await make_sidecar(config_for(up), POLICY)
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"{h.outbound}/billing/v1/ws") as ws:
                await ws.send_str("hello")
                assert (await ws.receive(timeout=10)).data == "echo:hello"
                await ws.send_bytes(b"abc")
                assert (await ws.receive(timeout=10)).data == b"cba"
        seen = up.seen[-1]
        assert seen.header("X-API-Key") is not None  # the credential is attached to the upgrade too
        event = next(e for e in await h.settle() if e["protocol"] == "websocket")
        assert event["decision"] == "allow" and event["status"] == 101
    finally:
        await up.stop()


def drop_connection(ws: aiohttp.ClientWebSocketResponse) -> None:
    """The client's TCP connection goes, no close frame sent (a crashed agent)."""
    import os
    import socket

    fd = os.dup(ws.get_extra_info("socket").fileno())  # uvloop's socket object offers no shutdown()
    with socket.socket(fileno=fd) as sock:
        sock.shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize("side, ending, outcome", [
    # the agent closes with a close frame (RFC 6455 5.5.1)
    ("agent", "close", "completed"),
    # the upstream closes with a close frame
    ("upstream", "close", "completed"),
    # the upstream's connection goes without a close frame
    ("upstream", "drop", "cut"),
    # the agent's connection goes without a close frame
    ("agent", "drop", "cut"),
])
async def test_a_websocket_session_ends_in_one_event_with_its_outcome(make_sidecar, side, ending, outcome):
    """A WebSocket closed normally by either side is recorded completed, one broken off is cut, each in
    exactly one event (issue 11 item 16)."""
    up = await Upstream(echo).start()
    try:
        h = await make_sidecar(config_for(up), POLICY)
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"{h.outbound}/billing/v1/ws") as ws:
                await ws.send_str("hello")
                assert (await ws.receive(timeout=10)).data == "echo:hello"
                if side == "upstream":
                    await ws.send_str(ending)
                    assert (await ws.receive(timeout=10)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                elif ending == "close":
                    await ws.close()
                else:
                    drop_connection(ws)
        for _ in range(200):  # bounded: until the sidecar has recorded the session
            if any(e["protocol"] == "websocket" for e in await h.settle()):
                break
        await asyncio.sleep(0.05)
        [event] = [e for e in h.events() if e["protocol"] == "websocket"]
        assert (event["outcome"], event["status"], event["decision"]) == (outcome, 101, "allow")
    finally:
        await up.stop()


async def test_sigterm_drain_finishes_requests_in_flight_and_stops_readiness(make_sidecar):
    """On stop: readiness fails first, the request in flight completes, new connections are refused."""
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        started.set()
        await release.wait()
        return web.Response(text="done")

    up = await Upstream(slow).start()
    try:
        h = await make_sidecar(config_for(up), POLICY)
        health = f"http://127.0.0.1:{h.port('health')}/readyz"
        async with aiohttp.ClientSession() as s:
            async with s.get(health) as r:
                assert r.status == 200
            in_flight = asyncio.ensure_future(s.get(f"{h.outbound}/billing/v1/slow"))
            await asyncio.wait_for(started.wait(), 10)
            stopping = asyncio.ensure_future(h.sidecar.stop())
            await asyncio.sleep(0.05)
            assert not h.sidecar.ready
            release.set()
            response = await asyncio.wait_for(in_flight, 10)
            assert response.status == 200 and await response.text() == "done"
            await stopping
        h.sidecar = None  # already stopped
    finally:
        release.set()
        await up.stop()


def first_event_then_wait(release: asyncio.Event):
    """An SSE upstream that sends one event, then nothing until ``release`` is set."""
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await release.wait()
        return response

    return handler


async def test_a_stream_still_running_when_the_drain_ends_is_cut(make_sidecar):
    """shutdown.drain bounds the stop: a stream that outlives it is cut (and says so), not waited on again."""
    release = asyncio.Event()
    up = await Upstream(first_event_then_wait(release)).start()
    try:
        h = await make_sidecar({**config_for(up), "shutdown": {"drain": "300ms"}}, POLICY)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{h.outbound}/billing/v1/stream") as r:
                assert await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10) == b"data: first\n\n"
                await asyncio.wait_for(h.sidecar.stop(), 10)
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.content.read()
        event = [e for e in h.events() if e.get("target") and e["target"]["path"] == "/v1/stream"][-1]
        assert event["outcome"] == "cut" and event["reason_detail"] == "shutdown: drain time over"
        h.sidecar = None  # already stopped
    finally:
        release.set()
        await up.stop()


async def test_a_stream_the_upstream_leaves_quiet_past_idle_is_broken_off_and_says_why(make_sidecar):
    """An upstream silent mid-stream for the idle timeout: the client's response breaks, the event names the timeout."""
    release = asyncio.Event()
    up = await Upstream(first_event_then_wait(release)).start()
    try:
        h = await make_sidecar(config_for(up, timeouts={"idle": "300ms"}), POLICY)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{h.outbound}/billing/v1/stream") as r:
                assert await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10) == b"data: first\n\n"
                with pytest.raises(aiohttp.ClientPayloadError):
                    await asyncio.wait_for(r.content.read(), 10)
        event = (await h.settle())[-1]
        assert event["outcome"] == "upstream_reset"
        assert event["reason_detail"] == "upstream sent nothing for the idle timeout mid-response"
    finally:
        release.set()
        await up.stop()


async def assert_upgrade_refused(h) -> None:
    """The agent's WebSocket handshake through the sidecar fails: the upstream's redirect is not followed."""
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError):
            async with s.ws_connect(f"{h.outbound}/billing/v1/stream"):
                pass


async def test_a_websocket_redirect_does_not_carry_the_credential_to_another_origin(make_sidecar):
    """A WebSocket upgrade answered with a redirect must not deliver the injected credential to another
    origin (security review 1, finding F1)."""
    evil = await Upstream().start()

    async def redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": f"{evil.url}/steal"})

    good = await Upstream(redirect).start()
    try:
        await assert_upgrade_refused(await make_sidecar(config_for(good), POLICY))
        leaked = [seen.header("X-API-Key") for seen in evil.seen]
        assert SECRET not in leaked, "the static credential reached an origin no policy allowed"
    finally:
        await good.stop()
        await evil.stop()


async def test_a_websocket_redirect_does_not_reach_a_path_policy_denies(make_sidecar):
    """A same-origin redirect of a WebSocket upgrade must not carry the credential to a path a deny rule
    covers (security review 1, finding F1)."""
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/stream"):
            return web.Response(status=302, headers={"Location": "/api/v1/admin/users"})
        return web.Response(status=404)

    good = await Upstream(handler).start()
    try:
        await assert_upgrade_refused(await make_sidecar(config_for(good), POLICY))
        assert [seen.path for seen in good.seen] == ["/api/v1/stream"], "the redirect was followed upstream"
    finally:
        await good.stop()


async def poll(condition: Callable[[], bool]) -> bool:
    """True once ``condition()`` holds, polled for at most BOUND seconds."""
    for _ in range(int(BOUND / 0.02)):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


async def test_a_client_that_goes_away_mid_stream_closes_its_upstream_exchange(make_sidecar, raw_server):
    """An agent that drops its connection while a quiet SSE stream is relayed must have the upstream
    connection closed and the exchange recorded as cut at once, not held until the upstream writes
    again (security review 4, finding I1)."""
    upstream_closed = asyncio.Event()

    async def quiet_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"e\r\ndata: first\n\n\r\n")
        await reader.read()  # returns at the sidecar's close: the stream then has no reader
        upstream_closed.set()

    h = await make_sidecar(outbound_to(await raw_server(quiet_stream)), ALLOW_ALL)
    reader, writer = await open_outbound(h, b"GET /billing/events HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n")
    await read_until(reader, b"data: first\n\n")
    writer.close()
    async with asyncio.timeout(BOUND):
        await upstream_closed.wait()
    assert await poll(lambda: len(h.sidecar.runtime.exchanges) == 0)
    event = (await h.settle())[-1]
    assert event["outcome"] == "cut" and event["reason_detail"] == "client gone"
    assert h.sidecar.runtime.sessions.get("billing")._open == 0  # the pool slot is given back


@pytest.mark.parametrize("cause", [
    "revoked",  # the agent is revoked while its response streams: the exchange is cut
    "upstream_reset",  # the upstream resets its connection mid-body
])
async def test_a_response_broken_off_is_never_shown_complete(make_sidecar, raw_server, cause):
    """A response broken off by a revocation or an upstream reset resets the client's connection, so that
    even a response framed by the connection's close (to an HTTP/1.0 client) is not taken as whole
    (security review 4, finding I5)."""
    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2 if cause == "upstream_reset" else BOUND * 2)
        writer.transport.abort()

    h = await make_sidecar(outbound_to(await raw_server(stream)), ALLOW_ALL)
    reader, writer = await open_outbound(h, b"GET /billing/report HTTP/1.0\r\nHost: 127.0.0.1:%d\r\n\r\n")
    await read_until(reader, b"first\n")
    if cause == "revoked":
        status, _ = await admin(h, "POST", "/revocations", json={"kind": "agent", "id": h.sidecar.runtime.agent.id})
        assert status in (200, 201)
    with pytest.raises(ConnectionResetError):
        await read_to_close(reader)
    writer.close()
    event = (await h.settle())[-1]
    assert event["outcome"] == ("cut" if cause == "revoked" else "upstream_reset")
