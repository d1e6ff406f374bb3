"""The inbound listener: mTLS callers, human tokens, tasks, and what the agent receives."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
import time
from types import SimpleNamespace
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from multidict import CIMultiDict

from sidecar.errors import Refusal
from sidecar.identity.ca import ca_issue
from tests.harness import BOUND, OK, SidecarHarness, Upstream, read_until
from tests.scenarios.inbound import (ISSUER, KEY, ORCHESTRATOR, POLICY, call, client_context, human_token,
                                     inbound_config, inbound_to)


async def test_an_svid_caller_reaches_the_agent_with_its_identity(make_sidecar, agent, tmp_path):
    """A caller with a valid SVID is forwarded; the agent sees XFCC with its SPIFFE ID, not spoofed copies."""
    h = await make_sidecar(inbound_config(tmp_path, agent), POLICY)
    ctx = client_context(h, "spiffe://sidecar.local/orchestrator", tmp_path / "caller")
    status, _ = await call(h, ctx, "/tasks/1", {"X-Forwarded-Client-Cert": "URI=spiffe://evil/x",
                                               "X-Sidecar-Task": "forged"})
    assert status == 200
    seen = agent.seen[-1]
    xfcc = seen.header("X-Forwarded-Client-Cert")
    assert xfcc.startswith(f"By={h.sidecar.runtime.agent.id};Hash=") and xfcc.endswith(
        ";URI=spiffe://sidecar.local/orchestrator")
    assert seen.header("X-Sidecar-Task") is None
    event = (await h.settle())[-1]
    assert event["caller"] == {"id": "spiffe://sidecar.local/orchestrator"} and event["actor_type"] == "workload"


async def test_trace_is_refused_before_the_agent_could_echo_the_callers_token(make_sidecar, agent, tmp_path):
    """An inbound TRACE, which would echo the caller's token, never reaches the agent (issue 11 item 4)."""
    h = await make_sidecar(inbound_config(tmp_path, agent), POLICY)
    ctx = client_context(h, "spiffe://sidecar.local/orchestrator", tmp_path / "caller")
    token = human_token()
    async with aiohttp.ClientSession() as s:
        async with s.request("TRACE", f"https://127.0.0.1:{h.port('inbound')}/tasks/1", ssl=ctx,
                             headers={"Authorization": f"Bearer {token}"}) as r:
            status, body = r.status, await r.json()
    assert (status, body["error"]) == (405, "method_not_allowed")
    assert agent.seen == [] and token not in json.dumps(body)
    [event] = await h.settle()
    assert (event["direction"], event["reason"], event["status"]) == ("inbound", "method_not_allowed", 405)
    assert event["caller"] == {"id": "spiffe://sidecar.local/orchestrator"} and event["task"] is None


async def test_a_human_token_opens_a_task_and_never_reaches_the_agent(make_sidecar, agent, tmp_path):
    """A verified human token becomes a task id for the agent; the token itself is removed."""
    h = await make_sidecar(inbound_config(tmp_path, agent), POLICY)
    ctx = client_context(h, "spiffe://sidecar.local/orchestrator", tmp_path / "caller")
    token = human_token()
    status, _ = await call(h, ctx, "/tasks/1", {"Authorization": f"Bearer {token}", "X-Task-Trigger": "support"})
    assert status == 200
    seen = agent.seen[-1]
    assert seen.header("Authorization") is None
    assert token not in json.dumps(seen.headers)
    task_id = seen.header("X-Sidecar-Task")
    assert task_id and len(task_id) == 32
    event = (await h.settle())[-1]
    assert event["principal"] == {"iss": ISSUER, "sub": "alice@example.com"}
    assert event["actor_type"] == "human" and event["delegation"] == "delegated"
    assert event["task"] == {"id": task_id, "trigger": "support"}
    assert token.encode() not in h.raw_log()


