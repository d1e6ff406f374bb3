"""The listeners' own HTTP/1.1 server on raw sockets: what each byte sequence gets (issue 16 item 1).

Every test talks to a real sidecar's outbound listener over a plain socket, so that framing, order and
the connection's fate are seen on the wire; the upstream is a real aiohttp server that records what
reached it.
"""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp
import pytest

from sidecar.http1.server import Http1Server
from tests.harness import BOUND, open_outbound, read_to_close, read_until
from tests.scenarios.outbound import ALLOW_ALL, POLICY, config_for, outbound_to

LEAK = b"canary-secret-3b1f"


async def responses(reader: asyncio.StreamReader, count: int) -> list[tuple[bytes, bytes]]:
    """``count`` length-delimited responses: (head, body) each."""
    out = []
    for _ in range(count):
        head = await read_until(reader, b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        async with asyncio.timeout(BOUND):
            out.append((head, await reader.readexactly(length)))
    return out


async def test_three_pipelined_requests_in_one_write_are_answered_in_order(make_sidecar, upstream):
    """Three requests written at once: three answers, in the order asked, each forwarded once."""
    h = await make_sidecar(config_for(upstream), POLICY)
    reader, writer = await open_outbound(h, b"".join(
        b"GET /billing/v1/%s HTTP/1.1\r\nHost: 127.0.0.1:%%d\r\n\r\n" % name for name in (b"a", b"b", b"c")))
    answers = await responses(reader, 3)
    writer.close()
    assert [json.loads(body)["path"] for _, body in answers] == ["/api/v1/a", "/api/v1/b", "/api/v1/c"]
    assert all(head.startswith(b"HTTP/1.1 200 ") and b"\r\nServer: sidecar\r\n" in head for head, _ in answers)
    assert [s.path for s in upstream.seen] == ["/api/v1/a", "/api/v1/b", "/api/v1/c"]


async def test_a_refusal_in_a_pipeline_leaves_the_next_request_served(make_sidecar, upstream):
    """A denied request between two allowed ones is answered 403 in its place; the connection goes on."""
    h = await make_sidecar(config_for(upstream), POLICY)
    reader, writer = await open_outbound(h, b"GET /billing/v1/a HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"
                                            b"GET /billing/v1/admin/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"
                                            b"GET /billing/v1/c HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n")
    answers = await responses(reader, 3)
    writer.close()
    assert [head.split(b" ")[1] for head, _ in answers] == [b"200", b"403", b"200"]
    assert json.loads(answers[1][1])["error"] == "rule_denied"
    assert [s.path for s in upstream.seen] == ["/api/v1/a", "/api/v1/c"]


async def test_100_continue_comes_before_the_body_and_only_for_a_request_let_on(make_sidecar, upstream):
    """A client that waits for 100 Continue gets it, then sends its body; a refused one gets its refusal
    instead and its body is never asked for."""
    h = await make_sidecar(config_for(upstream), POLICY)
    reader, writer = await open_outbound(h, b"POST /billing/v1/up HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                                            b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    assert await read_until(reader, b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    [(head, _)] = await responses(reader, 1)
    assert head.startswith(b"HTTP/1.1 200 ") and upstream.seen[-1].body == b"hello"
    writer.write(b"POST /billing/v1/admin/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nExpect: 100-continue\r\n"
                 b"Content-Length: 5\r\nConnection: close\r\n\r\n" % h.port("outbound"))
    answer = await read_to_close(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 403 ") and b"100 Continue" not in answer
    assert len(upstream.seen) == 1


async def test_a_half_closed_client_gets_the_answers_to_what_it_sent(make_sidecar, upstream):
    """Two requests, then the client shuts its sending side: both are answered, then the connection closes."""
    h = await make_sidecar(config_for(upstream), POLICY)
    reader, writer = await open_outbound(h, b"GET /billing/v1/a HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"
                                            b"GET /billing/v1/b HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n")
    writer.write_eof()
    data = await read_to_close(reader)
    writer.close()
    assert data.count(b"HTTP/1.1 200 ") == 2 and b'"/api/v1/b"' in data
    assert [s.path for s in upstream.seen] == ["/api/v1/a", "/api/v1/b"]


async def test_a_head_sent_too_slowly_is_refused_408_and_an_idle_connection_closed(make_sidecar, upstream):
    """A request head begun and not finished within timeouts.idle is answered 408 request_timeout, one event;
    a kept-alive connection that says nothing is closed without an answer."""
    h = await make_sidecar(config_for(upstream) | {"outbound": {**config_for(upstream)["outbound"],
                                                                "timeouts": {"idle": "300ms"}}}, POLICY)
    reader, writer = await open_outbound(h, b"GET /billing/v1/a HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-Slow: ")
    answer = await read_to_close(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"error":"request_timeout"' in answer
    assert b"X-Slow" not in answer and upstream.seen == []
    assert (await h.settle())[-1]["reason"] == "request_timeout"
    reader, writer = await open_outbound(h, b"GET /billing/v1/a HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n")
    [(head, _)] = await responses(reader, 1)
    assert head.startswith(b"HTTP/1.1 200 ") and await read_to_close(reader) == b""
    writer.close()


@pytest.mark.parametrize("name, data, status, reason", [
    ("an oversize head", b"GET /billing/v1/a HTTP/1.1\r\nHost: h\r\nX-Big: " + LEAK + b"a" * 70000 + b"\r\n\r\n",
     431, "headers_too_large"),
    ("a bad chunk size", b"POST /billing/v1/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nz" + LEAK
     + b"\r\nhello\r\n0\r\n\r\n", 400, "bad_request"),
    ("TE with CL", b"POST /billing/v1/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n"
     b"X-A: " + LEAK + b"\r\n\r\n0\r\n\r\n", 400, "bad_request"),
    ("obs-fold", b"GET /billing/v1/a HTTP/1.1\r\nHost: h\r\nX-Folded: a\r\n " + LEAK + b"\r\n\r\n", 400, "bad_request"),
    ("NUL in a value", b"GET /billing/v1/a HTTP/1.1\r\nHost: h\r\nX-A: " + LEAK + b"\x00\r\n\r\n", 400, "bad_request"),
    ("CR in a value", b"GET /billing/v1/a HTTP/1.1\r\nHost: h\r\nX-A: " + LEAK + b"\rb\r\n\r\n", 400, "bad_request"),
    ("LF in a name", b"GET /billing/v1/a HTTP/1.1\r\nHost: h\r\nX-" + LEAK + b"\nA: 1\r\n\r\n", 400, "bad_request"),
])
async def test_what_the_parser_refuses_is_answered_as_json_and_echoed_nowhere(make_sidecar, upstream, name, data,
                                                                            status, reason):
    """Malformed framing and fields: the JSON refusal with its reason code, one event, the connection closed,
    nothing forwarded, and the offending bytes in neither the answer nor the log."""
    h = await make_sidecar(config_for(upstream), POLICY)
    reader, writer = await open_outbound(h, data)
    answer = await read_to_close(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 %d " % status), name
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == reason
    assert LEAK not in answer and LEAK not in h.raw_log() and b"Traceback" not in h.raw_log()
    assert upstream.seen == []
    assert (await h.settle())[-1]["reason"] == reason


async def test_an_http10_client_keeps_alive_only_when_it_asks(make_sidecar, upstream):
    """HTTP/1.0 with Connection: keep-alive is answered in HTTP/1.0 and kept; without it, closed after the answer."""
    h = await make_sidecar(config_for(upstream), POLICY)
    reader, writer = await open_outbound(h, b"GET /billing/v1/a HTTP/1.0\r\nHost: 127.0.0.1:%d\r\n"
                                            b"Connection: keep-alive\r\n\r\n")
    [(head, _)] = await responses(reader, 1)
    assert head.startswith(b"HTTP/1.0 200 ") and b"\r\nConnection: keep-alive\r\n" in head
    writer.write(b"GET /billing/v1/b HTTP/1.0\r\nHost: 127.0.0.1:%d\r\n\r\n" % h.port("outbound"))
    rest = await read_to_close(reader)
    writer.close()
    assert rest.startswith(b"HTTP/1.0 200 ") and b"\r\nConnection: close\r\n" in rest
    assert [s.path for s in upstream.seen] == ["/api/v1/a", "/api/v1/b"]


async def test_an_absolute_form_target_is_routed_by_its_authority(make_sidecar, upstream):
    """Forward-proxy mode on a raw socket: the absolute URI's host picks the upstream; its path is forwarded."""
    h = await make_sidecar(config_for(upstream), POLICY)
    reader, writer = await open_outbound(h, b"GET http://billing.internal/api/v1/x?q=1 HTTP/1.1\r\n"
                                            b"Host: billing.internal\r\nConnection: close\r\n\r\n")
    answer = await read_to_close(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ") and [s.path for s in upstream.seen] == ["/api/v1/x?q=1"]


async def test_nothing_after_an_upgrade_answered_without_101_is_parsed(make_sidecar, upstream):
    """A WebSocket upgrade the sidecar refuses is answered, and the bytes the client sent after it are never
    read as a request (they would be a request policy never saw the client mean)."""
    h = await make_sidecar(config_for(upstream), POLICY)
    reader, writer = await open_outbound(h, b"GET /billing/v1/admin/ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                                            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                                            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                                            b"GET /billing/v1/smuggled HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n")
    answer = await read_to_close(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 403 ") and answer.count(b"HTTP/1.1") == 1
    assert upstream.seen == []
    assert [e["reason"] for e in await h.settle()] == ["rule_denied"]


async def test_an_upgrade_answered_without_101_says_the_connection_closes(make_sidecar, upstream):
    """The refusal of an upgrade is the connection's last answer, and says so: a client that was not told
    (no Connection: close) kept the connection, and the next request it sent there was reset unanswered
    (the chaos harness: a WebSocket refused upstream_timeout, then any request on that connection lost)."""
    h = await make_sidecar(config_for(upstream), POLICY)
    reader, writer = await open_outbound(h, b"GET /billing/v1/admin/ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                                            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                                            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    answer = await read_to_close(reader)
    writer.close()
    head = answer.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 403 ") and b"\r\nConnection: close" in head
    async with aiohttp.ClientSession() as session:  # a client's view: refused, then its next request answered
        session._retry_connection = False  # no second try on a new connection to hide a lost request
        url = f"http://127.0.0.1:{h.port('outbound')}/billing/v1"
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await session.ws_connect(f"{url}/admin/ws")
        async with session.get(f"{url}/a") as response:
            assert response.status == 200


async def test_a_client_that_resets_mid_body_forwards_nothing_whole(make_sidecar, upstream):
    """A client that declares 10 bytes, sends 5 and resets: no request with a short body reaches the upstream."""
    h = await make_sidecar(config_for(upstream), POLICY)
    reader, writer = await open_outbound(h, b"POST /billing/v1/up HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                                            b"Content-Length: 10\r\n\r\nhello")
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.close()
    for _ in range(100):  # bounded: until the cut exchange is recorded (if its head was parsed before the reset)
        if await h.settle():
            break
    assert all(len(s.body) != 5 for s in upstream.seen)


async def test_a_client_that_stops_reading_pauses_the_relay_and_nothing_piles_up(make_sidecar, raw_server):
    """A streamed 16 MiB answer to a client that reads nothing: the sidecar's writes pause (the client's
    window), what it holds for that client stays bounded, and once the client reads, all of it arrives."""
    total, piece = 16 * 1024 * 1024, 256 * 1024

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(total // piece):
            writer.write(b"%x\r\n%s\r\n" % (piece, b"x" * piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    h = await make_sidecar(outbound_to(await raw_server(stream)), ALLOW_ALL)
    reader, writer = await open_outbound(h, b"GET /billing/big HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n")
    head = await read_until(reader, b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding: chunked" in head
    server = next(s for s in h.sidecar._listeners.servers
                  if isinstance(s, Http1Server) and s is not h.sidecar.interceptor.server)
    [connection] = list(server.connections)
    async with asyncio.timeout(BOUND * 3):
        while not connection.writing_paused:  # bounded: until the client's window has closed
            await asyncio.sleep(0.01)
    assert connection.transport.get_write_buffer_size() <= 2 * 1024 * 1024
    body = await asyncio.wait_for(reader.read(), BOUND * 10)
    writer.close()
    assert body.endswith(b"0\r\n\r\n") and body.count(b"x") == total


async def test_a_closed_connection_leaves_no_cycle_for_the_collector(make_sidecar, upstream):
    """Connections that end (the client's close, and ours after ``Connection: close``) are freed by
    reference counting: nothing of them waits for the cyclic collector, which ``sidecar run`` tunes to
    run rarely. Before, each left its protocol, parser and body (and, under TLS, its SSL objects) in a
    cycle: 40 KiB per closed mTLS connection until a full collection (issue 16's RSS figure)."""
    import gc

    h = await make_sidecar(config_for(upstream), POLICY)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for close in (b"Connection: close\r\n", b""):
            for _ in range(10):
                reader, writer = await open_outbound(h, b"GET /billing/v1/a HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                                                        + close + b"\r\n")
                await responses(reader, 1)
                writer.close()
                await writer.wait_closed()
        await asyncio.sleep(0.05)  # the server sees the closes
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if type(o).__module__.startswith(("sidecar.http1", "aiohttp"))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []
