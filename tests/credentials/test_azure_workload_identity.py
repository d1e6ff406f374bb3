"""azure_workload_identity: the token request the sidecar sends equals, field by field, the one azure-identity's
WorkloadIdentityCredential sends to the same local Entra ID authority, which checks the documented wire format
(issue 14 item 5)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import parse_qsl

import pytest
import trustme
from aiohttp import web
from azure.identity import WorkloadIdentityCredential

from sidecar.credentials.azure import AzureWorkloadIdentityProvider
from sidecar.credentials.base import ProviderDeps
from sidecar.errors import CredentialUnavailable
from tests.credentials.cloud import LocalCloud, ca_path, server_context
from tests.credentials.providers import AGENT_SPIFFE_ID, config_errors, parse_spec, request

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT = "8a2c1f0e-5b8e-4a4f-9d1c-3f2e1d0c9b8a"
SCOPE = "https://storage.azure.com/.default"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CHECKED = ("grant_type", "client_id", "client_assertion_type", "client_assertion", "scope")  # what Entra ID reads


class Authority(LocalCloud):
    """A local Entra ID authority: OpenID metadata, instance discovery and a token endpoint that answers only
    a client-credentials request whose client assertion is the projected token file's current content."""

    def __init__(self, token_file: Path) -> None:
        super().__init__()
        self.token_file = token_file
        self.forms: list[dict[str, str]] = []

    async def _token(self, request: web.Request) -> web.Response:
        assert request.path == f"/{TENANT}/oauth2/v2.0/token"
        assert request.content_type == "application/x-www-form-urlencoded"
        form = dict(parse_qsl((await request.read()).decode(), strict_parsing=True))
        self.forms.append(form)
        valid = (form.get("grant_type") == "client_credentials" and form.get("client_id") == CLIENT
                 and form.get("client_assertion_type") == JWT_BEARER and form.get("scope", "").endswith("/.default")
                 and form.get("client_assertion") == self.token_file.read_text().strip())
        if not valid:
            return web.json_response({"error": "invalid_client", "error_description": "AADSTS700024"}, status=400)
        return web.json_response({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599,
                                  "access_token": f"entra-token-{len(self.forms)}"})

    async def _metadata(self, request: web.Request) -> web.Response:
        base = f"{self.url}/{TENANT}"
        return web.json_response({"token_endpoint": f"{base}/oauth2/v2.0/token", "issuer": f"{base}/v2.0",
                                  "authorization_endpoint": f"{base}/oauth2/v2.0/authorize"})

    async def _discovery(self, request: web.Request) -> web.Response:
        host = f"127.0.0.1:{self.port}"
        metadata = f"{self.url}/{TENANT}/v2.0/.well-known/openid-configuration"
        return web.json_response({"tenant_discovery_endpoint": metadata, "metadata": [
            {"preferred_network": host, "preferred_cache": host, "aliases": [host]}]})

    def routes(self, app: web.Application) -> None:
        app.router.add_post(f"/{TENANT}/oauth2/v2.0/token", self._token)
        app.router.add_get(f"/{TENANT}/v2.0/.well-known/openid-configuration", self._metadata)
        app.router.add_get("/common/discovery/instance", self._discovery)


@pytest.fixture
def ca_file(upstream_ca: trustme.CA, tmp_path: Path) -> Path:
    return ca_path(upstream_ca, tmp_path)


@pytest.fixture
async def authority(upstream_ca: trustme.CA, tmp_path: Path) -> AsyncIterator[Authority]:
    token_file = tmp_path / "azure-identity-token"
    # as the kubelet writes a projected token: no trailing newline (azure-identity sends the file as it is)
    token_file.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6YWdlbnRzOmJpbGxpbmcifQ.c2ln")
    server = Authority(token_file)
    await server.start(server_context(upstream_ca))
    yield server
    await server.stop()


def provider_for(authority: Authority, ca_file: Path) -> AzureWorkloadIdentityProvider:
    spec = parse_spec("azure_workload_identity", {
        "tenant_id": TENANT, "client_id": CLIENT, "authority_host": authority.url, "ca": str(ca_file),
        "token_file": str(authority.token_file), "scopes": [SCOPE]})
    return AzureWorkloadIdentityProvider("azure", spec, ProviderDeps(agent_id=AGENT_SPIFFE_ID, id_key=b"k" * 32))


def azure_identity_token(authority: Authority, ca_file: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """What the reference client obtains (it runs blocking: call it in a thread)."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_file))
    credential = WorkloadIdentityCredential(tenant_id=TENANT, client_id=CLIENT, authority=authority.url,
                                            token_file_path=str(authority.token_file))
    return credential.get_token(SCOPE).token


async def test_the_sidecars_token_request_is_azure_identitys(authority, ca_file, monkeypatch) -> None:
    """Same grant, client, assertion type, assertion (the projected token) and scope as WorkloadIdentityCredential."""
    reference = await asyncio.to_thread(azure_identity_token, authority, ca_file, monkeypatch)
    provider = provider_for(authority, ca_file)
    try:
        credential = await provider.fetch(request())
    finally:
        await provider.aclose()
    assert reference == "entra-token-1" and credential.token is not None
    assert credential.token.reveal() == "entra-token-2" and credential.type == "azure_workload_identity"
    theirs, ours = authority.forms
    assert {k: ours.get(k) for k in CHECKED} == {k: theirs.get(k) for k in CHECKED}
    assert ours["client_assertion"] == authority.token_file.read_text().strip()


async def test_a_rotated_token_file_is_read_at_the_next_token_request(authority, ca_file) -> None:
    """The kubelet rewrites the projected token in place: the next fetch sends the new one."""
    provider = provider_for(authority, ca_file)
    try:
        await provider.fetch(request())
        authority.token_file.write_text("eyJhbGciOiJSUzI1NiJ9.eyJyb3RhdGVkIjp0cnVlfQ.c2ln")
        await provider.fetch(request())
    finally:
        await provider.aclose()
    assert [form["client_assertion"] for form in authority.forms] == [
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6YWdlbnRzOmJpbGxpbmcifQ.c2ln",
        "eyJhbGciOiJSUzI1NiJ9.eyJyb3RhdGVkIjp0cnVlfQ.c2ln"]


async def test_a_missing_token_file_is_credential_unavailable(authority, ca_file) -> None:
    """No projected token: nothing is sent, and the refusal names the file."""
    authority.token_file.unlink()
    provider = provider_for(authority, ca_file)
    try:
        with pytest.raises(CredentialUnavailable, match="cannot read the client assertion file"):
            await provider.fetch(request())
    finally:
        await provider.aclose()
    assert authority.forms == []


@pytest.mark.parametrize("change, error", [
    ({"scopes": ["https://storage.azure.com/user_impersonation"]}, "credentials.test.scopes: client credentials at "
                                                                   "Entra ID ask for a resource's /.default scope"),
    ({"scopes": []}, "credentials.test.scopes: is required"),
    ({"tenant_id": "a/b"}, "credentials.test.tenant_id: must be a tenant ID"),
    ({"authority_host": "http://login.example.com"}, "credentials.test.authority_host: must be an https URL"),
])
def test_a_bad_entry_is_a_config_error_with_its_path(change: dict[str, Any], error: str) -> None:
    raw = {"tenant_id": TENANT, "client_id": CLIENT, "scopes": [SCOPE], **change}
    errors = config_errors("azure_workload_identity", raw)
    assert any(e.startswith(error) for e in errors), errors
