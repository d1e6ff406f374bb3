"""Security review, round 2: the inbound path, approvals, the revocation bus, CONNECT, the injection
webhook and configs that validate but are unsafe.

Tests named ``test_g<N>_...`` reproduce findings G1-G10 of the second review; each failed before
its fix and now asserts it. The others confirm a defence that held.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from multidict import CIMultiDict

from sidecar import inject
from sidecar.inject.settings import LOCKDOWN
from sidecar.admin import ensure_token
from sidecar.config import parse_config
from sidecar.config_model import RevocationConfig
from sidecar.errors import ConfigInvalid, Refusal
from sidecar.fields import Secret
from sidecar.observe.metrics import Metrics
from sidecar.revocation import RedisBus, Revocations
from tests.core.test_inbound import ISSUER, KEY, call, client_context, human_token, inbound_config, jwks_file
from tests.core.test_inbound import POLICY as INBOUND_POLICY
from tests.core.test_outbound import POLICY as OUTBOUND_POLICY
from tests.core.test_outbound import SECRET, config_for
from tests.core.test_reload_and_approval import APPROVAL_POLICY, approval_config, approver_token
from tests.harness import Upstream, admin, raw_http
from tests.test_inject import agent_pod, review

ORCHESTRATOR = "spiffe://sidecar.local/orchestrator"


@pytest.fixture
async def agent():
    server = await Upstream().start()
    yield server
    await server.stop()


def _token(**claims: Any) -> str:
    now = int(time.time())
    return jwt.encode({"iss": ISSUER, "aud": "billing-agent", "iat": now, "exp": now + 300, **claims},
                      KEY, algorithm="ES256", headers={"kid": "k1"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ====================================================================== the revocation bus

def _bus() -> tuple[Revocations, RedisBus]:
    revocations = Revocations(Metrics())
    return revocations, RedisBus(RevocationConfig(Secret("redis://127.0.0.1:1/0")), revocations, Metrics())  # never started


def test_g1_a_future_dated_tombstone_on_the_bus_makes_later_admin_revocations_silently_ineffective():
    """A bus tombstone whose created_at lies in the future (a skewed sidecar's clock, or anyone who can
    write to Redis) suppresses every later local revocation of that id, although POST /revocations says 201."""
    revocations, bus = _bus()
    now = time.time()
    tombstone = {"kind": "task", "id": "t-1", "created_at": now + 600, "expires_at": now + 3600, "deleted": True}
    bus._receive(orjson.dumps(tombstone), observe=False)
    entry = revocations.add("task", "t-1", 3600.0)  # what POST /revocations does; it answers 201 with this entry
    assert entry.rid in {e.rid for e in revocations.list()}
    with pytest.raises(Refusal):
        revocations.check_task(SimpleNamespace(id="t-1", principal=None))


def test_g2_bus_messages_with_non_finite_or_unbounded_times_are_refused():
    """A bus message's times are not range-checked: "inf"/"nan" strings and TTLs far beyond the admin API's
    30-day maximum are applied (a revocation that never expires, and a NaN version that a lift cannot retire)."""
    revocations, bus = _bus()
    now = time.time()
    for message in ({"kind": "subject", "id": "alice", "created_at": "nan", "expires_at": "inf"},
                    {"kind": "subject", "id": "bob", "created_at": now, "expires_at": now + 10 * 365 * 86400}):
        bus._receive(orjson.dumps(message), observe=False)
    assert revocations.list() == []


@pytest.mark.parametrize("payload", [
    b"", b"not json", b"[]", b"[1,2]", b"42", b'"task"', b"null", b'{"kind": "task"}',
    b'{"kind": "task", "id": "x", "created_at": "soon", "expires_at": 1}',
    b'{"kind": "task", "id": "x", "created_at": [], "expires_at": {}}',
    b'{"kind": "bogus", "id": "x", "created_at": 1, "expires_at": 99999999999}',
    b"\xff\xfe garbage",
])
def test_malformed_bus_messages_are_ignored_without_crashing_or_revoking(payload):
    """Malformed or unknown-kind revocation messages are dropped; nothing is revoked and nothing raises."""
    revocations, bus = _bus()
    bus._receive(payload, observe=True)
    assert revocations.list() == []


def test_a_stale_bus_tombstone_cannot_lift_a_newer_revocation():
    """A tombstone for an older version of a revocation leaves the newer, locally made one in force."""
    revocations, bus = _bus()
    now = time.time()
    revocations.add("task", "t-2", 3600.0)
    bus._receive(orjson.dumps({"kind": "task", "id": "t-2", "created_at": now - 60, "expires_at": now + 60,
                               "deleted": True}), observe=False)
    with pytest.raises(Refusal):
        revocations.check_task(SimpleNamespace(id="t-2", principal=None))


# ====================================================================== inbound: identity and headers

async def test_g3_a_client_credentials_token_is_not_treated_as_a_human(make_sidecar, agent, tmp_path):
    """With the default actor: auto, an Auth0-style machine token (sub "<client>@clients", azp "<client>";
    Keycloak and Entra service tokens look alike) counts as a human and opens a delegated task."""
    h = await make_sidecar(inbound_config(tmp_path, agent), INBOUND_POLICY)
    ctx = client_context(h, ORCHESTRATOR, tmp_path / "caller")
    machine = _token(sub="svc-billing@clients", azp="svc-billing", gty="client-credentials")
    status, _ = await call(h, ctx, "/tasks/1", {"Authorization": f"Bearer {machine}"})
    assert status == 200
    event = (await h.settle())[-1]
    assert event["actor_type"] == "workload" and event["delegation"] == "none"
    assert agent.seen[-1].header("X-Sidecar-Task") is None


async def test_g4_a_certificate_bound_token_presented_by_another_client_is_refused(make_sidecar, agent, tmp_path):
    """A token bound to a client certificate (RFC 8705 cnf x5t#S256) is accepted from an mTLS peer holding a
    different certificate: a stolen sender-constrained token replays from any caller the policy admits."""
    h = await make_sidecar(inbound_config(tmp_path, agent), INBOUND_POLICY)
    ctx = client_context(h, ORCHESTRATOR, tmp_path / "caller")
    other = base64.urlsafe_b64encode(hashlib.sha256(b"someone else's certificate").digest()).rstrip(b"=").decode()
    bound = human_token(cnf={"x5t#S256": other})
    status, body = await call(h, ctx, "/tasks/1", {"Authorization": f"Bearer {bound}"})
    assert (status, body.get("error")) == (401, "token_invalid")
    assert agent.seen == []


async def test_g5_without_inbound_jwt_the_callers_bearer_token_does_not_reach_the_agent(make_sidecar, agent, tmp_path):
    """With no inbound.jwt issuers, a caller's Authorization header (a human's token) is forwarded to the agent
    unverified, although the agent is to get a task id and never the human's token."""
    config = inbound_config(tmp_path, agent)
    del config["inbound"]["jwt"]
    h = await make_sidecar(config, INBOUND_POLICY)
    ctx = client_context(h, ORCHESTRATOR, tmp_path / "caller")
    token = human_token()
    status, _ = await call(h, ctx, "/tasks/1", {"Authorization": f"Bearer {token}"})
    assert status == 200
    assert agent.seen[-1].header("Authorization") is None


