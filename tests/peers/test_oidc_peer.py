"""The oidc-provider peer works, shown with plain requests/aiohttp and PyJWT (no sidecar code)."""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import jwt
import pytest
import requests

from tests.peers.oidc import (
    ACTOR_ISSUERS,
    AGENT_SPIFFE_ID,
    BILLING,
    CRM,
    JWT_BEARER_ASSERTION,
    TOKEN_EXCHANGE,
    TT_ACCESS_TOKEN,
    TT_JWT,
    OidcProvider,
    SigningKey,
    verify_access_token,
)

pytestmark = pytest.mark.peer("oidc-provider")


# ---------------------------------------------------------------- helpers


def post_token(peer: OidcProvider, data: dict[str, str], **kwargs: Any) -> requests.Response:
    """POST form ``data`` to the token endpoint, trusting the peer's CA."""
    return requests.post(peer.token_url, data=data, verify=str(peer.ca_path), timeout=10, **kwargs)


def signed_jwt(key: SigningKey, claims: dict[str, Any], ttl: int = 60) -> str:
    """An ES256 JWT with fresh iat/exp/jti, signed by ``key``."""
    now = int(time.time())
    payload = {"iat": now, "exp": now + ttl, "jti": uuid.uuid4().hex, **claims}
    return jwt.encode(payload, key.private_pem, algorithm="ES256", headers={"kid": key.kid})


def client_assertion(peer: OidcProvider) -> str:
    """A private_key_jwt assertion for svc-jwt, audience = the token endpoint."""
    claims = {"iss": "svc-jwt", "sub": "svc-jwt", "aud": peer.token_url}
    return signed_jwt(peer.jwt_client_key, claims)


def actor_token(peer: OidcProvider, **overrides: Any) -> str:
    """A JWT naming the agent as actor, signed by the configured actor key."""
    claims = {"iss": ACTOR_ISSUERS[0], "sub": AGENT_SPIFFE_ID, "aud": peer.issuer, **overrides}
    return signed_jwt(peer.actor_key, claims)


def client_credentials(resource: str = BILLING, scope: str = "invoices.read") -> dict[str, str]:
    """A client_credentials form for one resource."""
    return {"grant_type": "client_credentials", "resource": resource, "scope": scope}


def exchange_form(subject_token: str, **extra: str) -> dict[str, str]:
    """An RFC 8693 token exchange form for the CRM resource."""
    form = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject_token,
        "subject_token_type": TT_ACCESS_TOKEN,
        "resource": CRM,
        "scope": "crm.read",
    }
    return {**form, **extra}


def exchange(peer: OidcProvider, form: dict[str, str]) -> requests.Response:
    """Run a token exchange as svc-exchange (client_secret_basic)."""
    return post_token(peer, form, auth=("svc-exchange", peer.secret("svc-exchange")))


def log_mark(peer: OidcProvider) -> int:
    """The current size of the peer's log."""
    assert peer.log_path is not None
    return peer.log_path.stat().st_size


def log_since(peer: OidcProvider, mark: int) -> str:
    """What the peer logged after ``mark``."""
    assert peer.log_path is not None
    with peer.log_path.open("rb") as log:
        log.seek(mark)
        return log.read().decode(errors="replace")


def ssl_context(peer: OidcProvider) -> ssl.SSLContext:
    """A client TLS context trusting the peer's CA."""
    return ssl.create_default_context(cafile=str(peer.ca_path))


# ---------------------------------------------------------------- discovery


def test_discovery_advertises_the_endpoints_and_methods(oidc_provider: OidcProvider) -> None:
    """Discovery names the token endpoint, the JWKS, the four auth methods and token exchange."""
    doc = requests.get(
        oidc_provider.discovery_url, verify=str(oidc_provider.ca_path), timeout=10
    ).json()
    assert doc["issuer"] == oidc_provider.issuer
    assert doc["token_endpoint"] == oidc_provider.token_url
    assert doc["jwks_uri"] == oidc_provider.jwks_uri
    methods = {"client_secret_basic", "client_secret_post", "private_key_jwt", "tls_client_auth"}
    assert methods <= set(doc["token_endpoint_auth_methods_supported"])
    assert TOKEN_EXCHANGE in doc["grant_types_supported"]
    assert doc["tls_client_certificate_bound_access_tokens"] is True


