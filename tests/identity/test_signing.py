"""The sidecar's own signing key: a key file that cannot be used says what was expected."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.identity.signing import SigningKeyError, load_signing_key


def _rsa_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "expected an unencrypted pem private key (FileNotFoundError)"),  # no file at the path
        (b"not a key", "expected an unencrypted pem private key (ValueError)"),  # not PEM
        (_rsa_pem(), "must be an EC P-256 (ES256) or Ed25519 (EdDSA) private key"),  # RSA is not offered
    ],
)
def test_an_unusable_signing_key_says_what_was_expected(tmp_path: Path, content: bytes | None,
                                                         expected: str) -> None:
    """Missing, unreadable and unsupported keys are refused at load with the fix in the message."""
    path = tmp_path / "signing-key.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SigningKeyError, match=re.escape(expected)):
        load_signing_key(path, None)
