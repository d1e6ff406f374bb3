"""``require_approval``: hold a request until a human approver decides, or time runs out.

The held request waits (``policy.approval_timeout``); ``GET /approvals`` lists it and
``POST /approvals/{id}`` decides it (both in ``sidecar.admin``). The listing shows what the approver is asked to let through:
an MCP ``tools/call``'s arguments (values under secret-looking keys masked, other strings redacted,
the whole capped at :data:`ARGUMENTS_MAX` characters with a marker) and the SHA-256 of the exact
body that is forwarded if they approve (the pipeline buffers a held outbound request's body first;
the bytes hashed are the bytes sent). The digest is also in the event's ``approval`` record.

The approver proves who they are with an ``X-Approver-Token`` JWT from a configured inbound
issuer, of actor type human, with ``aud`` = ``admin.approval_audience``, whose issuer and subject
match an ``admin.approvers`` entry.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from sidecar.errors import PolicyRefused
from sidecar.observe.decision_log import EVENT_BOUNDS, REDACTED, Redactor, bounded, clean

if TYPE_CHECKING:
    from sidecar.exchange import Exchange

log = structlog.get_logger("sidecar.approvals")
MAX_PENDING = 1000
ARGUMENTS_MAX = 4096  # characters of a tools/call's arguments shown to an approver
# Argument names whose values are masked whatever they hold (compared lowercase, without - and _).
_SECRET_KEY = re.compile(r"password|passwd|passphrase|secret|token|apikey|accesskey|privatekey|credential|"
                         r"authorization|cookie|session|signature|^auth$")


@dataclass
class Pending:
    id: str
    summary: dict[str, Any]
    expires_at: float
    future: asyncio.Future[tuple[bool, dict[str, str]]] = field(repr=False)


class Approvals:
    def __init__(self, metrics: Any, timeout: float, redactor: Redactor | None = None) -> None:
        self._metrics = metrics
        self._timeout = timeout
        self._redactor = redactor or Redactor()  # the sidecar's own: its secrets are masked in what approvers see
        self._pending: dict[str, Pending] = {}

    async def hold(self, ex: Exchange, body: bytes | None = None) -> dict[str, Any]:
        """Wait for a decision on the request and ``body`` (the bytes forwarded if it is approved);
        returns the event's approval record or raises the refusal.

        At most MAX_PENDING requests wait at once: beyond that, new ones are refused at once (an
        agent flooding approvers gets ``rate_limited``, and memory stays bounded)."""
        if len(self._pending) >= MAX_PENDING:
            raise PolicyRefused("rate_limited", "policy: too many requests are waiting for approval",
                                rule_id=ex.rule_id, retry_after=int(self._timeout))
        digest = hashlib.sha256(body).hexdigest() if body is not None else None
        pending = Pending(secrets.token_hex(12), {**_summary(ex, self._redactor), "body_sha256": digest},
                          time.time() + self._timeout, asyncio.get_running_loop().create_future())
        self._pending[pending.id] = pending
        self._metrics.approvals_pending.set(len(self._pending))
        log.info("approval_requested", approval_id=pending.id, **pending.summary)
        try:
            # not wait_for: on 3.11 a request cut (revoked, client gone) in the step an approver approves it
            # would lose the cancellation and be forwarded (CPython gh-86296)
            async with asyncio.timeout(self._timeout):
                approved, approver = await asyncio.shield(pending.future)
        except TimeoutError:
            ex.approval = {"id": pending.id, "approver": None, "outcome": "timeout", "body_sha256": digest}
            raise PolicyRefused("approval_timeout", "policy: no approver decided within the approval timeout",
                                rule_id=ex.rule_id) from None
        finally:
            self._pending.pop(pending.id, None)
            self._metrics.approvals_pending.set(len(self._pending))
        ex.approval = {"id": pending.id, "approver": approver, "outcome": "approved" if approved else "denied",
                       "body_sha256": digest}
        if not approved:
            raise PolicyRefused("approval_denied", "policy: an approver denied this request", rule_id=ex.rule_id)
        return ex.approval

    def decide(self, approval_id: str, approve: bool, approver: dict[str, str]) -> bool:
        pending = self._pending.get(approval_id)
        if pending is None or pending.future.done():
            return False
        pending.future.set_result((approve, approver))
        log.info("approval_decided", approval_id=approval_id, approve=approve, approver=approver)
        return True

    def list(self) -> list[dict[str, Any]]:
        return [{"id": p.id, "expires_at": p.expires_at, **p.summary} for p in self._pending.values()]


def _summary(ex: Exchange, redactor: Redactor) -> dict[str, Any]:
    """What an approver needs to tell one request from another (query included, secrets masked, the
    strings the agent chose bounded as in the trust-decision event)."""
    facts = ex.facts
    target, task = EVENT_BOUNDS["target"], EVENT_BOUNDS["task"]

    def cut(value: str | None, limit: int) -> str | None:
        return clean(value, limit, redactor) if value else None

    return {"direction": ex.direction, "rule_id": ex.rule_id, "upstream": ex.upstream,
            "host": cut(ex.host, target["host"]), "method": cut(ex.method, target["method"]),
            "path": clean(ex.path or "", target["path"], redactor),
            "query": cut(facts.query if facts is not None else None, target["path"]),
            "body_size": facts.size if facts is not None else None, "caller": ex.caller_id,
            "mcp_method": cut(ex.mcp_method, target["mcp_method"]),
            "mcp_tool": cut(ex.mcp_tool, target["mcp_tool"]), "task_id": cut(ex.task_id, task["id"]),
            "copy_source": cut(ex.copy_source, target["copy_source"]),
            "task_trigger": cut(ex.task_trigger, task["trigger"]),
            "principal": list(ex.principal) if ex.principal else None,
            **_arguments(ex.mcp_arguments, redactor)}


def _arguments(arguments: dict[str, Any] | None, redactor: Redactor) -> dict[str, Any]:
    """tools/call arguments as an approver reads them: compact JSON, secrets masked, capped with a marker."""
    if arguments is None:
        return {"mcp_arguments": None, "mcp_arguments_truncated": False}
    text = json.dumps(_masked(arguments, redactor), ensure_ascii=False, separators=(",", ":"))
    shown = bounded(text, ARGUMENTS_MAX)
    return {"mcp_arguments": shown, "mcp_arguments_truncated": shown is not text}


def _masked(value: Any, redactor: Redactor) -> Any:
    """The value with secret-looking keys' values masked and every string redacted."""
    if isinstance(value, dict):
        return {key: REDACTED if _secret_key(key) else _masked(item, redactor) for key, item in value.items()}
    if isinstance(value, list):
        return [_masked(item, redactor) for item in value]
    return redactor.text(value) if isinstance(value, str) else value


def _secret_key(key: str) -> bool:
    return _SECRET_KEY.search(key.lower().replace("-", "").replace("_", "")) is not None

