"""Hot policy reload (a bad edit keeps the last good set) and require_approval held for a human."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import aiohttp
import jwt
import yaml
from aiohttp import web

from tests.harness import Upstream, admin
from tests.scenarios.approval import APPROVAL_POLICY, approval_config, approve, approver_token, listed
from tests.scenarios.inbound import ISSUER, KEY
from tests.scenarios.outbound import POLICY, config_for


async def get(h, path: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{h.outbound}{path}") as r:
            return r.status, await r.read()


async def test_a_good_edit_applies_and_a_bad_one_keeps_the_last_good_policy(make_sidecar, upstream, tmp_path):
    """POST /reload applies a valid edit; a truncated or invalid edit is refused whole and counted."""
    h = await make_sidecar(config_for(upstream), POLICY)
    policy_file = h.sidecar.config.policy.files[0]
    assert (await get(h, "/billing/v2/x"))[0] == 403
    widened = {**POLICY, "rules": [*POLICY["rules"], {"id": "v2", "direction": "outbound", "upstream": "billing",
                                                       "paths": ["/v2/**"], "effect": "allow"}]}
    policy_file.write_text(yaml.safe_dump(widened))
    status, body = await admin(h, "POST", "/reload")
    assert status == 200
    good_version = body["policy_version"]
    assert (await get(h, "/billing/v2/x"))[0] == 200
    for broken in ("version: 1\ndefault: deny\nrules:\n  - id: half\n    direction: outb",  # half-written
                   yaml.safe_dump({**widened, "rules": [{"id": "x", "direction": "sideways", "effect": "allow"}]})):
        policy_file.write_text(broken)
        status, body = await admin(h, "POST", "/reload")
        assert status == 422 and body["policy_version"] == good_version
        assert (await get(h, "/billing/v2/x"))[0] == 200
    metrics = h.sidecar.metrics.exposition().decode()
    assert 'sidecar_policy_reloads_total{outcome="error"} 2.0' in metrics


async def test_requests_in_flight_finish_under_the_policy_they_started_with(make_sidecar, tmp_path):
    """A reload that would deny a request does not fail it once it is in flight."""
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        started.set()
        await release.wait()
        return web.Response(text="ok")

    up = await Upstream(slow).start()
    try:
        h = await make_sidecar(config_for(up), POLICY)
        in_flight = asyncio.ensure_future(get(h, "/billing/v1/slow"))
        await asyncio.wait_for(started.wait(), 10)
        h.sidecar.config.policy.files[0].write_text(yaml.safe_dump({**POLICY, "rules": []}))
        assert (await admin(h, "POST", "/reload"))[0] == 200
        release.set()
        assert (await in_flight)[0] == 200
        assert (await get(h, "/billing/v1/slow"))[0] == 403
    finally:
        release.set()
        await up.stop()


async def test_a_held_request_proceeds_when_an_approver_approves(make_sidecar, upstream, tmp_path):
    """require_approval holds the request until a listed human approves with an approver token."""
    h = await make_sidecar(approval_config(upstream, tmp_path), APPROVAL_POLICY)
    async with aiohttp.ClientSession() as s:
        held = asyncio.ensure_future(s.post(f"{h.outbound}/billing/v1/refunds", data=b"{}"))
        pending = await listed(h)
        assert pending and pending[0]["rule_id"] == "refunds-need-a-human" and upstream.seen == []
        approval_id = pending[0]["id"]
        # a token for the wrong audience, and a human who is not an approver, are both refused
        status, _ = await admin(h, "POST", f"/approvals/{approval_id}", json={"approve": True},
                                headers={"X-Approver-Token": approver_token("bob@example.com", aud="billing-agent")})
        assert status == 401
        status, _ = await admin(h, "POST", f"/approvals/{approval_id}", json={"approve": True},
                                headers={"X-Approver-Token": approver_token("mallory@evil.test")})
        assert status == 403
        await approve(h, approval_id)
        response = await asyncio.wait_for(held, 10)
        assert response.status == 200
    event = (await h.settle())[-1]
    assert event["reason"] == "approved" and event["approval"]["outcome"] == "approved"
    assert event["approval"]["approver"] == {"iss": ISSUER, "sub": "bob@example.com"}


async def pending_approvals(h) -> list[dict]:
    for _ in range(100):
        _, body = await admin(h, "GET", "/approvals")
        if body["approvals"]:
            return body["approvals"]
        await asyncio.sleep(0.05)
    return []


async def test_an_approver_pattern_does_not_cross_an_at_sign(make_sidecar, upstream, tmp_path):
    """``*@example.com`` is not matched by ``mallory@evil.test@example.com``: her decision is refused and
    the request stays held until a real approver decides (issue 11 item 12)."""
    h = await make_sidecar(approval_config(upstream, tmp_path), APPROVAL_POLICY)
    async with aiohttp.ClientSession() as s:
        held = asyncio.ensure_future(s.post(f"{h.outbound}/billing/v1/refunds", data=b"{}"))
        pending = await pending_approvals(h)
        assert pending, "the request was not held"
        decide = f"/approvals/{pending[0]['id']}"
        status, body = await admin(h, "POST", decide, json={"approve": True},
                                   headers={"X-Approver-Token": approver_token("mallory@evil.test@example.com")})
        assert (status, body["error"]) == (403, "rule_denied")
        assert [p["id"] for p in (await admin(h, "GET", "/approvals"))[1]["approvals"]] == [pending[0]["id"]]
        status, _ = await admin(h, "POST", decide, json={"approve": False},
                                headers={"X-Approver-Token": approver_token("bob@example.com")})
        assert status == 200
        response = await asyncio.wait_for(held, 10)
        assert (response.status, (await response.json())["error"]) == (403, "approval_denied")
    assert upstream.seen == []
    event = (await h.settle())[-1]
    assert event["approval"]["approver"] == {"iss": ISSUER, "sub": "bob@example.com"}


async def test_a_held_request_times_out_with_approval_timeout(make_sidecar, upstream, tmp_path):
    """Nobody decides: the request is refused with approval_timeout and never forwarded."""
    h = await make_sidecar(approval_config(upstream, tmp_path, timeout="300ms"), APPROVAL_POLICY)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{h.outbound}/billing/v1/refunds", data=b"{}") as r:
            assert (r.status, (await r.json())["error"]) == (403, "approval_timeout")
    assert upstream.seen == []
    event = (await h.settle())[-1]
    assert event["decision"] == "approval_required" and event["approval"]["outcome"] == "timeout"
    assert json.loads(json.dumps(event))["rule_id"] == "refunds-need-a-human"


async def test_requests_waiting_for_approval_are_bounded(make_sidecar, upstream, tmp_path, monkeypatch):
    """Beyond the cap of held requests, new ones are refused at once (rate_limited), never queued."""
    from sidecar import approvals

    monkeypatch.setattr(approvals, "MAX_PENDING", 1)
    h = await make_sidecar(approval_config(upstream, tmp_path, timeout="5s"), APPROVAL_POLICY)
    async with aiohttp.ClientSession() as s:
        held = asyncio.ensure_future(s.post(f"{h.outbound}/billing/v1/refunds", data=b"{}"))
        assert await listed(h)
        async with s.post(f"{h.outbound}/billing/v1/refunds", data=b"{}") as r:
            assert (r.status, (await r.json())["error"]) == (429, "rate_limited")
        held.cancel()
    assert upstream.seen == []


ARG_SECRET = "canary-argument-secret-7f1d"
TOOL_APPROVAL_POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "refunds-need-a-human", "direction": "outbound", "upstream": "tools", "mcp": {"tools": ["refund"]},
     "effect": "require_approval"}]}


async def test_an_approver_sees_a_held_tool_calls_arguments_and_the_digest_of_what_is_sent(
        make_sidecar, upstream, tmp_path):
    """A held tools/call lists its arguments (secret-looking values masked, capped with a marker) and the
    SHA-256 of its body; the upstream receives exactly that body (issue 11 item 13)."""
    received: list[bytes] = []

    async def mcp_server(request: web.Request) -> web.Response:  # answers as an MCP server does
        received.append(await request.read())
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": [], "isError": False}})

    tools = await Upstream(mcp_server).start()
    config = approval_config(upstream, tmp_path)
    config["outbound"]["upstreams"]["tools"] = {"url": tools.url + "/mcp", "protocol": "mcp"}
    h = await make_sidecar(config, TOOL_APPROVAL_POLICY)
    arguments = {"invoice": "INV-7", "amount": 120, "api_key": ARG_SECRET, "note": "n" * 10000}
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": "refund", "arguments": arguments}}).encode()
    async with aiohttp.ClientSession() as s:
        held = asyncio.ensure_future(s.post(f"{h.outbound}/tools", data=body,
                                            headers={"Content-Type": "application/json"}))
        [pending] = await listed(h)
        assert received == []
        shown = pending["mcp_arguments"]
        assert pending["mcp_tool"] == "refund" and '"invoice":"INV-7","amount":120' in shown
        assert '"api_key":"<redacted>"' in shown and ARG_SECRET not in shown
        assert pending["mcp_arguments_truncated"] is True and len(shown) == 4096
        assert shown.endswith(" chars]") and "...[truncated from " in shown
        assert pending["body_sha256"] == hashlib.sha256(body).hexdigest()
        await approve(h, pending["id"])
        assert (await asyncio.wait_for(held, 10)).status == 200
    await tools.stop()
    assert received == [body]
    event = (await h.settle())[-1]
    assert event["approval"]["body_sha256"] == pending["body_sha256"] and event["reason"] == "approved"
    assert ARG_SECRET.encode() not in h.raw_log()


async def test_a_held_tool_call_that_times_out_is_a_jsonrpc_error(make_sidecar, upstream, tmp_path):
    """Nobody approves a held tools/call: the agent gets a JSON-RPC error (-32002), nothing is sent (issue 13 item 1)."""
    config = approval_config(upstream, tmp_path, timeout="300ms")
    config["outbound"]["upstreams"]["tools"] = {"url": upstream.url + "/mcp", "protocol": "mcp"}
    h = await make_sidecar(config, TOOL_APPROVAL_POLICY)
    body = json.dumps({"jsonrpc": "2.0", "id": "r-1", "method": "tools/call", "params": {"name": "refund"}})
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{h.outbound}/tools", data=body, headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200 and 'details="approval_timeout"' in r.headers["Proxy-Status"]
            answer = await r.json()
    assert answer["id"] == "r-1" and answer["error"]["code"] == -32002
    assert answer["error"]["data"]["rule_id"] == "refunds-need-a-human"
    assert upstream.seen == []
    event = (await h.settle())[-1]
    assert (event["decision"], event["reason"], event["status"]) == ("approval_required", "approval_timeout", 200)


async def test_a_held_chunked_body_is_read_first_so_its_digest_is_what_is_sent(make_sidecar, upstream, tmp_path):
    """A held request's streamed body is buffered before the approver looks: the listed digest is of the
    bytes then forwarded (issue 11 item 13)."""
    h = await make_sidecar(approval_config(upstream, tmp_path), APPROVAL_POLICY)

    async def chunks():
        for piece in (b'{"amount":', b"120}"):
            yield piece

    async with aiohttp.ClientSession() as s:
        held = asyncio.ensure_future(s.post(f"{h.outbound}/billing/v1/refunds", data=chunks()))
        [pending] = await listed(h)
        assert pending["body_sha256"] == hashlib.sha256(b'{"amount":120}').hexdigest()
        assert pending["mcp_arguments"] is None
        await approve(h, pending["id"])
        assert (await asyncio.wait_for(held, 10)).status == 200
    assert upstream.seen[0].body == b'{"amount":120}'


async def held(h, path: str) -> tuple[asyncio.Task, list[dict]]:
    """Send a request that policy holds for approval; return it (in flight) and the approvals listed."""
    async def send() -> int:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{h.outbound}{path}", data=b"{}") as r:
                return r.status
    request = asyncio.ensure_future(send())
    for _ in range(200):
        _, body = await admin(h, "GET", "/approvals")
        if body["approvals"]:
            return request, body["approvals"]
        await asyncio.sleep(0.02)
    request.cancel()
    raise AssertionError("no approval appeared")


async def test_the_approver_sees_the_query_of_the_request_they_approve(make_sidecar, upstream, tmp_path):
    """GET /approvals shows the query string with method and path: an approver must be able to tell a
    harmless held request from one whose effect is carried in the query (security review 2, finding G6)."""
    h = await make_sidecar(approval_config(upstream, tmp_path, timeout="10s"), APPROVAL_POLICY)
    request, pending = await held(h, "/billing/v1/refunds?amount=99999999&to=attacker-iban")
    try:
        assert "amount=99999999" in json.dumps(pending[0])
    finally:
        await admin(h, "POST", f"/approvals/{pending[0]['id']}", json={"approve": False},
                    headers={"X-Approver-Token": approver_token("bob@example.com")})
        await asyncio.wait_for(request, 10)


async def test_an_approval_is_decided_once_by_a_listed_human_and_ids_are_unguessable(make_sidecar, upstream, tmp_path):
    """A second decision on the same id is 404; a workload token, no approver token, or no admin token
    (what the agent on loopback has) decide nothing; ids carry 96 random bits (security review 2: a
    defence that held)."""
    h = await make_sidecar(approval_config(upstream, tmp_path, timeout="10s"), APPROVAL_POLICY)
    request, pending = await held(h, "/billing/v1/refunds")
    approval_id = pending[0]["id"]
    assert len(approval_id) == 24 and int(approval_id, 16) >= 0
    url = f"http://127.0.0.1:{h.port('admin')}/approvals/{approval_id}"
    async with aiohttp.ClientSession() as s:  # the agent: no admin token
        async with s.post(url, json={"approve": True},
                          headers={"X-Approver-Token": approver_token("bob@example.com")}) as r:
            assert r.status == 401
        async with s.post(f"http://127.0.0.1:{h.port('admin')}/tasks", json={"principal": "alice"}) as r:
            assert r.status == 401
    workload = jwt.encode({"iss": ISSUER, "sub": "bob@example.com", "aud": "agent-approvals",
                           "iat": int(time.time()), "exp": int(time.time()) + 300, "client_id": "bob@example.com"},
                          KEY, algorithm="ES256", headers={"kid": "k1"})
    assert (await admin(h, "POST", f"/approvals/{approval_id}", json={"approve": True},
                        headers={"X-Approver-Token": workload}))[0] == 403
    assert (await admin(h, "POST", f"/approvals/{approval_id}", json={"approve": True}))[0] == 401
    assert not request.done()
    approving = {"json": {"approve": True}, "headers": {"X-Approver-Token": approver_token("bob@example.com")}}
    assert (await admin(h, "POST", f"/approvals/{approval_id}", **approving))[0] == 200
    deny = {"json": {"approve": False}, "headers": {"X-Approver-Token": approver_token("carol@example.com")}}
    assert (await admin(h, "POST", f"/approvals/{approval_id}", **deny))[0] == 404
    assert await asyncio.wait_for(request, 10) == 200
    event = [e for e in await h.settle() if e["approval"]][-1]
    assert event["approval"]["approver"]["sub"] == "bob@example.com"
