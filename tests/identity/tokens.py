"""Signing keys of each type, really signed tokens, the JWKS file that publishes them, an issuer's config
and an injected clock: what the JWT verification tests need to be an issuer themselves."""

from __future__ import annotations

import base64
import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from sidecar.config import JwtIssuerConfig

ISSUER = "https://login.example.com"
AUD = "billing-agent"
NOW = 1_750_000_000.0
DROP: Any = object()  # a claim value meaning "leave the claim out"


class Clock:
    """An injected clock: tests move it, nothing reads the wall clock."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Key:
    kid: str
    alg: str
    private: Any

    @property
    def jwk(self) -> dict[str, Any]:
        impl: Any = {"RS": RSAAlgorithm, "PS": RSAAlgorithm, "ES": ECAlgorithm, "Ed": OKPAlgorithm}[self.alg[:2]]
        return {**impl.to_jwk(self.private.public_key(), as_dict=True), "kid": self.kid, "use": "sig"}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo)


@functools.cache
def _rsa(n: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def rsa_key(kid: str = "rsa-1", n: int = 0) -> Key:
    return Key(kid, "RS256", _rsa(n))


def ec_key(kid: str = "ec-1") -> Key:
    return Key(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


def ed_key(kid: str = "ed-1") -> Key:
    return Key(kid, "EdDSA", ed25519.Ed25519PrivateKey.generate())


def claims(**changes: Any) -> dict[str, Any]:
    base = {"iss": ISSUER, "sub": "svc-billing", "aud": AUD, "iat": NOW - 10, "exp": NOW + 300}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not DROP}


def sign(key: Key, payload: Any = None, *, alg: str | None = None, **header: Any) -> str:
    """A really signed token; header values of DROP leave that header out."""
    alg = alg or key.alg
    fields = {k: v for k, v in {"alg": alg, "typ": "JWT", "kid": key.kid, **header}.items() if v is not DROP}
    body = payload if payload is not None else claims()
    signing_input = f"{b64(json.dumps(fields).encode())}.{b64(json.dumps(body).encode())}"
    return f"{signing_input}.{b64(jwt.get_algorithm_by_name(alg).sign(signing_input.encode(), key.private))}"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def issuer_config(**changes: Any) -> JwtIssuerConfig:
    base = JwtIssuerConfig(issuer=ISSUER, jwks_uri=None, jwks_file=None, ca=None, audiences=(AUD,),
                           algorithms=("RS256", "ES256", "EdDSA"), typ=None, leeway=30.0, max_lifetime=3600.0,
                           actor="auto")
    return replace(base, **changes)


def write_jwks(path: Path, *keys: Key, extra: tuple[dict[str, Any], ...] = ()) -> Path:
    path.write_text(json.dumps({"keys": [k.jwk for k in keys] + list(extra)}))
    return path
