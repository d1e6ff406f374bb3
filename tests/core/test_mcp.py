"""MCP upstreams through the pipeline: tools/call by rule, refusals as JSON-RPC, the transport's sessions, real SDKs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
import json

import aiohttp
import pytest

from sidecar.errors import RequestRefused
from sidecar.mcp_transport import McpSessions
from tests.harness import admin
from tests.peers.mcp_tools import JSON_IN, call, exchange, mcp_config, need_sdk, open_session, run_sdk, sdk_config

POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "tools-readonly", "direction": "outbound", "upstream": "tools", "mcp": {"tools": ["search_tickets",
                                                                                           "draft_reply"]},
     "effect": "allow"},
]}


@pytest.fixture
async def h(make_sidecar, tools):
    return await make_sidecar(mcp_config(tools), POLICY)


async def rpc(h, body: bytes, content_type: str = "application/json", accept: str = "application/json"):
    status, payload, _ = await exchange(h, "POST", body, {"Content-Type": content_type, "Accept": accept})
    return status, payload


@pytest.mark.parametrize("body, status", [
    # an allowed tool
    (call("tools/call", name="search_tickets", arguments={"q": "refund"}), 200),
    # the session's lifecycle passes with a rule that names tools
    (call("initialize", protocolVersion="2025-06-18", capabilities={}, clientInfo={"name": "a", "version": "1"}), 200),
    (json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode(), 202),
])
async def test_tools_calls_are_decided_by_rule(h, tools, body, status):
    """tools/call is matched on the tool name; lifecycle methods pass."""
    assert (await rpc(h, body))[0] == status
    event = (await h.settle())[-1]
    assert event["protocol"] == "mcp" and event["target"]["mcp_method"] == json.loads(body)["method"]
    assert event["decision"] == "allow" and len(tools.seen) == 1


REFUSALS = {"version": 1, "default": "deny", "rules": [
    {"id": "no-deletes", "direction": "outbound", "upstream": "tools", "mcp": {"tools": ["delete_*"]},
     "effect": "deny"},
    {"id": "drafts-rarely", "direction": "outbound", "upstream": "tools", "mcp": {"tools": ["draft_reply"]},
     "rate_limit": {"requests": 1, "per": "1h"}, "effect": "allow"},
    *POLICY["rules"],
]}


@pytest.mark.parametrize("body, reason, code, rule", [
    # a tool no rule allows: default deny
    (call("tools/call", name="export_all"), "no_matching_rule", -32001, "default"),
    # a tool a deny rule names
    (call("tools/call", name="delete_account"), "rule_denied", -32001, "no-deletes"),
    # the request's envelope is sound, its params are not: refused as that request's error
    (call("tools/call", arguments={}), "bad_request", -32005, None),
    (json.dumps({"jsonrpc": "2.0", "id": 1, "method": "rpc.discover"}).encode(), "bad_request", -32005, None),
])
async def test_a_refused_request_is_answered_as_a_jsonrpc_error(make_sidecar, tools, body, reason, code, rule):
    """A refused MCP request is HTTP 200, a JSON-RPC error naming reason and rule, not forwarded (issue 13 item 1)."""
    h = await make_sidecar(mcp_config(tools), REFUSALS)
    status, payload, headers = await exchange(h, "POST", body, {"Content-Type": "application/json"})
    event = (await h.settle())[-1]
    answer = json.loads(payload)
    assert status == 200 and answer["id"] == 1 and answer["error"]["code"] == code
    assert f"(reason: {reason})" in answer["error"]["message"]
    assert answer["error"]["data"] == {"reason": reason, "rule_id": rule, "decision_id": event["decision_id"]}
    assert headers["Proxy-Status"].endswith(f'details="{reason}"')
    assert (event["decision"], event["reason"], event["rule_id"], event["status"]) == ("deny", reason, rule, 200)
    assert tools.seen == []


async def test_a_rate_limited_request_is_a_jsonrpc_error_and_the_next_call_goes_on(make_sidecar, tools):
    """Over a rule's rate limit a tools/call is a JSON-RPC error (-32003); other calls still pass (issue 13 item 1)."""
    h = await make_sidecar(mcp_config(tools), REFUSALS)
    draft = call("tools/call", name="draft_reply")
    assert json.loads((await rpc(h, draft))[1])["result"] == {"ok": "tools/call"}
    status, payload, headers = await exchange(h, "POST", draft, {"Content-Type": "application/json"})
    answer = json.loads(payload)
    assert status == 200 and answer["error"]["code"] == -32003 and "Retry-After" in headers
    assert "rate limit of rule drafts-rarely" in answer["error"]["message"]
    assert json.loads((await rpc(h, call("tools/call", name="search_tickets")))[1])["result"]
    events = await h.settle()
    assert [(e["reason"], e["status"]) for e in events] == [("allowed", 200), ("rate_limited", 200), ("allowed", 200)]
    assert len(tools.seen) == 2


