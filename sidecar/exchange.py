"""The request context: what each pipeline stage learned about one exchange.

Stages fill an :class:`Exchange` in turn (identify -> authorize -> credential -> forward);
:meth:`Exchange.event` shapes the one canonical trust-decision event from it, with every
field of PRODUCT.md present (null where it does not apply), emitted once at the end.
:class:`ActiveExchanges` is the register of those in flight, so that a revocation (or the end of
the drain) can cut the ones it names.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import orjson

from sidecar.config_model import AgentMeta
from sidecar.credentials.base import Credential
from sidecar.errors import Refusal
from sidecar.observe.decision_log import (
    ACT_CHAIN_ITEM_MAX, CLOCK, EVENT_BOUNDS, REASON_DETAIL_MAX, Redactor, clean, logged_arguments, redact_query,
)

if TYPE_CHECKING:
    from sidecar.policy.a2a import A2aCall
    from sidecar.policy.facts import McpDetail
    from sidecar.policy.llm import LlmCall
    from sidecar.policy.model import Budget
    from sidecar.policy.mcp import RpcRef

EVENT_VERSION = 4  # 2: agent metadata; target.scheme, query, size (replay re-decides from them); 3: gRPC, A2A fields;
# 4: target.headers and header_names (observe/headers.py); a2a_context_id, a2a_part_kinds, a2a_push_url, llm_stream,
# llm_max_tokens (replay and report decide A2A and LLM rules again from them); target.mcp_resource, mcp_prompt,
# mcp_server_request, mcp_arguments
A2A_PART_KINDS_MAX = 64  # a message with more parts records null: its kinds are not recorded


def new_id() -> str:
    """A unique decision id (not a secret: a fast PRNG is enough)."""
    return random.getrandbits(96).to_bytes(12, "big").hex()  # not f"{:024x}": a third of its cost


@dataclass(frozen=True, slots=True)
class AgentInfo:
    id: str
    name: str
    environment: str
    meta: AgentMeta = AgentMeta()
    _dict: dict[str, Any] = field(init=False, repr=False, compare=False)
    _json: orjson.Fragment = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        m = self.meta
        object.__setattr__(self, "_dict", {
            "id": self.id, "name": self.name, "environment": self.environment, "owner": m.owner,
            "purpose": m.purpose, "trust_level": m.trust_level, "data_classes": list(m.data_classes),
            "labels": dict(m.labels)})
        object.__setattr__(self, "_json", orjson.Fragment(orjson.dumps(self._dict)))

    def as_dict(self) -> dict[str, Any]:
        """The event's and the inventory's ``agent`` object (built once: nothing writes into it)."""
        return self._dict

    def as_json(self) -> orjson.Fragment:
        """The same object serialized once, for the trust-decision line (``orjson`` copies it in as is)."""
        return self._json


class Exchange:
    """One exchange's facts, filled in by the stages; unset fields read their class default.

    A plain class rather than a dataclass: creating one per request sets four attributes,
    not the thirty-five a generated ``__init__`` would.
    """

    protocol: str = "http"
    decision: str = "deny"
    reason: str = "internal_error"
    rule_id: str | None = None
    policy_version: str | None = None
    audit: dict[str, Any] | None = None
    caller_id: str | None = None
    actor_type: str | None = None  # the event says "workload" unless a human's token or task drives it
    principal: tuple[str, str] | None = None
    delegation: str = "none"
    act_chain: tuple[str, ...] = ()
    task_id: str | None = None
    task_trigger: str | None = None
    upstream: str | None = None
    method: str | None = None
    host: str | None = None
    path: str | None = None
    mcp_method: str | None = None
    mcp_tool: str | None = None
    grpc_service: str | None = None  # a gRPC call's (protocol grpc): from its :path
    grpc_method: str | None = None
    grpc_status: int | None = None  # the call's grpc-status: the upstream's trailers, or our refusal's
    override: dict[str, str | None] | None = None  # a passed method/URL override: the other reading decided
    copy_source: str | None = None  # the object an S3 copy reads (x-amz-copy-source), canonical
    credential: Credential | None = None
    credential_source: str | None = None
    credential_scopes: tuple[str, ...] | None = None
    approval: dict[str, Any] | None = None
    reason_detail: str | None = None
    outcome: str = "refused"
    status: int | None = None
    upstream_status: int | None = None
    trace_id: str | None = None
    facts: Any = None  # the policy facts, kept for response filtering; not part of the event
    mcp_arguments: dict[str, Any] | None = None  # tools/call arguments, shown to approvers
    mcp_detail: McpDetail | None = None  # the resource, prompt, arguments or server request policy saw
    rpc: RpcRef | None = None  # the MCP or A2A message's id, to answer a refusal in JSON-RPC; not part of the event
    a2a: A2aCall | None = None  # the parsed A2A call: its method and task id are part of the event
    llm: LlmCall | None = None  # the parsed LLM API call: its model is part of the event
    tokens_in: int | None = None  # the usage the LLM API reported
    tokens_out: int | None = None
    budget: tuple[Hashable, Budget] | None = None  # the key and budget its usage is charged to; not in the event
    server_request: bool = False  # the MCP server's request to the agent: refused, nothing is sent to the agent
    kept: bool = False  # let in with room in the log: its event is never dropped (logging.on_backpressure)

    def __init__(self, direction: str, *, protocol: str = "http", method: str | None = None) -> None:
        self.direction = direction
        self.started = time.perf_counter()
        self.ts = CLOCK.now()
        self.decision_id = new_id()
        if protocol != "http":
            self.protocol = protocol
        if method is not None:
            self.method = method

    def allow(self, reason: str = "allowed") -> None:
        self.decision, self.reason = "allow", reason

    def refuse(self, refusal: Refusal) -> None:
        self.decision = "approval_required" if refusal.reason == "approval_timeout" else "deny"
        self.reason = refusal.reason
        self.outcome = "refused"
        self.status = refusal.status
        if refusal.rule_id is not None:
            self.rule_id = refusal.rule_id
        if refusal.detail:
            self.reason_detail = refusal.detail

    def event(self, agent: AgentInfo, headers: tuple[dict[str, list[str]], list[str] | None] | None = None,
              redactor: Redactor | None = None) -> dict[str, Any]:
        """The trust-decision event, ready for one ``orjson.dumps``: request-derived text already
        redacted (by the sidecar's own ``redactor``; default the process-wide net) and bounded
        (``EVENT_BOUNDS``), the agent object already serialized; ``headers``: the recorded header values
        and names policy saw (observe/headers.py)."""
        clip = _clipper(redactor)
        return {
            "event": "trust_decision",
            "schema_version": EVENT_VERSION,
            "ts": self.ts,
            "decision_id": self.decision_id,
            "direction": self.direction,
            "protocol": self.protocol,
            "decision": self.decision,
            "reason": self.reason,
            "rule_id": self.rule_id,
            "policy_version": self.policy_version,
            "audit": self.audit,
            "agent": agent.as_json(),
            "caller": {"id": clip(self.caller_id, _CALLER["id"])} if self.caller_id else None,
            "actor_type": self.actor_type or "workload",
            "principal": self._principal(clip),
            "delegation": self.delegation,
            "act_chain": [clip(actor, ACT_CHAIN_ITEM_MAX) for actor in self.act_chain],
            "task": self._task(clip),
            "target": self._target(clip, headers),
            "credential": self._credential(),
            "approval": self.approval,
            "reason_detail": clip(self.reason_detail, REASON_DETAIL_MAX),
            "outcome": self.outcome,
            "status": self.status,
            "upstream_status": self.upstream_status,
            "grpc_status": self.grpc_status,
            "duration_ms": round((time.perf_counter() - self.started) * 1000, 3),
            "trace_id": self.trace_id,
        }

    def _principal(self, clip: Clip) -> dict[str, Any] | None:
        if not self.principal:
            return None
        iss, sub = self.principal
        return {"iss": clip(iss, _PRINCIPAL["iss"]), "sub": clip(sub, _PRINCIPAL["sub"])}

    def _task(self, clip: Clip) -> dict[str, Any] | None:
        if not self.task_id:
            return None
        return {"id": clip(self.task_id, _TASK["id"]), "trigger": clip(self.task_trigger, _TASK["trigger"])}

    def _target(self, clip: Clip,
                headers: tuple[dict[str, list[str]], list[str] | None] | None) -> dict[str, Any] | None:
        if self.method is None:
            return None
        facts, t = self.facts, _TARGET
        values, names = headers if headers is not None else (None, None)
        query = facts.query if facts else None
        return {"upstream": self.upstream, "method": clip(self.method, t["method"]),
                "host": clip(self.host or (facts and facts.host) or None, t["host"]),
                "path": clip(self.path, t["path"]), "mcp_method": clip(self.mcp_method, t["mcp_method"]),
                "mcp_tool": clip(self.mcp_tool, t["mcp_tool"]), **self._mcp(clip),
                "grpc_service": clip(self.grpc_service, t["grpc_service"]),
                "grpc_method": clip(self.grpc_method, t["grpc_method"]),
                **_a2a_fields(self.a2a, clip), **_llm_fields(self.llm, clip),
                "tokens_in": self.tokens_in, "tokens_out": self.tokens_out, "override": self.override,
                "copy_source": clip(self.copy_source, t["copy_source"]),
                "scheme": facts.scheme if facts else None,
                "query": clip(redact_query(query), t["query"]) if query else query,
                "size": facts.size if facts else None, "headers": values, "header_names": names}

    def _mcp(self, clip: Clip) -> dict[str, Any]:
        """What an MCP request named besides its method and tool (the arguments masked as logged)."""
        d, t = self.mcp_detail, _TARGET
        if d is None:
            return _NO_MCP_DETAIL
        return {"mcp_resource": clip(d.resource, t["mcp_resource"]), "mcp_prompt": clip(d.prompt, t["mcp_prompt"]),
                "mcp_server_request": clip(d.server_request, t["mcp_server_request"]),
                "mcp_arguments": logged_arguments(dict(d.arguments)) if d.arguments is not None else None}

    def _credential(self) -> dict[str, Any] | None:
        c = self.credential
        if c is None:
            return None
        return {"type": c.type, "provider": c.provider, "id": c.id,
                "scopes": list(self.credential_scopes if self.credential_scopes is not None else c.scopes),
                "audience": c.audience, "expires_at": _rfc3339(c.expires_at), "source": self.credential_source,
                "standing": c.standing}


def _a2a_fields(call: A2aCall | None, clip: Clip) -> dict[str, Any]:
    if call is None:
        return {"a2a_method": None, "a2a_task_id": None, "a2a_context_id": None, "a2a_part_kinds": None,
                "a2a_push_url": None}
    t = _TARGET
    kinds = list(call.part_kinds) if len(call.part_kinds) <= A2A_PART_KINDS_MAX else None
    push = call.push_url
    if push and "?" in push:
        base, _, query = push.partition("?")  # a webhook's token in its query
        push = f"{base}?{redact_query(query)}"
    return {"a2a_method": clip(call.method, t["a2a_method"]), "a2a_task_id": clip(call.task_id, t["a2a_task_id"]),
            "a2a_context_id": clip(call.context_id, t["a2a_context_id"]), "a2a_part_kinds": kinds,
            "a2a_push_url": clip(push, t["a2a_push_url"])}


def _llm_fields(call: LlmCall | None, clip: Clip) -> dict[str, Any]:
    if call is None:
        return {"llm_model": None, "llm_stream": None, "llm_max_tokens": None}
    return {"llm_model": clip(call.model, _TARGET["llm_model"]), "llm_stream": call.stream,
            "llm_max_tokens": call.max_tokens}


_NO_MCP_DETAIL: dict[str, Any] = {"mcp_resource": None, "mcp_prompt": None, "mcp_server_request": None,
                                  "mcp_arguments": None}
_TARGET, _TASK, _CALLER, _PRINCIPAL = (EVENT_BOUNDS[k] for k in ("target", "task", "caller", "principal"))
Clip = Callable[[str | None, int], str | None]


def _clipper(redactor: Redactor | None) -> Clip:
    """Request-derived text as the event carries it: redacted and bounded (empty and None as they are)."""
    def clip(text: str | None, limit: int) -> str | None:
        return clean(text, limit, redactor) if text else text
    return clip


def _rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def mark_cut(ex: Exchange) -> None:
    """A cancelled exchange: cut by a revocation (already marked) or by the client going away.

    One already completed stays so: a WebSocket closed normally whose client then went away before
    the closing handshake had finished on the other side."""
    if ex.outcome not in ("cut", "completed"):
        ex.outcome, ex.reason_detail = "cut", "client gone"


class ActiveExchanges:
    """Exchanges in flight, so that a revocation can cut the ones it names.

    Bound to the loop that serves the exchanges: ``asyncio.current_task(loop)`` is a dictionary
    lookup, where ``asyncio.current_task()`` first finds the running loop (a ``getpid`` system call
    per request, 1.8 % of a saturated sidecar's time, issue 16)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop  # the loop its exchanges are served on
        self._active: dict[int, tuple[Exchange, asyncio.Task[Any]]] = {}

    def track(self, ex: Exchange) -> None:
        """Register ``ex`` with the task that serves it (the caller's, on the bound loop)."""
        task = asyncio.current_task(self.loop)
        assert task is not None, "exchanges: tracked outside a task of the loop they are bound to"
        self._active[id(ex)] = (ex, task)

    def untrack(self, ex: Exchange) -> None:
        self._active.pop(id(ex), None)

    def cut(self, predicate: Callable[[Exchange], bool], why: str) -> int:
        victims = [(ex, task) for ex, task in self._active.values() if predicate(ex)]
        for ex, task in victims:
            ex.outcome, ex.reason_detail = "cut", why
            task.cancel()
        return len(victims)

    def __len__(self) -> int:
        return len(self._active)
