"""The inbound listener: mTLS callers, human tokens, tasks, and what the agent receives."""

from __future__ import annotations

import json
import ssl
import time
from pathlib import Path

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.identity.ca import ca_issue
from tests.harness import SidecarHarness, Upstream

ISSUER = "https://login.example.test"
KEY = ec.generate_private_key(ec.SECP256R1())


def jwks_file(tmp: Path) -> Path:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(KEY.public_key()))
    jwk.update({"kid": "k1", "alg": "ES256", "use": "sig"})
    path = tmp / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    return path


def human_token(sub: str = "alice@example.com", **claims: object) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "sub": sub, "aud": "billing-agent", "iat": now, "exp": now + 300,
               "client_id": "web-app", **claims}
    return jwt.encode(payload, KEY, algorithm="ES256", headers={"kid": "k1"})


def inbound_config(tmp: Path, agent: Upstream, **jwt_extra: object) -> dict:
    return {
        "agent": {"name": "billing-agent"},
        "inbound": {"forward_to": agent.url, "trust_domains": ["sidecar.local"],
                    "jwt": {"required": False, "issuers": [{"issuer": ISSUER, "jwks_file": str(jwks_file(tmp)),
                                                           "audiences": ["billing-agent"], **jwt_extra}]}},
        "outbound": {"upstreams": {}},
    }


POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "orchestrator", "direction": "inbound", "callers": ["spiffe://sidecar.local/orchestrator"],
     "paths": ["/tasks/**"], "effect": "allow"},
]}


def client_context(h: SidecarHarness, spiffe_id: str, out: Path) -> ssl.SSLContext:
    state = h.sidecar.config.state_dir
    paths = ca_issue(state, spiffe_id, out)
    ctx = ssl.create_default_context(cafile=str(paths["bundle"]))
    ctx.check_hostname = False  # SVIDs name SPIFFE IDs, not hosts
    ctx.load_cert_chain(str(paths["cert"]), str(paths["key"]))
    return ctx


@pytest.fixture
async def agent():
    server = await Upstream().start()
    yield server
    await server.stop()


async def call(h: SidecarHarness, ctx: ssl.SSLContext, path: str, headers: dict | None = None):
    url = f"https://127.0.0.1:{h.port('inbound')}{path}"
    async with aiohttp.ClientSession() as s:
        async with s.get(url, ssl=ctx, headers=headers or {}) as r:
            return r.status, await r.json(content_type=None)


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

    return TaskRegistry.from_config(TasksConfig(**{"max_ttl": 3600.0, **overrides}), clock=clock)


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