async def test_a_credential_failure_is_a_jsonrpc_error(make_sidecar, tools):
    """No credential for an allowed call: a JSON-RPC error (-32004) to that request, nothing sent (issue 13 item 1)."""
    h = await make_sidecar({**mcp_config(tools, credential="idp"),
                            "credentials": {"idp": {"type": "oauth2_client_credentials",
                                                    "token_url": "https://127.0.0.1:9/token", "client_id": "agent",
                                                    "auth": "client_secret_post",
                                                    "client_secret": {"value": "s3cret-value"}}}}, POLICY)
    status, payload = await rpc(h, call("tools/call", name="search_tickets"))
    answer = json.loads(payload)
    assert status == 200 and answer["error"]["code"] == -32004
    assert answer["error"]["data"]["reason"] == "credential_unavailable" and b"s3cret" not in payload
    event = (await h.settle())[-1]
    assert (event["reason"], event["status"], event["rule_id"]) == ("credential_unavailable", 200, "tools-readonly")
    assert tools.seen == []


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


CALLS_ONLY = {"version": 1, "default": "deny", "rules": [
    {"id": "calls-only", "direction": "outbound", "upstream": "tools", "mcp": {"methods": ["tools/call"]},
     "effect": "allow"}]}


@pytest.mark.parametrize("body, method", [
    # a notification no rule allows
    (json.dumps({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}}).encode(),
     "notifications/cancelled"),
    # a rule that names only methods does not pass answers: rpc.response must be listed to be allowed
    (json.dumps({"jsonrpc": "2.0", "id": 1, "result": {}}).encode(), "rpc.response"),
])
async def test_a_refused_message_that_awaits_no_reply_is_dropped_with_202(make_sidecar, tools, body, method):
    """A refused notification or answer is dropped: 202, no body, one deny event, not forwarded (issue 13 item 1)."""
    h = await make_sidecar(mcp_config(tools), CALLS_ONLY)
    status, payload, headers = await exchange(h, "POST", body, {"Content-Type": "application/json"})
    assert (status, payload) == (202, b"") and 'details="no_matching_rule"' in headers["Proxy-Status"]
    event = (await h.settle())[-1]
    assert (event["target"]["mcp_method"], event["decision"], event["status"]) == (method, "deny", 202)
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
    assert (await h.settle())[-1]["status"] == 400
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


async def test_a_tools_rule_alone_passes_the_transports_stream_and_session_end(h, tools):
    """The endpoint's GET (server stream) and DELETE (session end) pass under mcp: {tools} (issue 13 item 2)."""
    sid = await open_session(h)
    status, stream, _ = await exchange(h, "GET", headers={"Accept": "text/event-stream", "Mcp-Session-Id": sid})
    assert status == 200 and b"notifications/tools/list_changed" in stream
    assert (await exchange(h, "DELETE", headers={"Mcp-Session-Id": sid}))[0] == 200
    events = await h.settle()
    assert [(e["target"]["method"], e["target"]["mcp_method"], e["decision"])
            for e in events] == [("POST", "initialize", "allow"), ("GET", "rpc.stream", "allow"),
                                 ("DELETE", "rpc.session_end", "allow")]
    assert [seen.method for seen in tools.seen] == ["POST", "GET", "DELETE"]


async def test_a_get_beside_the_endpoint_is_not_the_transport(h, tools):
    """Only the endpoint itself is the transport: a GET of another path under it is refused (issue 13 item 2)."""
    status, payload, _ = await exchange(h, "GET", headers={"Accept": "text/event-stream"}, path="/tools/admin")
    assert (status, json.loads(payload)["error"]) == (403, "no_matching_rule")
    assert (await h.settle())[-1]["target"]["mcp_method"] is None
    assert tools.seen == []


