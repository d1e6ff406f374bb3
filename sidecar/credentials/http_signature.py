"""``http_signature``: sign the agent's requests with RFC 9421 HTTP Message Signatures.

    credentials:
      partner-sig:
        type: http_signature
        algorithm: ed25519       # hmac-sha256 | ed25519 | ecdsa-p256-sha256 | rsa-pss-sha512 | rsa-v1_5-sha256
        key: {from_file: /var/run/keys/partner.pem}   # PEM private key; hmac-sha256: the shared secret
        key_encoding: base64     # hmac-sha256 only: base64 | hex | utf-8
        keyid: partner-2026      # the keyid parameter (optional)
        label: sig1              # the Signature / Signature-Input dictionary key
        components: ["@method", "@target-uri", "content-type", "content-digest"]
        content_digest: sha-256  # when content-digest is covered: sha-256 | sha-512 (RFC 9530)
        created: true            # the created parameter
        expires: 5m              # optional: expires = created + this
        nonce: false             # a fresh random nonce per request
        tag: partner-api         # optional tag parameter
        alg: false               # also sign the alg parameter

The key is read and parsed once, at load (a wrong kind of key for the algorithm is a config
error with its path); per request the work is reading the covered values, building the base and
one signature. ``apply`` runs after every other header rewrite, so what is signed is what
``sidecar.forward.http11`` writes: ``Host`` as written, the forwarded path and raw query, and, when
``content-length`` or ``content-digest`` is covered, the body read whole (within the outbound
``max_body_bytes``, else ``body_too_large``) and framed with the ``Content-Length`` the
upstream writer then sends (:func:`sidecar.http.headers.framed_length`). The agent's own
``Signature``, ``Signature-Input`` (and, with a digest, ``Content-Digest``) are dropped.
A covered header that is missing, or not printable ASCII, refuses the request (``bad_request``).

The credential is the key: standing, like ``static``; its id is a keyed hash of the public key
(of the shared secret for HMAC).
"""

from __future__ import annotations

import base64
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import ClassVar, Hashable, Mapping

from sidecar.credentials.base import Credential, CredentialRequest, OutboundRequest, ProviderDeps, keyed_id
from sidecar.credentials.rfc9421 import (
    ALGORITHMS, DIGESTS, KEY_ENCODINGS, Algorithm, Component, component, content_digest, is_sf_string, load_key,
    signature_base, signature_params,
)
from sidecar.errors import CredentialUnavailable
from sidecar.fields import Fields, Secret
from sidecar.http.headers import framed_length

TYPE = "http_signature"
DEFAULT_LABEL = "sig1"
NONCE_BYTES = 16
# Written by the sidecar or by the connection, never signed from the agent's copy.
NOT_COVERABLE = frozenset({"signature", "signature-input", "connection", "keep-alive", "proxy-connection", "te",
                           "trailer", "transfer-encoding", "upgrade"})
_LABEL = re.compile(r"[a-z*][a-z0-9_.*-]{0,63}")


@dataclass(frozen=True, slots=True)
class Spec:
    key: Algorithm = field(repr=False)
    components: tuple[Component, ...]
    label: str = DEFAULT_LABEL
    keyid: str | None = None
    tag: str | None = None
    content_digest: str | None = None  # the digest algorithm when content-digest is covered
    created: bool = True
    expires: float | None = None  # seconds after created
    nonce: bool = False
    alg: bool = False

    @property
    def reads_body(self) -> bool:
        """Whether signing needs the whole body: its digest or its length is covered."""
        return self.content_digest is not None or any(c.name == "content-length" for c in self.components)


# --- config ----------------------------------------------------------------------------


def parse(name: str, f: Fields) -> Spec | None:
    before = len(f.errors)
    algorithm = f.choice("algorithm", ALGORITHMS, required=True)
    key = _key(f, algorithm)
    components = _components(f)
    digest = f.choice("content_digest", tuple(DIGESTS), "sha-256")
    covers_digest = any(c.name == "content-digest" for c in components)
    if f.has("content_digest") and not covers_digest:
        f.error("content_digest", "is set, but components do not cover content-digest")
    keyid, tag = _sf_string(f, "keyid"), _sf_string(f, "tag")
    label = f.text("label", DEFAULT_LABEL)
    if not _LABEL.fullmatch(label):
        f.error("label", "must be a structured-field key: lowercase letters, digits, '_', '-', '.', '*'")
    expires = f.duration("expires")
    if expires is not None and expires < 1:
        f.error("expires", "must be at least 1s")
    created, nonce, alg = f.flag("created", True), f.flag("nonce", False), f.flag("alg", False)
    if key is None or len(f.errors) > before:
        return None
    return Spec(key, components, label, keyid, tag, digest if covers_digest else None, created, expires, nonce, alg)