async def test_a_task_ends_when_its_inbound_request_completes(make_sidecar, agent, tmp_path):
    """With tasks.end: response, the agent's later outbound call naming the task gets task_ended."""
    up = await Upstream().start()
    try:
        config = inbound_config(tmp_path, agent)
        config["outbound"] = {"upstreams": {"crm": {"url": up.url}}}
        policy = {**POLICY, "rules": [*POLICY["rules"], {"id": "crm", "direction": "outbound", "upstream": "crm",
                                                          "effect": "allow"}]}
        h = await make_sidecar(config, policy)
        ctx = client_context(h, "spiffe://sidecar.local/orchestrator", tmp_path / "caller")
        await call(h, ctx, "/tasks/1", {"Authorization": f"Bearer {human_token()}"})
        task_id = agent.seen[-1].header("X-Sidecar-Task")
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{h.outbound}/crm/x", headers={"X-Sidecar-Task": task_id}) as r:
                assert (r.status, (await r.json())["error"]) == (403, "task_ended")
            async with s.get(f"{h.outbound}/crm/x", headers={"X-Sidecar-Task": "f" * 32}) as r:
                assert (r.status, (await r.json())["error"]) == (403, "unknown_task")
        assert up.seen == []
    finally:
        await up.stop()


@pytest.mark.parametrize("make_token, why", [
    (lambda: human_token(exp=int(time.time()) - 600), "expired"),
    (lambda: human_token(aud="someone-else"), "wrong audience"),
    (lambda: jwt.encode({"iss": ISSUER, "sub": "x", "aud": "billing-agent", "exp": int(time.time()) + 60},
                        "k" * 32, algorithm="HS256"), "HMAC"),
    (lambda: "not-a-jwt", "malformed"),
])
async def test_a_present_but_invalid_token_is_refused_even_when_not_required(make_sidecar, agent, tmp_path,
                                                                             make_token, why):
    """An invalid bearer token is 401 token_invalid, and nothing reaches the agent."""
    h = await make_sidecar(inbound_config(tmp_path, agent), POLICY)
    ctx = client_context(h, "spiffe://sidecar.local/orchestrator", tmp_path / "caller")
    status, body = await call(h, ctx, "/tasks/1", {"Authorization": f"Bearer {make_token()}"})
    assert (status, body["error"]) == (401, "token_invalid"), why
    assert agent.seen == []


async def test_a_caller_without_a_matching_rule_is_refused(make_sidecar, agent, tmp_path):
    """A verified caller that no inbound rule allows gets 403 no_matching_rule."""
    h = await make_sidecar(inbound_config(tmp_path, agent), POLICY)
    ctx = client_context(h, "spiffe://sidecar.local/somebody-else", tmp_path / "caller")
    status, body = await call(h, ctx, "/tasks/1")
    assert (status, body["error"]) == (403, "no_matching_rule")
    assert agent.seen == []


async def test_a_caller_without_a_certificate_is_refused_and_counted(make_sidecar, agent, tmp_path):
    """No client certificate: refused before HTTP, counted under its reason, nothing forwarded."""
    h = await make_sidecar(inbound_config(tmp_path, agent), POLICY)
    ctx = ssl.create_default_context(cafile=str(h.sidecar.config.state_dir / "svid" / "ca.crt"))
    ctx.check_hostname = False
    status, body = await call(h, ctx, "/tasks/1")
    assert (status, body["error"]) == (401, "no_client_cert")
    assert agent.seen == []
    metrics = h.sidecar.metrics.exposition().decode()
    assert 'sidecar_tls_handshake_failures_total{listener="inbound",reason="no_client_cert"} 1.0' in metrics


