"""LLM API upstreams of protocol anthropic (the Messages API): the body read strictly for policy, token budgets
counted from the usage it reports (JSON, and a stream's message_start and message_delta), refusals in its error
shape; the real ``anthropic`` SDK against a loopback stub (issue 13 item 6)."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import pytest

from sidecar.errors import RequestRefused
from sidecar.llm_usage import usage_of
from sidecar.policy.llm import endpoint_of, parse_llm_request
from tests.harness import assert_valid
from tests.peers.anthropic_stub import TOKENS_IN, TOKENS_OUT, WORDS, anthropic_stub

PER_CALL = TOKENS_IN + TOKENS_OUT
HELLO = [{"role": "user", "content": "hello"}]


def policy(**allow: Any) -> dict[str, Any]:
    return {"version": 1, "default": "deny", "rules": [
        {"id": "haiku-only", "direction": "outbound", "upstream": "claude", "methods": ["POST"],
         "llm": {"models": ["claude-haiku-*"]}, "effect": "allow", **allow}]}


@pytest.mark.parametrize("body, seen", [
    ({"model": "claude-haiku-4", "max_tokens": 64, "messages": HELLO}, ("messages", "claude-haiku-4", False, 64)),
    ({"model": "claude-opus-4", "max_tokens": 8, "stream": True, "messages": HELLO},
     ("messages", "claude-opus-4", True, 8)),
])
def test_policy_sees_the_model_stream_and_token_cap(body, seen):
    """llm.* of a Messages API call (issue 13 item 6)."""
    endpoint = endpoint_of("/v1/messages", "anthropic")
    assert endpoint is not None
    call = parse_llm_request(json.dumps(body).encode(), "application/json", endpoint, 1 << 20)
    assert (call.endpoint, call.model, call.stream, call.max_tokens) == seen


@pytest.mark.parametrize("body", [
    {"model": "claude-haiku-4", "messages": HELLO},  # the API requires max_tokens: a budget needs the cap
    {"model": "claude-haiku-4", "max_tokens": "64"},  # a string is not a count
    {"max_tokens": 64},  # no model
])
def test_a_messages_body_policy_cannot_read_is_refused(body):
    with pytest.raises(RequestRefused, match="^llm: ") as refused:
        parse_llm_request(json.dumps(body).encode(), "application/json", "/messages", 1 << 20)
    assert refused.value.reason == "bad_request"


@pytest.mark.parametrize("answer, tokens", [
    ({"type": "message", "usage": {"input_tokens": 3, "output_tokens": 4}}, (3, 4)),  # the JSON answer
    ({"type": "message_start", "message": {"usage": {"input_tokens": 3, "output_tokens": 1}}}, (3, 1)),
    ({"type": "message_delta", "usage": {"output_tokens": 9}}, (0, 9)),  # merged with message_start's input
    # the cache's tokens are input too
    ({"usage": {"input_tokens": 3, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 2,
                "output_tokens": 1}}, (10, 1)),
])
def test_the_usage_a_messages_answer_reports(answer, tokens):
    assert usage_of(answer) == tokens


@pytest.fixture
async def stub():
    server = await anthropic_stub().start()
    yield server
    await server.stop()


def config(stub: Any) -> dict[str, Any]:
    return {"outbound": {"upstreams": {"claude": {"url": stub.url, "protocol": "anthropic"}}}}


def sdk(h: Any) -> anthropic.AsyncAnthropic:
    """The agent's own client and key: the SDK sends it as Authorization, older clients as x-api-key (both here)."""
    return anthropic.AsyncAnthropic(base_url=f"{h.outbound}/claude", api_key="sk-ant-agent", max_retries=0,
                                    default_headers={"x-api-key": "sk-ant-agent"})


async def spend(client: anthropic.AsyncAnthropic, stream: bool) -> None:
    if not stream:
        answer = await client.messages.create(model="claude-haiku-4", max_tokens=64, messages=HELLO)
        assert answer.content[0].text == "".join(WORDS)
        return
    async with client.messages.stream(model="claude-haiku-4", max_tokens=64, messages=HELLO) as events:
        words = [text async for text in events.text_stream]
    assert words == list(WORDS)  # the stream arrives whole, event by event


@pytest.mark.parametrize("stream", [False, True])
async def test_a_call_is_counted_and_a_budget_refuses_once_spent(make_sidecar, stub, stream):
    """The event has the model and tokens in and out, streamed or not; a budget of two calls refuses the third
    with RateLimitError budget_exhausted (issue 13 item 6)."""
    h = await make_sidecar(config(stub), policy(budget={"tokens": PER_CALL + 1, "per": "1h"}))
    client = sdk(h)
    await spend(client, stream)
    await spend(client, stream)
    with pytest.raises(anthropic.RateLimitError, match="llm: token budget .* spent"):
        await spend(client, stream)
    events = await h.settle()
    assert_valid(events)
    assert [(e["protocol"], e["reason"]) for e in events] == [("anthropic", "allowed")] * 2 + \
        [("anthropic", "budget_exhausted")]
    target = events[0]["target"]
    assert (target["llm_model"], target["tokens_in"], target["tokens_out"]) == ("claude-haiku-4", TOKENS_IN,
                                                                                TOKENS_OUT)
    assert len(stub.seen) == 2
    assert all(not {"x-api-key", "authorization"} & {k.lower() for k, _ in seen.headers} for seen in stub.seen)


async def test_the_agents_key_reaches_the_api_only_when_the_upstream_passes_it(make_sidecar, stub):
    """x-api-key is the agent's credential: stripped like Authorization unless pass_headers names it."""
    passing = {"outbound": {"upstreams": {"claude": {"url": stub.url, "protocol": "anthropic",
                                                     "pass_headers": ["x-api-key"]}}}}
    h = await make_sidecar(passing, policy())
    await spend(sdk(h), False)
    assert ("x-api-key", "sk-ant-agent") in [(k.lower(), v) for k, v in stub.seen[0].headers]


async def test_a_model_outside_the_rule_is_a_permission_error_with_the_sidecars_message(make_sidecar, stub):
    """anthropic.PermissionDeniedError shows the sidecar's reason, not a bare 403; nothing reaches the API."""
    h = await make_sidecar(config(stub), policy())
    with pytest.raises(anthropic.PermissionDeniedError, match="policy: no rule allows this request") as refused:
        await sdk(h).messages.create(model="claude-opus-4", max_tokens=64, messages=HELLO)
    assert refused.value.body["error"]["type"] == "permission_error"
    assert stub.seen == []


async def test_a_condition_on_the_token_cap(make_sidecar, stub):
    """CEL reads llm.max_tokens of a Messages call: one asking for more than the rule grants never goes out."""
    h = await make_sidecar(config(stub), policy(when={"expr": "llm.max_tokens <= 256"}))
    await sdk(h).messages.create(model="claude-haiku-4", max_tokens=64, messages=HELLO)
    with pytest.raises(anthropic.PermissionDeniedError):
        await sdk(h).messages.create(model="claude-haiku-4", max_tokens=4096, messages=HELLO)
    assert len(stub.seen) == 1
