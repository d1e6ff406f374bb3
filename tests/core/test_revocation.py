"""Revocation and task ends, on one sidecar and across sidecars sharing a real Redis.

Semantics pinned here (see ``sidecar/revocation.py``):
- a revocation is in force before ``POST /revocations`` returns; revoking a task or a subject
  *ends* the tasks it names, so lifting it later lets new tasks work but never reopens old ones;
- with Redis, a revocation made on one sidecar reaches the others (pub/sub) and sidecars that
  were away (stored keys); changes made while Redis is down wait in an outbox and are written
  when the bus reconnects, and a lift leaves a tombstone so the fleet converges on it too;
- a bus message is checked before it applies: malformed, non-finite, far-future or stale ones change nothing.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest

from sidecar.config_model import RevocationConfig
from sidecar.errors import Refusal
from sidecar.fields import Secret
from sidecar.observe.metrics import Metrics
from sidecar.revocation import RedisBus, Revocations
from tests.harness import SidecarHarness, Upstream, admin
from tests.peers.redis import RedisServer, redis_server  # noqa: F401
from tests.scenarios.revocation import (ALICE, BOB, POLICY, SECRET, call, config_for, held_sse, metric, open_task,
                                        poll, readyz, revoke, rids)


def fleet_config(upstream: Upstream, redis: RedisServer, h_dir: Any, name: str, **revocation: Any) -> dict[str, Any]:
    """A sidecar of a fleet: its own agent name and state_dir, the shared Redis."""
    return config_for(upstream, agent={"name": name, "environment": "test"}, state_dir=str(h_dir / name),
                      revocation={"redis_url": redis.url, **revocation})


# -- one sidecar: each kind --------------------------------------------------------------------

async def test_task_revocation_is_in_force_when_the_call_returns(make_sidecar, upstream):
    """A task revoked through the admin API refuses the very next call naming it; other tasks still work."""
    h = await make_sidecar(config_for(upstream), POLICY)
    task, other = await open_task(h), await open_task(h)
    assert await call(h, task) == (200, "ok")
    body = await revoke(h, "task", task)
    assert body["rid"] == f"task:{task}" and body["kind"] == "task"
    assert await call(h, task) == (403, "revoked")
    assert await call(h, other) == (200, "ok")
    event = (await h.settle())[-2]
    assert event["reason"] == "revoked" and event["task"]["id"] == task and event["status"] == 403


async def test_agent_revocation_refuses_every_outbound_call(make_sidecar, upstream):
    """Revoking this sidecar's own SPIFFE ID refuses calls with and without a task; the upstream sees none."""
    h = await make_sidecar(config_for(upstream), POLICY)
    task = await open_task(h)
    await revoke(h, "agent", h.sidecar.runtime.agent.id)
    seen = len(upstream.seen)
    assert await call(h) == (403, "revoked")
    assert await call(h, task) == (403, "revoked")
    assert len(upstream.seen) == seen


async def test_revoking_another_agent_changes_nothing_here(make_sidecar, upstream):
    """An agent revocation naming some other agent leaves this sidecar's calls alone."""
    h = await make_sidecar(config_for(upstream), POLICY)
    await revoke(h, "agent", "spiffe://sidecar.local/agent/someone-else")
    assert await call(h) == (200, "ok")


async def test_subject_revocation_ends_that_subjects_tasks(make_sidecar, upstream):
    """Revoking a subject ends every task acting for it (old and new); other subjects' tasks go on."""
    h = await make_sidecar(config_for(upstream), POLICY)
    alice1, alice2, bob = await open_task(h, ALICE), await open_task(h, ALICE), await open_task(h, BOB)
    await revoke(h, "subject", ALICE)
    assert await call(h, alice1) == (403, "revoked")
    assert await call(h, alice2) == (403, "revoked")
    assert await call(h, bob) == (200, "ok")
    open_ids = {t.id for t in h.sidecar.runtime.tasks.open_tasks()}
    assert open_ids == {bob}
    assert await call(h, await open_task(h, ALICE)) == (403, "revoked")


