"""The MCP streamable-HTTP transport around its JSON-RPC bodies.

Three things an agent's MCP client needs from the sidecar besides the body checks of
:mod:`sidecar.policy.mcp`:

- **The transport's own requests.** A ``GET`` of the MCP endpoint opens the server-to-client SSE
  stream and a ``DELETE`` ends the session; neither carries a JSON-RPC method, so policy sees them as
  the reserved methods ``rpc.stream`` and ``rpc.session_end`` (:func:`sidecar.policy.mcp.transport_method`),
  which every allow rule with ``mcp:`` passes.
- **Sessions bound to who opened them.** The ``Mcp-Session-Id`` the server answers ``initialize``
  with is bound to the agent and the task (``X-Sidecar-Task``) of that request. A request naming a
  session the sidecar never saw opened (or has forgotten) is refused ``unknown_session`` 404, on which
  the MCP specification has clients start a new session; one opened under another task is refused
  ``session_mismatch``; one whose task has ended, with that task's reason. A session opened outside
  any task is bound to the agent alone. The table is bounded: least recently used first out, and an
  idle session expires.
- **Refusals an agent can live with.** A refused JSON-RPC request (one with an ``id``) is answered
  HTTP 200 with a JSON-RPC error (code per family of reasons, :data:`sidecar.errors.RPC_ERROR_CODES`;
  A2A's refusals are answered the same way, by :func:`rpc_refusal`),
  so the client's session goes on; a refused notification or response is dropped with 202. Refusals
  that concern no one JSON-RPC request (a body that is not JSON-RPC, a session refused) keep their
  HTTP status.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import orjson

from sidecar.errors import RPC_ERROR_CODES, Refusal, RequestRefused, TaskRefused, refusal_headers
from sidecar.http.incoming import Answer, IncomingRequest
from sidecar.policy.mcp import SESSION_END_METHOD, RpcRef, RpcRefused

if TYPE_CHECKING:
    from multidict import CIMultiDictProxy

    from sidecar.exchange import Exchange
    from sidecar.tasks import Task

SESSION_HEADER = "Mcp-Session-Id"
MAX_SESSIONS = 10_000
SESSION_IDLE_TTL = 3600.0  # seconds a session may go unused before it is forgotten
MAX_SESSION_ID_CHARS = 256
_SESSION_ID = re.compile(r"[\x21-\x7e]+")  # visible ASCII, as the MCP specification requires


def session_id(headers: CIMultiDictProxy[str]) -> str | None:
    """The one Mcp-Session-Id a request names, or None; more than one, or a malformed one, is refused."""
    values = headers.getall(SESSION_HEADER, ())
    if not values:
        return None
    if len(values) > 1:
        raise RequestRefused("bad_request", "mcp: more than one Mcp-Session-Id header")
    value = values[0]
    if len(value) > MAX_SESSION_ID_CHARS or _SESSION_ID.fullmatch(value) is None:
        raise RequestRefused("bad_request", f"mcp: Mcp-Session-Id must be 1 to {MAX_SESSION_ID_CHARS} "
                                            "visible ASCII characters")
    return value


@dataclass(slots=True)
class _Binding:
    agent_id: str
    task: Task | None
    last_used: float


class McpSessions:
    """Server-issued session ids per upstream, bound to the agent and task that opened them."""

    def __init__(self, *, max_sessions: int = MAX_SESSIONS, idle_ttl: float = SESSION_IDLE_TTL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._bindings: OrderedDict[tuple[str, str], _Binding] = OrderedDict()  # least recently used first
        self._max = max_sessions
        self._ttl = idle_ttl
        self._clock = clock

    def __len__(self) -> int:
        return len(self._bindings)

    def check(self, upstream: str, sid: str, agent_id: str, task: Task | None) -> None:
        """Refuse a session the sidecar did not see opened, or one opened by another agent or task."""
        key, now = (upstream, sid), self._clock()
        binding = self._bindings.get(key)
        if binding is None or now - binding.last_used > self._ttl:
            self._bindings.pop(key, None)
            raise RequestRefused("unknown_session", "mcp: unknown or expired Mcp-Session-Id; start a new "
                                                    "session with initialize")
        bound = binding.task
        if bound is not None and bound.ended is not None:
            del self._bindings[key]
            raise TaskRefused(bound.ended, "mcp: the session's task has ended")
        if binding.agent_id != agent_id or (bound is not None and (task is None or task.id != bound.id)):
            raise RequestRefused("session_mismatch", "mcp: the session was opened under another task")
        binding.last_used = now
        self._bindings.move_to_end(key)

    def opened(self, upstream: str, sid: str, agent_id: str, task: Task | None) -> None:
        """Bind the session id a server answered initialize with (the least recently used goes if full)."""
        key = (upstream, sid)
        self._bindings.pop(key, None)
        self._bindings[key] = _Binding(agent_id, task, self._clock())
        while len(self._bindings) > self._max:
            self._bindings.popitem(last=False)

    def ended(self, upstream: str, sid: str) -> None:
        self._bindings.pop((upstream, sid), None)

    def answered(self, ex: Exchange, sid: str | None, status: int, response_headers: CIMultiDictProxy[str],
                 agent_id: str, task: Task | None) -> None:
        """Learn from the server's answer: a session opened by initialize, or ended by DELETE."""
        upstream = ex.upstream or ""
        if ex.mcp_method == "initialize" and status == 200:
            issued = response_headers.get(SESSION_HEADER)
            if issued is not None and len(issued) <= MAX_SESSION_ID_CHARS and _SESSION_ID.fullmatch(issued):
                self.opened(upstream, issued, agent_id, task)
        elif ex.mcp_method == SESSION_END_METHOD and sid is not None and 200 <= status < 300:
            self.ended(upstream, sid)


# --- refusals as JSON-RPC --------------------------------------------------------------------

def rpc_refusal(request: IncomingRequest, ex: Exchange, refusal: Refusal) -> Answer | None:
    """The JSON-RPC answer to a refused MCP or A2A message, or None where HTTP's own refusal stands."""
    ref = refusal.rpc if isinstance(refusal, RpcRefused) else ex.rpc
    if ref is None:
        return None
    headers = refusal_headers(refusal)
    if not ref.expects_reply:  # a notification, or the agent's answer to a server request: nothing to answer
        ex.status = 202
        return request.respond(202, None, headers, None)
    headers["Content-Type"] = "application/json"
    ex.status = 200
    error = rpc_error(ref, refusal, ex.rule_id, ex.decision_id, ex.protocol)
    return request.respond(200, None, headers, orjson.dumps(error))


def rpc_error(ref: RpcRef, refusal: Refusal, rule_id: str | None, decision_id: str,
              protocol: str = "mcp") -> dict[str, object]:
    """A JSON-RPC 2.0 error response: the family's code, the sidecar's message, and why in ``data``."""
    other, codes = RPC_ERROR_CODES[protocol]
    return {"jsonrpc": "2.0", "id": ref.id, "error": {
        "code": codes.get(refusal.reason, other),
        "message": f"{refusal.message} (reason: {refusal.reason})",
        "data": {"reason": refusal.reason, "rule_id": rule_id, "decision_id": decision_id}}}
