"""CONNECT with TLS interception: HTTPS_PROXY clients reach mapped upstreams through the pipeline,
every decrypted request is decided and recorded on its own, and nothing else gets a tunnel."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import trustme

from tests.harness import SidecarHarness, Upstream, admin, assert_valid, raw_http, read_until
from tests.scenarios.connect import (SECRET, billing_config, exchange, get, intercept_ca, start_https_upstream,
                                     through_tunnel, tunnel)
from tests.scenarios.outbound import POLICY, config_for

AGENT_TOKEN = "Bearer agent-own-token"
CONNECT_BILLING = b"CONNECT billing.internal:443 HTTP/1.1\r\nHost: billing.internal:443\r\n\r\n"

# A blocking HTTPS client in its own process, configured only by the environment (HTTPS_PROXY, a CA variable).
CLIENT = """
import json, sys
if sys.argv[1] == "requests":
    import requests
    client = requests.Session()
else:
    import httpx
    client = httpx.Client()
out = []
for url in sys.argv[2:]:
    r = client.get(url, headers={"Authorization": "Bearer agent-own-token"})
    out.append({"status": r.status_code, "via": r.headers.get("Via")})
print(json.dumps(out))
"""


@pytest.fixture
async def https_upstream(upstream_ca: trustme.CA) -> AsyncIterator[Upstream]:
    server = await start_https_upstream(upstream_ca)
    yield server
    await server.stop()


@pytest.fixture
async def sidecar(make_sidecar: Any, https_upstream: Upstream, upstream_ca: trustme.CA,
                  tmp_path: Path) -> SidecarHarness:
    return await make_sidecar(billing_config(https_upstream, upstream_ca, tmp_path), POLICY)


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


async def eventually(check: Callable[[], Awaitable[bool]]) -> bool:
    """True as soon as check() is; False after a bounded number of tries (no duration asserted)."""
    for _ in range(200):
        if await check():
            return True
        await asyncio.sleep(0.01)
    return False


async def handshake_failures(h: SidecarHarness) -> float:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{h.port('metrics')}/metrics") as r:
            text = await r.text()
    for line in text.splitlines():
        if line.startswith("sidecar_tls_handshake_failures_total") and 'listener="outbound"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def failures_counted(h: SidecarHarness) -> bool:
    return await handshake_failures(h) >= 1


async def no_tunnels(h: SidecarHarness) -> bool:
    assert h.sidecar is not None
    return h.sidecar.interceptor.open_tunnels == 0


def connect_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["protocol"] == "connect"]


@pytest.mark.parametrize("library, ca_variable", [
    # requests replaces certifi's bundle with REQUESTS_CA_BUNDLE
    ("requests", "REQUESTS_CA_BUNDLE"),
    # httpx (trust_env) loads SSL_CERT_FILE
    ("httpx", "SSL_CERT_FILE"),
])
async def test_python_clients_with_https_proxy_reach_the_upstream_with_the_attached_credential(
        sidecar: SidecarHarness, https_upstream: Upstream, library: str, ca_variable: str) -> None:
    """Two calls over one kept-alive tunnel: the upstream sees our key, never the agent's; one event each."""
    env = client_env(HTTPS_PROXY=sidecar.outbound, **{ca_variable: intercept_ca(sidecar)})
    urls = ("https://billing.internal/api/v1/invoices?x=1", "https://billing.internal/api/v1/other")
    code, out, err = await run(sys.executable, "-c", CLIENT, library, *urls, env=env)
    assert code == 0, err
    assert json.loads(out) == [{"status": 200, "via": "1.1 sidecar"}] * 2
    assert [s.path for s in https_upstream.seen] == ["/api/v1/invoices?x=1", "/api/v1/other"]
    assert all(s.header("X-API-Key") == SECRET and not s.has_header("Authorization") for s in https_upstream.seen)
    events = connect_events(await sidecar.settle())
    assert [(e["decision"], e["rule_id"], e["target"]["path"]) for e in events] == [
        ("allow", "read-invoices", "/v1/invoices"), ("allow", "read-invoices", "/v1/other")]
    assert all(e["credential"]["source"] == "static" and e["outcome"] == "completed" for e in events)


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
    responses = await through_tunnel(sidecar, get("/api/v1/a"), get("/api/v1/b"), get("/api/v1/admin/users"))
    assert [status for status, _, _ in responses] == [200, 200, 403]
    assert [s.path for s in https_upstream.seen] == ["/api/v1/a", "/api/v1/b"]
    events = connect_events(await sidecar.settle())
    assert [(e["target"]["path"], e["decision"], e["rule_id"]) for e in events] == [
        ("/v1/a", "allow", "read-invoices"), ("/v1/b", "allow", "read-invoices"),
        ("/v1/admin/users", "deny", "no-admin")]
    assert len({e["decision_id"] for e in events}) == 3