def _key(f: Fields, algorithm: str | None) -> Algorithm | None:
    encoding = f.choice("key_encoding", KEY_ENCODINGS, "base64")
    if f.has("key_encoding") and algorithm not in (None, "hmac-sha256"):
        f.error("key_encoding", "applies only to hmac-sha256 (other keys are PEM)")
    secret: Secret | None = f.secret("key", required=True)
    if secret is None or algorithm is None:
        return None
    try:
        return load_key(algorithm, secret, encoding)
    except ValueError as exc:
        f.error("key", str(exc))
        return None


def _components(f: Fields) -> tuple[Component, ...]:
    parsed: list[Component] = []
    for i, text in enumerate(f.text_list("components", required=True)):
        try:
            item = component(text)
        except ValueError as exc:
            f.error(f"components[{i}]", f"{exc}")
            continue
        if item.name in NOT_COVERABLE:
            f.error(f"components[{i}]", f"{item.name} cannot be covered: the sidecar or the connection writes it")
        elif item.identifier in {c.identifier for c in parsed}:
            f.error(f"components[{i}]", f"{text!r} is listed twice")
        else:
            parsed.append(item)
    return tuple(parsed)


def _sf_string(f: Fields, key: str) -> str | None:
    value = f.text(key)
    if value is not None and not is_sf_string(value):
        f.error(key, "must be printable ASCII")
        return None
    return value


# --- the provider ----------------------------------------------------------------------


class HttpSignatureProvider:
    type: ClassVar[str] = TYPE
    needs_body: ClassVar[bool] = False  # per credential: needs_body_for
    standing: ClassVar[bool] = True
    task_bound: ClassVar[bool] = False

    def __init__(self, name: str, spec: Spec, deps: ProviderDeps) -> None:
        self.name = name
        self._spec = spec
        self._clock = deps.clock or time.time
        self._identifiers = tuple(c.identifier for c in spec.components)
        self._reads_body = spec.reads_body
        self._dropped = ("Signature", "Signature-Input", *(("Content-Digest",) if spec.content_digest else ()))
        self._credential = Credential(type=TYPE, provider=name, standing=True,
                                      id=keyed_id(deps.id_key, spec.key.public_id().hex()))

    def cache_key(self, req: CredentialRequest) -> Hashable:
        return self.name

    async def fetch(self, req: CredentialRequest) -> Credential:
        return self._credential

    def needs_body_for(self, headers: Mapping[str, str]) -> bool:
        return self._reads_body

    def apply(self, out: OutboundRequest, credential: Credential) -> None:
        spec = self._spec
        for header in self._dropped:
            out.headers.popall(header, None)
        if self._reads_body:
            self._frame(out)
        params = signature_params(self._identifiers, self._params())
        lines = [(c.identifier, c.value(out)) for c in spec.components]
        signature = spec.key.sign(signature_base(lines, params).encode("ascii"))
        out.headers["Signature-Input"] = f"{spec.label}={params}"
        out.headers["Signature"] = f"{spec.label}=:{base64.b64encode(signature).decode()}:"

    def _frame(self, out: OutboundRequest) -> None:
        """The length and digest of the body exactly as ``sidecar.forward.http11`` will send it."""
        if out.body is None:
            raise CredentialUnavailable(f"credentials: {self.name}: the request body was not read; expected it "
                                        f"whole to sign its length or digest", detail="http_signature: no body")
        length = framed_length(out.method, out.body)
        if length is None:
            out.headers.popall("Content-Length", None)
        else:
            out.headers["Content-Length"] = length
        if self._spec.content_digest is not None:
            out.headers["Content-Digest"] = content_digest(out.body, self._spec.content_digest)

    def _params(self) -> list[tuple[str, int | str]]:
        spec = self._spec
        now = int(self._clock())
        params: list[tuple[str, int | str]] = [("created", now)] if spec.created else []
        if spec.expires is not None:
            params.append(("expires", now + int(spec.expires)))
        if spec.keyid is not None:
            params.append(("keyid", spec.keyid))
        if spec.nonce:
            params.append(("nonce", secrets.token_urlsafe(NONCE_BYTES)))
        if spec.tag is not None:
            params.append(("tag", spec.tag))
        if spec.alg:
            params.append(("alg", spec.key.name))
        return params

    async def aclose(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"HttpSignatureProvider({self.name!r}, algorithm={self._spec.key.name!r})"


PROVIDER = HttpSignatureProvider
