"""A2A upstreams through the pipeline: strict parsing, methods and parts by rule, task ids bound to
their creator, push URLs checked, refusals as JSON-RPC errors; the real ``a2a-sdk`` client and server."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from a2a.client import A2AClientError, Client, ClientConfig, ClientFactory
from a2a.helpers.proto_helpers import new_message, new_text_part, new_url_part
from a2a.types.a2a_pb2 import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    CancelTaskRequest,
    GetTaskRequest,
    Role,
    SendMessageRequest,
    StreamResponse,
    TaskPushNotificationConfig,
)

from sidecar.a2a_transport import A2aTasks, task_ids
from sidecar.errors import ConfigInvalid, RequestRefused
from sidecar.policy.a2a import A2aCall, parse_a2a_request
from sidecar.policy.engine import load_policy
from sidecar.policy.mcp import RpcRefused
from tests.harness import admin
from tests.peers.a2a import text

TEXT_ONLY = "a2a.part_kinds.all(k, k == 'text')"
POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "text-to-planner", "direction": "outbound", "upstream": "planner",
     "a2a": {"methods": ["SendMessage", "message/stream", "GetTask"], "push_hosts": ["hooks.example.com"]},
     "when": {"expr": TEXT_ONLY}, "effect": "allow"},
]}


# --- the parser: what policy sees, and what it refuses -----------------------------------------

def rpc(method: str, params: object, **envelope: object) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": "1", "method": method, "params": params, **envelope}).encode()


def parse(body: bytes) -> A2aCall:
    return parse_a2a_request(body, "application/json", 1 << 20)


MESSAGE = {"message": {"role": "ROLE_USER", "messageId": "m1", "contextId": "c1", "taskId": "t1",
                       "parts": [{"text": "plan"}, {"url": "https://x/y.pdf"}, {"data": {"a": 1}}],
                       "metadata": {"priority": "high"}}}


@pytest.mark.parametrize("body, seen", [
    # A2A 1.0: the message's task, context, part kinds (url is a file) and metadata
    (rpc("SendMessage", MESSAGE), ("SendMessage", "t1", "c1", ("text", "file", "data"), {"priority": "high"})),
    # the previous version's name is read as the 1.0 method; 0.3 parts carry a kind that agrees
    (rpc("message/stream", {"message": {"messageId": "m", "parts": [{"kind": "file", "file": {"uri": "u"}}]}}),
     ("SendStreamingMessage", None, None, ("file",), None)),
    # task requests name their task by id, in both versions
    (rpc("GetTask", {"id": "t9"}), ("GetTask", "t9", None, (), None)),
    (rpc("tasks/resubscribe", {"id": "t9"}), ("SubscribeToTask", "t9", None, (), None)),
    # protobuf JSON's snake_case names are read too
    (rpc("SendMessage", {"message": {"task_id": "t2", "parts": [{"raw": "AA=="}]}}),
     ("SendMessage", "t2", None, ("file",), None)),
])
def test_policy_sees_the_method_task_context_parts_and_metadata(body: bytes, seen: tuple[Any, ...]) -> None:
    """What a rule or CEL condition reads of an A2A call, in A2A 1.0 and in the previous version (issue 13 item 5)."""
    call = parse(body)
    assert (call.method, call.task_id, call.context_id, call.part_kinds, call.metadata) == seen


@pytest.mark.parametrize("params, push_url", [
    # 1.0: the config is the params
    ({"taskId": "t1", "url": "https://hooks.example.com/a2a"}, "https://hooks.example.com/a2a"),
])
def test_a_push_notification_config_shows_its_url(params: dict[str, Any], push_url: str) -> None:
    call = parse(rpc("CreateTaskPushNotificationConfig", params))
    assert (call.task_id, call.push_url) == ("t1", push_url)
    previous = parse(rpc("tasks/pushNotificationConfig/set",
                         {"taskId": "t1", "pushNotificationConfig": {"url": push_url}}))
    assert (previous.method, previous.task_id, previous.push_url) == ("CreateTaskPushNotificationConfig", "t1",
                                                                      push_url)


@pytest.mark.parametrize("body", [
    rpc("Tasks/Get", {"id": "t"}),  # not an A2A method: the set is closed
    rpc("GetTask", {}),  # a task request without its task
    rpc("SendMessage", {"message": {"parts": []}}),  # a message without parts
    rpc("SendMessage", {"message": {"parts": [{"text": "a", "url": "https://x"}]}}),  # two contents in one part
    rpc("SendMessage", {"message": {"parts": [{"kind": "text", "file": {"uri": "u"}}]}}),  # kind says text, is a file
    rpc("SendMessage", {"message": {"taskId": "a", "task_id": "b", "parts": [{"text": "a"}]}}),  # two spellings
    rpc("SendMessage", {"message": {"parts": [{"text": "a"}], "metadata": []}}),  # metadata not an object
    rpc("CreateTaskPushNotificationConfig", {"taskId": "t", "url": "http://10.0.0.1/"}),  # not https
    rpc("CreateTaskPushNotificationConfig", {"taskId": "t", "url": "https://u:p@hooks.example.com/"}),  # userinfo
])
def test_calls_policy_could_misread_are_refused_as_jsonrpc_errors(body: bytes) -> None:
    """Once the envelope is sound, a refused A2A call is answered to its id (issue 13 item 5)."""
    with pytest.raises(RpcRefused) as refused:
        parse(body)
    assert refused.value.rpc.id == "1" and refused.value.message.startswith("a2a: ")


@pytest.mark.parametrize("body", [
    b'{"jsonrpc": "2.0", "id": 1, "method": "GetTask", "method": "SendMessage"}',  # duplicate key
    b'[{"jsonrpc": "2.0", "id": 1, "method": "GetTask"}]',  # a batch
    b'{"jsonrpc": "2.0", "id": 1, "Method": "GetTask", "method": "SendMessage"}',  # case variants
])
def test_the_envelope_is_as_strict_as_mcps(body: bytes) -> None:
    """The JSON-RPC checks are MCP's own, speaking as a2a (issue 13 item 5)."""
    with pytest.raises(RequestRefused, match="^a2a: "):
        parse(body)


