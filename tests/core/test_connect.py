"""CONNECT with TLS interception: HTTPS_PROXY clients reach mapped upstreams through the pipeline,
every decrypted request is decided and recorded on its own, and nothing else gets a tunnel."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
import trustme

from tests.harness import SidecarHarness, Upstream, raw_http

SECRET = "canary-connect-secret-4b1e"
AGENT_TOKEN = "Bearer agent-own-token"

POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "read-invoices", "direction": "outbound", "upstream": "billing", "methods": ["GET", "POST"],
     "paths": ["/v1/**"], "effect": "allow"},
    {"id": "no-admin", "direction": "outbound", "upstream": "billing", "paths": ["/v1/admin/**"], "effect": "deny"},
]}

# A blocking HTTPS client in its own process: only HTTPS_PROXY and a CA setting from the environment.
REQUESTS_CLIENT = """
import json, sys, requests
session = requests.Session()
out = []
for url in sys.argv[1:]:
    r = session.get(url, headers={"Authorization": "Bearer agent-own-token"})
    out.append({"status": r.status_code, "body": r.text, "via": r.headers.get("Via")})
print(json.dumps(out))
"""

HTTPX_CLIENT = """
import json, sys, httpx
with httpx.Client() as client:
    out = []
    for url in sys.argv[1:]:
        r = client.get(url, headers={"Authorization": "Bearer agent-own-token"})
        out.append({"status": r.status_code, "body": r.text, "via": r.headers.get("Via")})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def upstream_ca() -> trustme.CA:
    return trustme.CA()


async def start_https_upstream(ca: trustme.CA) -> Upstream:
    """A real HTTPS upstream on 127.0.0.1 whose certificate names the IP it is reached at."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return await Upstream().start(ssl_context=context)


def billing_config(upstream: Upstream, ca: trustme.CA, tmp_path: Path) -> dict[str, Any]:
    """billing.internal maps to the upstream's https://127.0.0.1 URL, with a static credential."""
    ca_file = tmp_path / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return {
        "agent": {"name": "billing-agent", "environment": "test"},
        "outbound": {"upstreams": {"billing": {
            "url": f"https://127.0.0.1:{upstream.port}/api", "hosts": ["billing.internal"],
            "ca": str(ca_file), "credential": "legacy"}}},
        "credentials": {"legacy": {"type": "static", "header": "X-API-Key", "value": {"value": SECRET}}},
    }


@pytest.fixture
async def https_upstream(upstream_ca: trustme.CA) -> AsyncIterator[Upstream]:
    server = await start_https_upstream(upstream_ca)
    yield server
    await server.stop()


@pytest.fixture
async def sidecar(make_sidecar: Any, https_upstream: Upstream, upstream_ca: trustme.CA,
                  tmp_path: Path) -> SidecarHarness:
    return await make_sidecar(billing_config(https_upstream, upstream_ca, tmp_path), POLICY)


def intercept_ca(h: SidecarHarness) -> str:
    assert h.sidecar is not None
    return str(h.sidecar.runtime.interceptor.ca_cert_path)


def client_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any proxy or CA setting, plus ``extra``."""
    drop = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ssl_cert_file", "ssl_cert_dir",
            "requests_ca_bundle", "curl_ca_bundle"}
    env = {k: v for k, v in os.environ.items() if k.lower() not in drop}
    return {**env, **extra}


async def run(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*argv, env=env or client_env(), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def python_client(script: str, env: dict[str, str], *urls: str) -> list[dict[str, Any]]:
    code, out, err = await run(sys.executable, "-c", script, *urls, env=env)
    assert code == 0, err
    return json.loads(out)


async def tunnel(h: SidecarHarness, ca_file: str, authority: str = "billing.internal:443",
                 ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A CONNECT tunnel by hand: the 200, then TLS verified against ``ca_file`` for the host."""
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port("outbound"))
    writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 200 Connection Established\r\n\r\n"
    context = ssl.create_default_context(cafile=ca_file)
    await writer.start_tls(context, server_hostname=authority.rpartition(":")[0])
    return reader, writer


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   head: str) -> tuple[int, dict[str, str], bytes]:
    """One request on an open tunnel; the response's status, headers and body."""
    writer.write(head.encode())
    lines = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body


