"""Background tasks on the bus's Redis stop when told to, even when the Redis client swallows the cancellation.

Seen in the fleet test (issue 12): one ``sidecar run`` of ten never became ready and never exited. Its port had
been taken (a port chosen free, taken before it bound), so its start failed and closed what it had started;
closing the fleet heartbeat cancelled it while its first write was in flight, and the cancellation never
reached it: redis-py bounds a command's write with ``asyncio.wait_for``, which on Python 3.11 returns the
write's result instead of raising when the cancellation lands just as the write completes (CPython gh-86296).
The heartbeat slept and beat again, the close waited for it forever, and the "cannot start" error, printed
once the loop ends, was never printed.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import redis.asyncio
import yaml

from sidecar.config_model import FleetConfig
from sidecar.fleet import Registration
from sidecar.revocation import TIMEOUTS
from tests.fleet import REPO, Fleet, PlainUpstream
from tests.peers.redis import RedisServer, redis_server  # noqa: F401 (redis_server is a fixture)

BOUND = 10.0  # seconds a stop may take before it counts as never (no duration is asserted)
CANCEL_POINTS = 60  # loop iterations into the first heartbeat at which it is cancelled, one run each


class WaitForPipeline:
    """A transaction whose write is bounded the way redis-py bounds one (``asyncio.wait_for``), held in flight
    until the test lets it complete."""

    def __init__(self, written: asyncio.Event, entered: asyncio.Event) -> None:
        self._written, self._entered = written, entered

    async def __aenter__(self) -> WaitForPipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def set(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def execute(self) -> list[bool]:
        return await asyncio.wait_for(self._write(), TIMEOUTS["socket_timeout"])

    async def _write(self) -> list[bool]:
        self._entered.set()
        await self._written.wait()
        return [True, True]


class WaitForClient:
    def __init__(self) -> None:
        self.written, self.entered = asyncio.Event(), asyncio.Event()

    def pipeline(self, transaction: bool = True) -> WaitForPipeline:
        return WaitForPipeline(self.written, self.entered)


async def test_a_heartbeat_cancelled_as_its_write_completes_stops():
    """The cancellation of aclose() lands in the step where the write completes: wait_for swallows it on 3.11,
    and aclose() still returns, with the heartbeat task ended."""
    client = WaitForClient()
    registration = Registration(FleetConfig(), client, lambda: {"agent": "a"})
    registration.start()
    await client.entered.wait()  # the first heartbeat's write is in flight
    client.written.set()  # it completes in the next step ...
    closing = asyncio.ensure_future(registration.aclose())  # ... and aclose's cancel runs right after it
    async with asyncio.timeout(BOUND):
        await closing
    assert registration._task is not None and registration._task.done()


async def test_a_heartbeat_on_real_redis_stops_wherever_its_first_write_is_cancelled(redis_server):
    """Against a real redis-server through redis-py: cancelled at each of the first loop iterations of its first
    heartbeat (connect, handshake, write, read), the heartbeat always stops."""
    never: list[int] = []
    for point in range(CANCEL_POINTS):
        client = redis.asyncio.from_url(redis_server.url, **TIMEOUTS, health_check_interval=5)
        registration = Registration(FleetConfig(), client, lambda: {"agent": "a"})
        registration.start()
        for _ in range(point):
            await asyncio.sleep(0)
        closing = asyncio.ensure_future(registration.aclose())
        done, _ = await asyncio.wait([closing], timeout=BOUND)
        if not done:
            never.append(point)
            assert registration._task is not None
            registration._task.cancel()
        await client.aclose()
    assert never == []


def test_a_sidecar_whose_port_is_taken_exits_and_says_why(tmp_path: Path, redis_server):
    """``sidecar run`` with a bus and a fleet heartbeat, its outbound port taken: it exits 1 naming the port
    instead of waiting forever on what it had started (its log was the only sign before)."""
    upstream = PlainUpstream()
    try:
        fleet = Fleet(tmp_path, {"redis_url": redis_server.url}, upstream.url, 1)
        member = fleet.members[0]
        config = yaml.safe_load(member.config_file.read_text())
        with socket.socket() as taken:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            taken.bind(("127.0.0.1", member.ports["outbound"]))
            taken.listen()
            result = subprocess.run([sys.executable, "-m", "sidecar", "run", "-c", str(member.config_file)],
                                    cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                                    text=True, timeout=120)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "address already in use" in result.stderr
        assert config["outbound"]["listen"].rsplit(":", 1)[1] in result.stderr
    finally:
        upstream.stop()
