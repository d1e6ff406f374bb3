"""``sidecar report``: an access review and a least-privilege policy from a real run's events (issue 18 item 4)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml

from sidecar.cli import main
from sidecar.config import load_config
from sidecar.explain import candidate_policy
from sidecar.replay import replay
from sidecar.report import build, render
from sidecar.report.paths import LITERAL_CAP, PathTrie
from tests.harness import Upstream, admin

POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "api-read", "direction": "outbound", "upstream": "api", "methods": ["GET", "HEAD"],
     "paths": ["/items/**", "/users/*"], "effect": "allow"},
    {"id": "api-write", "direction": "outbound", "upstream": "api", "agents": ["spiffe://sidecar.local/agent/writer"],
     "methods": ["POST"], "paths": ["/items/*"], "credential": "writer-key", "effect": "allow"},
    {"id": "api-admin", "direction": "outbound", "upstream": "api", "paths": ["/items/admin/**"], "effect": "deny"},
    {"id": "tools-support", "direction": "outbound", "upstream": "tools",
     "mcp": {"tools": ["search_tickets", "draft_reply"]}, "effect": "allow"},
    {"id": "spare-all", "direction": "outbound", "upstream": "spare", "effect": "allow"},
]}
READER, WRITER, HELPER = (f"spiffe://sidecar.local/agent/{n}" for n in ("reader", "writer", "helper"))


def config_for(name: str, api: Upstream, tools: Upstream, tmp: Path) -> dict:
    return {
        "agent": {"name": name, "environment": "test"},
        "state_dir": str(tmp / f"state-{name}"),
        "outbound": {"upstreams": {
            "api": {"url": api.url, "credential": "legacy"},
            "tools": {"url": tools.url + "/mcp", "protocol": "mcp"},
            "spare": {"url": api.url + "/spare"}}},
        "credentials": {"legacy": {"type": "static", "header": "X-API-Key", "value": {"value": "legacy-secret-1"}},
                        "writer-key": {"type": "static", "header": "X-API-Key", "value": {"value": "writer-secret-2"}}},
    }


def rpc(method: str, **params: object) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()


async def send(h, method: str, path: str, body: bytes | None = None, **headers: str) -> int:
    if body is not None:
        headers["Content-Type"] = "application/json"
    async with aiohttp.ClientSession() as s:
        async with s.request(method, f"{h.outbound}{path}", data=body, headers=headers) as r:
            await r.read()
            return r.status


async def reader(h) -> None:
    """Reads items (three paths, two of them ids), is refused twice, and reads once for a human's task."""
    for path, status in (("/api/items/1", 200), ("/api/items/2", 200), ("/api/items/3/notes", 200),
                         ("/api/items/admin/x", 403), ("/api/other", 403)):
        assert await send(h, "GET", path) == status
    status, task = await admin(h, "POST", "/tasks", json={"principal": "alice@example.com", "trigger": "ticket-42"})
    assert status == 201
    assert await send(h, "GET", "/api/items/9", **{"X-Sidecar-Task": task["id"]}) == 200


async def writer(h) -> None:
    """Writes an item with its own credential, reads it back, and is refused a write elsewhere."""
    assert await send(h, "POST", "/api/items/5", b"{}") == 200
    assert await send(h, "GET", "/api/items/5") == 200
    assert await send(h, "POST", "/api/users/x", b"{}") == 403


async def helper(h) -> None:
    """Opens an MCP session, calls one allowed tool twice and a forbidden one once (refused as a
    JSON-RPC error, with HTTP 200)."""
    for body in (rpc("initialize", protocolVersion="2025-06-18", capabilities={}), rpc("tools/list"),
                 rpc("tools/call", name="search_tickets", arguments={}),
                 rpc("tools/call", name="search_tickets", arguments={"q": "x"}),
                 rpc("tools/call", name="delete_account", arguments={})):
        assert await send(h, "POST", "/tools", body) == 200


