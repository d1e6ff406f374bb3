"""gcp_workload_identity: the STS exchange and the generateAccessToken call the sidecar makes equal, field by
field, those google-auth's external-account credentials make against the same local STS and IAM endpoints,
which check GCP's documented wire format (issue 14 item 4)."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import parse_qsl

import jwt
import pytest
import requests
import trustme
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.auth import identity_pool
from google.auth.transport.requests import Request

from sidecar.credentials.base import ProviderDeps
from sidecar.credentials.cache import CredentialCache
from sidecar.credentials.gcp import GcpWorkloadIdentityProvider
from sidecar.errors import CredentialUnavailable
from sidecar.identity.signing import Signer, load_signing_key
from sidecar.observe.metrics import Metrics
from tests.credentials.cloud import LocalCloud, ca_path, server_context
from tests.credentials.providers import AGENT_SPIFFE_ID, ThreadSpy, config_errors, parse_spec, request

AUDIENCE = "//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/agents/providers/k8s-prod"
SERVICE_ACCOUNT = "billing-agent@example-project.iam.gserviceaccount.com"
SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"
TT_JWT = "urn:ietf:params:oauth:token-type:jwt"
TT_ACCESS = "urn:ietf:params:oauth:token-type:access_token"
STS_FIELDS = ("grant_type", "audience", "scope", "requested_token_type", "subject_token", "subject_token_type",
              "options", "client_id")  # what STS reads (google-auth sends no client and no options here)
IAM_FIELDS = ("scope", "lifetime", "delegates")
PROJECTED = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6YWdlbnRzOmJpbGxpbmcifQ.c2ln"


class Google(LocalCloud):
    """Local STS (``/v1/token``) and IAM Credentials (``generateAccessToken``) endpoints that answer only
    requests in the documented format, recording each."""

    def __init__(self, token_file: Path) -> None:
        super().__init__()
        self.token_file = token_file
        self.sts: list[dict[str, str]] = []
        self.iam: list[dict[str, Any]] = []

    async def _token(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-www-form-urlencoded"
        form = dict(parse_qsl((await request.read()).decode(), strict_parsing=True))
        self.sts.append(form)
        valid = (form.get("grant_type") == "urn:ietf:params:oauth:grant-type:token-exchange"
                 and form.get("audience") == AUDIENCE and form.get("subject_token_type") == TT_JWT
                 and form.get("requested_token_type") == TT_ACCESS and bool(form.get("scope"))
                 and bool(form.get("subject_token")) and "client_id" not in form
                 and "Authorization" not in request.headers)
        if not valid:
            return web.json_response({"error": "invalid_request"}, status=400)
        return web.json_response({"access_token": f"federated-{len(self.sts)}", "issued_token_type": TT_ACCESS,
                                  "token_type": "Bearer", "expires_in": 3600})

    async def _generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.iam.append(body)
        valid = (request.headers.get("Authorization", "").startswith("Bearer federated-")
                 and request.content_type == "application/json" and isinstance(body.get("scope"), list)
                 and re.fullmatch(r"\d+s", body.get("lifetime", "")) is not None)
        if not valid:
            return web.json_response({"error": {"code": 403, "status": "PERMISSION_DENIED"}}, status=403)
        expires = datetime.now(timezone.utc) + timedelta(seconds=int(body["lifetime"][:-1]))
        return web.json_response({"accessToken": f"sa-token-{len(self.iam)}",
                                  "expireTime": expires.strftime("%Y-%m-%dT%H:%M:%SZ")})

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/token", self._token)
        app.router.add_post(f"/v1/projects/-/serviceAccounts/{SERVICE_ACCOUNT}:generateAccessToken", self._generate)


@pytest.fixture
def ca_file(upstream_ca: trustme.CA, tmp_path: Path) -> Path:
    return ca_path(upstream_ca, tmp_path)


@pytest.fixture(autouse=True)
def requests_trusts_the_local_ca(ca_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """requests lets REQUESTS_CA_BUNDLE override a session's verify: point it at the local CA."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_file))


@pytest.fixture
async def google(upstream_ca: trustme.CA, tmp_path: Path) -> AsyncIterator[Google]:
    token_file = tmp_path / "gcp-token"
    token_file.write_text(PROJECTED)
    server = Google(token_file)
    await server.start(server_context(upstream_ca))
    yield server
    await server.stop()


def provider_for(google: Google, ca_file: Path, deps: ProviderDeps | None = None,
                 **extra: Any) -> GcpWorkloadIdentityProvider:
    raw = {"audience": AUDIENCE, "token_file": str(google.token_file), "scopes": [SCOPE],
           "sts_url": f"{google.url}/v1/token", "iam_url": google.url, "ca": str(ca_file), **extra}
    spec = parse_spec("gcp_workload_identity", {k: v for k, v in raw.items() if v is not None})
    return GcpWorkloadIdentityProvider("gcs", spec, deps or ProviderDeps(agent_id=AGENT_SPIFFE_ID, id_key=b"k" * 32))


def google_auth_token(google: Google, ca_file: Path, impersonate: bool) -> str:
    """What the reference client obtains (blocking: call it in a thread)."""
    info: dict[str, Any] = {"type": "external_account", "audience": AUDIENCE, "subject_token_type": TT_JWT,
                            "token_url": f"{google.url}/v1/token",
                            "credential_source": {"file": str(google.token_file)}}
    if impersonate:
        info["service_account_impersonation_url"] = (
            f"{google.url}/v1/projects/-/serviceAccounts/{SERVICE_ACCOUNT}:generateAccessToken")
    credentials = identity_pool.Credentials.from_info(info, scopes=[SCOPE])
    session = requests.Session()
    session.verify = str(ca_file)
    credentials.refresh(Request(session))
    return str(credentials.token)


