"""``hmac_signing``: a vendor's HMAC request signature, its canonical string declared in config.

    credentials:
      exchange:
        type: hmac_signing
        key: {from_env: EXCHANGE_SECRET}
        key_encoding: utf-8        # utf-8 | base64 | hex: how the key is written
        algorithm: sha256          # sha256 | sha512
        encoding: hex              # hex | base64: how the signature is written
        canonical: [method, target, timestamp, body]   # ordered parts (sidecar.credentials.canonical)
        separator: ""              # between parts
        signature: {header: X-Signature}               # or {query: NAME}; scheme: "..." before it
        timestamp: {header: X-Timestamp, format: unix} # unix | unix_ms | iso8601 (optional)
        nonce: {header: X-Nonce}   # a fresh random nonce per request (optional)
        key_id: {header: X-Api-Key, value: {from_env: EXCHANGE_KEY}}          # optional

Per request: the agent's own copies of every header and query parameter the scheme writes are
dropped; the timestamp, nonce and key id are placed (a query parameter joins the end of the
query, so a part ``query`` covers it); when a part reads the body it is read whole and framed
with the ``Content-Length`` the upstream writer sends; then the canonical string is built from
the request as ``sidecar.forward.http11`` writes it, signed, and the signature placed last.

The credential is the key: standing, like ``static``; its id is a keyed hash of the key.
"""

from __future__ import annotations

import base64
import hmac
import secrets
import time
from datetime import datetime, timezone
from typing import Callable, ClassVar, Hashable, Mapping

from sidecar.credentials.base import (
    Credential, CredentialRequest, OutboundRequest, ProviderDeps, frame_for_signing, keyed_id,
)
from sidecar.credentials.canonical import Signing, canonical_chunks, without_params
from sidecar.credentials.placement import Placement
from sidecar.credentials.specs import HmacSigningSpec

NONCE_BYTES = 16
TIMESTAMPS: dict[str, Callable[[float], str]] = {
    "unix": lambda now: str(int(now)),
    "unix_ms": lambda now: str(int(now * 1000)),
    "iso8601": lambda now: datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds")
    .replace("+00:00", "Z"),
}


class HmacSigningProvider:
    type: ClassVar[str] = HmacSigningSpec.type
    needs_body: ClassVar[bool] = False  # per credential: needs_body_for
    standing: ClassVar[bool] = True
    task_bound: ClassVar[bool] = False

    def __init__(self, name: str, spec: HmacSigningSpec, deps: ProviderDeps) -> None:
        self.name = name
        self._spec = spec
        self._clock = deps.clock or time.time
        self._format_time = TIMESTAMPS[spec.timestamp_format]
        self._headers = tuple(p.header for p in spec.placements if p.header is not None)
        self._params = frozenset(p.query for p in spec.placements if p.query is not None)
        self._credential = Credential(type=self.type, provider=name, standing=True,
                                      id=keyed_id(deps.id_key, spec.key.hex()))

    def cache_key(self, req: CredentialRequest) -> Hashable:
        return self.name

    async def fetch(self, req: CredentialRequest) -> Credential:
        return self._credential

    def needs_body_for(self, headers: Mapping[str, str]) -> bool:
        return self._spec.canonical.reads_body

    def apply(self, out: OutboundRequest, credential: Credential) -> None:
        spec = self._spec
        self._drop(out)
        signing = self._signing(out)
        _place(out, spec.timestamp, signing.timestamp)
        _place(out, spec.nonce, signing.nonce)
        _place(out, spec.key_id, signing.key_id)
        if spec.canonical.reads_body:
            frame_for_signing(self.name, self.type, out, "a body part of its canonical string")
        mac = hmac.new(spec.key, digestmod=spec.algorithm)
        for chunk in canonical_chunks(spec.canonical, signing, spec.separator):
            mac.update(chunk)
        digest = mac.digest()
        _place(out, spec.signature, digest.hex() if spec.encoding == "hex" else base64.b64encode(digest).decode())

    def _drop(self, out: OutboundRequest) -> None:
        """The agent's own signature, timestamp, nonce and key id never reach the upstream."""
        for header in self._headers:
            out.headers.popall(header, None)
        if self._params:
            out.query = without_params(out.query, self._params)

    def _signing(self, out: OutboundRequest) -> Signing:
        spec = self._spec
        return Signing(out, spec.algorithm,
                       timestamp=self._format_time(self._clock()) if spec.timestamp is not None else "",
                       nonce=secrets.token_hex(NONCE_BYTES) if spec.nonce is not None else "",
                       key_id=spec.key_id_value.reveal() if spec.key_id_value is not None else "")

    async def aclose(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"HmacSigningProvider({self.name!r}, algorithm={self._spec.algorithm!r})"


def _place(out: OutboundRequest, placement: Placement | None, value: str) -> None:
    if placement is not None:
        placement.apply(out, placement.format(value))