@pytest.fixture
async def run(make_sidecar, upstream, tools, tmp_path):
    """Three agents' sidecars, one after another (each captures the log while it runs): their events,
    the config file they share and what reached the upstreams."""
    events: list[dict] = []
    for name, script in (("reader", reader), ("writer", writer), ("helper", helper)):
        h = await make_sidecar(config_for(name, upstream, tools, tmp_path), POLICY)
        await script(h)
        events += await h.settle()
    config = config_for("reviewer", upstream, tools, tmp_path)
    config["policy"] = {"files": [str(tmp_path / "policy.yaml")]}
    (tmp_path / "sidecar.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "events.jsonl").write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    return events, tmp_path


def report_of(tmp: Path) -> dict:
    config = load_config(tmp / "sidecar.yaml")
    with open(tmp / "events.jsonl", "rb") as stream:
        return build(stream, config, candidate_policy(config, config.policy.files))


def agent(data: dict, agent_id: str) -> dict:
    return next(a for a in data["agents"] if a["id"] == agent_id)


def used(a: dict) -> list[tuple]:
    return sorted((g["upstream"], g["via"], g["kind"], g["credential"], json.dumps(g["methods"], sort_keys=True),
                   json.dumps(g["tools"], sort_keys=True)) for g in a["used"])


async def test_report_names_exactly_what_each_agent_used(run):
    """Per agent: upstreams, methods, generalized paths, tools and credentials used, with counts (issue 18 item 4)."""
    data = report_of(run[1])
    assert [a["name"] for a in data["agents"]] == ["helper", "reader", "writer"]
    assert used(agent(data, READER)) == [
        ("api", "allow", "http", "legacy", json.dumps({"GET": {"/items/*": 3, "/items/*/notes": 1}}), "{}")]
    assert used(agent(data, WRITER)) == sorted([
        ("api", "allow", "http", "legacy", json.dumps({"GET": {"/items/*": 1}}), "{}"),
        ("api", "allow", "http", "writer-key", json.dumps({"POST": {"/items/*": 1}}), "{}")])
    assert used(agent(data, HELPER)) == [
        ("tools", "allow", "mcp", None, json.dumps({"POST": {"/": 4}}), json.dumps({"search_tickets": 2}))]
    assert agent(data, HELPER)["used"][0]["mcp_methods"] == {"initialize": 1, "tools/list": 1, "tools/call": 2}
    assert agent(data, WRITER)["credentials"] == [
        {"type": "static", "provider": "legacy", "standing": True, "count": 1},
        {"type": "static", "provider": "writer-key", "standing": True, "count": 1}]


async def test_report_names_exactly_the_unused_permissions_and_denials(run):
    """What the rules allow each agent but it never used, the rule nothing matched, denials by reason,
    human-driven share and delegation (issue 18 item 4)."""
    data = report_of(run[1])
    unused = {a["name"]: a["unused"] for a in data["agents"]}
    assert [(u["rule"], u["unused"], u.get("methods"), u.get("paths"), u.get("tools")) for u in unused["reader"]] == [
        ("api-read", "parts", ["HEAD"], ["/users/*"], []), ("tools-support", "rule", None, None, None),
        ("spare-all", "rule", None, None, None)]
    assert [(u["rule"], u["unused"], u.get("methods"), u.get("paths")) for u in unused["writer"]] == [
        ("api-read", "parts", ["HEAD"], ["/users/*"]), ("tools-support", "rule", None, None),
        ("spare-all", "rule", None, None)]
    assert [(u["rule"], u["unused"], u.get("tools")) for u in unused["helper"]] == [
        ("api-read", "rule", None), ("tools-support", "parts", ["draft_reply"]), ("spare-all", "rule", None)]
    assert [r["rule"] for r in data["rules_never_matched"]] == ["spare-all"]
    assert agent(data, READER)["denials"] == [{"reason": "rule_denied", "rule": "api-admin", "count": 1},
                                              {"reason": "no_matching_rule", "rule": "default", "count": 1}]
    assert agent(data, WRITER)["denials"] == [{"reason": "no_matching_rule", "rule": "default", "count": 1}]
    assert agent(data, HELPER)["denials"] == [{"reason": "no_matching_rule", "rule": "default", "count": 1}]
    reader_ = agent(data, READER)
    assert reader_["actors"] == {"workload": 5, "human": 1} and reader_["human_share"] == round(1 / 6, 4)
    assert reader_["delegation"] == {"none": 5, "asserted": 1} and reader_["tasks"]["events"] == 1


async def test_the_suggested_policy_re_decides_every_used_exchange_unchanged(run):
    """The suggested policy loads with the project's loader and, under PolicySet.decide, keeps every
    allowed exchange allowed; replay of the same events under it reports no change, and one rule
    stricter reports exactly the requests that rule affects (issue 18 item 4)."""
    events, tmp = run
    data = report_of(tmp)
    proof = data["proof"]
    allowed = [e for e in events if e["decision"] == "allow"]
    assert proof["holds"] and proof["changed"] == 0 and proof["widened"] == 0
    assert proof["kept"] == len(allowed) == 10 and proof["not_redecided"] == {}
    suggested = yaml.safe_load(data["suggested_policy"])
    write = next(r for r in suggested["rules"] if r["agents"] == [WRITER] and r["methods"] == ["POST"])
    assert write["credential"] == "writer-key" and write["paths"] == ["/items/*"]
    tools_rule = next(r for r in suggested["rules"] if r["agents"] == [HELPER])
    assert tools_rule["mcp"] == {"tools": ["search_tickets"]}
    (tmp / "suggested.yaml").write_text(data["suggested_policy"])
    config = load_config(tmp / "sidecar.yaml")
    unchanged = replay(io.BytesIO((tmp / "events.jsonl").read_bytes()), config,
                       candidate_policy(config, [tmp / "suggested.yaml"]))
    assert unchanged.redecided == len([e for e in events if e["rule_id"] is not None]) and not unchanged.counts
    suggested["rules"].insert(0, {"id": "no-notes", "direction": "outbound", "upstream": "api",
                                  "paths": ["/items/*/notes"], "effect": "deny"})
    (tmp / "stricter.yaml").write_text(yaml.safe_dump(suggested))
    stricter = replay(io.BytesIO((tmp / "events.jsonl").read_bytes()), config,
                      candidate_policy(config, [tmp / "stricter.yaml"]))
    assert dict(stricter.counts) == {("allow", "deny", "reader", "api", "api-read", "no-notes"): 1}


@pytest.mark.parametrize("change, expected", [
    # exchanges a human approved stay behind an approval
    ({"reason": "approved"}, {"effect": "require_approval"}),
    # exchanges all made on a human's behalf keep requiring it
    ({"delegation": "delegated", "principal": {"iss": "https://idp.example", "sub": "alice"}},
     {"effect": "allow", "when": {"delegation": "required"}}),
])
async def test_suggested_rules_keep_approvals_and_delegation(run, change, expected):
    """An agent whose exchanges were approved, or delegated, gets rules that still ask for it, and the
    proof re-decides them unchanged (issue 18 item 4)."""
    events, tmp = run
    rewritten = [{**e, **change} if e["agent"]["id"] == WRITER and e["decision"] == "allow" else e for e in events]
    (tmp / "events.jsonl").write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in rewritten))
    data = report_of(tmp)
    rules = [r for r in yaml.safe_load(data["suggested_policy"])["rules"] if r["agents"] == [WRITER]]
    assert len(rules) == 2 and all(expected.items() <= r.items() for r in rules)
    assert data["proof"]["holds"] and data["proof"]["kept"] == 10 and data["proof"]["widened"] == 0


