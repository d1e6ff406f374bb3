"""oauth2_token_exchange against a real oidc-provider: RFC 8693 delegation that names the human
and this agent, impersonation only where a rule allows it, and tasks without a human refused."""

from __future__ import annotations

import uuid
from typing import Any

import jwt
import pytest

from sidecar.credentials import token_endpoint, token_exchange
from sidecar.credentials.base import CredentialRequest, ProviderDeps, TaskRef
from sidecar.errors import CredentialUnavailable
from sidecar.fields import Secret
from sidecar.identity.signing import Signer, load_signing_key
from sidecar.identity.source import IdentitySource
from tests.credentials.providers import (ID_KEY, Make, b64url_to_hex, client_config, config_errors, outbound,
                                         parse_spec)
from tests.peers.oidc import ACTOR_ISSUERS, AGENT_SPIFFE_ID, CRM, OidcProvider, verify_access_token

pytestmark = pytest.mark.peer("oidc-provider")

ALICE = "alice@example.com"


@pytest.fixture
def deps(oidc_provider: OidcProvider, svid: IdentitySource) -> ProviderDeps:
    """The actor key the peer trusts, with an issuer it accepts for actor tokens (the SPIFFE ID)."""
    key = oidc_provider.actor_key
    signer = Signer(load_signing_key(key.path, key.kid), issuer=ACTOR_ISSUERS[0])
    return ProviderDeps(agent_id=AGENT_SPIFFE_ID, signer=signer, svid=svid, id_key=ID_KEY)


def exchange_config(peer: OidcProvider, client_id: str = "svc-exchange", **extra: Any) -> dict[str, Any]:
    return client_config(peer, client_id, **{"resource": CRM, "scopes": ["crm.read"], **extra})


def task(subject_token: str | None, delegation: str = "delegated", task_id: str | None = None) -> TaskRef:
    return TaskRef(task_id or uuid.uuid4().hex, "https://login.example", ALICE,
                   Secret(subject_token, "task") if subject_token else None, delegation)


def request(task_ref: TaskRef | None, *, impersonation_allowed: bool = False) -> CredentialRequest:
    return CredentialRequest(upstream="crm-api", scopes=(), agent_id=AGENT_SPIFFE_ID, task=task_ref,
                             impersonation_allowed=impersonation_allowed)


async def test_delegation_names_the_human_and_the_agent(oidc_provider: OidcProvider, make: Make) -> None:
    """The exchanged token has sub = the human and act.sub = this agent's SPIFFE ID."""
    provider = make(exchange_config(oidc_provider), "oauth2_token_exchange")
    credential = await provider.fetch(request(task(oidc_provider.user_token(ALICE))))
    claims = verify_access_token(oidc_provider, credential.token.reveal(), CRM)
    assert (claims["sub"], claims["act"], claims["scope"]) == (ALICE, {"sub": AGENT_SPIFFE_ID}, "crm.read")
    assert (credential.delegation, credential.act_chain) == ("delegated", (AGENT_SPIFFE_ID,))
    assert (credential.type, credential.audience, credential.id) == ("oauth2_token_exchange", CRM, claims["jti"])
    out = outbound()
    provider.apply(out, credential)
    assert out.headers["Authorization"] == "Bearer " + credential.token.reveal()


async def test_an_earlier_actor_stays_in_the_chain(oidc_provider: OidcProvider, make: Make) -> None:
    """A subject token that already names an actor gives act_chain = (this agent, the earlier one)."""
    provider = make(exchange_config(oidc_provider, audience=CRM, resource=None), "oauth2_token_exchange")
    subject = oidc_provider.user_token(ALICE, act={"sub": "spiffe://example.org/front"})
    credential = await provider.fetch(request(task(subject)))
    assert credential.act_chain == (AGENT_SPIFFE_ID, "spiffe://example.org/front")