async def test_credential_revocation_drops_the_cached_credential_and_refuses_its_use(make_sidecar, upstream):
    """Revoking a credential by its keyed-hash id drops it from the cache and refuses calls that would use it."""
    h = await make_sidecar(config_for(upstream), POLICY)
    assert await call(h) == (200, "ok")
    cred_id = (await h.settle())[-1]["credential"]["id"]
    assert cred_id and SECRET not in cred_id
    cache = h.sidecar.runtime.credentials
    assert any(c.id == cred_id for c, _ in cache.held())
    await revoke(h, "credential", cred_id)
    assert not any(c.id == cred_id for c, _ in cache.held())
    seen = len(upstream.seen)
    assert await call(h) == (403, "revoked")
    assert len(upstream.seen) == seen
    event = (await h.settle())[-1]
    assert event["reason"] == "revoked" and event["status"] == 403


# -- open streams are cut ----------------------------------------------------------------------

async def test_revoking_a_task_cuts_its_open_sse_stream(make_sidecar):
    """An SSE stream in flight is cut when its task is revoked: the client sees a broken stream, the event says cut."""
    release = asyncio.Event()
    upstream = await Upstream(held_sse(release)).start()
    try:
        h = await make_sidecar(config_for(upstream), POLICY)
        task = await open_task(h)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{h.outbound}/billing/v1/events", headers={"X-Sidecar-Task": task}) as r:
                assert r.status == 200
                assert await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10) == b"data: first\n\n"
                await revoke(h, "task", task)
                with pytest.raises(aiohttp.ClientPayloadError):
                    await asyncio.wait_for(r.content.read(), 10)
        events = [e for e in await h.settle() if e["target"]["path"] == "/v1/events"]
        assert len(events) == 1
        assert events[0]["outcome"] == "cut" and "revoked" in events[0]["reason_detail"]
        assert events[0]["decision"] == "allow" and events[0]["task"]["id"] == task
        assert await call(h, task) == (403, "revoked")
    finally:
        release.set()
        await upstream.stop()


# -- task ends ---------------------------------------------------------------------------------

async def test_ended_task_refuses_later_calls_with_task_ended(make_sidecar, upstream):
    """DELETE /tasks/{id} ends the task: later calls naming it get task_ended, not revoked."""
    h = await make_sidecar(config_for(upstream), POLICY)
    task = await open_task(h)
    assert await call(h, task) == (200, "ok")
    assert await admin(h, "DELETE", f"/tasks/{task}") == (200, {"status": "ended"})
    assert await call(h, task) == (403, "task_ended")


async def test_unknown_task_ids_are_refused(make_sidecar, upstream):
    """A call naming a task this sidecar never opened gets unknown_task; ending it answers 404."""
    h = await make_sidecar(config_for(upstream), POLICY)
    assert await call(h, "0" * 32) == (403, "unknown_task")
    status, body = await admin(h, "DELETE", f"/tasks/{'0' * 32}")
    assert (status, body["error"]) == (404, "not_found")


async def test_task_ends_at_its_ttl(make_sidecar, upstream):
    """A task opened with ttl 1s is refused with task_ended once its TTL has passed (polled, bounded)."""
    h = await make_sidecar(config_for(upstream), POLICY)
    task = await open_task(h, ttl="1s")
    results: list[tuple[int, str]] = []

    async def ended() -> bool:
        results.append(await call(h, task))
        return results[-1] == (403, "task_ended")

    assert await poll(ended)
    assert set(results) <= {(200, "ok"), (403, "task_ended")}


# -- the admin API -----------------------------------------------------------------------------

