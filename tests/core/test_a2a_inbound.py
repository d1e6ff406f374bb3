"""A2A served by the agent (``inbound.protocol: a2a``): callers' JSON-RPC parsed strictly, ``a2a:``
rules on inbound, refusals as JSON-RPC errors, the agent's task ids bound to the caller that created
them; the real ``a2a-sdk`` client (over mTLS with the caller's SVID) and server (the agent)."""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import httpx
import pytest
from a2a.client import A2AClientError, Client, ClientConfig, ClientFactory
from a2a.helpers.proto_helpers import new_message, new_text_part, new_url_part
from a2a.types.a2a_pb2 import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    GetTaskRequest,
    ListTasksRequest,
    Role,
    SendMessageRequest,
)
from aiohttp import web

from sidecar.errors import ConfigInvalid
from sidecar.policy.engine import load_policy
from tests.harness import SidecarHarness, Upstream
from tests.peers.a2a import text
from tests.scenarios.inbound import ORCHESTRATOR, client_context, human_token, inbound_config

PEER = "spiffe://sidecar.local/reviewer"
POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "callers-send-and-read", "direction": "inbound", "callers": [ORCHESTRATOR, PEER], "paths": ["/"],
     "methods": ["POST"], "a2a": {"methods": ["SendMessage", "SendStreamingMessage", "GetTask"]},
     "when": {"expr": "a2a.part_kinds.all(k, k == 'text')"}, "effect": "allow"},
    {"id": "agent-card", "direction": "inbound", "callers": [ORCHESTRATOR, PEER],
     "paths": ["/.well-known/agent-card.json"], "methods": ["GET"], "effect": "allow"},
]}


def a2a_inbound(tmp: Path, agent_url: str) -> dict[str, Any]:
    """A sidecar whose agent, at ``agent_url``, serves A2A to its callers."""
    config = inbound_config(tmp, SimpleNamespace(url=agent_url))
    config["inbound"]["protocol"] = "a2a"
    return config


def caller(h: SidecarHarness, ctx: ssl.SSLContext, token: str | None = None, *, streaming: bool = False) -> Client:
    """The SDK's client for the agent behind the inbound listener, presenting the caller's SVID."""
    url = f"https://127.0.0.1:{h.port('inbound')}/"
    card = AgentCard(name="planner", supported_interfaces=[
        AgentInterface(url=url, protocol_binding="JSONRPC", protocol_version="1.0")],
        capabilities=AgentCapabilities(streaming=streaming))
    http = httpx.AsyncClient(verify=ctx, timeout=30, headers={"Authorization": f"Bearer {token}"} if token else {})
    return ClientFactory(ClientConfig(streaming=streaming, httpx_client=http)).create(card)


async def test_an_allowed_message_reaches_the_agent_and_its_answer_comes_back(make_sidecar: Any, planner: str,
                                                                                tmp_path: Path) -> None:
    """SendMessage from an SVID caller reaches the a2a-sdk agent; the task comes back; the event says a2a."""
    h = await make_sidecar(a2a_inbound(tmp_path, planner), POLICY)
    async with caller(h, client_context(h, ORCHESTRATOR, tmp_path / "orch")) as orchestrator:
        [answer] = [e async for e in orchestrator.send_message(text("plan a trip"))]
        assert answer.task.id and answer.task.artifacts[0].parts[0].text == "step 0"
        assert (await orchestrator.get_task(GetTaskRequest(id=answer.task.id))).id == answer.task.id
    events = await h.settle()
    assert [(e["direction"], e["protocol"], e["target"]["a2a_method"], e["decision"]) for e in events] == [
        ("inbound", "a2a", "SendMessage", "allow"), ("inbound", "a2a", "GetTask", "allow")]
    assert events[1]["target"]["a2a_task_id"] == answer.task.id


