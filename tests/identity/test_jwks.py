"""JWKS key sets: parsing into key objects, files, a real HTTPS endpoint, rotation and failure."""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import trustme
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from sidecar.errors import IdentityRefused
from sidecar.identity import jwks
from sidecar.identity.jwks import ASYMMETRIC_ALGORITHMS, JwksError, parse_jwks
from sidecar.identity.jwt import JwtVerifier
from sidecar.observe.metrics import Metrics
from tests.identity.tokens import (ISSUER, Clock, Key, claims, ec_key, ed_key, issuer_config, rsa_key, sign,
                                   write_jwks)


def failures(metrics: Metrics, issuer: str = ISSUER) -> float:
    return metrics.registry.get_sample_value("sidecar_jwks_fetch_failures_total", {"issuer": issuer}) or 0.0


# -- parsing ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good() -> Key:
    return ec_key("good")


def _small_rsa_jwk() -> dict[str, Any]:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return {**RSAAlgorithm.to_jwk(small.public_key(), as_dict=True), "kid": "small"}


def _private_ec_jwk() -> dict[str, Any]:
    return {**ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()), as_dict=True), "kid": "private"}


IGNORED = [
    # JWK members that make a key unusable for verifying signatures: each is skipped, the good key kept.
    lambda g: {**g.jwk, "kid": "enc", "use": "enc"},  # RFC 7517 §4.2: an encryption key
    lambda g: {**g.jwk, "kid": "ops", "key_ops": ["encrypt"]},  # RFC 7517 §4.3: not for verify
    lambda g: {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},  # a symmetric key: never
    lambda g: {"kty": "XYZ", "kid": "weird"},  # an unsupported kty
    lambda g: {**g.jwk, "kid": "k256", "crv": "secp256k1"},  # a curve outside the allowed algorithms
    lambda g: {**g.jwk, "kid": "hs-alg", "alg": "HS256"},  # a JWK alg that is not asymmetric
    lambda g: {**g.jwk, "kid": "es384", "alg": "ES384"},  # a JWK alg its curve cannot do
    lambda g: {**g.jwk, "kid": "bad-x", "x": "AAAA"},  # not a point on the curve
    lambda g: {**g.jwk, "kid": 17},  # a kid that is not a string
    lambda g: _small_rsa_jwk(),  # RSA shorter than 2048 bits
    lambda g: _private_ec_jwk(),  # private key material published in a JWKS
    lambda g: "not-an-object",  # not a JWK at all
]


@pytest.mark.parametrize("bad", IGNORED)
def test_unusable_keys_are_ignored(good: Key, bad: Any) -> None:
    """An unusable JWK is skipped and the usable key beside it still loads."""
    keys = parse_jwks(json.dumps({"keys": [bad(good), good.jwk]}).encode(), ASYMMETRIC_ALGORITHMS)
    assert set(keys.by_kid) == {"good"} and keys.size == 1


@pytest.mark.parametrize("document", [
    b"not json",  # not JSON
    b"[]",  # not an object
    b'{"keys": {}}',  # keys is not a list
    b'{"keys": []}',  # no keys
    b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}',  # only a symmetric key
])
def test_jwks_without_usable_keys_is_an_error(document: bytes) -> None:
    """A JWKS with no usable key is an error, not an empty key set."""
    with pytest.raises(JwksError):
        parse_jwks(document, ASYMMETRIC_ALGORITHMS)


def test_key_algorithms_are_the_intersection_of_issuer_type_and_jwk_alg() -> None:
    """A key may verify only algorithms its type can do, the issuer allows and its JWK alg names."""
    rsa_plain, rsa_ps = rsa_key("r1").jwk, {**rsa_key("r2").jwk, "alg": "PS256"}
    doc = json.dumps({"keys": [rsa_plain, rsa_ps, ec_key("e1").jwk, ed_key("d1").jwk]}).encode()
    keys = parse_jwks(doc, frozenset({"RS256", "PS256", "ES256"}))
    assert {kid: ks[0].algorithms for kid, ks in keys.by_kid.items()} == {
        "r1": {"RS256", "PS256"}, "r2": {"PS256"}, "e1": {"ES256"}}
    assert keys.only_key_for_alg.keys() == {"RS256", "ES256"}  # PS256 has two keys


# -- files ------------------------------------------------------------------------------------


async def test_file_reload_keeps_last_good_keys_on_failure(tmp_path: Path) -> None:
    """A broken jwks_file on reload is logged and counted; the previous keys stay in force."""
    old, new = ec_key("old"), ec_key("new")
    path, metrics = write_jwks(tmp_path / "jwks.json", old), Metrics()
    v = JwtVerifier([issuer_config(jwks_file=path)], metrics=metrics, clock=Clock(), refresh_interval=0)
    await v.start()
    path.write_text("{broken")
    assert await v.reload() and failures(metrics) == 1
    assert (await v.verify(sign(old))).subject == "svc-billing"
    write_jwks(path, new)
    assert await v.reload()
    assert (await v.verify(sign(new))).subject == "svc-billing"
    await v.aclose()


