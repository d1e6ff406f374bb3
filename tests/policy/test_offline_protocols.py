"""A2A and LLM facts offline: ``replay`` of a real ``sidecar run`` (the a2a-sdk client to an a2a-sdk agent, the
openai SDK to a loopback stub of the API), ``sidecar test`` cases and ``explain`` decide rules on part kinds,
methods, models and token caps as the running sidecar did (issue 18, issue 13's "offline tools")."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from a2a.client import A2AClientError, ClientConfig, ClientFactory
from a2a.helpers.proto_helpers import new_message, new_text_part, new_url_part
from a2a.types.a2a_pb2 import AgentCapabilities, AgentCard, AgentInterface, Role, SendMessageRequest

from sidecar.cli import main
from tests.peers.openai_stub import openai_stub
from tests.scenarios.process import SidecarProcess, replay

TEXT_ONLY = "a2a.part_kinds.all(k, k == 'text')"
SMALL_CAP = "llm.max_tokens == null || llm.max_tokens <= 256"
POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "text-to-planner", "direction": "outbound", "upstream": "planner",
     "a2a": {"methods": ["SendMessage", "SendStreamingMessage"]}, "when": {"expr": TEXT_ONLY}, "effect": "allow"},
    {"id": "small-models", "direction": "outbound", "upstream": "llm", "methods": ["POST"],
     "llm": {"models": ["gpt-4o-mini"]}, "when": {"expr": SMALL_CAP}, "effect": "allow"},
]}
HELLO = [{"role": "user", "content": "hello"}]


def a2a_client(url: str):
    card = AgentCard(name="planner", supported_interfaces=[
        AgentInterface(url=url, protocol_binding="JSONRPC", protocol_version="1.0")],
        capabilities=AgentCapabilities(streaming=False))
    return ClientFactory(ClientConfig(streaming=False, httpx_client=httpx.AsyncClient(timeout=30))).create(card)


def message(*parts: Any) -> SendMessageRequest:
    return SendMessageRequest(message=new_message(list(parts), role=Role.ROLE_USER))


@pytest.fixture
async def stub():
    server = await openai_stub().start()
    yield server
    await server.stop()


@pytest.fixture
async def ran(planner: str, stub: Any, tmp_path: Path) -> SidecarProcess:
    """Five calls through a real ``sidecar run``: a text message and a message with a file (denied), a small
    model under the cap, the same over it (denied), another model (denied)."""
    config = {"agent": {"name": "planner-agent", "environment": "test"},
              "outbound": {"upstreams": {"planner": {"url": planner, "protocol": "a2a"},
                                         "llm": {"url": stub.url + "/v1", "protocol": "openai"}}}}
    sidecar = SidecarProcess(tmp_path / "run", config, POLICY)
    async with sidecar:
        async with a2a_client(f"{sidecar.outbound}/planner") as agent:
            [_ async for _ in agent.send_message(message(new_text_part("plan a trip")))]
            with pytest.raises(A2AClientError, match="no rule allows"):
                [_ async for _ in agent.send_message(message(new_text_part("see"), new_url_part("https://x/r.pdf")))]
        llm = openai.AsyncOpenAI(base_url=f"{sidecar.outbound}/llm", api_key="sk-agent-own", max_retries=0)
        await llm.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_completion_tokens=100)
        for model, cap in (("gpt-4o-mini", 4096), ("gpt-4o", 100)):
            with pytest.raises(openai.PermissionDeniedError):
                await llm.chat.completions.create(model=model, messages=HELLO, max_completion_tokens=cap)
    return sidecar


def changed(**exprs: str) -> dict:
    policy = copy.deepcopy(POLICY)
    for rule in policy["rules"]:
        if rule["id"] in exprs:
            rule["when"] = {"expr": exprs[rule["id"]]}
    return policy


def test_events_record_what_policy_saw_of_a2a_and_llm_calls(ran):
    """The part kinds, context and method of each A2A call, the model, stream and cap of each LLM call."""
    targets = [e["target"] for e in ran.events()]
    assert [(t["a2a_method"], t["a2a_part_kinds"]) for t in targets[:2]] == [("SendMessage", ["text"]),
                                                                           ("SendMessage", ["text", "file"])]
    assert [(t["llm_model"], t["llm_stream"], t["llm_max_tokens"]) for t in targets[2:]] == [
        ("gpt-4o-mini", False, 100), ("gpt-4o-mini", False, 4096), ("gpt-4o", False, 100)]
    assert [e["decision"] for e in ran.events()] == ["allow", "deny", "allow", "deny", "deny"]


def test_the_same_policy_replays_every_a2a_and_llm_call_unchanged(ran, capsys, tmp_path):
    code, out = replay(capsys, ran, POLICY, tmp_path)
    assert code == 0, out
    assert "5 re-decided, 0 undecidable" in out and "changes: none" in out


def test_loosened_conditions_on_part_kinds_and_the_token_cap_find_exactly_those_calls(ran, capsys, tmp_path):
    """Files allowed, a larger cap: the file message and the 4096-token call become allowed; gpt-4o stays denied."""
    looser = changed(**{"text-to-planner": "a2a.part_kinds.all(k, k in ['text', 'file'])",
                        "small-models": "llm.max_tokens == null || llm.max_tokens <= 8192"})
    code, out = replay(capsys, ran, looser, tmp_path)
    assert code == 0, out
    assert "changes: 2 deny -> allow" in out
    assert "deny -> allow: 1  agent planner-agent  upstream planner  rule default -> text-to-planner" in out
    assert "deny -> allow: 1  agent planner-agent  upstream llm  rule default -> small-models" in out


def test_a_tighter_cap_is_a_change_that_exits_3(ran, capsys, tmp_path):
    code, out = replay(capsys, ran, changed(**{"small-models": "llm.max_tokens != null && llm.max_tokens <= 50"}),
                       tmp_path)
    assert code == 3, out
    assert "changes: 1 allow -> deny" in out and "upstream llm  rule small-models -> default" in out


def test_a_rule_on_message_metadata_is_undecidable(ran, capsys, tmp_path):
    """``a2a.metadata`` is not recorded (it is the agent's free-form JSON): a rule reading it is undecidable."""
    code, out = replay(capsys, ran, changed(**{"text-to-planner": "a2a.metadata.size() == 0"}), tmp_path)
    assert code == 0, out
    assert "2 undecidable" in out and "reads a2a.metadata" in out and "changes: none" in out


def test_policy_test_cases_and_explain_decide_a2a_and_llm_requests(ran, tmp_path, capsys):
    """``sidecar test`` cases with ``a2a:`` and ``llm:`` requests decide as the running sidecar did."""
    cases = tmp_path / "cases.yaml"
    cases.write_text(yaml.safe_dump({"cases": [
        {"name": "text to the planner", "request": {"upstream": "planner", "path": "/", "a2a": {"parts": ["text"]}},
         "expect": {"decision": "allow", "rule": "text-to-planner"}},
        {"name": "a file to the planner", "request": {"upstream": "planner", "path": "/",
                                                      "a2a": {"method": "message/send", "parts": ["text", "file"]}},
         "expect": {"decision": "deny", "rule": "default"}},
        {"name": "a small call", "request": {"upstream": "llm", "path": "/chat/completions",
                                             "llm": {"model": "gpt-4o-mini", "max_tokens": 256}},
         "expect": {"decision": "allow", "rule": "small-models"}},
        {"name": "over the cap", "request": {"upstream": "llm", "path": "/chat/completions",
                                             "llm": {"model": "gpt-4o-mini", "max_tokens": 257}},
         "expect": {"decision": "deny"}},
    ]}))
    policy = ran.directory / "policy.yaml"
    assert main(["test", str(policy), "--cases", str(cases), "-c", str(ran.config_file)]) == 0, capsys.readouterr()
    body = tmp_path / "body.json"
    body.write_text('{"model": "gpt-4o-mini", "max_tokens": 4096, "messages": []}')
    assert main(["explain", "-c", str(ran.config_file), "--method", "POST", "--body", str(body),
                 "--header", "Content-Type=application/json", "--url", "/llm/chat/completions"]) == 3
    assert "llm_model: gpt-4o-mini" in capsys.readouterr().out
