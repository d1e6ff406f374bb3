"""Evidence: every trust-decision event matches the schema, metrics pass promtool, secrets leak nowhere."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess

import aiohttp
import pytest

from tests.harness import SCHEMA, admin, assert_valid, raw_http
from tests.scenarios.outbound import POLICY, SECRET, config_for

async def exercise(h, upstream) -> None:
    """One of each kind of decision this sidecar can make so far."""
    async with aiohttp.ClientSession() as s:
        for path, headers in (("/billing/v1/ok", {}), ("/nowhere/x", {}), ("/billing/v1/admin/x", {}),
                              ("/billing/v2/x", {}), ("/billing/v1/x", {"Origin": "https://x"}),
                              ("/billing/v1/x", {"X-Sidecar-Task": "0" * 32}), ("/billing/v1/a%2Fb", {})):
            async with s.get(f"{h.outbound}{path}", headers=headers) as r:
                await r.read()
        async with s.get(f"{h.outbound}/billing/v1/x", headers={"Host": "rebind.example"}) as r:
            await r.read()
    status, task = await admin(h, "POST", "/tasks", json={"principal": "alice@example.com", "trigger": "support"})
    assert status == 201
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{h.outbound}/billing/v1/task-bound", headers={"X-Sidecar-Task": task["id"]}) as r:
            assert r.status == 200
    await raw_http(h.port("outbound"), b"GET / HTTP/1.1\r\nHost: x\r\nBad\x01Header: 1\r\n\r\n")


async def test_every_event_matches_the_schema(make_sidecar, upstream):
    """Allows, each refusal so far, a task-bound call and a parser rejection all validate against the schema."""
    h = await make_sidecar(config_for(upstream), POLICY)
    await exercise(h, upstream)
    events = await h.settle()
    assert_valid(events)
    reasons = {e["reason"] for e in events}
    assert {"allowed", "unknown_upstream", "rule_denied", "no_matching_rule", "browser_origin", "unknown_task",
            "bad_request", "host_mismatch"} <= reasons
    bound = next(e for e in events if e["target"] and e["target"]["path"] == "/v1/task-bound")
    assert bound["task"]["trigger"] == "support" and bound["delegation"] == "asserted"
    assert bound["trace_id"] and len({e["decision_id"] for e in events}) == len(events)


async def test_traceparent_is_propagated_with_a_new_span(make_sidecar, upstream):
    """An incoming W3C trace id is kept upstream and logged; the span id is our own."""
    h = await make_sidecar(config_for(upstream), POLICY)
    incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{h.outbound}/billing/v1/x", headers={"traceparent": incoming}) as r:
            assert r.status == 200
    sent = upstream.seen[-1].header("traceparent")
    assert sent.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-") and sent != incoming
    assert (await h.settle())[-1]["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.mark.skipif(shutil.which("promtool") is None and os.environ.get("CI") != "true",
                    reason="promtool not installed (apt-get install prometheus)")
async def test_metrics_pass_promtool(make_sidecar, upstream):
    """The /metrics exposition after real traffic is clean under promtool check metrics."""
    h = await make_sidecar(config_for(upstream), POLICY)
    await exercise(h, upstream)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{h.port('metrics')}/metrics") as r:
            text = await r.text()
    for name in ("sidecar_requests_total", "sidecar_policy_decisions_total", "sidecar_standing_credentials",
                 "sidecar_active_tasks", "sidecar_revocation_bus_up", "sidecar_request_duration_seconds_bucket"):
        assert name in text
    assert 'sidecar_requests_total{decision="deny",direction="outbound",upstream="_unknown"}' in text
    result = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


async def test_secrets_appear_in_no_log_line_or_metric(make_sidecar, upstream):
    """Canary values in config, tokens, headers and error paths never reach logs, metrics or responses."""
    canaries = [SECRET, "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjYW5hcnkifQ.c2lnbmF0dXJlLWNhbmFyeQ", "cookie-canary-5521"]
    h = await make_sidecar(config_for(upstream), POLICY)
    async with aiohttp.ClientSession() as s:
        for headers in ({"Authorization": f"Bearer {canaries[1]}"}, {"Cookie": f"s={canaries[2]}"},
                        {"Authorization": f"Bearer {canaries[1]}", "Origin": "x"}):
            async with s.get(f"{h.outbound}/billing/v1/x", headers=headers) as r:
                body = await r.read()
                assert all(c.encode() not in body for c in canaries)
    # a malformed Authorization header that aiohttp's parser itself rejects
    await raw_http(h.port("outbound"), b"GET /billing/v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                   + canaries[1].encode() + b"\x7f\x00\r\n\r\n")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{h.port('metrics')}/metrics") as r:
            metrics = await r.read()
    _, inventory = await admin(h, "GET", "/inventory")
    exposed = h.raw_log() + metrics + json.dumps(inventory).encode() + repr(h.sidecar.config).encode()
    for canary in canaries:
        assert canary.encode() not in exposed, canary
    assert upstream.seen[0].header("X-API-Key") == SECRET  # it did reach the upstream, where it belongs


async def test_credential_shaped_text_in_a_request_is_redacted_in_the_trust_decision_event(make_sidecar, upstream):
    """A JWT (or a configured secret) in the request path is masked in the trust-decision event as in every
    other log line (security review 1, finding F5)."""
    token = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz"
    h = await make_sidecar(config_for(upstream), POLICY)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{h.outbound}/billing/v1/session/{token}") as r:
            assert r.status == 200
        async with s.get(f"{h.outbound}/billing/v1/admin/{SECRET}") as r:
            assert r.status == 403 and SECRET not in await r.text()
    await h.settle()
    log = h.raw_log()
    assert token.encode() not in log and SECRET.encode() not in log


POLICY_KINDS = {"version": 1, "default": "deny", "rules": [
    {"id": "shadow-deny-v1", "direction": "outbound", "upstream": "billing", "paths": ["/v1/**"], "effect": "deny",
     "mode": "audit"},
    {"id": "v1", "direction": "outbound", "upstream": "billing", "paths": ["/v1/**"], "effect": "allow"},
    {"id": "limited", "direction": "outbound", "upstream": "billing", "paths": ["/limited"], "effect": "allow",
     "rate_limit": {"requests": 1, "per": "1m"}},
    {"id": "needs-a-task", "direction": "outbound", "upstream": "billing", "paths": ["/conditional"],
     "when": {"expr": 'task.trigger == "support"'}, "effect": "allow"},
    {"id": "ask-a-human", "direction": "outbound", "upstream": "billing", "paths": ["/approve"],
     "effect": "require_approval"},
]}


async def test_audit_rate_limit_condition_error_and_approval_events_match_the_schema(make_sidecar, upstream):
    """Shadow rules, 429s with Retry-After, condition errors and approval timeouts are each one valid event."""
    config = config_for(upstream)
    config["policy"] = {"approval_timeout": "200ms"}
    h = await make_sidecar(config, POLICY_KINDS)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{h.outbound}/billing/v1/x") as r:
            assert r.status == 200
        for expected in (200, 429):
            async with s.get(f"{h.outbound}/billing/limited") as r:
                assert r.status == expected
        assert int(r.headers["Retry-After"]) >= 1
        async with s.get(f"{h.outbound}/billing/conditional") as r:  # task is null: the condition cannot be evaluated
            assert (r.status, (await r.json())["error"]) == (403, "condition_error")
        async with s.get(f"{h.outbound}/billing/approve") as r:
            assert (r.status, (await r.json())["error"]) == (403, "approval_timeout")
    events = await h.settle()
    assert_valid(events)
    by_reason = {e["reason"]: e for e in events}
    assert events[0]["audit"] == {"decision": "deny", "rule_id": "shadow-deny-v1", "reason": "rule_denied"}
    assert events[0]["decision"] == "allow"
    assert by_reason["rate_limited"]["status"] == 429 and by_reason["rate_limited"]["rule_id"] == "limited"
    assert by_reason["condition_error"]["rule_id"] == "needs-a-task"
    assert by_reason["approval_timeout"]["decision"] == "approval_required"


async def test_a_huge_mcp_tool_name_is_refused_and_writes_a_small_line(make_sidecar, upstream):
    """A 2 MiB tools/call name is refused bad_request (a JSON-RPC error, issue 13 item 1): nothing forwarded,
    one event, and no line carries the name (issue 11 item 14)."""
    config = {"outbound": {"upstreams": {"tools": {"url": upstream.url, "protocol": "mcp"}},
                           "limits": {"max_body_bytes": 4 << 20}}}
    policy = {"version": 1, "default": "deny", "rules": [
        {"id": "tools", "direction": "outbound", "upstream": "tools", "mcp": {"tools": ["search"]}, "effect": "allow"}]}
    h = await make_sidecar(config, policy)
    name = "x" * (2 << 20)
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name}})
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{h.outbound}/tools", data=body, headers={"Content-Type": "application/json"}) as r:
            refusal = (await r.json())["error"]
            assert (r.status, refusal["data"]["reason"]) == (200, "bad_request")
            assert "at most 256 characters" in refusal["message"] and name not in json.dumps(refusal)
    assert upstream.seen == []
    [event] = await h.settle()
    assert_valid([event])
    assert event["target"]["mcp_tool"] is None and event["protocol"] == "mcp"
    assert max(len(line) for line in h.raw_log().splitlines()) < 8192


@pytest.mark.parametrize("request_head, field, limit", [
    # a 20 000-character path
    (b"GET /billing/v1/" + b"p" * 20000 + b" HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n", ("target", "path"), 2048),
    # a 20 000-character task id the agent made up
    (b"GET /billing/v1/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-Sidecar-Task: " + b"t" * 20000 + b"\r\n",
     ("task", "id"), 64),
], ids=["path", "task-id"])
async def test_agent_chosen_strings_are_bounded_in_the_event(make_sidecar, upstream, request_head, field, limit):
    """Agent-chosen strings are cut to the schema's maxLength with a marker saying how long they were
    (issue 11 item 14)."""
    h = await make_sidecar(config_for(upstream), POLICY)
    out = h.port("outbound")
    await raw_http(out, request_head % out + b"Connection: close\r\n\r\n")
    [event] = await h.settle()
    assert_valid([event])
    section, key = field
    value = event[section][key]
    assert len(value) == limit and value.endswith(" chars]") and "...[truncated from " in value
    assert len(h.raw_log()) < 16384


def test_every_request_derived_string_of_an_event_is_bounded(monkeypatch):
    """Each agent- or caller-chosen field, however long, is written within the schema's bounds
    (issue 11 item 14)."""
    import io

    from sidecar.exchange import AgentInfo, Exchange
    from sidecar.observe import decision_log

    long = "z" * 100_000
    ex = Exchange("inbound", method=long)
    ex.host, ex.path, ex.mcp_method, ex.mcp_tool = long, "/" + long, long, long
    ex.task_id, ex.task_trigger, ex.caller_id = long, long, "spiffe://example.org/" + long
    ex.principal, ex.act_chain, ex.reason_detail = (long, long), (long, long), long
    out = io.BytesIO()
    monkeypatch.setattr(decision_log, "WRITER", decision_log.BufferedLineWriter(out))
    decision_log.emit_event(ex.event(AgentInfo("spiffe://example.org/agent", "a", "test")))
    decision_log.WRITER.flush()
    assert len(out.getvalue()) < 16384
    assert_valid([json.loads(out.getvalue())])


def test_the_schema_states_the_bounds_the_log_applies():
    """trust_decision.schema.json's maxLength are the bounds emit_event applies (issue 11 item 14)."""
    from sidecar.observe.decision_log import ACT_CHAIN_ITEM_MAX, EVENT_BOUNDS, REASON_DETAIL_MAX

    props = SCHEMA["properties"]
    for section, bounds in EVENT_BOUNDS.items():
        fields = next(o for o in props[section]["oneOf"] if o["type"] == "object")["properties"]
        assert {key: fields[key]["maxLength"] for key in bounds} == bounds
    assert props["reason_detail"]["maxLength"] == REASON_DETAIL_MAX
    assert props["act_chain"]["items"]["maxLength"] == ACT_CHAIN_ITEM_MAX