async def test_list_and_lift_revocations(make_sidecar, upstream):
    """GET lists revocations by rid; DELETE lifts one; a lifted agent revocation lets calls through again."""
    h = await make_sidecar(config_for(upstream), POLICY)
    agent_id = h.sidecar.runtime.agent.id
    await revoke(h, "agent", agent_id)
    await revoke(h, "subject", ALICE, ttl="1h")
    assert await rids(h) == {f"agent:{agent_id}", f"subject:{ALICE}"}
    status, body = await admin(h, "GET", "/revocations")
    entry = next(r for r in body["revocations"] if r["kind"] == "subject")
    assert entry["id"] == ALICE and 3590 < entry["expires_at"] - entry["created_at"] <= 3600
    assert await call(h) == (403, "revoked")
    rid = quote(f"agent:{agent_id}", safe="")  # a SPIFFE ID holds slashes: the rid is one encoded segment
    assert await admin(h, "DELETE", f"/revocations/{rid}") == (200, {"status": "deleted"})
    assert await rids(h) == {f"subject:{ALICE}"}
    assert await call(h) == (200, "ok")
    status, body = await admin(h, "DELETE", f"/revocations/{rid}")
    assert (status, body["error"]) == (404, "not_found")


async def test_lifting_a_subject_revocation_lets_new_tasks_work_but_never_reopens_old_ones(make_sidecar, upstream):
    """After a subject revocation is lifted, a new task for that subject works; the revoked one stays revoked."""
    h = await make_sidecar(config_for(upstream), POLICY)
    old = await open_task(h)
    await revoke(h, "subject", ALICE)
    assert (await admin(h, "DELETE", f"/revocations/subject:{ALICE}"))[0] == 200
    assert await call(h, old) == (403, "revoked")
    assert await call(h, await open_task(h)) == (200, "ok")


@pytest.mark.parametrize("body", [
    b"not json",  # not JSON at all
    b"[]",  # JSON, but not an object
    b'{"kind": "user", "id": "x"}',  # a kind that does not exist
    b'{"kind": "task"}',  # no id
    b'{"kind": "task", "id": ""}',  # an empty id
    b'{"kind": "task", "id": 42}',  # an id that is not a string
    b'{"kind": "task", "id": "x", "ttl": "forever"}',  # a ttl that is not a duration
    b'{"kind": "task", "id": "x", "ttl": "0s"}',  # a ttl that is not positive
    b'{"kind": "task", "id": "x", "ttl": "31d"}',  # a ttl above the 30-day ceiling
])
async def test_bad_revocation_requests_answer_400_json_and_change_nothing(make_sidecar, upstream, body):
    """Malformed POST /revocations bodies answer 400 with a JSON reason and add nothing."""
    h = await make_sidecar(config_for(upstream), POLICY)
    status, answer = await admin(h, "POST", "/revocations", data=body, headers={"Content-Type": "application/json"})
    assert status == 400 and answer["error"] == "bad_request" and answer["message"].startswith("admin: ")
    assert await rids(h) == set()


@pytest.mark.parametrize("authorization", [
    None,  # no header at all
    "Bearer wrong-token-wrong-token",  # a wrong token
    "Basic YWRtaW46YWRtaW4=",  # another scheme
])
async def test_admin_calls_without_the_token_answer_401_and_change_nothing(make_sidecar, upstream, authorization):
    """Without the admin token, revoking, lifting and listing answer 401 and nothing changes."""
    h = await make_sidecar(config_for(upstream), POLICY)
    agent_id = h.sidecar.runtime.agent.id
    await revoke(h, "subject", BOB)
    headers = {"Authorization": authorization} if authorization else {}
    base = f"http://127.0.0.1:{h.port('admin')}"
    async with aiohttp.ClientSession() as s:
        for method, path, body in (("POST", "/revocations", {"kind": "agent", "id": agent_id}),
                                   ("DELETE", f"/revocations/subject:{BOB}", None),
                                   ("GET", "/revocations", None)):
            async with s.request(method, base + path, json=body, headers=headers) as r:
                answer = await r.json()
                assert (r.status, answer["error"]) == (401, "unauthorized")
                assert "revocations" not in answer
    assert await rids(h) == {f"subject:{BOB}"}
    assert await call(h) == (200, "ok")


# -- several sidecars sharing a real Redis ------------------------------------------------------

