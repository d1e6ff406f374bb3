"""gRPC through the outbound listener (issue 17 item 4): a real ``grpcio`` client on h2c prior
knowledge, a real ``grpcio`` server upstream (h2c), policy on ``grpc.method``, refusals as gRPC
statuses, one event per call.

The stubs are ``grpc``'s generic handlers and raw-bytes calls (no .proto build step); the
route-prefix path (``/greeter/helloworld.Greeter/SayHello``) names the upstream as for HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest

from sidecar.errors import GRPC_STATUS, STATUS
from tests.peers.grpc_greeter import SERVICE, Greeter
from tests.scenarios.outbound import SECRET

SCHEMA = json.loads((Path(__file__).parents[2] / "sidecar" / "schemas" / "trust_decision.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)

POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "greet", "direction": "outbound", "upstream": "greeter", "methods": ["POST"],
     "when": {"expr": 'grpc.service == "helloworld.Greeter" && grpc.method in ["SayHello", "SayMany", "Collect", '
                      '"Chat"]'},
     "effect": "allow"},
    {"id": "no-admin", "direction": "outbound", "upstream": "greeter", "when": {"expr": 'grpc.method == "Admin"'},
     "effect": "deny"},
]}


def grpc_config(greeter: Greeter) -> dict[str, Any]:
    return {
        "agent": {"name": "billing-agent", "environment": "test"},
        "outbound": {"upstreams": {"greeter": {"url": f"http://127.0.0.1:{greeter.port}", "protocol": "grpc",
                                               "credential": "legacy"}}},
        "credentials": {"legacy": {"type": "static", "header": "X-API-Key", "value": {"value": SECRET}}},
    }


def call(port: int, method: str, request: bytes, *, stream: bool = False) -> Any:
    """One call on a fresh channel to the sidecar's outbound listener (h2c), in a worker thread."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        path = f"/greeter/{SERVICE}/{method}"
        if stream:
            return list(channel.unary_stream(path)(request, timeout=10))
        return channel.unary_unary(path)(request, timeout=10)


