"""LLM API upstreams (protocol openai): the body read strictly for policy, token budgets counted from
the API's usage, refusals in the API's error shape; the real ``openai`` SDK against a loopback stub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from sidecar.errors import RequestRefused
from sidecar.llm_usage import TokenBudgets, usage_of
from sidecar.policy.llm import LlmCall, endpoint_of, parse_llm_request
from sidecar.policy.model import Budget
from tests.harness import admin
from tests.peers.openai_stub import TOKENS_IN, TOKENS_OUT, WORDS, openai_stub

PER_CALL = TOKENS_IN + TOKENS_OUT
BUDGET = PER_CALL + 1  # spent by the second call: the third is refused


def policy(**allow: Any) -> dict[str, Any]:
    return {"version": 1, "default": "deny", "rules": [
        {"id": "small-models", "direction": "outbound", "upstream": "llm", "methods": ["POST"],
         "llm": {"models": ["gpt-4o-mini", "text-embedding-*"]}, "effect": "allow", **allow}]}


# --- the parser ----------------------------------------------------------------------------------

def parse(body: dict[str, Any] | bytes, path: str = "/v1/chat/completions") -> LlmCall:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    endpoint = endpoint_of(path)
    assert endpoint is not None
    return parse_llm_request(raw, "application/json", endpoint, 1 << 20)


@pytest.mark.parametrize("path, body, seen", [
    # chat: the cap is max_completion_tokens, or the older max_tokens
    ("/v1/chat/completions", {"model": "gpt-4o", "stream": True, "max_completion_tokens": 100},
     ("chat/completions", "gpt-4o", True, 100)),
    ("/v1/chat/completions", {"model": "gpt-4o", "max_tokens": 5}, ("chat/completions", "gpt-4o", False, 5)),
    # both names at once must agree
    ("/v1/chat/completions", {"model": "m", "max_tokens": 5, "max_completion_tokens": 5}, ("chat/completions", "m",
                                                                                         False, 5)),
    ("/v1/responses", {"model": "o3", "max_output_tokens": 64}, ("responses", "o3", False, 64)),
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"}, ("embeddings", "text-embedding-3-small",
                                                                           False, None)),
])
def test_policy_sees_the_model_stream_and_token_cap(path: str, body: dict[str, Any], seen: tuple[Any, ...]) -> None:
    """What llm.* in CEL reads, per endpoint (issue 13 item 6)."""
    call = parse(body, path)
    assert (call.endpoint, call.model, call.stream, call.max_tokens) == seen


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", b"not json"),  # a body that does not parse
    ("/v1/chat/completions", b'{"model": "a", "model": "b"}'),  # duplicate keys: two readers, two models
    ("/v1/chat/completions", {"messages": []}),  # no model
    ("/v1/chat/completions", {"model": "m", "stream": "true"}),  # stream must be a boolean
    ("/v1/chat/completions", {"model": "m", "max_tokens": -1}),  # a negative cap
    ("/v1/chat/completions", {"model": "m", "max_tokens": True}),  # a boolean is not a count
    ("/v1/chat/completions", {"model": "m", "max_tokens": 5, "max_completion_tokens": 9}),  # caps that disagree
    ("/v1/embeddings", {"model": "m", "stream": True}),  # embeddings do not stream
])
def test_a_body_policy_cannot_read_is_refused(path: str, body: dict[str, Any] | bytes) -> None:
    with pytest.raises(RequestRefused, match="^llm: ") as refused:
        parse(body, path)
    assert refused.value.reason == "bad_request"


@pytest.mark.parametrize("answer, tokens", [
    ({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}, (3, 4)),  # chat, or its final stream chunk
    ({"usage": {"input_tokens": 3, "output_tokens": 4}}, (3, 4)),  # the Responses API
    ({"type": "response.completed", "response": {"usage": {"input_tokens": 3, "output_tokens": 4}}}, (3, 4)),
    ({"usage": {"prompt_tokens": 3, "total_tokens": 3}}, (3, 0)),  # embeddings
    ({"choices": []}, None),  # a stream chunk without usage
    ({"usage": {"prompt_tokens": "3"}}, None),  # not a count
])
def test_the_usage_an_answer_reports(answer: dict[str, Any], tokens: tuple[int, int] | None) -> None:
    assert usage_of(answer) == tokens


def test_a_budget_refuses_once_spent_and_renews_with_its_window() -> None:
    now = [0.0]
    budgets, budget = TokenBudgets(clock=lambda: now[0]), Budget(100, 60.0)
    budgets.check("k", budget)
    budgets.charge("k", budget, 100)
    with pytest.raises(RequestRefused) as refused:
        budgets.check("k", budget)
    assert (refused.value.reason, refused.value.status, refused.value.retry_after) == ("budget_exhausted", 429, 60)
    now[0] = 60.0
    budgets.check("k", budget)  # a new window


# --- the real SDK through the sidecar ------------------------------------------------------------

@pytest.fixture
async def stub():
    server = await openai_stub().start()
    yield server
    await server.stop()


def config(stub: Any) -> dict[str, Any]:
    return {"outbound": {"upstreams": {"llm": {"url": stub.url + "/v1", "protocol": "openai"}}}}


def sdk(h: Any) -> openai.AsyncOpenAI:
    """The agent's own client: its key is the agent's business, never forwarded as the upstream's credential."""
    return openai.AsyncOpenAI(base_url=f"{h.outbound}/llm", api_key="sk-agent", max_retries=0)