async def test_an_agent_revocation_of_a_callers_id_refuses_that_caller(make_sidecar, agent, tmp_path):
    """Agents call each other: revoking a caller's SPIFFE ID (kind agent) refuses it on the inbound listener."""
    from tests.harness import admin

    h = await make_sidecar(inbound_config(tmp_path, agent), POLICY)
    ctx = client_context(h, "spiffe://sidecar.local/orchestrator", tmp_path / "caller")
    assert (await call(h, ctx, "/tasks/1"))[0] == 200
    status, _ = await admin(h, "POST", "/revocations", json={"kind": "agent",
                                                             "id": "spiffe://sidecar.local/orchestrator"})
    assert status == 201
    status, body = await call(h, ctx, "/tasks/2")
    assert (status, body["error"]) == (403, "revoked")
    assert len(agent.seen) == 1


async def test_a_kept_alive_connection_does_not_outlive_the_callers_certificate(make_sidecar, agent, tmp_path):
    """Once the caller's SVID expires, its open connection is refused (peer_unverified), not trusted on."""
    import asyncio
    from datetime import timedelta

    h = await make_sidecar(inbound_config(tmp_path, agent), POLICY)
    paths = ca_issue(h.sidecar.config.state_dir, "spiffe://sidecar.local/orchestrator", tmp_path / "short",
                     timedelta(seconds=2))
    ctx = ssl.create_default_context(cafile=str(paths["bundle"]))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(paths["cert"]), str(paths["key"]))
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port("inbound"), ssl=ctx)

    async def get() -> int:
        writer.write(b"GET /tasks/1 HTTP/1.1\r\nHost: agent\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(next(l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        return int(head.split(b" ")[1])

    try:
        assert await get() == 200
        status = 200
        for _ in range(100):  # bounded: until the certificate's notAfter has passed, on the same connection
            await asyncio.sleep(0.1)
            status = await get()
            if status != 200:
                break
        assert status == 401
    finally:
        writer.close()


async def test_a_replayed_human_token_opens_at_most_the_principals_cap_of_tasks(make_sidecar, agent, tmp_path):
    """One human token replayed opens at most tasks.max_open_per_principal tasks; the next call is
    refused rate_limited with Retry-After, reaches no agent, and is one event (issue 11 item 3)."""
    config = inbound_config(tmp_path, agent)
    config["tasks"] = {"end": "ttl", "max_open_per_principal": 2}
    h = await make_sidecar(config, POLICY)
    ctx = client_context(h, "spiffe://sidecar.local/orchestrator", tmp_path / "caller")
    token = human_token()
    url = f"https://127.0.0.1:{h.port('inbound')}/tasks/1"
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.get(url, ssl=ctx, headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200
        async with s.get(url, ssl=ctx, headers={"Authorization": f"Bearer {token}"}) as r:
            body = await r.json()
            assert (r.status, body["error"]) == (429, "rate_limited")
            assert "tasks.max_open_per_principal" in body["message"]
            assert int(r.headers["Retry-After"]) >= 1
        async with s.get(url, ssl=ctx, headers={"Authorization": f"Bearer {human_token('bob@example.com')}"}) as r:
            assert r.status == 200  # another principal has caps of its own
    assert len(agent.seen) == 3 and token not in json.dumps([seen.headers for seen in agent.seen])
    refused = [e for e in await h.settle() if e["reason"] == "rate_limited"]
    assert len(refused) == 1 and refused[0]["status"] == 429 and refused[0]["task"] is None
    assert refused[0]["principal"] == {"iss": ISSUER, "sub": "alice@example.com"}
    assert h.sidecar.runtime.tasks.open_count == 3
    assert token.encode() not in h.raw_log()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def registry(clock: Clock, **overrides: object):
    from sidecar.config_model import TasksConfig
    from sidecar.tasks import TaskRegistry

    return TaskRegistry.from_config(TasksConfig(**{"max_ttl": 3600.0, **overrides}), clock=clock, monotonic=clock)


def open_task(tasks, sub: str = "alice@example.com", ttl: float = 900.0):
    return tasks.open(principal=(ISSUER, sub), subject_token=None, delegation="delegated", actor_type="human",
                      trigger=None, ttl=ttl)


def test_an_hour_of_replayed_tasks_keeps_at_most_max_tombstones(tmp_path):
    """50 tasks a second opened and ended for an hour leave at most max_tombstones tombstones, the newest
    kept (task_ended), the oldest forgotten (unknown_task) (issue 11 item 3)."""
    from sidecar.errors import TaskRefused

    clock = Clock()
    tasks = registry(clock, max_tombstones=1000)
    first = last = None
    for _ in range(50 * 3600):
        task = open_task(tasks)
        tasks.end(task.id)
        first, last = first or task, task
        clock.now += 0.02
    assert tasks.tombstone_count == 1000 and tasks.open_count == 0
    with pytest.raises(TaskRefused) as newest:
        tasks.get(last.id)
    with pytest.raises(TaskRefused) as oldest:
        tasks.get(first.id)
    assert (newest.value.reason, oldest.value.reason) == ("task_ended", "unknown_task")


@pytest.mark.parametrize("how, after_end, reason", [
    # within max_ttl of its end: a late call learns why the task is gone
    ("task_ended", 3599.0, "task_ended"),
    ("revoked", 3599.0, "revoked"),
    # past max_ttl since its end (not since it opened): forgotten
    ("task_ended", 3601.0, "unknown_task"),
    ("revoked", 3601.0, "unknown_task"),
])
def test_a_tombstone_expires_max_ttl_after_the_task_ended(how, after_end, reason):
    """A tombstone is kept for max_ttl from the task's end, not from its opening (issue 11 item 3)."""
    from sidecar.errors import TaskRefused

    clock = Clock()
    tasks = registry(clock)
    task = open_task(tasks, ttl=900.0)
    clock.now += 600.0  # ended well before its TTL
    tasks.end(task.id, how)
    clock.now += after_end
    open_task(tasks, sub="someone-else")  # any later activity sweeps
    with pytest.raises(TaskRefused) as refused:
        tasks.get(task.id)
    assert refused.value.reason == reason


def test_the_open_task_cap_frees_a_slot_when_a_task_ends_or_expires():
    """At the cap a principal's next task is refused with Retry-After until the earliest ends; an ended or
    expired task frees its slot (issue 11 item 3)."""
    from sidecar.errors import TaskRefused

    clock = Clock()
    tasks = registry(clock, max_open_per_principal=2)
    early, _ = open_task(tasks, ttl=60.0), open_task(tasks, ttl=900.0)
    with pytest.raises(TaskRefused) as refused:
        open_task(tasks)
    assert (refused.value.reason, refused.value.status, refused.value.retry_after) == ("rate_limited", 429, 60)
    open_task(tasks, sub="bob@example.com")  # other principals are not affected
    clock.now += 61.0  # the early one is past its TTL (no event loop ran its timer)
    replacement = open_task(tasks)
    tasks.end(replacement.id)
    open_task(tasks)
    assert tasks.open_count == 3


@pytest.mark.parametrize("step", [3600.0, -3600.0])
def test_a_stepped_wall_clock_neither_ends_a_task_nor_keeps_it_open(step):
    """A task's TTL runs on the monotonic clock: the wall clock stepped an hour forward (NTP, a VM resumed) does
    not end a 30-minute task, nor does one stepped an hour back keep it past its 30 minutes (issue 12: the chaos
    harness's clock faults)."""
    from sidecar.config_model import TasksConfig
    from sidecar.errors import TaskRefused
    from sidecar.tasks import TaskRegistry

    wall, monotonic = Clock(), Clock()
    tasks = TaskRegistry.from_config(TasksConfig(max_ttl=3600.0), clock=wall, monotonic=monotonic)
    task = open_task(tasks, ttl=1800.0)
    wall.now += step
    assert tasks.get(task.id) is task and [t.id for t in tasks.open_tasks()] == [task.id]
    monotonic.now += 1800.0
    with pytest.raises(TaskRefused) as ended:
        tasks.get(task.id)
    assert ended.value.reason == "task_ended"


async def test_callers_cannot_assert_identity_to_the_agent(make_sidecar, agent, tmp_path):
    """Identity headers a fronting proxy would set (X-Forwarded-User, X-Auth-Request-*, Remote-User...)
    are removed from callers' requests too (issue 11 item 12)."""
    h = await make_sidecar(inbound_config(tmp_path, agent), POLICY)
    ctx = client_context(h, "spiffe://sidecar.local/orchestrator", tmp_path / "caller")
    spoofed = {"X-Forwarded-User": "admin", "X-Forwarded-Email": "admin@example.com", "X-Remote-User": "admin",
               "X-Remote-Group": "admins", "X-Auth-Request-User": "admin", "Remote-User": "admin"}
    status, _ = await call(h, ctx, "/tasks/1", spoofed)
    assert status == 200
    assert [name for name in spoofed if agent.seen[-1].has_header(name)] == []


DRY_RUN_POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "dry-runs", "direction": "inbound", "callers": ["spiffe://sidecar.local/orchestrator"],
     "paths": ["/tasks/**"], "headers": {"x-dry-run": ["true"]}, "effect": "allow"},
    {"id": "dry-runs-cel", "direction": "inbound", "paths": ["/jobs/**"],
     "when": {"expr": '"x-dry-run" in request.headers'}, "effect": "allow"},
]}


