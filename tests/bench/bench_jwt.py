"""µs per JwtVerifier.verify for RS256, ES256 and EdDSA, with and without the result cache.

Run: ``python -m tests.bench.bench_jwt [iterations]`` (not part of the test run). For reference it
also times PyJWT's own ``jwt.decode`` with the same key object, and a verify with a PEM string
(PERFORMANCE.md: 42-60 ms, which is why keys are parsed to objects at load time).
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from sidecar.config import JwtIssuerConfig
from sidecar.identity.jwt import JwtVerifier

ISSUER = "https://login.example.com"
AUD = "billing-agent"
KEYS: dict[str, tuple[Any, Any]] = {
    "RS256": (rsa.generate_private_key(public_exponent=65537, key_size=2048), RSAAlgorithm),
    "ES256": (ec.generate_private_key(ec.SECP256R1()), ECAlgorithm),
    "EdDSA": (ed25519.Ed25519PrivateKey.generate(), OKPAlgorithm),
}


def _config(jwks_file: Path) -> JwtIssuerConfig:
    return JwtIssuerConfig(ISSUER, None, jwks_file, None, (AUD,), tuple(KEYS), None, 30.0, 86400.0, "auto")


def _token(alg: str, now: float) -> str:
    claims = {"iss": ISSUER, "sub": "svc-billing", "aud": AUD, "iat": int(now), "exp": int(now) + 3600,
              "client_id": "svc-billing", "scope": "invoices:read invoices:write", "jti": "a" * 22}
    return jwt.encode(claims, KEYS[alg][0], algorithm=alg, headers={"kid": alg})


async def _per_call_us(verifier: JwtVerifier, token: str, n: int) -> float:
    await verifier.verify(token)
    start = time.perf_counter()
    for _ in range(n):
        await verifier.verify(token)
    return (time.perf_counter() - start) / n * 1e6


def _pyjwt_us(alg: str, token: str, n: int, pem: bool = False) -> float:
    public = KEYS[alg][0].public_key()
    key: Any = public.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo) if pem else public
    start = time.perf_counter()
    for _ in range(n):
        jwt.decode(token, key, algorithms=[alg], audience=AUD, issuer=ISSUER)
    return (time.perf_counter() - start) / n * 1e6


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "jwks.json"
        jwks = [{**impl.to_jwk(k.public_key(), as_dict=True), "kid": alg} for alg, (k, impl) in KEYS.items()]
        path.write_text(json.dumps({"keys": jwks}))
        cached = JwtVerifier([_config(path)], refresh_interval=0)
        uncached = JwtVerifier([_config(path)], cache_size=0, refresh_interval=0)
        await cached.start()
        await uncached.start()
        print(f"{'alg':6} {'verify (no cache)':>18} {'verify (cached)':>16} {'pyjwt.decode':>13} "
              f"{'pyjwt PEM str':>14}   µs per call, n={n}")
        for alg in KEYS:
            token = _token(alg, time.time())
            print(f"{alg:6} {await _per_call_us(uncached, token, n):18.1f} "
                  f"{await _per_call_us(cached, token, n):16.2f} {_pyjwt_us(alg, token, n):13.1f} "
                  f"{_pyjwt_us(alg, token, max(n // 100, 3), pem=True):14.1f}")
        await cached.aclose()
        await uncached.aclose()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
