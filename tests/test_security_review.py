"""Security review: attacker-driven proofs against the running sidecar (loopback only).

Tests named ``test_f<N>_...`` reproduce findings F1-F5 of the first review (each failed before its
fix: WebSocket redirects, inbound path, chunked size, task-bound cache, event redaction); the
others confirm a defence holds.
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


# -- defences that held ----------------------------------------------------------------------

@pytest.mark.parametrize("head", [
    # CL.TE smuggling: both framings on one request
    b"POST /billing/v1/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n",
    # two Content-Length headers that disagree
    b"POST /billing/v1/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 2\r\nContent-Length: 40\r\n",
    # a lowercase method would dodge an uppercase methods: [...] rule and be re-uppercased by the client
    b"delete /billing/v1/admin/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n",
])
async def test_ambiguous_framing_and_methods_are_refused_before_anything_is_forwarded(make_sidecar, upstream, head):
    """Requests whose framing or method two parsers could read differently are refused with 400."""
    h = await make_sidecar(out_config(upstream), OUT_POLICY)
    port = h.port("outbound")
    smuggled = b"ab" + b"GET /api/v1/admin/users HTTP/1.1\r\nHost: x\r\n\r\n"
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled)
    response = await raw_http(port, (head % port) + b"Connection: close\r\n\r\n" + body)
    assert response.startswith(b"HTTP/1.0 400") or response.startswith(b"HTTP/1.1 400")
    assert upstream.seen == []


@pytest.mark.parametrize("target, host, reason", [
    ("http://billing.internal@127.0.0.1/api/v1/x", "billing.internal@127.0.0.1", "bad_request"),  # userinfo
    ("http://billing.internal/api/v1/x", "evil.example", "host_mismatch"),  # Host disagrees with authority
    ("http://billing.internal/other/v1/x", "billing.internal", "unknown_upstream"),  # outside the base path
    ("http://billing.internal/api/../other", "billing.internal", "unknown_upstream"),  # dot segments out of it
    ("http://billing.internal/api/v1/%61dmin/users", "billing.internal", "rule_denied"),  # encoded unreserved
    ("http://billing.internal/api/v1/x//..//admin/users", "billing.internal", "rule_denied"),
])
async def test_forward_proxy_tricks_are_refused(make_sidecar, upstream, target, host, reason):
    """Absolute-URI tricks (userinfo, Host mismatch, base-path escape, encodings) never reach the upstream."""
    h = await make_sidecar(out_config(upstream), OUT_POLICY)
    port = h.port("outbound")
    request = b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (target.encode(), host.encode())
    response = await raw_http(port, request)
    assert f'"error":"{reason}"'.encode() in response.replace(b'": "', b'":"')
    assert upstream.seen == []


async def test_agent_credentials_and_task_header_never_reach_the_upstream(make_sidecar, upstream):
    """Authorization, Cookie, Proxy-Authorization and X-Sidecar-Task from the agent are stripped or refused."""
    h = await make_sidecar(out_config(upstream), OUT_POLICY)
    headers = {"Authorization": "Bearer agent-own", "Cookie": "s=1", "Proxy-Authorization": "Basic eDp5",
               "X-API-Key": "agent-chosen-key"}
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{h.outbound}/billing/v1/x", headers=headers) as r:
            assert r.status == 200
        async with s.get(f"{h.outbound}/billing/v1/x", headers={"X-Sidecar-Task": "forged"}) as r:
            assert r.status == 403 and (await r.json())["error"] == "unknown_task"
    assert len(upstream.seen) == 1
    seen = upstream.seen[0]
    for name in ("Authorization", "Cookie", "Proxy-Authorization", "X-Sidecar-Task"):
        assert not seen.has_header(name), name
    assert [v for k, v in seen.headers if k.lower() == "x-api-key"] == [SECRET]


async def test_f5_credential_shaped_text_in_a_request_is_redacted_in_the_trust_decision_event(make_sidecar, upstream):
    """A JWT (or a configured secret) in the request path is masked in the trust-decision event as in every other log line."""
    token = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz"
    h = await make_sidecar(out_config(upstream), OUT_POLICY)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{h.outbound}/billing/v1/session/{token}") as r:
            assert r.status == 200
        async with s.get(f"{h.outbound}/billing/v1/admin/{SECRET}") as r:
            assert r.status == 403 and SECRET not in await r.text()
    await h.settle()
    log = h.raw_log()
    assert token.encode() not in log and SECRET.encode() not in log


async def test_a_transfer_coding_other_than_chunked_is_refused_not_half_forwarded(make_sidecar, upstream):
    """Transfer-Encoding: gzip, chunked is refused with 400 rather than forwarded without its body."""
    from tests.core.test_outbound import POLICY as OUT_POLICY, config_for
    from tests.harness import raw_http

    h = await make_sidecar(config_for(upstream), OUT_POLICY)
    port = h.port("outbound")
    response = await raw_http(port, (f"POST /billing/v1/x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                     "Transfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n"
                                     "5\r\nhello\r\n0\r\n\r\n").encode())
    assert response.split(b" ")[1] == b"400"
    assert upstream.seen == []