async def test_report_cli_writes_text_json_and_the_suggested_policy(run, capsys, monkeypatch):
    """``sidecar report`` reads a file or standard input, prints text by default and JSON on request,
    and writes the suggested policy with --policy-out (issue 18 item 4)."""
    _, tmp = run
    common = ["report", "-c", str(tmp / "sidecar.yaml")]
    assert main([*common, "--events", str(tmp / "events.jsonl"), "--policy-out", str(tmp / "least.yaml")]) == 0
    text = capsys.readouterr().out
    assert "agent reader (spiffe://sidecar.local/agent/reader, test)" in text
    assert "      GET /items/* (3), /items/*/notes (1)" in text
    assert "    rule api-read: never used: methods HEAD; paths /users/*" in text
    assert "rules never matched:\n  spare-all (allow) at" in text
    assert "proof (holds): 14 exchange(s) re-decided" in text
    assert yaml.safe_load((tmp / "least.yaml").read_text())["default"] == "deny"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO((tmp / "events.jsonl").read_bytes())))
    assert main([*common, "--events", "-", "--format", "json", "--out", str(tmp / "r.json")]) == 0
    assert json.loads((tmp / "r.json").read_text())["proof"]["kept"] == 10


async def test_report_says_when_the_proof_does_not_hold(run, capsys):
    """Exchanges through an upstream this config does not define are left out of the suggestion, cannot
    be decided again, and the proof says so with exit 3 (issue 18 item 4)."""
    events, tmp = run
    moved = [{**e, "target": {**e["target"], "upstream": "elsewhere"}} if e["agent"]["id"] == WRITER else e
             for e in events]
    (tmp / "events.jsonl").write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in moved))
    assert main(["report", "-c", str(tmp / "sidecar.yaml"), "--events", str(tmp / "events.jsonl")]) == 3
    text = capsys.readouterr().out
    assert "proof (FAILS): 11 exchange(s) re-decided under the suggested policy with PolicySet.decide: " \
           "8 of 10 used exchange(s) keep their decision" in text
    assert "  not re-decided: refused before policy by this config (unknown_upstream): 3" in text
    assert "# left out: 2 exchange(s) with upstream 'elsewhere', which this config does not define" in text


