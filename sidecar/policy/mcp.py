"""Strict JSON-RPC 2.0 parsing for ``protocol: mcp`` upstreams, and tools/list filtering.

Policy matches MCP calls on ``mcp.method`` and ``mcp.tool``; an MCP server may read the same
bytes differently from Python's ``json`` (Go's ``encoding/json`` matches keys case-insensitively
under Unicode folding and keeps the last duplicate). So anything two parsers could disagree on
is refused with ``bad_request`` instead of guessed at:

- media type other than ``application/json`` (parameters allowed; a ``charset`` must be utf-8);
- a UTF-8 byte order mark (RFC 8259 section 8.1 lets parsers choose; we refuse), invalid UTF-8,
  lone surrogates in ``method`` or ``params.name``;
- duplicate keys in any object; keys equal under Unicode case folding (``method``/``Method``,
  ``params``/``paramſ``) in the request object and in ``params``;
- batches (arrays), non-object bodies, members other than jsonrpc/id/method/params;
- ``NaN``/``Infinity``/overflowing numbers, nesting deeper than ``max_depth``;
- an ``id`` that is not a string or integer (MCP forbids null ids);
- methods in the ``rpc.`` namespace, which JSON-RPC 2.0 (section 4) reserves;
- a ``method`` or tool name longer than :data:`MAX_NAME_CHARS` (MCP asks tool names to be at most
  128 characters): such a name would otherwise be written whole into events and approval listings;
- ``Mcp-Method`` / ``Mcp-Name`` headers (the 2026-07-28 transport, for servers that route on them) that
  do not say what the body says (:func:`check_routing_headers`).

A JSON-RPC response from the agent (its answer to a server's own request: sampling,
elicitation, roots) is accepted with exactly ``jsonrpc``, ``id`` and one of ``result`` or a
well-formed ``error``; policy sees it as the method ``rpc.response`` (reserved, so no server
method can be mistaken for it). Allow rules with ``mcp.tools`` pass it like the lifecycle:
it answers a request the server made within a session the policy let the agent open.
The streamable-HTTP transport's GET stream and session DELETE carry no JSON-RPC; policy sees them as
``rpc.stream`` and ``rpc.session_end`` (:mod:`sidecar.mcp_transport`), passed by every allow rule with ``mcp``.

Once the request object's envelope is sound (its ``id`` known), a refused method or params raise
:class:`RpcRefused`, which the caller answers as a JSON-RPC error to that id rather than HTTP 400.

What the server sends back (list responses filtered, its own requests to the agent found) is read by
:mod:`sidecar.policy.mcp_responses`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sidecar.errors import RequestRefused

MAX_DEPTH = 64
MAX_NAME_CHARS = 256  # method and params.name of a request
MAX_URI_CHARS = 2048  # params.uri of a resources request
MAX_ARGUMENTS_BYTES = 64 * 1024  # a tools/call body larger than this shows CEL no arguments (condition_error)
RESOURCE_METHODS = frozenset({"resources/read", "resources/subscribe", "resources/unsubscribe"})
RESPONSE_METHOD = "rpc.response"  # what policy sees for the agent's answers to server requests
STREAM_METHOD = "rpc.stream"  # a GET of the endpoint: the transport's server-to-client SSE stream
SESSION_END_METHOD = "rpc.session_end"  # a DELETE of the endpoint: the client ends its session
TRANSPORT_METHODS = frozenset({STREAM_METHOD, SESSION_END_METHOD})
SERVER_REQUEST_METHOD = "rpc.server_request"  # what policy sees for a server's request to the agent
# what the server may ask of the agent under every allow rule with mcp: (sampling spends the agent's model)
DEFAULT_SERVER_REQUESTS = frozenset({"ping", "roots/list", "elicitation/create"})
_TRANSPORT = {"GET": STREAM_METHOD, "DELETE": SESSION_END_METHOD}
LIFECYCLE_METHODS = frozenset({"initialize", "server/discover", "ping", "tools/list", "resources/list", "prompts/list",
                               RESPONSE_METHOD})
_NOTIFICATIONS = "notifications/"
_COMMON_JSON_TYPES = frozenset({"application/json", "application/json; charset=utf-8"})
_REQUEST_MEMBERS = frozenset({"jsonrpc", "id", "method", "params"})
_RESPONSE_MEMBERS = (frozenset({"jsonrpc", "id", "result"}), frozenset({"jsonrpc", "id", "error"}))
_BASE64_SENTINEL = re.compile(r"=\?base64\?(.*)\?=")  # how Mcp-Name carries a name not safe in a header
# Tokens that change nesting depth, with strings skipped (so brackets inside them do not count).
_DEPTH_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)


@dataclass(frozen=True, slots=True)
class RpcRef:
    """What a refusal of one JSON-RPC message answers: its id, and whether the sender awaits a reply."""

    id: str | int | None
    expects_reply: bool


class RpcRefused(RequestRefused):
    """A JSON-RPC request object whose envelope is sound but whose method or params are refused."""

    def __init__(self, message: str, rpc: RpcRef) -> None:
        super().__init__("bad_request", message)
        self.rpc = rpc


@dataclass(frozen=True, slots=True)
class McpCall:
    """One parsed MCP request: what policy sees as ``mcp.method``, ``mcp.tool``, ``mcp.resource``, ``mcp.prompt``
    and ``mcp.arguments``."""

    method: str
    tool: str | None
    id: str | int | None
    is_notification: bool
    arguments: dict[str, Any] | None = field(default=None, compare=False)  # tools/call params.arguments
    resource: str | None = None  # params.uri of resources/read, subscribe, unsubscribe
    prompt: str | None = None  # params.name of prompts/get
    size: int = field(default=0, compare=False)  # the body's length: bounds the arguments CEL sees

    @property
    def rpc(self) -> RpcRef:
        """Requests await a reply; notifications and the agent's own answers (rpc.response) do not."""
        replies = not self.is_notification and self.method != RESPONSE_METHOD
        return RpcRef(self.id, replies)