def test_task_ids_are_bound_to_their_creator() -> None:
    """A task id is checked against the owner it was bound to; one never bound is refused too."""
    tasks = A2aTasks()
    tasks.bind("planner", "t1", ("agent", "task-a"))
    tasks.check("planner", "t1", ("agent", "task-a"))
    for upstream, task_id, owner in [("planner", "t1", ("agent", "task-b")), ("planner", "t2", ("agent", "task-a")),
                                     ("other", "t1", ("agent", "task-a"))]:
        with pytest.raises(RequestRefused, match="a2a: the task id"):
            tasks.check(upstream, task_id, owner)
    tasks.bind("planner", "t1", ("agent", "task-b"))  # a second owner never takes a bound id over
    tasks.check("planner", "t1", ("agent", "task-a"))


@pytest.mark.parametrize("result, ids", [
    ({"task": {"id": "t1", "contextId": "c"}}, ["t1"]),  # 1.0 SendMessage answer or stream event
    ({"statusUpdate": {"taskId": "t1"}}, ["t1"]),  # 1.0 stream events
    ({"message": {"taskId": "t1"}}, ["t1"]),
    ({"kind": "task", "id": "t1"}, ["t1"]),  # 0.3
    ({"kind": "status-update", "taskId": "t1"}, ["t1"]),
    ({"message": {"messageId": "m"}}, []),  # a message outside any task
])
def test_the_task_ids_an_answer_names(result: dict[str, Any], ids: list[str]) -> None:
    assert list(task_ids(result)) == ids


# --- the real SDK, through the sidecar -----------------------------------------------------------

@pytest.fixture
async def h(make_sidecar: Any, planner: str) -> Any:
    return await make_sidecar({"outbound": {"upstreams": {"planner": {"url": planner, "protocol": "a2a"}}}}, POLICY)


