"""The fleet inventory: five in-process sidecars register in one real Redis (issue 18 item 5).

Heartbeats are driven by short configured intervals and every wait is a bounded poll; no duration is
asserted. "Within one heartbeat" is shown by a heartbeat far longer than the polling: a sidecar listed
at all was listed by its first heartbeat, written at start.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import yaml

from sidecar.cli import main
from sidecar.fleet import fleet_view, policy_majority
from tests.harness import SidecarHarness, Upstream, admin
from tests.peers.redis import RedisServer, redis_server  # noqa: F401 (redis_server is a fixture)
from tests.scenarios.revocation import POLICY, SECRET, config_for, poll

SIZE = 5
SLOW = {"heartbeat": "1m", "expiry": "2m"}  # one heartbeat outlasts every poll below
FAST = {"heartbeat": "100ms", "expiry": "300ms"}  # expiries and returns within a few polls
OTHER_POLICY = {**POLICY, "rules": [{**POLICY["rules"][0], "id": "billing-other"}]}


async def start_fleet(make_sidecar: Any, upstream: Upstream, tmp_path: Path, redis_url: str,
                      fleet: dict[str, str], odd_policy: bool = False) -> list[SidecarHarness]:
    """SIZE sidecars of one environment on one Redis; with ``odd_policy`` the last runs another policy."""
    members = []
    for i in range(SIZE):
        config = config_for(upstream, agent={"name": f"fleet-{i}", "environment": "test"},
                            state_dir=str(tmp_path / f"fleet-{i}"), revocation={"redis_url": redis_url}, fleet=fleet)
        if odd_policy and i == SIZE - 1:
            other = tmp_path / "other-policy.yaml"
            other.write_text(yaml.safe_dump(OTHER_POLICY))
            config["policy"] = {"files": [str(other)]}
        members.append(await make_sidecar(config, POLICY))
    return members


async def fleet_of(member: SidecarHarness) -> dict[str, Any]:
    status, body = await admin(member, "GET", "/inventory?scope=fleet")
    assert status == 200, body
    return body


def instance(member: SidecarHarness) -> str:
    assert member.sidecar is not None and member.sidecar._fleet is not None
    return member.sidecar._fleet.instance


async def lists(member: SidecarHarness, live: int, stale: int = 0) -> bool:
    body = await fleet_of(member)
    return body["available"] and (body["live"], body["stale"]) == (live, stale)


async def test_every_sidecar_is_listed_live_within_one_heartbeat(make_sidecar, upstream, redis_server, tmp_path):
    """Five sidecars with a one-minute heartbeat are all listed live by any of them: their first heartbeat, at
    start, registered each with its agent, upstreams, credential types, versions and last-seen time."""
    members = await start_fleet(make_sidecar, upstream, tmp_path, redis_server.url, SLOW)
    assert await poll(lambda: lists(members[2], live=SIZE))
    body = await fleet_of(members[2])
    assert body["self"] == instance(members[2])
    by_instance = {entry["instance"]: entry for entry in body["sidecars"]}
    assert set(by_instance) == {instance(m) for m in members}
    entry = by_instance[instance(members[0])]
    assert entry["agent"]["name"] == "fleet-0" and entry["agent"]["id"] == members[0].sidecar.runtime.agent.id
    assert [u["name"] for u in entry["upstreams"]] == ["billing"] and entry["upstreams"][0]["credential"] == "legacy"
    assert entry["credentials"] == [{"name": "legacy", "type": "static", "standing": True}]
    assert entry["version"] and entry["policy_version"] == members[0].sidecar.policy_version
    assert entry["status"] == "live" and entry["last_seen"].endswith("Z") and entry["policy_differs"] is False
    local = (await admin(members[0], "GET", "/inventory"))[1]
    assert local["fleet"]["registered"] is True and local["fleet"]["instance"] == instance(members[0])


async def test_a_stopped_sidecar_is_listed_stale_after_its_expiry(make_sidecar, upstream, redis_server, tmp_path):
    """A sidecar that stops stays listed, as stale once its entry expired; the others stay live."""
    members = await start_fleet(make_sidecar, upstream, tmp_path, redis_server.url, FAST)
    assert await poll(lambda: lists(members[0], live=SIZE))
    gone = members[-1]
    gone_instance = instance(gone)
    await gone.stop()
    gone.sidecar = None  # stopped: the fixture need not stop it again
    assert await poll(lambda: lists(members[0], live=SIZE - 1, stale=1))
    [stale] = [e for e in (await fleet_of(members[0]))["sidecars"] if e["status"] == "stale"]
    assert stale["instance"] == gone_instance and stale["agent"]["name"] == f"fleet-{SIZE - 1}"


async def test_a_sidecar_whose_policy_differs_from_the_majority_is_flagged(make_sidecar, upstream, redis_server,
                                                                        tmp_path):
    """Four sidecars run one policy and the fifth another: only the fifth is flagged, against the four's version."""
    members = await start_fleet(make_sidecar, upstream, tmp_path, redis_server.url, SLOW, odd_policy=True)
    assert await poll(lambda: lists(members[0], live=SIZE))
    body = await fleet_of(members[0])
    flagged = {e["agent"]["name"] for e in body["sidecars"] if e["policy_differs"]}
    assert flagged == {f"fleet-{SIZE - 1}"}
    assert body["policy_majority"] == {"test": members[0].sidecar.policy_version}
    assert members[-1].sidecar.policy_version != members[0].sidecar.policy_version


