"""The sidecar's own JWT signing key: actor tokens, client assertions, JWT assertions.

The key comes from ``identity.signing_key`` (ES256 for EC P-256, EdDSA for Ed25519), or,
in development only, is generated in ``state_dir``. The private key object is loaded once
(passing a PEM to PyJWT per call costs 42-60 ms, PERFORMANCE.md). The public keys are
served as a JWKS; after a rotation the previous public key stays published until the
tokens signed with it have expired.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from sidecar.config_model import SigningKeyConfig

KEEP_PREVIOUS_FOR = 24 * 3600.0


class SigningKeyError(ValueError):
    """The signing key file is missing, unreadable or of an unsupported type."""


@dataclass(frozen=True)
class SigningKey:
    kid: str
    algorithm: str  # ES256 | EdDSA
    private: Any = field(repr=False)

    def public_jwk(self) -> dict[str, Any]:
        import jwt  # PyJWT when a token is first signed or the JWKS served, not at start-up

        jwk: dict[str, Any] = json.loads(jwt.algorithms.get_default_algorithms()[self.algorithm].to_jwk(self.private.public_key()))
        jwk.update({"kid": self.kid, "use": "sig", "alg": self.algorithm})
        return jwk


def load_signing_key(path: Path, kid: str | None) -> SigningKey:
    try:
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SigningKeyError(f"identity: cannot load signing key {path}: expected an unencrypted pem "
                              f"private key ({type(exc).__name__})") from None
    if isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP256R1):
        algorithm = "ES256"
    elif isinstance(private, ed25519.Ed25519PrivateKey):
        algorithm = "EdDSA"
    else:
        raise SigningKeyError("identity: signing_key must be an EC P-256 (ES256) or Ed25519 (EdDSA) private key")
    return SigningKey(kid or _thumbprint_kid(private), algorithm, private)


def dev_signing_key(state_dir: Path) -> SigningKey:
    """A development key kept in state_dir (created 0600 on first use)."""
    path = state_dir / "signing-key.pem"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
    return load_signing_key(path, None)


def _thumbprint_kid(private: Any) -> str:
    der = private.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


class Signer:
    """Signs JWTs with the current key; publishes current and recent public keys."""

    def __init__(self, key: SigningKey, issuer: str) -> None:
        self.key = key
        self.issuer = issuer
        self._previous: list[tuple[SigningKey, float]] = []

    def rotate(self, key: SigningKey) -> None:
        if key.kid != self.key.kid:
            now = time.time()
            self._previous = [(k, until) for k, until in self._previous if until > now]
            self._previous.append((self.key, now + KEEP_PREVIOUS_FOR))
            self.key = key

    def sign(self, claims: dict[str, Any], *, ttl: float, typ: str = "JWT") -> tuple[str, str, float]:
        """(token, jti, exp) for claims plus iss (default), iat, exp, jti."""
        now = int(time.time())
        jti = uuid.uuid4().hex
        exp = now + int(ttl)
        payload = {"iss": self.issuer, "iat": now, "nbf": now - 5, "exp": exp, "jti": jti, **claims}
        import jwt  # see SigningKey.public_jwk

        token = jwt.encode(payload, self.key.private, algorithm=self.key.algorithm,
                           headers={"kid": self.key.kid, "typ": typ})
        return token, jti, float(exp)

    def jwks(self) -> dict[str, Any]:
        """Read only (pruned in :meth:`rotate`): the health thread serves it while the loop may rotate."""
        now = time.time()
        previous = [k for k, until in self._previous if until > now]
        return {"keys": [self.key.public_jwk(), *(k.public_jwk() for k in previous)]}

    def __repr__(self) -> str:
        return f"Signer(kid={self.key.kid!r}, alg={self.key.algorithm!r}, issuer={self.issuer!r})"


def build_signer(config: SigningKeyConfig | None, state_dir: Path, issuer: str) -> Signer:
    key = load_signing_key(config.file, config.kid) if config else dev_signing_key(state_dir)
    return Signer(key, issuer)