async def test_a_revocation_made_on_one_sidecar_applies_on_another(make_sidecar, upstream, redis_server, tmp_path):
    """Over Redis, a subject revoked on sidecar A refuses B's task for that subject, and A's lift reaches B."""
    a = await make_sidecar(fleet_config(upstream, redis_server, tmp_path, "agent-a"), POLICY)
    b = await make_sidecar(fleet_config(upstream, redis_server, tmp_path, "agent-b"), POLICY)
    assert await poll(lambda: _bus_up(a)) and await poll(lambda: _bus_up(b))
    task = await open_task(b)
    assert await call(b, task) == (200, "ok")
    await revoke(a, "subject", ALICE)
    assert await poll(lambda: _refused(b, task))
    assert f"subject:{ALICE}" in await rids(b)
    assert (await admin(a, "DELETE", f"/revocations/subject:{ALICE}"))[0] == 200
    assert await poll(lambda: _has_no_revocations(b))
    assert await call(b, await open_task(b)) == (200, "ok")


async def test_a_sidecar_started_later_catches_up_before_it_is_ready(make_sidecar, upstream, redis_server, tmp_path):
    """A sidecar started after a revocation was made reads the stored keys; once ready, it already refuses."""
    a = await make_sidecar(fleet_config(upstream, redis_server, tmp_path, "agent-a"), POLICY)
    assert await poll(lambda: _bus_up(a))
    await revoke(a, "subject", ALICE)
    assert await poll(lambda: _stored(redis_server, f"subject:{ALICE}"))
    b = await make_sidecar(fleet_config(upstream, redis_server, tmp_path, "agent-b"), POLICY)
    assert await poll(lambda: _ready(b))
    assert f"subject:{ALICE}" in await rids(b)
    assert await call(b, await open_task(b)) == (403, "revoked")
    assert await metric(b, "sidecar_revocation_propagation_seconds_count") == 0.0  # the first sync is not lag


async def test_require_sync_holds_readiness_until_the_first_sync(make_sidecar, upstream, redis_server, tmp_path):
    """With require_sync (the default) a sidecar that cannot reach Redis is not ready; it becomes ready once it syncs."""
    redis_server.stop()
    strict = await make_sidecar(fleet_config(upstream, redis_server, tmp_path, "strict"), POLICY)
    lax = await make_sidecar(fleet_config(upstream, redis_server, tmp_path, "lax", require_sync=False), POLICY)
    for _ in range(3):
        assert await readyz(strict) == 503
        assert await readyz(lax) == 200
        await asyncio.sleep(0.1)
    assert await metric(strict, "sidecar_revocation_bus_up") == 0.0
    redis_server.start()
    assert await poll(lambda: _ready(strict))
    assert await poll(lambda: _bus_up(lax))


async def test_redis_outage_keeps_local_revocation_and_readiness_then_the_fleet_converges(
        make_sidecar, upstream, redis_server, tmp_path):
    """With Redis down, revocation works locally and sidecars stay ready; once it is back, the revocation made
    during the outage reaches the other sidecar (outbox), even though the restarted Redis lost its data."""
    a = await make_sidecar(fleet_config(upstream, redis_server, tmp_path, "agent-a"), POLICY)
    b = await make_sidecar(fleet_config(upstream, redis_server, tmp_path, "agent-b"), POLICY)
    assert await poll(lambda: _bus_up(a)) and await poll(lambda: _bus_up(b))
    await revoke(a, "subject", BOB)  # made before the outage: Redis loses it, the fleet must restore it
    assert await poll(lambda: _refused(b, None, BOB))
    task_a, task_b = await open_task(a), await open_task(b)
    redis_server.stop()
    assert await poll(lambda: _bus_down(a)) and await poll(lambda: _bus_down(b))
    await revoke(a, "subject", ALICE)
    assert await call(a, task_a) == (403, "revoked")
    assert await readyz(a) == 200 and await readyz(b) == 200
    assert await call(b, task_b) == (200, "ok")  # B cannot know yet
    assert a.sidecar._bus.unsent == 1
    redis_server.start()
    assert await poll(lambda: _bus_up(a)) and await poll(lambda: _bus_up(b))
    assert await poll(lambda: _refused(b, task_b))
    assert await poll(lambda: _stored(redis_server, f"subject:{ALICE}"))
    assert await poll(lambda: _stored(redis_server, f"subject:{BOB}"))  # restored by the fleet
    assert a.sidecar._bus.unsent == 0
    late = await make_sidecar(fleet_config(upstream, redis_server, tmp_path, "agent-late"), POLICY)
    assert await poll(lambda: _ready(late))
    assert await rids(late) == {f"subject:{ALICE}", f"subject:{BOB}"}


