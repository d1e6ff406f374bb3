"""The trust-decision line: one ``orjson.dumps`` of what ``Exchange.event`` built, with the same content
as before the event was built pre-bounded (issue 16 item 2)."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import orjson

from sidecar.config_model import AgentMeta
from sidecar.credentials.base import Credential
from sidecar.exchange import AgentInfo, Exchange
from sidecar.observe import decision_log
from sidecar.policy.a2a import A2aCall
from sidecar.policy.llm import LlmCall
from tests.harness import assert_valid

SECRET = "s3cr3t-value-registered"
LONG = "z" * 5000
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
DETAIL = f"upstream said Bearer {SECRET} " + LONG


def cut(text: str, limit: int) -> str:
    """What the schema's maxLength leaves of a long string: its start and how long it was."""
    marker = f"...[truncated from {len(text)} chars]"
    return text[:limit - len(marker)] + marker


def populated() -> tuple[Exchange, AgentInfo]:
    """An exchange with every event field set, request-derived strings too long or carrying secrets."""
    agent = AgentInfo("spiffe://example.org/agent", "billing-agent", "test",
                      AgentMeta(owner="o@example.com", purpose="p", trust_level="internal",
                                data_classes=("pii",), labels=(("team", "payments"),)))
    ex = Exchange("outbound", protocol="a2a", method="POST")
    ex.allow()
    ex.rule_id, ex.policy_version = "r1", "v1"
    ex.audit = {"decision": "deny", "rule_id": "r0", "reason": "rule_denied"}
    ex.caller_id, ex.actor_type, ex.principal = "spiffe://example.org/" + LONG, "human", ("https://iss", LONG)
    ex.delegation, ex.act_chain = "delegated", ("spiffe://example.org/a", LONG)
    ex.task_id, ex.task_trigger = "t" * 100, f"ticket {SECRET}"
    ex.upstream, ex.host, ex.path = "billing", "billing.example.com", "/v1/" + LONG
    ex.mcp_method, ex.mcp_tool, ex.grpc_service, ex.grpc_method = "tools/call", JWT, "pkg.Svc", "Get"
    ex.override = {"method": "DELETE", "path": None}
    ex.copy_source = "/bucket/key"
    ex.a2a = A2aCall(method="SendMessage", id=1, is_notification=False, task_id="task-1")
    ex.llm = LlmCall(endpoint="chat/completions", model="gpt-x", stream=False, max_tokens=5)
    ex.tokens_in, ex.tokens_out = 3, 4
    ex.facts = SimpleNamespace(host="ignored.example", scheme="https", query="a=1&api_key=abc&b=2", size=12)
    ex.credential = Credential("bearer", "key", "cred-1", ("read",), "aud", 1_800_000_000.0, standing=False)
    ex.credential_source, ex.credential_scopes = "cache", ("read", "write")
    ex.approval = {"id": "ap-1", "approver": None, "outcome": "approved", "body_sha256": None}
    ex.reason_detail = DETAIL
    ex.outcome, ex.status, ex.upstream_status, ex.grpc_status = "completed", 200, 200, 0
    ex.trace_id = "1" * 32
    return ex, agent