AGENT_META = {"name": "billing-agent", "environment": "test", "owner": "payments@example.com",
              "purpose": "answers billing questions", "trust_level": "internal", "data_classes": ["pii", "financial"],
              "labels": {"team": "payments", "tier": "2"}}


async def test_agent_metadata_is_in_every_event_the_inventory_and_one_info_metric(make_sidecar, upstream):
    """Declared owner, purpose, trust level, data classes and labels appear in every event's agent object
    and the inventory, a bounded info series carries all but the free labels, and an exchange no human
    drives says actor_type workload (issue 18 item 1)."""
    h = await make_sidecar({**config_for(upstream), "agent": AGENT_META}, POLICY)
    async with aiohttp.ClientSession() as s:
        for path in ("/billing/v1/ok?page=2&api_key=query-canary-77", "/billing/v1/admin/x", "/nowhere/x"):
            async with s.get(f"{h.outbound}{path}") as r:
                await r.read()
        async with s.get(f"http://127.0.0.1:{h.port('metrics')}/metrics") as r:
            metrics = await r.text()
    events = await h.settle()
    assert_valid(events)
    expected = {k: v for k, v in AGENT_META.items()}
    assert all({k: e["agent"][k] for k in expected} == expected for e in events) and len(events) == 3
    assert {e["actor_type"] for e in events} == {"workload"}
    allowed = events[0]["target"]
    assert (allowed["scheme"], allowed["query"], allowed["size"]) == ("http", "page=2&api_key=<redacted>", 0)
    assert "query-canary-77" not in h.raw_log().decode()
    _, inventory = await admin(h, "GET", "/inventory")
    assert inventory["agent"]["trust_level"] == "internal" and inventory["agent"]["labels"] == AGENT_META["labels"]
    assert ('sidecar_agent_info{environment="test",name="billing-agent",owner="payments@example.com",'
            'trust_level="internal"} 1.0') in metrics
    assert "payments" not in metrics.replace("payments@example.com", "")  # free labels stay out of metrics