async def test_a_lift_made_during_an_outage_reaches_the_fleet(make_sidecar, upstream, redis_server, tmp_path):
    """A revocation lifted on A while Redis is down is lifted on B after the outage, not brought back by B."""
    a = await make_sidecar(fleet_config(upstream, redis_server, tmp_path, "agent-a"), POLICY)
    b = await make_sidecar(fleet_config(upstream, redis_server, tmp_path, "agent-b"), POLICY)
    assert await poll(lambda: _bus_up(a)) and await poll(lambda: _bus_up(b))
    await revoke(a, "subject", ALICE)
    assert await poll(lambda: _has(b, f"subject:{ALICE}"))
    redis_server.stop()
    assert await poll(lambda: _bus_down(a)) and await poll(lambda: _bus_down(b))
    assert (await admin(a, "DELETE", f"/revocations/subject:{ALICE}"))[0] == 200
    redis_server.start()
    assert await poll(lambda: _bus_up(a)) and await poll(lambda: _bus_up(b))
    assert await poll(lambda: _has_no_revocations(b))
    assert await rids(a) == set()
    assert await call(b, await open_task(b)) == (200, "ok")


# -- polling predicates ------------------------------------------------------------------------

async def _bus_up(h: SidecarHarness) -> bool:
    return await metric(h, "sidecar_revocation_bus_up") == 1.0


async def _bus_down(h: SidecarHarness) -> bool:
    return await metric(h, "sidecar_revocation_bus_up") == 0.0


async def _ready(h: SidecarHarness) -> bool:
    return await readyz(h) == 200


async def _refused(h: SidecarHarness, task: str | None, principal: str = ALICE) -> bool:
    task = task or await open_task(h, principal)
    return await call(h, task) == (403, "revoked")


async def _has(h: SidecarHarness, rid: str) -> bool:
    return rid in await rids(h)


async def _has_no_revocations(h: SidecarHarness) -> bool:
    return await rids(h) == set()


async def _stored(redis: RedisServer, rid: str) -> bool:
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis.url)
    try:
        value = await client.get(f"sidecar:revocation:{rid}")
        return value is not None and b'"deleted"' not in value
    finally:
        await client.aclose()


async def test_agent_revocations_lift_by_their_plain_id_and_unknown_admin_routes_are_json(make_sidecar, upstream):
    """DELETE /revocations/agent:spiffe://... works unencoded; unknown admin paths get a JSON 404."""
    from tests.scenarios.outbound import POLICY as OUT_POLICY, config_for
    from tests.harness import admin as call_admin

    h = await make_sidecar(config_for(upstream), OUT_POLICY)
    agent_id = h.sidecar.runtime.agent.id
    assert (await call_admin(h, "POST", "/revocations", json={"kind": "agent", "id": agent_id}))[0] == 201
    status, body = await call_admin(h, "DELETE", f"/revocations/agent:{agent_id}")
    assert status == 200, body
    status, body = await call_admin(h, "GET", "/no/such/endpoint")
    assert status == 404 and body["error"] == "not_found"