async def test_missing_file_is_not_ready_and_fails_closed(tmp_path: Path) -> None:
    """An unreadable jwks_file leaves the verifier not ready, and tokens are refused with a clear message."""
    metrics = Metrics()
    v = JwtVerifier([issuer_config(jwks_file=tmp_path / "absent.json")], metrics=metrics, clock=Clock(),
                    refresh_interval=0)
    await v.start()
    assert not v.ready and failures(metrics) == 1
    with pytest.raises(IdentityRefused, match="no verification keys could be loaded"):
        await v.verify(sign(ec_key("x")))
    await v.aclose()


# -- a real HTTPS JWKS endpoint ---------------------------------------------------------------


@dataclass
class JwksServer:
    """An HTTPS JWKS endpoint on 127.0.0.1 with a test CA; what it serves can be changed."""

    url: str
    ca_file: Path
    keys: list[Key]
    status: int = 200
    hits: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.status == 302:
            raise web.HTTPFound("https://127.0.0.1:1/elsewhere")
        if self.status != 200:
            return web.Response(status=self.status, text="upstream trouble")
        return web.json_response({"keys": [k.jwk for k in self.keys]})


@pytest.fixture
async def jwks_server(tmp_path: Path) -> AsyncIterator[JwksServer]:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    server = JwksServer("", ca_file, [ec_key("k1")])
    app = web.Application()
    app.router.add_get("/jwks", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"https://127.0.0.1:{port}/jwks"
    yield server
    await runner.cleanup()


async def _verifier(server: JwksServer, clock: Clock, metrics: Metrics, **changes: Any) -> JwtVerifier:
    config = issuer_config(**{"jwks_uri": server.url, "ca": server.ca_file, **changes})
    v = JwtVerifier([config], metrics=metrics, clock=clock, refresh_interval=0)
    await v.start()
    return v


async def test_https_jwks_with_custom_ca(jwks_server: JwksServer) -> None:
    """Keys fetched over HTTPS, trusted through the configured CA, verify tokens."""
    v = await _verifier(jwks_server, Clock(), Metrics())
    assert v.ready and jwks_server.hits == 1
    assert (await v.verify(sign(jwks_server.keys[0]))).subject == "svc-billing"
    await v.aclose()


async def test_https_jwks_without_the_ca_is_refused(jwks_server: JwksServer) -> None:
    """Without the test CA the server is not trusted: the fetch fails, is counted, and tokens are refused."""
    metrics = Metrics()
    v = await _verifier(jwks_server, Clock(), metrics, ca=None)
    assert not v.ready and failures(metrics) == 1
    with pytest.raises(IdentityRefused, match="jwks unavailable"):
        await v.verify(sign(jwks_server.keys[0]))
    await v.aclose()


async def test_unknown_kid_triggers_one_refresh_and_accepts_the_rotated_key(jwks_server: JwksServer) -> None:
    """After the issuer rotates, the first token with the new kid refreshes the key set once and verifies."""
    v = await _verifier(jwks_server, Clock(), Metrics())
    new = ec_key("k2")
    jwks_server.keys = [jwks_server.keys[0], new]
    assert (await v.verify(sign(new))).subject == "svc-billing"
    assert (await v.verify(sign(new, claims(jti="2")))).subject == "svc-billing"
    assert jwks_server.hits == 2
    await v.aclose()


async def test_unknown_kid_refresh_is_rate_limited_and_single_flight(jwks_server: JwksServer) -> None:
    """Many unknown kids cause at most one fetch per interval, even when they arrive together."""
    clock = Clock()
    v = await _verifier(jwks_server, clock, Metrics())
    strangers = [sign(ec_key(f"unknown-{i}")) for i in range(20)]
    results = await asyncio.gather(*(v.verify(t) for t in strangers), return_exceptions=True)
    assert all(isinstance(r, IdentityRefused) for r in results)
    assert jwks_server.hits == 2  # start + one refresh
    clock.now += 29
    with pytest.raises(IdentityRefused, match="kid is not in the issuer's key set"):
        await v.verify(strangers[0])
    assert jwks_server.hits == 2
    clock.now += 2
    with pytest.raises(IdentityRefused):
        await v.verify(sign(ec_key("unknown-new")))  # a kid no refresh has looked for yet
    assert jwks_server.hits == 3
    await v.aclose()


async def test_a_repeated_stale_kid_does_not_hold_back_the_refresh_a_rotation_needs(jwks_server: JwksServer) -> None:
    """A kid a good refresh found absent spends no refresh slot again (for ABSENT_FOR): a caller repeating
    a stale or made-up kid every interval cannot keep the issuer's new key refused. Before, the rotated key
    was refused until the next slot, up to 30 s (the chaos harness's jwks-rotated row: 8-20 s of refusals)."""
    clock = Clock()
    v = await _verifier(jwks_server, clock, Metrics())
    stale = sign(ec_key("retired"))
    with pytest.raises(IdentityRefused, match="kid is not in the issuer's key set"):
        await v.verify(stale)
    assert jwks_server.hits == 2  # start + the stale kid's one refresh
    clock.now += 31
    with pytest.raises(IdentityRefused, match="kid is not in the issuer's key set"):
        await v.verify(stale)  # the slot is free again, but this kid was just looked for
    assert jwks_server.hits == 2
    new = ec_key("rotated-in")
    jwks_server.keys = [jwks_server.keys[0], new]
    assert (await v.verify(sign(new))).subject == "svc-billing"  # refreshed at once, not at the next slot
    assert jwks_server.hits == 3
    clock.now += jwks.ABSENT_FOR + 31
    with pytest.raises(IdentityRefused):
        await v.verify(stale)  # remembered only so long: looked for again
    assert jwks_server.hits == 4
    await v.aclose()


async def test_a_kid_is_not_remembered_absent_when_the_refresh_failed(jwks_server: JwksServer) -> None:
    """An unknown kid during an outage is not noted absent: the key set it was looked for in is the old one."""
    clock = Clock()
    v = await _verifier(jwks_server, clock, Metrics())
    new = ec_key("published-during-outage")
    jwks_server.status = 500
    with pytest.raises(IdentityRefused, match=r"\(jwks refresh failed\)"):
        await v.verify(sign(new))
    jwks_server.status, jwks_server.keys = 200, [jwks_server.keys[0], new]
    clock.now += 31
    assert (await v.verify(sign(new))).subject == "svc-billing"
    await v.aclose()


@pytest.mark.parametrize("status", [
    500,  # the endpoint is in trouble
    404,  # the endpoint moved
    302,  # a redirect is never followed (it could lead anywhere)
])
async def test_fetch_failure_fails_closed_and_keeps_previous_keys(jwks_server: JwksServer, status: int) -> None:
    """A failed refresh is counted; known keys keep working, unknown kids are refused saying why."""
    metrics = Metrics()
    v = await _verifier(jwks_server, Clock(), metrics)
    old = jwks_server.keys[0]
    jwks_server.status = status
    with pytest.raises(IdentityRefused, match=r"kid is not in the issuer's key set \(jwks refresh failed\)"):
        await v.verify(sign(ec_key("rotated")))
    assert failures(metrics) == 1 and v.ready
    assert (await v.verify(sign(old))).subject == "svc-billing"
    await v.aclose()


async def test_issuer_recovers_after_the_endpoint_comes_back(jwks_server: JwksServer) -> None:
    """An issuer whose JWKS failed at start is retried (rate-limited) on the next token and then works."""
    clock, metrics = Clock(), Metrics()
    jwks_server.status = 503
    v = await _verifier(jwks_server, clock, metrics)
    token = sign(jwks_server.keys[0])
    with pytest.raises(IdentityRefused, match="jwks unavailable"):
        await v.verify(token)  # retries once: start and this retry both fail
    jwks_server.status = 200
    with pytest.raises(IdentityRefused, match="jwks unavailable"):
        await v.verify(token)  # within the interval: no fetch
    assert (jwks_server.hits, failures(metrics)) == (2, 2)
    clock.now += 31
    assert (await v.verify(token)).subject == "svc-billing" and v.ready
    assert jwks_server.hits == 3
    await v.aclose()


async def test_unchanged_jwks_keeps_the_cache(jwks_server: JwksServer) -> None:
    """A refresh that returns the same document keeps the key set, so cached results stay valid."""
    v = await _verifier(jwks_server, Clock(), Metrics())
    token = sign(jwks_server.keys[0])
    first = await v.verify(token)
    assert await v.reload()
    assert await v.verify(token) is first and jwks_server.hits == 2
    await v.aclose()


async def test_background_refresh_picks_up_rotation(jwks_server: JwksServer) -> None:
    """The periodic refresh loads a rotated key set off the request path."""
    config = issuer_config(jwks_uri=jwks_server.url, ca=jwks_server.ca_file)
    v = JwtVerifier([config], clock=Clock(), refresh_interval=0.01, min_refresh_interval=3600)
    await v.start()
    new = ec_key("k2")
    jwks_server.keys = [new]
    for _ in range(500):
        if jwks_server.hits >= 3:
            break
        await asyncio.sleep(0.01)
    assert (await v.verify(sign(new))).subject == "svc-billing"
    await v.aclose()