def expected(ex: Exchange) -> dict[str, object]:
    """Today's event, field by field: what the line carried before it was built pre-bounded."""
    return {
        "event": "trust_decision", "schema_version": 4, "ts": ex.ts, "decision_id": ex.decision_id,
        "direction": "outbound", "protocol": "a2a", "decision": "allow", "reason": "allowed", "rule_id": "r1",
        "policy_version": "v1", "audit": {"decision": "deny", "rule_id": "r0", "reason": "rule_denied"},
        "agent": {"id": "spiffe://example.org/agent", "name": "billing-agent", "environment": "test",
                  "owner": "o@example.com", "purpose": "p", "trust_level": "internal", "data_classes": ["pii"],
                  "labels": {"team": "payments"}},
        "caller": {"id": cut("spiffe://example.org/" + LONG, 2048)},
        "actor_type": "human", "principal": {"iss": "https://iss", "sub": cut(LONG, 1024)}, "delegation": "delegated",
        "act_chain": ["spiffe://example.org/a", cut(LONG, 1024)],
        "task": {"id": cut("t" * 100, 64), "trigger": "ticket <redacted>"},
        "target": {"upstream": "billing", "method": "POST", "host": "billing.example.com",
                   "path": cut("/v1/" + LONG, 2048),
                   "mcp_method": "tools/call", "mcp_tool": "<redacted>", "mcp_resource": None, "mcp_prompt": None,
                   "mcp_server_request": None, "mcp_arguments": None, "grpc_service": "pkg.Svc",
                   "grpc_method": "Get", "a2a_method": "SendMessage", "a2a_task_id": "task-1", "a2a_context_id": None,
                   "a2a_part_kinds": [], "a2a_push_url": None, "llm_model": "gpt-x", "llm_stream": False,
                   "llm_max_tokens": 5, "tokens_in": 3, "tokens_out": 4, "override": {"method": "DELETE", "path": None},
                   "copy_source": "/bucket/key", "scheme": "https", "query": "a=1&api_key=<redacted>&b=2",
                   "size": 12, "headers": None, "header_names": None},
        "credential": {"type": "bearer", "provider": "key", "id": "cred-1", "scopes": ["read", "write"],
                       "audience": "aud", "expires_at": "2027-01-15T08:00:00Z", "source": "cache", "standing": False},
        "approval": {"id": "ap-1", "approver": None, "outcome": "approved", "body_sha256": None},
        "reason_detail": cut(DETAIL.replace(SECRET, "<redacted>"), 1024),
        "outcome": "completed", "status": 200, "upstream_status": 200, "grpc_status": 0,
        "trace_id": "1" * 32,
    }


def written_line(ex: Exchange, agent: AgentInfo, monkeypatch) -> bytes:
    out = io.BytesIO()
    monkeypatch.setattr(decision_log, "WRITER", decision_log.BufferedLineWriter(out))
    monkeypatch.setattr(decision_log.REDACTOR, "_secrets", (SECRET,))
    decision_log.emit_event(ex.event(agent))
    decision_log.WRITER.flush()
    return out.getvalue()


def test_the_line_carries_todays_fields_bounded_and_redacted(monkeypatch):
    """Every field as before, request-derived text redacted and bounded as it was, valid against the schema."""
    ex, agent = populated()
    line = written_line(ex, agent, monkeypatch)
    event = json.loads(line)
    assert event.pop("duration_ms") >= 0
    assert event == expected(ex)
    assert_valid([json.loads(line)])


def test_the_line_is_byte_identical_to_dumping_the_plain_event(monkeypatch):
    """The pre-serialized agent object and the pre-bounded fields make the same bytes as one plain
    ``orjson.dumps`` of the parsed event: key order, spacing and number forms unchanged."""
    ex, agent = populated()
    line = written_line(ex, agent, monkeypatch)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert orjson.dumps(json.loads(line)) + b"\n" == line


def test_a_plain_allowed_request_has_nulls_where_nothing_applies(monkeypatch):
    """The common case: the unset sections are null, the agent object the same one every time."""
    agent = AgentInfo("spiffe://example.org/agent", "a", "test")
    ex = Exchange("outbound", method="GET")
    ex.upstream, ex.host, ex.path = "bench", "127.0.0.1", "/v1/x"
    event = json.loads(written_line(ex, agent, monkeypatch))
    assert event["agent"] == agent.as_dict()
    assert (event["caller"], event["principal"], event["task"], event["credential"], event["act_chain"]) == \
        (None, None, None, None, [])
    assert event["target"]["path"] == "/v1/x" and event["target"]["query"] is None
    assert_valid([event])
