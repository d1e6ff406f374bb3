"""The MCP server's own requests to the agent (sampling, elicitation, roots), met in its answers and its stream.

Each is decided by policy as it passes (:meth:`~sidecar.policy.engine.PolicySet.weigh`: no rate limit
charged, never held for an approval) on the facts of the request whose answer carries it, with
``mcp.method`` ``rpc.server_request`` and ``mcp.server_request`` its method. Every allow rule with
``mcp:`` passes ``ping``, ``roots/list`` and ``elicitation/create``; ``sampling/createMessage`` (the
server spending the agent's model) and anything else only when a rule lists it in ``mcp.server_requests``.

An allowed request reaches the agent as sent. A refused one is taken out of the stream
(:mod:`sidecar.mcp_filter`) and answered to the server as the agent would answer it: a JSON-RPC error
(the refusal's reason, rule and decision id in ``data``) POSTed to the endpoint in the same session, with
the upstream's credential. Each gets its own trust-decision event: ``status`` null (nothing went to the
agent), ``upstream_status`` the server's answer to the error. The answers leave the relay's path, at most
:data:`MAX_PENDING` at once; past that a request is refused unanswered (the event says so) and the
server's own timeout ends it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import orjson
from multidict import CIMultiDict

from sidecar.credentials.base import Credential, OutboundRequest
from sidecar.errors import PolicyRefused, Refusal
from sidecar.exchange import Exchange
from sidecar.forward.transport import Transport, open_upstream
from sidecar.http.headers import VIA
from sidecar.mcp_transport import SESSION_HEADER, rpc_error
from sidecar.policy.facts import Facts, McpDetail
from sidecar.policy.mcp import SERVER_REQUEST_METHOD, RpcRef
from sidecar.policy.mcp_responses import ServerRequest

if TYPE_CHECKING:
    from sidecar.policy.engine import Decision
    from sidecar.runtime import Runtime

MAX_PENDING = 64
CredentialFor = Callable[[Exchange], Awaitable[Credential | None]]  # the carrier's credential, for the answer
_COPIED = (SESSION_HEADER, "MCP-Protocol-Version")  # what places the answer in the server's session


class ServerRequests:
    """Decides the server requests of one sidecar's MCP exchanges; answers the refused ones."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._pending: set[asyncio.Task[None]] = set()

    def gate(self, ex: Exchange, out: OutboundRequest, transport: Transport,
             credential: CredentialFor) -> ServerRequest:
        """The decision function for the server requests in the answer to ``ex`` (sent as ``out``)."""

        def decide(method: str, ident: str | int) -> bool:
            facts = replace(ex.facts, mcp_method=SERVER_REQUEST_METHOD, mcp_tool=None,
                            mcp=McpDetail(server_request=method))
            decision = self.rt.policy.weigh(facts)
            sub = _server_exchange(ex, facts, decision)
            if decision.effect == "allow":
                sub.allow()
                sub.outcome = "completed"
                self.rt.recorder.record(sub)
                return True
            refusal = _refusal(decision, method)
            sub.refuse(refusal)
            sub.status = None
            self._answer(sub, out, transport, credential, orjson.dumps(
                rpc_error(RpcRef(ident, True), refusal, decision.rule_id, sub.decision_id)))
            return False

        return decide

    def _answer(self, sub: Exchange, out: OutboundRequest, transport: Transport, credential: CredentialFor,
                body: bytes) -> None:
        if len(self._pending) >= MAX_PENDING:
            sub.reason_detail = f"mcp: not answered to the server ({MAX_PENDING} answers already pending)"
            self.rt.recorder.record(sub)
            return
        task = asyncio.ensure_future(self._send(sub, out, transport, credential, body))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _send(self, sub: Exchange, out: OutboundRequest, transport: Transport, credential: CredentialFor,
                    body: bytes) -> None:
        try:
            answer = _answer_request(out, body)
            attached = await credential(sub)
            if attached is not None:
                self.rt.providers[attached.provider].apply(answer, attached)
            target = f"{answer.path}?{answer.query}" if answer.query else answer.path
            upstream = await open_upstream(transport, "POST", target, answer.headers, body)
            try:
                sub.upstream_status = upstream.status
                await upstream.read()
            finally:
                upstream.release()
        except Refusal as refusal:
            sub.reason_detail = f"mcp: the refusal could not be answered to the server ({refusal.reason})"
        except Exception as exc:  # answering is best effort; the request stays refused either way
            sub.reason_detail = f"mcp: the refusal could not be answered to the server ({type(exc).__name__})"
        finally:
            self.rt.recorder.record(sub)


def _refusal(decision: Decision, method: str) -> PolicyRefused:
    if decision.effect == "require_approval":
        return PolicyRefused("rule_denied", f"policy: the server's {method} needs an approval (rule "
                                            f"{decision.rule_id}); a server request is never held for one",
                             rule_id=decision.rule_id)
    about = "denied by rule " + decision.rule_id if decision.reason == "rule_denied" else \
        "no rule allows it (default deny)" if decision.reason == "no_matching_rule" else decision.reason
    return PolicyRefused(decision.reason, f"policy: the server's {method} request to the agent is refused: {about}",
                         rule_id=decision.rule_id)


def _server_exchange(ex: Exchange, facts: Facts, decision: Decision) -> Exchange:
    """The event's exchange: the carrier's target and task, the server request's decision."""
    sub = Exchange("outbound", protocol="mcp", method=ex.method)
    sub.upstream, sub.host, sub.path, sub.trace_id = ex.upstream, ex.host, ex.path, ex.trace_id
    sub.task_id, sub.task_trigger, sub.principal, sub.actor_type = ex.task_id, ex.task_trigger, ex.principal, \
        ex.actor_type
    sub.delegation, sub.act_chain = ex.delegation, ex.act_chain
    sub.mcp_method, sub.facts = SERVER_REQUEST_METHOD, facts
    sub.mcp_detail = facts.mcp
    sub.rule_id, sub.policy_version = decision.rule_id, decision.policy_version
    sub.kept, sub.server_request = True, True
    return sub


def _answer_request(out: OutboundRequest, body: bytes) -> OutboundRequest:
    """The agent's answer as the server expects it: to the endpoint, in the session the request came in."""
    headers = CIMultiDict({"Host": out.headers["Host"], "Via": VIA, "Content-Type": "application/json",
                           "Accept": "application/json, text/event-stream"})
    for name in _COPIED:
        value = out.headers.get(name)
        if value is not None:
            headers[name] = value
    return OutboundRequest("POST", out.scheme, out.host, out.port, out.path, out.query, headers, body,
                           out.client_cert_sha256, out.pass_headers)