@pytest.mark.parametrize("line, message", [
    # not JSON at all
    (b"not json", "line 15: not valid JSON"),
    # a trust-decision event without its agent
    (b'{"event": "trust_decision", "rule_id": "x", "target": null}', "line 15: not a trust-decision event: "
                                                                     "missing or malformed agent"),
])
async def test_report_refuses_input_that_is_not_events(run, capsys, line, message):
    """A line that is not a usable event is refused with its line number, exit 1 and no report (issue 18 item 4)."""
    _, tmp = run
    (tmp / "bad.jsonl").write_bytes((tmp / "events.jsonl").read_bytes() + line + b"\n")
    assert main(["report", "-c", str(tmp / "sidecar.yaml"), "--events", str(tmp / "bad.jsonl")]) == 1
    out, err = capsys.readouterr()
    assert err == f"error: report: {tmp / 'bad.jsonl'}: {message}\n" and out == ""


@pytest.mark.parametrize("paths, patterns", [
    # numeric and uuid-like segments become *
    (["/items/1", "/items/22", "/users/0b6e3c1e-8a4f-4d7e-9a3a-1c2b3d4e5f60/keys"],
     {"/items/*": 2, "/users/*/keys": 1}),
    # a trailing slash and the root stay literal: * needs a non-empty segment
    (["/", "/a/"], {"/": 1, "/a/": 1}),
    # more distinct literals than the cap fold into *
    ([f"/docs/page-{c}" for c in "abcdefghijklmnopq"], {"/docs/*": 17}),
    # a path cut short in the event covers what lies below its last whole segment
    (["/files/abc...[truncated from 5000 chars]"], {"/files/**": 1}),
])
def test_paths_are_generalized_with_a_cap_on_distinct_literals(paths, patterns):
    """Observed paths become glob patterns the policy loader accepts (issue 18 item 4)."""
    assert LITERAL_CAP == 16
    trie = PathTrie()
    for path in paths:
        trie.add(path)
    assert trie.patterns() == patterns


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--enable-logging=stderr", "--v=0",
         f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("chromium") is None and os.environ.get("CI") != "true",
                    reason="chromium is not installed (scripts/test installs it)")
async def test_html_report_renders_offline_with_an_access_map_per_agent(run):
    """The HTML report is one file that headless Chromium renders with no network and no script error,
    an access map node for each agent and its upstreams, and a screenshot kept (issue 18 item 4)."""
    _, tmp = run
    page = tmp / "report.html"
    page.write_text(render(report_of(tmp), "html"))
    html = page.read_text()
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html
    dom = chromium("--dump-dom", page.as_uri(), profile=tmp / "chrome-dom")
    assert dom.returncode == 0, dom.stderr
    assert 'data-ready="1"' in dom.stdout and '<pre id="errors" hidden=""></pre>' in dom.stdout
    for name, targets in (("reader", ["api"]), ("writer", ["api"]), ("helper", ["tools"])):
        assert f'class="node" data-kind="agent" data-label="{name}"' in dom.stdout
        for target in targets:
            assert f'data-kind="target" data-label="{target}"' in dom.stdout
    assert 'data-kind="leaf" data-label="tool search_tickets"' in dom.stdout
    assert "Uncaught" not in dom.stderr and "CONSOLE" not in dom.stderr
    shot = tmp / "report.png"
    taken = chromium(f"--screenshot={shot}", "--window-size=1100,1500", page.as_uri(), profile=tmp / "chrome-shot")
    assert taken.returncode == 0 and shot.stat().st_size > 10_000, taken.stderr