def transport_method(http_method: str, path: str) -> str | None:
    """What policy sees for a GET or DELETE of the MCP endpoint itself (the upstream's URL, canonical
    path "/"); None for anything else."""
    return _TRANSPORT.get(http_method) if path == "/" else None


def is_lifecycle(method: str) -> bool:
    """True for what allow rules with tools let through: initialize, ping, tools/list, notifications/*,
    and the agent's answers to server requests (rpc.response)."""
    return method in LIFECYCLE_METHODS or method.startswith(_NOTIFICATIONS)


def _refuse(message: str) -> RequestRefused:
    return RequestRefused("bad_request", f"mcp: {message}")


def check_media_type(content_type: str | None) -> None:
    """Refuse anything but application/json (case-insensitive; a charset must be utf-8)."""
    if content_type in _COMMON_JSON_TYPES:
        return
    media, _, params = (content_type or "").partition(";")
    if media.strip().lower() != "application/json":
        raise _refuse("expected Content-Type application/json")
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip().strip('"').lower() != "utf-8":
            raise _refuse("expected charset utf-8 (or none) for application/json")


def _check_depth(body: bytes, max_depth: int) -> None:
    """Refuse nesting deeper than max_depth (exact scan only when brackets could reach it)."""
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return
    depth = 0
    for match in _DEPTH_TOKENS.finditer(body):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                raise _refuse(f"JSON nesting deeper than {max_depth} levels")
        elif token in (b"]", b"}"):
            depth -= 1


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _refuse("duplicate key in a JSON object")
    return obj


def _no_constant(name: str) -> Any:
    raise _refuse(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _refuse("number out of range")
    return value


# Built once: json.loads(..., hooks) would build a decoder and scanner on every call.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_pairs_hook, parse_constant=_no_constant, parse_float=_finite_float
)


