"""Headers in the trust-decision event: ``replay`` of a real ``sidecar run`` decides rules on headers again
as the sidecar did, says "undecidable" where the event did not record a header, and no secret is written
(issue 18, the item that kept it open)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import aiohttp
import pytest

from tests.scenarios.outbound import SECRET, config_for
from tests.scenarios.process import SidecarProcess, replay

AGENT_TOKEN = "agent-own-bearer-0d9e8f7a6b5c"  # the agent's own Authorization: dropped, never recorded
SESSION_SECRET = "session-canary-4b1c9d2e7f"  # a header named like a secret: forwarded, never recorded
POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "prod-reads", "direction": "outbound", "upstream": "billing", "methods": ["GET"], "paths": ["/v1/**"],
     "headers": {"x-env": ["prod"]}, "effect": "allow"},
    {"id": "acme-reports", "direction": "outbound", "upstream": "billing", "methods": ["GET"],
     "paths": ["/reports/**"], "when": {"expr": 'request.headers["x-tenant"][0] == "acme"'}, "effect": "allow"},
]}
# (path, headers the agent sends): every one also carries the agent's own token and a secret-named header
TRAFFIC = [
    ("/v1/invoices", {"X-Env": "prod"}),  # allowed by prod-reads
    ("/v1/invoices", {"X-Env": "staging"}),  # denied: default
    ("/v1/invoices", {}),  # denied: default, no x-env at all
    ("/v1/items", {"X-Env": "prod", "X-Trace-Class": "gold"}),  # allowed; x-trace-class read by no rule
    ("/reports/q1", {"X-Tenant": "acme"}),  # allowed by acme-reports (CEL)
    ("/reports/q1", {"X-Tenant": "globex", "X-Request-Class": "batch"}),  # denied; x-request-class configured
]


def with_rules(*rules: dict, drop: str | None = None) -> dict:
    policy = copy.deepcopy(POLICY)
    policy["rules"] = [*rules, *(r for r in policy["rules"] if r["id"] != drop)]
    return policy


async def run(upstream, tmp_path: Path) -> SidecarProcess:
    config = {**config_for(upstream), "logging": {"event_headers": ["X-Request-Class"]}}
    sidecar = SidecarProcess(tmp_path / "run", config, POLICY)
    async with sidecar:
        async with aiohttp.ClientSession() as s:
            for path, headers in TRAFFIC:
                sent = {**headers, "Authorization": f"Bearer {AGENT_TOKEN}", "X-Session-Secret": SESSION_SECRET}
                async with s.get(f"{sidecar.outbound}/billing{path}", headers=sent) as r:
                    await r.read()
    return sidecar


@pytest.fixture
async def ran(upstream, tmp_path) -> SidecarProcess:
    return await run(upstream, tmp_path)


def test_the_event_records_the_headers_rules_read_and_every_name(ran):
    """Each event has the values of the headers rules read by name (and the configured ones) that were present,
    and the sorted names of every header policy saw; the agent's token and secret-named headers have no value."""
    events = ran.events()
    assert [e["rule_id"] for e in events] == ["prod-reads", "default", "default", "prod-reads", "acme-reports",
                                               "default"]
    assert all(e["schema_version"] == 4 for e in events)
    targets = [e["target"] for e in events]
    assert [t["headers"] for t in targets] == [{"x-env": ["prod"]}, {"x-env": ["staging"]}, {}, {"x-env": ["prod"]},
                                               {"x-tenant": ["acme"]},
                                               {"x-tenant": ["globex"], "x-request-class": ["batch"]}]
    names = targets[3]["header_names"]
    assert names == sorted(names) and {"x-env", "x-trace-class", "x-session-secret"} <= set(names)
    assert "authorization" not in names  # dropped before policy: policy never saw it


