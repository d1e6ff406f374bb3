"""Finer MCP rules through the pipeline: resources, prompts, tool arguments in CEL, the server's requests (issue 13
item 3), against the scripted MCP server (``tools``)."""

from __future__ import annotations

import json

import pytest
from aiohttp import web

from tests.harness import Upstream, assert_valid
from tests.peers.mcp_tools import (JSON_IN, answered, call, exchange, mcp_config, need_sdk, open_session, run_sdk,
                                   sdk_config)

RULES = {"version": 1, "default": "deny", "rules": [
    {"id": "no-internal-docs", "direction": "outbound", "upstream": "tools",
     "mcp": {"resources": ["docs://internal/**"]}, "effect": "deny"},
    {"id": "docs", "direction": "outbound", "upstream": "tools",
     "mcp": {"resources": ["docs://**"], "prompts": ["summarize"]}, "effect": "allow"},
    {"id": "search-us-only", "direction": "outbound", "upstream": "tools", "mcp": {"tools": ["search_tickets"]},
     "when": {"expr": 'mcp.method != "tools/call" || mcp.arguments.region == "US"'}, "effect": "allow"},
]}


@pytest.fixture
async def h(make_sidecar, tools):
    return await make_sidecar(mcp_config(tools), RULES)


async def rpc(h, body: bytes) -> tuple[int, dict]:
    status, payload, _ = await exchange(h, "POST", body, {"Content-Type": "application/json"})
    return status, json.loads(payload)


@pytest.mark.parametrize("body, rule, target", [
    # a resource under an allowed glob
    (call("resources/read", uri="docs://readme"), "docs", {"mcp_resource": "docs://readme"}),
    # subscribing is matched like reading
    (call("resources/subscribe", uri="docs://readme"), "docs", {"mcp_resource": "docs://readme"}),
    # a prompt the rule names
    (call("prompts/get", name="summarize"), "docs", {"mcp_prompt": "summarize"}),
    # a tool whose arguments the condition accepts
    (call("tools/call", name="search_tickets", arguments={"region": "US", "q": "refund"}), "search-us-only",
     {"mcp_tool": "search_tickets", "mcp_arguments": {"region": "US", "q": "refund"}}),
])
async def test_allowed_by_resource_prompt_or_arguments(h, tools, body, rule, target):
    """resources/read and subscribe by URI glob, prompts/get by name, tools/call by its arguments: forwarded,
    and the event names what was matched (issue 13 item 3)."""
    status, answer = await rpc(h, body)
    assert status == 200 and "result" in answer
    event = (await h.settle())[-1]
    assert_valid([event])
    assert (event["decision"], event["rule_id"]) == ("allow", rule)
    assert {key: event["target"][key] for key in target} == target
    assert len(tools.seen) == 1


@pytest.mark.parametrize("body, reason, rule", [
    # a deny glob wins over the allowing one
    (call("resources/read", uri="docs://internal/plan"), "rule_denied", "no-internal-docs"),
    # a URI no glob names
    (call("resources/read", uri="file:///etc/passwd"), "no_matching_rule", "default"),
    # a prompt no rule names
    (call("prompts/get", name="leak_secrets"), "no_matching_rule", "default"),
    # the right tool, the wrong region
    (call("tools/call", name="search_tickets", arguments={"region": "EU"}), "no_matching_rule", "default"),
    # the argument missing: the condition cannot be evaluated, and that refuses
    (call("tools/call", name="search_tickets", arguments={}), "condition_error", "search-us-only"),
])
async def test_refused_reads_prompts_and_arguments_are_jsonrpc_errors(h, tools, body, reason, rule):
    """A refused read, prompt or call is a JSON-RPC error naming reason, rule and decision id; nothing is forwarded
    (issue 13 item 3)."""
    status, answer = await rpc(h, body)
    event = (await h.settle())[-1]
    assert status == 200 and answer["error"]["data"] == {"reason": reason, "rule_id": rule,
                                                         "decision_id": event["decision_id"]}
    assert (event["decision"], event["reason"], event["status"]) == ("deny", reason, 200)
    assert tools.seen == []


@pytest.mark.parametrize("uri", [
    "docs://readme/../internal/plan",  # a dot segment the server would resolve past the deny glob
    "docs://readme/%2e%2e/internal/plan",  # the same, percent-encoded
    "docs://internal%2Fplan",  # an encoded slash: one segment to the glob, two to the server
    "DOCS://internal/plan",  # a scheme the server compares case-insensitively
    "docs://Internal/plan",  # an authority likewise
    "docs://internal/plan\\x",  # a backslash
    "docs:// readme",  # whitespace
])
async def test_resource_uris_two_readers_could_differ_on_are_refused(h, tools, uri):
    """A URI the server could read as another resource than the glob matched is bad_request (issue 13 item 3)."""
    status, answer = await rpc(h, call("resources/read", uri=uri))
    assert status == 200 and answer["error"]["data"]["reason"] == "bad_request"
    assert tools.seen == []


