"""A hostile MCP server cannot make the sidecar hold its answer without bound (issue 13): a JSON answer over the
limit is refused as a JSON-RPC error, nothing of it relayed, and the sidecar stops reading (the server's
connection is closed under it); an SSE event that never ends is broken off at its bound. The server here is a
raw loopback socket, so what it managed to send, and that its connection was closed, is known exactly."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from sidecar.mcp_filter import MAX_JSON_ANSWER_BYTES, MAX_LIST_BYTES
from sidecar.policy.mcp_responses import MessageFilter, SseMessageFilter
from tests.harness import Upstream, assert_valid
from tests.peers.mcp_tools import JSON_IN, call, mcp_config

RULES = {"version": 1, "default": "deny", "rules": [
    {"id": "search", "direction": "outbound", "upstream": "tools", "mcp": {"tools": ["search_tickets"]},
     "effect": "allow"},
]}
GIB = 1 << 30
PIECE = b"x" * 65536
SSE_EVENT_LIMIT = 1 << 20


@dataclass
class Flood:
    """A server that answers every request with a 200 whose body never ends (1 GiB of it, or endless)."""

    media: str
    chunked: bool
    sent: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/mcp"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            framing = b"Transfer-Encoding: chunked" if self.chunked else b"Content-Length: %d" % GIB
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\n%s\r\n\r\n" % (self.media.encode(), framing))
            opening = b'{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"' if "json" in self.media else b"data: "
            self._write(writer, opening)
            while self.sent < GIB:  # the sidecar must close the connection long before
                self._write(writer, PIECE)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed.set()
            writer.close()

    def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)
        self.sent += len(data)


@contextlib.asynccontextmanager
async def flooding(media: str, chunked: bool) -> AsyncIterator[Flood]:
    flood = Flood(media, chunked)
    flood.server = await asyncio.start_server(flood.serve, "127.0.0.1", 0)
    try:
        yield flood
    finally:
        flood.server.close()
        await flood.server.wait_closed()


def config(flood: Flood) -> dict:
    return {"outbound": {"upstreams": {"tools": {"url": flood.url, "protocol": "mcp"}}}}


async def metric(h, reason: str) -> float:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{h.port('metrics')}/metrics") as r:
            text = await r.text()
    lines = [ln for ln in text.splitlines() if ln.startswith("sidecar_upstream_errors_total{")
             and f'reason="{reason}"' in ln]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("method, limit", [("tools/call", MAX_JSON_ANSWER_BYTES), ("tools/list", MAX_LIST_BYTES)])
async def test_a_json_answer_past_the_limit_is_refused_and_no_longer_read(make_sidecar, chunked, method, limit):
    """A 200 JSON answer of 1 GiB (declared, or chunked and endless): the agent gets a JSON-RPC error for its
    request naming ``upstream_answer_too_large``, nothing of the answer; the sidecar held at most the limit and
    closed the server's connection (the server's writes fail far short of 1 GiB); an event and a metric say
    so."""
    async with flooding("application/json", chunked) as flood:
        h = await make_sidecar(config(flood), RULES)
        params = {"name": "search_tickets"} if method == "tools/call" else {}
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{h.outbound}/tools", data=call(method, **params), headers=JSON_IN) as r:
                status, body = r.status, await r.read()
        await asyncio.wait_for(flood.closed.wait(), 30)
        answer = json.loads(body)
        assert status == 200 and answer["id"] == 1 and "result" not in answer
        assert answer["error"]["code"] == -32007
        assert answer["error"]["data"]["reason"] == "upstream_answer_too_large"
        assert f"larger than {limit} bytes" in answer["error"]["message"]
        assert b"xxxx" not in body
        # the sidecar stopped reading: what got out of the server is the limit plus what the sockets buffer
        assert flood.sent < limit + (16 << 20) < GIB
        events = [e for e in await h.settle() if e["reason"] == "upstream_answer_too_large"]
        assert_valid(events)
        assert [(e["decision"], e["status"], e["upstream_status"]) for e in events] == [("deny", 200, 200)]
        assert await metric(h, "upstream_answer_too_large") == 1


async def test_an_unreadable_json_answer_is_a_json_rpc_error_not_a_reset(make_sidecar):
    """A JSON answer the filter cannot read (a tools/list with duplicate keys) is refused before anything of it
    is sent: a JSON-RPC error naming ``upstream_answer_invalid``, not a broken connection."""
    answer = b'{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"search_tickets","name":"delete_account"}]}}'
    reply = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
             % (len(answer), answer))

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(ln.split(b":")[1]) for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:"))
        await reader.readexactly(length)
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        h = await make_sidecar({"outbound": {"upstreams": {"tools": {"url": f"http://127.0.0.1:{port}/mcp",
                                                                     "protocol": "mcp"}}}}, RULES)
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{h.outbound}/tools", data=call("tools/list"), headers=JSON_IN) as r:
                status, body = r.status, await r.read()
        refused = json.loads(body)
        assert status == 200 and refused["error"]["data"]["reason"] == "upstream_answer_invalid"
        assert b"delete_account" not in body
        events = [e for e in await h.settle() if e["reason"] == "upstream_answer_invalid"]
        assert_valid(events)
        assert len(events) == 1
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("chunked", [False, True])
async def test_an_sse_event_that_never_ends_is_broken_off_at_its_bound(make_sidecar, chunked):
    """An SSE answer to a POST whose one event never ends (no blank line, ever): once the event passes 1 MiB the
    sidecar stops reading (the server's connection closed far short of 1 GiB) and ends the agent's stream with
    its request's JSON-RPC error naming ``upstream_answer_too_large`` (so the agent is not left waiting for an
    answer that never comes); nothing of the event reached it; the event and the metric say why."""
    async with flooding("text/event-stream", chunked) as flood:
        h = await make_sidecar(config(flood), RULES)
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{h.outbound}/tools", data=call("tools/call", name="search_tickets"),
                              headers=JSON_IN) as r:
                status, got = r.status, await r.read()
        await asyncio.wait_for(flood.closed.wait(), 30)
        assert status == 200 and b"xxxx" not in got
        assert got.startswith(b"event: message\ndata: ") and got.endswith(b"\n\n")
        error = json.loads(got.split(b"data: ", 1)[1])
        assert error["id"] == 1 and error["error"]["code"] == -32007
        assert error["error"]["data"]["reason"] == "upstream_answer_too_large"
        assert flood.sent < SSE_EVENT_LIMIT + (16 << 20) < GIB
        events = [e for e in await h.settle() if e["outcome"] == "upstream_reset"]
        assert_valid(events)
        assert len(events) == 1 and "SSE event larger than" in events[0]["reason_detail"]
        assert error["error"]["data"]["decision_id"] == events[0]["decision_id"]
        assert await metric(h, "unreadable") == 1


async def test_a_get_stream_that_cannot_be_read_is_broken_off(make_sidecar):
    """The GET stream answers no request: an endless event on it is broken off (a reset), never ended as if
    whole."""
    async with flooding("text/event-stream", True) as flood:
        h = await make_sidecar(config(flood), RULES)
        got = b""
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{h.outbound}/tools", headers={"Accept": "text/event-stream"}) as r:
                assert r.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    async for chunk in r.content.iter_any():
                        got += chunk
        await asyncio.wait_for(flood.closed.wait(), 30)
        assert got == b""
        events = [e for e in await h.settle() if e["outcome"] == "upstream_reset"]
        assert len(events) == 1 and "SSE event larger than" in events[0]["reason_detail"]


def test_an_event_fed_in_tiny_pieces_is_read_as_one():
    """The incremental reader gives the same events however small the pieces (an endless event fed a byte at a
    time is held once, not re-joined per piece), and refuses at the bound wherever the cut falls."""
    note = b'{"jsonrpc":"2.0","method":"notifications/progress"}'
    raw = b"id: 7\r\ndata: %s\r\n\r\n: ping\n\nid: 8\rdata: %s\r\r" % (note, note)
    stream = SseMessageFilter(MessageFilter())
    out = b"".join(stream.feed(raw[i:i + 1]) for i in range(len(raw))) + stream.close()
    assert out == b"id: 7\ndata: %s\n\n: ping\n\nid: 8\ndata: %s\n\n" % (note, note)
    bounded = SseMessageFilter(MessageFilter(), max_event_bytes=1000)
    with pytest.raises(Exception, match="SSE event larger than 1000"):
        for _ in range(2000):
            bounded.feed(b"y")


async def test_an_mcp_answer_is_never_compressed_so_it_is_always_read(make_sidecar):
    """The agent asks for gzip (httpx, the SDKs' client, does by default) and the server compresses what it may
    (aiohttp's own compression): the sidecar asks the server for identity, so the tools/list answer is read and
    filtered rather than refused unreadable; the server saw ``Accept-Encoding: identity``."""
    listed = [{"name": "search_tickets"}, {"name": "delete_account", "description": "d" * 4000}]

    async def handler(request: web.Request) -> web.Response:
        response = web.json_response({"jsonrpc": "2.0", "id": 1, "result": {"tools": listed}})
        response.enable_compression()  # gzip or deflate when the request accepts it, else identity
        return response

    server = await Upstream(handler).start()
    try:
        h = await make_sidecar(mcp_config(server), RULES)
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            async with s.post(f"{h.outbound}/tools", data=call("tools/list"),
                              headers={**JSON_IN, "Accept-Encoding": "gzip, deflate"}) as r:
                status, body, coding = r.status, await r.read(), r.headers.get("Content-Encoding")
        assert (status, coding) == (200, None)
        assert [tool["name"] for tool in json.loads(body)["result"]["tools"]] == ["search_tickets"]
        assert [[v for k, v in seen.headers if k.lower() == "accept-encoding"] for seen in server.seen] == [["identity"]]
    finally:
        await server.stop()
