"""A real ``sidecar run`` whose stdout is a pipe nobody reads: each ``logging.on_backpressure`` policy, end to end.

The sidecar's stdout is a 4 KB pipe that the test stops reading once the sidecar is up, and its log
buffer is 8 KB, so a dozen exchanges fill both. While the pipe is stalled the health and metrics
listeners keep answering (the loop is never the one blocked); once the test reads again every line
is whole JSON and every exchange is accounted for: its event on stdout, or counted as dropped.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.harness import wait_ready
from tests.peers.redis import free_port

REPO = Path(__file__).resolve().parents[2]
PIPE_BYTES = 4096
POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "all", "direction": "outbound", "upstream": "billing", "paths": ["/**"], "effect": "allow"}]}
CLIENT = aiohttp.ClientTimeout(total=20)  # a sidecar whose loop is stuck fails the test instead of hanging it
MAX_REQUESTS = 80  # bounded: ~1 KB an event fills 12 KB of pipe and buffer well before this


class RunningSidecar:
    """``python -m sidecar run`` with stdout on a small pipe the test reads only when told to."""

    def __init__(self, tmp: Path, upstream_url: str, logging: dict[str, Any]) -> None:
        self.ports = {name: free_port() for name in ("outbound", "health", "metrics", "admin")}
        (tmp / "policy.yaml").write_text(yaml.safe_dump(POLICY))
        config = {"state_dir": str(tmp / "state"), "policy": {"files": [str(tmp / "policy.yaml")]},
                  "outbound": {"listen": f"127.0.0.1:{self.ports['outbound']}",
                               "upstreams": {"billing": {"url": upstream_url}}},
                  **{name: {"listen": f"127.0.0.1:{self.ports[name]}"} for name in ("health", "metrics", "admin")},
                  "logging": {"level": "warning", "buffer_bytes": 8192, **logging}, "shutdown": {"drain": "1s"}}
        (tmp / "sidecar.yaml").write_text(yaml.safe_dump(config))
        self._stderr = open(tmp / "stderr.log", "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", str(tmp / "sidecar.yaml")],
                                        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                        stdout=subprocess.PIPE, stderr=self._stderr)
        assert self.process.stdout is not None
        fcntl.fcntl(self.process.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self._chunks: list[bytes] = []
        self._reader: threading.Thread | None = None

    def url(self, listener: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[listener]}{path}"

    async def ready(self, session: aiohttp.ClientSession) -> None:
        await wait_ready(session, self.ports["health"])

    async def metric(self, session: aiohttp.ClientSession, name: str) -> float:
        async with session.get(self.url("metrics", "/metrics")) as r:
            text = await r.text()
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert match, f"{name} not exposed"
        return float(match.group(1))

    def drain(self) -> None:
        """The consumer resumes: read stdout to its end from now on."""
        assert self.process.stdout is not None
        stdout = self.process.stdout
        self._reader = threading.Thread(target=lambda: self._chunks.extend(iter(lambda: stdout.read1(65536), b"")),
                                        daemon=True)
        self._reader.start()

    def stop(self) -> list[dict[str, Any]]:
        """SIGTERM, wait for exit, and return every stdout line parsed (each must be whole JSON)."""
        if self._reader is None:
            self.drain()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)
        assert self._reader is not None
        self._reader.join(10)
        self._stderr.close()
        return [json.loads(line) for line in b"".join(self._chunks).splitlines()]


@pytest.fixture
async def run_sidecar(tmp_path, upstream):
    started: list[RunningSidecar] = []

    def start(**logging: Any) -> RunningSidecar:
        started.append(RunningSidecar(tmp_path, upstream.url, logging))
        return started[-1]

    yield start
    for sidecar in started:
        if sidecar.process.poll() is None:
            sidecar.process.kill()
            sidecar.process.wait(10)


async def call(session: aiohttp.ClientSession, sidecar: RunningSidecar, i: int) -> tuple[int, dict[str, Any]]:
    async with session.get(sidecar.url("outbound", f"/billing/v1/item-{i}")) as r:
        return r.status, await r.json(content_type=None)


def trust_decisions(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ids = [line["decision_id"] for line in lines if line["event"] == "trust_decision"]
    assert len(ids) == len(set(ids))  # no event written twice
    return [line for line in lines if line["event"] == "trust_decision"]


async def test_drop_keeps_serving_and_counts_every_event_it_could_not_write(run_sidecar, upstream):
    """drop: with stdout stalled every request is answered and forwarded; the events that did not fit are
    counted in sidecar_log_lines_dropped_total and said in the log once it drains (issue 12 item 4)."""
    sidecar = run_sidecar(on_backpressure="drop")
    async with aiohttp.ClientSession(timeout=CLIENT) as session:
        await sidecar.ready(session)
        statuses = [(await call(session, sidecar, i))[0] for i in range(40)]
        async with session.get(sidecar.url("health", "/healthz")) as r:
            assert r.status == 200  # the loop answers while stdout is stalled
        dropped = await sidecar.metric(session, 'sidecar_log_lines_dropped_total{kind="trust_decision"}')
    assert statuses == [200] * 40 and len(upstream.seen) == 40
    assert dropped > 0
    lines = sidecar.stop()
    events = trust_decisions(lines)
    assert len(events) + dropped == 40
    notes = [line for line in lines if line["event"] == "log_lines_dropped"]
    assert sum(note["trust_decisions"] for note in notes) == dropped


async def test_refuse_refuses_new_exchanges_while_the_log_cannot_take_their_event(run_sidecar, upstream):
    """refuse: once stdout is stalled and the buffer full, requests are refused 503 log_unavailable with
    Retry-After and never forwarded; every forwarded exchange's event is on stdout afterwards (issue 12 item 4)."""
    sidecar = run_sidecar(on_backpressure="refuse")
    answers: list[tuple[int, dict[str, Any]]] = []
    async with aiohttp.ClientSession(timeout=CLIENT) as session:
        await sidecar.ready(session)
        for i in range(MAX_REQUESTS):
            answers.append(await call(session, sidecar, i))
            if answers[-1][0] != 200:
                break
        async with session.get(sidecar.url("outbound", "/billing/v1/after")) as r:
            assert r.status == 503 and r.headers["Retry-After"] == "1"
            assert "log_unavailable" in r.headers["Proxy-Status"]
        dropped = await sidecar.metric(session, 'sidecar_log_lines_dropped_total{kind="trust_decision"}')
    forwarded = [a for a in answers if a[0] == 200]
    assert answers[-1] == (503, {"error": "log_unavailable", "message": answers[-1][1]["message"]})
    assert answers[-1][1]["message"].startswith("log: the decision log cannot take this exchange's event")
    assert len(upstream.seen) == len(forwarded)  # nothing refused was forwarded
    events = trust_decisions(sidecar.stop())
    allowed = [e for e in events if e["decision"] == "allow"]
    refused = [e for e in events if e["reason"] == "log_unavailable"]
    assert len(allowed) == len(forwarded)  # every exchange let in has its event: none dropped
    assert len(refused) + dropped == 2  # the two refused exchanges: their events written or counted