async def open_task(h) -> str:
    status, body = await admin(h, "POST", "/tasks", json={"principal": "alice@example.com"})
    assert status == 201, body
    return body["id"]


@pytest.mark.parametrize("replay", ["other_task", "no_task"])
async def test_a_session_replayed_under_another_task_is_refused(h, tools, replay):
    """A session id opened under one task is refused under another, or under none (issue 13 item 2)."""
    opener = await open_task(h)
    sid = await open_session(h, opener)
    other = {"X-Sidecar-Task": await open_task(h)} if replay == "other_task" else {}
    for method, body in [("POST", call("tools/call", name="search_tickets")), ("GET", None), ("DELETE", None)]:
        status, payload, _ = await exchange(h, method, body, {**JSON_IN, "Mcp-Session-Id": sid, **other})
        assert (status, json.loads(payload)["error"]) == (403, "session_mismatch")
    ok = await exchange(h, "POST", call("tools/call", name="search_tickets"),
                        {**JSON_IN, "Mcp-Session-Id": sid, "X-Sidecar-Task": opener})
    assert ok[0] == 200
    events = await h.settle()
    assert [e["reason"] for e in events[1:4]] == ["session_mismatch"] * 3
    assert all(e["status"] == 403 for e in events[1:4])
    assert [seen.method for seen in tools.seen] == ["POST", "POST"]  # initialize and the opener's call


async def test_a_session_is_refused_after_its_task_ended(h, tools):
    """Once the task that opened a session ends, its id is refused, with or without the task (issue 13 item 2)."""
    task = await open_task(h)
    sid = await open_session(h, task)
    assert (await admin(h, "DELETE", f"/tasks/{task}"))[0] in (200, 204)
    for headers in ({"X-Sidecar-Task": task}, {}):
        status, payload, _ = await exchange(h, "POST", call("ping"), {**JSON_IN, "Mcp-Session-Id": sid, **headers})
        assert (status, json.loads(payload)["error"]) == (403, "task_ended")
    assert len(tools.seen) == 1


async def test_unknown_and_ended_sessions_are_404_so_the_client_starts_anew(h, tools):
    """A session id the sidecar never saw opened, or saw ended by DELETE, is 404 unknown_session (issue 13 item 2)."""
    status, payload, _ = await exchange(h, "POST", call("ping"), {**JSON_IN, "Mcp-Session-Id": "guessed"})
    assert (status, json.loads(payload)["error"]) == (404, "unknown_session")
    sid = await open_session(h)
    assert (await exchange(h, "DELETE", headers={"Mcp-Session-Id": sid}))[0] == 200
    status, payload, _ = await exchange(h, "POST", call("ping"), {**JSON_IN, "Mcp-Session-Id": sid})
    assert (status, json.loads(payload)["error"]) == (404, "unknown_session")
    assert [seen.method for seen in tools.seen] == ["POST", "DELETE"]
    assert [e["reason"] for e in await h.settle()] == ["unknown_session", "allowed", "allowed", "unknown_session"]


def test_the_session_table_is_bounded_and_sessions_expire():
    """The least recently used session goes first when full, and an idle one expires (issue 13 item 2)."""
    now = [0.0]
    sessions = McpSessions(max_sessions=2, idle_ttl=60, clock=lambda: now[0])
    for sid in ("a", "b"):
        sessions.opened("tools", sid, "agent", None)
    sessions.check("tools", "a", "agent", None)  # a is now the most recently used
    sessions.opened("tools", "c", "agent", None)
    with pytest.raises(RequestRefused, match="unknown or expired"):
        sessions.check("tools", "b", "agent", None)
    now[0] = 61.0
    with pytest.raises(RequestRefused, match="unknown or expired"):
        sessions.check("tools", "a", "agent", None)
    assert len(sessions) == 1


