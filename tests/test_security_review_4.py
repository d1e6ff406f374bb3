"""Security review, round 4: the paths that run over the forwarding client, end to end through a real sidecar.

Tests named ``test_i<N>_...`` reproduce findings I1-I5 of the fourth review; each failed before its
fix and now asserts it. The others confirm a behaviour that held. Upstreams and agents here are raw
asyncio servers on loopback whose every byte the test writes; clients speak raw HTTP/1.x, so that
what reaches the wire (or does not) is observed, not assumed.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trustme

from tests.core.test_inbound import POLICY as INBOUND_POLICY
from tests.core.test_inbound import client_context, human_token, inbound_config
from tests.harness import SidecarHarness, admin, raw_http
from tests.test_security_review import out_config
from tests.test_security_review_3 import raw_server  # noqa: F401  (fixture)

ALLOW_ALL = {"version": 1, "default": "deny", "rules": [
    {"id": "all", "direction": "outbound", "upstream": "billing", "effect": "allow"},
]}
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
BOUND = 3.0  # seconds any single wait in these tests may take before it counts as a hang


def outbound_to(port: int, **upstream: Any) -> dict[str, Any]:
    """A sidecar whose upstream ``billing`` is the raw server on ``port`` (base path /api)."""
    return out_config(SimpleNamespace(url=f"http://127.0.0.1:{port}"), **upstream)


def inbound_to(tmp: Path, port: int, **timeouts: str) -> dict[str, Any]:
    """A sidecar whose agent (inbound.forward_to) is the raw server on ``port``."""
    config = inbound_config(tmp, SimpleNamespace(url=f"http://127.0.0.1:{port}"))
    if timeouts:
        config["inbound"]["timeouts"] = timeouts
    return config


async def open_outbound(h: SidecarHarness, head: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection to the outbound listener with ``head`` (``%d``: the listener's port) written on it."""
    port = h.port("outbound")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.replace(b"%d", str(port).encode()))
    return reader, writer


async def read_until(reader: asyncio.StreamReader, marker: bytes) -> bytes:
    async with asyncio.timeout(BOUND):
        return await reader.readuntil(marker)


async def read_to_close(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(BOUND):
        return await reader.read()


async def poll(condition: Any) -> bool:
    """True once ``condition()`` holds, polled for at most BOUND seconds."""
    for _ in range(int(BOUND / 0.02)):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


# -- I1: a client that goes away leaves its upstream exchange open -----------------------------

async def test_i1_a_client_that_goes_away_mid_stream_closes_its_upstream_exchange(make_sidecar, raw_server):
    """An agent that drops its connection while a quiet SSE stream is relayed must have the upstream
    connection closed and the exchange recorded as cut at once, not held until the upstream writes again."""
    upstream_closed = asyncio.Event()

    async def quiet_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"e\r\ndata: first\n\n\r\n")
        await reader.read()  # returns at the sidecar's close: the stream then has no reader
        upstream_closed.set()

    h = await make_sidecar(outbound_to(await raw_server(quiet_stream)), ALLOW_ALL)
    reader, writer = await open_outbound(h, b"GET /billing/events HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n")
    await read_until(reader, b"data: first\n\n")
    writer.close()
    async with asyncio.timeout(BOUND):
        await upstream_closed.wait()
    assert await poll(lambda: len(h.sidecar.runtime.exchanges) == 0)
    event = (await h.settle())[-1]
    assert event["outcome"] == "cut" and event["reason_detail"] == "client gone"
    assert h.sidecar.runtime.sessions.get("billing")._open == 0  # the pool slot is given back


# -- I2: a caller that stops sending its body holds the agent's connection forever --------------

async def tls_exchange(h: SidecarHarness, ctx: ssl.SSLContext, data: bytes) -> bytes:
    """Write ``data`` to the inbound listener over mTLS and read what comes back, within BOUND."""
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port("inbound"), ssl=ctx,
                                                   server_hostname="localhost")
    writer.write(data)
    try:
        return await read_until(reader, b"}")  # the end of a JSON refusal
    finally:
        writer.close()