@pytest.mark.parametrize("method, key, kept", [
    ("resources/list", "resources", ["docs://readme"]),
    ("prompts/list", "prompts", ["summarize"]),
])
async def test_resource_and_prompt_lists_are_filtered(h, method, key, kept):
    """resources/list and prompts/list pass with a rule naming resources or prompts, and show only what the agent
    may read or get (issue 13 item 3)."""
    status, answer = await rpc(h, call(method))
    name = "uri" if key == "resources" else "name"
    assert status == 200 and [entry[name] for entry in answer["result"][key]] == kept


ASKING = {"version": 1, "default": "deny", "rules": [
    {"id": "search", "direction": "outbound", "upstream": "tools", "mcp": {"tools": ["search_tickets", "ask_model"]},
     "effect": "allow"},
]}
SAMPLING_ALLOWED = {"version": 1, "default": "deny", "rules": [
    {"id": "no-roots", "direction": "outbound", "upstream": "tools", "mcp": {"server_requests": ["roots/list"]},
     "effect": "deny"},
    {"id": "sampling", "direction": "outbound", "upstream": "tools",
     "mcp": {"tools": ["search_tickets"], "server_requests": ["sampling/createMessage"]}, "effect": "allow"},
]}


def sse_messages(stream: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in stream.decode().split("\n") if line.startswith("data: ")]


async def test_a_servers_sampling_request_is_refused_by_default_and_answered_to_the_server(make_sidecar, tools):
    """On the GET stream, sampling/createMessage is taken out and answered to the server as a JSON-RPC error in
    the same session; roots/list passes under any mcp rule; each gets an event (issue 13 item 3)."""
    h = await make_sidecar(mcp_config(tools), ASKING)
    sid = await open_session(h)
    status, stream, _ = await exchange(h, "GET", headers={"Accept": "text/event-stream", "Mcp-Session-Id": sid,
                                                          "MCP-Protocol-Version": "2025-06-18"}, path="/tools?ask=1")
    assert status == 200
    assert [m.get("method") for m in sse_messages(stream)] == ["roots/list", "notifications/tools/list_changed"]
    assert b"id: 1\n" in stream  # the refused event's id stays: a resumed stream starts after it
    events = await answered(h, 1)
    refused = next(e for e in events if e["target"]["mcp_server_request"] == "sampling/createMessage")
    assert (refused["decision"], refused["reason"], refused["rule_id"], refused["status"]) == \
        ("deny", "no_matching_rule", "default", None)
    assert refused["target"]["mcp_method"] == "rpc.server_request" and refused["upstream_status"] == 202
    assert [a["id"] for a in tools.answers] == ["s-1"]
    error = tools.answers[0]["error"]
    assert error["data"] == {"reason": "no_matching_rule", "rule_id": "default",
                             "decision_id": refused["decision_id"]}
    assert "sampling/createMessage" in error["message"] and tools.answers[0]["session"] == sid
    roots = next(e for e in events if e["target"]["mcp_server_request"] == "roots/list")
    assert (roots["decision"], roots["rule_id"]) == ("allow", "search")
    assert_valid(events)


async def test_a_resumed_stream_is_filtered_like_the_first(make_sidecar, tools):
    """A GET stream resumed with Last-Event-ID is read as the first one was: the refused sampling never reaches the
    agent (issue 13, SSE)."""
    h = await make_sidecar(mcp_config(tools), ASKING)
    sid = await open_session(h)
    status, stream, _ = await exchange(h, "GET", headers={"Accept": "text/event-stream", "Mcp-Session-Id": sid,
                                                          "Last-Event-ID": "0"}, path="/tools?ask=1")
    assert status == 200 and b"sampling" not in stream
    await answered(h, 1)
    get = next(seen for seen in tools.seen if seen.method == "GET")
    assert dict(get.headers)["Last-Event-ID"] == "0"  # the GET went on as the agent sent it
    assert [a["id"] for a in tools.answers] == ["s-1"]


async def test_a_rule_allows_sampling_and_denies_roots(make_sidecar, tools):
    """mcp.server_requests lists what the server may ask: sampling passes, a deny rule refuses roots/list
    (issue 13 item 3)."""
    h = await make_sidecar(mcp_config(tools), SAMPLING_ALLOWED)
    sid = await open_session(h)
    _, stream, _ = await exchange(h, "GET", headers={"Accept": "text/event-stream", "Mcp-Session-Id": sid},
                                  path="/tools?ask=1")
    assert [m.get("method") for m in sse_messages(stream)] == ["sampling/createMessage",
                                                               "notifications/tools/list_changed"]
    await answered(h, 1)
    assert [(a["id"], a["error"]["data"]["rule_id"]) for a in tools.answers] == [("r-1", "no-roots")]


