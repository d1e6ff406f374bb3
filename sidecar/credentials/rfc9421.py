"""RFC 9421 HTTP Message Signatures over an outgoing request, and RFC 9530 ``Content-Digest``.

    component("@method") / component("content-type") / component("@query-param;name=Pet")
      -> a :class:`Component`: its identifier as signed and how to read its value from an
         :class:`~sidecar.credentials.base.OutboundRequest`, compiled once at config load
    signature_params(identifiers, params)  -> the ``@signature-params`` value (RFC 9421 §2.3)
    signature_base(lines, params)          -> the signature base (§2.5), one line per component
    load_key(algorithm, secret, encoding)  -> an :class:`Algorithm` holding the parsed key
    content_digest(body, "sha-256")        -> ``sha-256=:<base64>:`` (RFC 9530)

Component values are read from the request as ``sidecar.forward.http11`` writes it: the method,
scheme, ``Host`` (the upstream's authority, default port left out), the forwarded path and raw
query byte for byte, and each named header's field lines, trimmed and joined with ``", "``
(§2.1). A covered header that is absent, a repeated ``@query-param`` and a value that is not
printable ASCII (HTAB allowed in fields) cannot be signed faithfully and are refused (``bad_request``).

Algorithms (§3.3): ``hmac-sha256``; ``ed25519``; ``ecdsa-p256-sha256`` (the signature is
``r || s``, 64 bytes, not DER); ``rsa-pss-sha512`` (MGF1 with SHA-512, a 64-byte salt);
``rsa-v1_5-sha256``. Each also verifies, for the RFC's test vectors and tests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol
from urllib.parse import quote, unquote_plus

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from sidecar.credentials.base import OutboundRequest
from sidecar.errors import RequestRefused
from sidecar.fields import Secret

DERIVED: dict[str, Callable[[OutboundRequest], str]] = {
    "@method": lambda out: out.method,
    "@target-uri": lambda out: f"{out.scheme}://{out.host_header.lower()}{_target(out)}",
    "@authority": lambda out: out.host_header.lower(),
    "@scheme": lambda out: out.scheme.lower(),
    "@request-target": lambda out: _target(out),
    "@path": lambda out: out.path or "/",
    "@query": lambda out: f"?{out.query}",
}
QUERY_PARAM = "@query-param"
DIGESTS: dict[str, Callable[[bytes], Any]] = {"sha-256": hashlib.sha256, "sha-512": hashlib.sha512}
_FIELD_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
_QUERY_PARAM = re.compile(r"@query-param;name=([^\s\";]+)")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")  # what a structured-field string may hold (RFC 8941)
_BASE = re.compile(r"[\t\n\x20-\x7e]*")  # a signature base: printable lines (fields may hold HTAB)


def _target(out: OutboundRequest) -> str:
    return f"{out.path}?{out.query}" if out.query else out.path


def sf_string(value: str) -> str:
    """An RFC 8941 String: quoted, with ``\\`` and ``"`` escaped (``value`` is printable ASCII)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def is_sf_string(value: str) -> bool:
    """Whether ``value`` can be an RFC 8941 String (printable ASCII)."""
    return bool(_PRINTABLE.fullmatch(value))


# --- components ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Component:
    """One covered component: its serialized identifier and how to read its value."""

    name: str  # "@method", "content-type", "@query-param"
    identifier: str  # as it appears in the base and in Signature-Input: '"@query-param";name="Pet"'
    read: Callable[[OutboundRequest], str] = field(repr=False, compare=False)

    def value(self, out: OutboundRequest) -> str:
        return self.read(out)