async def test_a_denied_path_inside_the_tunnel_gets_a_json_403_inside_tls(
        sidecar: SidecarHarness, https_upstream: Upstream) -> None:
    """Policy refusals inside the tunnel are answered over TLS as JSON, with Proxy-Status."""
    [(status, headers, body)] = await through_tunnel(sidecar, get("/api/v1/admin/users"))
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
    [(got, _, body)] = await through_tunnel(sidecar, get("/api/v1/x", host))
    assert (got, json.loads(body)["error"]) == (status, reason)
    assert https_upstream.seen == []
    [event] = connect_events(await sidecar.settle())
    assert event["reason"] == reason and event["status"] == status


async def test_the_tunnel_applies_the_base_path_and_path_rules_like_forward_proxy_mode(
        sidecar: SidecarHarness, https_upstream: Upstream) -> None:
    """Outside the upstream's base path is unknown_upstream; an encoded slash is bad_request."""
    responses = await through_tunnel(sidecar, get("/other/v1/x"), get("/api/v1/a%2Fb"))
    assert [(status, json.loads(body)["error"]) for status, _, body in responses] == [
        (403, "unknown_upstream"), (400, "bad_request")]
    assert https_upstream.seen == []


@pytest.mark.parametrize("target, headers, reason, status", [
    # a host no upstream lists: there is no blind tunnel
    ("evil.example:443", "", "unknown_upstream", 403),
    # the upstream's own address is not one of its hosts: only listed names open tunnels
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
    response = await raw_http(sidecar.port("outbound"), CONNECT_BILLING + b"\x16\x03\x01early")
    assert response.startswith(b"HTTP/1.1 400") and b'"error":"bad_request"' in response


async def test_tunnels_beyond_the_cap_are_refused_with_retry_after(sidecar: SidecarHarness) -> None:
    """With max_tunnels open, another CONNECT is refused 429 rate_limited and opens nothing."""
    assert sidecar.sidecar is not None
    interceptor = sidecar.sidecar.interceptor
    interceptor.max_tunnels = 1
    reader, writer = await tunnel(sidecar, intercept_ca(sidecar))
    try:
        response = await raw_http(sidecar.port("outbound"), CONNECT_BILLING)
        status, _, _ = await exchange(reader, writer, get("/api/v1/x"))
    finally:
        writer.close()
    assert response.startswith(b"HTTP/1.1 429") and b"Retry-After: 1" in response
    assert status == 200  # the open tunnel is unaffected


async def test_a_client_silent_after_the_200_is_cut_at_the_handshake_timeout(
        make_sidecar: Any, https_upstream: Upstream, upstream_ca: trustme.CA, tmp_path: Path) -> None:
    """The TLS handshake is bounded by outbound.timeouts.connect; the failure is counted."""
    config = billing_config(https_upstream, upstream_ca, tmp_path)
    config["outbound"]["timeouts"] = {"connect": "200ms"}
    h = await make_sidecar(config, POLICY)
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port("outbound"))
    writer.write(CONNECT_BILLING)
    assert await reader.read() == b"HTTP/1.1 200 Connection Established\r\n\r\n"  # then closed, nothing else
    writer.close()
    assert await eventually(lambda: failures_counted(h))
    assert await handshake_failures(h) == 1
    assert_one_handshake_event(await h.settle(), "TimeoutError")


async def test_a_revoked_agent_gets_no_new_tunnel_and_no_request_through_an_open_one(
        sidecar: SidecarHarness, https_upstream: Upstream) -> None:
    """Agent revocation refuses the CONNECT itself and every later request in a tunnel opened before it."""
    assert sidecar.sidecar is not None
    reader, writer = await tunnel(sidecar, intercept_ca(sidecar))
    status, body = await admin(sidecar, "POST", "/revocations",
                               json={"kind": "agent", "id": sidecar.sidecar.runtime.agent.id})
    assert status == 201, body
    try:
        inside, _, _ = await exchange(reader, writer, get("/api/v1/x"))
    finally:
        writer.close()
    response = await raw_http(sidecar.port("outbound"), CONNECT_BILLING)
    assert inside == 403 and response.startswith(b"HTTP/1.1 403") and b'"error":"revoked"' in response
    assert https_upstream.seen == []


async def test_an_idle_tunnel_is_closed_after_the_idle_timeout(
        make_sidecar: Any, https_upstream: Upstream, upstream_ca: trustme.CA, tmp_path: Path) -> None:
    """A tunnel carrying no request is closed after outbound.timeouts.idle, and its slot is freed."""
    config = billing_config(https_upstream, upstream_ca, tmp_path)
    config["outbound"]["timeouts"] = {"idle": "200ms"}
    h = await make_sidecar(config, POLICY)
    reader, writer = await tunnel(h, intercept_ca(h))
    assert await reader.read() == b""
    writer.close()
    assert await eventually(lambda: no_tunnels(h))


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
    # the sidecar sees the client's alert a moment after curl exits
    assert await eventually(lambda: failures_counted(sidecar))
    assert await handshake_failures(sidecar) == 1
    assert https_upstream.seen == []
    assert_one_handshake_event(await sidecar.settle(), "TLSV1_ALERT_UNKNOWN_CA")


def assert_one_handshake_event(events: list[dict[str, Any]], detail: str) -> None:
    """Exactly one event for the failed tunnel: handshake_failed, cut, naming the host and the TLS error."""
    [event] = connect_events(events)
    assert_valid([event])
    assert (event["decision"], event["reason"], event["outcome"], event["status"]) == (
        "deny", "handshake_failed", "cut", None)
    assert event["target"]["method"] == "CONNECT" and event["target"]["host"] == "billing.internal"
    assert event["target"]["upstream"] == "billing" and detail in event["reason_detail"]


async def python_ssl_through_connect(h: SidecarHarness, ending: str) -> None:
    """A Python ssl client after its 200: one that trusts only the system store, or one that closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port("outbound"))
    try:
        writer.write(CONNECT_BILLING)
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 200 Connection Established\r\n\r\n"
        if ending == "untrusted":
            with pytest.raises(ssl.SSLCertVerificationError):
                await writer.start_tls(ssl.create_default_context(), server_hostname="billing.internal")
    finally:
        writer.close()


@pytest.mark.parametrize("ending", [
    # the agent's Python does not trust the interception CA: it sends an alert and closes
    "untrusted",
    # the agent closes after the 200 without a ClientHello
    "closed",
])
async def test_a_tunnel_whose_tls_handshake_fails_writes_one_event(
        sidecar: SidecarHarness, https_upstream: Upstream, ending: str) -> None:
    """A CONNECT whose TLS handshake with the agent fails ends in exactly one trust-decision event, and
    nothing is forwarded (issue 11 item 16)."""
    await python_ssl_through_connect(sidecar, ending)
    assert await eventually(lambda: failures_counted(sidecar))
    await asyncio.sleep(0.05)
    assert_one_handshake_event(await sidecar.settle(), "Error")  # as Python's socket reports it: reset or EOF
    assert https_upstream.seen == []


async def test_the_interception_ca_is_written_to_state_dir(sidecar: SidecarHarness) -> None:
    """Without outbound.intercept the CA certificate is generated into state_dir/intercept/ca.crt."""
    path = Path(intercept_ca(sidecar))
    assert path == sidecar.tmp / "state" / "intercept" / "ca.crt"
    assert path.read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert sidecar.sidecar is not None
    assert path.read_text() == sidecar.sidecar.interceptor.ca.cert_pem


async def test_an_operator_ca_from_config_signs_the_leaves(
        make_sidecar: Any, https_upstream: Upstream, upstream_ca: trustme.CA, tmp_path: Path) -> None:
    """With outbound.intercept files, tunnels present leaves of that CA and its path is exposed."""
    operator = trustme.CA()
    cert, key = tmp_path / "op-ca.crt", tmp_path / "op-ca.key"
    operator.cert_pem.write_to_path(str(cert))
    operator.private_key_pem.write_to_path(str(key))
    config = billing_config(https_upstream, upstream_ca, tmp_path)
    config["outbound"]["intercept"] = {"ca_cert": str(cert), "ca_key": str(key)}
    h = await make_sidecar(config, POLICY)
    assert intercept_ca(h) == str(cert)
    [(status, _, _)] = await through_tunnel(h, get("/api/v1/x"), ca_file=str(cert))
    assert status == 200


async def test_a_connection_close_request_ends_the_tunnel_cleanly(
        sidecar: SidecarHarness, https_upstream: Upstream) -> None:
    """After the last response the tunnel ends with TLS close_notify; no plain byte follows it."""
    reader, writer = await tunnel(sidecar, intercept_ca(sidecar))
    status, _, _ = await exchange(reader, writer, get("/api/v1/x", extra="Connection: close\r\n"))
    assert status == 200
    assert await reader.read() == b""  # a stray plaintext response here would be an ssl error
    writer.close()
    assert sidecar.sidecar is not None
    assert await eventually(lambda: no_tunnels(sidecar))
    assert len(https_upstream.seen) == 1


async def test_stopping_the_sidecar_closes_idle_tunnels(sidecar: SidecarHarness) -> None:
    """An idle kept-alive tunnel does not hold shutdown: the client sees its connection end."""
    reader, writer = await tunnel(sidecar, intercept_ca(sidecar))
    status, _, _ = await exchange(reader, writer, get("/api/v1/x"))
    assert status == 200
    assert sidecar.sidecar is not None
    await sidecar.sidecar.stop()
    assert await reader.read() == b""
    assert sidecar.sidecar.interceptor.open_tunnels == 0
    writer.close()


def test_interception_works_on_uvloop(upstream_ca: trustme.CA, tmp_path: Path) -> None:
    """On uvloop (what `sidecar run` installs) the takeover works: two requests over one tunnel, an event each."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        up = await start_https_upstream(upstream_ca)
        h = await SidecarHarness(tmp_path, billing_config(up, upstream_ca, tmp_path), POLICY).start()
        try:
            responses = await through_tunnel(h, get("/api/v1/a"), get("/api/v1/admin/x"))
            assert [status for status, _, _ in responses] == [200, 403]
            assert [s.header("X-API-Key") for s in up.seen] == [SECRET]
            assert [e["rule_id"] for e in connect_events(await h.settle())] == ["read-invoices", "no-admin"]
        finally:
            await h.stop()
            await up.stop()

    uvloop.run(scenario())


@pytest.mark.parametrize("authority", ["evil.example:443", "billing.internal.evil.example:443",
                                       "127.0.0.1:17000", "[::1]:443", "user@billing.internal:443"])
async def test_connect_mints_no_certificate_for_a_host_that_is_not_mapped(make_sidecar, upstream, authority):
    """CONNECT to any authority that is not in an upstream's hosts is refused before a leaf is minted
    (security review 2: a defence that held)."""
    h = await make_sidecar(config_for(upstream), POLICY)
    data = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    response = await raw_http(h.port("outbound"), data)
    assert response.startswith(b"HTTP/1.1 4")
    assert not response.startswith(b"HTTP/1.1 200")
    assert len(h.sidecar.interceptor.ca._cache) == 0
    assert h.sidecar.interceptor.open_tunnels == 0


async def test_inside_a_tunnel_100_continue_is_answered_over_tls_and_the_tunnel_stays_usable(
        make_sidecar, tmp_path):
    """A decrypted request expecting ``100 Continue`` gets it inside the tunnel, its upstream gets the body
    without the expectation, and the next request on the tunnel is answered (security review 4: held,
    with finding I3)."""
    ca = trustme.CA()
    upstream = await start_https_upstream(ca)
    try:
        h = await make_sidecar(billing_config(upstream, ca, tmp_path), POLICY)
        reader, writer = await tunnel(h, intercept_ca(h))
        writer.write(b"POST /api/v1/up HTTP/1.1\r\nHost: billing.internal\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        assert await read_until(reader, b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        assert (await read_until(reader, b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        await read_until(reader, b"}")  # the upstream's JSON body
        writer.write(b"GET /api/v1/next HTTP/1.1\r\nHost: billing.internal\r\n\r\n")
        assert (await read_until(reader, b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        writer.close()
        posted = upstream.seen[0]
        assert posted.body == b"hello" and not posted.has_header("Expect")
    finally:
        await upstream.stop()
