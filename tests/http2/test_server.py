"""HTTP/2 on the listeners (issue 17 item 1): h2c with prior knowledge on the outbound listener,
each stream one exchange through the same pipeline as HTTP/1.1, refusals per stream."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.http2.raw import streams
from tests.scenarios.outbound import POLICY, SECRET, config_for


async def raw_h2(port: int, requests: list[list[tuple[str, str]]]) -> tuple[list[tuple[int, bytes]], int | None]:
    """Send header blocks as written, one stream each, on a new connection to ``port``."""
    return await streams(*await asyncio.open_connection("127.0.0.1", port), requests)


async def curl(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec("curl", "-sS", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_curl_with_prior_knowledge_is_routed_policed_and_credentialed(make_sidecar, upstream):
    """curl --http2-prior-knowledge to the outbound listener: the upstream is reached over HTTP/1.1
    with the credential attached, and the stream is one allowed event."""
    h = await make_sidecar(config_for(upstream), POLICY)
    code, out, err = await curl("--http2-prior-knowledge", "-i", f"{h.outbound}/billing/v1/invoices?x=1")
    assert code == 0, err
    assert out.startswith("HTTP/2 200"), out
    seen = upstream.seen[-1]
    assert seen.path == "/api/v1/invoices?x=1" and seen.header("X-API-Key") == SECRET
    event = (await h.settle())[-1]
    assert event["decision"] == "allow" and event["rule_id"] == "read-invoices" and event["outcome"] == "completed"


async def test_streams_on_one_connection_are_separate_exchanges(make_sidecar, upstream):
    """Several streams on one h2c connection, at once: each is its own exchange; a denied one is refused
    alone (403, its own event) and the others are served."""
    h = await make_sidecar(config_for(upstream), POLICY)
    async with httpx.AsyncClient(http1=False, http2=True) as client:
        paths = ["/billing/v1/a", "/billing/v1/admin/x", "/billing/v1/b", "/billing/v1/c"]
        answers = await asyncio.gather(*(client.get(f"{h.outbound}{p}") for p in paths))
    assert {r.http_version for r in answers} == {"HTTP/2"}
    assert [r.status_code for r in answers] == [200, 403, 200, 200]
    assert answers[1].json()["error"] == "rule_denied"
    events = sorted(await h.settle(), key=lambda e: e["target"]["path"])
    assert [(e["target"]["path"], e["decision"]) for e in events] == [
        ("/v1/a", "allow"), ("/v1/admin/x", "deny"), ("/v1/b", "allow"), ("/v1/c", "allow")]


async def test_a_request_body_streams_through_and_a_large_response_honours_flow_control(make_sidecar):
    """A 300 KB upload without content-length reaches the upstream whole; a 1 MB response (well past
    the initial 64 KB window) reaches the client whole."""
    from aiohttp import web

    from tests.harness import Upstream

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(body=body * 4)

    upstream = await Upstream(echo).start()
    try:
        h = await make_sidecar(config_for(upstream), POLICY)

        async def body():
            for _ in range(30):
                yield b"x" * 10_000

        async with httpx.AsyncClient(http1=False, http2=True) as client:
            response = await client.post(f"{h.outbound}/billing/v1/upload", content=body())
        assert (response.http_version, response.status_code) == ("HTTP/2", 200)
        assert response.content == b"x" * 1_200_000
    finally:
        await upstream.stop()


async def test_limits_refuse_one_stream_with_the_listeners_reason_codes(make_sidecar, upstream):
    """Too many headers: 431 headers_too_large; a body past the limit: 413 body_too_large; the next
    stream on the same connection is served."""
    config = config_for(upstream)
    config["outbound"]["limits"] = {"max_headers": 10, "max_body_bytes": 1000}
    h = await make_sidecar(config, POLICY)
    async with httpx.AsyncClient(http1=False, http2=True) as client:
        many = await client.get(f"{h.outbound}/billing/v1/a", headers={f"x-h{i}": "v" for i in range(20)})
        large = await client.post(f"{h.outbound}/billing/v1/a", content=b"y" * 5000)
        fine = await client.get(f"{h.outbound}/billing/v1/a")
    assert (many.status_code, many.json()["error"]) == (431, "headers_too_large")
    assert (large.status_code, large.json()["error"]) == (413, "body_too_large")
    assert fine.status_code == 200
    assert [e["reason"] for e in await h.settle()] == ["headers_too_large", "body_too_large", "allowed"]


async def test_a_host_header_naming_another_authority_refuses_that_stream_alone(make_sidecar, upstream):
    """:authority and host disagree (RFC 9113 §8.3.1): that stream is refused host_mismatch (a 403 on it,
    no GOAWAY), the stream beside it on the same connection is served; nothing else is forwarded."""
    h = await make_sidecar(config_for(upstream), POLICY)
    authority = f"127.0.0.1:{h.port('outbound')}"
    answers, goaway = await raw_h2(h.port("outbound"), [
        [(":method", "GET"), (":scheme", "http"), (":authority", authority), (":path", "/billing/v1/a"),
         ("host", "billing.internal")],
        [(":method", "GET"), (":scheme", "http"), (":authority", authority), (":path", "/billing/v1/b")]])
    assert [status for status, _ in answers] == [403, 200] and goaway is None
    assert b'"host_mismatch"' in answers[0][1]
    assert [s.path for s in upstream.seen] == ["/api/v1/b"]
    assert sorted(e["reason"] for e in await h.settle()) == ["allowed", "host_mismatch"]


async def test_a_malformed_request_is_a_stream_error_not_the_end_of_the_connection(make_sidecar, upstream):
    """A header block h2 would call malformed (an uppercase name, a connection-specific field; RFC 9113
    §8.1.1: a stream error) resets that stream PROTOCOL_ERROR with a bad_request event; the next stream
    on the connection is served."""
    h = await make_sidecar(config_for(upstream), POLICY)
    authority = f"127.0.0.1:{h.port('outbound')}"
    head = [(":method", "GET"), (":scheme", "http"), (":authority", authority)]
    answers, goaway = await raw_h2(h.port("outbound"), [
        [*head, (":path", "/billing/v1/a"), ("X-Upper", "1")],
        [*head, (":path", "/billing/v1/b"), ("connection", "keep-alive")],
        [*head, (":path", "/billing/v1/c")]])
    assert [status for status, _ in answers] == [0, 0, 200] and goaway is None
    assert [s.path for s in upstream.seen] == ["/api/v1/c"]
    assert sorted(e["reason"] for e in await h.settle()) == ["allowed", "bad_request", "bad_request"]


async def test_cookies_split_across_fields_are_joined_once(make_sidecar, upstream):
    """HTTP/2 may split a cookie into fields (RFC 9113 §8.2.3); the upstream gets one Cookie header."""
    h = await make_sidecar(config_for(upstream, pass_headers=["cookie"]), POLICY)  # stripped otherwise
    authority = f"127.0.0.1:{h.port('outbound')}"
    answers, _ = await raw_h2(h.port("outbound"), [[
        (":method", "GET"), (":scheme", "http"), (":authority", authority), (":path", "/billing/v1/a"),
        ("cookie", "a=1"), ("cookie", "b=2")]])
    assert answers[0][0] == 200
    assert upstream.seen[-1].header("Cookie") == "a=1; b=2"


async def test_http11_on_the_same_listener_is_unchanged(make_sidecar, upstream):
    """A client that sends HTTP/1.1 (no preface) is served by the HTTP/1.1 server as ever."""
    h = await make_sidecar(config_for(upstream), POLICY)
    code, out, err = await curl("-i", f"{h.outbound}/billing/v1/invoices")
    assert code == 0 and out.startswith("HTTP/1.1 200"), err + out


async def test_revoking_a_task_resets_its_stream_and_no_other_on_the_connection(make_sidecar):
    """Two SSE streams on one h2c connection, under two tasks: revoking one task resets its stream
    (RST_STREAM) and that exchange is cut; the other stream goes on to its end."""
    from tests.harness import Upstream
    from tests.scenarios.revocation import POLICY as TASK_POLICY
    from tests.scenarios.revocation import config_for as task_config
    from tests.scenarios.revocation import held_sse, open_task, revoke

    release = asyncio.Event()
    upstream = await Upstream(held_sse(release)).start()
    try:
        h = await make_sidecar(task_config(upstream), TASK_POLICY)
        doomed, kept = await open_task(h), await open_task(h)
        url = f"{h.outbound}/billing/v1/events"
        async with httpx.AsyncClient(http1=False, http2=True, timeout=10) as client:
            async with client.stream("GET", url, headers={"X-Sidecar-Task": doomed}) as a, \
                    client.stream("GET", url, headers={"X-Sidecar-Task": kept}) as b:
                first_a, first_b = aiter(a.aiter_bytes()), aiter(b.aiter_bytes())
                assert await anext(first_a) == await anext(first_b) == b"data: first\n\n"
                await revoke(h, "task", doomed)
                with pytest.raises(httpx.RemoteProtocolError):
                    await anext(first_a)
                release.set()
                assert b"".join([chunk async for chunk in first_b]) == b"data: last\n\n"
        events = {e["task"]["id"]: e for e in await h.settle() if e["target"]["path"] == "/v1/events"}
        assert events[doomed]["outcome"] == "cut" and "revoked" in events[doomed]["reason_detail"]
        assert events[kept]["outcome"] == "completed"
    finally:
        release.set()
        await upstream.stop()


async def test_streams_past_max_in_flight_are_refused_overloaded(make_sidecar):
    """With max_in_flight 2 the listener advertises MAX_CONCURRENT_STREAMS 2 (a client opens no third
    stream on that connection); with two streams held by the upstream, a stream on another connection
    is answered 503 overloaded at once (one event), and the held two complete."""
    from aiohttp import web

    from tests.harness import Upstream

    release = asyncio.Event()
    arrived = 0

    async def held(request: web.Request) -> web.Response:
        nonlocal arrived
        arrived += 1
        await asyncio.wait_for(release.wait(), 30)
        return web.Response(text="done")

    upstream = await Upstream(held).start()
    try:
        config = config_for(upstream)
        config["outbound"]["limits"] = {"max_in_flight": 2}
        h = await make_sidecar(config, POLICY)
        async with httpx.AsyncClient(http1=False, http2=True, timeout=20) as client:
            first = [asyncio.ensure_future(client.get(f"{h.outbound}/billing/v1/{i}")) for i in range(2)]
            async with asyncio.timeout(10):
                while arrived < 2:
                    await asyncio.sleep(0.01)
            async with httpx.AsyncClient(http1=False, http2=True, timeout=20) as other:
                third = await other.get(f"{h.outbound}/billing/v1/third")
            release.set()
            answers = await asyncio.gather(*first)
        assert (third.status_code, third.json()["error"]) == (503, "overloaded")
        assert [r.status_code for r in answers] == [200, 200]
        assert sorted(e["reason"] for e in await h.settle()) == ["allowed", "allowed", "overloaded"]
    finally:
        release.set()
        await upstream.stop()


async def test_connections_past_max_connections_are_answered_overloaded(make_sidecar, upstream):
    """With max_connections 1 and one HTTP/2 connection open, a second one gets its stream answered
    503 overloaded (one event) and is closed; the first is still served."""
    config = config_for(upstream)
    config["outbound"]["limits"] = {"max_connections": 1}
    h = await make_sidecar(config, POLICY)
    url = f"{h.outbound}/billing/v1/a"
    async with httpx.AsyncClient(http1=False, http2=True) as first, \
            httpx.AsyncClient(http1=False, http2=True) as second:
        assert (await first.get(url)).status_code == 200
        refused = await second.get(url)
        assert (await first.get(url)).status_code == 200
    assert (refused.status_code, refused.json()["error"]) == (503, "overloaded")
    assert "HTTP/2 connections" in refused.json()["message"]
    assert [e["reason"] for e in await h.settle()] == ["allowed", "overloaded", "allowed"]