def loads_strict(body: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """Parse UTF-8 JSON refusing BOM, duplicate keys, NaN/Infinity and deep nesting."""
    if body.startswith(b"\xef\xbb\xbf"):
        raise _refuse("a byte order mark is not allowed before JSON")
    _check_depth(body, max_depth)
    try:
        text = body.decode("utf-8")
        return _DECODER.decode(text)
    except UnicodeDecodeError:
        raise _refuse("body is not valid UTF-8") from None
    except (ValueError, RecursionError):
        raise _refuse("body is not valid JSON") from None


def _check_case_variants(obj: dict[str, Any], where: str) -> None:
    """Refuse keys that are equal under Unicode case folding (Go matches them as one)."""
    if len({key.casefold() for key in obj}) != len(obj):
        raise _refuse(f"keys differing only in case in {where}")


def checked_text(value: Any, what: str, max_chars: int | None = None) -> str:
    """A non-empty, well-formed string (no lone surrogates) of at most ``max_chars``, else refused."""
    if not isinstance(value, str) or not value:
        raise _refuse(f"{what} must be a non-empty string")
    if max_chars is not None and len(value) > max_chars:
        raise _refuse(f"{what} must be at most {max_chars} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _refuse(f"{what} contains an unpaired surrogate") from None
    return value


def check_envelope(obj: Any) -> dict[str, Any]:
    """The request object: one object, only JSON-RPC members, jsonrpc "2.0", a valid id."""
    if isinstance(obj, list):
        raise _refuse("JSON-RPC batches are not supported; send one request per HTTP request")
    if not isinstance(obj, dict):
        raise _refuse("body must be a JSON-RPC request object")
    if not _REQUEST_MEMBERS.issuperset(obj):
        _refuse_members(obj)  # the known members are distinct lowercase: no case variants
    _check_version_and_id(obj)
    return obj


def _check_version_and_id(obj: dict[str, Any]) -> None:
    """jsonrpc exactly "2.0"; an id, when present, a string or an integer (MCP forbids null ids)."""
    if obj.get("jsonrpc") != "2.0":
        raise _refuse('jsonrpc must be exactly "2.0"')
    ident = obj.get("id")
    if "id" in obj and (isinstance(ident, bool) or not isinstance(ident, (str, int))):
        raise _refuse("id must be a string or an integer")


def _refuse_members(obj: dict[str, Any]) -> None:
    """Why a request object with members beyond jsonrpc/id/method/params is refused."""
    _check_case_variants(obj, "the request object")
    raise _refuse("expected only jsonrpc, id, method and params in the request object")


def _response(obj: dict[str, Any]) -> McpCall:
    """The agent's answer to a server request: jsonrpc, id and exactly one of result or error."""
    _check_case_variants(obj, "the response object")
    if frozenset(obj) not in _RESPONSE_MEMBERS:
        raise _refuse("a JSON-RPC response has exactly jsonrpc, id and one of result or error")
    _check_version_and_id(obj)
    ident = obj["id"]
    if "result" in obj and not isinstance(obj["result"], dict):
        raise _refuse("result must be a JSON object")
    if "error" in obj:
        error = obj["error"]
        if not isinstance(error, dict) or not {"code", "message"} <= set(error) \
                or not set(error) <= {"code", "message", "data"}:
            raise _refuse("error must be an object with code, message and optional data")
        _check_case_variants(error, "the error object")
        if isinstance(error["code"], bool) or not isinstance(error["code"], int) \
                or not isinstance(error["message"], str):
            raise _refuse("error.code must be an integer and error.message a string")
    return McpCall(method=RESPONSE_METHOD, tool=None, id=ident, is_notification=False)


def _tool_name(method: str, params: Any) -> str | None:
    """params.name for tools/call (refused if missing); None for other methods."""
    if params is not None and not isinstance(params, dict):
        raise _refuse("params must be a JSON object")
    if params is not None:
        _check_case_variants(params, "params")
    if method != "tools/call":
        return None
    if params is None:
        raise _refuse("tools/call needs params with a tool name")
    arguments = params.get("arguments")
    if arguments is not None and not isinstance(arguments, dict):
        raise _refuse("tools/call params.arguments must be a JSON object")
    return checked_text(params.get("name"), "tools/call params.name", MAX_NAME_CHARS)


def parse_mcp_request(
    body: bytes, content_type: str | None, max_bytes: int, *, max_depth: int = MAX_DEPTH
) -> McpCall:
    """One strict JSON-RPC 2.0 MCP request -> McpCall, or RequestRefused."""
    check_media_type(content_type)
    if len(body) > max_bytes:
        raise RequestRefused("body_too_large", f"mcp: body larger than {max_bytes} bytes")
    obj = loads_strict(body, max_depth)
    if isinstance(obj, dict) and "method" not in obj and ("result" in obj or "error" in obj):
        return _response(obj)
    obj = check_envelope(obj)
    try:
        return _request(obj, len(body))
    except RequestRefused as refusal:  # the id is known: the refusal can be answered in JSON-RPC
        raise RpcRefused(refusal.message, RpcRef(obj.get("id"), "id" in obj)) from None


def _request(obj: dict[str, Any], size: int) -> McpCall:
    """A request object whose envelope was checked: its method, and what the method names (tool, resource, prompt)."""
    method = checked_text(obj.get("method"), "method", MAX_NAME_CHARS)
    if method.startswith("rpc."):
        raise _refuse("methods starting with 'rpc.' are reserved by JSON-RPC 2.0")
    if "params" in obj and obj["params"] is None:
        raise _refuse("params must be a JSON object")
    params = obj.get("params")
    tool = _tool_name(method, params)
    arguments = params.get("arguments") if tool is not None and isinstance(params, dict) else None
    resource = checked_uri(_param(params, "uri", method)) if method in RESOURCE_METHODS else None
    prompt = checked_text(_param(params, "name", method), "prompts/get params.name", MAX_NAME_CHARS) \
        if method == "prompts/get" else None
    return McpCall(method, tool, obj.get("id"), "id" not in obj, arguments, resource, prompt, size)


def _param(params: Any, key: str, method: str) -> Any:
    """params[key] of a method that needs it (params, when present, is an object: _tool_name checked)."""
    if not isinstance(params, dict) or key not in params:
        raise _refuse(f"{method} needs params.{key}")
    return params[key]


_URI_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*:")
_URI_FORBIDDEN = re.compile(r"[\x00-\x20\x7f\\]|%(?![0-9A-Fa-f]{2})|%2[eEfF]|%5[cC]")


def checked_uri(value: Any) -> str:
    """A resource URI policy can match as the server will read it: a lowercase scheme, no dot segments
    (``file:///docs/../secrets``), no encoded dot, slash or backslash, no whitespace or controls, and an
    authority without capitals (a server would compare it case-insensitively, a glob does not)."""
    uri = checked_text(value, "params.uri", MAX_URI_CHARS)
    scheme = _URI_SCHEME.match(uri)
    if scheme is None:
        raise _refuse("params.uri must be an absolute URI with a lowercase scheme (file:///docs/a.md)")
    if _URI_FORBIDDEN.search(uri):
        raise _refuse("params.uri must not contain whitespace, controls, backslashes or encoded '.', '/' or '\\'")
    rest = uri[scheme.end():].split("?", 1)[0].split("#", 1)[0]
    if any(segment in (".", "..") for segment in rest.split("/")):
        raise _refuse("params.uri must not contain '.' or '..' segments")
    if rest.startswith("//"):
        authority = rest[2:].split("/", 1)[0]
        if authority != authority.lower():
            raise _refuse("params.uri's authority must be lowercase")
    return uri


def described_body(method: str, tool: str | None = None, resource: str | None = None, prompt: str | None = None,
                   arguments: dict[str, Any] | None = None) -> bytes:
    """The JSON-RPC body of a request described rather than received (``sidecar test`` cases, replayed events),
    which :func:`parse_mcp_request` reads back into the same call."""
    if method == RESPONSE_METHOD:
        return b'{"jsonrpc":"2.0","id":1,"result":{}}'
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": method}
    if tool is not None:
        message["params"] = {"name": tool, "arguments": arguments or {}}
    elif resource is not None:
        message["params"] = {"uri": resource}
    elif prompt is not None:
        message["params"] = {"name": prompt}
    return json.dumps(message).encode("utf-8")


def check_routing_headers(call: McpCall, methods: Sequence[str], names: Sequence[str]) -> None:
    """``Mcp-Method`` and ``Mcp-Name`` (the 2026-07-28 transport) repeat the body for servers that route on
    them: they must say what the body says, or policy and server could act on different calls."""
    if len(methods) > 1 or len(names) > 1:
        raise RpcRefused("mcp: more than one Mcp-Method or Mcp-Name header", call.rpc)
    if methods and methods[0] != call.method:
        raise RpcRefused("mcp: the Mcp-Method header must name the body's method", call.rpc)
    if names and call.tool is not None and _header_text(names[0]) != call.tool:
        raise RpcRefused("mcp: the Mcp-Name header must name the body's tool", call.rpc)


def _header_text(value: str) -> str | None:
    """A header value, or the UTF-8 text its ``=?base64?...?=`` form carries (None if malformed)."""
    sentinel = _BASE64_SENTINEL.fullmatch(value)
    if sentinel is None:
        return value
    try:
        decoded = base64.b64decode(sentinel.group(1), validate=True)
        return decoded.decode("utf-8") if base64.b64encode(decoded).decode() == sentinel.group(1) else None
    except (binascii.Error, UnicodeDecodeError):
        return None
