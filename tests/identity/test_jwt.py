"""Bearer JWT verification: real signed tokens against a JWKS file, attacks first.

Keys, signing, configs and the clock are ``tests/identity/tokens.py`` (shared with ``test_jwks.py``);
forging is here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import pytest

from sidecar.config import JwtIssuerConfig
from sidecar.errors import IdentityRefused
from sidecar.identity.jwt import MAX_TOKEN_BYTES, JwtVerifier, VerifiedToken, bearer_token
from tests.identity.tokens import (AUD, DROP, ISSUER, NOW, Clock, Key, b64, claims, ec_key, ed_key, issuer_config,
                                   rsa_key, sign, write_jwks)


def forge(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"not-a-signature") -> str:
    """A token assembled by hand, for what no honest library would sign."""
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}.{b64(signature)}"


def hs256_with_public_pem(key: Key) -> str:
    """The classic key-confusion attack: HS256 with the issuer's public key PEM as the secret."""
    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'kid': key.kid}).encode())}.{b64(json.dumps(claims()).encode())}"
    mac = hmac.new(key.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def assert_refused(info: pytest.ExceptionInfo[IdentityRefused], token: str, *secrets: str) -> str:
    """Refused as token_invalid, with a message that quotes no part of the token."""
    exc = info.value
    assert exc.reason == "token_invalid"
    assert exc.message.startswith("identity: ")
    window = 10
    for i in range(0, max(len(token) - window, 0) + 1):
        assert token[i:i + window] not in exc.message
    for secret in secrets:
        assert secret not in exc.message
    return exc.message


# -- fixtures ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    rsa: Key
    ec: Key
    ed: Key
    attacker_rsa: Key
    attacker_ec: Key


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(rsa_key("rsa-1"), ec_key("ec-1"), ed_key("ed-1"), rsa_key("rsa-1", n=1), ec_key("attacker"))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def jwks_file(tmp_path: Path, keys: Keys) -> Path:
    return write_jwks(tmp_path / "jwks.json", keys.rsa, keys.ec, keys.ed)


async def started(*configs: JwtIssuerConfig, clock: Clock, **kwargs: Any) -> JwtVerifier:
    verifier = JwtVerifier(configs, clock=clock, refresh_interval=0, **kwargs)
    await verifier.start()
    return verifier


@pytest.fixture
async def verifier(jwks_file: Path, clock: Clock) -> Any:
    v = await started(issuer_config(jwks_file=jwks_file), clock=clock)
    yield v
    await v.aclose()


def _kid_token(kid: Any) -> Callable[[Keys], str]:
    return lambda k: sign(k.rsa, kid=kid)


# -- attacks ----------------------------------------------------------------------------------

ATTACKS: list[tuple[str, Callable[[Keys], str], str]] = [
    # RFC 8725 §2.1 / §3.1: "none" is never an algorithm we accept, in any spelling.
    ("alg-none", lambda k: forge({"alg": "none"}, claims()), "alg must be one of"),
    ("alg-None", lambda k: forge({"alg": "None"}, claims()), "alg must be one of"),
    ("alg-NONE", lambda k: forge({"alg": "NONE"}, claims()), "alg must be one of"),
    ("alg-nOnE", lambda k: forge({"alg": "nOnE"}, claims()), "alg must be one of"),
    # "none" with the empty signature segment a real unsecured JWT has: not three segments.
    ("alg-none-empty-signature", lambda k: forge({"alg": "none"}, claims(), b""), "three base64url segments"),
    # The header has no alg at all, or a non-string one.
    ("alg-missing", lambda k: forge({"kid": "rsa-1"}, claims()), "alg must be one of"),
    ("alg-list", lambda k: forge({"alg": ["RS256"]}, claims()), "alg must be one of"),
    # Key confusion (CVE-2015-9235 class): HS256 keyed with the RSA public key PEM.
    ("hs256-public-pem", lambda k: hs256_with_public_pem(k.rsa), "none and hmac are never accepted"),
    # kid is only a dictionary key: a path means nothing, it is just not in the key set.
    ("kid-path-traversal", _kid_token("../../etc/passwd"), "kid is not in the issuer's key set"),
    # kid with SQL injection, too long, non-ASCII, empty, or not a string: refused by its charset.
    ("kid-sql-injection", _kid_token("' OR 1=1 --"), "token kid must be"),
    ("kid-too-long", _kid_token("k" * 129), "token kid must be"),
    ("kid-non-ascii", _kid_token("clé-ключ"), "token kid must be"),
    ("kid-empty", _kid_token(""), "token kid must be"),
    ("kid-number", _kid_token(7), "token kid must be"),
    ("kid-null-byte", _kid_token("rsa-1\x00"), "token kid must be"),
    # RFC 8725 §3.10 and §2.4: keys never come from the token itself.
    ("jku-header", lambda k: sign(k.rsa, jku="https://attacker.example/jwks"), "must not carry jku"),
    ("x5u-header", lambda k: sign(k.rsa, x5u="https://attacker.example/cert.pem"), "must not carry x5u"),
    ("embedded-jwk", lambda k: sign(k.attacker_ec, jwk=k.attacker_ec.jwk, kid=DROP), "must not carry jwk"),
    ("x5c-header", lambda k: sign(k.rsa, x5c=["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A"]), "must not carry x5c"),
    # RFC 7515 §4.1.11: we understand no critical extension.
    ("crit-unknown", lambda k: sign(k.rsa, crit=["urn:example:must-understand"],
                                    **{"urn:example:must-understand": True}), "must not carry crit"),
    ("crit-b64", lambda k: forge({"alg": "RS256", "kid": "rsa-1", "b64": False, "crit": ["b64"]}, claims()),
     "must not carry crit"),
    # RFC 7519 §4.1.4: expired beyond the 30 s leeway.
    ("expired", lambda k: sign(k.rsa, claims(iat=NOW - 400, exp=NOW - 31)), "has expired"),
    # RFC 7519 §4.1.5 and §4.1.6: not yet valid, or issued in the future, beyond leeway.
    ("nbf-future", lambda k: sign(k.rsa, claims(nbf=NOW + 31)), "nbf is in the future"),
    ("iat-future", lambda k: sign(k.rsa, claims(iat=NOW + 31, exp=NOW + 600)), "iat must not be in the future"),
    # RFC 7519 §4.1.3: the audience must be ours.
    ("aud-wrong", lambda k: sign(k.rsa, claims(aud="other-agent")), "aud must include one of"),
    ("aud-list-wrong", lambda k: sign(k.rsa, claims(aud=["a", "b"])), "aud must include one of"),
    ("aud-missing", lambda k: sign(k.rsa, claims(aud=DROP)), "must carry an aud claim"),
    ("aud-number", lambda k: sign(k.rsa, claims(aud=7)), "must carry an aud claim"),
    ("aud-empty-list", lambda k: sign(k.rsa, claims(aud=[])), "must carry an aud claim"),
    # The issuer is matched exactly: no trailing-slash or case normalization (a known bypass).
    ("iss-wrong", lambda k: sign(k.rsa, claims(iss="https://evil.example.com")), "iss must be exactly"),
    ("iss-trailing-slash", lambda k: sign(k.rsa, claims(iss=ISSUER + "/")), "iss must be exactly"),
    ("iss-case-variant", lambda k: sign(k.rsa, claims(iss="https://LOGIN.example.com")), "iss must be exactly"),
    ("iss-missing", lambda k: sign(k.rsa, claims(iss=DROP)), "iss must be exactly"),
    ("iss-list", lambda k: sign(k.rsa, claims(iss=[ISSUER])), "iss must be exactly"),
    # exp is required.
    ("exp-missing", lambda k: sign(k.rsa, claims(exp=DROP)), "must carry an exp claim"),
    # NumericDate is a JSON number (RFC 7519 §2), never a string or a boolean.
    ("exp-string", lambda k: sign(k.rsa, claims(exp=str(int(NOW + 300)))), "claim exp must be a json number"),
    ("iat-string", lambda k: sign(k.rsa, claims(iat=str(int(NOW)))), "claim iat must be a json number"),
    ("nbf-string", lambda k: sign(k.rsa, claims(nbf="1735689600")), "claim nbf must be a json number"),
    ("exp-boolean", lambda k: sign(k.rsa, claims(exp=True)), "claim exp must be a json number"),
    # exp - iat (or exp - now without iat) above max_lifetime (3600 s here).
    ("lifetime-over-max", lambda k: sign(k.rsa, claims(iat=NOW, exp=NOW + 3601)), "lifetime"),
    ("lifetime-over-max-no-iat", lambda k: sign(k.rsa, claims(iat=DROP, exp=NOW + 7200)), "lifetime"),
    # sub must be a non-empty string.
    ("sub-missing", lambda k: sign(k.rsa, claims(sub=DROP)), "claim sub must be a non-empty string"),
    ("sub-empty", lambda k: sign(k.rsa, claims(sub="")), "claim sub must be a non-empty string"),
    ("sub-number", lambda k: sign(k.rsa, claims(sub=42)), "claim sub must be a non-empty string"),
    # Oversized: refused before any parsing.
    ("oversized", lambda k: sign(k.rsa, claims(pad="x" * MAX_TOKEN_BYTES)), f"at most {MAX_TOKEN_BYTES} bytes"),
    # RFC 7515 §7.1: a compact JWS has exactly three segments.
    ("two-segments", lambda k: ".".join(sign(k.rsa).split(".")[:2]), "three base64url segments"),
    ("four-segments", lambda k: sign(k.rsa) + ".AAAA", "three base64url segments"),
    ("jwe-five-segments", lambda k: sign(k.rsa) + ".AAAA.BBBB", "three base64url segments"),
    # Bad base64url: characters outside the alphabet, padding, impossible lengths.
    ("bad-base64-chars", lambda k: "e30!." + sign(k.rsa).split(".", 1)[1], "three base64url segments"),
    ("bad-base64-padding", lambda k: sign(k.rsa).replace(".", "=.", 1), "three base64url segments"),
    ("bad-base64-length", lambda k: "eyJhb." + sign(k.rsa).split(".", 1)[1], "base64url-encoded json"),
    ("header-not-json", lambda k: b64(b"{not json") + "." + sign(k.rsa).split(".", 1)[1], "base64url-encoded json"),
    ("header-json-array", lambda k: b64(b'["RS256"]') + "." + sign(k.rsa).split(".", 1)[1], "a json object"),
    ("payload-not-object", lambda k: forge({"alg": "RS256", "kid": "rsa-1"}, [1, 2]),  # type: ignore[arg-type]
     "payload must be a json object"),
    ("whitespace-inside", lambda k: sign(k.rsa).replace(".", " .", 1), "three base64url segments"),
    # Another key under the same kid: the signature does not verify.
    ("same-kid-other-key", lambda k: sign(k.attacker_rsa), "signature does not verify"),
    # A valid signature over different claims (payload swapped): does not verify.
    ("payload-swapped", lambda k: ".".join([sign(k.rsa).split(".")[0], b64(json.dumps(claims(sub="admin")).encode()),
                                            sign(k.rsa).split(".")[2]]), "signature does not verify"),
    # Algorithm/key-type confusion: ES256 under an RSA kid, RS256 under an EC kid.
    ("es256-with-rsa-kid", lambda k: sign(k.attacker_ec, kid="rsa-1"), "alg does not match the type of the key"),
    ("rs256-with-ec-kid", lambda k: sign(k.rsa, kid="ec-1"), "alg does not match the type of the key"),
    # An asymmetric alg the issuer does not allow (PS256 with the same RSA key).
    ("alg-not-allowed-for-issuer", lambda k: sign(k.rsa, alg="PS256"), "issuer's algorithms"),
    # RFC 8693 §4.1: every act is an object naming its actor's sub; other claims keep their types.
    ("act-without-sub", lambda k: sign(k.rsa, claims(act={"act": {"sub": "x"}})), "act claim must carry sub"),
    ("act-not-object", lambda k: sign(k.rsa, claims(act="agent-7")), "act claim must be an object"),
    ("client-id-number", lambda k: sign(k.rsa, claims(client_id=12)), "claim client_id must be"),
]


@pytest.mark.parametrize("build, expected", [(b, e) for _, b, e in ATTACKS], ids=[i for i, _, _ in ATTACKS])
async def test_attack_is_refused_without_quoting_the_token(verifier: JwtVerifier, keys: Keys,
                                                           build: Callable[[Keys], str], expected: str) -> None:
    """Every attack token is refused as token_invalid, saying what was expected and quoting nothing of it."""
    token = build(keys)
    with pytest.raises(IdentityRefused) as info:
        await verifier.verify(token)
    message = assert_refused(info, token, "etc/passwd", "OR 1=1", "clé", "evil.example", "LOGIN", "attacker")
    assert expected in message.lower()


async def test_non_string_token_is_refused(verifier: JwtVerifier) -> None:
    """A token that is not a string at all is refused, not crashed on."""
    with pytest.raises(IdentityRefused) as info:
        await verifier.verify(b"abc.def.ghi")  # type: ignore[arg-type]
    assert info.value.reason == "token_invalid"


async def test_hmac_is_refused_even_when_configured(jwks_file: Path, clock: Clock, keys: Keys) -> None:
    """An issuer configured with HS256 still never accepts HMAC; its asymmetric algorithms keep working."""
    v = await started(issuer_config(jwks_file=jwks_file, algorithms=("HS256", "RS256")), clock=clock)
    token = hs256_with_public_pem(keys.rsa)
    with pytest.raises(IdentityRefused) as info:
        await v.verify(token)
    assert_refused(info, token)
    assert (await v.verify(sign(keys.rsa))).subject == "svc-billing"
    await v.aclose()


async def test_unknown_issuer_with_valid_signature_is_refused(tmp_path: Path, clock: Clock, keys: Keys) -> None:
    """A token from issuer A signed with A's key is refused by a verifier that trusts only B with the same key."""
    other = issuer_config(issuer="https://idp-b.example.com", jwks_file=write_jwks(tmp_path / "b.json", keys.rsa))
    v = await started(other, clock=clock)
    with pytest.raises(IdentityRefused, match="iss must be exactly"):
        await v.verify(sign(keys.rsa))
    await v.aclose()


async def test_issuers_do_not_share_keys(tmp_path: Path, clock: Clock, keys: Keys) -> None:
    """A token naming issuer A but signed with issuer B's key is refused, even under B's kid."""
    a = issuer_config(jwks_file=write_jwks(tmp_path / "a.json", keys.rsa))
    b = issuer_config(issuer="https://idp-b.example.com", jwks_file=write_jwks(tmp_path / "b.json", keys.ec))
    v = await started(a, b, clock=clock)
    with pytest.raises(IdentityRefused, match="kid is not in the issuer's key set"):
        await v.verify(sign(keys.ec))
    assert (await v.verify(sign(keys.ec, claims(iss="https://idp-b.example.com")))).issuer == b.issuer
    await v.aclose()


# -- what is accepted -------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["rsa", "ec", "ed"])
async def test_valid_token_is_accepted(verifier: JwtVerifier, keys: Keys, which: str) -> None:
    """RS256, ES256 and EdDSA tokens from the issuer's keys verify into a VerifiedToken."""
    token = sign(getattr(keys, which), claims(aud=["other", AUD]))
    result = await verifier.verify(token)
    assert (result.issuer, result.subject, result.audiences) == (ISSUER, "svc-billing", ("other", AUD))
    assert result.expires_at == NOW + 300 and result.token.reveal() == token
    assert token not in repr(result) and token.split(".")[1] not in repr(result)


async def test_leeway_is_applied_to_exp_nbf_and_iat(verifier: JwtVerifier, keys: Keys) -> None:
    """Within the 30 s leeway, a just-expired, not-quite-valid or slightly-future-issued token is accepted."""
    token = sign(keys.rsa, claims(iat=NOW + 29, nbf=NOW + 29, exp=NOW + 600))
    assert (await verifier.verify(token)).subject == "svc-billing"
    assert (await verifier.verify(sign(keys.rsa, claims(iat=NOW - 600, exp=NOW - 29)))).subject == "svc-billing"


async def test_token_without_kid_uses_the_only_key_of_its_type(verifier: JwtVerifier, keys: Keys) -> None:
    """A token without kid is accepted when the issuer has exactly one key for its algorithm."""
    assert (await verifier.verify(sign(keys.ec, kid=DROP))).subject == "svc-billing"


async def test_token_without_kid_is_refused_when_keys_are_ambiguous(tmp_path: Path, clock: Clock,
                                                                    keys: Keys) -> None:
    """A token without kid is refused when the issuer has two keys for its algorithm."""
    path = write_jwks(tmp_path / "two.json", keys.rsa, replace(keys.attacker_rsa, kid="rsa-2"))
    v = await started(issuer_config(jwks_file=path), clock=clock)
    token = sign(keys.rsa, kid=DROP)
    with pytest.raises(IdentityRefused) as info:
        await v.verify(token)
    assert "exactly one key" in assert_refused(info, token)
    await v.aclose()


ACTORS = [
    # mode, extra claims, expected actor type, expected client_id
    ("auto", {}, "workload", None),  # no client_id nor azp: a workload
    ("auto", {"client_id": "svc-billing"}, "workload", "svc-billing"),  # client credentials: client is the subject
    ("auto", {"azp": "svc-billing"}, "workload", "svc-billing"),  # same, via azp
    ("auto", {"client_id": "web-app"}, "human", "web-app"),  # a client acting for another subject: a human
    ("auto", {"azp": "web-app"}, "human", "web-app"),  # OIDC azp differing from sub: a human
    ("auto", {"client_id": "web-app", "azp": "svc-billing"}, "human", "web-app"),  # client_id wins over azp
    ("human", {}, "human", None),  # the issuer says every token is a human
    ("workload", {"client_id": "web-app"}, "workload", "web-app"),  # the issuer says every token is a workload
]


@pytest.mark.parametrize("mode, extra, actor_type, client_id", ACTORS)
async def test_actor_type_classification(jwks_file: Path, clock: Clock, keys: Keys, mode: str,
                                         extra: dict[str, Any], actor_type: str, client_id: str | None) -> None:
    """The actor type follows the issuer's mode; auto means human only when the client differs from sub."""
    v = await started(issuer_config(jwks_file=jwks_file, actor=mode), clock=clock)
    result = await v.verify(sign(keys.rsa, claims(**extra)))
    assert (result.actor_type, result.client_id) == (actor_type, client_id)
    await v.aclose()


async def test_act_chain_lists_nested_actors_outermost_first(verifier: JwtVerifier, keys: Keys) -> None:
    """Nested act claims (RFC 8693 §4.1) become the act chain, the current actor first."""
    act = {"sub": "agent-2", "act": {"sub": "agent-1", "act": {"sub": "orchestrator"}}}
    result = await verifier.verify(sign(keys.rsa, claims(sub="alice@example.com", act=act)))
    assert result.act_chain == ("agent-2", "agent-1", "orchestrator")
    assert (await verifier.verify(sign(keys.ed))).act_chain == ()


async def test_act_chain_depth_is_bounded(verifier: JwtVerifier, keys: Keys) -> None:
    """An act chain nested deeper than the limit is refused."""
    act: dict[str, Any] = {"sub": "a0"}
    for i in range(1, 12):
        act = {"sub": f"a{i}", "act": act}
    with pytest.raises(IdentityRefused, match="nested at most"):
        await verifier.verify(sign(keys.rsa, claims(act=act)))


async def test_audience_override_replaces_configured_audiences(verifier: JwtVerifier, keys: Keys) -> None:
    """With audience=, only that audience is accepted (approver tokens), not the issuer's audiences."""
    approver = sign(keys.ec, claims(sub="alice@example.com", aud="agent-approvals", client_id="console"))
    result = await verifier.verify(approver, audience="agent-approvals")
    assert (result.subject, result.actor_type) == ("alice@example.com", "human")
    with pytest.raises(IdentityRefused, match="aud must include one of: billing-agent"):
        await verifier.verify(approver)
    with pytest.raises(IdentityRefused, match="aud must include one of: agent-approvals"):
        await verifier.verify(sign(keys.ec), audience="agent-approvals")


TYPS = [
    # header typ, accepted? (configured typ: at+jwt, RFC 9068)
    ("at+jwt", True),  # exact
    ("AT+JWT", True),  # media types compare case-insensitively
    ("application/at+jwt", True),  # RFC 8725 §3.11: the application/ prefix may be present
    ("JWT", False),  # an ID token or another kind of JWT
    (DROP, False),  # no typ at all
    (["at+jwt"], False),  # not a string
]


@pytest.mark.parametrize("typ, accepted", TYPS)
async def test_typ_is_checked_when_configured(jwks_file: Path, clock: Clock, keys: Keys, typ: Any,
                                              accepted: bool) -> None:
    """When the issuer configures typ, the header's typ must match it (explicit typing, RFC 8725 §3.11)."""
    v = await started(issuer_config(jwks_file=jwks_file, typ="at+jwt"), clock=clock)
    token = sign(keys.ec, typ=typ)
    if accepted:
        assert (await v.verify(token)).subject == "svc-billing"
    else:
        with pytest.raises(IdentityRefused, match="typ must be at\\+jwt"):
            await v.verify(token)
    await v.aclose()


# -- the result cache -------------------------------------------------------------------------


async def test_cache_returns_the_same_result_until_exp(verifier: JwtVerifier, keys: Keys, clock: Clock) -> None:
    """A repeated token is served from the cache, and refused once exp plus leeway has passed."""
    token = sign(keys.rsa)
    first = await verifier.verify(token)
    assert await verifier.verify(token) is first
    clock.now = NOW + 300 + 30
    with pytest.raises(IdentityRefused, match="has expired"):
        await verifier.verify(token)


async def test_cache_is_keyed_by_audience(verifier: JwtVerifier, keys: Keys) -> None:
    """A token cached for the inbound audiences is not accepted from the cache for another audience."""
    token = sign(keys.rsa)
    await verifier.verify(token)
    with pytest.raises(IdentityRefused, match="aud must include one of: agent-approvals"):
        await verifier.verify(token, audience="agent-approvals")


async def test_cache_is_dropped_when_the_key_set_changes(verifier: JwtVerifier, keys: Keys,
                                                         jwks_file: Path) -> None:
    """After a reload removes a key, a cached token signed with it is refused."""
    token = sign(keys.rsa)
    await verifier.verify(token)
    write_jwks(jwks_file, keys.ec)
    assert await verifier.reload()
    with pytest.raises(IdentityRefused, match="kid is not in the issuer's key set"):
        await verifier.verify(token)


async def test_cache_can_be_disabled_and_is_bounded(jwks_file: Path, clock: Clock, keys: Keys) -> None:
    """cache_size=0 verifies every time; a small cache evicts its oldest entry."""
    off = await started(issuer_config(jwks_file=jwks_file), clock=clock, cache_size=0)
    token = sign(keys.rsa)
    assert await off.verify(token) is not await off.verify(token)
    small = await started(issuer_config(jwks_file=jwks_file), clock=clock, cache_size=2)
    tokens = [sign(keys.ed, claims(jti=str(i))) for i in range(3)]
    results = [await small.verify(t) for t in tokens]
    assert await small.verify(tokens[2]) is results[2]
    assert await small.verify(tokens[0]) is not results[0]
    await off.aclose()
    await small.aclose()


# -- the Authorization header -----------------------------------------------------------------

BEARER_OK = [
    # header values, expected token
    ([], None),  # no Authorization header: no token (jwt.required decides)
    (["Bearer abc.def.ghi"], "abc.def.ghi"),  # RFC 6750 §2.1
    (["bearer abc.def.ghi"], "abc.def.ghi"),  # RFC 9110 §11.1: the scheme is case-insensitive
    (["BEARER  abc.def.ghi "], "abc.def.ghi"),  # extra spaces around the token
    (["Bearer a-b_c.d~e+f/g=="], "a-b_c.d~e+f/g=="),  # the whole b64token alphabet
]

BEARER_REFUSED = [
    # header values: each refused as malformed
    ["Bearer a.b.c", "Bearer d.e.f"],  # two Authorization headers: which one would the agent see?
    ["Basic dXNlcjpwYXNz"],  # another scheme
    ["Bearer"],  # no token
    ["Bearer "],  # empty token
    ["Bearer a.b.c d"],  # a space inside the token
    ["Bearer a.b.c,Bearer d"],  # a list folded into one header
    ["Bearerabc.def.ghi"],  # no space after the scheme
    ["Bearer \u00e9t\u00e9"],  # non-ASCII
]


@pytest.mark.parametrize("values, expected", BEARER_OK)
def test_bearer_token_is_parsed(values: list[str], expected: str | None) -> None:
    """A single 'Bearer <token>' header yields its token; no header yields None."""
    assert bearer_token(values) == expected


@pytest.mark.parametrize("values", BEARER_REFUSED)
def test_malformed_authorization_is_refused(values: list[str]) -> None:
    """A malformed or repeated Authorization header is refused as token_invalid, quoting nothing of it."""
    with pytest.raises(IdentityRefused) as info:
        bearer_token(values)
    assert info.value.reason == "token_invalid"
    assert "dxnlcjpwyxnz" not in info.value.message.lower() and "a.b.c" not in info.value.message


def test_verified_token_repr_masks_token_and_claims() -> None:
    """The repr of a VerifiedToken shows who, never the raw token nor the claims."""
    from sidecar.fields import Secret

    vt = VerifiedToken(ISSUER, "alice", "human", "web", (AUD,), NOW, (), {"secret_claim": "s3cr3t"},
                       Secret("eyJraw.token.value", "bearer"))
    assert "eyJraw" not in repr(vt) and "s3cr3t" not in repr(vt) and "alice" in repr(vt)