async def rpc_error(port: int, method: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        await asyncio.to_thread(call, port, method, b"agent")
    return caught.value


async def test_unary_and_server_streaming_calls_are_allowed_by_a_rule_on_grpc_method(make_sidecar, greeter):
    """A unary and a server-streaming call reach the grpcio server with the credential attached and
    come back whole; each is one allowed event naming the service, the method and grpc-status 0."""
    h = await make_sidecar(grpc_config(greeter), POLICY)
    port = h.port("outbound")
    assert await asyncio.to_thread(call, port, "SayHello", b"agent") == b"hello agent"
    assert await asyncio.to_thread(call, port, "SayMany", b"agent", stream=True) == [b"0 agent", b"1 agent",
                                                                                    b"2 agent"]
    assert all(seen["x-api-key"] == SECRET for seen in greeter.metadata)
    events = await h.settle()
    assert [(e["target"]["grpc_method"], e["decision"], e["rule_id"], e["grpc_status"], e["outcome"])
            for e in events] == [("SayHello", "allow", "greet", 0, "completed"),
                                 ("SayMany", "allow", "greet", 0, "completed")]
    assert {e["protocol"] for e in events} == {"grpc"}
    assert {e["target"]["grpc_service"] for e in events} == {SERVICE}
    for event in events:
        VALIDATOR.validate(event)


def chat(port: int) -> list[bytes]:
    """A bidirectional call whose every message waits for the answer to the one before: nothing of it
    is buffered on the way (a buffering proxy would hold the first message until the client's end)."""
    answers: list[bytes] = []
    turn = threading.Event()

    def messages() -> Iterator[bytes]:
        for word in (b"one", b"two", b"three"):
            yield word
            assert turn.wait(10), "the answer to the last message did not come while the call was open"
            turn.clear()

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for answer in channel.stream_stream(f"/greeter/{SERVICE}/Chat")(messages(), timeout=20):
            answers.append(answer)
            turn.set()
    return answers


async def test_client_streaming_and_bidi_calls_stream_through(make_sidecar, greeter):
    """A client-streaming call arrives whole; a bidi call is answered message by message while it is open."""
    h = await make_sidecar(grpc_config(greeter), POLICY)
    port = h.port("outbound")

    def collect() -> bytes:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            return channel.stream_unary(f"/greeter/{SERVICE}/Collect")(iter([b"a", b"b", b"c"]), timeout=10)

    assert await asyncio.to_thread(collect) == b"a+b+c"
    assert await asyncio.to_thread(chat, port) == [b"re: one", b"re: two", b"re: three"]
    assert [e["grpc_status"] for e in await h.settle()] == [0, 0]


async def test_a_denied_method_is_permission_denied_with_the_rule_in_its_message(make_sidecar, greeter):
    """The client sees PERMISSION_DENIED and the policy's message; nothing reaches the server; one event."""
    h = await make_sidecar(grpc_config(greeter), POLICY)
    error = await rpc_error(h.port("outbound"), "Admin")
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "policy: denied by rule no-admin"
    assert greeter.metadata == []
    (event,) = await h.settle()
    assert (event["decision"], event["reason"], event["rule_id"], event["grpc_status"]) == \
        ("deny", "rule_denied", "no-admin", 7)
    assert event["target"]["grpc_method"] == "Admin" and event["status"] == 200
    VALIDATOR.validate(event)


async def test_a_method_no_rule_allows_is_refused_by_default_deny(make_sidecar, greeter):
    """No rule names it: PERMISSION_DENIED, saying the default deny decided."""
    h = await make_sidecar(grpc_config(greeter), POLICY)
    error = await rpc_error(h.port("outbound"), "Fail")
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "default deny" in error.details()
    assert (await h.settle())[-1]["reason"] == "no_matching_rule"


async def test_the_upstreams_own_status_and_message_reach_the_client(make_sidecar, greeter):
    """An allowed call the server fails: its grpc-status and grpc-message are relayed (a trailers-only
    answer) and recorded."""
    policy = {"version": 1, "default": "deny", "rules": [
        {"id": "all", "direction": "outbound", "upstream": "greeter", "effect": "allow"}]}
    h = await make_sidecar(grpc_config(greeter), policy)
    error = await rpc_error(h.port("outbound"), "Fail")
    assert error.code() == grpc.StatusCode.NOT_FOUND and error.details() == "no such greeting"
    event = (await h.settle())[-1]
    assert event["decision"] == "allow" and event["grpc_status"] == 5


async def test_an_unreachable_upstream_is_unavailable(make_sidecar, greeter):
    """The upstream is down: UNAVAILABLE, the reason code upstream_unreachable in the event."""
    h = await make_sidecar(grpc_config(greeter), POLICY)
    greeter.server.stop(0).wait()
    error = await rpc_error(h.port("outbound"), "SayHello")
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    event = (await h.settle())[-1]
    assert event["reason"] == "upstream_unreachable" and event["grpc_status"] == 14


@pytest.mark.parametrize(("reason", "code"), [
    ("rule_denied", grpc.StatusCode.PERMISSION_DENIED),  # policy said no
    ("no_matching_rule", grpc.StatusCode.PERMISSION_DENIED),  # default deny
    ("token_invalid", grpc.StatusCode.UNAUTHENTICATED),  # who is calling is not established
    ("no_client_cert", grpc.StatusCode.UNAUTHENTICATED),
    ("rate_limited", grpc.StatusCode.RESOURCE_EXHAUSTED),  # try again later, by quota
    ("overloaded", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("upstream_unreachable", grpc.StatusCode.UNAVAILABLE),  # retryable by gRPC's own policy
    ("credential_unavailable", grpc.StatusCode.UNAVAILABLE),
    ("upstream_timeout", grpc.StatusCode.DEADLINE_EXCEEDED),
    ("bad_request", grpc.StatusCode.INVALID_ARGUMENT),
    ("internal_error", grpc.StatusCode.INTERNAL),
])
def test_reason_codes_map_to_the_grpc_status_that_fits(reason, code):
    """One table (errors.GRPC_STATUS) says which gRPC status each reason code is answered with."""
    assert GRPC_STATUS[reason] == code.value[0]


def test_every_reason_code_the_table_names_is_a_reason_code():
    """The table names no reason that does not exist (a renamed reason would silently become UNKNOWN)."""
    assert set(GRPC_STATUS) <= set(STATUS)


async def test_a_call_refused_before_routing_is_a_grpc_status_too(make_sidecar, greeter):
    """A call naming no configured upstream is refused before any upstream is known: still a gRPC answer
    (its content type says gRPC), PERMISSION_DENIED naming the missing upstream."""
    h = await make_sidecar(grpc_config(greeter), POLICY)

    def nowhere() -> bytes:
        with grpc.insecure_channel(f"127.0.0.1:{h.port('outbound')}") as channel:
            return channel.unary_unary(f"/nosuch/{SERVICE}/SayHello")(b"x", timeout=10)

    with pytest.raises(grpc.RpcError) as caught:
        await asyncio.to_thread(nowhere)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED and "nosuch" in caught.value.details()
    event = (await h.settle())[-1]
    assert (event["reason"], event["protocol"], event["grpc_status"]) == ("unknown_upstream", "grpc", 7)