async def test_spoofed_forwarding_headers_never_reach_the_agent(make_sidecar, agent, tmp_path):
    """Caller copies of XFCC (any case, repeated), X-Sidecar-Task, X-Forwarded-*, Forwarded and tracestate are
    dropped, a Connection-listed name cannot remove the sidecar's own, and traceparent gets a new span."""
    h = await make_sidecar(inbound_config(tmp_path, agent), INBOUND_POLICY)
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
    later request without a token carries no task id of an earlier one."""
    h = await make_sidecar(inbound_config(tmp_path, agent), INBOUND_POLICY)
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


# ====================================================================== approvals and the admin API

async def _held(h, path: str) -> tuple[asyncio.Task, list[dict]]:
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


async def test_g6_the_approver_sees_the_query_of_the_request_they_approve(make_sidecar, upstream, tmp_path):
    """GET /approvals shows method and path but not the query string (nor body or host): an approver cannot
    tell a harmless held request from one whose effect is carried in the query."""
    h = await make_sidecar(approval_config(upstream, tmp_path, timeout="10s"), APPROVAL_POLICY)
    request, pending = await _held(h, "/billing/v1/refunds?amount=99999999&to=attacker-iban")
    try:
        assert "amount=99999999" in json.dumps(pending[0])
    finally:
        await admin(h, "POST", f"/approvals/{pending[0]['id']}", json={"approve": False},
                    headers={"X-Approver-Token": approver_token("bob@example.com")})
        await asyncio.wait_for(request, 10)


async def test_an_approval_is_decided_once_by_a_listed_human_and_ids_are_unguessable(make_sidecar, upstream, tmp_path):
    """A second decision on the same id is 404; a workload token, no approver token, or no admin token
    (what the agent on loopback has) decide nothing; ids carry 96 random bits."""
    h = await make_sidecar(approval_config(upstream, tmp_path, timeout="10s"), APPROVAL_POLICY)
    request, pending = await _held(h, "/billing/v1/refunds")
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
    approve = {"json": {"approve": True}, "headers": {"X-Approver-Token": approver_token("bob@example.com")}}
    assert (await admin(h, "POST", f"/approvals/{approval_id}", **approve))[0] == 200
    deny = {"json": {"approve": False}, "headers": {"X-Approver-Token": approver_token("carol@example.com")}}
    assert (await admin(h, "POST", f"/approvals/{approval_id}", **deny))[0] == 404
    assert await asyncio.wait_for(request, 10) == 200
    event = [e for e in await h.settle() if e["approval"]][-1]
    assert event["approval"]["approver"]["sub"] == "bob@example.com"


def test_g7_an_existing_admin_token_file_readable_by_others_is_refused(tmp_path):
    """ensure_token makes a new file 0600 but accepts an existing token file that is group/world readable
    (for example a ConfigMap or a shared volume), without a warning."""
    path = tmp_path / "admin-token"
    path.write_text("t" * 43 + "\n")
    os.chmod(path, 0o644)
    try:
        ensure_token(path)
    except (ValueError, PermissionError):
        return
    assert path.stat().st_mode & 0o077 == 0


# ====================================================================== configs that validate but are unsafe

def _inbound_raw(tmp_path: Path, forward_to: str, **extra: Any) -> dict:
    return {"agent": {"name": "a"}, "state_dir": str(tmp_path / "state"),
            "inbound": {"forward_to": forward_to}, "outbound": {"upstreams": {}}, **extra}


@pytest.mark.parametrize("case", ["forward_to-outbound", "forward_to-admin", "upstream-outbound",
                                  "approval-audience-is-inbound"])
def test_g8_configs_that_point_the_sidecar_at_itself_are_refused(tmp_path, case):
    """forward_to naming the sidecar's own outbound or admin listener, an upstream naming the outbound listener
    (a request loop), and an approval audience that inbound tokens also carry all pass validation."""
    raw = {
        "forward_to-outbound": _inbound_raw(tmp_path, "http://127.0.0.1:17001"),
        "forward_to-admin": _inbound_raw(tmp_path, "http://localhost:17000"),
        "upstream-outbound": {"agent": {"name": "a"}, "outbound": {"upstreams": {
            "loop": {"url": "http://127.0.0.1:17001/loop"}}}},
        "approval-audience-is-inbound": {
            "agent": {"name": "a"}, "outbound": {"upstreams": {}},
            "inbound": {"forward_to": "http://127.0.0.1:8080", "jwt": {"issuers": [
                {"issuer": ISSUER, "jwks_file": str(jwks_file(tmp_path)),
                 "audiences": ["billing-agent", "agent-approvals"]}]}},
            "admin": {"approvers": [{"issuer": ISSUER, "subject": "*@example.com"}]}},
    }[case]
    with pytest.raises(ConfigInvalid):
        parse_config(raw, base_dir=tmp_path)


async def test_g8_forward_to_the_outbound_listener_lets_a_caller_spend_the_agents_credential(
        make_sidecar, upstream, tmp_path):
    """End to end: with inbound.forward_to set to the outbound listener (valid config), an mTLS caller's
    request is re-entered as the agent's own call and reaches the upstream with the agent's credential."""
    port = _free_port()
    config = config_for(upstream)
    config["outbound"]["listen"] = f"127.0.0.1:{port}"
    config["inbound"] = {"forward_to": f"http://127.0.0.1:{port}", "trust_domains": ["sidecar.local"]}
    policy = {**OUTBOUND_POLICY, "rules": [*OUTBOUND_POLICY["rules"], {
        "id": "orchestrator-anything", "direction": "inbound", "callers": [ORCHESTRATOR], "paths": ["/**"],
        "effect": "allow"}]}
    with pytest.raises(ConfigInvalid):  # refused at load: the loop never runs
        await make_sidecar(config, policy)
    assert upstream.seen == []


# ====================================================================== CONNECT interception

@pytest.mark.parametrize("authority", ["evil.example:443", "billing.internal.evil.example:443",
                                       "127.0.0.1:17000", "[::1]:443", "user@billing.internal:443"])
async def test_connect_mints_no_certificate_for_a_host_that_is_not_mapped(make_sidecar, upstream, authority):
    """CONNECT to any authority that is not in an upstream's hosts is refused before a leaf is minted."""
    h = await make_sidecar(config_for(upstream), OUTBOUND_POLICY)
    data = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    response = await raw_http(h.port("outbound"), data)
    assert response.startswith(b"HTTP/1.1 4")
    assert not response.startswith(b"HTTP/1.1 200")
    assert len(h.sidecar.interceptor.ca._cache) == 0
    assert h.sidecar.interceptor.open_tunnels == 0


