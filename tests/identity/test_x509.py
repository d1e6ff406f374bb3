"""Peer X.509-SVID verification against per-domain trust bundles, with real certificates.

The small PKI helper at the top (``Authority``, ``Issued``) is also used by ``test_mtls.py``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.identity.spiffe import parse_spiffe_id
from sidecar.identity.x509 import (
    BundleError,
    PeerIdentity,
    PeerRejected,
    TrustBundles,
    verify_peer,
    xfcc_value,
)

HOUR = timedelta(hours=1)
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: Path, name: str, *chain: Issued) -> tuple[Path, Path]:
        """Write ``name.crt`` (this cert, then ``chain``) and ``name.key``; return both paths."""
        cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
        cert_path.write_bytes(self.pem + b"".join(c.pem for c in chain))
        key_path.write_bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path


class Authority:
    """A CA (root, or intermediate when ``parent`` is given) that issues SVID-shaped leaves."""

    def __init__(self, common_name: str, parent: Authority | None = None) -> None:
        if parent is None:
            key = ec.generate_private_key(ec.SECP256R1())
            self.issued = self._sign(_name(common_name), key, ca=True, self_signed=True)
        else:
            self.issued = parent.issue(ca=True, common_name=common_name)
        self.cert, self.key = self.issued.cert, self.issued.key

    def issue(
        self,
        *uris: str,
        dns: tuple[str, ...] = (),
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        ca: bool = False,
        eku: tuple[x509.ObjectIdentifier, ...] | None = (CLIENT_AUTH, SERVER_AUTH),
        aki: bool = True,
        common_name: str = "svid",
    ) -> Issued:
        """A certificate with the given URI and DNS SANs, valid an hour either side of now."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans = [x509.UniformResourceIdentifier(u) for u in uris] + [x509.DNSName(d) for d in dns]
        return self._sign(
            _name(common_name), key, ca=ca, sans=sans, eku=eku, aki=aki,
            not_before=not_before, not_after=not_after,
        )  # fmt: skip

    def _sign(
        self,
        subject: x509.Name,
        key: ec.EllipticCurvePrivateKey,
        *,
        ca: bool,
        self_signed: bool = False,
        sans: list[x509.GeneralName] | None = None,
        eku: tuple[x509.ObjectIdentifier, ...] | None = None,
        aki: bool = True,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> Issued:
        now = datetime.now(UTC)
        issuer_name, issuer_key = (subject, key) if self_signed else (self.cert.subject, self.key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - HOUR)
            .not_valid_after(not_after or now + HOUR)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(_key_usage(ca=ca), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if eku and not ca:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        if aki and issuer_key is not key:
            aki_ext = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
            builder = builder.add_extension(aki_ext, critical=False)
        return Issued(builder.sign(issuer_key, hashes.SHA256()), key)


@dataclass(frozen=True)
class Pki:
    """Our domain's CA (with an intermediate), a partner domain's CA and an unrelated CA."""

    ours: Authority
    intermediate: Authority
    partner: Authority
    unrelated: Authority

    def bundles(self) -> TrustBundles:
        return TrustBundles.from_pem(
            self.ours.issued.pem, "example.org", {"partner.example": self.partner.issued.pem}
        )


def make_pki() -> Pki:
    """A fresh set of authorities (a few EC keys: cheap)."""
    ours = Authority("example.org root")
    return Pki(ours, Authority("example.org intermediate", ours), Authority("partner root"), Authority("unrelated root"))


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