async def test_a_sampling_request_inside_a_tool_calls_answer_is_refused(make_sidecar, tools):
    """A server request in a POST's SSE answer is decided like one on the GET stream: the agent gets only the
    call's result (issue 13 item 3)."""
    h = await make_sidecar(mcp_config(tools), ASKING)
    status, stream, _ = await exchange(h, "POST", call("tools/call", name="ask_model"),
                                       {"Content-Type": "application/json", "Accept": "text/event-stream"})
    assert status == 200 and [m["id"] for m in sse_messages(stream)] == [1]
    await answered(h, 1)
    assert [a["id"] for a in tools.answers] == ["s-2"]


@pytest.mark.parametrize("answer", [
    # a server request in place of the JSON answer to a call
    b'{"jsonrpc":"2.0","id":"s-9","method":"sampling/createMessage","params":{}}',
    # a case variant Go clients would read as the method
    b'{"jsonrpc":"2.0","id":1,"result":{},"Method":"sampling/createMessage"}',
])
async def test_a_json_answer_cannot_smuggle_a_server_request(make_sidecar, answer):
    """The JSON answer to a POST is read too: a server request in it is refused or the answer broken off, never
    handed to the agent (issue 13 item 3)."""
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=answer, content_type="application/json")

    server = await Upstream(handler).start()
    try:
        h = await make_sidecar(mcp_config(server), ASKING)
        try:
            status, body, _ = await exchange(h, "POST", call("tools/call", name="search_tickets"), JSON_IN)
        except Exception:  # the relay broke the answer off
            status, body = None, b""
        assert b"sampling" not in body and b"Method" not in body
        await h.settle()
    finally:
        await server.stop()


# --- the official MCP SDKs, client and server (issue 13 items 3, 7) ---------------------------------

SDK_RULES = [
    {"id": "no-internal-docs", "direction": "outbound", "upstream": "tools",
     "mcp": {"resources": ["docs://internal/**"]}, "effect": "deny"},
    {"id": "docs", "direction": "outbound", "upstream": "tools",
     "mcp": {"resources": ["docs://**"], "prompts": ["summarize"], "tools": ["ask_model"]}, "effect": "allow"},
    {"id": "lookup-us-only", "direction": "outbound", "upstream": "tools", "mcp": {"tools": ["lookup"]},
     "when": {"expr": 'mcp.method != "tools/call" || mcp.arguments.region == "US"'}, "effect": "allow"},
]
SDK_SAMPLING = {"id": "sampling", "direction": "outbound", "upstream": "tools",
                "mcp": {"server_requests": ["sampling/createMessage"]}, "effect": "allow"}


@pytest.mark.parametrize("major", [1, 2])
@pytest.mark.parametrize("sampling", [False, True])
async def test_an_sdk_agent_sees_only_allowed_resources_prompts_and_arguments(make_sidecar, sdk_servers, major,
                                                                              sampling):
    """With SDK 1.x and 2.x: filtered resource and prompt lists, a refused read, prompt and call naming rule and
    reason, and the server's sampling refused by default (the agent's callback never runs) or allowed by rule
    (issue 13 items 3, 7)."""
    rules = [*SDK_RULES, SDK_SAMPLING] if sampling else SDK_RULES
    h = await make_sidecar(sdk_config(sdk_servers(major)), {"version": 1, "default": "deny", "rules": rules})
    seen = await run_sdk(need_sdk(major), "rules_client.py", f"{h.outbound}/tools")
    events = await answered(h, 0 if sampling else 1)
    assert seen["major"] == major
    assert (seen["resources"], seen["readme"]) == (["docs://readme"], "read me first")
    assert "policy: denied by rule no-internal-docs (reason: rule_denied)" in seen["plan"]
    assert (seen["prompts"], seen["summarize"]) == (["summarize"], "Summarize: x")
    assert "(reason: no_matching_rule)" in seen["leak"]
    assert seen["us"] == "accounts in US" and "(reason: no_matching_rule)" in seen["eu"]
    asked = [e for e in events if e["target"]["mcp_server_request"] == "sampling/createMessage"]
    if sampling:
        assert (seen["ask"], seen["sampled"]) == ("sampled: forty-two", ["meaning of life?"])
        assert [(e["decision"], e["rule_id"]) for e in asked] == [("allow", "sampling")]
    else:
        assert seen["ask"].startswith("sampling refused: ") and "(reason: no_matching_rule)" in seen["ask"]
        assert seen["sampled"] == []
        assert [(e["decision"], e["reason"], e["upstream_status"]) for e in asked] == \
            [("deny", "no_matching_rule", 202)]
    assert_valid(events)


