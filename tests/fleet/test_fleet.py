"""Fleets converge on revocations: real ``sidecar run`` processes over one real Redis, and
in-process sidecars over a real Redis Sentinel group that fails over and over a TLS Redis with an ACL.

Every member has its own SPIFFE ID, so the fleet-wide revocation used here is a *subject*:
tasks for one human are opened on every member, the subject is revoked on one member, and
each member's outbound listener is polled (bounded) until it refuses that member's task with
``revoked``. No duration is asserted; ``tests/bench/bench_fleet.py`` measures it (``--sentinel``:
during a failover).
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from tests.scenarios.revocation import POLICY, call, config_for, metric, open_task, poll, readyz, revoke, rids
from tests.fleet import Fleet, Member, PlainUpstream
from tests.harness import SidecarHarness, Upstream
from tests.peers.redis import (  # noqa: F401 (sentinel_group is a fixture)
    SERVICE, RedisServer, SentinelGroup, free_port, redis_binary, sentinel_group, tls_files,
)

FLEET_SIZE = int(os.environ.get("FLEET_SIZE", "10"))
POLL_STEP_S = 0.05
POLL_STEPS = 400  # per member, at most ~20 s of polling, never asserted as a duration


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, RedisServer]]:
    """A real Redis, a real upstream and FLEET_SIZE ready sidecar processes, shared by this module."""
    redis = RedisServer(redis_binary(), free_port()).start()
    upstream = PlainUpstream()
    members = Fleet(Path(tmp_path_factory.mktemp("fleet")), {"redis_url": redis.url}, upstream.url, FLEET_SIZE)
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


# -- in-process sidecars over Redis Sentinel ---------------------------------------------------------

FAILOVER_FLEET = 3
DURING_STEP_S = 0.1
DURING_MAX = 150  # revocations made while the sentinels still name the dead primary: bounded


async def start_members(make_sidecar, upstream: Upstream, tmp_path: Path, revocation: dict,
                        count: int = FAILOVER_FLEET, prefix: str = "member") -> list[SidecarHarness]:
    """In-process sidecars with their own agent name and state_dir and the given revocation section."""
    members = []
    for i in range(count):
        name = f"{prefix}-{i}"
        config = config_for(upstream, agent={"name": name, "environment": "test"}, state_dir=str(tmp_path / name),
                            revocation=revocation)
        members.append(await make_sidecar(config, POLICY))
    return members


async def ready(member: SidecarHarness) -> bool:
    return await readyz(member) == 200


async def holds(member: SidecarHarness, expected: set[str]) -> bool:
    return expected <= await rids(member)


async def enforced_everywhere(members: list[SidecarHarness], subjects: list[str]) -> bool:
    """Every member lists every subject's revocation (bounded polling) and refuses a new task for it."""
    expected = {f"subject:{s}" for s in subjects}
    if not all(await asyncio.gather(*(poll(lambda m=m: holds(m, expected)) for m in members))):
        return False
    for member in members:
        for subject in subjects:
            if await call(member, await open_task(member, subject)) != (403, "revoked"):
                return False
    return True


async def test_no_revocation_is_lost_when_the_redis_primary_fails_over(make_sidecar, upstream, sentinel_group,
                                                                        tmp_path):
    """Subjects revoked on any member before, at, during and after a kill -9 of the Sentinel-managed primary are
    refused by every member once the replica is promoted, and the new primary stores each one (issue 12 item 2)."""
    group: SentinelGroup = sentinel_group
    members = await start_members(make_sidecar, upstream, tmp_path,
                                  {"sentinel": {"sentinels": group.addresses, "service_name": SERVICE}})
    assert all([await poll(lambda m=m: ready(m)) for m in members])
    revoked: list[str] = []

    async def revoke_next(phase: str) -> None:
        subject = f"{phase}-{len(revoked)}@example.com"
        await revoke(members[len(revoked) % len(members)], "subject", subject)  # in force there on return
        revoked.append(subject)

    for _ in members:
        await revoke_next("before")
    assert await enforced_everywhere(members, revoked)  # the bus works through the sentinels
    for _ in members:
        await revoke_next("at-kill")  # written or not yet replicated when the primary dies
    old = group.kill_primary()
    during = 0
    while group.primary_port() == old and during < DURING_MAX:
        await revoke_next("during")
        during += 1
        await asyncio.sleep(DURING_STEP_S)
    new = group.wait_for_failover(old)
    for _ in members:
        await revoke_next("after")
    assert during >= len(members), "the failover ended before revocations were made during it"
    assert await enforced_everywhere(members, revoked)
    assert all([await metric(m, "sidecar_revocation_bus_up") == 1.0 for m in members])
    assert {f"subject:{s}" for s in revoked} <= stored_rids(new)  # the outboxes and the fleet refilled it


def stored_rids(port: int, **auth: Any) -> set[str]:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=2, **auth)
    return {key.removeprefix("sidecar:revocation:") for key in client.scan_iter("sidecar:revocation:*")}


# -- in-process sidecars over TLS and a Redis ACL ------------------------------------------------------

PASSWORD = "canary-redis-acl-password-5501"
# the least the bus and the fleet inventory need: their keys and channel, and the commands they send
ACL = ("--user", "default", "off", "--user", "sidecar", "on", f">{PASSWORD}", "~sidecar:revocation:*",
       "~sidecar:fleet:*", "&sidecar:revocations", "+@connection", "+set", "+mget", "+scan", "+publish", "+subscribe", "+unsubscribe",
       "+multi", "+exec")


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A real Redis serving TLS only (a trustme CA), whose one user is ``sidecar`` with PASSWORD."""
    server = RedisServer(redis_binary(), free_port(), tls=tls_files(tmp_path / "redis-tls", trustme.CA()), args=ACL)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def tls_bus(server: RedisServer, ca: Path) -> dict[str, Any]:
    return {"redis_url": server.url, "tls": {"ca": str(ca)}, "username": {"value": "sidecar"},
            "password": {"from_env": "REDIS_BUS_PASSWORD"}}


def logs(members: list[SidecarHarness]) -> bytes:
    return b"".join(m.raw_log() for m in members)


def bus_failures(member: SidecarHarness) -> list[str]:
    """The error types of the member's failed bus connections, from its log."""
    return [line["error_type"] for line in member.lines() if line.get("event") == "revocation_bus_down"]