async def test_with_redis_down_the_local_inventory_answers_and_registrations_return_after_a_restart(
        make_sidecar, upstream, redis_server, tmp_path):
    """Redis stopped: the fleet view says it is unavailable and why, the local inventory still answers (saying the
    sidecar is not registered now). Redis restarted empty: every registration returns, with no sidecar restart."""
    server: RedisServer = redis_server
    members = await start_fleet(make_sidecar, upstream, tmp_path, server.url, FAST)
    assert await poll(lambda: lists(members[0], live=SIZE))
    server.stop()
    body = await fleet_of(members[1])
    assert (body["available"], body["sidecars"]) == (False, [])
    assert body["reason"].startswith("fleet: redis")
    assert await poll(lambda: not_registered(members[1]))
    server.start()
    assert await poll(lambda: lists(members[1], live=SIZE))
    assert (await admin(members[1], "GET", "/inventory"))[1]["fleet"]["registered"] is True


async def not_registered(member: SidecarHarness) -> bool:
    status, body = await admin(member, "GET", "/inventory")
    assert status == 200, body
    return body["fleet"]["registered"] is False and body["fleet"]["reason"].startswith("fleet: redis")


async def test_no_secret_reaches_redis(make_sidecar, upstream, redis_server, tmp_path):
    """Whatever the fleet wrote to Redis holds no credential value: every key and value is searched."""
    members = await start_fleet(make_sidecar, upstream, tmp_path, redis_server.url, SLOW)
    assert await poll(lambda: lists(members[0], live=SIZE))
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=2)
    stored = b"".join(key + (client.get(key) or b"") for key in client.scan_iter("*"))
    assert b"sidecar:fleet:member:" in stored and b"fleet-0" in stored
    assert SECRET.encode() not in stored


async def test_the_fleet_view_needs_the_admin_token(make_sidecar, upstream, redis_server, tmp_path):
    """``GET /inventory?scope=fleet`` without the admin token, or with another, is refused 401."""
    [member, *_] = await start_fleet(make_sidecar, upstream, tmp_path, redis_server.url, SLOW)
    url = f"http://127.0.0.1:{member.port('admin')}/inventory?scope=fleet"
    async with aiohttp.ClientSession() as s:
        for headers in ({}, {"Authorization": "Bearer not-the-admin-token"}):
            async with s.get(url, headers=headers) as r:
                assert r.status == 401


async def test_without_a_bus_the_fleet_view_is_unavailable_and_says_why(make_sidecar, upstream, tmp_path, capsys):
    """No revocation bus: the fleet view and ``sidecar inventory --fleet`` say it needs one; an unknown scope is 400."""
    member = await make_sidecar(config_for(upstream), POLICY)
    body = await fleet_of(member)
    assert body["available"] is False and "revocation.redis_url" in body["reason"]
    assert (await admin(member, "GET", "/inventory"))[1]["fleet"]["registered"] is False
    assert (await admin(member, "GET", "/inventory?scope=galaxy"))[0] == 400
    assert member.sidecar is not None
    cli_config = tmp_path / "cli.yaml"  # the running sidecar's admin address (it bound port 0) and token file
    cli_config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "cli-state"), "admin": {
        "listen": f"127.0.0.1:{member.port('admin')}", "token_file": str(member.sidecar.config.admin.token_file)}}))
    assert await asyncio.to_thread(main, ["inventory", "--fleet", "-c", str(cli_config)]) == 0
    out, err = capsys.readouterr()
    assert '"available": false' in out and "warning: the fleet view is unavailable" in err


