"""``sidecar replay``: the events of a real run, decided again under a candidate policy."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from sidecar.cli import main
from tests.scenarios.outbound import POLICY, config_for
from tests.harness import admin

ROOT = Path(__file__).parents[2]
AGENT = {"name": "billing-agent", "environment": "test", "trust_level": "internal", "labels": {"team": "payments"}}
RUN_POLICY = copy.deepcopy(POLICY)
RUN_POLICY["rules"].append({"id": "team-reports", "direction": "outbound", "upstream": "billing", "methods": ["GET"],
                            "paths": ["/reports/**"], "when": {"expr": "agent.labels.team == 'payments' && "
                                                               "agent.trust_rank >= trust_levels.internal"},
                            "effect": "allow"})


async def run_traffic(make_sidecar, upstream, tmp_path: Path) -> tuple[Path, Path, list[dict]]:
    """A scripted run: allowed and denied calls, one refused before policy, one driven by a human's task;
    returns the sidecar's whole log (every line, not only events), a config to replay with, the events."""
    h = await make_sidecar({**config_for(upstream), "agent": AGENT}, RUN_POLICY)
    _, task = await admin(h, "POST", "/tasks", json={"principal": "alice@example.com", "trigger": "support"})
    async with aiohttp.ClientSession() as s:
        for method, path, headers in (("GET", "/billing/v1/invoices?page=2", {}), ("POST", "/billing/v1/invoices", {}),
                                      ("GET", "/billing/v1/admin/users", {}), ("GET", "/billing/reports/q1", {}),
                                      ("DELETE", "/billing/v1/invoices/7", {}), ("GET", "/nowhere/x", {}),
                                      ("GET", "/billing/v1/mine", {"X-Sidecar-Task": task["id"]})):
            async with s.request(method, f"{h.outbound}{path}", headers=headers, data=b"{}" if method == "POST" else None) as r:
                await r.read()
    events = await h.settle()
    log = tmp_path / "run.log"
    log.write_bytes(h.raw_log())
    config = tmp_path / "replay.yaml"
    config.write_text(yaml.safe_dump({**config_for(upstream), "agent": AGENT, "state_dir": str(tmp_path / "r")}))
    return log, config, events


def replay(capsys, config: Path, events: str, *policies: dict, tmp_path: Path) -> tuple[int, str, str]:
    args = ["replay", "-c", str(config), "--events", events]
    for i, policy in enumerate(policies):
        path = tmp_path / f"candidate-{i}.yaml"
        path.write_text(yaml.safe_dump(policy))
        args += ["--policy", str(path)]
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def with_rules(*rules: dict, drop: str | None = None) -> dict:
    policy = copy.deepcopy(RUN_POLICY)
    policy["rules"] = [*rules, *(r for r in policy["rules"] if r["id"] != drop)]
    return policy


async def test_the_same_policy_changes_nothing(make_sidecar, upstream, tmp_path, capsys):
    """Replaying a run under the policy it ran with re-decides every policy-decided event the same way,
    conditions on agent metadata included, and exits 0 (issue 18 item 3)."""
    log, config, events = await run_traffic(make_sidecar, upstream, tmp_path)
    assert {e["reason"] for e in events} >= {"allowed", "rule_denied", "no_matching_rule", "unknown_upstream"}
    assert next(e for e in events if e["target"]["path"] == "/reports/q1")["rule_id"] == "team-reports"
    code, out, _ = replay(capsys, config, str(log), RUN_POLICY, tmp_path=tmp_path)
    assert code == 0, out
    assert f"replayed {len(events)} event(s)" in out and f"{len(events) - 1} re-decided, 0 undecidable, 1 not re-decided" in out
    assert "changes: none" in out and "refused before policy when logged: 1" in out


async def test_a_stricter_policy_reports_exactly_what_it_denies_and_exits_3(make_sidecar, upstream, tmp_path, capsys):
    """One added deny rule: replay names the allowed requests it would deny, grouped by agent, upstream and
    rule with an example, and exits 3 (issue 18 item 3)."""
    log, config, _ = await run_traffic(make_sidecar, upstream, tmp_path)
    stricter = with_rules({"id": "no-writes", "direction": "outbound", "upstream": "billing", "methods": ["POST"],
                           "effect": "deny"})
    code, out, _ = replay(capsys, config, str(log), stricter, tmp_path=tmp_path)
    assert code == 3, out
    assert "changes: 1 allow -> deny" in out
    assert "allow -> deny: 1  agent billing-agent  upstream billing  rule read-invoices -> no-writes" in out
    assert "e.g. POST /billing/v1/invoices (" in out


async def test_a_looser_policy_reports_what_it_allows_and_exits_0(make_sidecar, upstream, tmp_path, capsys):
    """Dropping a deny rule and loosening a condition: denied becoming allowed is reported, the exit is 0
    (issue 18 item 3)."""
    log, config, _ = await run_traffic(make_sidecar, upstream, tmp_path)
    looser = with_rules({"id": "deletes", "direction": "outbound", "upstream": "billing", "methods": ["DELETE"],
                         "effect": "allow"}, drop="no-admin")
    code, out, _ = replay(capsys, config, str(log), looser, tmp_path=tmp_path)
    assert code == 0, out
    assert "changes: 2 deny -> allow" in out
    assert "deny -> allow: 1  agent billing-agent  upstream billing  rule no-admin -> read-invoices" in out
    assert "deny -> allow: 1  agent billing-agent  upstream billing  rule default -> deletes" in out


@pytest.mark.parametrize("lines, message", [
    # not JSON at all
    ([b'{"event": "sidecar_started"}', b"not json"], "line 2: not valid JSON"),
    # JSON, but not a log line
    ([b"[1, 2]"], "line 1: expected a JSON object with an \"event\" field"),
    # an event from a future schema
    ([b'{"event": "trust_decision", "schema_version": 9, "rule_id": "x"}'], "line 1: schema_version 9 is not one"),
    # a decided event without its request, or with a request of the wrong shape
    ([b'{"event": "trust_decision", "schema_version": 2, "rule_id": "x", "reason": "allowed", "direction": "outbound",'
      b' "delegation": "none", "ts": "2026-12-01T10:00:00Z", "agent": {"id": "spiffe://a/b", "name": "a", '
      b'"environment": "e"}, "target": {"upstream": "example-api", "path": "/x", "method": 7}}'],
     "line 1: its request cannot be decided: a field of target has the wrong type"),
    ([b'{"event": "trust_decision", "schema_version": 2, "rule_id": "x", "target": {"method": "GET"}}'],
     "line 1: not a trust-decision event of schema (1, 2, 3, 4): missing or malformed"),
])
def test_bad_input_is_a_clear_error_with_its_line_number(lines, message):
    """Unusable input on stdin exits 1 with one message naming the line, never a traceback (issue 18 item 3)."""
    result = subprocess.run([sys.executable, "-m", "sidecar", "replay", "--events", "-", "--policy",
                             "config/policy.yaml"], input=b"\n".join(lines) + b"\n", capture_output=True, timeout=60,
                            cwd=ROOT)
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stderr.decode() and b"Traceback" not in result.stderr
