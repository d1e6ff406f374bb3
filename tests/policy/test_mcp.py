"""Strict MCP JSON-RPC parsing: anything two JSON parsers could read differently is refused."""

from __future__ import annotations

import json

import pytest

from sidecar.errors import RequestRefused
from sidecar.policy.mcp import (
    LIFECYCLE_METHODS,
    McpCall,
    RpcRef,
    RpcRefused,
    check_routing_headers,
    is_lifecycle,
    parse_mcp_request,
)
from sidecar.policy.mcp_responses import SseToolsListFilter, filter_tools_list, filter_tools_list_sse

JSON = "application/json"
LIMIT = 65536


def call(body: str | bytes, content_type: str | None = JSON, limit: int = LIMIT) -> McpCall:
    raw = body.encode("utf-8") if isinstance(body, str) else body
    return parse_mcp_request(raw, content_type, limit)


def refused(body: str | bytes, content_type: str | None = JSON) -> RequestRefused:
    with pytest.raises(RequestRefused) as info:
        call(body, content_type)
    return info.value


TOOL_CALL = '{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"search","arguments":{}}}'


PARSED = [
    # a tool call: the tool name comes from params.name
    (TOOL_CALL, McpCall("tools/call", "search", 7, False)),
    # string ids (JSON-RPC 2.0 section 4)
    ('{"jsonrpc":"2.0","id":"a-1","method":"tools/list"}', McpCall("tools/list", None, "a-1", False)),
    # a notification has no id
    ('{"jsonrpc":"2.0","method":"notifications/initialized"}',
     McpCall("notifications/initialized", None, None, True)),
    # params optional for non-tool methods; whitespace around the JSON is fine
    (' \n{"jsonrpc":"2.0","id":0,"method":"ping"}\n', McpCall("ping", None, 0, False)),
    # case variants deeper inside tool arguments are data, not envelope, and pass
    ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"ID":1,"id":2}}}',
     McpCall("tools/call", "t", 1, False)),
    # a tools/call without id is still a tool call (the server may run it)
    ('{"jsonrpc":"2.0","method":"tools/call","params":{"name":"t"}}', McpCall("tools/call", "t", None, True)),
    # the agent's answers to server requests (sampling, elicitation, roots): rpc.response
    ('{"jsonrpc":"2.0","id":3,"result":{"role":"assistant","content":{"type":"text","text":"hi"}}}',
     McpCall("rpc.response", None, 3, False)),
    ('{"jsonrpc":"2.0","id":"s-1","error":{"code":-1,"message":"user declined"}}',
     McpCall("rpc.response", None, "s-1", False)),
    # a tool name of MAX_NAME_CHARS passes (issue 11 item 14)
    ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"%s"}}' % ("t" * 256),
     McpCall("tools/call", "t" * 256, 1, False)),
    # non-ASCII tool names survive intact
    ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"r\\u00e9sum\\u00e9"}}',
     McpCall("tools/call", "r\u00e9sum\u00e9", 1, False)),
]


@pytest.mark.parametrize(("body", "expected"), PARSED)
def test_parse_valid_requests(body: str, expected: McpCall) -> None:
    """Valid single JSON-RPC 2.0 requests parse into method, tool, id and notification flag."""
    assert call(body) == expected


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "Application/JSON; charset=utf-8",  # media types are case-insensitive (RFC 9110 8.3.1)
        "application/json;charset=\"UTF-8\"",  # quoted parameter value
        "application/json ; profile=x",  # other parameters are ignored
    ],
)
def test_accepted_media_types(content_type: str) -> None:
    """application/json with any case and harmless parameters is accepted."""
    assert call(TOOL_CALL, content_type).tool == "search"


@pytest.mark.parametrize(
    "content_type",
    [
        None,  # missing
        "",  # empty
        "text/plain",  # CORS-simple type a browser may send without preflight
        "text/json",  # not the registered type
        "application/json-seq",  # RFC 7464 sequences
        "application/json-patch+json",  # a +json suffix is another format
        "application/jsonx",  # prefix match must not pass
        "application/x-www-form-urlencoded",  # form post
        "application/json; charset=utf-16",  # only UTF-8 (RFC 8259 section 8.1)
        "application/json; charset=latin1",  # only UTF-8
    ],
)
def test_refused_media_types(content_type: str | None) -> None:
    """Anything but application/json (UTF-8) is refused with bad_request."""
    problem = refused(TOOL_CALL, content_type)
    assert problem.reason == "bad_request" and problem.message.startswith("mcp: ")


