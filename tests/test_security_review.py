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


# -- F3: request.size is 0 for a chunked body ------------------------------------------------

@pytest.mark.xfail(strict=True, reason="F3")
async def test_f3_a_chunked_body_cannot_evade_a_request_size_condition(make_sidecar, upstream):
    """A rule limited by request.size must not let a chunked (length-less) body of any size through."""
    policy = {"version": 1, "default": "deny", "rules": [
        {"id": "small-posts", "direction": "outbound", "upstream": "billing", "methods": ["POST"],
         "paths": ["/v1/**"], "when": {"expr": "request.size < 100"}, "effect": "allow"},
    ]}
    h = await make_sidecar(out_config(upstream), policy)
    big = b"x" * 5000

    async def chunks():
        yield big

    async with aiohttp.ClientSession() as s:
        async with s.post(f"{h.outbound}/billing/v1/upload", data=b"y" * 5000) as r:
            assert r.status == 403  # the declared length is checked
        async with s.post(f"{h.outbound}/billing/v1/upload", data=chunks()) as r:
            status = r.status
    delivered = [len(seen.body) for seen in upstream.seen]
    assert status == 403 and delivered == [], f"status {status}; upstream received bodies of {delivered} bytes"


# -- F4: a task-bound credential fetched while its task ends outlives the task ---------------

class _SlowTaskBoundProvider:
    """A task-bound provider whose fetch waits for the test, recording what it was given."""

    type = "oauth2_token_exchange"
    needs_body = False
    standing = False
    task_bound = True

    def __init__(self) -> None:
        import asyncio

        self.name = "on-behalf"
        self.release = asyncio.Event()
        self.fetched_with: list[str | None] = []

    def cache_key(self, req):
        return req.task.id if req.task else None, req.scopes

    async def fetch(self, req):
        import time

        from sidecar.credentials.base import Credential

        await self.release.wait()
        self.fetched_with.append(req.task.subject_token.reveal() if req.task and req.task.subject_token else None)
        now = time.time()
        return Credential(type=self.type, provider=self.name, id=f"jti-{len(self.fetched_with)}",
                          expires_at=now + 600, issued_at=now)

    def apply(self, out, credential) -> None:
        return None

    async def aclose(self) -> None:
        return None


@pytest.mark.xfail(strict=True, reason="F4")
async def test_f4_a_credential_fetched_for_a_task_that_ended_meanwhile_is_not_kept():
    """A task-bound credential whose fetch completes after its task ended must not stay cached under that task."""
    import asyncio

    from sidecar.credentials.base import CredentialRequest, TaskRef
    from sidecar.credentials.cache import CredentialCache
    from sidecar.fields import Secret
    from sidecar.observe.metrics import Metrics

    cache = CredentialCache(Metrics())
    provider = _SlowTaskBoundProvider()
    task = TaskRef("t1", "https://idp", "alice", Secret("human-token-alice", "bearer"), "delegated")
    req = CredentialRequest(upstream="crm", scopes=("crm.read",), agent_id="spiffe://x/agent", task=task)
    pending = asyncio.ensure_future(cache.get(provider, req))
    await asyncio.sleep(0)
    cache.drop_task("t1")  # the task ends (response done, TTL, revoked) while the exchange is in flight
    provider.release.set()
    await pending
    held = [(c.id, r.task.id) for c, r in cache.held() if r.task is not None]
    await cache.aclose()
    assert held == [], f"credential kept (and refreshed with the human's token) after its task ended: {held}"
