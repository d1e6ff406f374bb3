"""What an MCP server sends back: list responses filtered, and its own requests to the agent found.

An answer to a POST is one JSON-RPC message (``application/json``) or a stream of them
(``text/event-stream``); the GET stream is a stream too. Each message is read for two things:

- **Lists.** The response to ``tools/list``, ``resources/list`` or ``prompts/list`` keeps only the
  tools, resources and prompts policy lets the agent call, read or get (:data:`LISTINGS`), on every
  page (``nextCursor`` is kept). A list response that cannot be read reliably (duplicate or case-variant
  keys, a result beside an error, an entry without its name) is refused: never passed unfiltered.
- **Server requests.** A message with a ``method`` and an ``id`` is the server asking the agent
  (``sampling/createMessage``, ``elicitation/create``, ``roots/list``, ``ping``); the caller decides it
  (:class:`MessageFilter`'s ``server_request``), and a refused one is taken out of the stream (its
  ``id:`` field stays, so a resumed stream starts after it) for the caller to answer the server.

Messages are one object each (a batch is refused), ``jsonrpc`` ``"2.0"``, no two keys equal under
case folding and no member in another case (Go reads ``Method`` as ``method``), no method beside a
result or error.
Notifications, responses and events without data pass unchanged; an event whose data is not JSON is
refused (the relay breaks the stream off: fail closed). Lines may end in CRLF, LF or CR.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable
from typing import Any, NamedTuple

import orjson

from sidecar.errors import RequestRefused
from sidecar.policy.mcp import MAX_NAME_CHARS, checked_text, loads_strict


class Listing(NamedTuple):
    """A list method: the result's array, each entry's name member, and the method that uses an entry."""

    key: str
    name: str
    uses: str


LISTINGS = {
    "tools/list": Listing("tools", "name", "tools/call"),
    "resources/list": Listing("resources", "uri", "resources/read"),
    "prompts/list": Listing("prompts", "name", "prompts/get"),
}
_MEMBERS = frozenset({"jsonrpc", "id", "method", "params", "result", "error"})
DROP = object()  # what a message filter returns for a message taken out of the stream
Allowed = Callable[[str], bool]  # is this listed name one the agent may use?
ServerRequest = Callable[[str, "str | int"], bool]  # (method, id) -> pass it to the agent?


def _refuse(message: str) -> RequestRefused:
    return RequestRefused("bad_request", f"mcp: {message}")


class AnswerTooLarge(RequestRefused):
    """An SSE event of a server's answer past its bound."""


def _check_case_variants(obj: dict[str, Any], where: str) -> None:
    if len({key.casefold() for key in obj}) != len(obj):
        raise _refuse(f"keys differing only in case in {where}")


class MessageFilter:
    """Reads each message a server sends for one exchange: filters its list, decides its requests."""

    def __init__(self, listing: Listing | None = None, allowed: Allowed | None = None,
                 server_request: ServerRequest | None = None) -> None:
        self._listing, self._allowed, self._server_request = listing, allowed, server_request

    def message(self, message: Any) -> Any:
        """The message unchanged (None), filtered (a new message) or :data:`DROP`."""
        if not isinstance(message, dict):
            raise _refuse("a server message must be one JSON-RPC object (batches are refused)")
        _check_case_variants(message, "a server message")
        if any(key not in _MEMBERS and key.casefold() in _MEMBERS for key in message):
            raise _refuse("a server message member spelled in another case (Go clients would read it as the member)")
        if message.get("jsonrpc") != "2.0":
            raise _refuse('a server message needs jsonrpc "2.0"')
        if "method" in message:
            if "result" in message or "error" in message:
                raise _refuse("a JSON-RPC message with a method must not carry result or error")
            return self._request(message)
        if "result" in message and "error" in message:
            raise _refuse("a JSON-RPC response carries result or error, not both")
        if self._listing is None or "error" in message:
            return None
        return self._filtered(message, self._listing)

    def _request(self, message: dict[str, Any]) -> Any:
        method = checked_text(message["method"], "a server message's method", MAX_NAME_CHARS)
        if "id" not in message or self._server_request is None:
            return None  # a notification
        ident = message["id"]
        if isinstance(ident, bool) or not isinstance(ident, (str, int)):
            raise _refuse("a server request's id must be a string or an integer")
        return None if self._server_request(method, ident) else DROP

    def _filtered(self, message: dict[str, Any], listing: Listing) -> Any:
        result = message.get("result")
        if not isinstance(result, dict):
            raise _refuse(f"a {listing.key} list response needs a result object")
        _check_case_variants(result, f"the {listing.key} list result")
        entries = result.get(listing.key)
        if not isinstance(entries, list):
            raise _refuse(f"a {listing.key} list result needs a {listing.key} array")
        allowed = self._allowed or (lambda name: True)
        kept = [entry for entry in entries if allowed(_listed_name(entry, listing))]
        if len(kept) == len(entries):
            return None
        return {**message, "result": {**result, listing.key: kept}}


def _listed_name(entry: Any, listing: Listing) -> str:
    if not isinstance(entry, dict):
        raise _refuse(f"{listing.key} list entries must be objects")
    _check_case_variants(entry, f"a {listing.key} list entry")
    return checked_text(entry.get(listing.name), f"a {listing.key} list entry's {listing.name}")


