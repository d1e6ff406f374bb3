"""MCP authorization done for the agent: a 401 pointing at RFC 9728 metadata, a token with RFC 8707's resource from
the real oidc-provider, the request sent again; the refusals when any of it fails (issue 13 item 4)."""

from __future__ import annotations

import json
import ssl
import subprocess
from collections.abc import Iterator

import aiohttp
import pytest
import requests
from aiohttp import web

from tests.harness import Upstream, assert_valid
from tests.peers.mcp_tools import INITIALIZE, JSON_IN, SDK_PEERS, need_sdk, run_sdk
from tests.peers.oidc import OidcPki, OidcProvider

SECRET = "peer-secret-basic-Zq81vLw3Kx6"  # svc-basic's, as the peer registers it
POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "whoami", "direction": "outbound", "upstream": "tools", "mcp": {"tools": ["whoami"]}, "effect": "allow"}]}


def auth_config(peer: OidcProvider, pki: OidcPki, url: str, **upstream: object) -> dict:
    credential = {"type": "oauth2_client_credentials", "token_url": peer.token_url, "issuer": peer.issuer,
                  "ca": str(peer.ca_path), "client_id": "svc-basic", "auth": "client_secret_basic",
                  "client_secret": {"value": peer.secret("svc-basic")}, "scopes": ["invoices.read"]}
    return {"credentials": {"mcp-idp": credential},
            "outbound": {"upstreams": {"tools": {"url": url, "protocol": "mcp", "ca": str(pki.ca_path),
                                                 "credential": "mcp-idp", **upstream}}}}