@pytest.mark.parametrize("path", ["/tasks/1", "/jobs/1"])
async def test_inbound_header_conditions_see_only_forwarded_headers(make_sidecar, agent, tmp_path, path):
    """A caller's header named in Connection never reaches the agent, so it satisfies neither a header
    condition nor a CEL request.headers test (issue 11 item 10)."""
    h = await make_sidecar(inbound_config(tmp_path, agent), DRY_RUN_POLICY)
    ctx = client_context(h, "spiffe://sidecar.local/orchestrator", tmp_path / "caller")
    status, body = await call(h, ctx, path, {"X-Dry-Run": "true", "Connection": "keep-alive, X-Dry-Run"})
    assert (status, body["error"]) == (403, "no_matching_rule")
    assert agent.seen == []
    assert [e["reason"] for e in await h.settle()] == ["no_matching_rule"]
    assert (await call(h, ctx, path, {"X-Dry-Run": "true"}))[0] == 200


@pytest.mark.parametrize("path, headers, reason", [
    ("/tasks/1", {"X-HTTP-Method-Override": "DELETE"}, "request_override"),   # issue 11 item 9
    ("/tasks/1", {"X-Original-URL": "/admin"}, "request_override"),           # issue 11 item 9
    ("/tasks/1?_method=DELETE", {}, "request_override"),                      # issue 11 item 9
    ("/tasks/1?access_token=human-token-canary", {}, "credential_parameter"),  # issue 11 item 12
])
async def test_callers_cannot_override_the_request_or_hand_the_agent_a_token(make_sidecar, agent, tmp_path, path,
                                                                             headers, reason):
    """Inbound, an override or an access_token parameter is refused with 400 before the agent sees
    anything (issue 11 items 9 and 12)."""
    h = await make_sidecar(inbound_config(tmp_path, agent), POLICY)
    ctx = client_context(h, "spiffe://sidecar.local/orchestrator", tmp_path / "caller")
    status, body = await call(h, ctx, path, headers)
    assert (status, body["error"]) == (400, reason)
    assert agent.seen == []
    assert [e["reason"] for e in await h.settle()] == [reason]
    assert b"canary" not in h.raw_log()