async def test_an_exchange_is_recorded_once_the_current_step_ends_in_order_and_none_pending_is_lost(
        make_sidecar, upstream):
    """serve_exchange records through Recorder.record_soon: the answer it returns is written first (the agent
    does not wait for the metrics and the event), the events keep their order, and what is still pending
    is recorded by flush."""
    from sidecar.errors import Refusal
    from sidecar.exchange import Exchange

    h = await make_sidecar(config_for(upstream), POLICY)
    assert h.sidecar is not None
    recorder = h.sidecar.runtime.recorder
    before = len(await h.settle())
    exchanges = [Exchange("outbound") for _ in range(3)]
    for ex in exchanges:
        ex.refuse(Refusal("bad_request", "request: test"))
    loop = asyncio.get_running_loop()
    recorder.record_soon(exchanges[0], loop)
    recorder.record_soon(exchanges[1], loop)
    assert len(h.events()) == before  # not yet: after the current step
    await asyncio.sleep(0)
    assert [e["decision_id"] for e in h.events()[before:]] == [exchanges[0].decision_id, exchanges[1].decision_id]
    recorder.record_soon(exchanges[2], loop)
    recorder.flush()  # what stop calls before the log's last flush
    assert [e["decision_id"] for e in h.events()[before:]] == [ex.decision_id for ex in exchanges]
