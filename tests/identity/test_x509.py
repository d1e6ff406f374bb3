"""Peer X.509-SVID verification against per-domain trust bundles, with real certificates.

The small PKI (``Authority``, ``Issued``, ``Pki``) is ``tests/identity/pki.py``, shared with ``test_mtls.py``.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509

from sidecar.identity.spiffe import parse_spiffe_id
from sidecar.identity.x509 import (
    BundleError,
    PeerIdentity,
    PeerRejected,
    TrustBundles,
    verify_peer,
    xfcc_value,
)
from tests.identity.pki import HOUR, SERVER_AUTH, Pki, make_pki


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


ALLOWED = frozenset({"example.org"})
BOTH = frozenset({"example.org", "partner.example"})


def _now() -> datetime:
    return datetime.now(UTC)


# --- TrustBundles -------------------------------------------------------------------------


def test_load_reads_own_and_federated_bundles_into_one_store_per_domain(pki: Pki, tmp_path: Path) -> None:
    """Bundles load from files, one Store per domain, and expose the union of CAs as PEM."""
    (tmp_path / "own.pem").write_bytes(pki.ours.issued.pem)
    (tmp_path / "partner.pem").write_bytes(pki.partner.issued.pem + pki.unrelated.issued.pem)
    bundles = TrustBundles.load(
        tmp_path / "own.pem", "example.org", {"partner.example": tmp_path / "partner.pem"}
    )
    assert bundles.trust_domain == "example.org"
    assert bundles.domains == {"example.org", "partner.example"}
    assert len(bundles.federated["partner.example"]) == 2
    assert bundles.store_for("example.org") is not None
    assert bundles.store_for("elsewhere.example") is None
    assert len(bundles.ca_pems()) == 3


@pytest.mark.parametrize(
    ("own", "domain", "federated", "expected"),
    [
        # the own bundle file does not exist
        ("missing", "example.org", {}, "cannot be read"),
        # a file without any PEM certificate
        ("garbage", "example.org", {}, "no readable pem certificates"),
        # a leaf certificate is not a trust anchor
        ("leaf", "example.org", {}, "which is not a ca"),
        # a partner bundle cannot be filed under our own domain
        ("own", "example.org", {"example.org": "own"}, "is our own trust domain"),
        # trust domain names are lowercase (SPIFFE ID standard, section 2.1)
        ("own", "Example.org", {}, "bundle trust domain 'Example.org'"),
    ],
)
def test_load_refuses_unusable_bundles(
    pki: Pki, tmp_path: Path, own: str, domain: str, federated: dict[str, str], expected: str
) -> None:
    """A bundle that cannot vouch for anything is refused at load time with its domain named."""
    (tmp_path / "own").write_bytes(pki.ours.issued.pem)
    (tmp_path / "garbage").write_bytes(b"not a certificate\n")
    (tmp_path / "leaf").write_bytes(pki.ours.issue("spiffe://example.org/a").pem)
    with pytest.raises(BundleError, match=expected):
        TrustBundles.load(
            tmp_path / own, domain, {d: tmp_path / name for d, name in federated.items()}
        )


# --- verify_peer ----------------------------------------------------------------------------


def test_valid_svid_gives_its_identity(pki: Pki) -> None:
    """A leaf from our CA yields its SPIFFE ID, domain, DER fingerprint and expiry."""
    leaf = pki.ours.issue("spiffe://example.org/ns/a/sa/caller")
    peer = verify_peer(leaf.der, [], pki.bundles(), ALLOWED, _now())
    assert peer == PeerIdentity(
        spiffe_id=parse_spiffe_id("spiffe://example.org/ns/a/sa/caller"),
        trust_domain="example.org",
        cert_sha256=hashlib.sha256(leaf.der).hexdigest(),
        not_after=leaf.cert.not_valid_after_utc,
    )


@pytest.mark.parametrize(
    ("case", "allowed"),
    [
        # issued by our intermediate, which the peer sends along
        ("via_intermediate", ALLOWED),
        # a federated partner's ID verified against the partner bundle, partner allowed
        ("partner", BOTH),
        # no authority key identifier: the X.509-SVID standard does not require one
        ("no_aki", ALLOWED),
        # no extended key usage at all is acceptable for a client
        ("no_eku", ALLOWED),
    ],
)
def test_accepted_variants(pki: Pki, case: str, allowed: frozenset[str]) -> None:
    """Legitimate SVID shapes and chains are accepted."""
    leaf, chain = {
        "via_intermediate": (pki.intermediate.issue("spiffe://example.org/a"), [pki.intermediate.issued.der]),
        "partner": (pki.partner.issue("spiffe://partner.example/b"), []),
        "no_aki": (pki.ours.issue("spiffe://example.org/a", aki=False), []),
        "no_eku": (pki.ours.issue("spiffe://example.org/a", eku=None), []),
    }[case]
    peer = verify_peer(leaf.der, chain, pki.bundles(), allowed, _now())
    assert str(peer.spiffe_id) == str(leaf.cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)[0])


def _refused_case(pki: Pki, case: str) -> tuple[bytes | None, list[bytes]]:
    now = datetime.now(UTC)
    leaves = {
        "no_cert": None,
        "unrelated_ca": pki.unrelated.issue("spiffe://example.org/a"),
        "partner_claims_ours": pki.partner.issue("spiffe://example.org/a"),
        "partner_not_allowed": pki.partner.issue("spiffe://partner.example/b"),
        "unknown_domain_allowed": pki.ours.issue("spiffe://other.example/a"),
        "expired": pki.ours.issue("spiffe://example.org/a", not_before=now - 3 * HOUR, not_after=now - HOUR),
        "not_yet_valid": pki.ours.issue("spiffe://example.org/a", not_before=now + HOUR, not_after=now + 2 * HOUR),
        "ca_as_leaf": pki.ours.issue("spiffe://example.org/a", ca=True),
        "two_uris": pki.ours.issue("spiffe://example.org/a", "spiffe://example.org/b"),
        "dns_only": pki.ours.issue(dns=("caller.example.org",)),
        "uppercase_td": pki.ours.issue("spiffe://Example.org/a"),
        "missing_intermediate": pki.intermediate.issue("spiffe://example.org/a"),
        "server_auth_only": pki.ours.issue("spiffe://example.org/a", eku=(SERVER_AUTH,)),
    }
    leaf = leaves.get(case)
    return (leaf.der if leaf else (b"\x30\x03junk" if case == "not_der" else None)), []


@pytest.mark.parametrize(
    ("case", "allowed", "reason"),
    [
        # no certificate was presented at all
        ("no_cert", ALLOWED, "no_client_cert"),
        # a CA that is in no bundle
        ("unrelated_ca", ALLOWED, "peer_unverified"),
        # a partner's CA cannot vouch for an ID in our trust domain
        ("partner_claims_ours", BOTH, "peer_unverified"),
        # a genuine partner ID, but the partner domain is not accepted on this listener
        ("partner_not_allowed", ALLOWED, "foreign_trust_domain"),
        # an allowed domain without any bundle cannot be verified
        ("unknown_domain_allowed", ALLOWED | {"other.example"}, "peer_unverified"),
        # validity dates are checked first, so these reasons stay distinct
        ("expired", ALLOWED, "expired"),
        ("not_yet_valid", ALLOWED, "not_yet_valid"),
        # a CA certificate presented as a leaf (X.509-SVID section 4.1)
        ("ca_as_leaf", ALLOWED, "ca_as_leaf"),
        # exactly one URI SAN (X.509-SVID section 2)
        ("two_uris", ALLOWED, "not_spiffe"),
        ("dns_only", ALLOWED, "not_spiffe"),
        # trust domain names are lowercase (SPIFFE ID section 2.1)
        ("uppercase_td", ALLOWED, "not_spiffe"),
        # an intermediate-issued leaf without its intermediate does not chain
        ("missing_intermediate", ALLOWED, "peer_unverified"),
        # a serverAuth-only SVID is not a client certificate
        ("server_auth_only", ALLOWED, "peer_unverified"),
        # bytes that are not a DER certificate
        ("not_der", ALLOWED, "malformed"),
    ],
)
def test_refusals_carry_their_reason(pki: Pki, case: str, allowed: frozenset[str], reason: str) -> None:
    """Each way a peer certificate can be wrong is refused with its own reason code."""
    leaf_der, chain = _refused_case(pki, case)
    with pytest.raises(PeerRejected) as refused:
        verify_peer(leaf_der, chain, pki.bundles(), allowed, _now())
    assert refused.value.reason == reason
    assert refused.value.message.startswith("identity: ")


def test_too_many_intermediates_are_refused_unparsed(pki: Pki) -> None:
    """A peer cannot make us parse an unbounded chain."""
    leaf = pki.ours.issue("spiffe://example.org/a")
    with pytest.raises(PeerRejected, match="expected at most 8") as refused:
        verify_peer(leaf.der, [b"x"] * 9, pki.bundles(), ALLOWED, _now())
    assert refused.value.reason == "peer_unverified"


def test_verification_uses_the_given_time(pki: Pki) -> None:
    """The same valid leaf is expired when verified two hours from now."""
    leaf = pki.ours.issue("spiffe://example.org/a")
    with pytest.raises(PeerRejected) as refused:
        verify_peer(leaf.der, [], pki.bundles(), ALLOWED, _now() + 2 * HOUR)
    assert refused.value.reason == "expired"


@pytest.mark.parametrize(
    ("reason", "request_reason", "status"),
    [
        # no certificate: 401 no_client_cert
        ("no_client_cert", "no_client_cert", 401),
        # a domain we do not accept: 403
        ("foreign_trust_domain", "foreign_trust_domain", 403),
        # every certificate-shape or chain problem is peer_unverified at request level
        ("expired", "peer_unverified", 401),
        ("not_spiffe", "peer_unverified", 401),
        ("ca_as_leaf", "peer_unverified", 401),
    ],
)
def test_rejections_map_to_request_reason_codes(reason: str, request_reason: str, status: int) -> None:
    """Detailed handshake reasons map onto the product's request-level reason codes."""
    refusal = PeerRejected(reason, "identity: x").refusal()
    assert (refusal.reason, refusal.status, refusal.detail) == (request_reason, status, reason)


def test_unknown_rejection_reason_is_a_programming_error() -> None:
    """Reason codes are a closed set (they become metric labels)."""
    with pytest.raises(ValueError, match="unknown peer rejection reason"):
        PeerRejected("nope", "identity: x")


def test_xfcc_value_uses_envoys_format() -> None:
    """The X-Forwarded-Client-Cert value names us, the caller's leaf hash and its SPIFFE ID."""
    peer = PeerIdentity(parse_spiffe_id("spiffe://example.org/caller"), "example.org", "ab" * 32, datetime.now(UTC))
    assert xfcc_value("spiffe://example.org/agent", peer) == (
        f"By=spiffe://example.org/agent;Hash={'ab' * 32};URI=spiffe://example.org/caller"
    )