async def handshake_failures(h: SidecarHarness) -> float:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{h.port('metrics')}/metrics") as r:
            text = await r.text()
    for line in text.splitlines():
        if line.startswith("sidecar_tls_handshake_failures_total") and 'listener="outbound"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def connect_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["protocol"] == "connect"]


async def test_requests_with_https_proxy_reaches_the_upstream_with_the_attached_credential(
        sidecar: SidecarHarness, https_upstream: Upstream) -> None:
    """requests with HTTPS_PROXY and REQUESTS_CA_BUNDLE gets through; the upstream sees our key, not the agent's."""
    env = client_env(HTTPS_PROXY=sidecar.outbound, REQUESTS_CA_BUNDLE=intercept_ca(sidecar))
    [result] = await python_client(REQUESTS_CLIENT, env, "https://billing.internal/api/v1/invoices?x=1")
    assert result["status"] == 200 and result["via"] == "1.1 sidecar"
    seen = https_upstream.seen[-1]
    assert seen.path == "/api/v1/invoices?x=1"
    assert seen.header("X-API-Key") == SECRET
    assert not seen.has_header("Authorization")
    [event] = connect_events(await sidecar.settle())
    assert event["decision"] == "allow" and event["rule_id"] == "read-invoices"
    assert event["target"]["path"] == "/v1/invoices" and event["target"]["upstream"] == "billing"
    assert event["credential"]["source"] == "static" and event["outcome"] == "completed"


async def test_httpx_with_https_proxy_and_ssl_cert_file_reaches_the_upstream(
        sidecar: SidecarHarness, https_upstream: Upstream) -> None:
    """httpx with HTTPS_PROXY and SSL_CERT_FILE gets through, with the static credential attached."""
    env = client_env(HTTPS_PROXY=sidecar.outbound, SSL_CERT_FILE=intercept_ca(sidecar))
    [result] = await python_client(HTTPX_CLIENT, env, "https://billing.internal/api/v1/x")
    assert result["status"] == 200
    assert https_upstream.seen[-1].header("X-API-Key") == SECRET
    assert https_upstream.seen[-1].header("Authorization") is None


async def test_curl_through_the_proxy_with_the_interception_ca(
        sidecar: SidecarHarness, https_upstream: Upstream) -> None:
    """curl --proxy --cacert reaches the upstream's base path through an intercepted tunnel."""
    code, out, err = await run("curl", "-sS", "--proxy", sidecar.outbound, "--cacert", intercept_ca(sidecar),
                               "-H", f"Authorization: {AGENT_TOKEN}", "https://billing.internal/api/v1/y")
    assert code == 0, err
    assert json.loads(out) == {"ok": True, "path": "/api/v1/y"}
    assert https_upstream.seen[-1].header("X-API-Key") == SECRET


async def test_several_requests_over_one_tunnel_each_get_their_own_event(
        sidecar: SidecarHarness, https_upstream: Upstream) -> None:
    """Keep-alive inside one tunnel: each request is decided, forwarded and recorded on its own."""
    reader, writer = await tunnel(sidecar, intercept_ca(sidecar))
    try:
        for path in ("/api/v1/a", "/api/v1/b", "/api/v1/admin/users"):
            status, _, _ = await exchange(reader, writer, f"GET {path} HTTP/1.1\r\nHost: billing.internal\r\n\r\n")
            assert status == (403 if "admin" in path else 200)
    finally:
        writer.close()
    assert [s.path for s in https_upstream.seen] == ["/api/v1/a", "/api/v1/b"]
    events = connect_events(await sidecar.settle())
    assert [(e["target"]["path"], e["decision"], e["rule_id"]) for e in events] == [
        ("/v1/a", "allow", "read-invoices"), ("/v1/b", "allow", "read-invoices"),
        ("/v1/admin/users", "deny", "no-admin")]
    assert len({e["decision_id"] for e in events}) == 3


