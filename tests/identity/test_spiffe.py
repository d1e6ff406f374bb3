"""SPIFFE ID parsing (SPIFFE-ID.md) and reading IDs out of X.509-SVID leaves (X509-SVID.md)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sidecar.errors import IdentityRefused
from sidecar.identity.spiffe import (
    LEAF_REJECT_REASONS,
    InvalidSpiffeId,
    LeafRejected,
    SpiffeId,
    parse_spiffe_id,
    parse_trust_domain,
    spiffe_id_from_certificate,
)

LONGEST_PATH = "/" + "a" * (2048 - len("spiffe://example.org/"))
LONGEST_TD = "a" * 255

VALID = [
    # section 2: a trust domain ID has no path at all
    ("spiffe://example.org", "example.org", ""),
    # section 2.2: the spec's own examples
    ("spiffe://staging.example.com/payments/mysql", "staging.example.com", "/payments/mysql"),
    ("spiffe://k8s-west.example.com/ns/staging/sa/default", "k8s-west.example.com",
     "/ns/staging/sa/default"),
    ("spiffe://example.com/9eebccd2-12bf-40a6-b262-65fe0487d453", "example.com",
     "/9eebccd2-12bf-40a6-b262-65fe0487d453"),
    # section 2.1: digits, '-', '_' and '.' are trust domain characters
    ("spiffe://trust_domain-1.example/x", "trust_domain-1.example", "/x"),
    # section 2.2: path segments may use uppercase letters
    ("spiffe://example.org/Service.V2/API_x", "example.org", "/Service.V2/API_x"),
    # section 2.2: only the segments '.' and '..' are dot segments; '.hidden' and '...' are names
    ("spiffe://example.org/.hidden/.../..x", "example.org", "/.hidden/.../..x"),
    # section 2.3: exactly 2048 bytes is allowed
    (f"spiffe://example.org{LONGEST_PATH}", "example.org", LONGEST_PATH),
    # section 2.3: a trust domain of exactly 255 bytes is allowed
    (f"spiffe://{LONGEST_TD}/x", LONGEST_TD, "/x"),
]

INVALID = [
    # section 2: the scheme is exactly 'spiffe', lowercase
    ("SPIFFE://example.org/x", "scheme"),
    ("Spiffe://example.org/x", "scheme"),
    # section 2: other schemes, a missing scheme, a malformed separator
    ("https://example.org/x", "scheme"),
    ("example.org/x", "scheme"),
    ("spiffe:/example.org/x", "scheme"),
    ("", "scheme"),
    # section 2: the trust domain is not empty
    ("spiffe://", "trust_domain_missing"),
    ("spiffe:///x", "trust_domain_missing"),
    # section 2.1: trust domain characters are lowercase letters, digits, '.', '-', '_'
    ("spiffe://Example.org/x", "trust_domain_chars"),
    ("spiffe://exa mple.org/x", "trust_domain_chars"),
    ("spiffe://[::1]/x", "trust_domain_chars"),
    ("spiffe://bücher.example/x", "trust_domain_chars"),
    # section 2.1: no port, and not even the ':' delimiter
    ("spiffe://example.org:8443/x", "port"),
    ("spiffe://example.org:/x", "port"),
    # section 2.1: no user info
    ("spiffe://user@example.org/x", "userinfo"),
    ("spiffe://user:pass@example.org/x", "userinfo"),
    # section 2: no query, no fragment
    ("spiffe://example.org/x?a=b", "query"),
    ("spiffe://example.org?a=b", "query"),
    ("spiffe://example.org/x#frag", "fragment"),
    # section 2.2: no percent-encoding (it could only encode forbidden characters)
    ("spiffe://example.org/x%20y", "percent_encoding"),
    ("spiffe://example.org/%2e%2e/x", "percent_encoding"),
    ("spiffe://ex%41mple.org/x", "percent_encoding"),
    # section 2.2: no trailing slash
    ("spiffe://example.org/", "trailing_slash"),
    ("spiffe://example.org/x/", "trailing_slash"),
    # section 2.2: no empty segments
    ("spiffe://example.org//x", "empty_segment"),
    ("spiffe://example.org/a//b", "empty_segment"),
    # section 2.2: no '.' or '..' segments
    ("spiffe://example.org/./x", "dot_segment"),
    ("spiffe://example.org/a/..", "dot_segment"),
    ("spiffe://example.org/a/../b", "dot_segment"),
    # section 2.2: path segment characters are letters, digits, '.', '-', '_'
    ("spiffe://example.org/a b", "path_chars"),
    ("spiffe://example.org/café", "path_chars"),
    ("spiffe://example.org/a*", "path_chars"),
    ("spiffe://example.org/a\\b", "path_chars"),
    # section 2.3: at most 2048 bytes in all
    (f"spiffe://example.org{LONGEST_PATH}a", "too_long"),
    # section 2.3: at most 255 bytes of trust domain
    (f"spiffe://{LONGEST_TD}a/x", "trust_domain_too_long"),
]


@pytest.mark.parametrize(("text", "trust_domain", "path"), VALID)
def test_valid_ids_parse_into_their_parts(text: str, trust_domain: str, path: str) -> None:
    """A valid SPIFFE ID parses into its trust domain and path and prints back unchanged."""
    spiffe_id = parse_spiffe_id(text)
    assert (spiffe_id.trust_domain, spiffe_id.path) == (trust_domain, path)
    assert str(spiffe_id) == text


@pytest.mark.parametrize(("text", "rule"), INVALID)
def test_invalid_ids_name_the_rule_they_break(text: str, rule: str) -> None:
    """An invalid SPIFFE ID is refused with the rule it breaks and a component-prefixed message."""
    with pytest.raises(InvalidSpiffeId) as caught:
        parse_spiffe_id(text)
    assert caught.value.rule == rule
    assert str(caught.value).startswith("identity: spiffe id ")
    assert isinstance(caught.value, ValueError)


def test_constructing_an_id_directly_validates_it() -> None:
    """A SpiffeId built without the parser is held to the same rules."""
    with pytest.raises(InvalidSpiffeId) as caught:
        SpiffeId("example.org", "workload")
    assert caught.value.rule == "path_relative"
    with pytest.raises(InvalidSpiffeId):
        SpiffeId("EXAMPLE.org", "/x")


def test_ids_compare_and_hash_by_value() -> None:
    """Two parses of the same text are equal and usable as one dictionary key."""
    first = parse_spiffe_id("spiffe://example.org/a")
    second = parse_spiffe_id("spiffe://example.org/a")
    assert first == second and len({first, second}) == 1
    assert first != parse_spiffe_id("spiffe://example.org/A")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.org", "example.org"),  # section 2.1: a bare trust domain name
        ("spiffe://example.org", "example.org"),  # section 2: the trust domain's own ID
    ],
)
def test_trust_domains_parse_bare_or_as_their_id(text: str, expected: str) -> None:
    """A trust domain may be written bare or as its ID."""
    assert parse_trust_domain(text) == expected


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("Example.org", "trust_domain_chars"),  # section 2.1: lowercase only
        ("example.org:443", "port"),  # section 2.1: no port
        ("", "trust_domain_missing"),  # section 2: not empty
        ("spiffe://example.org/x", "trust_domain_path"),  # a workload ID is not a trust domain
    ],
)
def test_invalid_trust_domains_are_refused(text: str, rule: str) -> None:
    """A malformed trust domain is refused with the rule it breaks."""
    with pytest.raises(InvalidSpiffeId) as caught:
        parse_trust_domain(text)
    assert caught.value.rule == rule


# --- X.509-SVID leaves ------------------------------------------------------------------

_ISSUER_KEY = ec.generate_private_key(ec.SECP256R1())
_NO_KEY_USAGE = object()


def _leaf(
    names: list[x509.GeneralName] | None,
    *,
    ca: bool | None = False,
    key_usage: object = None,
) -> x509.Certificate:
    """A certificate shaped as asked; chain and validity do not matter to these checks."""
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(_ISSUER_KEY.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
    )
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if ca is not None:
        constraints = x509.BasicConstraints(ca=ca, path_length=None)
        builder = builder.add_extension(constraints, critical=True)
    usage = key_usage if key_usage is not None else _usage(digital_signature=True)
    if usage is not _NO_KEY_USAGE:
        builder = builder.add_extension(usage, critical=True)  # type: ignore[arg-type]
    return builder.sign(_ISSUER_KEY, hashes.SHA256())


def _usage(**flags: bool) -> x509.KeyUsage:
    names = ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"]
    return x509.KeyUsage(*(flags.get(name, False) for name in names))


def _uri(text: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(text)


def test_a_well_formed_svid_yields_its_id() -> None:
    """A leaf with one SPIFFE URI SAN and digitalSignature yields that ID."""
    cert = _leaf([_uri("spiffe://example.org/ns/a/sa/b")])
    assert spiffe_id_from_certificate(cert) == parse_spiffe_id("spiffe://example.org/ns/a/sa/b")


def test_dns_sans_beside_the_uri_san_are_allowed() -> None:
    """X509-SVID section 2: an SVID may carry other SAN types beside its one URI."""
    cert = _leaf([x509.DNSName("svc.example.org"), _uri("spiffe://example.org/svc")])
    assert str(spiffe_id_from_certificate(cert)) == "spiffe://example.org/svc"


def test_a_leaf_without_key_usage_is_accepted() -> None:
    """Key usage is checked when present; its absence alone does not make a leaf a CA."""
    cert = _leaf([_uri("spiffe://example.org/svc")], ca=None, key_usage=_NO_KEY_USAGE)
    assert str(spiffe_id_from_certificate(cert)) == "spiffe://example.org/svc"


REJECTED = [
    # X509-SVID section 2: no SAN extension at all
    (None, False, None, "not_spiffe"),
    # X509-SVID section 2: a DNS-only certificate is not an SVID
    ([x509.DNSName("svc.example.org")], False, None, "not_spiffe"),
    # X509-SVID section 2: exactly one URI SAN
    ([_uri("spiffe://example.org/a"), _uri("spiffe://example.org/b")], False, None, "not_spiffe"),
    # X509-SVID section 2: the URI must be a SPIFFE ID
    ([_uri("https://example.org/a")], False, None, "not_spiffe"),
    # SPIFFE-ID section 2.1: an invalid SPIFFE ID (uppercase trust domain)
    ([_uri("spiffe://Example.org/a")], False, None, "not_spiffe"),
    # X509-SVID section 3.1: a leaf's ID has a non-root path
    ([_uri("spiffe://example.org")], False, None, "not_spiffe"),
    # X509-SVID section 4.1: a leaf is not a CA
    ([_uri("spiffe://example.org/a")], True, None, "ca_as_leaf"),
    # X509-SVID section 4.3: a leaf must not set keyCertSign
    ([_uri("spiffe://example.org/a")], None, _usage(digital_signature=True, key_cert_sign=True),
     "ca_as_leaf"),
    # X509-SVID section 4.3: a leaf must not set cRLSign
    ([_uri("spiffe://example.org/a")], False, _usage(digital_signature=True, crl_sign=True), "ca_as_leaf"),
    # X509-SVID section 4.3: a leaf must set digitalSignature
    ([_uri("spiffe://example.org/a")], False, _usage(key_encipherment=True), "bad_key_usage"),
]


@pytest.mark.parametrize(("names", "ca", "usage", "reason"), REJECTED)
def test_certificates_that_are_not_leaf_svids_are_rejected(
    names: list[x509.GeneralName] | None, ca: bool | None, usage: object, reason: str
) -> None:
    """A certificate that is not an X.509-SVID leaf is rejected with a bounded reason."""
    with pytest.raises(LeafRejected) as caught:
        spiffe_id_from_certificate(_leaf(names, ca=ca, key_usage=usage))
    assert caught.value.reason == reason
    assert caught.value.reason in LEAF_REJECT_REASONS
    assert caught.value.message.startswith("identity: peer certificate ")


def test_a_rejected_leaf_becomes_a_peer_unverified_refusal() -> None:
    """At request level a rejected leaf is a 401 peer_unverified carrying the reason as detail."""
    with pytest.raises(LeafRejected) as caught:
        spiffe_id_from_certificate(_leaf([x509.DNSName("svc.example.org")]))
    refusal = caught.value.refusal()
    assert isinstance(refusal, IdentityRefused)
    assert refusal.reason == "peer_unverified" and refusal.status == 401
    assert refusal.detail == "not_spiffe"


def test_leaf_rejected_refuses_unknown_reasons() -> None:
    """Reasons are a bounded set (they label a metric), so an unknown one is a programming error."""
    with pytest.raises(ValueError):
        LeafRejected("something_else", "identity: x")