async def test_inbound_forwards_the_path_policy_matched(make_sidecar, agent, tmp_path):
    """The agent must receive the canonical path the inbound rule matched, not the caller's raw path
    (security review 1, finding F2)."""
    resolved: list[str] = []

    async def agent_handler(request: web.Request) -> web.StreamResponse:
        resolved.append(request.url.path)  # how an aiohttp/yarl agent resolves the target it received
        return web.json_response({"ok": True})

    agent = await Upstream(agent_handler).start()
    try:
        config = inbound_config(tmp_path, agent)
        del config["inbound"]["jwt"]
        h = await make_sidecar(config, POLICY)
        ctx = client_context(h, ORCHESTRATOR, tmp_path / "caller")
        url = aiohttp.client.URL(f"https://127.0.0.1:{h.port('inbound')}/admin//../tasks/x", encoded=True)
        async with aiohttp.ClientSession() as s:
            async with s.get(url, ssl=ctx) as r:
                assert r.status == 200  # policy matched /tasks/x
        event = (await h.settle())[-1]
        assert event["target"]["path"] == "/tasks/x"
        assert agent.seen[-1].path == "/tasks/x", f"agent received {agent.seen[-1].path!r}, resolved {resolved}"
    finally:
        await agent.stop()


def machine_token(**claims: Any) -> str:
    """A token from the inbound issuer with no ``client_id``: only the claims given mark its actor."""
    now = int(time.time())
    return jwt.encode({"iss": ISSUER, "aud": "billing-agent", "iat": now, "exp": now + 300, **claims},
                      KEY, algorithm="ES256", headers={"kid": "k1"})


