"""The command line: run (with a real SIGTERM), explain, test (policy unit tests), ca, revoke, inventory."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import aiohttp
import pytest
import yaml
from aiohttp import web

from tests.harness import Upstream, free_port, wait_ready

ROOT = Path(__file__).parents[1]


def sidecar(*args: str, cwd: Path = ROOT, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, **kw)


@pytest.mark.parametrize("args, code, expect", [
    # allowed by example-api-read
    (["--url", "/example-api/v1/items"], 0, "rule: example-api-read"),
    # forward-proxy form resolves through hosts to the same rule and path
    (["--url", "http://api.example.com/v1/items"], 0, "path: /v1/items"),
    # no rule allows POST: default deny
    (["--url", "/example-api/v1/items", "--method", "POST"], 3, "reason: no_matching_rule"),
    # refused before policy
    (["--url", "/unknown/x"], 3, "reason: unknown_upstream"),
    (["--url", "/example-api/a%2Fb"], 3, "reason: bad_request"),
    # TRACE would echo the credential: refused before policy, as on the listeners (issue 11 item 4)
    (["--url", "/example-api/v1/items", "--method", "TRACE"], 3, "reason: method_not_allowed"),
    # inbound, with a caller
    (["--direction", "inbound", "--url", "/tasks/7", "--caller", "spiffe://sidecar.local/o"], 0, "rule: callers"),
    # underscore header names are refused, as on the listener
    (["--url", "/example-api/x", "--header", "X_Forwarded_User=admin"], 3, "reason: bad_request"),
    # usage error
    (["--url", "/example-api/x", "--header", "no-equals-sign"], 2, "--header must be K=V"),
    # a method override and an access_token parameter are refused, as on the listener (issue 11 items 9, 12)
    (["--url", "/example-api/v1/items", "--header", "X-HTTP-Method-Override=DELETE"], 3, "reason: request_override"),
    (["--url", "/example-api/v1/items?access_token=t"], 3, "reason: credential_parameter"),
])
def test_explain_prints_the_decision_and_exits_by_it(args, code, expect):
    """explain resolves, normalizes and decides exactly like the pipeline, and its exit code says the outcome."""
    result = sidecar("explain", *args)
    assert result.returncode == code, result.stdout + result.stderr
    assert expect in result.stdout + result.stderr


def test_explain_reports_approval_required_with_exit_4(tmp_path):
    """A require_approval rule makes explain exit 4."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"version": 1, "default": "deny", "rules": [
        {"id": "ask", "direction": "outbound", "upstream": "u", "effect": "require_approval"}]}))
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump({"outbound": {"upstreams": {"u": {"url": "https://u.example"}}},
                                      "policy": {"files": [str(policy)]}, "state_dir": str(tmp_path / "s")}))
    result = sidecar("explain", "-c", str(config), "--url", "/u/x")
    assert result.returncode == 4 and "decision: require_approval" in result.stdout


def test_ca_issue_refuses_an_invalid_spiffe_id_and_writes_nothing(tmp_path):
    """`sidecar ca issue` with a malformed SPIFFE ID exits 1 naming the rule it breaks."""
    result = sidecar("ca", "issue", "--spiffe-id", "spiffe://Example.org/x", "--out", str(tmp_path / "out"),
                     cwd=tmp_path)
    assert result.returncode == 1 and "trust domain" in result.stderr
    assert not (tmp_path / "out").exists()


def test_ca_issue_writes_an_svid(tmp_path):
    """`sidecar ca issue` writes tls.crt, tls.key (0600) and ca.crt."""
    result = sidecar("ca", "issue", "--spiffe-id", "spiffe://sidecar.local/caller", "--out", str(tmp_path / "out"),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "tls.crt").exists()
    assert oct((tmp_path / "out" / "tls.key").stat().st_mode & 0o777) == "0o600"


