"""MCP upstreams through the pipeline: tools/call by rule, lifecycle passes, tools/list filtered, bad bodies refused."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from tests.harness import Upstream

TOOLS = [{"name": "search_tickets"}, {"name": "draft_reply"}, {"name": "delete_account"}]


async def mcp_server(request: web.Request) -> web.StreamResponse:
    call = json.loads(await request.read())
    if "method" not in call:  # the client's answer to one of our requests (MCP: 202, no body)
        return web.Response(status=202)
    if call["method"] == "tools/list":
        result = {"jsonrpc": "2.0", "id": call["id"], "result": {"tools": TOOLS}}
        if request.headers.get("Accept") == "text/event-stream":
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(f"event: message\ndata: {json.dumps(result)}\n\n".encode())
            await response.write_eof()
            return response
        return web.json_response(result)
    return web.json_response({"jsonrpc": "2.0", "id": call.get("id"), "result": {"ok": call["method"]}})


POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "tools-readonly", "direction": "outbound", "upstream": "tools", "mcp": {"tools": ["search_tickets",
                                                                                           "draft_reply"]},
     "effect": "allow"},
]}


@pytest.fixture
async def tools():
    server = await Upstream(mcp_server).start()
    yield server
    await server.stop()


@pytest.fixture
async def h(make_sidecar, tools):
    return await make_sidecar({"outbound": {"upstreams": {"tools": {"url": tools.url + "/mcp", "protocol": "mcp"}}}},
                              POLICY)


async def rpc(h, body: bytes, content_type: str = "application/json", accept: str = "application/json"):
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{h.outbound}/tools", data=body, headers={"Content-Type": content_type,
                                                                     "Accept": accept}) as r:
            return r.status, await r.read()


def call(method: str, **params: object) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()


@pytest.mark.parametrize("body, status", [
    # an allowed tool
    (call("tools/call", name="search_tickets", arguments={"q": "refund"}), 200),
    # the session's lifecycle passes with a rule that names tools
    (call("initialize", protocolVersion="2025-06-18", capabilities={}, clientInfo={"name": "a", "version": "1"}), 200),
    (json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode(), 200),
    # a tool no rule allows
    (call("tools/call", name="delete_account", arguments={}), 403),
])
async def test_tools_calls_are_decided_by_rule(h, tools, body, status):
    """tools/call is matched on the tool name; lifecycle methods pass; other tools are refused."""
    assert (await rpc(h, body))[0] == status
    event = (await h.settle())[-1]
    assert event["protocol"] == "mcp" and event["target"]["mcp_method"] == json.loads(body)["method"]
    assert (len(tools.seen) == 1) == (status == 200)


@pytest.mark.parametrize("body", [
    # the agent answers the server's sampling/createMessage request
    json.dumps({"jsonrpc": "2.0", "id": "srv-1", "result": {"role": "assistant", "model": "m",
                                                              "content": {"type": "text", "text": "ok"}}}).encode(),
    # the user declined an elicitation: an error answer
    json.dumps({"jsonrpc": "2.0", "id": 9, "error": {"code": -32600, "message": "declined"}}).encode(),
])
async def test_the_agents_answers_to_server_requests_pass_as_rpc_response(h, tools, body):
    """Sampling/elicitation answers are forwarded under a rule naming tools, seen by policy as rpc.response."""
    assert (await rpc(h, body))[0] == 202
    event = (await h.settle())[-1]
    assert event["decision"] == "allow" and event["target"]["mcp_method"] == "rpc.response"
    assert len(tools.seen) == 1


async def test_an_answer_is_refused_where_no_rule_allows_it(make_sidecar, tools):
    """A rule that names only methods does not pass answers: rpc.response must be listed to be allowed."""
    policy = {"version": 1, "default": "deny", "rules": [
        {"id": "calls-only", "direction": "outbound", "upstream": "tools", "mcp": {"methods": ["tools/call"]},
         "effect": "allow"}]}
    h = await make_sidecar({"outbound": {"upstreams": {"tools": {"url": tools.url + "/mcp", "protocol": "mcp"}}}},
                           policy)
    answer = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {}}).encode()
    assert (await rpc(h, answer))[0] == 403
    assert (await h.settle())[-1]["target"]["mcp_method"] == "rpc.response"
    assert tools.seen == []


@pytest.mark.parametrize("body, content_type", [
    # a JSON-RPC batch could smuggle a denied call behind an allowed one
    (b'[' + call("tools/call", name="search_tickets") + b',' + call("tools/call", name="delete_account") + b']',
     "application/json"),
    # duplicate keys: the parser here and the server there could disagree on which name counts
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_tickets","name":"delete_account"}}',
     "application/json"),
    # case-variant keys: a case-insensitive server would see another method
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/list","Method":"tools/call","params":{"name":"delete_account"}}',
     "application/json"),
    # not JSON by media type
    (call("tools/call", name="search_tickets"), "text/plain"),
])
async def test_ambiguous_mcp_bodies_are_refused(h, tools, body, content_type):
    """Batches, duplicate or case-variant keys and other media types are 400 bad_request, never forwarded."""
    status, response = await rpc(h, body, content_type)
    assert status == 400 and json.loads(response)["error"] == "bad_request"
    assert tools.seen == []


@pytest.mark.parametrize("accept", ["application/json", "text/event-stream"])
async def test_tools_list_is_filtered_to_the_tools_the_agent_may_call(h, accept):
    """tools/list responses (JSON or SSE) list only the tools a rule allows."""
    status, body = await rpc(h, call("tools/list"), accept=accept)
    assert status == 200
    text = body.decode()
    payload = json.loads(text.split("data: ", 1)[1]) if accept == "text/event-stream" else json.loads(text)
    assert [t["name"] for t in payload["result"]["tools"]] == ["search_tickets", "draft_reply"]


async def test_an_mcp_body_whose_sender_stalls_is_refused_408(make_sidecar, tools):
    """The body policy must read (MCP) is due within the idle timeout: a stalled sender gets request_timeout."""
    h = await make_sidecar({"outbound": {"upstreams": {"tools": {"url": tools.url + "/mcp", "protocol": "mcp",
                                                                 "timeouts": {"idle": "300ms"}}}}}, POLICY)
    port = h.port("outbound")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /tools HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"jsonrpc\":" % port)
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ")
    finally:
        writer.close()
    event = (await h.settle())[-1]
    assert event["reason"] == "request_timeout" and event["status"] == 408
    assert tools.seen == []


async def test_a_websocket_upgrade_to_an_mcp_upstream_is_refused(make_sidecar, tools):
    """Frames are not parsed for tool rules: even where a rule allows GET, an upgrade to an MCP upstream is 400."""
    policy = {"version": 1, "default": "deny", "rules": [
        {"id": "sse-stream", "direction": "outbound", "upstream": "tools", "methods": ["GET"], "effect": "allow"}]}
    h = await make_sidecar({"outbound": {"upstreams": {"tools": {"url": tools.url + "/mcp", "protocol": "mcp"}}}},
                           policy)
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await s.ws_connect(f"{h.outbound}/tools")
    assert refused.value.status == 400
    event = (await h.settle())[-1]
    assert event["reason"] == "bad_request" and event["status"] == 400 and event["protocol"] == "mcp"
    assert tools.seen == []