async def test_a_streamed_answer_binds_its_task_to_the_caller(make_sidecar: Any, planner: str,
                                                               tmp_path: Path) -> None:
    """SendStreamingMessage: the agent's events come back one by one, and the task they name is the
    caller's (read back by it, refused to another peer)."""
    h = await make_sidecar(a2a_inbound(tmp_path, planner), POLICY)
    async with caller(h, client_context(h, ORCHESTRATOR, tmp_path / "orch"), streaming=True) as orchestrator:
        events = [e async for e in orchestrator.send_message(text("plan a trip"))]
        steps = [e.artifact_update.artifact.parts[0].text for e in events if e.HasField("artifact_update")]
        assert steps == ["step 0", "step 1", "step 2"]
        task_id = events[-1].status_update.task_id
        assert (await orchestrator.get_task(GetTaskRequest(id=task_id))).id == task_id
    async with caller(h, client_context(h, PEER, tmp_path / "peer")) as reviewer:
        with pytest.raises(A2AClientError, match="unknown_task"):
            await reviewer.get_task(GetTaskRequest(id=task_id))
    assert [(e["target"]["a2a_method"], e["reason"]) for e in await h.settle()] == [
        ("SendStreamingMessage", "allowed"), ("GetTask", "allowed"), ("GetTask", "unknown_task")]


async def test_a_file_part_under_the_inbound_text_only_rule_is_refused(make_sidecar: Any, agent: Upstream,
                                                                       tmp_path: Path) -> None:
    """The inbound rule's CEL reads the caller's parts: a file part never reaches the agent."""
    h = await make_sidecar(a2a_inbound(tmp_path, agent.url), POLICY)
    report = SendMessageRequest(message=new_message([new_text_part("see"), new_url_part("https://x/r.pdf")],
                                                    role=Role.ROLE_USER))
    async with caller(h, client_context(h, ORCHESTRATOR, tmp_path / "orch")) as orchestrator:
        with pytest.raises(A2AClientError, match="-32041: policy: no rule allows this request"):
            [e async for e in orchestrator.send_message(report)]
    assert agent.seen == []
    [event] = await h.settle()
    assert (event["target"]["a2a_method"], event["reason"]) == ("SendMessage", "no_matching_rule")


async def test_a_denied_method_is_a_jsonrpc_error_and_never_reaches_the_agent(make_sidecar: Any, agent: Upstream,
                                                                              tmp_path: Path) -> None:
    """ListTasks is outside the inbound rule: the SDK raises with the sidecar's message, the agent sees nothing;
    the error carries reason, rule_id and decision_id as outbound's."""
    h = await make_sidecar(a2a_inbound(tmp_path, agent.url), POLICY)
    async with caller(h, client_context(h, ORCHESTRATOR, tmp_path / "orch")) as orchestrator:
        with pytest.raises(A2AClientError, match=r"-32041: policy: no rule allows this request .*no_matching_rule"):
            await orchestrator.list_tasks(ListTasksRequest())
    async with httpx.AsyncClient(verify=client_context(h, PEER, tmp_path / "peer")) as http:  # the error's shape
        r = await http.post(f"https://127.0.0.1:{h.port('inbound')}/", json={
            "jsonrpc": "2.0", "id": 7, "method": "tasks/cancel", "params": {"id": "t"}})
    error = r.json()["error"]
    assert (r.status_code, r.json()["id"], error["code"]) == (200, 7, -32046)  # unknown_task, before policy
    assert agent.seen == []
    events = await h.settle()
    assert [(e["direction"], e["protocol"], e["target"]["a2a_method"], e["reason"], e["status"]) for e in events] == [
        ("inbound", "a2a", "ListTasks", "no_matching_rule", 200), ("inbound", "a2a", "CancelTask", "unknown_task", 200)]
    assert error["data"] == {"reason": "unknown_task", "rule_id": None, "decision_id": events[1]["decision_id"]}