async def test_a_client_credentials_token_is_not_treated_as_a_human(make_sidecar, agent, tmp_path):
    """With the default actor: auto, an Auth0-style machine token (sub "<client>@clients", azp "<client>";
    Keycloak and Entra service tokens look alike) must not count as a human nor open a delegated task
    (security review 2, finding G3)."""
    h = await make_sidecar(inbound_config(tmp_path, agent), POLICY)
    ctx = client_context(h, ORCHESTRATOR, tmp_path / "caller")
    machine = machine_token(sub="svc-billing@clients", azp="svc-billing", gty="client-credentials")
    status, _ = await call(h, ctx, "/tasks/1", {"Authorization": f"Bearer {machine}"})
    assert status == 200
    event = (await h.settle())[-1]
    assert event["actor_type"] == "workload" and event["delegation"] == "none"
    assert agent.seen[-1].header("X-Sidecar-Task") is None


async def test_a_certificate_bound_token_presented_by_another_client_is_refused(make_sidecar, agent, tmp_path):
    """A token bound to a client certificate (RFC 8705 cnf x5t#S256) must be refused from an mTLS peer
    holding a different certificate: a stolen sender-constrained token would otherwise replay from any
    caller the policy admits (security review 2, finding G4)."""
    h = await make_sidecar(inbound_config(tmp_path, agent), POLICY)
    ctx = client_context(h, ORCHESTRATOR, tmp_path / "caller")
    other = base64.urlsafe_b64encode(hashlib.sha256(b"someone else's certificate").digest()).rstrip(b"=").decode()
    bound = human_token(cnf={"x5t#S256": other})
    status, body = await call(h, ctx, "/tasks/1", {"Authorization": f"Bearer {bound}"})
    assert (status, body.get("error")) == (401, "token_invalid")
    assert agent.seen == []


async def test_without_inbound_jwt_the_callers_bearer_token_does_not_reach_the_agent(make_sidecar, agent, tmp_path):
    """With no inbound.jwt issuers, a caller's Authorization header (a human's token) must not be forwarded
    to the agent unverified: the agent gets a task id, never the human's token (security review 2,
    finding G5)."""
    config = inbound_config(tmp_path, agent)
    del config["inbound"]["jwt"]
    h = await make_sidecar(config, POLICY)
    ctx = client_context(h, ORCHESTRATOR, tmp_path / "caller")
    token = human_token()
    status, _ = await call(h, ctx, "/tasks/1", {"Authorization": f"Bearer {token}"})
    assert status == 200
    assert agent.seen[-1].header("Authorization") is None


