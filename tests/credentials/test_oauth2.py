"""oauth2_client_credentials against a real oidc-provider: the four client authentication
methods, JWT access tokens per resource, certificate-bound tokens, and every refusal."""

from __future__ import annotations

import base64
import shutil
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web

from sidecar.credentials import oauth2, token_endpoint
from sidecar.credentials.base import ProviderDeps
from sidecar.errors import CredentialUnavailable
from sidecar.identity.signing import load_signing_key
from sidecar.identity.source import IdentitySource
from sidecar.observe.metrics import Metrics
from sidecar.reload import Reloader
from tests.credentials.providers import (ID_KEY, WRONG_SECRET, Make, ThreadSpy, b64url_to_hex, client_config,
                                         config_errors, outbound, parse_spec, request)
from tests.harness import Upstream
from tests.peers.oidc import AGENT_SPIFFE_ID, BILLING, CRM, OidcProvider, verify_access_token

pytestmark = pytest.mark.peer("oidc-provider")


# ---------------------------------------------------------------- every client auth method


@pytest.mark.parametrize("client_id", ["svc-basic", "svc-post", "svc-jwt", "svc-mtls"])
async def test_every_auth_method_gets_a_bearer_token(
    oidc_provider: OidcProvider, make: Make, svid: IdentitySource, client_id: str
) -> None:
    """Each auth method gets a JWT access token for the resource, and apply sends it as Bearer."""
    provider = make(client_config(oidc_provider, client_id, resource=BILLING, scopes=["invoices.read"]))
    credential = await provider.fetch(request())
    token = credential.token.reveal()
    claims = verify_access_token(oidc_provider, token, BILLING)
    assert claims["client_id"] == client_id and claims["scope"] == "invoices.read"
    assert (credential.type, credential.audience, credential.scopes) == ("oauth2_client_credentials", BILLING, ("invoices.read",))
    assert credential.id == claims["jti"] and not credential.standing
    assert credential.expires_at is not None and credential.issued_at is not None
    assert 250 < credential.expires_at - credential.issued_at <= 300  # the peer issues 300 s tokens
    out = outbound(svid.state.cert_sha256)
    provider.apply(out, credential)
    assert out.headers.getall("Authorization") == [f"Bearer {token}"]
    assert token not in repr(credential)


async def test_tokens_are_minted_per_resource(oidc_provider: OidcProvider, make: Make) -> None:
    """A provider for CRM gets tokens whose aud is CRM, not BILLING."""
    provider = make(client_config(oidc_provider, "svc-basic", resource=CRM, scopes=["crm.read"]))
    credential = await provider.fetch(request())
    assert verify_access_token(oidc_provider, credential.token.reveal(), CRM)["aud"] == CRM
    with pytest.raises(jwt.InvalidAudienceError):
        verify_access_token(oidc_provider, credential.token.reveal(), BILLING)


async def test_a_requested_resource_overrides_the_configured_one_and_keys_the_cache(
    oidc_provider: OidcProvider, make: Make
) -> None:
    """A request naming a resource (an MCP server's metadata, RFC 8707) gets a token for it, and caches apart
    (issue 13 item 4)."""
    provider = make(client_config(oidc_provider, "svc-basic", resource=BILLING, scopes=["crm.read"]))
    credential = await provider.fetch(request(resource=CRM))
    assert verify_access_token(oidc_provider, credential.token.reveal(), CRM)["aud"] == CRM
    assert credential.audience == CRM
    assert provider.cache_key(request(resource=CRM)) != provider.cache_key(request())


async def test_a_rule_narrows_the_requested_scopes(oidc_provider: OidcProvider, make: Make) -> None:
    """The rule's scopes replace the configured ones in the request and in the cache key."""
    provider = make(client_config(oidc_provider, "svc-post", resource=BILLING,
                                  scopes=["invoices.read", "invoices.write"]))
    narrowed = request(("invoices.read",))
    assert provider.cache_key(narrowed) != provider.cache_key(request())
    credential = await provider.fetch(narrowed)
    assert credential.scopes == ("invoices.read",)
    assert verify_access_token(oidc_provider, credential.token.reveal(), BILLING)["scope"] == "invoices.read"
    wide = await provider.fetch(request())
    assert wide.scopes == ("invoices.read", "invoices.write")