@pytest.fixture(scope="module")
def auth_servers(oidc_provider: OidcProvider, oidc_pki: OidcPki, tmp_path_factory) -> Iterator:
    """SDK-built MCP servers over TLS that demand a token for their own URL, one per SDK major: major -> URL."""
    jwks = tmp_path_factory.mktemp("jwks") / "jwks.json"
    jwks.write_text(json.dumps(requests.get(oidc_provider.jwks_uri, verify=str(oidc_provider.ca_path),
                                            timeout=10).json()))
    running: dict[int, tuple[subprocess.Popen, str]] = {}

    def url(major: int) -> str:
        if major not in running:
            proc = subprocess.Popen([need_sdk(major), str(SDK_PEERS / "auth_server.py"), oidc_provider.issuer,
                                     str(jwks), str(oidc_pki.server_cert_path), str(oidc_pki.server_key_path)],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            line = proc.stdout.readline()  # the server prints its port once listening, or dies
            assert line.startswith(b"PORT "), line
            resource = f"https://127.0.0.1:{int(line.split()[1])}/mcp"
            oidc_provider.add_resource(resource)
            running[major] = (proc, resource)
        return running[major][1]

    yield url
    for proc, _ in running.values():
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("major", [1, 2])
async def test_an_sdk_agent_reaches_a_server_that_demands_its_audience(make_sidecar, auth_servers, oidc_provider,
                                                                     oidc_pki, major):
    """The SDK server answers 401 with resource_metadata; the sidecar fetches it, gets a token for that resource and
    sends the request again: the agent, configured with no OAuth at all, just works; the token is cached
    (issue 13 item 4)."""
    resource = auth_servers(major)
    h = await make_sidecar(auth_config(oidc_provider, oidc_pki, resource), POLICY)
    oidc_provider.reset()
    seen = await run_sdk(need_sdk(major), "whoami_client.py", f"{h.outbound}/tools")
    assert seen == {"major": major, "answer": f"called for {resource}"}
    # the credential's own token on the first request, then the resource's: cached for the rest of the session
    assert oidc_provider.stats()["tokens_issued"] == 2
    events = await h.settle()
    assert_valid(events)
    called = next(e for e in events if e["target"]["mcp_tool"] == "whoami")
    assert called["decision"] == "allow" and called["credential"]["audience"] == resource
    assert SECRET not in h.raw_log().decode()


def tls_server(pki: OidcPki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(pki.server_cert_path), str(pki.server_key_path))
    return ctx


async def scripted(pki: OidcPki, metadata: dict | None, metadata_path: str = "/meta") -> Upstream:
    """A TLS MCP server that answers every MCP request 401 pointing at ``metadata_path`` (served when given)."""
    server = Upstream()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/meta" and metadata is not None:
            return web.json_response({**metadata, "resource": metadata.get("resource") or f"{server_url}/mcp"})
        return web.Response(status=401, headers={"WWW-Authenticate": f'Bearer error="invalid_token", '
                                                                     f'resource_metadata="{server_url}{metadata_path}"'})

    server._handler = handler
    await server.start(tls_server(pki))
    server_url = f"https://127.0.0.1:{server.port}"
    return server


async def initialize(h) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{h.outbound}/tools", data=INITIALIZE, headers=JSON_IN) as r:
            return r.status, await r.json(content_type=None), dict(r.headers)


@pytest.mark.parametrize("metadata, path, upstream, reason", [
    # the metadata document is not there
    (None, "/meta", {}, "auth_metadata_unreachable"),
    # it names another resource than the upstream
    ({"resource": "https://elsewhere.example/mcp", "authorization_servers": ["ISSUER"]}, "/meta", {},
     "auth_metadata_refused"),
    # it names an authorization server this upstream does not allow
    ({"authorization_servers": ["https://rogue-idp.example"]}, "/meta", {}, "auth_metadata_refused"),
    # the upstream allows another issuer only
    ({"authorization_servers": ["ISSUER"]}, "/meta", {"authorization_servers": ["https://other-idp.example"]},
     "auth_metadata_refused"),
    # the token the issuer gave is refused by the server too
    ({"authorization_servers": ["ISSUER"]}, "/meta", {}, "auth_token_refused"),
])
async def test_a_failed_authorization_is_a_jsonrpc_error_and_the_agent_sees_no_challenge(
        make_sidecar, oidc_provider, oidc_pki, metadata, path, upstream, reason):
    """Metadata unreachable, naming another resource or issuer, or a token the server still refuses: a JSON-RPC error
    with a clear reason; the agent never sees WWW-Authenticate (issue 13 item 4)."""
    if metadata is not None:
        metadata = {k: [oidc_provider.issuer if s == "ISSUER" else s for s in v] if isinstance(v, list) else v
                    for k, v in metadata.items()}
    server = await scripted(oidc_pki, metadata, path)
    try:
        oidc_provider.add_resource(f"{server.url.replace('http:', 'https:')}/mcp")
        h = await make_sidecar(auth_config(oidc_provider, oidc_pki, f"https://127.0.0.1:{server.port}/mcp",
                                           **upstream), POLICY)
        status, answer, headers = await initialize(h)
        assert status == 200 and answer["error"]["data"]["reason"] == reason, answer
        assert "WWW-Authenticate" not in headers
        event = (await h.settle())[-1]
        assert (event["decision"], event["reason"], event["status"]) == ("deny", reason, 200)
        assert SECRET not in h.raw_log().decode()
    finally:
        await server.stop()


async def test_metadata_on_a_foreign_host_is_not_fetched(make_sidecar, oidc_provider, oidc_pki):
    """A 401 pointing at metadata on a host that is neither the upstream's nor an allowed issuer's is refused
    without fetching it (issue 13 item 4)."""
    server = await scripted(oidc_pki, None, "@")
    try:
        async def foreign(request: web.Request) -> web.Response:
            return web.Response(status=401, headers={
                "WWW-Authenticate": 'Bearer resource_metadata="https://metadata.attacker.example/meta"'})

        server._handler = foreign
        h = await make_sidecar(auth_config(oidc_provider, oidc_pki, f"https://127.0.0.1:{server.port}/mcp"), POLICY)
        status, answer, _ = await initialize(h)
        assert answer["error"]["data"]["reason"] == "auth_metadata_refused"
        assert "neither the upstream's host" in answer["error"]["message"]
    finally:
        await server.stop()