async def test_spoofed_forwarding_headers_never_reach_the_agent(make_sidecar, agent, tmp_path):
    """Caller copies of XFCC (any case, repeated), X-Sidecar-Task, X-Forwarded-*, Forwarded and tracestate are
    dropped, a Connection-listed name cannot remove the sidecar's own, and traceparent gets a new span
    (security review 2: a defence that held)."""
    h = await make_sidecar(inbound_config(tmp_path, agent), POLICY)
    ctx = client_context(h, ORCHESTRATOR, tmp_path / "caller")
    incoming_span = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    headers = CIMultiDict([
        ("x-forwarded-client-cert", "By=spiffe://evil/x;URI=spiffe://sidecar.local/admin"),
        ("X-FORWARDED-CLIENT-CERT", "URI=spiffe://sidecar.local/admin"),
        ("X-Sidecar-Task", "f" * 32), ("x-sidecar-task", "e" * 32),
        ("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-Proto", "http"), ("X-Forwarded-Host", "admin.internal"),
        ("X-Forwarded-Port", "80"), ("Forwarded", "for=10.0.0.1;proto=http"), ("tracestate", "evil=1"),
        ("traceparent", incoming_span), ("Connection", "keep-alive, X-Forwarded-Client-Cert, X-Forwarded-For"),
    ])
    url = f"https://127.0.0.1:{h.port('inbound')}/tasks/1"
    async with aiohttp.ClientSession() as s:
        async with s.get(url, ssl=ctx, headers=headers) as r:
            assert r.status == 200
    seen = agent.seen[-1]
    values = lambda name: [v for k, v in seen.headers if k.lower() == name]  # noqa: E731
    assert values("x-forwarded-client-cert") == [
        f"By={h.sidecar.runtime.agent.id};Hash={values('x-forwarded-client-cert')[0].split('Hash=')[1].split(';')[0]};"
        f"URI={ORCHESTRATOR}"]
    assert values("x-sidecar-task") == []
    assert values("x-forwarded-for") == ["127.0.0.1"] and values("x-forwarded-proto") == ["https"]
    for name in ("x-forwarded-host", "x-forwarded-port", "forwarded", "tracestate"):
        assert values(name) == [], name
    (traceparent,) = values("traceparent")
    assert traceparent.split("-")[1] == incoming_span.split("-")[1] and traceparent != incoming_span


async def test_each_request_on_a_kept_alive_connection_gets_its_own_task(make_sidecar, agent, tmp_path):
    """On one kept-alive mTLS connection, each human token opens its own task (ended with its response), and a
    later request without a token carries no task id of an earlier one (security review 2: a defence that
    held)."""
    h = await make_sidecar(inbound_config(tmp_path, agent), POLICY)
    ctx = client_context(h, ORCHESTRATOR, tmp_path / "caller")
    url = f"https://127.0.0.1:{h.port('inbound')}/tasks/1"
    connector = aiohttp.TCPConnector(limit=1, ssl=ctx)
    async with aiohttp.ClientSession(connector=connector) as s:
        for headers in ({"Authorization": f"Bearer {human_token('alice@example.com')}"},
                        {"Authorization": f"Bearer {human_token('bob@example.com')}"}, {}):
            async with s.get(url, headers=headers) as r:
                assert r.status == 200
                await r.read()
    first, second, third = (seen.header("X-Sidecar-Task") for seen in agent.seen[-3:])
    assert first and second and first != second and third is None
    events = [e for e in await h.settle() if e["direction"] == "inbound"][-3:]
    assert [e["principal"] and e["principal"]["sub"] for e in events] == ["alice@example.com", "bob@example.com", None]
    assert len({e["caller"]["id"] for e in events}) == 1
    for task_id in (first, second):
        with pytest.raises(Refusal):
            h.sidecar.runtime.tasks.get(task_id)