async def test_sigterm_loses_no_request_in_flight_and_admin_commands_work(tmp_path):
    """A real `sidecar run` process: revoke/inventory work, and on SIGTERM the request in flight completes."""
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        started.set()
        await release.wait()
        return web.Response(text="finished")

    up = await Upstream(slow).start()
    ports = {name: free_port() for name in ("outbound", "health", "metrics", "admin")}
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"version": 1, "default": "deny", "rules": [
        {"id": "all", "direction": "outbound", "upstream": "slow", "effect": "allow"}]}))
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"), "policy": {"files": [str(policy)]}, "shutdown": {"drain": "10s"},
        "outbound": {"listen": f"127.0.0.1:{ports['outbound']}", "upstreams": {"slow": {"url": up.url}}},
        **{name: {"listen": f"127.0.0.1:{ports[name]}"} for name in ("health", "metrics", "admin")}}))
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "sidecar", "run", "-c", str(config),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with aiohttp.ClientSession() as s:
            await wait_ready(s, ports["health"])
            result = await asyncio.to_thread(sidecar, "inventory", "-c", str(config))
            assert result.returncode == 0 and '"tasks"' in result.stdout
            result = await asyncio.to_thread(sidecar, "revoke", "-c", str(config), "--task", "t-123", "--ttl", "1h")
            assert result.returncode == 0 and "revoked task t-123" in result.stdout
            in_flight = asyncio.ensure_future(s.get(f"http://127.0.0.1:{ports['outbound']}/slow/x"))
            await asyncio.wait_for(started.wait(), 20)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            async with s.get(f"http://127.0.0.1:{ports['health']}/readyz") as r:
                assert r.status == 503
            release.set()
            response = await asyncio.wait_for(in_flight, 20)
            assert response.status == 200 and await response.text() == "finished"
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        release.set()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await up.stop()


def test_demo_walks_through_allow_deny_and_revocation():
    """`sidecar demo` runs self-contained on loopback and shows each kind of decision."""
    result = sidecar("demo")
    assert result.returncode == 0, result.stderr
    for expected in ("reason=allowed", "reason=rule_denied", "reason=unknown_upstream", "reason=browser_origin",
                     "reason=revoked", "not the agent's key"):
        assert expected in result.stdout
    assert "agent-long-lived-key" not in result.stdout


def test_the_shipped_policy_cases_pass_and_write_junit(tmp_path):
    """`sidecar test` runs config/policy.cases.yaml against config/policy.yaml, exits 0 and writes
    JUnit XML with one passing testcase per case (issue 18 item 2)."""
    junit = tmp_path / "out" / "policy.xml"
    result = sidecar("test", "config/policy.yaml", "--cases", "config/policy.cases.yaml", "--junit", str(junit))
    assert result.returncode == 0, result.stdout + result.stderr
    cases = yaml.safe_load((ROOT / "config" / "policy.cases.yaml").read_text())["cases"]
    assert f"{len(cases)} passed, 0 failed" in result.stdout
    root = ElementTree.parse(junit).getroot()
    assert root.tag == "testsuites" and root.get("tests") == str(len(cases)) and root.get("failures") == "0"
    assert [c.get("name") for c in root.iter("testcase")] == [c["name"] for c in cases]


def test_a_wrong_expectation_fails_showing_the_request_and_the_deciding_rule(tmp_path):
    """A case whose expectation is wrong exits 1 and prints the request, expected and actual decision and the
    rule that decided, with where it is written (a directory of policies is read whole); the JUnit file has
    the same failure (issue 18 item 2)."""
    cases = tmp_path / "wrong.cases.yaml"
    cases.write_text(yaml.safe_dump({"cases": [
        {"name": "reads are denied (wrong)", "request": {"upstream": "example-api", "path": "/v1/items"},
         "expect": {"decision": "deny", "reason": "rule_denied"}},
        {"name": "writes are denied", "request": {"method": "PUT", "url": "/example-api/v1/items"},
         "expect": {"decision": "deny", "rule": "default"}},
    ]}))
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "policy.yaml").write_text((ROOT / "config" / "policy.yaml").read_text())
    junit = tmp_path / "policy.xml"
    result = sidecar("test", str(policies), "--cases", str(cases), "--junit", str(junit))
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert f"FAIL reads are denied (wrong) ({cases}: cases[0])" in out
    assert "request:  outbound GET /example-api/v1/items" in out
    assert "expected: deny, reason rule_denied" in out and "actual:   allow, rule example-api-read, reason allowed" in out
    assert f"deciding rule: {policies}/policy.yaml: rules[0] (example-api-read)" in out
    assert "decision 'deny', got 'allow'" in out and "1 passed, 1 failed" in out
    failures = list(ElementTree.parse(junit).getroot().iter("failure"))
    assert len(failures) == 1 and f"{policies}/policy.yaml: rules[0] (example-api-read)" in failures[0].text


