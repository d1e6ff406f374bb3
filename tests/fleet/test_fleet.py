"""A fleet of real ``sidecar run`` processes over one real Redis converges on revocations.

Every member has its own SPIFFE ID, so the fleet-wide revocation used here is a *subject*:
tasks for one human are opened on every member, the subject is revoked on member 0, and
each member's outbound listener is polled (bounded) until it refuses that member's task with
``revoked``. No duration is asserted; ``tests/bench/bench_fleet.py`` measures it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.fleet import Fleet, Member, PlainUpstream
from tests.peers.redis import RedisServer, free_port, redis_binary

FLEET_SIZE = int(os.environ.get("FLEET_SIZE", "10"))
POLL_STEP_S = 0.05
POLL_STEPS = 400  # per member, at most ~20 s of polling, never asserted as a duration


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, RedisServer]]:
    """A real Redis, a real upstream and FLEET_SIZE ready sidecar processes, shared by this module."""
    redis = RedisServer(redis_binary(), free_port()).start()
    upstream = PlainUpstream()
    members = Fleet(Path(tmp_path_factory.mktemp("fleet")), redis.url, upstream.url, FLEET_SIZE)
    try:
        members.start()
        yield members, redis
    finally:
        members.stop()
        upstream.stop()
        redis.stop()


def principal() -> str:
    """A subject of its own per test, so tests sharing the fleet do not see each other's revocations."""
    return f"user-{secrets.token_hex(4)}@example.com"


async def refused(session: aiohttp.ClientSession, member: Member, task: str) -> bool:
    """Poll one member (bounded) until it refuses the task with revoked."""
    for _ in range(POLL_STEPS):
        if await member.call(session, task) == (403, "revoked"):
            return True
        await asyncio.sleep(POLL_STEP_S)
    return False


async def allowed(session: aiohttp.ClientSession, member: Member, subject: str) -> bool:
    """Poll one member (bounded) until a new task for the subject is allowed again."""
    for _ in range(POLL_STEPS):
        if await member.call(session, await member.open_task(session, subject)) == (200, "ok"):
            return True
        await asyncio.sleep(POLL_STEP_S)
    return False


async def open_everywhere(session: aiohttp.ClientSession, members: list[Member], subject: str) -> list[str]:
    tasks = await asyncio.gather(*(m.open_task(session, subject) for m in members))
    for member, task in zip(members, tasks):
        assert await member.call(session, task) == (200, "ok"), member.name
    return list(tasks)


async def test_every_sidecar_refuses_after_a_subject_revocation_made_on_one(fleet):
    """A subject revoked on member 0 is refused by every member of the fleet; other subjects are untouched."""
    members = fleet[0].members
    alice, bob = principal(), principal()
    async with aiohttp.ClientSession() as s:
        alice_tasks = await open_everywhere(s, members, alice)
        bob_tasks = await open_everywhere(s, members, bob)
        status, body = await members[0].admin(s, "POST", "/revocations", {"kind": "subject", "id": alice})
        assert status == 201, body
        results = await asyncio.gather(*(refused(s, m, t) for m, t in zip(members, alice_tasks)))
        assert dict(zip((m.name for m in members), results)) == {m.name: True for m in members}
        for member, task in zip(members, bob_tasks):
            assert await member.call(s, task) == (200, "ok"), member.name
        for member in members:
            status, body = await member.admin(s, "GET", "/revocations")
            assert f"subject:{alice}" in {r["rid"] for r in body["revocations"]}, member.name


async def test_a_sidecar_cut_off_from_redis_during_the_revocation_catches_up(fleet):
    """A member paused and disconnected from Redis while a revocation is made refuses its task once it is back."""
    members, redis = fleet
    away, others = members.members[-1], members.members[:-1]
    subject = principal()
    async with aiohttp.ClientSession() as s:
        tasks = await open_everywhere(s, members.members, subject)
        away.pause()
        try:
            assert away.drop_redis_connections(redis.port) >= 1  # its subscription is gone: no message reaches it
            status, body = await others[0].admin(s, "POST", "/revocations", {"kind": "subject", "id": subject})
            assert status == 201, body
            assert all(await asyncio.gather(*(refused(s, m, t) for m, t in zip(others, tasks))))
        finally:
            away.resume()
        assert await refused(s, away, tasks[-1])
        assert "revocation_bus_down" in away.log_tail(100_000)  # it learned it by reconnecting and catching up
        for _ in range(POLL_STEPS):
            if "sidecar_revocation_bus_up 1.0" in await away.metrics(s):
                break
            await asyncio.sleep(POLL_STEP_S)
        assert "sidecar_revocation_bus_up 1.0" in await away.metrics(s)


async def test_a_lift_made_on_one_sidecar_reaches_every_sidecar(fleet):
    """A subject revocation lifted on member 1 lets new tasks for that subject through on every member."""
    members = fleet[0].members
    subject = principal()
    async with aiohttp.ClientSession() as s:
        tasks = await open_everywhere(s, members, subject)
        assert (await members[0].admin(s, "POST", "/revocations", {"kind": "subject", "id": subject}))[0] == 201
        assert all(await asyncio.gather(*(refused(s, m, t) for m, t in zip(members, tasks))))
        assert (await members[1].admin(s, "DELETE", f"/revocations/subject:{subject}"))[0] == 200
        assert all(await asyncio.gather(*(allowed(s, m, subject) for m in members)))