async def tls_exchange(h: SidecarHarness, ctx: ssl.SSLContext, data: bytes) -> bytes:
    """Write ``data`` to the inbound listener over mTLS and read what comes back, within BOUND."""
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port("inbound"), ssl=ctx,
                                                   server_hostname="localhost")
    writer.write(data)
    try:
        return await read_until(reader, b"}")  # the end of a JSON refusal
    finally:
        writer.close()


async def test_an_upload_the_caller_stops_sending_is_timed_out_by_idle(make_sidecar, raw_server, tmp_path):
    """A caller that declares a body and stops sending it (slowloris) is refused with 408 request_timeout
    after inbound.timeouts.idle, and the agent's connection is closed, instead of holding one of the
    agent pool's connections for as long as the caller keeps its socket open (security review 4,
    finding I2)."""
    agent_closed = asyncio.Event()

    async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.read()  # waits for the rest of the body, which never comes
        agent_closed.set()

    h = await make_sidecar(inbound_to(tmp_path, await raw_server(agent), idle="300ms"), POLICY)
    ctx = client_context(h, ORCHESTRATOR, tmp_path / "caller")
    answer = await tls_exchange(h, ctx, b"POST /tasks/1 HTTP/1.1\r\nHost: agent\r\nContent-Length: 10\r\n\r\nhalf!")
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"error":"request_timeout"' in answer
    async with asyncio.timeout(BOUND):
        await agent_closed.wait()
    assert h.sidecar.runtime.sessions.agent()._open == 0
    event = (await h.settle())[-1]
    assert event["reason"] == "request_timeout" and event["status"] == 408 and event["outcome"] == "refused"


async def test_the_agent_gets_the_base_path_its_own_host_and_never_the_callers_token(
        make_sidecar, raw_server, tmp_path):
    """An inbound call reaches the agent at forward_to's base path with the agent's Host, the sidecar's
    X-Forwarded-* and XFCC (never the caller's copies), a task id instead of the human's token, and no
    header the caller named in Connection (security review 4: a regression that held)."""
    heads: list[bytes] = []

    async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(OK)

    port = await raw_server(agent)
    config = inbound_config(tmp_path, SimpleNamespace(url=f"http://127.0.0.1:{port}/base/"))
    h = await make_sidecar(config, POLICY)
    ctx = client_context(h, ORCHESTRATOR, tmp_path / "caller")
    token = human_token()
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port("inbound"), ssl=ctx,
                                                   server_hostname="localhost")
    writer.write(b"GET /tasks/a/../1?q=%41 HTTP/1.1\r\nHost: agent.example:17443\r\n"
                 b"Authorization: Bearer " + token.encode() + b"\r\nX-Forwarded-For: 6.6.6.6\r\n"
                 b"X-Forwarded-Host: evil\r\nForwarded: for=evil\r\nX-Sidecar-Task: forged\r\n"
                 b"X-Forwarded-Client-Cert: URI=spiffe://evil/x\r\nConnection: X-Hidden\r\nX-Hidden: 1\r\n\r\n")
    assert (await read_until(reader, b"ok")).startswith(b"HTTP/1.1 200 ")
    writer.close()
    lines = heads[0].decode().split("\r\n")
    got = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines[1:] if line)}
    assert lines[0] == "GET /base/tasks/1?q=%41 HTTP/1.1"
    assert got["host"] == f"127.0.0.1:{port}"
    assert got["x-forwarded-for"] == "127.0.0.1" and got["x-forwarded-proto"] == "https"
    assert got["x-forwarded-client-cert"].endswith(";URI=spiffe://sidecar.local/orchestrator")
    assert len(got["x-sidecar-task"]) == 32 and got["x-sidecar-task"] != "forged"
    for absent in ("authorization", "x-forwarded-host", "forwarded", "x-hidden", "connection"):
        assert absent not in got
    assert token.encode() not in heads[0]