REFUSED = [
    # batches: one policy decision per request, so arrays are refused (JSON-RPC 2.0 section 6)
    (f"[{TOOL_CALL}]", "batches are not supported"),
    ("[]", "batches are not supported"),
    # not an object
    ('"tools/call"', "request object"),
    ("null", "request object"),
    # duplicate keys: Python keeps the last, many parsers the first (CVE-2017-12635 CouchDB style)
    ('{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call","params":{"name":"x"}}',
     "duplicate key"),
    ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","name":"delete_all"}}',
     "duplicate key"),
    # duplicates hidden behind \\u escapes are still duplicates
    ('{"jsonrpc":"2.0","id":1,"method":"ping","\\u006dethod":"tools/call"}', "duplicate key"),
    # duplicates anywhere, even deep in arguments
    ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"a":1,"a":2}}}',
     "duplicate key"),
    # case variants: Go encoding/json matches keys case-insensitively
    ('{"jsonrpc":"2.0","id":1,"method":"ping","Method":"tools/call"}', "differing only in case"),
    ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","NAME":"delete_all"}}',
     "differing only in case"),
    # Unicode folding: Go folds U+017F (long s) to 's' and U+212A (Kelvin) to 'k'
    ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a"},"param\\u017f":{"name":"b"}}',
     "differing only in case"),
    # unknown members in the envelope are refused
    ('{"jsonrpc":"2.0","id":1,"method":"ping","extra":1}', "only jsonrpc, id, method and params"),
    # jsonrpc must be exactly "2.0" (section 4)
    ('{"id":1,"method":"ping"}', '"2.0"'),
    ('{"jsonrpc":"1.0","id":1,"method":"ping"}', '"2.0"'),
    ('{"jsonrpc":2.0,"id":1,"method":"ping"}', '"2.0"'),
    # method must be a non-empty string
    ('{"jsonrpc":"2.0","id":1}', "method must be"),
    ('{"jsonrpc":"2.0","id":1,"method":""}', "method must be"),
    ('{"jsonrpc":"2.0","id":1,"method":["tools/call"]}', "method must be"),
    # MCP ids are strings or integers, never null, bool, float or object
    ('{"jsonrpc":"2.0","id":null,"method":"ping"}', "id must be"),
    ('{"jsonrpc":"2.0","id":true,"method":"ping"}', "id must be"),
    ('{"jsonrpc":"2.0","id":1.5,"method":"ping"}', "id must be"),
    ('{"jsonrpc":"2.0","id":{},"method":"ping"}', "id must be"),
    # tools/call needs params.name as a non-empty string
    ('{"jsonrpc":"2.0","id":1,"method":"tools/call"}', "tool name"),
    ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}}', "params.name"),
    ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":""}}', "params.name"),
    ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":["a"]}}', "params.name"),
    ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":["search"]}', "params must be"),
    ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":null}', "params must be"),
    ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":[1]}}',
     "arguments must be"),
    # a lone surrogate: other parsers substitute U+FFFD and read another name
    ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a\\ud800"}}', "surrogate"),
    # NaN/Infinity are not JSON (RFC 8259 section 6), nor are overflowing numbers
    ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"x":NaN}}}',
     "not valid JSON"),
    ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"x":-Infinity}}}',
     "not valid JSON"),
    ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"x":1e999}}}',
     "out of range"),
    # the agent's responses: exactly jsonrpc, id and one of result/error, well formed
    ('{"jsonrpc":"2.0","id":1,"result":{},"error":{"code":1,"message":"x"}}', "exactly jsonrpc, id and one"),
    ('{"jsonrpc":"2.0","result":{}}', "exactly jsonrpc, id and one"),  # no id: answers nothing
    ('{"jsonrpc":"2.0","id":1,"result":{},"extra":1}', "exactly jsonrpc, id and one"),
    ('{"jsonrpc":"2.0","id":1,"result":{},"Result":{}}', "differing only in case"),
    ('{"jsonrpc":"1.0","id":1,"result":{}}', '"2.0"'),
    ('{"jsonrpc":"2.0","id":null,"result":{}}', "id must be"),
    ('{"jsonrpc":"2.0","id":1,"result":[1]}', "result must be"),
    ('{"jsonrpc":"2.0","id":1,"error":"no"}', "error must be"),
    ('{"jsonrpc":"2.0","id":1,"error":{"code":1}}', "error must be"),
    ('{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"x","extra":1}}', "error must be"),
    ('{"jsonrpc":"2.0","id":1,"error":{"code":"1","message":"x"}}', "error.code"),
    ('{"jsonrpc":"2.0","id":1,"error":{"code":true,"message":"x"}}', "error.code"),
    # a request in JSON-RPC's reserved namespace (so none can pass for the agent's responses)
    ('{"jsonrpc":"2.0","id":1,"method":"rpc.response"}', "reserved"),
    # syntax errors, trailing garbage, two objects
    ('{"jsonrpc":"2.0",', "not valid JSON"),
    ('{"jsonrpc":"2.0","id":1,"method":"ping"} {}', "not valid JSON"),
    ("", "not valid JSON"),
    # names longer than MAX_NAME_CHARS would be written whole into events and approvals (issue 11 item 14)
    ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"%s"}}' % ("t" * 257), "at most 256"),
    ('{"jsonrpc":"2.0","id":1,"method":"%s"}' % ("m" * 257), "at most 256"),
]