async def test_the_actor_token_is_ours_and_for_this_server_only(oidc_provider: OidcProvider, make: Make) -> None:
    """Actor token: iss = the signer's issuer, sub = the SPIFFE ID, aud = the AS issuer, 60 s."""
    provider = make(exchange_config(oidc_provider), "oauth2_token_exchange")
    public = load_signing_key(oidc_provider.actor_key.path, None).private.public_key()
    claims = jwt.decode(provider.actor_token(), public, algorithms=["ES256"], audience=oidc_provider.issuer)
    assert (claims["iss"], claims["sub"], claims["exp"] - claims["iat"]) == (ACTOR_ISSUERS[0], AGENT_SPIFFE_ID, 60)


@pytest.mark.parametrize(
    ("impersonate", "allowed", "delegation"),
    [
        (False, False, "delegated"),  # the default: always a delegation
        (False, True, "delegated"),  # a rule allowing impersonation does not force it
        (True, True, "impersonated"),  # configured and allowed by the rule
    ],
)
async def test_impersonation_happens_only_when_configured_and_allowed(
    oidc_provider: OidcProvider, make: Make, impersonate: bool, allowed: bool, delegation: str
) -> None:
    """Without an actor token the result names only the human; that needs both config and rule."""
    provider = make(exchange_config(oidc_provider, impersonate=impersonate), "oauth2_token_exchange")
    credential = await provider.fetch(request(task(oidc_provider.user_token(ALICE)),
                                              impersonation_allowed=allowed))
    claims = verify_access_token(oidc_provider, credential.token.reveal(), CRM)
    assert credential.delegation == delegation
    assert ("act" in claims) == (delegation == "delegated")


async def test_impersonation_without_a_rule_allowing_it_is_refused(oidc_provider: OidcProvider, make: Make) -> None:
    """impersonate: true for a request whose rule does not allow impersonation: refused, nothing fetched."""
    provider = make(exchange_config(oidc_provider, impersonate=True), "oauth2_token_exchange")
    oidc_provider.reset()
    with pytest.raises(CredentialUnavailable, match="impersonates the user, which needs a rule with"):
        await provider.fetch(request(task(oidc_provider.user_token(ALICE))))
    assert oidc_provider.stats()["token_requests"] == 0


@pytest.mark.parametrize(
    ("task_ref", "detail"),
    [
        (None, "the request names no task"),
        (task("a-verified-looking-token", "asserted"), "the task's delegation is asserted"),  # POST /tasks principal
        (task(None, "asserted"), "the task's delegation is asserted"),
    ],
)
async def test_a_task_without_a_verified_human_token_is_refused(
    oidc_provider: OidcProvider, make: Make, task_ref: TaskRef | None, detail: str
) -> None:
    """No task, or an asserted one, never drives an exchange: refused before any token request."""
    provider = make(exchange_config(oidc_provider), "oauth2_token_exchange")
    oidc_provider.reset()
    with pytest.raises(CredentialUnavailable) as refused:
        await provider.fetch(request(task_ref))
    assert refused.value.message == "credentials: token exchange needs a task opened with a verified human token"
    assert refused.value.detail == detail
    assert oidc_provider.stats()["token_requests"] == 0


async def test_results_are_cached_per_task(oidc_provider: OidcProvider, make: Make) -> None:
    """Two tasks of the same human never share an exchanged token."""
    provider = make(exchange_config(oidc_provider), "oauth2_token_exchange")
    subject = oidc_provider.user_token(ALICE)
    one, two = task(subject, task_id="t-1"), task(subject, task_id="t-2")
    assert provider.task_bound
    assert provider.cache_key(request(one)) != provider.cache_key(request(two))
    assert provider.cache_key(request(one)) == provider.cache_key(request(task(subject, task_id="t-1")))


async def test_exchange_over_tls_client_auth_is_certificate_bound(
    oidc_provider: OidcProvider, make: Make, svid: IdentitySource
) -> None:
    """svc-exchange-mtls authenticates with our SVID; the token is bound to it and refused elsewhere."""
    provider = make(exchange_config(oidc_provider, "svc-exchange-mtls"), "oauth2_token_exchange")
    credential = await provider.fetch(request(task(oidc_provider.user_token(ALICE))))
    claims = verify_access_token(oidc_provider, credential.token.reveal(), CRM)
    assert credential.bound_cert_sha256 == b64url_to_hex(claims["cnf"]["x5t#S256"]) == svid.state.cert_sha256
    assert claims["act"] == {"sub": AGENT_SPIFFE_ID}
    with pytest.raises(CredentialUnavailable, match="bound to this sidecar's certificate"):
        provider.apply(outbound(None), credential)


