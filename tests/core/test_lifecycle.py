"""The sidecar's lifecycle: resources torn down in reverse start order by construction, and a start that
fails half-way leaving nothing open."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from sidecar.app import Sidecar
from sidecar.config import parse_config
from tests.harness import Held, SidecarHarness, Upstream, admin
from tests.scenarios.outbound import POLICY, config_for

LISTENERS = ("outbound", "inbound", "health", "metrics", "admin")


async def refuses(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def test_a_start_that_fails_after_listeners_are_up_leaves_none_open(tmp_path, upstream: Upstream):
    """The inbound port is taken: start() fails after health, metrics, admin and outbound listen, and closes
    them; stop() afterwards is safe, and so is a second one."""
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    config = {**config_for(upstream), "inbound": {"forward_to": upstream.url, "listen": f"127.0.0.1:{port}"}}
    h = SidecarHarness(tmp_path, config, POLICY)
    try:
        with pytest.raises(OSError):
            await h.start()
        assert h.sidecar is not None and sorted(h.sidecar.ports) == ["admin", "health", "metrics", "outbound"]
        for name, started in h.sidecar.ports.items():
            assert await refuses(started), f"{name} is still listening"
        await h.sidecar.stop()
        await h.sidecar.stop()
    finally:
        taken.close()


def test_a_sidecar_is_not_ready_before_its_start_has_finished(tmp_path):
    """Readiness waits for the whole start (identity, policy, bus, every listener)."""
    raw = {"state_dir": str(tmp_path / "state"), "policy": {"files": []}}
    assert Sidecar(parse_config(raw, base_dir=tmp_path)).ready is False


async def test_health_and_admin_answer_until_the_drain_is_over_then_everything_closes(make_sidecar):
    """Stop order: not ready, stop accepting, drain; health and admin, started before the exchange
    listeners, are closed after them, so a probe during the drain reads ``draining``."""
    held = Held()
    up = await Upstream(held).start()
    try:
        h = await make_sidecar({**config_for(up), "inbound": {"forward_to": up.url}}, POLICY)
        ports = dict(h.sidecar.ports)
        async with aiohttp.ClientSession() as s:
            in_flight = asyncio.ensure_future(s.get(f"{h.outbound}/billing/v1/slow"))
            await asyncio.wait_for(held.started.wait(), 10)
            stopping = asyncio.ensure_future(h.sidecar.stop())
            await asyncio.sleep(0.05)
            async with s.get(f"http://127.0.0.1:{ports['health']}/readyz") as r:
                assert (r.status, (await r.json())["reason"]) == (503, "draining")
            assert (await admin(h, "GET", "/inventory"))[0] == 200
            assert await refuses(ports["outbound"]) and await refuses(ports["inbound"])
            held.release.set()
            assert (await asyncio.wait_for(in_flight, 10)).status == 200
            await asyncio.wait_for(stopping, 10)
        for name in LISTENERS:
            assert await refuses(ports[name]), f"{name} is still listening"
        h.sidecar = None  # already stopped
    finally:
        held.release.set()
        await up.stop()