async def test_a_sidecar_told_not_to_register_writes_nothing(make_sidecar, upstream, redis_server):
    """``fleet.register: false`` on a bus: no entry in Redis, and the fleet view says why it is unavailable."""
    member = await make_sidecar(config_for(upstream, revocation={"redis_url": redis_server.url},
                                           fleet={"register": False}), POLICY)
    body = await fleet_of(member)
    assert body["available"] is False and "fleet.register" in body["reason"]
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=2)
    assert list(client.scan_iter("sidecar:fleet:*")) == []


def live(name: str, environment: str, policy: str) -> dict[str, Any]:
    return {"instance": name, "agent": {"id": f"spiffe://t/{name}", "environment": environment},
            "policy_version": policy}


@pytest.mark.parametrize(("versions", "majority"), [
    (["a", "a", "a", "b"], "a"),  # more than half run a: b is the odd one out
    (["a", "a", "b", "b"], None),  # a tie is no majority: nobody is flagged
    (["a"], "a"),  # a fleet of one agrees with itself
    (["a", "b", "c"], None),  # a plurality of one is not a majority
])
def test_the_majority_is_more_than_half_of_the_live_sidecars(versions: list[str], majority: str | None):
    records = [live(f"s{i}", "prod", v) for i, v in enumerate(versions)]
    assert policy_majority(records) == {"prod": majority}


def test_each_environment_has_its_own_majority_and_stale_sidecars_do_not_vote():
    """Staging's policy is not production's; a stale sidecar neither counts nor escapes the flag."""
    records = [live("p1", "prod", "a"), live("p2", "prod", "a"), live("p3", "prod", "b"), live("s1", "staging", "z"),
               live("old1", "prod", "b"), live("old2", "prod", "b")]
    view = fleet_view(records, {"p1", "p2", "p3", "s1"}, "p1")
    assert view["policy_majority"] == {"prod": "a", "staging": "z"}
    assert {e["instance"]: (e["status"], e["policy_differs"]) for e in view["sidecars"]} == {
        "p1": ("live", False), "p2": ("live", False), "p3": ("live", True), "s1": ("live", False),
        "old1": ("stale", True), "old2": ("stale", True)}
    assert (view["live"], view["stale"]) == (4, 2)


async def metric(member: SidecarHarness, name: str) -> tuple[float | None, str]:
    """The value of the unlabelled series ``name`` (None when absent), and the whole exposition."""
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{member.port('metrics')}/metrics") as r:
            text = await r.text()
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1]), text
    return None, text


async def registered_is(member: SidecarHarness, value: float) -> bool:
    return (await metric(member, "sidecar_fleet_registered"))[0] == value


@pytest.mark.skipif(shutil.which("promtool") is None and os.environ.get("CI") != "true",
                    reason="promtool not installed (apt-get install prometheus)")
async def test_the_registration_gauge_follows_redis_and_the_exposition_passes_promtool(
        make_sidecar, upstream, redis_server, tmp_path):
    """``sidecar_fleet_registered`` is 1 once a heartbeat was written, 0 while Redis is down (failures counted),
    1 again after its restart; the exposition stays clean under promtool (issue 18 item 3)."""
    server: RedisServer = redis_server
    member = await make_sidecar(config_for(upstream, state_dir=str(tmp_path / "one"),
                                           revocation={"redis_url": server.url}, fleet=FAST), POLICY)
    assert await poll(lambda: registered_is(member, 1))
    assert (await metric(member, "sidecar_fleet_last_heartbeat_timestamp_seconds"))[0]
    server.stop()
    assert await poll(lambda: registered_is(member, 0))
    _, text = await metric(member, "sidecar_fleet_registered")
    assert re.search(r'^sidecar_fleet_heartbeats_total\{outcome="error"\} [1-9]', text, re.M), text
    result = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    server.start()
    assert await poll(lambda: registered_is(member, 1))


async def test_a_sidecar_that_does_not_register_says_so_in_its_gauge(make_sidecar, upstream, tmp_path):
    """Without a bus there is no registration: the gauge is 0 from the start, not absent."""
    h = await make_sidecar(config_for(upstream, state_dir=str(tmp_path / "solo")), POLICY)
    assert (await metric(h, "sidecar_fleet_registered"))[0] == 0