def client(url: str, *, streaming: bool = True, task: str | None = None) -> Client:
    """The SDK's own client for an agent at ``url`` (its card as the remote agent would publish it)."""
    card = AgentCard(name="planner", supported_interfaces=[
        AgentInterface(url=url, protocol_binding="JSONRPC", protocol_version="1.0")],
        capabilities=AgentCapabilities(streaming=streaming))
    http = httpx.AsyncClient(headers={"X-Sidecar-Task": task} if task else {}, timeout=30)
    return ClientFactory(ClientConfig(streaming=streaming, httpx_client=http)).create(card)


async def timed(events: AsyncIterator[StreamResponse]) -> list[tuple[float, StreamResponse]]:
    return [(time.monotonic(), event) async for event in events]


async def test_an_allowed_streaming_message_arrives_event_by_event(h: Any) -> None:
    """A text message under a text-only rule streams: the agent's three chunks arrive apart (issue 13 item 5)."""
    async with client(f"{h.outbound}/planner") as agent:
        received = await timed(agent.send_message(text("plan a trip")))
    chunks = [(at, e.artifact_update.artifact.parts[0].text) for at, e in received if e.HasField("artifact_update")]
    assert [words for _, words in chunks] == ["step 0", "step 1", "step 2"]
    assert chunks[-1][0] - chunks[0][0] > 0.05  # relayed as they came, not buffered to the end
    event = (await h.settle())[-1]
    assert (event["decision"], event["protocol"], event["target"]["a2a_method"]) == (
        "allow", "a2a", "SendStreamingMessage")


async def test_a_method_outside_the_rule_is_a_jsonrpc_error_the_sdk_surfaces(h: Any) -> None:
    """CancelTask is not in the rule: the SDK raises with the sidecar's message (issue 13 item 5)."""
    async with client(f"{h.outbound}/planner", streaming=False) as agent:
        [answer] = [e async for e in agent.send_message(text("plan"))]
        with pytest.raises(A2AClientError, match=r"-32041: policy: no rule allows this request .*no_matching_rule"):
            await agent.cancel_task(CancelTaskRequest(id=answer.task.id))
        assert (await agent.get_task(GetTaskRequest(id=answer.task.id))).id == answer.task.id  # and goes on
    events = await h.settle()
    assert [(e["target"]["a2a_method"], e["reason"], e["status"]) for e in events] == [
        ("SendMessage", "allowed", 200), ("CancelTask", "no_matching_rule", 200), ("GetTask", "allowed", 200)]
    assert events[1]["target"]["a2a_task_id"] == answer.task.id


async def test_a_file_part_under_a_text_only_rule_is_refused(h: Any) -> None:
    """The rule's CEL says text only: a message with a file part never reaches the planner (issue 13 item 5)."""
    report = SendMessageRequest(message=new_message([new_text_part("see"), new_url_part("https://x/r.pdf")],
                                                    role=Role.ROLE_USER))
    async with client(f"{h.outbound}/planner") as agent:
        with pytest.raises(A2AClientError, match="policy: no rule allows this request"):
            [e async for e in agent.send_message(report)]
    event = (await h.settle())[-1]
    assert (event["reason"], event["target"]["a2a_method"]) == ("no_matching_rule", "SendStreamingMessage")


async def test_another_agents_task_id_is_refused(h: Any, planner: str) -> None:
    """A task created by another agent (straight at the planner, or under another task) is refused (issue 13 item 5)."""
    async with client(planner, streaming=False) as other_agent:
        [theirs] = [e async for e in other_agent.send_message(text("plan"))]
    mine, other = (await admin(h, "POST", "/tasks", json={"principal": "alice@example.com"}))[1]["id"], \
        (await admin(h, "POST", "/tasks", json={"principal": "bob@example.com"}))[1]["id"]
    async with client(f"{h.outbound}/planner", streaming=False, task=mine) as agent:
        [created] = [e async for e in agent.send_message(text("plan"))]
        with pytest.raises(A2AClientError, match="a2a: the task id was not created .* unknown_task"):
            await agent.get_task(GetTaskRequest(id=theirs.task.id))
        assert (await agent.get_task(GetTaskRequest(id=created.task.id))).id == created.task.id
    async with client(f"{h.outbound}/planner", streaming=False, task=other) as agent:
        with pytest.raises(A2AClientError, match="unknown_task"):
            await agent.get_task(GetTaskRequest(id=created.task.id))
    reasons = [(e["target"]["a2a_method"], e["reason"]) for e in await h.settle()]
    assert reasons == [("SendMessage", "allowed"), ("GetTask", "unknown_task"), ("GetTask", "allowed"),
                       ("GetTask", "unknown_task")]