@pytest.mark.parametrize(("body", "why"), REFUSED)
def test_refused_bodies(body: str, why: str) -> None:
    """Each body is refused with bad_request and a message naming the problem."""
    problem = refused(body)
    assert problem.reason == "bad_request"
    assert why in problem.message


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"\xef\xbb\xbf" + TOOL_CALL.encode(), "byte order mark"),  # BOM: RFC 8259 8.1 lets parsers differ
        (TOOL_CALL.encode().replace(b"search", b"se\xffrch"), "UTF-8"),  # invalid UTF-8
        (TOOL_CALL.encode("utf-16-le"), "not valid JSON"),  # UTF-16 body: NULs are not JSON
        (TOOL_CALL.encode().replace(b"search", b"se\xc0\xafrch"), "UTF-8"),  # overlong UTF-8 '/'
    ],
)
def test_refused_encodings(body: bytes, why: str) -> None:
    """Only UTF-8 without a byte order mark is accepted."""
    assert why in refused(body).message


@pytest.mark.parametrize(("body", "answered"), [
    # the envelope is sound, so the refusal answers that request's id
    ('{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{}}', RpcRef(7, True)),
    ('{"jsonrpc":"2.0","id":"x","method":"rpc.discover"}', RpcRef("x", True)),
    # a notification awaits no answer: the refusal drops it
    ('{"jsonrpc":"2.0","method":"tools/call","params":{"name":""}}', RpcRef(None, False)),
    # not a JSON-RPC request object at all: no id to answer, HTTP's own 400
    ('[{"jsonrpc":"2.0","id":1,"method":"ping"}]', None),
    ('{"jsonrpc":"2.0","id":null,"method":"ping"}', None),
    ('{"jsonrpc":"2.0","id":1,"method":"ping","extra":1}', None),
])
def test_refusals_past_the_envelope_carry_the_request_id(body: str, answered: RpcRef | None) -> None:
    """Bad params of a sound request object raise RpcRefused with its id; other bad bodies do not (issue 13 item 1)."""
    problem = refused(body)
    assert problem.reason == "bad_request"
    assert (problem.rpc if isinstance(problem, RpcRefused) else None) == answered


@pytest.mark.parametrize(("methods", "names", "why"), [
    ([], [], None),  # handshake-era clients send neither
    (["tools/call"], ["search"], None),
    (["tools/call"], ["=?base64?c2VhcmNo?="], None),  # "search", as the SDK writes names unsafe in a header
    (["tools/call"], ["delete_account"], "Mcp-Name"),  # the server would route to another tool
    (["tools/call"], ["=?base64?c2VhcmNoCg==?="], "Mcp-Name"),  # "search\n" is another name
    (["tools/call"], ["=?base64?!!?="], "Mcp-Name"),  # a malformed encoding matches nothing
    (["tools/list"], [], "Mcp-Method"),
    (["tools/call", "tools/call"], [], "more than one"),
])
def test_routing_headers_must_say_what_the_body_says(methods: list[str], names: list[str], why: str | None) -> None:
    """Mcp-Method and Mcp-Name, which servers may route on, must name the body's method and tool (issue 13 item 2)."""
    parsed = call(TOOL_CALL)
    if why is None:
        check_routing_headers(parsed, methods, names)
        return
    with pytest.raises(RpcRefused, match=why) as info:
        check_routing_headers(parsed, methods, names)
    assert info.value.rpc == RpcRef(7, True)