async def test_a_subject_token_the_server_rejects_is_invalid_grant(oidc_provider: OidcProvider, make: Make) -> None:
    """A tampered human token: invalid_grant in the detail, the token itself nowhere."""
    provider = make(exchange_config(oidc_provider), "oauth2_token_exchange")
    head, body, sig = oidc_provider.user_token(ALICE).split(".")
    tampered = f"{head}.{body}.{sig[:-4]}AAAA"
    with pytest.raises(CredentialUnavailable) as refused:
        await provider.fetch(request(task(tampered)))
    detail = refused.value.detail or ""
    assert detail.startswith("token endpoint: invalid_grant (http 400): subject_token is invalid")
    assert tampered not in detail and body not in detail and tampered not in str(refused.value)


async def test_an_actor_key_the_server_does_not_trust_is_invalid_grant(
    oidc_provider: OidcProvider, make: Make, deps: ProviderDeps
) -> None:
    """Actor tokens signed by an unregistered key are refused by the server, and so the request."""
    key = oidc_provider.jwt_client_key
    rogue = ProviderDeps(agent_id=AGENT_SPIFFE_ID, signer=Signer(load_signing_key(key.path, key.kid), ACTOR_ISSUERS[0]),
                         svid=deps.svid, id_key=ID_KEY)
    provider = make(exchange_config(oidc_provider), "oauth2_token_exchange", rogue)
    with pytest.raises(CredentialUnavailable) as refused:
        await provider.fetch(request(task(oidc_provider.user_token(ALICE))))
    assert (refused.value.detail or "").startswith("token endpoint: invalid_grant (http 400): actor_token is invalid")


async def test_a_scope_the_client_may_not_have_is_invalid_scope(oidc_provider: OidcProvider, make: Make) -> None:
    """RFC 8693 §2.2.2: a scope beyond the client's is refused with invalid_scope."""
    provider = make(exchange_config(oidc_provider, scopes=["admin.everything"]), "oauth2_token_exchange")
    with pytest.raises(CredentialUnavailable) as refused:
        await provider.fetch(request(task(oidc_provider.user_token(ALICE))))
    assert (refused.value.detail or "").startswith("token endpoint: invalid_scope (http 400)")


def test_a_jwt_result_that_does_not_name_the_agent_is_refused(deps: ProviderDeps) -> None:
    """If the server dropped our actor token, the token would impersonate: refused instead."""
    spec = parse_spec("oauth2_token_exchange", {**_BASE, "resource": CRM})
    provider = token_exchange.TokenExchangeProvider("test", spec, deps)
    token = jwt.encode({"sub": ALICE, "jti": "j1", "act": {"sub": "spiffe://example.org/other"}}, "k" * 32)
    resp = token_endpoint.parse_token_response("test", ('{"access_token": "%s", "token_type": "Bearer"}' % token).encode())
    with pytest.raises(CredentialUnavailable, match="does not name this agent as its actor"):
        provider._credential(resp, ())


_BASE = {"token_url": "https://login.example.com/token", "client_id": "billing-agent", "auth": "tls_client_auth"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (_BASE, ["credentials.test: needs one of resource: URI or audience: NAME (the upstream the token is for)"]),
        ({**_BASE, "resource": CRM, "impersonate": "yes"},
         ["credentials.test.impersonate: must be true or false, got a string"]),
        ({**_BASE, "resource": CRM}, []),
    ],
)
def test_config(raw: dict[str, Any], expected: list[str]) -> None:
    """A target (resource or audience) is required; impersonate is a boolean."""
    assert config_errors("oauth2_token_exchange", raw) == expected


def test_the_actor_token_always_needs_the_signing_key() -> None:
    """Whatever the client auth, the actor token is signed: identity.signing_key is required."""
    spec = parse_spec("oauth2_token_exchange", {**_BASE, "resource": CRM})
    assert spec.needs_signing_key and not spec.impersonate