async def test_a_denied_path_inside_the_tunnel_gets_a_json_403_inside_tls(
        sidecar: SidecarHarness, https_upstream: Upstream) -> None:
    """Policy refusals inside the tunnel are answered over TLS as JSON, with Proxy-Status."""
    reader, writer = await tunnel(sidecar, intercept_ca(sidecar))
    try:
        status, headers, body = await exchange(
            reader, writer, "GET /api/v1/admin/users HTTP/1.1\r\nHost: billing.internal\r\n\r\n")
    finally:
        writer.close()
    assert status == 403 and json.loads(body)["error"] == "rule_denied"
    assert 'details="rule_denied"' in headers["proxy-status"]
    assert https_upstream.seen == []


@pytest.mark.parametrize("host, reason, status", [
    # another name than the CONNECT authority: a request smuggled to a different upstream
    ("evil.example", "host_mismatch", 403),
    # the right name on another port than the tunnel's
    ("billing.internal:8443", "host_mismatch", 403),
    # a name with a userinfo part is not a host at all
    ("user@billing.internal", "host_mismatch", 403),
])
async def test_a_host_header_naming_another_authority_is_refused(
        sidecar: SidecarHarness, https_upstream: Upstream, host: str, reason: str, status: int) -> None:
    """Inside the tunnel, Host must name the CONNECT authority; anything else is refused and not forwarded."""
    reader, writer = await tunnel(sidecar, intercept_ca(sidecar))
    try:
        got, _, body = await exchange(reader, writer, f"GET /api/v1/x HTTP/1.1\r\nHost: {host}\r\n\r\n")
    finally:
        writer.close()
    assert (got, json.loads(body)["error"]) == (status, reason)
    assert https_upstream.seen == []
    [event] = connect_events(await sidecar.settle())
    assert event["reason"] == reason and event["status"] == status


async def test_the_tunnel_applies_the_base_path_and_path_rules_like_forward_proxy_mode(
        sidecar: SidecarHarness, https_upstream: Upstream) -> None:
    """Outside the upstream's base path is unknown_upstream; an encoded slash is bad_request."""
    reader, writer = await tunnel(sidecar, intercept_ca(sidecar))
    try:
        outside, _, _ = await exchange(reader, writer, "GET /other/v1/x HTTP/1.1\r\nHost: billing.internal\r\n\r\n")
        encoded, _, _ = await exchange(reader, writer, "GET /api/v1/a%2Fb HTTP/1.1\r\nHost: billing.internal\r\n\r\n")
    finally:
        writer.close()
    assert (outside, encoded) == (403, 400)
    assert https_upstream.seen == []


@pytest.mark.parametrize("target, headers, reason, status", [
    # a host no upstream lists: there is no blind tunnel
    ("evil.example:443", "", "unknown_upstream", 403),
    # a mapped name on any port is still that upstream; an IP is not a name it lists
    ("127.0.0.1:443", "", "unknown_upstream", 403),
    # authority form needs a port (RFC 9110 9.3.6)
    ("billing.internal", "", "bad_request", 400),
    # a browser page the agent drives
    ("billing.internal:443", "Origin: https://evil.example\r\n", "browser_origin", 403),
])
async def test_refused_connects_get_json_and_no_tunnel(
        sidecar: SidecarHarness, https_upstream: Upstream, target: str, headers: str, reason: str,
        status: int) -> None:
    """A refused CONNECT answers JSON with its reason, closes, and is recorded once with protocol connect."""
    request = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{headers}\r\n".encode()
    response = await raw_http(sidecar.port("outbound"), request)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == str(status).encode()
    assert json.loads(body)["error"] == reason
    assert b"connection: close" in head.lower()
    [event] = connect_events(await sidecar.settle())
    assert (event["reason"], event["status"], event["decision"]) == (reason, status, "deny")
    assert event["target"]["method"] == "CONNECT"
    assert https_upstream.seen == []