def test_oversize_body_is_body_too_large() -> None:
    """A body over the limit is refused with body_too_large (413), before parsing."""
    with pytest.raises(RequestRefused) as info:
        call(TOOL_CALL, limit=len(TOOL_CALL) - 1)
    assert info.value.reason == "body_too_large"
    assert call(TOOL_CALL, limit=len(TOOL_CALL)).tool == "search"


@pytest.mark.parametrize("depth", [65, 100_000])
def test_deep_nesting_refused(depth: int) -> None:
    """Nesting beyond 64 levels is refused before the parser recurses (stack exhaustion)."""
    args = "[" * depth + "]" * depth
    body = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"a":%s}}}'
    with pytest.raises(RequestRefused, match="nesting"):
        call(body % args, limit=1 << 20)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    """Brackets inside strings (escaped quotes too) are data and do not trip the depth bound."""
    text = json.dumps("[{" * 500 + '\\"' + "}]" * 500)
    body = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"q":%s}}}'
    assert call(body % text).tool == "t"


def test_nesting_at_the_bound_is_accepted() -> None:
    """Exactly 64 levels (envelope, params and arguments included) still parse."""
    inner = "[" * 61 + "]" * 61
    body = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"a":%s}}}'
    assert call(body % inner).tool == "t"


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("initialize", True),  # lifecycle
        ("ping", True),  # lifecycle
        ("tools/list", True),  # lifecycle (the response is filtered)
        ("notifications/initialized", True),  # any notification
        ("notifications/cancelled", True),  # any notification
        ("rpc.response", True),  # the agent's answer to a server request
        ("tools/call", False),  # needs a rule naming the tool
        ("resources/read", False),  # not lifecycle
        ("notifications", False),  # no slash: not the notifications namespace
        ("Initialize", False),  # method names are case-sensitive
    ],
)
def test_is_lifecycle(method: str, expected: bool) -> None:
    """Only initialize, ping, tools/list, notifications/* and the agent's answers count as lifecycle."""
    assert is_lifecycle(method) is expected
    assert ("tools/list" in LIFECYCLE_METHODS) is True


def allow_search(name: str) -> bool:
    return name in {"search", "draft_reply"}


LISTED = {
    "jsonrpc": "2.0",
    "id": 3,
    "result": {
        "tools": [
            {"name": "search", "description": "find tickets"},
            {"name": "delete_all", "description": "dangerous"},
            {"name": "draft_reply", "inputSchema": {"type": "object"}},
        ],
        "nextCursor": "abc",
    },
}


def test_filter_tools_list_drops_disallowed_tools() -> None:
    """Tools the agent may not call disappear; everything else is kept in order."""
    out = json.loads(filter_tools_list(json.dumps(LISTED).encode(), allow_search))
    assert [t["name"] for t in out["result"]["tools"]] == ["search", "draft_reply"]
    assert out["result"]["nextCursor"] == "abc" and out["id"] == 3
    assert out["result"]["tools"][1]["inputSchema"] == {"type": "object"}


def test_filter_tools_list_unchanged_when_all_allowed() -> None:
    """When every tool is allowed, the exact response bytes are returned."""
    body = json.dumps(LISTED, indent=2).encode()
    assert filter_tools_list(body, lambda name: True) is body


def test_filter_tools_list_passes_error_responses() -> None:
    """A JSON-RPC error response has no tools and passes unchanged."""
    body = b'{"jsonrpc":"2.0","id":3,"error":{"code":-32601,"message":"nope"}}'
    assert filter_tools_list(body, allow_search) is body


