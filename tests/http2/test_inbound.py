"""HTTP/2 on the inbound mTLS listener (issue 17 item 1): ALPN offers ``h2`` and ``http/1.1``; a
caller that chooses ``h2`` is identified, decided and forwarded per stream exactly as on HTTP/1.1,
and a caller refused at the handshake reads the same refusal over HTTP/2. With ``inbound.http2`` the
leg to the agent is HTTP/2 too (h2c on loopback): gRPC callers reach a gRPC agent (item 2)."""

from __future__ import annotations

import ssl
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.const import Status
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError

from tests.peers.grpc_greeter import SERVICE, Greeter
from tests.scenarios.inbound import POLICY, client_context, inbound_config

CALLER = "spiffe://sidecar.local/orchestrator"


def url(h, path: str) -> str:
    return f"https://127.0.0.1:{h.port('inbound')}{path}"


async def test_an_svid_caller_on_h2_reaches_the_agent_with_its_identity(make_sidecar, agent, tmp_path):
    """Three streams on one h2 connection: each reaches the agent with the caller's SPIFFE ID and is
    one allowed event naming the caller; a denied path on the same connection is refused alone."""
    h = await make_sidecar(inbound_config(tmp_path, agent), POLICY)
    ctx = client_context(h, CALLER, tmp_path / "caller")
    async with httpx.AsyncClient(http2=True, verify=ctx) as client:
        answers = [await client.get(url(h, f"/tasks/{i}")) for i in range(3)]
        denied = await client.get(url(h, "/admin"))
        after = await client.get(url(h, "/tasks/9"))
    assert [(r.http_version, r.status_code) for r in answers] == [("HTTP/2", 200)] * 3
    assert (denied.status_code, denied.json()["error"]) == (403, "no_matching_rule")
    assert after.status_code == 200
    assert CALLER in agent.seen[-1].header("X-Forwarded-Client-Cert")
    events = await h.settle()
    assert [e["decision"] for e in events] == ["allow"] * 3 + ["deny", "allow"]
    # the path only: the log redactor is process-wide, and a secret another test configured may mask a word
    assert {e["caller"]["id"].rpartition("/")[2] for e in events} == {"orchestrator"}


async def test_a_caller_without_a_certificate_gets_the_401_refusal_over_h2(make_sidecar, agent, tmp_path):
    """No client certificate, h2 chosen by ALPN: the JSON 401 no_client_cert, as HTTP/1.1 callers get it."""
    h = await make_sidecar(inbound_config(tmp_path, agent), POLICY)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # this test is about the caller's certificate, not ours
    async with httpx.AsyncClient(http2=True, verify=ctx) as client:
        response = await client.get(url(h, "/tasks/1"))
    assert (response.http_version, response.status_code) == ("HTTP/2", 401)
    assert response.json()["error"] == "no_client_cert"
    assert agent.seen == []


async def test_an_http11_caller_still_speaks_http11(make_sidecar, agent, tmp_path):
    """A client that offers only http/1.1 is served as before."""
    h = await make_sidecar(inbound_config(tmp_path, agent), POLICY)
    ctx = client_context(h, CALLER, tmp_path / "caller")
    async with httpx.AsyncClient(verify=ctx) as client:
        response = await client.get(url(h, "/tasks/1"))
    assert (response.http_version, response.status_code) == ("HTTP/1.1", 200)


class RawBytes(CodecBase):
    """grpclib's messages as the bytes they are (the Greeter's generic handlers take and give bytes)."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> bytes:
        return data


GRPC_INBOUND = {"version": 1, "default": "deny", "rules": [
    {"id": "greet-agent", "direction": "inbound", "callers": [CALLER], "paths": [f"/{SERVICE}/*"],
     "when": {"expr": 'grpc.method == "SayHello"'}, "effect": "allow"}]}


async def test_a_grpc_caller_with_its_svid_reaches_a_grpc_agent_over_h2c(make_sidecar, greeter: Greeter, tmp_path):
    """A gRPC caller (grpclib: its TLS is an ssl.SSLContext verifying the sidecar's SVID by its bundle, as
    SPIFFE clients do; grpcio would insist on a DNS name the SVID does not carry) on the inbound listener:
    the call reaches the grpcio agent over h2c with the caller's identity, the reply and its status come
    back; a method the rule does not allow is PERMISSION_DENIED; one event each with the gRPC fields."""
    config = inbound_config(tmp_path, SimpleNamespace(url=f"http://127.0.0.1:{greeter.port}"))
    config["inbound"]["http2"] = True
    h = await make_sidecar(config, GRPC_INBOUND)
    ctx = client_context(h, CALLER, tmp_path / "caller")
    ctx.set_alpn_protocols(["h2"])
    channel = Channel("127.0.0.1", h.port("inbound"), ssl=ctx, codec=RawBytes())
    try:
        hello = UnaryUnaryMethod(channel, f"/{SERVICE}/SayHello", bytes, bytes)  # type: ignore[var-annotated]
        assert await hello(b"caller") == b"hello caller"
        with pytest.raises(GRPCError) as caught:
            await UnaryUnaryMethod(channel, f"/{SERVICE}/Admin", bytes, bytes)(b"caller")  # type: ignore[var-annotated]
    finally:
        channel.close()
    assert caught.value.status == Status.PERMISSION_DENIED and "default deny" in (caught.value.message or "")
    (seen,) = greeter.metadata
    assert CALLER in seen["x-forwarded-client-cert"]
    events = await h.settle()
    assert [(e["protocol"], e["target"]["grpc_method"], e["decision"], e["grpc_status"]) for e in events] == [
        ("grpc", "SayHello", "allow", 0), ("grpc", "Admin", "deny", 7)]


async def test_a_grpc_callers_deadline_reaches_the_agent_as_what_is_left(make_sidecar, greeter: Greeter, tmp_path):
    """The caller's grpc-timeout (grpclib: timeout=20) is honoured inbound as outbound: the agent is told
    the remaining budget, never more."""
    config = inbound_config(tmp_path, SimpleNamespace(url=f"http://127.0.0.1:{greeter.port}"))
    config["inbound"]["http2"] = True
    h = await make_sidecar(config, {"version": 1, "default": "deny", "rules": [
        {"id": "all", "direction": "inbound", "callers": [CALLER], "effect": "allow"}]})
    ctx = client_context(h, CALLER, tmp_path / "caller")
    ctx.set_alpn_protocols(["h2"])
    channel = Channel("127.0.0.1", h.port("inbound"), ssl=ctx, codec=RawBytes())
    try:
        remaining = UnaryUnaryMethod(channel, f"/{SERVICE}/Remaining", bytes, bytes)  # type: ignore[var-annotated]
        assert 0 < float(await remaining(b"", timeout=20)) <= 20
    finally:
        channel.close()


def test_alpn_is_set_once_per_server_context():
    """``offering_h2`` sets ALPN on a context the first time it is handed out, not on every handshake; a
    context built by a reload is offered ``h2`` too."""
    from sidecar.http2.listen import offering_h2

    class Counted(ssl.SSLContext):
        calls = 0

        def set_alpn_protocols(self, protocols):  # type: ignore[override]
            type(self).calls += 1
            super().set_alpn_protocols(protocols)

    first, reloaded = Counted(ssl.PROTOCOL_TLS_SERVER), Counted(ssl.PROTOCOL_TLS_SERVER)
    current = [first]
    offered = offering_h2(lambda: current[0])
    assert [offered() for _ in range(5)] == [first] * 5
    assert Counted.calls == 1
    current[0] = reloaded
    assert offered() is reloaded and offered() is reloaded
    assert Counted.calls == 2
