"""Peer X.509-SVID verification: trust bundles per trust domain, and one verification per peer.

A bundle vouches only for IDs in its own trust domain: a leaf claiming ``spiffe://example.org/...``
is verified against the ``example.org`` bundle and nothing else, so a federated partner's CA can
never mint identities in our domain (SPIFFE Trust Domain and Bundle standard, section 4).

The order of checks makes each refusal reason distinct and stable:

1. no leaf at all                                  -> ``no_client_cert``
2. validity dates of the leaf                      -> ``expired`` / ``not_yet_valid``
3. the leaf's shape and SPIFFE ID (``spiffe.py``)  -> ``not_spiffe`` / ``ca_as_leaf`` / ``bad_key_usage`` / ``malformed``
4. its trust domain is one we accept               -> ``foreign_trust_domain``
5. the chain verifies against that domain's bundle -> ``peer_unverified``

Step 5 uses ``cryptography``'s client verifier (a web-PKI profile). Two of its rules matter here:
the leaf must carry a SAN (always true once step 3 passed) and, when it has an extended key usage,
that must include ``clientAuth`` (a ``serverAuth``-only SVID is refused, as OpenSSL also does). Its
requirement that the leaf carry an authority key identifier is relaxed: the X.509-SVID standard
does not demand one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import verification

from sidecar.errors import IdentityRefused
from sidecar.identity.spiffe import (
    LEAF_REJECT_REASONS,
    LeafRejected,
    SpiffeId,
    parse_trust_domain,
    spiffe_id_from_certificate,
)

PEER_REJECT_REASONS = frozenset(
    {"no_client_cert", "peer_unverified", "expired", "not_yet_valid", "foreign_trust_domain"}
) | LEAF_REJECT_REASONS
"""Every ``PeerRejected.reason``: a bounded label for ``tls_handshake_failures_total``."""

MAX_INTERMEDIATES = 8
"""A peer presenting more intermediates than this is refused before any parsing of them."""

# The web-PKI profile, except that a leaf need not carry an authority key identifier.
_CA_POLICY = verification.ExtensionPolicy.webpki_defaults_ca()
_EE_POLICY = verification.ExtensionPolicy.webpki_defaults_ee().may_be_present(
    x509.AuthorityKeyIdentifier, verification.Criticality.NON_CRITICAL, None
)

_REQUEST_REASON = {"no_client_cert": "no_client_cert", "foreign_trust_domain": "foreign_trust_domain"}


class BundleError(ValueError):
    """A trust bundle that cannot be used; the message names the domain and file."""


class PeerRejected(Exception):
    """A peer certificate that was refused; ``reason`` is one of :data:`PEER_REJECT_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in PEER_REJECT_REASONS:
            raise ValueError(f"identity: unknown peer rejection reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message

    @property
    def request_reason(self) -> str:
        """The request-level reason code (``sidecar.errors.STATUS``) this rejection maps to."""
        return _REQUEST_REASON.get(self.reason, "peer_unverified")

    def refusal(self) -> IdentityRefused:
        """The request-level refusal (401 or 403) with the detailed reason as its detail."""
        return IdentityRefused(self.request_reason, self.message, detail=self.reason)

    def __repr__(self) -> str:
        return f"PeerRejected({self.reason!r}, {self.message!r})"


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """A verified caller: its SPIFFE ID, trust domain, leaf fingerprint and leaf expiry."""

    spiffe_id: SpiffeId  # parsed at the handshake; a string only in the event, XFCC and CEL
    trust_domain: str
    cert_sha256: str
    not_after: datetime


@dataclass(frozen=True)
class TrustBundles:
    """Our own trust domain's CA certificates and those of federated domains, each with its Store.

    Build with :meth:`load` or :meth:`from_pem`; the Stores are built once, there.
    """

    trust_domain: str
    own: tuple[x509.Certificate, ...]
    federated: Mapping[str, tuple[x509.Certificate, ...]]
    _stores: Mapping[str, verification.Store] = field(repr=False, compare=False)

    @classmethod
    def load(
        cls, own_bundle_path: Path, own_trust_domain: str, federated: Mapping[str, Path]
    ) -> TrustBundles:
        """Read and parse every bundle file once; raises :class:`BundleError` on the first bad one."""
        own_pem = _read(own_bundle_path, own_trust_domain)
        return cls.from_pem(
            own_pem,
            own_trust_domain,
            {domain: _read(path, domain) for domain, path in federated.items()},
            sources={own_trust_domain: str(own_bundle_path)}
            | {domain: str(path) for domain, path in federated.items()},
        )

    @classmethod
    def from_pem(
        cls,
        own_pem: bytes,
        own_trust_domain: str,
        federated: Mapping[str, bytes],
        *,
        sources: Mapping[str, str] | None = None,
    ) -> TrustBundles:
        """Parse PEM bundles (own and per federated domain) and build one Store per domain."""
        names = dict(sources or {})
        own_domain = _domain(own_trust_domain)
        own = _parse_bundle(own_pem, own_domain, names.get(own_trust_domain))
        partners: dict[str, tuple[x509.Certificate, ...]] = {}
        for raw_domain, pem in federated.items():
            domain = _domain(raw_domain)
            if domain == own_domain:
                raise BundleError(
                    f"identity: federated bundle for {domain} is our own trust domain; "
                    "expected only other domains"
                )
            partners[domain] = _parse_bundle(pem, domain, names.get(raw_domain))
        stores = {d: verification.Store(list(c)) for d, c in ({own_domain: own} | partners).items()}
        return cls(own_domain, own, MappingProxyType(partners), MappingProxyType(stores))

    @property
    def domains(self) -> frozenset[str]:
        """Every trust domain with a bundle: ours and the federated ones."""
        return frozenset(self._stores)

    def store_for(self, trust_domain: str) -> verification.Store | None:
        """The Store that may vouch for IDs in ``trust_domain``, or None without a bundle."""
        return self._stores.get(trust_domain)

    def ca_pems(self) -> list[bytes]:
        """Every CA of every domain as PEM, for the TLS context's client-certificate request."""
        certs = list(self.own) + [c for certs in self.federated.values() for c in certs]
        return [c.public_bytes(Encoding.PEM) for c in certs]


def verify_peer(
    leaf_der: bytes | None,
    chain_der: list[bytes],
    bundles: TrustBundles,
    allowed_domains: frozenset[str],
    now: datetime,
) -> PeerIdentity:
    """Verify a peer's leaf and intermediates (DER) at ``now`` (timezone-aware).

    Raises :class:`PeerRejected`; the order of checks is described in the module docstring.
    """
    if leaf_der is None:
        raise PeerRejected(
            "no_client_cert", "identity: peer presented no client certificate; expected an x509-svid"
        )
    leaf = _load_der(leaf_der, "leaf")
    _check_validity(leaf, now)
    spiffe_id = _spiffe_id(leaf)
    if spiffe_id.trust_domain not in allowed_domains:
        raise PeerRejected(
            "foreign_trust_domain",
            f"identity: peer {spiffe_id} is from trust domain {spiffe_id.trust_domain}; "
            f"expected one of {', '.join(sorted(allowed_domains)) or '(none)'}",
        )
    _verify_chain(leaf, chain_der, bundles, spiffe_id.trust_domain, now)
    return PeerIdentity(
        spiffe_id=spiffe_id,
        trust_domain=spiffe_id.trust_domain,
        cert_sha256=hashlib.sha256(leaf_der).hexdigest(),
        not_after=leaf.not_valid_after_utc,
    )


def xfcc_value(by_spiffe_id: str, peer: PeerIdentity) -> str:
    """The ``X-Forwarded-Client-Cert`` value in Envoy's format for a verified peer.

    SPIFFE IDs cannot contain ``,``, ``;``, ``=`` or ``"``, so no element needs quoting.
    """
    return f"By={by_spiffe_id};Hash={peer.cert_sha256};URI={peer.spiffe_id}"


def _read(path: Path, domain: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise BundleError(
            f"identity: bundle for {domain} at {path} cannot be read ({exc.strerror or exc})"
        ) from None


def _domain(text: str) -> str:
    try:
        return parse_trust_domain(text)
    except ValueError as exc:
        raise BundleError(f"identity: bundle trust domain {text!r}: {exc}") from None


def _parse_bundle(pem: bytes, domain: str, source: str | None) -> tuple[x509.Certificate, ...]:
    where = f"bundle for {domain}" + (f" at {source}" if source else "")
    try:
        certs = tuple(x509.load_pem_x509_certificates(pem))
    except ValueError:
        raise BundleError(f"identity: {where} has no readable pem certificates") from None
    for cert in certs:
        if not _is_ca(cert):
            raise BundleError(
                f"identity: {where} holds {cert.subject.rfc4514_string()!r} which is not a ca; "
                "expected ca certificates only (basicConstraints ca=true)"
            )
    return certs


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _load_der(der: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        raise PeerRejected("malformed", f"identity: peer {what} certificate is not valid der") from None


def _check_validity(leaf: x509.Certificate, now: datetime) -> None:
    if now < leaf.not_valid_before_utc:
        raise PeerRejected(
            "not_yet_valid",
            f"identity: peer certificate is valid from {leaf.not_valid_before_utc.isoformat()}; "
            f"now is {now.isoformat()}",
        )
    if now > leaf.not_valid_after_utc:
        raise PeerRejected(
            "expired",
            f"identity: peer certificate expired at {leaf.not_valid_after_utc.isoformat()}; "
            f"now is {now.isoformat()}",
        )


def _spiffe_id(leaf: x509.Certificate) -> SpiffeId:
    try:
        return spiffe_id_from_certificate(leaf)
    except LeafRejected as exc:
        raise PeerRejected(exc.reason, exc.message) from None


def _verify_chain(
    leaf: x509.Certificate,
    chain_der: list[bytes],
    bundles: TrustBundles,
    trust_domain: str,
    now: datetime,
) -> None:
    store = bundles.store_for(trust_domain)
    if store is None:
        raise PeerRejected(
            "peer_unverified", f"identity: no trust bundle for trust domain {trust_domain}"
        )
    if len(chain_der) > MAX_INTERMEDIATES:
        raise PeerRejected(
            "peer_unverified",
            f"identity: peer sent {len(chain_der)} intermediates; expected at most {MAX_INTERMEDIATES}",
        )
    intermediates = [_load_der(der, "intermediate") for der in chain_der]
    verifier = _client_policy(store, now).build_client_verifier()
    try:
        verifier.verify(leaf, intermediates)
    except verification.VerificationError as exc:
        raise PeerRejected(
            "peer_unverified",
            f"identity: peer certificate does not chain to the {trust_domain} bundle "
            f"({_short(exc)})",
        ) from None


def _client_policy(store: verification.Store, now: datetime) -> verification.PolicyBuilder:
    return (
        verification.PolicyBuilder()
        .store(store)
        .time(now)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
    )


def _short(exc: verification.VerificationError) -> str:
    text = str(exc).removeprefix("validation failed: ")
    return text.split(" (encountered processing", 1)[0].lower()
