"""jwt_assertion: short-lived JWTs this sidecar signs for one audience, verified against the
sidecar's own JWKS the way an upstream would, and reused through the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from multidict import CIMultiDict

from sidecar.credentials import jwt_assertion
from sidecar.credentials.base import CredentialRequest, OutboundRequest, ProviderDeps, TaskRef
from sidecar.credentials.cache import CredentialCache
from sidecar.errors import CredentialUnavailable
from sidecar.fields import Secret
from sidecar.identity.signing import Signer, load_signing_key
from sidecar.observe.metrics import Metrics
from tests.credentials.providers import config_errors, parse_spec

AGENT = "spiffe://example.org/ns/agents/sa/billing"
ISSUER = "https://agents.example.com/billing"
SEARCH = "https://search.internal/"


def signer_for(directory: Path, algorithm: str) -> Signer:
    key: Any = ec.generate_private_key(ec.SECP256R1()) if algorithm == "ES256" else ed25519.Ed25519PrivateKey.generate()
    path = directory / f"{algorithm}.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return Signer(load_signing_key(path, f"kid-{algorithm}"), ISSUER)


@pytest.fixture(params=["ES256", "EdDSA"])
def signer(request: pytest.FixtureRequest, tmp_path: Path) -> Signer:
    return signer_for(tmp_path, request.param)


def provider_for(signer: Signer | None, **raw: Any) -> Any:
    spec = parse_spec("jwt_assertion", {"audience": SEARCH, **raw})
    return jwt_assertion.JwtAssertionProvider("search", spec, ProviderDeps(agent_id=AGENT, signer=signer))


def verify(signer: Signer, token: str, audience: str = SEARCH) -> dict[str, Any]:
    """Verify as an upstream would: with the sidecar's published JWKS."""
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWKSet.from_dict(signer.jwks())[kid]
    return dict(jwt.decode(token, key, algorithms=[signer.key.algorithm], audience=audience, issuer=ISSUER))


def req(task: TaskRef | None = None, scopes: tuple[str, ...] = ()) -> CredentialRequest:
    return CredentialRequest(upstream="search", scopes=scopes, agent_id=AGENT, task=task)


def outbound() -> OutboundRequest:
    return OutboundRequest("GET", "https", "search.internal", 443, "/q", "", CIMultiDict())


HUMAN_TASK = TaskRef("task-1", "https://login.example", "alice@example.com", Secret("eyJ.human.token"), "delegated")


async def test_the_assertion_names_the_agent_for_one_audience(signer: Signer) -> None:
    """iss = the signer's issuer, sub = the SPIFFE ID, aud, jti, exp - iat = ttl; sent as Bearer."""
    provider = provider_for(signer, ttl="2m", scopes=["search.read"])
    credential = await provider.fetch(req())
    token = credential.token.reveal()
    claims = verify(signer, token)
    assert (claims["sub"], claims["aud"], claims["scope"], claims["exp"] - claims["iat"]) == (
        AGENT, SEARCH, "search.read", 120)
    assert "task" not in claims and "principal" not in claims and "act" not in claims
    assert (credential.id, credential.expires_at, credential.issued_at) == (claims["jti"], claims["exp"], claims["iat"])
    assert (credential.audience, credential.scopes, credential.standing) == (SEARCH, ("search.read",), False)
    out = outbound()
    provider.apply(out, credential)
    assert out.headers.getall("Authorization") == [f"Bearer {token}"]


async def test_in_a_task_the_assertion_carries_the_task_and_principal(signer: Signer) -> None:
    """A request in a task gets task, principal and delegation claims, and a key of its own."""
    provider = provider_for(signer)
    claims = verify(signer, (await provider.fetch(req(HUMAN_TASK))).token.reveal())
    assert claims["task"] == "task-1" and claims["delegation"] == "delegated"
    assert claims["principal"] == {"iss": "https://login.example", "sub": "alice@example.com"}
    assert "eyJ.human.token" not in str(claims)
    assert provider.cache_key(req(HUMAN_TASK)) != provider.cache_key(req())
    assert provider.cache_key(req()) == (None, ())