# ====================================================================== the injection webhook

def _mutate(pod: dict, settings: inject.InjectSettings) -> dict:
    return inject.mutate_review(inject.parse_review(json.dumps(review(pod)).encode()), settings)


def _patched_names(response: dict) -> set[str]:
    ops = json.loads(base64.b64decode(response["patch"])) if response.get("patch") else []
    names: set[str] = set()
    for op in ops:
        values = op["value"] if isinstance(op["value"], list) else [op["value"]]
        names.update(v.get("name") for v in values if isinstance(v, dict) and "name" in v)
    return names


def _images(response: dict) -> set[str]:
    ops = json.loads(base64.b64decode(response["patch"])) if response.get("patch") else []
    found: set[str] = set()
    for op in ops:
        values = op["value"] if isinstance(op["value"], list) else [op["value"]]
        found.update(v["image"] for v in values if isinstance(v, dict) and "image" in v)
    return found


@pytest.mark.parametrize("annotation, value", [("egress-lockdown", "false"), ("image", "ghcr.io/evil/open-proxy:1")])
def test_g9_a_pod_annotation_cannot_undo_the_operators_egress_lockdown(annotation, value):
    """With egress_lockdown enabled in the webhook settings, the pod's author can turn it off per pod, or run
    any image as the sidecar's UID (the one UID the lock-down lets out of the pod)."""
    settings = inject.InjectSettings(egress_lockdown=True)
    pod = agent_pod()
    pod["metadata"]["annotations"][f"agent-sidecar.io/{annotation}"] = value
    response = _mutate(pod, settings)
    if not response["allowed"]:
        return  # refusing the pod is a safe answer too
    assert LOCKDOWN in _patched_names(response)
    assert _images(response) <= {settings.image, settings.lockdown_image}