async def test_a_credential_name_revokes_all_of_its_tokens(make_sidecar, upstream):
    """kind credential with a configured credential name stops every use of it, fleet-wide by name."""
    import aiohttp

    from tests.scenarios.outbound import POLICY as OUT_POLICY, config_for
    from tests.harness import admin as call_admin

    h = await make_sidecar(config_for(upstream), OUT_POLICY)
    assert (await call_admin(h, "POST", "/revocations", json={"kind": "credential", "id": "legacy"}))[0] == 201
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{h.outbound}/billing/v1/x") as r:
            assert (r.status, (await r.json())["error"]) == (403, "revoked")
    assert upstream.seen == []
    event = (await h.settle())[-1]
    assert event["credential"]["provider"] == "legacy"  # the refused credential is named in the event


# -- the bus: what a message may carry -----------------------------------------------------------

def bus() -> tuple[Revocations, RedisBus]:
    """Revocations and a Redis bus that is never started: messages are handed to it directly."""
    revocations = Revocations(Metrics())
    return revocations, RedisBus(RevocationConfig(Secret("redis://127.0.0.1:1/0")), revocations, Metrics())


def test_a_future_dated_tombstone_on_the_bus_cannot_make_later_admin_revocations_ineffective():
    """A bus tombstone whose created_at lies in the future (a skewed sidecar's clock, or anyone who can
    write to Redis) must not suppress a later local revocation of that id that POST /revocations
    answered 201 for (security review 2, finding G1)."""
    revocations, redis_bus = bus()
    now = time.time()
    tombstone = {"kind": "task", "id": "t-1", "created_at": now + 600, "expires_at": now + 3600, "deleted": True}
    redis_bus._receive(orjson.dumps(tombstone), observe=False)
    entry = revocations.add("task", "t-1", 3600.0)  # what POST /revocations does; it answers 201 with this entry
    assert entry.rid in {e.rid for e in revocations.list()}
    with pytest.raises(Refusal):
        revocations.check_task(SimpleNamespace(id="t-1", principal=None))


def test_bus_messages_with_non_finite_or_unbounded_times_are_refused():
    """A bus message's times are range-checked: "inf"/"nan" strings and TTLs far beyond the admin API's
    30-day maximum are not applied (a revocation that never expires, or a NaN version that a lift cannot
    retire) (security review 2, finding G2)."""
    revocations, redis_bus = bus()
    now = time.time()
    for message in ({"kind": "subject", "id": "alice", "created_at": "nan", "expires_at": "inf"},
                    {"kind": "subject", "id": "bob", "created_at": now, "expires_at": now + 10 * 365 * 86400}):
        redis_bus._receive(orjson.dumps(message), observe=False)
    assert revocations.list() == []


@pytest.mark.parametrize("payload", [
    b"", b"not json", b"[]", b"[1,2]", b"42", b'"task"', b"null", b'{"kind": "task"}',
    b'{"kind": "task", "id": "x", "created_at": "soon", "expires_at": 1}',
    b'{"kind": "task", "id": "x", "created_at": [], "expires_at": {}}',
    b'{"kind": "bogus", "id": "x", "created_at": 1, "expires_at": 99999999999}',
    b"\xff\xfe garbage",
])
def test_malformed_bus_messages_are_ignored_without_crashing_or_revoking(payload):
    """Malformed or unknown-kind revocation messages are dropped; nothing is revoked and nothing raises
    (security review 2: a defence that held)."""
    revocations, redis_bus = bus()
    redis_bus._receive(payload, observe=True)
    assert revocations.list() == []


def test_a_stale_bus_tombstone_cannot_lift_a_newer_revocation():
    """A tombstone for an older version of a revocation leaves the newer, locally made one in force
    (security review 2: a defence that held)."""
    revocations, redis_bus = bus()
    now = time.time()
    revocations.add("task", "t-2", 3600.0)
    redis_bus._receive(orjson.dumps({"kind": "task", "id": "t-2", "created_at": now - 60, "expires_at": now + 60,
                                     "deleted": True}), observe=False)
    with pytest.raises(Refusal):
        revocations.check_task(SimpleNamespace(id="t-2", principal=None))
