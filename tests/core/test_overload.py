"""Overload degrades into refusals: connection and in-flight caps per listener, per-source caps inbound.

Every refused connection or request gets one ``503 overloaded`` with ``Retry-After`` and one event;
nothing of it is forwarded; the listener serves again as soon as there is room (issue 12 item 3).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import aiohttp
from aiohttp import web

from sidecar import health
from sidecar.http1.server import Http1Server
from sidecar.http2.listen import H2cServer
from tests.scenarios.inbound import POLICY as INBOUND_POLICY
from tests.scenarios.inbound import client_context, inbound_config
from tests.scenarios.outbound import POLICY, config_for
from sidecar.server import SidecarServer
from tests.harness import SidecarHarness, Upstream

SAFETY = 20.0  # bounds every wait so a broken build fails instead of hanging; never asserted on


class Gate:
    """An upstream handler that holds every request until released."""

    def __init__(self) -> None:
        self.arrived = 0
        self.release = asyncio.Event()

    async def __call__(self, request: web.Request) -> web.Response:
        self.arrived += 1
        await self.release.wait()
        return web.Response(text="done")


async def until(predicate, what: str) -> None:
    async with asyncio.timeout(SAFETY):
        while not predicate():
            await asyncio.sleep(0.01)


def outbound_server(h: SidecarHarness) -> SidecarServer | Http1Server:
    """The outbound listener's HTTP/1.1 server (on either server; the CONNECT tunnels' is another)."""
    return next(s for s in h.sidecar._listeners.servers
                if type(s) is H2cServer or isinstance(s, Http1Server) and s.http2 is not None)


def overload_events(events: list[dict]) -> list[dict]:
    return [e for e in events if e["reason"] == "overloaded"]


async def test_requests_past_max_in_flight_are_refused_at_once(make_sidecar):
    """With two requests being served, a third is answered 503 overloaded with Retry-After, is not
    forwarded, and is one event; once they finish, the listener serves again."""
    gate = Gate()
    upstream = await Upstream(gate).start()
    try:
        config = config_for(upstream)
        config["outbound"]["limits"] = {"max_in_flight": 2}
        h = await make_sidecar(config, POLICY)
        url = f"{h.outbound}/billing/v1/invoices"
        async with aiohttp.ClientSession() as s:
            held = [asyncio.ensure_future(s.get(url)) for _ in range(2)]
            await until(lambda: gate.arrived == 2, "two requests at the upstream")
            async with s.get(url) as r:
                body = await r.json()
                assert (r.status, body["error"], r.headers["Retry-After"]) == (503, "overloaded", "1")
                assert "2 requests are in flight" in body["message"]
                assert 'details="overloaded"' in r.headers["Proxy-Status"]
            assert gate.arrived == 2
            gate.release.set()
            assert [(await f).status for f in held] == [200, 200]
            async with s.get(url) as r:
                assert r.status == 200
        [refused] = overload_events(await h.settle())
        assert (refused["direction"], refused["status"], refused["outcome"]) == ("outbound", 503, "refused")
    finally:
        gate.release.set()
        await upstream.stop()


async def test_connections_past_max_connections_get_one_answer_and_are_closed(make_sidecar, upstream):
    """With the listener's connections all open, the next one is answered 503 overloaded before it sends
    anything, and closed; when one closes, a new connection is served."""
    config = config_for(upstream)
    config["outbound"]["limits"] = {"max_connections": 2}
    h = await make_sidecar(config, POLICY)
    port = h.port("outbound")
    open_ = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = await asyncio.wait_for(reader.read(), SAFETY)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in head
    assert json.loads(body)["error"] == "overloaded"
    writer.close()
    _, first = open_.pop(0)
    first.close()
    await first.wait_closed()
    await until(lambda: len(outbound_server(h).connections) < 2, "the closed connection gone")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{h.outbound}/billing/v1/invoices") as r:
            assert r.status == 200
    assert upstream.seen and all(seen.path.startswith("/api/v1/invoices") for seen in upstream.seen)
    assert len(overload_events(await h.settle())) == 1
    for _, w in open_:
        w.close()


async def test_an_inbound_caller_past_its_per_source_cap_is_refused_over_tls(make_sidecar, agent, tmp_path):
    """Inbound, one address may hold max_connections_per_source connections; the next one from it is
    answered 503 overloaded over TLS (the caller can read why), never reaching the agent."""
    config = inbound_config(tmp_path, agent)
    config["inbound"]["limits"] = {"max_connections_per_source": 1}
    h = await make_sidecar(config, INBOUND_POLICY)
    ctx = client_context(h, "spiffe://sidecar.local/orchestrator", tmp_path / "caller")
    url = f"https://127.0.0.1:{h.port('inbound')}/tasks/1"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=1)) as kept:
        async with kept.get(url) as r:
            assert r.status == 200  # this connection stays open in the pool
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, force_close=True)) as other:
            async with other.get(url) as r:
                assert (r.status, (await r.json())["error"]) == (503, "overloaded")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, force_close=True)) as s:
        for _ in range(4):  # a closed connection gives its place back, one after another
            async with s.get(url) as r:
                assert r.status == 200
    assert len(agent.seen) == 5
    [refused] = overload_events(await h.settle())
    assert refused["direction"] == "inbound"


async def test_a_burst_of_connections_is_answered_or_refused_never_hung(make_sidecar, upstream):
    """300 concurrent connections against a listener capped at 50 connections and 20 in flight: every
    one gets 200 or 503 overloaded, and health answers meanwhile."""
    config = config_for(upstream)
    config["outbound"]["limits"] = {"max_connections": 50, "max_in_flight": 20}
    h = await make_sidecar(config, POLICY)

    port = h.port("outbound")
    request = f"GET /billing/v1/invoices HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"

    async def one() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request.encode())
        try:
            answer = await asyncio.wait_for(reader.read(), SAFETY)
        finally:
            writer.close()
        return int(answer.split(b" ", 2)[1]) if answer else 0

    burst = asyncio.gather(*(one() for _ in range(300)))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{h.port('health')}/readyz") as r:
            assert r.status == 200
    statuses = await burst
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 1
    events = await h.settle()
    assert len(overload_events(events)) == statuses.count(503)


def _get(port: int, path: str) -> tuple[int, dict]:
    """A blocking GET, for a thread: the test's own loop may be the one that is blocked."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=SAFETY) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