# ---------------------------------------------------------------- client_credentials


def _basic(peer: OidcProvider) -> tuple[dict[str, str], dict[str, Any]]:
    return {}, {"auth": ("svc-basic", peer.secret("svc-basic"))}


def _post(peer: OidcProvider) -> tuple[dict[str, str], dict[str, Any]]:
    return {"client_id": "svc-post", "client_secret": peer.secret("svc-post")}, {}


def _private_key_jwt(peer: OidcProvider) -> tuple[dict[str, str], dict[str, Any]]:
    form = {
        "client_assertion_type": JWT_BEARER_ASSERTION,
        "client_assertion": client_assertion(peer),
    }
    return form, {}


def _tls_client_auth(peer: OidcProvider) -> tuple[dict[str, str], dict[str, Any]]:
    return {"client_id": "svc-mtls"}, {"cert": peer.mtls_cert.requests_cert}


AuthFactory = Callable[[OidcProvider], tuple[dict[str, str], dict[str, Any]]]


@pytest.mark.parametrize(
    ("client_id", "authenticate"),
    [
        ("svc-basic", _basic),  # RFC 6749 2.3.1: HTTP Basic
        ("svc-post", _post),  # RFC 6749 2.3.1: credentials in the body
        ("svc-jwt", _private_key_jwt),  # RFC 7523 / OIDC Core 9: signed assertion
        ("svc-mtls", _tls_client_auth),  # RFC 8705 2.1: PKI client certificate
    ],
)
def test_each_auth_method_gets_a_jwt_access_token_for_the_resource(
    oidc_provider: OidcProvider, client_id: str, authenticate: AuthFactory
) -> None:
    """Each client auth method gets an at+jwt for the resource that verifies against the JWKS."""
    form, kwargs = authenticate(oidc_provider)
    response = post_token(oidc_provider, {**client_credentials(), **form}, **kwargs)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer" and body["scope"] == "invoices.read"
    claims = verify_access_token(oidc_provider, body["access_token"], BILLING)
    assert claims["sub"] == claims["client_id"] == client_id
    assert claims["aud"] == BILLING and claims["scope"] == "invoices.read"


def test_scopes_are_narrowed_to_the_resource(oidc_provider: OidcProvider) -> None:
    """Scopes that belong to another resource are left out of the token."""
    form = client_credentials(BILLING, "invoices.read invoices.write crm.read")
    response = post_token(
        oidc_provider, form, auth=("svc-basic", oidc_provider.secret("svc-basic"))
    )
    claims = verify_access_token(oidc_provider, response.json()["access_token"], BILLING)
    assert claims["scope"] == "invoices.read invoices.write"


