"""The command line: run (with a real SIGTERM), explain, ca, revoke, inventory."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from tests.harness import Upstream

ROOT = Path(__file__).parents[1]


def sidecar(*args: str, cwd: Path = ROOT, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
            await _wait_ready(s, ports["health"])
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


async def _wait_ready(session: aiohttp.ClientSession, port: int) -> None:
    for _ in range(200):
        try:
            async with session.get(f"http://127.0.0.1:{port}/readyz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("sidecar did not become ready")


def test_demo_walks_through_allow_deny_and_revocation():
    """`sidecar demo` runs self-contained on loopback and shows each kind of decision."""
    result = sidecar("demo")
    assert result.returncode == 0, result.stderr
    for expected in ("reason=allowed", "reason=rule_denied", "reason=unknown_upstream", "reason=browser_origin",
                     "reason=revoked", "not the agent's key"):
        assert expected in result.stdout
    assert "agent-long-lived-key" not in result.stdout