@pytest.mark.parametrize("accept", ["application/json", "text/event-stream"])
async def test_every_page_of_tools_list_is_filtered(h, accept):
    """A tools/list page asked for by cursor is filtered like the first, its nextCursor kept (issue 13 item 2)."""
    status, body = await rpc(h, call("tools/list", cursor="page-2"), accept=accept)
    text = body.decode()
    payload = json.loads(text.split("data: ", 1)[1]) if accept == "text/event-stream" else json.loads(text)
    assert status == 200 and payload["result"]["nextCursor"] == "page-3"
    assert [t["name"] for t in payload["result"]["tools"]] == ["search_tickets", "draft_reply"]


async def test_routing_headers_that_name_another_tool_are_refused(h, tools):
    """An Mcp-Name header naming another tool than the body's is a JSON-RPC error, never forwarded (issue 13 item 2)."""
    status, payload, _ = await exchange(h, "POST", call("tools/call", name="search_tickets"),
                                        {**JSON_IN, "Mcp-Method": "tools/call", "Mcp-Name": "delete_account"})
    answer = json.loads(payload)
    assert status == 200 and answer["error"]["data"]["reason"] == "bad_request"
    assert "Mcp-Name header must name the body's tool" in answer["error"]["message"]
    assert (await h.settle())[-1]["status"] == 200
    assert tools.seen == []


# --- the official MCP SDKs, client and server (issue 13 item 7) ------------------------------------

SDK_POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "no-account-deletion", "direction": "outbound", "upstream": "tools",
     "mcp": {"tools": ["delete_*"]}, "effect": "deny"},
    {"id": "search-only", "direction": "outbound", "upstream": "tools", "mcp": {"tools": ["search"]},
     "effect": "allow"},
]}


def sdk_agent(python: str, url: str, task: str, other_task: str, mode: str = "legacy") -> Awaitable[dict]:
    """The SDK client's whole session (client.py), run to its end; what the agent saw."""
    return run_sdk(python, "client.py", url, task, other_task, mode)


@pytest.mark.parametrize("major", [1, 2])
async def test_an_sdk_agent_lives_with_refusals_streams_and_session_ends(make_sidecar, sdk_servers, major):
    """With SDK 1.x and 2.x a refused call is an error naming rule and reason, the session goes on, its GET stream
    brings a notification, DELETE ends it, and its id is refused under another task (issue 13 items 1, 2, 7)."""
    h = await make_sidecar(sdk_config(sdk_servers(major)), SDK_POLICY)
    task, other = await open_task(h), await open_task(h)
    seen = await sdk_agent(need_sdk(major), f"{h.outbound}/tools", task, other)
    events = await h.settle()
    assert seen["major"] == major and seen["tools"] == ["search"]
    assert (seen["first"], seen["second"]) == ("found: refunds", "found: invoices")
    assert "policy: denied by rule no-account-deletion (reason: rule_denied)" in seen["refused"]
    assert "searching for refunds" in seen["logs"] and seen["list_changed"]
    assert seen["replay"]["status"] == 403 and seen["replay"]["body"]["error"] == "session_mismatch"
    by_method = {}
    for e in events:
        by_method.setdefault(e["target"]["mcp_method"], []).append((e["decision"], e["reason"], e["status"]))
    assert ("deny", "rule_denied", 200) in by_method["tools/call"]
    assert by_method["rpc.stream"][0] == ("allow", "allowed", 200)
    assert by_method["rpc.session_end"] == [("allow", "allowed", 200)]
    assert ("deny", "session_mismatch", 403) in by_method[None]  # refused before its body was read


async def test_the_2x_sdks_default_protocol_lives_with_refusals(make_sidecar, sdk_servers):
    """SDK 2.x at its default (server/discover, the 2026-07-28 protocol): filtered list, a refused call surfaces the
    sidecar's message, the next call goes on (issue 13 items 1, 7)."""
    h = await make_sidecar(sdk_config(sdk_servers(2)), SDK_POLICY)
    task = await open_task(h)
    seen = await sdk_agent(need_sdk(2), f"{h.outbound}/tools", task, task, "auto")
    events = await h.settle()
    assert seen["tools"] == ["search"] and (seen["first"], seen["second"]) == ("found: refunds", "found: invoices")
    assert seen["refused"] == "MCPError: policy: denied by rule no-account-deletion (reason: rule_denied)"
    assert [(e["target"]["mcp_method"], e["reason"]) for e in events][:2] == [("server/discover", "allowed"),
                                                                              ("tools/list", "allowed")]