async def test_i2_an_upload_the_caller_stops_sending_is_timed_out_by_idle(make_sidecar, raw_server, tmp_path):
    """A caller that declares a body and stops sending it (slowloris) is refused with 408 request_timeout
    after inbound.timeouts.idle, and the agent's connection is closed, instead of holding one of the
    agent pool's connections for as long as the caller keeps its socket open."""
    agent_closed = asyncio.Event()

    async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.read()  # waits for the rest of the body, which never comes
        agent_closed.set()

    h = await make_sidecar(inbound_to(tmp_path, await raw_server(agent), idle="300ms"), INBOUND_POLICY)
    ctx = client_context(h, "spiffe://sidecar.local/orchestrator", tmp_path / "caller")
    answer = await tls_exchange(h, ctx, b"POST /tasks/1 HTTP/1.1\r\nHost: agent\r\nContent-Length: 10\r\n\r\nhalf!")
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"error":"request_timeout"' in answer
    async with asyncio.timeout(BOUND):
        await agent_closed.wait()
    assert h.sidecar.runtime.sessions.agent()._open == 0
    event = (await h.settle())[-1]
    assert event["reason"] == "request_timeout" and event["status"] == 408 and event["outcome"] == "refused"


# -- I3: Expect: 100-continue is never answered -------------------------------------------------

async def test_i3_an_agent_waiting_for_100_continue_gets_it_and_the_expectation_is_not_forwarded(
        make_sidecar, raw_server):
    """An agent that sends ``Expect: 100-continue`` and waits for the interim answer before its body
    (curl, .NET, Java clients) gets ``100 Continue`` once the request is allowed, instead of stalling;
    the sidecar answers the expectation itself and the upstream gets the body without it."""
    heads: list[bytes] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        heads.append(await reader.readexactly(5))
        writer.write(OK)

    h = await make_sidecar(outbound_to(await raw_server(upstream)), ALLOW_ALL)
    reader, writer = await open_outbound(h, b"POST /billing/up HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                                            b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    assert await read_until(reader, b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    final = await read_until(reader, b"ok")
    writer.close()
    assert final.startswith(b"HTTP/1.1 200 OK\r\n")
    assert heads[1] == b"hello" and b"expect:" not in heads[0].lower()


async def test_a_refused_request_with_expect_gets_its_refusal_and_no_100_continue(make_sidecar, raw_server):
    """Held (regression): a request policy refuses is answered with its 403 at once, never with
    ``100 Continue`` first, so that the agent does not send a body nobody will read."""
    h = await make_sidecar(outbound_to(await raw_server(lambda r, w: asyncio.sleep(0))),
                           {"version": 1, "default": "deny", "rules": []})
    reader, writer = await open_outbound(h, b"POST /billing/up HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                                            b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    head = await read_until(reader, b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 403 ")


# -- I4: a response body that stalls is reported as a connection reset --------------------------

async def test_i4_a_response_body_that_stalls_is_an_upstream_timeout_not_a_reset(make_sidecar, raw_server):
    """An upstream that sends its head and then stops mid-body is answered 504 upstream_timeout (the
    body's idle timeout), not 502 upstream_unreachable "connection reset", which sends operators
    looking for a network fault."""
    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf!")
        await asyncio.sleep(BOUND * 2)

    config = outbound_to(await raw_server(stalls), timeouts={"first_byte": "300ms", "idle": "300ms"})
    h = await make_sidecar(config, ALLOW_ALL)
    port = h.port("outbound")
    answer = await raw_http(port, b"GET /billing/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n"
                            % port, read_timeout=BOUND)
    assert answer.startswith(b"HTTP/1.1 504 ") and b'"error":"upstream_timeout"' in answer
    event = (await h.settle())[-1]
    assert event["reason"] == "upstream_timeout" and event["status"] == 504


# -- I5: a cut response looks complete to an HTTP/1.0 client ------------------------------------

@pytest.mark.parametrize("cause", [
    "revoked",  # the agent is revoked while its response streams: the exchange is cut
    "upstream_reset",  # the upstream resets its connection mid-body
])
async def test_i5_a_response_broken_off_is_never_shown_complete(make_sidecar, raw_server, cause):
    """A response broken off by a revocation or an upstream reset resets the client's connection, so that
    even a response framed by the connection's close (to an HTTP/1.0 client) is not taken as whole."""
    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2 if cause == "upstream_reset" else BOUND * 2)
        writer.transport.abort()

    h = await make_sidecar(outbound_to(await raw_server(stream)), ALLOW_ALL)
    reader, writer = await open_outbound(h, b"GET /billing/report HTTP/1.0\r\nHost: 127.0.0.1:%d\r\n\r\n")
    await read_until(reader, b"first\n")
    if cause == "revoked":
        status, _ = await admin(h, "POST", "/revocations", json={"kind": "agent", "id": h.sidecar.runtime.agent.id})
        assert status in (200, 201)
    with pytest.raises(ConnectionResetError):
        await read_to_close(reader)
    writer.close()
    event = (await h.settle())[-1]
    assert event["outcome"] == ("cut" if cause == "revoked" else "upstream_reset")