@pytest.mark.parametrize(
    "body",
    [
        b"not json",  # unparseable
        b"[]",  # a batch
        b'{"jsonrpc":"2.0","id":3,"result":{}}',  # no tools array
        b'{"jsonrpc":"2.0","id":3,"result":{"tools":{}}}',  # tools not an array
        b'{"jsonrpc":"2.0","id":3,"result":{"tools":["search"]}}',  # entries not objects
        b'{"jsonrpc":"2.0","id":3,"result":{"tools":[{"description":"x"}]}}',  # entry without name
        # duplicate 'tools': a first-wins client would see the unfiltered list
        b'{"jsonrpc":"2.0","id":3,"result":{"tools":[],"tools":[{"name":"delete_all"}]}}',
        # case variant 'Tools': Go clients match it as 'tools'
        b'{"jsonrpc":"2.0","id":3,"result":{"tools":[],"Tools":[{"name":"delete_all"}]}}',
        # result next to error: a client reading result would get the unfiltered list
        b'{"jsonrpc":"2.0","id":3,"error":{"code":1,"message":"x"},"result":{"tools":[{"name":"x"}]}}',
        # result next to method: the same smuggling through a "notification"
        b'{"jsonrpc":"2.0","method":"notifications/x","result":{"tools":[{"name":"x"}]}}',
        # wrong jsonrpc version on the response
        b'{"jsonrpc":"1.0","id":3,"result":{"tools":[]}}',
        # case variant 'Name' in an entry
        b'{"jsonrpc":"2.0","id":3,"result":{"tools":[{"name":"search","Name":"delete_all"}]}}',
    ],
)
def test_filter_tools_list_fails_closed(body: bytes) -> None:
    """A response that cannot be read reliably is refused, never passed unfiltered."""
    with pytest.raises(RequestRefused):
        filter_tools_list(body, allow_search)


SSE_BODY = (
    "event: message\r\n"
    'data: {"jsonrpc":"2.0","method":"notifications/progress","params":{"progress":1}}\r\n'
    "\r\n"
    ": keep-alive comment\r\n"
    "\r\n"
    "event: message\r\n"
    "id: 42\r\n"
    f"data: {json.dumps(LISTED)}\r\n"
    "\r\n"
)


def sse_tool_names(text: str) -> list[list[str]]:
    names = []
    for event in text.split("\n\n"):
        for line in event.split("\n"):
            if line.startswith("data: ") and '"result"' in line:
                names.append([t["name"] for t in json.loads(line[6:])["result"]["tools"]])
    return names


def test_filter_tools_list_sse() -> None:
    """In an SSE body, the tools/list response is filtered; other events and fields stay."""
    out = filter_tools_list_sse(SSE_BODY, allow_search)
    assert sse_tool_names(out) == [["search", "draft_reply"]]
    assert "notifications/progress" in out and ": keep-alive comment" in out
    assert "id: 42\nevent: message" not in out and "event: message\nid: 42\ndata: " in out
    assert out.endswith("\n\n")


def test_filter_tools_list_sse_multiline_data() -> None:
    """Data split over several data: lines is joined before parsing (SSE spec)."""
    pretty = json.dumps(LISTED, indent=1).replace("\n", "\ndata: ")
    out = filter_tools_list_sse(f"data: {pretty}\n\n", allow_search)
    assert sse_tool_names(out) == [["search", "draft_reply"]]


def test_filter_tools_list_sse_refuses_non_json_data() -> None:
    """An SSE event whose data is not JSON-RPC is refused (fail closed)."""
    with pytest.raises(RequestRefused):
        filter_tools_list_sse("data: hello\n\n", allow_search)


@pytest.mark.parametrize("size", [1, 2, 7, 64])
def test_sse_filter_incremental(size: int) -> None:
    """Fed in chunks of any size (CRLF split across chunks included), output equals one-shot."""
    raw = SSE_BODY.encode()
    stream = SseToolsListFilter(allow_search)
    out = b"".join(stream.feed(raw[i:i + size]) for i in range(0, len(raw), size)) + stream.close()
    assert out.decode() == filter_tools_list_sse(SSE_BODY, allow_search)


def test_sse_filter_bounds_an_event() -> None:
    """An event growing past the bound without ending is refused."""
    stream = SseToolsListFilter(allow_search, max_event_bytes=100)
    with pytest.raises(RequestRefused):
        stream.feed(b"data: " + b"x" * 200)