def test_unknown_resource_is_invalid_target(oidc_provider: OidcProvider) -> None:
    """A resource the server does not know is refused with invalid_target."""
    form = client_credentials("https://unknown.internal/")
    response = post_token(
        oidc_provider, form, auth=("svc-basic", oidc_provider.secret("svc-basic"))
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_target"


@pytest.mark.parametrize(
    ("form", "auth"),
    [
        ({}, ("svc-basic", "wrong-secret")),  # Basic with a wrong secret
        (
            {"client_id": "svc-post", "client_secret": "wrong-secret"},
            None,
        ),  # body with a wrong secret
        ({}, ("nobody", "wrong-secret")),  # unknown client
    ],
)
def test_wrong_secret_is_invalid_client(
    oidc_provider: OidcProvider, form: dict[str, str], auth: tuple[str, str] | None
) -> None:
    """A wrong secret or unknown client gets 401 invalid_client."""
    response = post_token(oidc_provider, {**client_credentials(), **form}, auth=auth)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


def test_replayed_client_assertion_is_refused(oidc_provider: OidcProvider) -> None:
    """A private_key_jwt assertion works once; the same jti a second time is invalid_client."""
    form = {
        **client_credentials(),
        "client_assertion_type": JWT_BEARER_ASSERTION,
        "client_assertion": client_assertion(oidc_provider),
    }
    assert post_token(oidc_provider, form).status_code == 200
    replay = post_token(oidc_provider, form)
    assert replay.status_code == 401
    assert replay.json()["error"] == "invalid_client"


def test_client_assertion_signed_by_another_key_is_refused(oidc_provider: OidcProvider) -> None:
    """An assertion signed by a key that is not svc-jwt's registered key is invalid_client."""
    claims = {"iss": "svc-jwt", "sub": "svc-jwt", "aud": oidc_provider.token_url}
    forged = signed_jwt(oidc_provider.actor_key, claims)
    form = {
        **client_credentials(),
        "client_assertion_type": JWT_BEARER_ASSERTION,
        "client_assertion": forged,
    }
    response = post_token(oidc_provider, form)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


# ---------------------------------------------------------------- tls_client_auth


def test_tls_client_auth_token_is_bound_to_the_certificate(oidc_provider: OidcProvider) -> None:
    """A tls_client_auth token carries cnf.x5t#S256 = the client certificate's thumbprint."""
    form, kwargs = _tls_client_auth(oidc_provider)
    response = post_token(oidc_provider, {**client_credentials(), **form}, **kwargs)
    claims = verify_access_token(oidc_provider, response.json()["access_token"], BILLING)
    assert claims["cnf"] == {"x5t#S256": oidc_provider.mtls_cert.thumbprint}


@pytest.mark.parametrize(
    ("which", "reason"),
    [
        ("none", "client certificate was not provided"),
        ("untrusted", "client certificate was not verified"),  # right SPIFFE ID, CA not trusted
        (
            "wrong-spiffe-id",
            "certificate subject value does not match",
        ),  # trusted CA, another workload
    ],
)
def test_tls_client_auth_refuses_bad_certificates(
    oidc_provider: OidcProvider, which: str, reason: str
) -> None:
    """tls_client_auth needs a trusted certificate with the registered SPIFFE ID, else 401."""
    pki = oidc_provider.pki
    certs = {
        "none": None,
        "untrusted": pki.issue_client_cert("rogue", trusted=False),
        "wrong-spiffe-id": pki.issue_client_cert(
            "other", "spiffe://example.org/ns/agents/sa/other"
        ),
    }
    cert = certs[which]
    kwargs = {"cert": cert.requests_cert} if cert else {}
    mark = log_mark(oidc_provider)
    response = post_token(
        oidc_provider, {**client_credentials(), "client_id": "svc-mtls"}, **kwargs
    )
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    assert reason in log_since(
        oidc_provider, mark
    )  # the response hides why; the server log says it


# ---------------------------------------------------------------- human tokens and token exchange


def test_user_token_names_the_human_and_the_app(oidc_provider: OidcProvider) -> None:
    """user_token() mints a verifiable at+jwt whose sub is the human and client_id the app."""
    token = oidc_provider.user_token("alice@example.com", claims={"email": "alice@example.com"})
    claims = verify_access_token(oidc_provider, token, BILLING)
    assert claims["sub"] == "alice@example.com"
    assert claims["client_id"] == "web-app"
    assert claims["email"] == "alice@example.com"


def test_token_exchange_with_an_actor_names_both(oidc_provider: OidcProvider) -> None:
    """Exchanging a human's token with an actor token gives sub = human, act.sub = actor."""
    subject = oidc_provider.user_token("alice@example.com")
    response = exchange(
        oidc_provider,
        exchange_form(subject, actor_token=actor_token(oidc_provider), actor_token_type=TT_JWT),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["issued_token_type"] == TT_ACCESS_TOKEN and body["token_type"] == "Bearer"
    claims = verify_access_token(oidc_provider, body["access_token"], CRM)
    assert claims["sub"] == "alice@example.com"
    assert claims["act"] == {"sub": AGENT_SPIFFE_ID}
    assert claims["client_id"] == "svc-exchange" and claims["scope"] == "crm.read"


def test_token_exchange_keeps_an_earlier_actor_nested(oidc_provider: OidcProvider) -> None:
    """A subject token that already has an act claim ends up nested under the new actor."""
    subject = oidc_provider.user_token(
        "alice@example.com", act={"sub": "spiffe://example.org/front"}
    )
    form = exchange_form(subject, actor_token=actor_token(oidc_provider), actor_token_type=TT_JWT)
    claims = verify_access_token(
        oidc_provider, exchange(oidc_provider, form).json()["access_token"], CRM
    )
    assert claims["act"] == {"sub": AGENT_SPIFFE_ID, "act": {"sub": "spiffe://example.org/front"}}


def test_token_exchange_without_actor_is_impersonation(oidc_provider: OidcProvider) -> None:
    """Without an actor token the new token names only the human."""
    subject = oidc_provider.user_token("alice@example.com")
    claims = verify_access_token(
        oidc_provider, exchange(oidc_provider, exchange_form(subject)).json()["access_token"], CRM
    )
    assert claims["sub"] == "alice@example.com" and "act" not in claims


def test_token_exchange_accepts_the_external_issuer(oidc_provider: OidcProvider) -> None:
    """A subject token from the configured external issuer is accepted like the provider's own."""
    subject = signed_jwt(
        oidc_provider.external_idp_key,
        {"iss": oidc_provider.external_issuer, "sub": "bob@example.com", "aud": "billing-agent"},
    )
    form = exchange_form(subject, subject_token_type=TT_JWT)
    claims = verify_access_token(
        oidc_provider, exchange(oidc_provider, form).json()["access_token"], CRM
    )
    assert claims["sub"] == "bob@example.com"


def test_token_exchange_over_mtls_is_certificate_bound(oidc_provider: OidcProvider) -> None:
    """svc-exchange-mtls authenticates with its certificate and gets a token bound to it."""
    subject = oidc_provider.user_token("alice@example.com")
    form = {**exchange_form(subject), "client_id": "svc-exchange-mtls"}
    response = post_token(oidc_provider, form, cert=oidc_provider.mtls_cert.requests_cert)
    claims = verify_access_token(oidc_provider, response.json()["access_token"], CRM)
    assert claims["sub"] == "alice@example.com"
    assert claims["cnf"] == {"x5t#S256": oidc_provider.mtls_cert.thumbprint}


def _tampered(token: str) -> str:
    head, body, sig = token.split(".")
    return f"{head}.{body}.{sig[:-4]}AAAA"


def _exchange_case(peer: OidcProvider, case: str) -> dict[str, str]:
    subject = peer.user_token("alice@example.com")
    actor = {"actor_token_type": TT_JWT}
    forms: dict[str, Callable[[], dict[str, str]]] = {
        "tampered-subject": lambda: exchange_form(_tampered(subject)),
        "untrusted-subject-issuer": lambda: exchange_form(
            signed_jwt(peer.actor_key, {"iss": "https://evil.example", "sub": "alice"})
        ),
        "expired-subject": lambda: exchange_form(
            signed_jwt(
                peer.external_idp_key, {"iss": peer.external_issuer, "sub": "bob"}, ttl=-3600
            )
        ),
        "actor-wrong-key": lambda: exchange_form(
            subject,
            actor_token=signed_jwt(
                peer.jwt_client_key, {"iss": ACTOR_ISSUERS[0], "sub": "x", "aud": peer.issuer}
            ),
            **actor,
        ),
        "actor-untrusted-issuer": lambda: exchange_form(
            subject, actor_token=actor_token(peer, iss="https://evil.example"), **actor
        ),
        "actor-other-audience": lambda: exchange_form(
            subject, actor_token=actor_token(peer, aud="https://other.example"), **actor
        ),
        "missing-subject-token": lambda: {
            k: v for k, v in exchange_form(subject).items() if k != "subject_token"
        },
        "actor-without-type": lambda: exchange_form(subject, actor_token=actor_token(peer)),
        "unknown-resource": lambda: exchange_form(subject, resource="https://unknown.internal/"),
    }
    return forms[case]()


@pytest.mark.parametrize(
    ("case", "error", "reason"),
    [
        # signature does not verify
        ("tampered-subject", "invalid_grant", "subject_token is invalid"),
        # iss is neither the provider nor a configured issuer
        ("untrusted-subject-issuer", "invalid_grant", "subject_token issuer is not trusted"),
        # exp in the past
        ("expired-subject", "invalid_grant", "ERR_JWT_EXPIRED"),
        # signed by a key not configured for actors
        ("actor-wrong-key", "invalid_grant", "actor_token is invalid"),
        # actor iss not configured
        ("actor-untrusted-issuer", "invalid_grant", "actor_token issuer is not trusted"),
        # actor aud names another server
        ("actor-other-audience", "invalid_grant", "actor_token audience"),
        # RFC 8693 2.1: subject_token is required
        ("missing-subject-token", "invalid_request", "subject_token"),
        # RFC 8693 2.1: actor_token_type is required with actor_token
        ("actor-without-type", "invalid_request", "actor_token_type"),
        # RFC 8693 2.2.2: a target the server does not know
        ("unknown-resource", "invalid_target", "unknown resource"),
    ],
)
def test_token_exchange_refusals(
    oidc_provider: OidcProvider, case: str, error: str, reason: str
) -> None:
    """Invalid token exchange requests get 400 with the RFC error code and a description of why."""
    response = exchange(oidc_provider, _exchange_case(oidc_provider, case))
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == error
    assert reason in body["error_description"]


def test_token_exchange_is_refused_to_clients_without_the_grant(
    oidc_provider: OidcProvider,
) -> None:
    """A client not registered for token exchange cannot use it."""
    form = exchange_form(oidc_provider.user_token("alice@example.com"))
    response = post_token(
        oidc_provider, form, auth=("svc-basic", oidc_provider.secret("svc-basic"))
    )
    assert response.status_code == 400
    assert response.json()["error"] in {"invalid_request", "unauthorized_client"}


# ---------------------------------------------------------------- test hooks


def test_stats_count_token_requests(oidc_provider: OidcProvider) -> None:
    """stats() counts every token request and the tokens issued per client; reset() zeroes them."""
    oidc_provider.reset()
    auth = ("svc-basic", oidc_provider.secret("svc-basic"))
    for _ in range(2):
        assert post_token(oidc_provider, client_credentials(), auth=auth).status_code == 200
    post_token(oidc_provider, client_credentials(), auth=("svc-basic", "wrong-secret"))
    stats = oidc_provider.stats()
    assert stats["token_requests"] == 3 and stats["tokens_issued"] == 2
    assert stats["issued_by_client"] == {"svc-basic": 2}
    oidc_provider.reset()
    assert oidc_provider.stats()["token_requests"] == 0


def test_outage_makes_the_token_endpoint_answer_503(oidc_provider: OidcProvider) -> None:
    """During a simulated outage the token endpoint answers 503; afterwards it works again."""
    auth = ("svc-basic", oidc_provider.secret("svc-basic"))
    oidc_provider.outage(True, retry_after=2)
    try:
        response = post_token(oidc_provider, client_credentials(), auth=auth)
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "2"
        assert response.json()["error"] == "temporarily_unavailable"
    finally:
        oidc_provider.outage(False)
    assert post_token(oidc_provider, client_credentials(), auth=auth).status_code == 200


async def _wait_in_flight(peer: OidcProvider, count: int) -> None:
    for _ in range(400):
        if (await asyncio.to_thread(peer.stats))["in_flight"] >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {count} token request(s) in flight")


async def test_hold_parks_token_requests_until_released(oidc_provider: OidcProvider) -> None:
    """While held, a token request waits at the server (in_flight) and completes once released."""
    oidc_provider.reset()
    form = {
        **client_credentials(),
        "client_id": "svc-post",
        "client_secret": oidc_provider.secret("svc-post"),
    }
    await asyncio.to_thread(oidc_provider.hold, True)
    try:
        async with aiohttp.ClientSession() as session:
            request = session.post(
                oidc_provider.token_url, data=form, ssl=ssl_context(oidc_provider)
            )
            pending = asyncio.ensure_future(request)
            await _wait_in_flight(oidc_provider, 1)
            assert not pending.done()
            await asyncio.to_thread(oidc_provider.hold, False)
            async with await pending as response:
                assert response.status == 200
    finally:
        await asyncio.to_thread(oidc_provider.hold, False)
    assert (await asyncio.to_thread(oidc_provider.stats))["tokens_issued"] == 1