def component(text: str) -> Component:
    """A component from its config spelling; ``ValueError`` says what was expected."""
    name = text.strip().lower() if not text.startswith("@query-param") else text.strip()
    if name in DERIVED:
        return Component(name, sf_string(name), DERIVED[name])
    match = _QUERY_PARAM.fullmatch(name)
    if match:
        return _query_param(match.group(1))
    if name.startswith("@"):
        raise ValueError(f"{text!r} is not a derived component this signer supports "
                         f"({', '.join([*DERIVED, QUERY_PARAM + ';name=NAME'])})")
    if not _FIELD_NAME.fullmatch(name):
        raise ValueError(f"{text!r} is not an HTTP field name")
    return Component(name, sf_string(name), lambda out: header_value(out, name))


def _query_param(encoded_name: str) -> Component:
    wanted = unquote_plus(encoded_name)
    identifier = f'{sf_string(QUERY_PARAM)};name={sf_string(_form_encode(wanted))}'
    return Component(QUERY_PARAM, identifier, lambda out: query_param(out.query, wanted))


def header_value(out: OutboundRequest, name: str) -> str:
    """A covered field's value as written: each field line trimmed, lines joined by ", " (§2.1)."""
    values = out.headers.getall(name, ())
    if not values:
        raise RequestRefused("bad_request", f"http_signature: the covered header {name} is not on the request; "
                                            f"expected it, since the upstream's signature covers it")
    return ", ".join([v.strip(" \t") for v in values])


def query_param(query: str, wanted: str) -> str:
    """The value of one query parameter, decoded as a form and re-encoded (§2.2.8)."""
    values = [unquote_plus(value) for name, _, value in (p.partition("=") for p in query.split("&") if p)
              if unquote_plus(name) == wanted]
    if len(values) != 1:
        found = "is not in the query" if not values else "occurs more than once"
        raise RequestRefused("bad_request", f"http_signature: the covered query parameter {wanted!r} {found}; "
                                            f"expected it exactly once")
    return _form_encode(values[0])


def _form_encode(value: str) -> str:
    """The application/x-www-form-urlencoded percent-encode set, a space as %20 (RFC 9421 §2.2.8)."""
    return quote(value, safe="*").replace("~", "%7E")


# --- the signature base ----------------------------------------------------------------


def signature_params(identifiers: tuple[str, ...], params: list[tuple[str, int | str]]) -> str:
    """The ``@signature-params`` value: the inner list of identifiers, then each parameter."""
    shown = "".join([f";{name}={value if isinstance(value, int) else sf_string(value)}" for name, value in params])
    return f"({' '.join(identifiers)}){shown}"


def signature_base(lines: list[tuple[str, str]], params: str) -> str:
    """The signature base (§2.5): ``identifier: value`` per component, then ``@signature-params``;
    a value that is not printable ASCII (HTAB allowed) is refused."""
    base = "".join([f"{identifier}: {value}\n" for identifier, value in lines]) + f'"@signature-params": {params}'
    if not _BASE.fullmatch(base) or base.count("\n") != len(lines):
        identifier = next((i for i, value in lines if not _PRINTABLE.fullmatch(value.replace("\t", " "))),
                          '"@signature-params"')
        raise RequestRefused("bad_request", f"http_signature: the covered component {identifier} is not printable "
                                            f"ASCII; expected it to be")
    return base


def content_digest(body: bytes, algorithm: str) -> str:
    """The ``Content-Digest`` field value of a body (RFC 9530): ``sha-256=:<base64>:``."""
    digest = DIGESTS[algorithm](body).digest()
    return f"{algorithm}=:{base64.b64encode(digest).decode()}:"


# --- algorithms ------------------------------------------------------------------------


