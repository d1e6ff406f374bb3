"""The event loop is observable: a lag histogram, and a watchdog that names what held the loop (issue 12 item 5)."""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp

from tests.core.test_outbound import POLICY, config_for

STALL_S = 1.0
SECRET = "loop-local-secret-4f1c9a"


def watched(upstream, report_interval: str = "60s") -> dict:
    config = config_for(upstream)
    config["observability"] = {"loop_sample_interval": "20ms", "stall_threshold": "300ms",
                               "stall_report_interval": report_interval}
    return config


def hold_the_loop() -> None:
    """A callback that blocks the loop thread, with a secret in a local variable."""
    token = SECRET
    time.sleep(STALL_S)
    assert token


async def stall_once() -> None:
    asyncio.get_running_loop().call_soon(hold_the_loop)
    await asyncio.sleep(0)  # the callback runs now, holding the loop for STALL_S
    await asyncio.sleep(0.05)


async def metrics_text(h) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{h.port('metrics')}/metrics") as r:
            return await r.text()


def sample(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not exposed"
    return float(match.group(1))


def reports_naming(h, function: str) -> list[dict]:
    return [line for line in h.lines() if line.get("event") == "event_loop_stalled"
            and any(function in frame for frame in line["stack"])]


async def test_a_blocked_loop_is_reported_once_with_the_function_that_blocked_it(make_sidecar, upstream):
    """A callback sleeping on the loop gives one event_loop_stalled report whose stack names it, file and line
    only (no locals), and the lag histogram observes the stall (issue 12 item 5)."""
    h = await make_sidecar(watched(upstream), POLICY)
    await stall_once()
    reports = reports_naming(h, "hold_the_loop")
    assert len(reports) == 1
    frame = next(f for f in reports[0]["stack"] if "hold_the_loop" in f)
    assert re.fullmatch(r".*/tests/observe/test_loop\.py:\d+ in hold_the_loop", frame)
    assert reports[0]["level"] == "warning" and reports[0]["late_ms"] >= 300
    assert SECRET not in h.raw_log().decode()
    text = await metrics_text(h)
    over_half_a_second = (sample(text, "sidecar_event_loop_lag_seconds_count")
                          - sample(text, 'sidecar_event_loop_lag_seconds_bucket{le="0.5"}'))
    assert over_half_a_second >= 1
    assert sample(text, "sidecar_event_loop_stalls_total") >= 1


async def test_stall_reports_are_rate_limited_and_every_stall_is_counted(make_sidecar, upstream):
    """Two stalls within stall_report_interval: one report, two counted in sidecar_event_loop_stalls_total
    (issue 12 item 5)."""
    h = await make_sidecar(watched(upstream), POLICY)
    await stall_once()
    await asyncio.sleep(0.1)  # the loop runs again between the two
    await stall_once()
    assert len(reports_naming(h, "hold_the_loop")) == 1
    assert sample(await metrics_text(h), "sidecar_event_loop_stalls_total") >= 2
