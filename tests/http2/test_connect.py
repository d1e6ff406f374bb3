"""HTTP/2 inside CONNECT tunnels (issue 17 item 1): the interception leaf offers ALPN ``h2`` and
``http/1.1`` and the handshake's choice picks the server; a tunnel that starts in cleartext (an insecure
gRPC channel through ``grpc.http_proxy``) is served as HTTP/1.1 or h2c, but only towards an ``http://``
upstream. Every stream goes through the pipeline a decrypted HTTP/1.1 request does.

Real peers: a ``grpcio`` client (the ``grpc.http_proxy`` channel option; a TLS channel configured only by
``https_proxy`` in its own process, trusting the interception CA), a ``grpcio`` server upstream, curl.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
from typing import Any

import grpc
import pytest

from tests.harness import SidecarHarness, Upstream, assert_valid
from tests.http2.raw import streams
from tests.peers.grpc_greeter import SERVICE, Greeter
from tests.scenarios.connect import intercept_ca

HOST = "greeter.internal"
SECRET = "canary-grpc-tunnel-7d2c"
POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "greet", "direction": "outbound", "upstream": "greeter", "methods": ["POST"],
     "when": {"expr": 'grpc.method in ["SayHello", "SayMany"]'}, "effect": "allow"},
    {"id": "no-admin", "direction": "outbound", "upstream": "greeter", "when": {"expr": 'grpc.method == "Admin"'},
     "effect": "deny"},
    {"id": "web", "direction": "outbound", "upstream": "web", "effect": "allow"},
]}

# A gRPC client in its own process, configured as users configure it: https_proxy in the environment,
# a TLS channel trusting the interception CA (argv: CA file, target, method).
TLS_CLIENT = """
import sys, grpc
credentials = grpc.ssl_channel_credentials(open(sys.argv[1], "rb").read())
with grpc.secure_channel(sys.argv[2], credentials) as channel:
    try:
        print(channel.unary_unary("/helloworld.Greeter/" + sys.argv[3])(b"agent", timeout=10).decode())
    except grpc.RpcError as error:
        print(error.code().name, error.details())
"""


def tunnel_config(greeter: Greeter, web: Upstream | None = None, *, greeter_url: str | None = None) -> dict[str, Any]:
    """greeter.internal maps to the grpcio server (h2c), web.internal to a plain HTTP upstream."""
    upstreams: dict[str, Any] = {
        "greeter": {"url": greeter_url or f"http://127.0.0.1:{greeter.port}", "protocol": "grpc", "hosts": [HOST],
                    "credential": "legacy"},
        "web": {"url": f"http://127.0.0.1:{web.port if web else 1}", "hosts": ["web.internal"]}}
    return {"agent": {"name": "billing-agent", "environment": "test"}, "outbound": {"upstreams": upstreams},
            "credentials": {"legacy": {"type": "static", "header": "X-API-Key", "value": {"value": SECRET}}}}


def proxied_call(proxy: str, method: str, target: str = f"{HOST}:50051") -> bytes:
    """An insecure channel through ``grpc.http_proxy``: CONNECT, then h2c inside the tunnel."""
    with grpc.insecure_channel(target, options=[("grpc.http_proxy", proxy)]) as channel:
        return channel.unary_unary(f"/{SERVICE}/{method}")(b"agent", timeout=10)


def without_proxies() -> dict[str, str]:
    drop = {"http_proxy", "https_proxy", "grpc_proxy", "all_proxy", "no_proxy", "no_grpc_proxy"}
    return {k: v for k, v in os.environ.items() if k.lower() not in drop}


async def run(*argv: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*argv, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


def tunnel_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    assert_valid(events)
    return [e for e in events if e["target"]["method"] != "CONNECT"]


async def test_an_insecure_grpc_channel_through_grpc_http_proxy_reaches_the_server(make_sidecar, greeter):
    """CONNECT then h2c in cleartext to an http:// upstream: the call is routed by the tunnel's host,
    allowed by the grpc rule, credentialed, and recorded once with the gRPC fields."""
    h = await make_sidecar(tunnel_config(greeter), POLICY)
    assert await asyncio.to_thread(proxied_call, h.outbound, "SayHello") == b"hello agent"
    assert [m["x-api-key"] for m in greeter.metadata] == [SECRET]
    (event,) = tunnel_events(await h.settle())
    assert (event["decision"], event["rule_id"], event["protocol"], event["grpc_status"]) == \
        ("allow", "greet", "grpc", 0)
    assert (event["target"]["upstream"], event["target"]["grpc_method"]) == ("greeter", "SayHello")


async def test_a_denied_method_through_the_tunnel_is_permission_denied_with_the_rule(make_sidecar, greeter):
    """The tunnel changes nothing about policy: the client reads PERMISSION_DENIED and the rule; nothing
    reaches the server; the next call on a new channel goes through."""
    h = await make_sidecar(tunnel_config(greeter), POLICY)
    with pytest.raises(grpc.RpcError) as caught:
        await asyncio.to_thread(proxied_call, h.outbound, "Admin")
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == "policy: denied by rule no-admin"
    assert greeter.metadata == []
    assert await asyncio.to_thread(proxied_call, h.outbound, "SayHello") == b"hello agent"
    assert [(e["reason"], e["grpc_status"]) for e in tunnel_events(await h.settle())] == \
        [("rule_denied", 7), ("allowed", 0)]


@pytest.mark.parametrize("method, expected", [
    ("SayHello", "hello agent"),
    ("Admin", "PERMISSION_DENIED policy: denied by rule no-admin"),
])
async def test_a_tls_channel_configured_by_https_proxy_speaks_h2_to_the_interception_leaf(
        make_sidecar, greeter, method, expected):
    """grpcio in its own process with only ``https_proxy`` set and the interception CA as its roots: the
    leaf's handshake selects h2 (grpc insists on ALPN h2), the call reaches the server or is refused."""
    h = await make_sidecar(tunnel_config(greeter), POLICY)
    env = {**without_proxies(), "https_proxy": h.outbound}
    code, out, err = await run(sys.executable, "-c", TLS_CLIENT, intercept_ca(h), f"{HOST}:443", method, env=env)
    assert code == 0, err
    assert out.strip() == expected
    (event,) = tunnel_events(await h.settle())
    assert event["protocol"] == "grpc" and event["target"]["grpc_method"] == method