class Algorithm(Protocol):
    @property
    def name(self) -> str: ...

    def sign(self, base: bytes) -> bytes: ...

    def verify(self, base: bytes, signature: bytes) -> bool: ...

    def public_id(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class HmacSha256:
    name = "hmac-sha256"
    secret: bytes = field(repr=False)

    def sign(self, base: bytes) -> bytes:
        return hmac.digest(self.secret, base, "sha256")

    def verify(self, base: bytes, signature: bytes) -> bool:
        return verify_with(self.name, self.secret, base, signature)

    def public_id(self) -> bytes:
        return self.secret  # only ever passed through a keyed hash


@dataclass(frozen=True, slots=True)
class AsymmetricKey:
    """An Ed25519, ECDSA P-256 or RSA private key, parsed once, with its RFC 9421 algorithm."""

    name: str
    private: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = field(repr=False)

    def sign(self, base: bytes) -> bytes:
        key = self.private
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(base)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            r, s = decode_dss_signature(key.sign(base, ec.ECDSA(hashes.SHA256())))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return key.sign(base, *_rsa_scheme(self.name))

    def verify(self, base: bytes, signature: bytes) -> bool:
        return verify_with(self.name, self.private.public_key(), base, signature)

    def public_id(self) -> bytes:
        return self.private.public_key().public_bytes(serialization.Encoding.DER,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo)


def _rsa_scheme(name: str) -> tuple[padding.AsymmetricPadding, hashes.HashAlgorithm]:
    if name == "rsa-pss-sha512":
        return padding.PSS(mgf=padding.MGF1(hashes.SHA512()), salt_length=64), hashes.SHA512()
    return padding.PKCS1v15(), hashes.SHA256()


def verify_with(name: str, public: object, base: bytes, signature: bytes) -> bool:
    """Verify ``signature`` over ``base`` with a public key (the shared secret for HMAC), as an
    RFC 9421 verifier would."""
    try:
        if isinstance(public, bytes):
            return hmac.compare_digest(hmac.digest(public, base, "sha256"), signature)
        if isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, base)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            if len(signature) != 64:
                return False
            der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
            public.verify(der, base, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, base, *_rsa_scheme(name))
        else:
            return False
    except InvalidSignature:
        return False
    return True


ALGORITHMS = ("hmac-sha256", "ed25519", "ecdsa-p256-sha256", "rsa-pss-sha512", "rsa-v1_5-sha256")
KEY_ENCODINGS = ("base64", "hex", "utf-8")
MIN_RSA_BITS = 2048
_KEY_KIND = {"ed25519": "an Ed25519", "ecdsa-p256-sha256": "an EC P-256", "rsa-pss-sha512": "an RSA (2048 bits or more)",
             "rsa-v1_5-sha256": "an RSA (2048 bits or more)"}


def load_key(algorithm: str, secret: Secret, encoding: str = "base64") -> Algorithm:
    """The signing key for ``algorithm``, parsed once; ``ValueError`` says what was expected
    (never anything of the key itself)."""
    if algorithm == "hmac-sha256":
        return HmacSha256(shared_secret(secret.reveal(), encoding))
    try:
        private = serialization.load_pem_private_key(secret.reveal().encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("must be an unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1)") from None
    if isinstance(private, (ed25519.Ed25519PrivateKey, ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)) \
            and _fits(algorithm, private):
        return AsymmetricKey(algorithm, private)
    raise ValueError(f"must be {_KEY_KIND[algorithm]} private key for {algorithm}")


def _fits(algorithm: str, private: object) -> bool:
    if algorithm == "ed25519":
        return isinstance(private, ed25519.Ed25519PrivateKey)
    if algorithm == "ecdsa-p256-sha256":
        return isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP256R1)
    return isinstance(private, rsa.RSAPrivateKey) and private.key_size >= MIN_RSA_BITS


def shared_secret(text: str, encoding: str, use: str = "hmac-sha256") -> bytes:
    """An HMAC key from its configured text; ``ValueError`` names the expected form, never the key."""
    try:
        if encoding == "base64":
            secret = base64.b64decode(text, validate=True)
        elif encoding == "hex":
            secret = bytes.fromhex(text)
        else:
            secret = text.encode()
    except ValueError:
        raise ValueError(f"must be a shared secret in {encoding} (key_encoding)") from None
    if len(secret) < 32:
        raise ValueError(f"must be a shared secret of at least 32 bytes for {use}")
    return secret