async def test_health_answers_while_the_data_loop_is_busy(make_sidecar, upstream):
    """Health has its own thread and loop: /readyz and /healthz are answered while the loop that serves
    exchanges is held (here, blocked until the answers have arrived: on that loop they never would)."""
    h = await make_sidecar(config_for(upstream), POLICY)
    with ThreadPoolExecutor(2) as pool:
        ready, alive = pool.submit(_get, h.port("health"), "/readyz"), pool.submit(_get, h.port("health"), "/healthz")
        answers = ready.result(SAFETY), alive.result(SAFETY)  # blocks this loop, the sidecar's, meanwhile
    assert answers[0][0] == 200 and answers[0][1]["status"] == "ready"
    assert answers[1] == (200, {"status": "alive"})


async def test_health_says_stalled_while_the_data_loop_has_not_run(make_sidecar, upstream, monkeypatch):
    """A loop silent for ``health.STALLED`` fails both probes with a reason, as the probe that used to wait
    on a stuck loop timed out; they pass again once it runs."""
    monkeypatch.setattr(health, "STALLED", 0.2)
    h = await make_sidecar(config_for(upstream), POLICY)

    def until_stalled() -> list[tuple[int, dict]]:
        for _ in range(int(SAFETY / 0.05)):
            answers = [_get(h.port("health"), "/healthz"), _get(h.port("health"), "/readyz")]
            if answers[0][0] == 503:
                return answers
            time.sleep(0.05)
        return answers

    with ThreadPoolExecutor(1) as pool:
        stalled = pool.submit(until_stalled).result(SAFETY)  # the loop is blocked until then
    assert stalled == [(503, {"status": "stalled"}), (503, {"status": "not_ready", "reason": "stalled"})]
    await asyncio.sleep(0.3)  # the loop runs again: its sampling timer ticks
    assert await asyncio.to_thread(_get, h.port("health"), "/healthz") == (200, {"status": "alive"})