async def test_bytes_sent_before_the_200_are_refused_not_lost(sidecar: SidecarHarness) -> None:
    """A client that starts TLS before the 200 gets bad_request rather than a tunnel missing its first bytes."""
    request = b"CONNECT billing.internal:443 HTTP/1.1\r\nHost: billing.internal:443\r\n\r\n\x16\x03\x01early"
    response = await raw_http(sidecar.port("outbound"), request)
    assert response.startswith(b"HTTP/1.1 400") and b'"error":"bad_request"' in response


async def test_tunnels_beyond_the_cap_are_refused_with_retry_after(sidecar: SidecarHarness) -> None:
    """With max_tunnels open, another CONNECT is refused 429 rate_limited and opens nothing."""
    assert sidecar.sidecar is not None
    interceptor = sidecar.sidecar.runtime.interceptor
    interceptor.max_tunnels = 1
    reader, writer = await tunnel(sidecar, intercept_ca(sidecar))
    try:
        response = await raw_http(sidecar.port("outbound"), b"CONNECT billing.internal:443 HTTP/1.1\r\n"
                                                           b"Host: billing.internal:443\r\n\r\n")
        status, _, _ = await exchange(reader, writer, "GET /api/v1/x HTTP/1.1\r\nHost: billing.internal\r\n\r\n")
    finally:
        writer.close()
    assert response.startswith(b"HTTP/1.1 429") and b"Retry-After: 1" in response
    assert status == 200  # the open tunnel is unaffected
    assert interceptor.open_tunnels <= 1


async def test_a_client_silent_after_the_200_is_cut_at_the_handshake_timeout(
        make_sidecar: Any, https_upstream: Upstream, upstream_ca: trustme.CA, tmp_path: Path) -> None:
    """The TLS handshake is bounded by outbound.timeouts.connect; the failure is counted."""
    config = billing_config(https_upstream, upstream_ca, tmp_path)
    config["outbound"]["timeouts"] = {"connect": "200ms"}
    h = await make_sidecar(config, POLICY)
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port("outbound"))
    writer.write(b"CONNECT billing.internal:443 HTTP/1.1\r\nHost: billing.internal:443\r\n\r\n")
    assert await reader.read() == b"HTTP/1.1 200 Connection Established\r\n\r\n"  # then closed, nothing else
    writer.close()
    for _ in range(200):
        if await handshake_failures(h) >= 1:
            break
        await asyncio.sleep(0.01)
    assert await handshake_failures(h) == 1


async def test_curl_to_an_unknown_host_gets_403_from_the_proxy(sidecar: SidecarHarness) -> None:
    """curl sees the CONNECT refused (403) and never starts TLS with anyone."""
    code, _, err = await run("curl", "-sS", "--proxy", sidecar.outbound, "--cacert", intercept_ca(sidecar),
                             "https://evil.example/")
    assert code != 0 and "403" in err
    assert await handshake_failures(sidecar) == 0


async def test_a_client_that_does_not_trust_the_ca_fails_its_handshake_and_nothing_is_forwarded(
        sidecar: SidecarHarness, https_upstream: Upstream, upstream_ca: trustme.CA, tmp_path: Path) -> None:
    """curl trusting another CA refuses our leaf; the failure is counted and no request is forwarded."""
    other = tmp_path / "other-ca.pem"
    upstream_ca.cert_pem.write_to_path(str(other))
    code, _, err = await run("curl", "-sS", "--proxy", sidecar.outbound, "--cacert", str(other),
                             "https://billing.internal/api/v1/x")
    assert code == 60, err  # peer certificate cannot be authenticated with given CA certificates
    for _ in range(200):  # the sidecar sees the client's alert a moment after curl exits
        if await handshake_failures(sidecar) >= 1:
            break
        await asyncio.sleep(0.01)
    assert await handshake_failures(sidecar) == 1
    assert https_upstream.seen == []
    assert connect_events(await sidecar.settle()) == []


async def test_the_interception_ca_is_written_to_state_dir(sidecar: SidecarHarness) -> None:
    """Without outbound.intercept the CA certificate is generated into state_dir/intercept/ca.crt."""
    path = Path(intercept_ca(sidecar))
    assert path == sidecar.tmp / "state" / "intercept" / "ca.crt"
    assert path.read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert sidecar.sidecar is not None
    assert path.read_text() == sidecar.sidecar.runtime.interceptor.ca.cert_pem


