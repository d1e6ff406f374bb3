"""Revocation and tasks through the admin API, checked by the agent's own outbound calls."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp import web

from tests.harness import SidecarHarness, Upstream, admin

SECRET = "canary-static-secret-revocation"
ALICE, BOB = "alice@example.com", "bob@example.com"
POLL_STEP_S = 0.05
POLL_STEPS = 300  # at most ~15 s of polling, never asserted as a duration

POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "billing-all", "direction": "outbound", "upstream": "billing", "paths": ["/v1/**"], "effect": "allow"},
]}


def held_sse(release: asyncio.Event) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An SSE upstream handler: one event, then the second only once ``release`` is set."""
    async def sse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await asyncio.wait_for(release.wait(), 30)
        await response.write(b"data: last\n\n")
        return response

    return sse


def config_for(upstream: Upstream, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "agent": {"name": "billing-agent", "environment": "test"},
        "outbound": {"upstreams": {"billing": {"url": upstream.url + "/api", "credential": "legacy"}}},
        "credentials": {"legacy": {"type": "static", "header": "X-API-Key", "value": {"value": SECRET}}},
    }
    config.update(extra)
    return config


async def call(h: SidecarHarness, task: str | None = None, path: str = "/billing/v1/invoices") -> tuple[int, str]:
    """One outbound call from the agent: (status, reason code or 'ok')."""
    headers = {"X-Sidecar-Task": task} if task else {}
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{h.outbound}{path}", headers=headers) as r:
            body = await r.json(content_type=None)
            return r.status, body.get("error", "ok") if isinstance(body, dict) else "ok"


async def open_task(h: SidecarHarness, principal: str = ALICE, **extra: Any) -> str:
    status, body = await admin(h, "POST", "/tasks", json={"principal": principal, **extra})
    assert status == 201, body
    return body["id"]


async def revoke(h: SidecarHarness, kind: str, ident: str, **extra: Any) -> dict[str, Any]:
    status, body = await admin(h, "POST", "/revocations", json={"kind": kind, "id": ident, **extra})
    assert status == 201, body
    return body


async def poll(check: Callable[[], Awaitable[bool]]) -> bool:
    """True as soon as check() is; False after POLL_STEPS tries (bounded, no duration asserted)."""
    for _ in range(POLL_STEPS):
        if await check():
            return True
        await asyncio.sleep(POLL_STEP_S)
    return False


async def get_text(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            return r.status, await r.text()


async def readyz(h: SidecarHarness) -> int:
    return (await get_text(f"http://127.0.0.1:{h.port('health')}/readyz"))[0]


async def metric(h: SidecarHarness, name: str) -> float | None:
    """The value of an unlabelled sample in /metrics."""
    _, text = await get_text(f"http://127.0.0.1:{h.port('metrics')}/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def rids(h: SidecarHarness) -> set[str]:
    status, body = await admin(h, "GET", "/revocations")
    assert status == 200
    return {r["rid"] for r in body["revocations"]}