HELLO = [{"role": "user", "content": "hello"}]


async def test_an_allowed_call_returns_and_its_event_has_model_and_tokens(make_sidecar: Any, stub: Any) -> None:
    """The SDK gets the answer; the event says which model and how many tokens in and out (issue 13 item 6)."""
    h = await make_sidecar(config(stub), policy())
    answer = await sdk(h).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert answer.choices[0].message.content == "".join(WORDS)
    target = (await h.settle())[-1]["target"]
    assert (target["llm_model"], target["tokens_in"], target["tokens_out"]) == ("gpt-4o-mini", TOKENS_IN, TOKENS_OUT)


async def test_a_model_outside_the_rule_is_a_permission_error_with_the_sidecars_message(make_sidecar: Any,
                                                                                        stub: Any) -> None:
    """The SDK raises PermissionDeniedError showing the sidecar's reason, not "Error code: 403" (issue 13 item 6)."""
    h = await make_sidecar(config(stub), policy())
    with pytest.raises(openai.PermissionDeniedError, match="policy: no rule allows this request") as refused:
        await sdk(h).chat.completions.create(model="gpt-4o", messages=HELLO)
    assert refused.value.code == "no_matching_rule"
    assert stub.seen == []


async def test_a_condition_on_the_token_cap(make_sidecar: Any, stub: Any) -> None:
    """CEL reads llm.max_tokens: a call asking for more than the rule grants never reaches the API."""
    h = await make_sidecar(config(stub), policy(when={"expr": "llm.max_tokens != null && llm.max_tokens <= 256"}))
    await sdk(h).chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_completion_tokens=100)
    with pytest.raises(openai.PermissionDeniedError):
        await sdk(h).chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_completion_tokens=4096)
    assert len(stub.seen) == 1


async def spend(client: openai.AsyncOpenAI, how: str) -> None:
    """One call of ``how``: JSON, a stream whose final chunk has the usage, or a Responses API stream."""
    if how == "json":
        await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    elif how == "chat-stream":
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True,
                                                      stream_options={"include_usage": True})
        words = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
        assert words == list(WORDS)  # the stream arrives whole, chunk by chunk
    else:
        async with client.responses.stream(model="gpt-4o-mini", input="hello") as stream:
            assert (await stream.get_final_response()).usage.output_tokens == TOKENS_OUT


@pytest.mark.parametrize("how", ["json", "chat-stream", "responses-stream"])
async def test_a_budget_refuses_the_first_request_after_it_is_spent(make_sidecar: Any, stub: Any, how: str,
                                                                   tmp_path: Path) -> None:
    """Usage counted from the answer, streamed or not; then RateLimitError budget_exhausted, even after a
    policy reload (issue 13 item 6)."""
    h = await make_sidecar(config(stub), policy(budget={"tokens": BUDGET, "per": "1h"}))
    client = sdk(h)
    await spend(client, how)
    await spend(client, how)  # 2 x PER_CALL >= BUDGET: spent
    with pytest.raises(openai.RateLimitError, match="llm: token budget .* spent") as refused:
        await spend(client, how)
    assert refused.value.code == "budget_exhausted"
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy(budget={"tokens": BUDGET, "per": "1h"},
                                                                description="reloaded")))
    assert (await admin(h, "POST", "/reload"))[0] == 200
    with pytest.raises(openai.RateLimitError):
        await spend(client, how)
    events = await h.settle()
    assert [e["reason"] for e in events] == ["allowed", "allowed", "budget_exhausted", "budget_exhausted"]
    assert [e["status"] for e in events[2:]] == [429, 429]
    assert len(stub.seen) == 2
