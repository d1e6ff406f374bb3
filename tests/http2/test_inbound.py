"""HTTP/2 on the inbound mTLS listener (issue 17 item 1): ALPN offers ``h2`` and ``http/1.1``; a
caller that chooses ``h2`` is identified, decided and forwarded per stream exactly as on HTTP/1.1,
and a caller refused at the handshake reads the same refusal over HTTP/2."""

from __future__ import annotations

import ssl

import httpx

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