@pytest.mark.parametrize("url, reason", [
    ("https://hooks.example.com/a2a", "allowed"),  # a host the rule lists
    ("https://169.254.169.254/latest", "no_matching_rule"),  # anywhere else: an SSRF vector
])
async def test_a_push_notification_url_is_checked_against_policy(make_sidecar: Any, planner: str, url: str,
                                                                  reason: str) -> None:
    """Registering a webhook is allowed only to a host the rule's push_hosts lists (issue 13 item 5)."""
    policy = {"version": 1, "default": "deny", "rules": [
        {"id": "push", "direction": "outbound", "upstream": "planner",
         "a2a": {"methods": ["SendMessage", "CreateTaskPushNotificationConfig"], "push_hosts": ["hooks.example.com"]},
         "effect": "allow"}]}
    h = await make_sidecar({"outbound": {"upstreams": {"planner": {"url": planner, "protocol": "a2a"}}}}, policy)
    async with client(f"{h.outbound}/planner", streaming=False) as agent:
        [created] = [e async for e in agent.send_message(text("plan"))]
        config = TaskPushNotificationConfig(task_id=created.task.id, url=url)
        try:
            await agent.create_task_push_notification_config(config)
        except A2AClientError as exc:
            assert "policy:" in str(exc)
    event = (await h.settle())[-1]
    assert (event["target"]["a2a_method"], event["reason"]) == ("CreateTaskPushNotificationConfig", reason)


# --- rules: what a policy file may say -------------------------------------------------------------

def load(rule: dict[str, Any], tmp_path: Path) -> list[str]:
    """The load errors of a policy with this one rule (upstreams: planner a2a, llm openai, api http)."""
    path = tmp_path / "policy.yaml"
    path.write_text(json.dumps({"version": 1, "default": "deny", "rules": [{"id": "r", "effect": "allow", **rule}]}))
    try:
        load_policy([path], upstreams={"planner": "a2a", "llm": "openai", "api": "http"}, credentials={})
    except ConfigInvalid as invalid:
        return [str(error) for error in invalid.errors]
    return []


OUT = {"direction": "outbound"}


@pytest.mark.parametrize("rule, error", [
    # either spelling of a method, and push hosts
    ({**OUT, "upstream": "planner", "a2a": {"methods": ["message/send", "GetTask"],
                                            "push_hosts": ["*.example.com"]}}, None),
    # a method A2A does not have, with the ones it has
    ({**OUT, "upstream": "planner", "a2a": {"methods": ["tasks/list"]}}, "must be an A2A method (SendMessage"),
    ({**OUT, "upstream": "planner", "a2a": {}}, "must list methods, push_hosts or both"),
    # an a2a rule needs an a2a upstream
    ({**OUT, "upstream": "api", "a2a": {"methods": ["GetTask"]}}, "a2a rules need protocol a2a"),
    ({**OUT, "upstream": "llm", "llm": {"models": ["gpt-4o-*"]}, "budget": {"tokens": 1000, "per": "1h"}}, None),
    ({**OUT, "upstream": "planner", "llm": {"models": ["gpt-4o"]}}, "llm rules need protocol openai or anthropic"),
    # a budget is something an allow grants
    ({**OUT, "upstream": "llm", "budget": {"tokens": 0, "per": "1h"}}, "budget.tokens: must be an integer >= 1"),
    ({**OUT, "upstream": "llm", "budget": {"tokens": 10, "per": "1h"}, "effect": "deny"}, "applies only to allow"),
])
def test_a2a_and_llm_rules_are_checked_at_load(rule: dict[str, Any], error: str | None, tmp_path: Path) -> None:
    """The a2a and llm rows of the conditions table, and budget, as a policy author meets them."""
    errors = load(rule, tmp_path)
    if error is None:
        assert errors == []
    else:
        assert any(error in e for e in errors), errors