async def test_an_operator_ca_from_config_signs_the_leaves(
        make_sidecar: Any, https_upstream: Upstream, upstream_ca: trustme.CA, tmp_path: Path) -> None:
    """With outbound.intercept files, tunnels present leaves of that CA and its path is exposed."""
    operator = trustme.CA()
    cert, key = tmp_path / "op-ca.crt", tmp_path / "op-ca.key"
    operator.cert_pem.write_to_path(str(cert))
    operator.private_key_pem.write_to_path(str(key))
    ca_file = tmp_path / "upstream-ca.pem"
    upstream_ca.cert_pem.write_to_path(str(ca_file))
    h = await make_sidecar({"outbound": {"intercept": {"ca_cert": str(cert), "ca_key": str(key)}, "upstreams": {
        "billing": {"url": f"https://127.0.0.1:{https_upstream.port}/api", "hosts": ["billing.internal"],
                    "ca": str(ca_file)}}}}, POLICY)
    assert intercept_ca(h) == str(cert)
    reader, writer = await tunnel(h, str(cert))
    try:
        status, _, _ = await exchange(reader, writer, "GET /api/v1/x HTTP/1.1\r\nHost: billing.internal\r\n\r\n")
    finally:
        writer.close()
    assert status == 200


async def test_a_connection_close_request_ends_the_tunnel_cleanly(
        sidecar: SidecarHarness, https_upstream: Upstream) -> None:
    """After the last response the tunnel ends with TLS close_notify; no plain byte follows it."""
    reader, writer = await tunnel(sidecar, intercept_ca(sidecar))
    status, _, _ = await exchange(
        reader, writer, "GET /api/v1/x HTTP/1.1\r\nHost: billing.internal\r\nConnection: close\r\n\r\n")
    assert status == 200
    assert await reader.read() == b""  # a stray plaintext response here would be an ssl error
    writer.close()
    assert sidecar.sidecar is not None
    for _ in range(200):
        if sidecar.sidecar.runtime.interceptor.open_tunnels == 0:
            break
        await asyncio.sleep(0.01)
    assert sidecar.sidecar.runtime.interceptor.open_tunnels == 0
    assert len(https_upstream.seen) == 1


async def test_stopping_the_sidecar_closes_idle_tunnels(sidecar: SidecarHarness) -> None:
    """An idle kept-alive tunnel does not hold shutdown: the client sees its connection end."""
    reader, writer = await tunnel(sidecar, intercept_ca(sidecar))
    status, _, _ = await exchange(reader, writer, "GET /api/v1/x HTTP/1.1\r\nHost: billing.internal\r\n\r\n")
    assert status == 200
    assert sidecar.sidecar is not None
    await sidecar.sidecar.stop()
    assert await reader.read() == b""
    assert sidecar.sidecar.runtime.interceptor.open_tunnels == 0
    writer.close()


def test_interception_works_on_uvloop(upstream_ca: trustme.CA, tmp_path: Path) -> None:
    """On uvloop (what `sidecar run` installs) the takeover works: two requests over one tunnel, an event each."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        up = await start_https_upstream(upstream_ca)
        h = await SidecarHarness(tmp_path, billing_config(up, upstream_ca, tmp_path), POLICY).start()
        try:
            reader, writer = await tunnel(h, intercept_ca(h))
            for path, want in (("/api/v1/a", 200), ("/api/v1/admin/x", 403)):
                status, _, _ = await exchange(reader, writer, f"GET {path} HTTP/1.1\r\nHost: billing.internal\r\n\r\n")
                assert status == want
            writer.close()
            assert [s.header("X-API-Key") for s in up.seen] == [SECRET]
            assert [e["rule_id"] for e in connect_events(await h.settle())] == ["read-invoices", "no-admin"]
        finally:
            await h.stop()
            await up.stop()

    uvloop.run(scenario())