def test_g10_a_pod_cannot_escape_injection_by_naming_a_container_agent_sidecar():
    """A labelled pod with its own container called agent-sidecar (any image) is admitted unchanged: no
    sidecar, no proxy variables, no lock-down, although the operator's settings require it."""
    settings = inject.InjectSettings(egress_lockdown=True)
    pod = agent_pod()
    pod["spec"]["containers"].append({"name": "agent-sidecar", "image": "busybox:1.36", "command": ["sleep", "1d"],
                                      "securityContext": {"runAsUser": 10003, "allowPrivilegeEscalation": False}})
    response = _mutate(pod, settings)
    assert not response["allowed"] or LOCKDOWN in _patched_names(response)


def test_annotation_keys_and_values_cannot_inject_patch_operations():
    """Odd annotation keys are escaped in JSON pointers and bad names are refused, so a pod cannot add its own ops."""
    pod = agent_pod()
    pod["metadata"]["annotations"]["x/y~z"] = '"},{"op":"remove","path":"/spec'
    response = _mutate(pod, inject.InjectSettings())
    assert response["allowed"]
    ops = json.loads(base64.b64decode(response["patch"]))
    assert {op["op"] for op in ops} <= {"add", "replace"}
    assert all(not op["path"].startswith("/metadata/annotations/x") for op in ops)
    bad = copy.deepcopy(agent_pod())
    bad["metadata"]["annotations"]["agent-sidecar.io/config"] = "cm\",\"op\":\"remove"
    assert _mutate(bad, inject.InjectSettings())["allowed"] is False
