"""Finer MCP rules: resources and prompts parsed, URIs two readers could differ on refused, arguments in CEL,
server requests decided, server messages read (issue 13 item 3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from sidecar.errors import RequestRefused
from sidecar.policy.facts import McpDetail
from sidecar.policy.mcp import MAX_ARGUMENTS_BYTES, SERVER_REQUEST_METHOD, RpcRefused, parse_mcp_request
from sidecar.policy.mcp_responses import LISTINGS, MessageFilter, SseMessageFilter, filter_json, filter_sse
from sidecar.exchange import AgentInfo
from sidecar.policy.engine import PolicySet, load_policy
from sidecar.policy.facts import Facts

AGENT = AgentInfo("spiffe://example.org/ns/agents/sa/tools-1", "tools-agent", "production")


def load(tmp_path: Path, rules: list[dict]) -> PolicySet:
    path = tmp_path / "policy.yaml"
    path.write_text(json.dumps({"version": 1, "default": "deny", "rules": rules}))
    return load_policy([path], upstreams={"tools-mcp": "mcp"}, credentials={})


def parsed(method: str, **params: object):
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    return parse_mcp_request(body, "application/json", 1 << 20)


@pytest.mark.parametrize("method, params, resource, prompt", [
    ("resources/read", {"uri": "docs://readme"}, "docs://readme", None),
    ("resources/subscribe", {"uri": "file:///srv/a.md"}, "file:///srv/a.md", None),
    ("resources/unsubscribe", {"uri": "https://example.com/a?b=c"}, "https://example.com/a?b=c", None),
    ("prompts/get", {"name": "summarize", "arguments": {"text": "x"}}, None, "summarize"),
])
def test_resource_and_prompt_requests_name_what_they_read(method, params, resource, prompt):
    """resources/* name their URI, prompts/get its prompt: what policy matches."""
    call = parsed(method, **params)
    assert (call.method, call.resource, call.prompt) == (method, resource, prompt)


@pytest.mark.parametrize("method, params", [
    ("resources/read", {}),  # no uri
    ("resources/read", {"uri": 7}),  # not a string
    ("resources/read", {"uri": "readme"}),  # not absolute
    ("resources/read", {"uri": "File:///etc/passwd"}),  # a capital in the scheme
    ("resources/read", {"uri": "https://Example.com/a"}),  # a capital in the authority
    ("resources/read", {"uri": "file:///docs/../etc/passwd"}),  # a dot-dot segment
    ("resources/read", {"uri": "file:///docs/./a"}),  # a dot segment
    ("resources/read", {"uri": "file:///docs/%2e%2e/etc/passwd"}),  # an encoded dot
    ("resources/read", {"uri": "file:///docs%2Fetc"}),  # an encoded slash
    ("resources/read", {"uri": "file:///docs%5cetc"}),  # an encoded backslash
    ("resources/read", {"uri": "file:///docs\\etc"}),  # a backslash
    ("resources/read", {"uri": "file:///docs/a%zz"}),  # a malformed escape
    ("resources/read", {"uri": "file:///docs/a b"}),  # whitespace
    ("resources/read", {"uri": "file:///docs/a\u0000"}),  # a control character
    ("resources/read", {"uri": "file:///" + "a" * 2048}),  # too long
    ("prompts/get", {}),  # no name
    ("prompts/get", {"name": ""}),  # an empty name
])
def test_resources_and_prompts_two_readers_could_differ_on_are_refused(method, params):
    """A request whose URI or name could be read differently by the server is refused as that request's error."""
    with pytest.raises(RpcRefused) as refused:
        parsed(method, **params)
    assert refused.value.reason == "bad_request" and refused.value.rpc.id == 1


@given(st.lists(st.sampled_from(["a", "..", ".", "%2e", "%2E.", "b%2f", "c"]), min_size=1, max_size=5))
def test_a_parsed_uri_never_has_a_segment_the_server_would_resolve(segments):
    """Whatever the segments, a URI that parses has no dot segment, encoded or not."""
    uri = "file:///" + "/".join(segments)
    try:
        call = parsed("resources/read", uri=uri)
    except RequestRefused:
        return
    decoded = call.resource.replace("%2e", ".").replace("%2E", ".")
    assert not any(s in (".", "..") for s in decoded.split("/")) and "%2f" not in call.resource.lower()


RULES = [
    {"id": "no-secrets", "direction": "outbound", "upstream": "tools-mcp",
     "mcp": {"resources": ["file:///srv/secrets/**"], "server_requests": ["elicitation/create"]}, "effect": "deny"},
    {"id": "docs", "direction": "outbound", "upstream": "tools-mcp",
     "mcp": {"resources": ["file:///srv/**"], "prompts": ["summarize"]}, "effect": "allow"},
    {"id": "us-only", "direction": "outbound", "upstream": "tools-mcp", "mcp": {"tools": ["search_tickets"]},
     "when": {"expr": 'mcp.method != "tools/call" || mcp.arguments.region == "US"'}, "effect": "allow"},
]


def mcp_facts(method: str, tool: str | None = None, **detail: object):
    return Facts("outbound", "POST", "https", "tools.internal", "/", "", {}, 0, "tools-mcp", AGENT, mcp_method=method,
                 mcp_tool=tool, mcp=McpDetail(**detail) if detail else None)  # type: ignore[arg-type]


@pytest.mark.parametrize("facts, decision", [
    # a resource under the allowed glob
    (mcp_facts("resources/read", resource="file:///srv/docs/a.md"), ("allow", "docs")),
    # the deny glob wins
    (mcp_facts("resources/read", resource="file:///srv/secrets/key"), ("deny", "no-secrets")),
    # outside every glob
    (mcp_facts("resources/read", resource="file:///etc/passwd"), ("deny", "default")),
    # a named prompt, and another
    (mcp_facts("prompts/get", prompt="summarize"), ("allow", "docs")),
    (mcp_facts("prompts/get", prompt="jailbreak"), ("deny", "default")),
    # the lists are lifecycle for rules naming resources or prompts
    (mcp_facts("resources/list"), ("allow", "docs")),
    (mcp_facts("prompts/list"), ("allow", "docs")),
    # arguments a condition reads
    (mcp_facts("tools/call", "search_tickets", arguments={"region": "US"}), ("allow", "us-only")),
    (mcp_facts("tools/call", "search_tickets", arguments={"region": "EU"}), ("deny", "default")),
    # a region of another type is not "US": no coercion
    (mcp_facts("tools/call", "search_tickets", arguments={"region": ["US"]}), ("deny", "default")),
    # the server asks: roots/list by default, sampling only when listed, elicitation denied by rule
    (mcp_facts(SERVER_REQUEST_METHOD, server_request="roots/list"), ("allow", "docs")),
    (mcp_facts(SERVER_REQUEST_METHOD, server_request="sampling/createMessage"), ("deny", "default")),
    (mcp_facts(SERVER_REQUEST_METHOD, server_request="elicitation/create"), ("deny", "no-secrets")),
])
def test_finer_mcp_rules_decide(tmp_path: Path, facts, decision):
    """Resources by URI glob, prompts by name, tool arguments in CEL, the server's requests by method."""
    outcome = load(tmp_path, RULES).decide(facts)
    assert (outcome.effect, outcome.rule_id) == decision


def test_a_server_request_is_not_an_agent_method(tmp_path: Path):
    """An agent sending sampling/createMessage is matched as its method, never as the server's request."""
    rules = [{"id": "sampling", "direction": "outbound", "upstream": "tools-mcp",
              "mcp": {"server_requests": ["sampling/createMessage"]}, "effect": "allow"}]
    assert load(tmp_path, rules).decide(mcp_facts("sampling/createMessage")).effect == "deny"


def test_arguments_of_a_large_call_are_a_condition_error(tmp_path: Path):
    """Past MAX_ARGUMENTS_BYTES the arguments are not converted: the condition fails closed."""
    large = mcp_facts("tools/call", "search_tickets", arguments={"region": "US"}, arguments_size=MAX_ARGUMENTS_BYTES + 1)
    outcome = load(tmp_path, RULES).decide(large)
    assert (outcome.effect, outcome.reason) == ("deny", "condition_error") and "larger than" in (outcome.detail or "")


def test_lists_keep_what_the_agent_may_use(tmp_path: Path):
    """mcp_allowed answers for each listed resource and prompt as a read or a get would be decided."""
    policy = load(tmp_path, RULES)
    listing = mcp_facts("resources/list")
    assert policy.mcp_allowed(listing, "resources/read", "file:///srv/a") is True
    assert policy.mcp_allowed(listing, "resources/read", "file:///srv/secrets/a") is False
    assert policy.mcp_allowed(listing, "prompts/get", "summarize") is True


# --- what the server sends ----------------------------------------------------------------------


def decide_none(method: str, ident: str | int) -> bool:
    return method in ("ping", "roots/list")


@pytest.mark.parametrize("message, out", [
    # a notification passes
    ({"jsonrpc": "2.0", "method": "notifications/progress"}, None),
    # a server request policy allows passes, one it refuses is taken out
    ({"jsonrpc": "2.0", "id": 3, "method": "roots/list"}, None),
    ({"jsonrpc": "2.0", "id": 4, "method": "sampling/createMessage"}, "drop"),
    # a response to another method passes
    ({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}, None),
])
def test_server_messages_are_passed_or_taken_out(message, out):
    """Each message of an answer is a notification, a response or a server request decided by the caller."""
    filtered = MessageFilter(server_request=decide_none).message(message)
    assert (filtered is None) if out is None else filtered is not None and filtered is not message


@pytest.mark.parametrize("message", [
    [{"jsonrpc": "2.0", "id": 4, "method": "sampling/createMessage"}],  # a batch
    {"jsonrpc": "2.0", "id": 4, "Method": "sampling/createMessage"},  # a member in another case
    {"jsonrpc": "2.0", "id": 4, "method": "ping", "result": {}},  # a method beside a result
    {"jsonrpc": "2.0", "id": 4, "result": {}, "error": {"code": 1, "message": "x"}},  # result and error
    {"jsonrpc": "1.0", "id": 4, "method": "ping"},  # another version
    {"jsonrpc": "2.0", "id": None, "method": "sampling/createMessage"},  # a null id
])
def test_server_messages_two_readers_could_differ_on_are_refused(message):
    """A message the agent's SDK could read as another than the sidecar did breaks the answer off."""
    with pytest.raises(RequestRefused):
        MessageFilter(server_request=decide_none).message(message)


def test_a_refused_server_request_leaves_its_event_id():
    """Taken out of an SSE stream, a refused request leaves its id: field (no data), so resumption skips it."""
    text = ('id: 7\nevent: message\ndata: {"jsonrpc":"2.0","id":"s","method":"sampling/createMessage"}\n\n'
            'id: 8\ndata: {"jsonrpc":"2.0","method":"notifications/x"}\n\n')
    out = filter_sse(text, MessageFilter(server_request=decide_none))
    assert out == 'id: 7\n\nid: 8\ndata: {"jsonrpc":"2.0","method":"notifications/x"}\n\n'


def test_a_refused_server_request_as_a_json_answer_is_emptied():
    """A JSON answer that is a refused server request reaches the agent as nothing."""
    body = b'{"jsonrpc":"2.0","id":"s","method":"sampling/createMessage"}'
    assert filter_json(body, MessageFilter(server_request=decide_none), strict=False) == b""


@pytest.mark.parametrize("ending", ["\r\n", "\n", "\r"])
def test_priming_events_and_every_line_ending_pass(ending):
    """An event with an id and empty data (a resumable server's priming event) passes, whatever the line ending."""
    text = f"id: 1{ending}data: {ending}{ending}"
    stream = SseMessageFilter(MessageFilter(server_request=decide_none))
    assert stream.feed(text.encode()) + stream.close() == b"id: 1\ndata: \n\n"


@pytest.mark.parametrize("method, key, name, kept", [
    ("resources/list", "resources", "uri", ["file:///srv/a"]),
    ("prompts/list", "prompts", "name", ["summarize"]),
])
def test_resource_and_prompt_lists_are_filtered(method, key, name, kept):
    """resources/list keeps the URIs, prompts/list the names, the agent may use; nextCursor stays."""
    entries = [{name: kept[0]}, {name: "secret"}]
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {key: entries, "nextCursor": "2"}}).encode()
    out = json.loads(filter_json(body, MessageFilter(LISTINGS[method], set(kept).__contains__), strict=True))
    assert [e[name] for e in out["result"][key]] == kept and out["result"]["nextCursor"] == "2"