# --- replay and sidecar test understand the new facts (issue 13 item 3) --------------------------------

async def test_replay_decides_resources_arguments_and_server_requests_again(make_sidecar, tools, tmp_path, capsys):
    """The events of reads, calls with arguments and a refused sampling carry what replay needs: the same policy
    changes nothing; one that allows sampling and refuses the readme says exactly that (issue 13 item 3)."""
    from sidecar.cli import main

    h = await make_sidecar(mcp_config(tools), RULES)
    sid = await open_session(h)
    for body in (call("resources/read", uri="docs://readme"), call("resources/read", uri="docs://internal/plan"),
                 call("prompts/get", name="summarize"),
                 call("tools/call", name="search_tickets", arguments={"region": "US"}),
                 call("tools/call", name="search_tickets", arguments={"region": "EU"})):
        await rpc(h, body)
    await exchange(h, "GET", headers={"Accept": "text/event-stream", "Mcp-Session-Id": sid}, path="/tools?ask=1")
    events = await answered(h, 1)
    assert any(e["target"]["mcp_server_request"] == "sampling/createMessage" for e in events)
    log, config = tmp_path / "run.log", tmp_path / "replay.yaml"
    log.write_bytes(h.raw_log())
    config.write_text(json.dumps({**mcp_config(tools), "state_dir": str(tmp_path / "r")}))

    def replay(policy: dict) -> tuple[int, str]:
        path = tmp_path / "candidate.yaml"
        path.write_text(json.dumps(policy))
        code = main(["replay", "-c", str(config), "--events", str(log), "--policy", str(path)])
        return code, capsys.readouterr().out

    code, out = replay(RULES)
    assert code == 0 and "changes: none" in out, out
    changed = {**RULES, "rules": [
        {"id": "no-readme", "direction": "outbound", "upstream": "tools", "mcp": {"resources": ["docs://readme"]},
         "effect": "deny"},
        {"id": "sampling", "direction": "outbound", "upstream": "tools",
         "mcp": {"server_requests": ["sampling/createMessage"]}, "effect": "allow"}, *RULES["rules"]]}
    code, out = replay(changed)
    assert code == 3 and "1 allow -> deny" in out and "1 deny -> allow" in out, out
    assert "rule docs -> no-readme" in out and "rule default -> sampling" in out
    ran, suggested = tmp_path / "ran.yaml", tmp_path / "suggested.yaml"
    ran.write_text(json.dumps(RULES))
    code = main(["report", "-c", str(config), "--events", str(log), "--policy", str(ran), "--format", "json",
                 "--policy-out", str(suggested)])
    assert code == 0, capsys.readouterr()  # the suggested policy decides every used exchange again the same way
    assert "server_requests:" in suggested.read_text() and "roots/list" in suggested.read_text()


def test_policy_cases_state_resources_prompts_arguments_and_server_requests(tmp_path):
    """``sidecar test`` cases name a resource, a prompt, a tool's arguments or a server request, decided as the
    pipeline decides them (issue 13 item 3)."""
    import subprocess
    import sys

    import yaml

    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(RULES))
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump({"outbound": {"upstreams": {"tools": {"url": "https://tools.example/mcp",
                                                                            "protocol": "mcp"}}},
                                      "policy": {"files": [str(policy)]}, "state_dir": str(tmp_path / "s")}))
    at = {"upstream": "tools", "path": "/"}
    cases = [
        ("readme", {"resource": "docs://readme", "method": "resources/read"}, "allow", "docs"),
        ("internal", {"resource": "docs://internal/plan", "method": "resources/read"}, "deny", "no-internal-docs"),
        ("prompt", {"prompt": "summarize", "method": "prompts/get"}, "allow", "docs"),
        ("us", {"tool": "search_tickets", "arguments": {"region": "US"}}, "allow", "search-us-only"),
        ("eu", {"tool": "search_tickets", "arguments": {"region": "EU"}}, "deny", "default"),
        ("sampling", {"server_request": "sampling/createMessage"}, "deny", "default"),
        ("roots", {"server_request": "roots/list"}, "allow", "docs"),
    ]
    path = tmp_path / "mcp.cases.yaml"
    path.write_text(yaml.safe_dump({"cases": [
        {"name": name, "request": {**at, "mcp": mcp}, "expect": {"decision": decision, "rule": rule}}
        for name, mcp, decision, rule in cases]}))
    result = subprocess.run([sys.executable, "-m", "sidecar", "test", "-c", str(config), str(policy), "--cases",
                             str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and f"{len(cases)} passed" in result.stdout, result.stdout + result.stderr