async def bus_failures_at_least(member: SidecarHarness, count: int) -> bool:
    return len(bus_failures(member)) >= count


async def test_a_revocation_reaches_the_fleet_over_tls_with_an_acl_user(make_sidecar, upstream, tls_redis, tmp_path,
                                                                        monkeypatch):
    """Sidecars given rediss://, the CA and an ACL user's password as a secret reference share revocations over
    TLS, and the password appears in no log line or config repr (issue 12 item 2)."""
    assert tls_redis.tls is not None
    monkeypatch.setenv("REDIS_BUS_PASSWORD", PASSWORD)
    members = await start_members(make_sidecar, upstream, tmp_path, tls_bus(tls_redis, tls_redis.tls.ca), count=2)
    assert all([await poll(lambda m=m: ready(m)) for m in members])
    await revoke(members[0], "subject", "tls-user@example.com")
    assert await enforced_everywhere(members, ["tls-user@example.com"])
    assert "subject:tls-user@example.com" in stored_rids(tls_redis.port, username="sidecar", password=PASSWORD,
                                                         ssl=True, ssl_ca_certs=str(tls_redis.tls.ca))
    assert not any(bus_failures(m) for m in members)  # the least ACL above is enough
    assert PASSWORD.encode() not in logs(members)
    assert all(PASSWORD not in repr(m.sidecar.config) for m in members if m.sidecar is not None)


@pytest.mark.parametrize("case, error_type", [
    ("wrong_password", "AuthenticationError"),  # the ACL refuses AUTH
    ("untrusted_ca", "ConnectionError"),  # the TLS handshake fails: Redis's certificate is not from this CA
])
async def test_a_wrong_password_or_an_untrusted_ca_keeps_the_bus_down_and_the_sidecar_unready(
        make_sidecar, upstream, tls_redis, tmp_path, monkeypatch, case, error_type):
    """A sidecar whose Redis password is wrong, or whose CA did not sign Redis's certificate, never syncs: not ready
    (require_sync), bus down, each failure logged by its type, no password in the log (issue 12 item 2)."""
    assert tls_redis.tls is not None
    wrong = "canary-wrong-password-7730"
    monkeypatch.setenv("REDIS_BUS_PASSWORD", wrong if case == "wrong_password" else PASSWORD)
    ca = tls_files(tmp_path / "other-ca", trustme.CA()).ca if case == "untrusted_ca" else tls_redis.tls.ca
    [member] = await start_members(make_sidecar, upstream, tmp_path, tls_bus(tls_redis, ca), count=1)
    assert await poll(lambda: bus_failures_at_least(member, 2))  # it tried, and keeps trying
    assert set(bus_failures(member)) == {error_type}
    assert await readyz(member) == 503
    assert await metric(member, "sidecar_revocation_bus_up") == 0.0
    assert wrong.encode() not in member.raw_log() and PASSWORD.encode() not in member.raw_log()


SENTINEL_PASSWORD = "canary-sentinel-password-6402"


@pytest.fixture
def tls_sentinel_group(tmp_path: Path) -> Iterator[SentinelGroup]:
    """A Sentinel group that speaks TLS only, whose data nodes require PASSWORD and sentinels SENTINEL_PASSWORD."""
    group = SentinelGroup(redis_binary(), tmp_path, tls=tls_files(tmp_path / "redis-tls", trustme.CA()),
                          password=PASSWORD, sentinel_password=SENTINEL_PASSWORD).start()
    try:
        yield group
    finally:
        group.stop()


async def test_a_revocation_reaches_the_fleet_through_sentinels_over_tls_with_passwords(
        make_sidecar, upstream, tls_sentinel_group, tmp_path, monkeypatch):
    """Sidecars given TLS sentinels, the sentinels' password and the primary's password (secret references) find
    the primary and share revocations; neither password appears in a log line or a config repr (issue 12 item 2)."""
    group: SentinelGroup = tls_sentinel_group
    assert group.tls is not None
    monkeypatch.setenv("REDIS_BUS_PASSWORD", PASSWORD)
    monkeypatch.setenv("SENTINEL_PASSWORD", SENTINEL_PASSWORD)
    bus = {"sentinel": {"sentinels": group.addresses, "service_name": SERVICE,
                        "password": {"from_env": "SENTINEL_PASSWORD"}},
           "password": {"from_env": "REDIS_BUS_PASSWORD"}, "tls": {"ca": str(group.tls.ca)}}
    members = await start_members(make_sidecar, upstream, tmp_path, bus, count=2)
    assert all([await poll(lambda m=m: ready(m)) for m in members])
    await revoke(members[1], "subject", "sentinel-tls@example.com")
    assert await enforced_everywhere(members, ["sentinel-tls@example.com"])
    assert "subject:sentinel-tls@example.com" in stored_rids(group.primary_port(), password=PASSWORD, ssl=True,
                                                             ssl_ca_certs=str(group.tls.ca))
    for secret in (PASSWORD, SENTINEL_PASSWORD):
        assert secret.encode() not in logs(members)
        assert all(secret not in repr(m.sidecar.config) for m in members if m.sidecar is not None)