async def test_rule_scopes_narrow_the_scope_claim(signer: Signer) -> None:
    """The rule's scopes replace the configured ones, in the claim and in the cache key."""
    provider = provider_for(signer, scopes=["search.read", "search.write"])
    narrowed = req(scopes=("search.read",))
    assert provider.cache_key(narrowed) != provider.cache_key(req())
    assert verify(signer, (await provider.fetch(narrowed)).token.reveal())["scope"] == "search.read"


async def test_a_custom_header_and_scheme(signer: Signer) -> None:
    """header and scheme put the token where the upstream expects it; no scheme by default elsewhere."""
    provider = provider_for(signer, header="X-Agent-Assertion")
    credential = await provider.fetch(req())
    out = outbound()
    provider.apply(out, credential)
    assert out.headers["X-Agent-Assertion"] == credential.token.reveal() and "Authorization" not in out.headers


async def test_each_fetch_is_a_new_token(signer: Signer) -> None:
    """Every mint has its own jti (the cache decides how often to mint)."""
    provider = provider_for(signer)
    first, second = await provider.fetch(req()), await provider.fetch(req())
    assert first.id != second.id


async def test_one_signature_serves_many_requests_through_the_cache(signer: Signer) -> None:
    """Through the cache, 1,000 requests within the token's life cost one signature."""
    provider = provider_for(signer)
    signed: list[str] = []
    original = signer.sign
    signer.sign = lambda claims, **kw: signed.append("x") or original(claims, **kw)  # type: ignore[method-assign]
    cache = CredentialCache(Metrics())
    try:
        sources = [(await cache.get(provider, req()))[1] for _ in range(1000)]
    finally:
        await cache.aclose()
    assert len(signed) == 1 and sources[0] == "minted" and set(sources[1:]) == {"cache"}


async def test_the_ephemeral_gauge_follows_what_the_cache_holds(tmp_path: Path) -> None:
    """sidecar_ephemeral_credentials: one per task's token held, recounted after each drop."""
    provider = provider_for(signer_for(tmp_path, "ES256"))
    metrics = Metrics()
    cache = CredentialCache(metrics)

    def held() -> float | None:
        return metrics.registry.get_sample_value("sidecar_ephemeral_credentials")

    try:
        for n in range(3):
            await cache.get(provider, req(TaskRef(f"task-{n}", None, None, None, "asserted")))
        assert held() == 3
        assert cache.drop_task("task-0") == 1 and held() == 2
        assert cache.drop_all() == 2 and held() == 0
    finally:
        await cache.aclose()


async def test_without_a_signing_key_it_is_unavailable() -> None:
    """No signer: credential_unavailable, not an unsigned token."""
    with pytest.raises(CredentialUnavailable, match="no signing key"):
        await provider_for(None).fetch(req())


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({}, ["credentials.test.audience: is required"]),
        ({"audience": SEARCH, "ttl": "5s"}, ["credentials.test.ttl: must be between 10s and 1h"]),
        ({"audience": SEARCH, "ttl": "2h"}, ["credentials.test.ttl: must be between 10s and 1h"]),
        ({"audience": SEARCH, "header": "X_Token"},
         ["credentials.test.header: must be an HTTP header name without '_', ':' or spaces"]),
        ({"audience": SEARCH, "value": "x"}, ["credentials.test.value: unknown key"]),
    ],
)
def test_config_errors(raw: dict[str, Any], expected: list[str]) -> None:
    """Invalid entries are refused with their path."""
    assert config_errors("jwt_assertion", raw) == expected


def test_defaults_and_the_signing_key_requirement() -> None:
    """ttl 60s, Authorization with Bearer; the key must be one a verifier knows."""
    spec = parse_spec("jwt_assertion", {"audience": SEARCH})
    assert (spec.ttl, spec.placement.header, spec.placement.scheme, spec.needs_signing_key) == (60.0, "Authorization", "Bearer ", True)