# -- held: what the agent receives on the inbound path ------------------------------------------

async def test_the_agent_gets_the_base_path_its_own_host_and_never_the_callers_token(
        make_sidecar, raw_server, tmp_path):
    """Held (regression): an inbound call reaches the agent at forward_to's base path with the agent's
    Host, the sidecar's X-Forwarded-* and XFCC (never the caller's copies), a task id instead of the
    human's token, and no header the caller named in Connection."""
    heads: list[bytes] = []

    async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(OK)

    port = await raw_server(agent)
    config = inbound_config(tmp_path, SimpleNamespace(url=f"http://127.0.0.1:{port}/base/"))
    h = await make_sidecar(config, INBOUND_POLICY)
    ctx = client_context(h, "spiffe://sidecar.local/orchestrator", tmp_path / "caller")
    token = human_token()
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port("inbound"), ssl=ctx,
                                                   server_hostname="localhost")
    writer.write(b"GET /tasks/a/../1?q=%41 HTTP/1.1\r\nHost: agent.example:17443\r\n"
                 b"Authorization: Bearer " + token.encode() + b"\r\nX-Forwarded-For: 6.6.6.6\r\n"
                 b"X-Forwarded-Host: evil\r\nForwarded: for=evil\r\nX-Sidecar-Task: forged\r\n"
                 b"X-Forwarded-Client-Cert: URI=spiffe://evil/x\r\nConnection: X-Hidden\r\nX-Hidden: 1\r\n\r\n")
    assert (await read_until(reader, b"ok")).startswith(b"HTTP/1.1 200 ")
    writer.close()
    lines = heads[0].decode().split("\r\n")
    got = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines[1:] if line)}
    assert lines[0] == "GET /base/tasks/1?q=%41 HTTP/1.1"
    assert got["host"] == f"127.0.0.1:{port}"
    assert got["x-forwarded-for"] == "127.0.0.1" and got["x-forwarded-proto"] == "https"
    assert got["x-forwarded-client-cert"].endswith(";URI=spiffe://sidecar.local/orchestrator")
    assert len(got["x-sidecar-task"]) == 32 and got["x-sidecar-task"] != "forged"
    for absent in ("authorization", "x-forwarded-host", "forwarded", "x-hidden", "connection"):
        assert absent not in got
    assert token.encode() not in heads[0]


# -- held: the same fixes inside a CONNECT tunnel -------------------------------------------------

async def test_inside_a_tunnel_100_continue_is_answered_over_tls_and_the_tunnel_stays_usable(
        make_sidecar, tmp_path):
    """Held (with I3): a decrypted request expecting ``100 Continue`` gets it inside the tunnel, its
    upstream gets the body without the expectation, and the next request on the tunnel is answered."""
    from tests.core.test_connect import POLICY as CONNECT_POLICY
    from tests.core.test_connect import billing_config, intercept_ca, start_https_upstream, tunnel

    ca = trustme.CA()
    upstream = await start_https_upstream(ca)
    try:
        h = await make_sidecar(billing_config(upstream, ca, tmp_path), CONNECT_POLICY)
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