async def test_curl_http2_through_the_proxy_speaks_h2_inside_the_tunnel(make_sidecar, greeter, upstream):
    """curl --http2 -x with the interception CA: HTTP/2 inside the tunnel (by ALPN), the upstream reached
    over its own protocol, one allowed event."""
    h = await make_sidecar(tunnel_config(greeter, upstream), POLICY)
    code, out, err = await run("curl", "-sS", "--http2", "-x", h.outbound, "--cacert", intercept_ca(h),
                               "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
                               "https://web.internal/v1/x", env=without_proxies())
    assert code == 0, err
    assert out == "2 200"
    assert [s.path for s in upstream.seen] == ["/v1/x"]
    (event,) = tunnel_events(await h.settle())
    assert (event["decision"], event["protocol"], event["target"]["upstream"]) == ("allow", "connect", "web")


async def test_plain_http11_in_a_cleartext_tunnel_reaches_an_http_upstream(make_sidecar, greeter, upstream):
    """curl --proxytunnel to an http:// URL: CONNECT, then HTTP/1.1 in cleartext, served for an http://
    upstream exactly as forward-proxy mode would serve it."""
    h = await make_sidecar(tunnel_config(greeter, upstream), POLICY)
    code, out, err = await run("curl", "-sS", "--proxytunnel", "-x", h.outbound, "-o", "/dev/null",
                               "-w", "%{http_code}", "http://web.internal/v1/plain", env=without_proxies())
    assert (code, out) == (0, "200"), err
    assert [s.path for s in upstream.seen] == ["/v1/plain"]
    assert [e["decision"] for e in tunnel_events(await h.settle())] == ["allow"]


async def test_cleartext_inside_a_tunnel_to_an_https_upstream_is_refused_tls_required(
        make_sidecar, greeter, upstream_ca, tmp_path):
    """An insecure gRPC channel through a tunnel to an upstream reached over https: the agent meant to
    speak TLS to it, so cleartext is refused, tls_required as PERMISSION_DENIED saying so; nothing is
    forwarded; one event."""
    ca_file = tmp_path / "upstream-ca.pem"
    upstream_ca.cert_pem.write_to_path(str(ca_file))
    config = tunnel_config(greeter, greeter_url="https://127.0.0.1:1")  # never dialled
    config["outbound"]["upstreams"]["greeter"]["ca"] = str(ca_file)
    h = await make_sidecar(config, POLICY)
    with pytest.raises(grpc.RpcError) as caught:
        await asyncio.to_thread(proxied_call, h.outbound, "SayHello")
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "expected tls (a ClientHello) inside the tunnel" in caught.value.details()
    (event,) = tunnel_events(await h.settle())
    assert (event["reason"], event["grpc_status"], event["outcome"]) == ("tls_required", 7, "refused")
    assert event["credential"] is None


async def open_tunnel(h: SidecarHarness, authority: str, *, alpn: list[str] | None = None
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port("outbound"))
    writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 200 Connection Established\r\n\r\n"
    if alpn is not None:
        context = ssl.create_default_context(cafile=intercept_ca(h))
        context.set_alpn_protocols(alpn)
        await writer.start_tls(context, server_hostname=authority.rpartition(":")[0])
    return reader, writer


def get_block(authority: str, path: str = "/v1/x") -> list[tuple[str, str]]:
    return [(":method", "GET"), (":scheme", "https"), (":authority", authority), (":path", path)]


async def test_an_authority_naming_another_host_in_an_h2_tunnel_is_refused_alone(make_sidecar, greeter, upstream):
    """In one h2 tunnel a stream whose :authority names another host is refused host_mismatch; the
    stream beside it is served; nothing for the other host is forwarded."""
    h = await make_sidecar(tunnel_config(greeter, upstream), POLICY)
    reader, writer = await open_tunnel(h, "web.internal:443", alpn=["h2"])
    answers, goaway = await streams(reader, writer, [get_block("evil.example"), get_block("web.internal")])
    assert [status for status, _ in answers] == [403, 200] and goaway is None
    assert [s.path for s in upstream.seen] == ["/v1/x"]
    assert sorted(e["reason"] for e in tunnel_events(await h.settle())) == ["allowed", "host_mismatch"]


async def test_h2c_by_prior_knowledge_in_a_cleartext_tunnel_is_one_exchange_per_stream(make_sidecar, greeter,
                                                                                       upstream):
    """Raw h2c frames after the 200: two streams, each routed by the tunnel's host, each its own event."""
    h = await make_sidecar(tunnel_config(greeter, upstream), POLICY)
    reader, writer = await open_tunnel(h, "web.internal:80")
    answers, goaway = await streams(reader, writer, [get_block("web.internal", "/v1/a"),
                                                     get_block("web.internal:80", "/v1/b")])
    assert [status for status, _ in answers] == [200, 200] and goaway is None
    assert sorted(s.path for s in upstream.seen) == ["/v1/a", "/v1/b"]
    assert [e["decision"] for e in tunnel_events(await h.settle())] == ["allow", "allow"]