def test_no_secret_reaches_the_log_or_the_replay(ran, capsys, tmp_path):
    """The credential's secret, the agent's own token and a secret-named header's value appear nowhere in the
    whole log (every line) or in replay's output, while the header's name is listed."""
    code, out = replay(capsys, ran, with_rules({"id": "probe", "direction": "outbound", "upstream": "billing",
                                                "headers": {"x-session-secret": [SESSION_SECRET]},
                                                "effect": "deny"}), tmp_path)
    text = ran.log.read_text() + out
    for secret in (SECRET, AGENT_TOKEN, SESSION_SECRET):
        assert secret not in text
    assert '"x-session-secret"' in ran.log.read_text()
    assert code == 0 and "6 undecidable" in out and "reads header x-session-secret" in out


def test_the_same_policy_replays_without_a_change(ran, capsys, tmp_path):
    """Under the policy it ran with, every request is decided the same way: the header rules see the
    recorded values, and a header that was absent is decided as absent."""
    code, out = replay(capsys, ran, POLICY, tmp_path)
    assert code == 0, out
    assert "6 re-decided, 0 undecidable" in out and "changes: none" in out


def test_a_header_rule_change_finds_exactly_the_true_changes(ran, capsys, tmp_path):
    """Allowing staging as well as prod, and globex reports: exactly the two requests that change are reported;
    the one without x-env stays denied."""
    looser = copy.deepcopy(POLICY)
    looser["rules"][0]["headers"] = {"x-env": ["prod", "staging"]}
    looser["rules"][1]["when"] = {"expr": 'request.headers["x-tenant"][0] in ["acme", "globex"]'}
    code, out = replay(capsys, ran, looser, tmp_path)
    assert code == 0, out
    assert "changes: 2 deny -> allow" in out
    assert "deny -> allow: 1  agent billing-agent  upstream billing  rule default -> prod-reads" in out
    assert "deny -> allow: 1  agent billing-agent  upstream billing  rule default -> acme-reports" in out
    assert "0 undecidable" in out


def test_a_rule_on_a_header_the_event_did_not_record_is_undecidable_not_a_change(ran, capsys, tmp_path):
    """A candidate that denies on x-trace-class (read by no running rule): the one request that carried it is
    undecidable, in its own group; the others (the header absent, by their names) are decided, unchanged."""
    stricter = with_rules({"id": "no-gold", "direction": "outbound", "upstream": "billing",
                           "headers": {"x-trace-class": ["gold"]}, "effect": "deny"})
    code, out = replay(capsys, ran, stricter, tmp_path)
    assert code == 0, out
    assert "5 re-decided, 1 undecidable" in out and "changes: none" in out
    assert "1  agent billing-agent  upstream billing  reads header x-trace-class" in out
    assert "e.g. GET /billing/v1/items" in out


def test_a_rule_on_a_configured_header_decides_offline(ran, capsys, tmp_path):
    """``logging.event_headers`` records a header no rule read: a candidate rule on it decides, and exits 3."""
    stricter = with_rules({"id": "no-batch", "direction": "outbound", "upstream": "billing",
                           "headers": {"x-request-class": ["batch"]}, "effect": "deny"})
    code, out = replay(capsys, ran, stricter, tmp_path)
    assert "0 undecidable" in out and "changes: none" in out, out  # the batch request was already denied
    assert code == 0
    prod = with_rules({"id": "batch-only", "direction": "outbound", "upstream": "billing", "methods": ["GET"],
                       "when": {"expr": '!("x-request-class" in request.headers)'}, "effect": "deny"})
    code, out = replay(capsys, ran, prod, tmp_path)
    assert code == 3 and "changes: 3 allow -> deny" in out and "0 undecidable" in out, out


def test_events_of_earlier_schemas_are_undecidable_under_header_rules(ran, capsys, tmp_path):
    """Events written before schema 4 recorded no headers: a header rule makes each undecidable, never a change."""
    old = tmp_path / "schema3.log"
    lines = []
    for event in ran.events():
        event["schema_version"] = 3
        for key in ("headers", "header_names"):
            event["target"].pop(key)
        lines.append(json.dumps(event))
    old.write_text("\n".join(lines) + "\n")
    ran.log = old
    code, out = replay(capsys, ran, POLICY, tmp_path)
    assert code == 0 and "0 re-decided, 6 undecidable" in out and "changes: none" in out, out