async def test_block_holds_requests_until_the_consumer_resumes_then_answers_them(run_sidecar, upstream):
    """block: with stdout stalled new requests wait (health still answers), and are answered and forwarded
    once the consumer reads again, every event written, none dropped (issue 12 item 4)."""
    sidecar = run_sidecar(on_backpressure="block", block_timeout="60s")
    async with aiohttp.ClientSession(timeout=CLIENT) as session:
        await sidecar.ready(session)
        pending: list[asyncio.Task[tuple[int, dict[str, Any]]]] = []
        for i in range(MAX_REQUESTS):
            pending.append(asyncio.ensure_future(call(session, sidecar, i)))
            await asyncio.wait({pending[-1]}, timeout=1.0)
            if not pending[-1].done() and await sidecar.metric(session, "sidecar_log_waiting_exchanges") >= 1:
                break
        assert not pending[-1].done(), "no request waited for the log"
        async with session.get(sidecar.url("health", "/healthz")) as r:
            assert r.status == 200  # the loop answers while requests wait for the log
        sidecar.drain()
        answers = await asyncio.gather(*pending)
        dropped = await sidecar.metric(session, 'sidecar_log_lines_dropped_total{kind="trust_decision"}')
    assert [status for status, _ in answers] == [200] * len(pending) and len(upstream.seen) == len(pending)
    assert dropped == 0
    assert len(trust_decisions(sidecar.stop())) == len(pending)


async def test_block_refuses_after_block_timeout_when_the_consumer_does_not_resume(run_sidecar, upstream):
    """block: a request that waited logging.block_timeout for the log is refused log_unavailable and not
    forwarded: the stall is bounded (issue 12 item 4)."""
    sidecar = run_sidecar(on_backpressure="block", block_timeout="500ms")
    async with aiohttp.ClientSession(timeout=CLIENT) as session:
        await sidecar.ready(session)
        for i in range(MAX_REQUESTS):
            status, body = await call(session, sidecar, i)
            if status != 200:
                break
    assert (status, body["error"]) == (503, "log_unavailable")
    assert len(upstream.seen) == i
    events = trust_decisions(sidecar.stop())
    assert sum(e["decision"] == "allow" for e in events) == i