async def fetched(provider: GcpWorkloadIdentityProvider) -> Any:
    try:
        return await provider.fetch(request())
    finally:
        await provider.aclose()


def fields(record: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {name: record.get(name) for name in names}


async def test_with_a_service_account_both_calls_are_google_auths(google, ca_file) -> None:
    """STS with the iam scope, then generateAccessToken with the requested scopes: as google-auth does it."""
    reference = await asyncio.to_thread(google_auth_token, google, ca_file, True)
    credential = await fetched(provider_for(google, ca_file, service_account=SERVICE_ACCOUNT))
    assert reference == "sa-token-1" and credential.token.reveal() == "sa-token-2"
    theirs, ours = google.sts
    assert fields(ours, STS_FIELDS) == fields(theirs, STS_FIELDS)
    assert ours["scope"] == "https://www.googleapis.com/auth/iam" and ours["subject_token"] == PROJECTED
    assert fields(google.iam[1], IAM_FIELDS) == fields(google.iam[0], IAM_FIELDS) == {
        "scope": [SCOPE], "lifetime": "3600s", "delegates": None}
    assert credential.type == "gcp_workload_identity" and credential.expires_at > time.time() + 3500


async def test_without_a_service_account_the_federated_token_is_the_credential(google, ca_file) -> None:
    """STS alone, asking for the requested scopes: google-auth's request, field by field."""
    reference = await asyncio.to_thread(google_auth_token, google, ca_file, False)
    credential = await fetched(provider_for(google, ca_file))
    assert (reference, credential.token.reveal()) == ("federated-1", "federated-2")
    theirs, ours = google.sts
    assert fields(ours, STS_FIELDS) == fields(theirs, STS_FIELDS) and ours["scope"] == SCOPE
    assert google.iam == []


async def test_the_sidecars_own_jwt_is_the_subject_token_without_a_token_file(google, ca_file, tmp_path) -> None:
    """No token_file: a JWT signed with identity.signing_key, sub the agent, aud the pool provider."""
    key_path = tmp_path / "signing.pem"
    key_path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    signing_key = load_signing_key(key_path, "gcp")
    deps = ProviderDeps(agent_id=AGENT_SPIFFE_ID, id_key=b"k" * 32, signer=Signer(signing_key, AGENT_SPIFFE_ID))
    await fetched(provider_for(google, ca_file, deps, token_file=None))
    claims = jwt.decode(google.sts[0]["subject_token"], signing_key.private.public_key(), algorithms=["ES256"],
                        audience=AUDIENCE)
    assert claims["sub"] == AGENT_SPIFFE_ID and claims["exp"] - claims["iat"] == 300


async def test_the_subject_token_file_is_never_read_on_the_loop(google, ca_file, monkeypatch) -> None:
    """The projected token is read in a worker thread, as AWS's web identity token file is: a slow volume
    on the loop would stall every exchange."""
    read = ThreadSpy(Path.read_text)
    monkeypatch.setattr(Path, "read_text", lambda path, *args, **kwargs: read(path, *args, **kwargs))
    await fetched(provider_for(google, ca_file))
    assert read.threads and not read.on_loop()
    assert google.sts[0]["subject_token"] == PROJECTED


async def test_an_outage_serves_the_cached_token_then_refuses(google, ca_file) -> None:
    """The cache keeps serving while the token is fresh; once it expires with STS down, credential_unavailable."""
    skew = [0.0]
    clock = lambda: time.time() + skew[0]  # noqa: E731
    deps = ProviderDeps(agent_id=AGENT_SPIFFE_ID, id_key=b"k" * 32, clock=clock)
    provider = provider_for(google, ca_file, deps)
    cache = CredentialCache(Metrics(), clock=clock, monotonic=clock)
    try:
        first, _ = await cache.get(provider, request())
        await google.stop()
        skew[0] = 1800  # half way: still the cached token, nothing asked
        assert (await cache.get(provider, request()))[0].token.reveal() == first.token.reveal()
        skew[0] = 3700  # expired, and STS unreachable
        with pytest.raises(CredentialUnavailable) as refused:
            await cache.get(provider, request())
        assert refused.value.reason == "credential_unavailable" and "unreachable" in str(refused.value)
    finally:
        await cache.aclose()
        await provider.aclose()
    assert len(google.sts) == 1


@pytest.mark.parametrize("change, error", [
    ({"audience": "//iam.googleapis.com/projects/p/pools/x"},
     "credentials.test.audience: must be a workload identity pool provider"),
    ({"service_account": "agent@example.com"}, "credentials.test.service_account: must be a service account email"),
    ({"lifetime": "13h"}, "credentials.test.lifetime: must be between 1m and 12h"),
    ({"sts_url": "http://sts.example.com/v1/token"}, "credentials.test.sts_url: must be an https URL"),
])
def test_a_bad_entry_is_a_config_error_with_its_path(change: dict[str, Any], error: str) -> None:
    errors = config_errors("gcp_workload_identity", {"audience": AUDIENCE, **change})
    assert any(e.startswith(error) for e in errors), errors
