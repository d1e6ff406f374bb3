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
import secrets
import time
from typing import ClassVar, Hashable, Mapping

from sidecar.credentials.base import (
    Credential, CredentialRequest, OutboundRequest, ProviderDeps, frame_for_signing, keyed_id,
)
from sidecar.credentials.rfc9421 import content_digest, signature_base, signature_params
from sidecar.credentials.specs import HttpSignatureSpec

NONCE_BYTES = 16


class HttpSignatureProvider:
    type: ClassVar[str] = HttpSignatureSpec.type
    needs_body: ClassVar[bool] = False  # per credential: needs_body_for
    standing: ClassVar[bool] = True
    task_bound: ClassVar[bool] = False

    def __init__(self, name: str, spec: HttpSignatureSpec, deps: ProviderDeps) -> None:
        self.name = name
        self._spec = spec
        self._clock = deps.clock or time.time
        self._identifiers = tuple(c.identifier for c in spec.components)
        self._reads_body = spec.reads_body
        self._dropped = ("Signature", "Signature-Input", *(("Content-Digest",) if spec.content_digest else ()))
        self._credential = Credential(type=self.type, provider=name, standing=True,
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
        body = frame_for_signing(self.name, self.type, out, "its length or digest")
        if self._spec.content_digest is not None:
            out.headers["Content-Digest"] = content_digest(body, self._spec.content_digest)

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