def _dumps(message: Any) -> str:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))


def filter_json(body: bytes, messages: MessageFilter, strict: bool) -> bytes:
    """A JSON answer, filtered (unchanged bytes if nothing changes). ``strict``: read as the list filter
    must (duplicate keys refused); else with orjson, which like the SDKs keeps the last duplicate."""
    try:
        message = loads_strict(body) if strict else orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _refuse("the server's answer is not valid JSON") from None
    out = messages.message(message)
    if out is DROP:  # a server request in place of the answer: the agent never sees it
        return b""
    return body if out is None else _dumps(out).encode("utf-8")


def filter_tools_list(body: bytes, allowed: Allowed) -> bytes:
    """A tools/list JSON response without the tools the agent may not call (unchanged if none)."""
    return filter_json(body, MessageFilter(LISTINGS["tools/list"], allowed), strict=True)


def _is_data(line: str) -> bool:
    """An SSE data field line ('data: x', 'data:x' or a bare 'data')."""
    return line.startswith("data:") or line == "data"


def _filter_event(event: str, messages: MessageFilter) -> str | None:
    """One SSE event (no trailing blank line) with its message filtered; None: nothing of it is left."""
    lines = event.split("\n")
    data = "\n".join(ln[5:].removeprefix(" ") for ln in lines if _is_data(ln))
    if not data.strip():
        return event  # a comment, a priming event (an id, no data): nothing to read
    out = messages.message(loads_strict(data.encode("utf-8")))
    if out is None:
        return event
    kept = [ln for ln in lines if not _is_data(ln) and not ln.startswith("event:")]
    if out is DROP:
        return "\n".join(kept) if any(ln.startswith("id:") for ln in kept) else None
    return "\n".join([*[ln for ln in lines if not _is_data(ln)], "data: " + _dumps(out)])


def filter_sse(text: str, messages: MessageFilter) -> str:
    """Complete SSE events with every message filtered; line endings come out as LF."""
    events = text.replace("\r\n", "\n").replace("\r", "\n").split("\n\n")
    out = (ev if not ev else _filter_event(ev, messages) for ev in events)
    return "\n\n".join(ev for ev in out if ev is not None)


def filter_tools_list_sse(text: str, allowed: Allowed) -> str:
    """Complete SSE events with the tools/list response filtered."""
    return filter_sse(text, MessageFilter(LISTINGS["tools/list"], allowed))


class SseMessageFilter:
    """Incremental filtering of an SSE body, fed chunk by chunk; an event is bounded in size
    (``max_event_bytes``, counted in characters: larger, refused). Each character is looked at a bounded
    number of times however the body is cut, so a server that sends an endless event in small pieces
    costs linear time, not quadratic."""

    def __init__(self, messages: MessageFilter, max_event_bytes: int = 1 << 20) -> None:
        self._messages = messages
        self._max = max_event_bytes
        self._parts: list[str] = []  # the event begun and not yet ended, line endings made LF
        self._size = 0
        self._ends_lf = False  # it ends in LF: an LF opening the next piece ends the event
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
        self._after_cr = False  # the last chunk ended in CR: an LF opening this one belongs to it

    def feed(self, chunk: bytes) -> bytes:
        """Filtered output for every event completed by this chunk (may be b"")."""
        piece = self._decode(chunk)
        if self._after_cr and piece.startswith("\n"):
            piece = piece[1:]
        if not piece:
            return b""
        self._after_cr = piece.endswith("\r")
        piece = piece.replace("\r\n", "\n").replace("\r", "\n")
        shift = 1 if self._ends_lf else 0
        found = (("\n" if shift else "") + piece).rfind("\n\n")
        if found < 0:
            self._parts.append(piece)
            self._hold(piece, self._size + len(piece))
            return b""
        cut = found - shift  # where the blank line begins in piece; -1: with the LF held
        held = "".join(self._parts)
        done = held + piece[:cut] if cut >= 0 else held[:-1]
        rest = piece[cut + 2:]
        self._parts = [rest] if rest else []
        self._hold(rest, len(rest))
        out = filter_sse(done, self._messages)
        return (out + "\n\n").encode("utf-8") if out else b""

    def close(self) -> bytes:
        """Whatever remains at the end of the stream, filtered."""
        rest = "".join(self._parts) + self._decode(b"", final=True)
        self._parts, self._size = [], 0
        return filter_sse(rest, self._messages).encode("utf-8") if rest else b""

    def _hold(self, last: str, size: int) -> None:
        if size > self._max:
            raise AnswerTooLarge("bad_request", f"mcp: SSE event larger than {self._max} bytes in an MCP answer")
        self._size, self._ends_lf = size, last.endswith("\n")

    def _decode(self, chunk: bytes, final: bool = False) -> str:
        try:
            return str(self._decoder.decode(chunk, final))
        except UnicodeDecodeError:
            raise _refuse("an SSE answer is not valid UTF-8") from None


class SseToolsListFilter(SseMessageFilter):
    """Incremental tools/list filtering of an SSE response body."""

    def __init__(self, allowed: Allowed, max_event_bytes: int = 1 << 20) -> None:
        super().__init__(MessageFilter(LISTINGS["tools/list"], allowed), max_event_bytes)