async def test_the_token_endpoints_tls_context_is_never_built_on_the_loop(
    oidc_provider: OidcProvider, make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building the token client's TLS context (~120 ms with the system trust store) happens in a worker
    thread (here with the SVID for tls_client_auth): on the loop it would stall every exchange."""
    context = ThreadSpy(token_endpoint.client_ssl_context)
    monkeypatch.setattr(token_endpoint, "client_ssl_context", context)
    await make(client_config(oidc_provider, "svc-mtls", resource=BILLING)).fetch(request())
    assert context.threads and not context.on_loop()


# ---------------------------------------------------------------- private_key_jwt


async def test_each_fetch_signs_a_fresh_client_assertion(
    oidc_provider: OidcProvider, make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """private_key_jwt: iss = sub = client_id, aud = the issuer, 60 s, and a new jti per fetch."""
    provider = make(client_config(oidc_provider, "svc-jwt", resource=BILLING))
    seen: list[str] = []
    original = provider.endpoint.client_assertion
    monkeypatch.setattr(provider.endpoint, "client_assertion", lambda: seen.append(original()) or seen[-1])
    await provider.fetch(request())
    await provider.fetch(request())
    public = load_signing_key(oidc_provider.jwt_client_key.path, None).private.public_key()
    claims = [jwt.decode(a, public, algorithms=["ES256"], audience=oidc_provider.issuer) for a in seen]
    assert [(c["iss"], c["sub"]) for c in claims] == [("svc-jwt", "svc-jwt")] * 2
    assert all(c["exp"] - c["iat"] == 60 for c in claims)
    assert claims[0]["jti"] != claims[1]["jti"]


async def test_a_replayed_client_assertion_is_refused_by_the_server(
    oidc_provider: OidcProvider, make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sending the same assertion twice gets invalid_client the second time (the jti is spent)."""
    provider = make(client_config(oidc_provider, "svc-jwt", resource=BILLING))
    fixed = provider.endpoint.client_assertion()
    monkeypatch.setattr(provider.endpoint, "client_assertion", lambda: fixed)
    await provider.fetch(request())
    with pytest.raises(CredentialUnavailable) as refused:
        await provider.fetch(request())
    assert refused.value.detail is not None and "invalid_client" in refused.value.detail
    assert fixed not in str(refused.value) + refused.value.detail


# ---------------------------------------------------------------- client_assertion_file


async def test_an_externally_issued_assertion_file_authenticates_and_is_reread_when_it_rotates(
    oidc_provider: OidcProvider, make: Make, tmp_path: Path
) -> None:
    """auth: client_assertion_file sends the file's JWT (made here by the key the server registered for the
    client, as another issuer would) as a jwt-bearer client assertion; the real server accepts it once (its
    jti is then spent), and accepts the rotated file's next one (issue 14 item 5)."""
    key = load_signing_key(oidc_provider.jwt_client_key.path, None).private
    now = int(time.time())

    def issue(jti: str) -> str:
        claims = {"iss": "svc-jwt", "sub": "svc-jwt", "aud": oidc_provider.issuer, "jti": jti, "iat": now,
                  "exp": now + 300}
        return jwt.encode(claims, key, algorithm="ES256")

    assertion = tmp_path / "assertion.jwt"
    assertion.write_text(issue("external-1"))
    provider = make(client_config(oidc_provider, "svc-jwt", resource=BILLING, auth="client_assertion_file",
                                  assertion_file=str(assertion)))
    first = await provider.fetch(request())
    with pytest.raises(CredentialUnavailable) as refused:  # the same file again: the server saw that jti
        await provider.fetch(request())
    assert refused.value.detail is not None and "invalid_client" in refused.value.detail
    assertion.write_text(issue("external-2"))
    second = await provider.fetch(request())
    assert first.token is not None and second.token is not None and first.token.reveal() != second.token.reveal()
    assert verify_access_token(oidc_provider, second.token.reveal(), BILLING)["aud"] == BILLING


async def test_assertion_audience_defaults_to_the_token_url(oidc_provider: OidcProvider, make: Make) -> None:
    """Without issuer: the assertion's aud is the token endpoint, which the server accepts too."""
    raw = client_config(oidc_provider, "svc-jwt", resource=BILLING)
    del raw["issuer"]
    provider = make(raw)
    claims = jwt.decode(provider.endpoint.client_assertion(), options={"verify_signature": False})
    assert claims["aud"] == oidc_provider.token_url
    assert (await provider.fetch(request())).audience == BILLING


# ---------------------------------------------------------------- refusals from the token endpoint


@pytest.mark.parametrize("client_id", ["svc-basic", "svc-post"])
async def test_a_wrong_secret_is_invalid_client_and_never_shown(
    oidc_provider: OidcProvider, make: Make, client_id: str
) -> None:
    """A wrong secret is refused with detail invalid_client; the secret is in no message or repr."""
    provider = make(client_config(oidc_provider, client_id, client_secret={"value": WRONG_SECRET}))
    with pytest.raises(CredentialUnavailable) as refused:
        await provider.fetch(request())
    exc = refused.value
    assert exc.reason == "credential_unavailable" and exc.status == 503
    assert exc.detail is not None and exc.detail.startswith("token endpoint: invalid_client (http 401)")
    assert exc.message == "credentials: test: token endpoint refused the request"
    for text in (str(exc), repr(exc), exc.detail, repr(provider), repr(provider.spec)):
        assert WRONG_SECRET not in text


async def test_an_unknown_resource_is_invalid_target(oidc_provider: OidcProvider, make: Make) -> None:
    """RFC 8707 §2: a resource the server does not know is refused, and the code is the detail."""
    provider = make(client_config(oidc_provider, "svc-basic", resource="https://unknown.internal/"))
    with pytest.raises(CredentialUnavailable) as refused:
        await provider.fetch(request())
    assert refused.value.detail is not None
    assert refused.value.detail.startswith("token endpoint: invalid_target (http 400)")


@pytest.mark.parametrize(
    ("requested", "granted"),
    [
        (("invoices.read", "admin.everything"), ("invoices.read",)),  # the response's scope names what was granted
        (("crm.read",), ()),  # nothing granted for BILLING: no scope in the response, none in the JWT
    ],
)
async def test_the_credential_records_the_scopes_granted(
    oidc_provider: OidcProvider, make: Make, requested: tuple[str, ...], granted: tuple[str, ...]
) -> None:
    """oidc-provider drops scopes it will not grant; the credential says what was granted, not asked."""
    provider = make(client_config(oidc_provider, "svc-basic", resource=BILLING))
    assert (await provider.fetch(request(requested))).scopes == granted


async def test_an_outage_is_temporarily_unavailable(oidc_provider: OidcProvider, make: Make) -> None:
    """While the token endpoint answers 503, fetch says temporarily_unavailable."""
    provider = make(client_config(oidc_provider, "svc-basic", resource=BILLING))
    oidc_provider.outage(True, retry_after=1)
    try:
        with pytest.raises(CredentialUnavailable) as refused:
            await provider.fetch(request())
    finally:
        oidc_provider.outage(False)
    assert refused.value.detail is not None
    assert refused.value.detail.startswith("token endpoint: temporarily_unavailable (http 503)")


async def test_an_unreachable_token_endpoint_is_unavailable(
    oidc_provider: OidcProvider, make: Make, unused_tcp_port: int
) -> None:
    """Nothing listening at token_url: credential_unavailable, saying unreachable."""
    provider = make(client_config(oidc_provider, "svc-basic", token_url=f"https://127.0.0.1:{unused_tcp_port}/token"))
    with pytest.raises(CredentialUnavailable, match="token endpoint unreachable"):
        await provider.fetch(request())


async def test_a_token_endpoint_that_does_not_answer_in_time_is_unavailable(
    oidc_provider: OidcProvider, make: Make
) -> None:
    """A token request held at the server beyond timeout: credential_unavailable, saying timed out."""
    provider = make(client_config(oidc_provider, "svc-basic", timeout="300ms"))
    oidc_provider.hold(True)
    try:
        with pytest.raises(CredentialUnavailable, match="token endpoint timed out") as refused:
            await provider.fetch(request())
    finally:
        oidc_provider.hold(False)
    assert refused.value.detail == "token endpoint: timeout after 300ms"


async def test_a_token_endpoint_with_an_untrusted_certificate_is_refused(
    oidc_provider: OidcProvider, make: Make
) -> None:
    """Without the peer's CA the TLS handshake fails: verification is never off."""
    raw = client_config(oidc_provider, "svc-basic")
    del raw["ca"]
    provider = make(raw)
    with pytest.raises(CredentialUnavailable) as refused:
        await provider.fetch(request())
    assert refused.value.detail == "token endpoint: tls certificate verification failed"


# ---------------------------------------------------------------- tls_client_auth and bound tokens


async def test_tls_client_auth_token_is_bound_and_refused_elsewhere(
    oidc_provider: OidcProvider, make: Make, svid: IdentitySource
) -> None:
    """A cert-bound token records the SVID thumbprint; apply refuses a connection without it."""
    provider = make(client_config(oidc_provider, "svc-mtls", resource=BILLING))
    credential = await provider.fetch(request())
    claims = verify_access_token(oidc_provider, credential.token.reveal(), BILLING)
    assert credential.bound_cert_sha256 == b64url_to_hex(claims["cnf"]["x5t#S256"]) == svid.state.cert_sha256
    for presented in (None, "00" * 32):  # a plain TLS upstream; another certificate
        out = outbound(presented)
        with pytest.raises(CredentialUnavailable, match="bound to this sidecar's certificate"):
            provider.apply(out, credential)
        assert "Authorization" not in out.headers
    out = outbound(svid.state.cert_sha256)
    provider.apply(out, credential)
    assert out.headers["Authorization"] == "Bearer " + credential.token.reveal()


async def test_a_rotated_svid_gets_a_new_token_bound_to_it(
    oidc_provider: OidcProvider, make: Make, svid: IdentitySource
) -> None:
    """After an SVID rotation the cache key changes and the next token is bound to the new cert."""
    provider = make(client_config(oidc_provider, "svc-mtls", resource=BILLING))
    before = provider.cache_key(request())
    first = await provider.fetch(request())
    reloader = Reloader(svid, Metrics().identity_reloads)
    rotated = oidc_provider.pki.issue_client_cert("agent-rotated")
    cert_path, key_path = svid.client_files()
    shutil.copy(rotated.cert_path, cert_path)
    shutil.copy(rotated.key_path, key_path)
    assert reloader.check()
    assert provider.cache_key(request()) != before
    second = await provider.fetch(request())
    assert second.bound_cert_sha256 == b64url_to_hex(rotated.thumbprint) != first.bound_cert_sha256


async def test_tls_client_auth_without_an_svid_is_unavailable(
    oidc_provider: OidcProvider, make: Make, deps: ProviderDeps
) -> None:
    """No SVID loaded: tls_client_auth cannot authenticate, and says so."""
    no_svid = ProviderDeps(agent_id=deps.agent_id, signer=deps.signer, svid=None, id_key=ID_KEY)
    provider = make(client_config(oidc_provider, "svc-mtls"), provider_deps=no_svid)
    with pytest.raises(CredentialUnavailable, match="tls_client_auth needs this sidecar's SVID"):
        await provider.fetch(request())


@pytest.mark.parametrize("auth", ["client_secret_basic", "client_secret_post"])
async def test_an_error_description_repeating_the_client_secret_never_shows_it(auth: str) -> None:
    """A token endpoint that echoes the secret it was sent: redacted whether it came in the form or the header."""
    async def echo(req: web.Request) -> web.Response:
        basic = base64.b64decode(req.headers.get("Authorization", "Basic Og==").removeprefix("Basic ")).decode()
        sent = (await req.post()).get("client_secret") or basic.partition(":")[2]
        return web.json_response({"error": "invalid_client", "error_description": f"bad secret {sent}"}, status=401)

    server = await Upstream(echo).start()
    raw = {"token_url": f"{server.url}/token", "client_id": "c", "auth": auth, "client_secret": {"value": "s3cr"}}
    spec = parse_spec("oauth2_client_credentials", raw)
    provider = oauth2.ClientCredentialsProvider("test", spec, ProviderDeps(agent_id=AGENT_SPIFFE_ID, id_key=ID_KEY))
    try:
        with pytest.raises(CredentialUnavailable) as refused:
            await provider.fetch(request())
    finally:
        await provider.aclose()
        await server.stop()
    assert refused.value.detail == "token endpoint: invalid_client (http 401): bad secret <redacted>"


# ---------------------------------------------------------------- configuration


BASE = {"token_url": "https://login.example.com/token", "client_id": "billing-agent", "auth": "private_key_jwt"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({**BASE, "token_url": "http://login.example.com/token"},
         "credentials.test.token_url: must be an https URL (http is allowed only on loopback hosts)"),
        ({**BASE, "auth": "client_secret_basic"}, "credentials.test.client_secret: is required"),
        ({**BASE, "client_secret": {"value": "s3cret-value"}},
         "credentials.test.client_secret: is only used with auth client_secret_basic or client_secret_post, "
         "not private_key_jwt"),
        ({**BASE, "resource": "https://a/", "audience": "b"},
         "credentials.test: needs at most one of resource: URI or audience: NAME"),
        ({**BASE, "resource": "billing"},
         "credentials.test.resource: must be an absolute URI without a fragment (RFC 8707)"),
        ({**BASE, "scopes": ["a b"]},
         "credentials.test.scopes: scope names cannot contain spaces, double quotes or backslashes"),
        ({**BASE, "auth": "none"}, "credentials.test.auth: must be one of client_secret_basic, client_secret_post, "
                                   "private_key_jwt, tls_client_auth, client_assertion_file, got 'none'"),
        ({**BASE, "timeout": "5m"}, "credentials.test.timeout: must be more than 0s and at most 60s"),
        ({**BASE, "client_secrett": 1}, "credentials.test.client_secrett: unknown key"),
        ({**BASE, "auth": "client_assertion_file"}, "credentials.test.assertion_file: is required"),
        ({**BASE, "assertion_file": "/token"},
         "credentials.test.assertion_file: is only used with auth client_assertion_file, not private_key_jwt"),
    ],
)
def test_config_errors_name_their_path(raw: dict[str, Any], expected: str) -> None:
    """Each invalid entry is refused with its path and what was expected."""
    assert config_errors("oauth2_client_credentials", raw) == [expected]


def test_http_token_url_is_allowed_on_loopback_and_signing_key_only_for_private_key_jwt() -> None:
    """A loopback token endpoint may be plain http; only private_key_jwt needs identity.signing_key."""
    spec = parse_spec("oauth2_client_credentials", {**BASE, "token_url": "http://127.0.0.1:9000/token", "scopes": ["a"]})
    assert spec.needs_signing_key and spec.scopes == ("a",) and spec.endpoint.timeout == 10.0
    basic = parse_spec("oauth2_client_credentials", {**BASE, "auth": "client_secret_basic", "client_secret": {"value": "s3cret-value"}})
    assert not basic.needs_signing_key and "s3cret-value" not in repr(basic)
    assert parse_spec("oauth2_client_credentials", {k: v for k, v in BASE.items() if k != "auth"} | {
        "client_secret": {"value": "s3cret-value"}}).endpoint.auth == "client_secret_basic"