@pytest.mark.parametrize("case, message", [
    # every problem with its path, not a traceback
    ({"request": {"url": "/x"}, "expect": {"decision": "maybe"}}, "cases[0].expect.decision: must be one of allow"),
    ({"name": "n", "request": {"upstream": "example-api"}, "expect": {"decision": "allow"}},
     "cases[0].request.url: is required (or upstream and path)"),
    ({"name": "n", "request": {"url": "/x", "verb": "GET"}, "expect": {"decision": "allow"}},
     "cases[0].request.verb: unknown key"),
])
def test_an_unusable_case_file_exits_1_naming_the_path(tmp_path, case, message):
    """A malformed case is reported with its path and what was expected, and nothing is run (issue 18 item 2)."""
    cases = tmp_path / "bad.cases.yaml"
    cases.write_text(yaml.safe_dump({"cases": [case]}))
    result = sidecar("test", "config/policy.yaml", "--cases", str(cases))
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_cases_describe_mcp_tools_principals_tasks_and_time(tmp_path):
    """Cases can state an MCP tool, a principal, a task and a time, decided through the same MCP parsing and
    conditions as the pipeline; a failing MCP case names its tool (issue 18 item 2)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"version": 1, "default": "deny", "rules": [
        {"id": "search", "direction": "outbound", "upstream": "tools", "mcp": {"tools": ["search"]},
         "when": {"expr": "principal.sub == 'alice@example.com' && task.trigger == 'support'",
                  "hours": {"days": ["mon", "tue", "wed", "thu", "fri"], "from": "09:00", "to": "17:00",
                            "tz": "UTC"}}, "effect": "allow"}]}))
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump({"outbound": {"upstreams": {"tools": {"url": "https://tools.example/mcp",
                                                                            "protocol": "mcp"}}},
                                      "policy": {"files": [str(policy)]}, "state_dir": str(tmp_path / "s")}))
    alice = {"upstream": "tools", "path": "/", "mcp": {"tool": "search"}, "principal": {"iss": "idp", "sub":
             "alice@example.com"}, "task": {"trigger": "support"}, "at": "2026-03-10T10:00:00Z"}
    cases = tmp_path / "tools.cases.yaml"
    cases.write_text(yaml.safe_dump({"cases": [
        {"name": "alice searches in office hours", "request": alice, "expect": {"decision": "allow", "rule": "search"}},
        {"name": "not at night", "request": {**alice, "at": "2026-03-10T23:00:00Z"}, "expect": {"decision": "deny"}},
        {"name": "not another tool", "request": {**alice, "mcp": {"tool": "delete"}}, "expect": {"decision": "allow"}},
    ]}))
    result = sidecar("test", "-c", str(config), str(policy), "--cases", str(cases))
    assert result.returncode == 1 and "2 passed, 1 failed" in result.stdout, result.stdout + result.stderr
    assert "FAIL not another tool" in result.stdout and "(mcp tools/call delete)" in result.stdout


def _with_interception_ca(tmp_path: Path, cert: bytes, key: bytes) -> Path:
    (tmp_path / "ca.crt").write_bytes(cert)
    (tmp_path / "ca.key").write_bytes(key)
    (tmp_path / "policy.yaml").write_text("version: 1\ndefault: deny\nrules: []\n")
    config = {"state_dir": str(tmp_path / "state"), "policy": {"files": [str(tmp_path / "policy.yaml")]},
              "outbound": {"listen": "127.0.0.1:0",
                           "intercept": {"ca_cert": str(tmp_path / "ca.crt"), "ca_key": str(tmp_path / "ca.key")}}}
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_validate_and_run_refuse_an_interception_ca_that_cannot_be_loaded(tmp_path):
    """A configured CA pair whose key is another CA's: validate names it (exit 1) instead of saying ok, and run
    exits 1 saying why instead of a traceback."""
    import trustme

    ca, other = trustme.CA(), trustme.CA()
    config = _with_interception_ca(tmp_path, ca.cert_pem.bytes(), other.private_key_pem.bytes())
    validated = sidecar("validate", "-c", str(config))
    assert validated.returncode == 1 and "(mismatch)" in validated.stderr and "ca.key" in validated.stderr
    assert "PRIVATE KEY" not in validated.stderr
    ran = sidecar("run", "-c", str(config))
    assert ran.returncode == 1 and "cannot start: intercept:" in ran.stderr and "Traceback" not in ran.stderr


def test_validate_warns_of_an_expired_interception_ca(tmp_path):
    """An expired CA loads (run starts with it) but no agent accepts its leaves: a warning, exit 0."""
    from datetime import UTC, datetime, timedelta

    from sidecar.identity.ca import InterceptionCA

    InterceptionCA.load_or_create(None, None, tmp_path / "made", clock=lambda: datetime.now(UTC) - timedelta(days=400))
    made = tmp_path / "made" / "intercept"
    config = _with_interception_ca(tmp_path, (made / "ca.crt").read_bytes(), (made / "ca.key").read_bytes())
    validated = sidecar("validate", "-c", str(config))
    assert validated.returncode == 0 and "warning: intercept:" in validated.stdout and "(expired)" in validated.stdout