async def test_a_malformed_call_is_refused_before_the_agent(make_sidecar: Any, agent: Upstream,
                                                            tmp_path: Path) -> None:
    """The inbound body is parsed as strictly as outbound: a duplicate key never reaches the agent."""
    h = await make_sidecar(a2a_inbound(tmp_path, agent.url), POLICY)
    ctx = client_context(h, ORCHESTRATOR, tmp_path / "orch")
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "GetTask", "method": "CancelTask", "params": {"id": "t"}}'
    async with httpx.AsyncClient(verify=ctx) as http:
        r = await http.post(f"https://127.0.0.1:{h.port('inbound')}/", content=body,
                            headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "bad_request" and "a2a: " in r.text
    assert agent.seen == []
    [event] = await h.settle()
    assert (event["protocol"], event["reason"]) == ("a2a", "bad_request")


async def test_another_callers_task_is_refused(make_sidecar: Any, planner: str, tmp_path: Path) -> None:
    """A task the agent created for one caller cannot be read by another SPIFFE ID, nor by the same peer
    acting for another human (unknown_task, as outbound)."""
    h = await make_sidecar(a2a_inbound(tmp_path, planner), POLICY)
    orch_ctx = client_context(h, ORCHESTRATOR, tmp_path / "orch")
    async with caller(h, orch_ctx) as orchestrator:
        [mine] = [e async for e in orchestrator.send_message(text("plan"))]
    async with caller(h, client_context(h, PEER, tmp_path / "peer")) as reviewer:
        with pytest.raises(A2AClientError, match=r"a2a: the task id was not created through the sidecar by this caller .*unknown_task"):
            await reviewer.get_task(GetTaskRequest(id=mine.task.id))
        with pytest.raises(A2AClientError, match="unknown_task"):  # nor continued
            [e async for e in reviewer.send_message(text("more", task_id=mine.task.id))]
    async with caller(h, orch_ctx, human_token("alice@example.com")) as for_alice:
        [alices] = [e async for e in for_alice.send_message(text("plan"))]
        assert (await for_alice.get_task(GetTaskRequest(id=alices.task.id))).id == alices.task.id
    async with caller(h, orch_ctx, human_token("bob@example.com")) as for_bob:
        with pytest.raises(A2AClientError, match="unknown_task"):
            await for_bob.get_task(GetTaskRequest(id=alices.task.id))
    async with caller(h, orch_ctx) as orchestrator:  # the creator itself goes on
        assert (await orchestrator.get_task(GetTaskRequest(id=mine.task.id))).id == mine.task.id
    reasons = [(e["caller"]["id"], e["target"]["a2a_method"], e["reason"]) for e in await h.settle()]
    assert reasons == [(ORCHESTRATOR, "SendMessage", "allowed"), (PEER, "GetTask", "unknown_task"),
                       (PEER, "SendMessage", "unknown_task"), (ORCHESTRATOR, "SendMessage", "allowed"),
                       (ORCHESTRATOR, "GetTask", "allowed"), (ORCHESTRATOR, "GetTask", "unknown_task"),
                       (ORCHESTRATOR, "GetTask", "allowed")]


async def test_the_agent_card_is_an_ordinary_inbound_request(make_sidecar: Any, planner: str,
                                                             tmp_path: Path) -> None:
    """GET of the well-known card passes by an HTTP rule (paths, methods); no a2a facts, no JSON-RPC error."""
    h = await make_sidecar(a2a_inbound(tmp_path, planner), POLICY)
    ctx = client_context(h, ORCHESTRATOR, tmp_path / "orch")
    base = f"https://127.0.0.1:{h.port('inbound')}"
    async with httpx.AsyncClient(verify=ctx) as http:
        card = await http.get(f"{base}/.well-known/agent-card.json")
        legacy = await http.get(f"{base}/.well-known/agent.json")  # not allowed by the policy above
    assert card.status_code == 200 and card.json()["name"] == "planner"
    assert legacy.status_code == 403 and legacy.json()["error"] == "no_matching_rule"
    events = await h.settle()
    assert [(e["protocol"], e["reason"]) for e in events] == [("a2a", "allowed"), ("a2a", "no_matching_rule")]
    assert "a2a_method" not in events[0]["target"] or events[0]["target"]["a2a_method"] is None


@pytest.mark.parametrize("inbound_protocol, error", [
    ("a2a", None),
    ("http", "an inbound rule with a2a needs inbound.protocol: a2a (the agent serving A2A), got http"),
    (None, "needs inbound.protocol: a2a (the agent serving A2A), got no inbound listener"),
])
def test_a2a_on_an_inbound_rule_needs_inbound_protocol_a2a(inbound_protocol: str | None, error: str | None,
                                                            tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(json.dumps(POLICY))
    try:
        load_policy([path], upstreams={}, credentials={}, inbound_protocol=inbound_protocol)
    except ConfigInvalid as invalid:
        errors = [str(e) for e in invalid.errors]
        assert error is not None and any(error in e for e in errors), errors
    else:
        assert error is None


def card_mismatches(h: SidecarHarness) -> str:
    assert h.sidecar is not None
    return next(line for line in h.sidecar.metrics.exposition().decode().splitlines()
                if line.startswith("sidecar_a2a_card_mismatches_total"))


async def test_a_card_pointing_around_the_sidecar_is_reported(make_sidecar: Any, planner: str,
                                                              tmp_path: Path) -> None:
    """The a2a-sdk agent's card names its own loopback port: passed on unchanged, counted as a mismatch."""
    h = await make_sidecar(a2a_inbound(tmp_path, planner), POLICY)
    async with httpx.AsyncClient(verify=client_context(h, ORCHESTRATOR, tmp_path / "orch")) as http:
        card = await http.get(f"https://127.0.0.1:{h.port('inbound')}/.well-known/agent-card.json")
    assert card.json()["supportedInterfaces"][0]["url"] == planner + "/"  # unchanged
    await h.settle()
    assert card_mismatches(h) == "sidecar_a2a_card_mismatches_total 1.0"
    assert b"a2a_card_points_around_sidecar" in h.raw_log() and planner.encode() in h.raw_log()


async def test_a_card_naming_the_sidecar_is_not_reported_another_endpoint_is(make_sidecar: Any, tmp_path: Path) -> None:
    """A card whose every endpoint is the inbound listener's address (as the caller used it) passes quietly;
    one stray endpoint is reported, without the secret its URL carries."""
    listener: dict[str, int] = {}
    stray: list[dict[str, str]] = []

    async def serve_card(request: web.Request) -> web.StreamResponse:
        url = f"https://127.0.0.1:{listener['port']}/"
        return web.json_response({"name": "planner", "url": url, "supportedInterfaces": [
            {"url": url, "protocolBinding": "JSONRPC"}], "additionalInterfaces": [{"url": url}, *stray]})

    agent = await Upstream(serve_card).start()
    try:
        h = await make_sidecar(a2a_inbound(tmp_path, agent.url), POLICY)
        listener["port"] = h.port("inbound")
        async with httpx.AsyncClient(verify=client_context(h, ORCHESTRATOR, tmp_path / "orch")) as http:
            card = await http.get(f"https://127.0.0.1:{listener['port']}/.well-known/agent-card.json")
        assert card.status_code == 200 and card.json()["name"] == "planner"
        await h.settle()
        assert card_mismatches(h) == "sidecar_a2a_card_mismatches_total 0.0"
        stray.append({"url": "https://agent:s3cret@10.0.0.7:8443/a2a?token=s3cret"})
        async with httpx.AsyncClient(verify=client_context(h, ORCHESTRATOR, tmp_path / "orch2")) as http:
            await http.get(f"https://127.0.0.1:{listener['port']}/.well-known/agent-card.json")
        await h.settle()
        assert card_mismatches(h) == "sidecar_a2a_card_mismatches_total 1.0"
        assert b"https://10.0.0.7:8443/a2a" in h.raw_log() and b"s3cret" not in h.raw_log()
    finally:
        await agent.stop()


async def test_a_websocket_upgrade_to_an_a2a_agent_is_refused(make_sidecar: Any, agent: Upstream,
                                                              tmp_path: Path) -> None:
    """Frames would pass unparsed, past every a2a rule: the upgrade is refused and never reaches the agent."""
    h = await make_sidecar(a2a_inbound(tmp_path, agent.url), POLICY)
    ctx = client_context(h, ORCHESTRATOR, tmp_path / "orch")
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await s.ws_connect(f"https://127.0.0.1:{h.port('inbound')}/", ssl=ctx)
    assert refused.value.status == 400 and agent.seen == []
    [event] = await h.settle()
    assert (event["protocol"], event["reason"]) == ("a2a", "bad_request")
