"""SPIFFE IDs: parsed once into a validated value, and read out of X.509-SVID leaves.

The rules are those of the SPIFFE ID standard (spiffe/spiffe standards/SPIFFE-ID.md):

- section 2: the scheme is exactly ``spiffe``; no query, no fragment;
- section 2.1: the trust domain is the URI's host only (no user info, no port), made of
  lowercase letters, digits, ``.``, ``-`` and ``_``;
- section 2.2: path segments are letters, digits, ``.``, ``-`` and ``_``; none is empty, ``.``
  or ``..``; no trailing ``/``; no percent-encoding (nothing it could encode is allowed);
- section 2.3: at most 2048 bytes in all, at most 255 for the trust domain.

And of the X.509-SVID standard (standards/X509-SVID.md) for certificates: exactly one URI SAN
(section 2), a leaf's ID has a path (section 3.1), a leaf is not a CA (sections 4.1 and 4.3) and
sets ``digitalSignature`` when it carries a key usage (section 4.3).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from sidecar.errors import IdentityRefused

SCHEME_PREFIX = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

_TD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_SEGMENT_CHARS = _TD_CHARS | frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


class InvalidSpiffeId(ValueError):
    """A string that is not a valid SPIFFE ID; ``rule`` names the rule it broke."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule
        self.message = message


def _invalid(rule: str, expected: str) -> InvalidSpiffeId:
    return InvalidSpiffeId(rule, f"identity: spiffe id {expected}")


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A validated SPIFFE ID; ``path`` is ``""`` (trust domain ID) or starts with ``/``.

    Build one with :func:`parse_spiffe_id`; constructing one directly validates it too.
    """

    trust_domain: str
    path: str

    def __post_init__(self) -> None:
        _check_trust_domain(self.trust_domain)
        _check_path(self.path)
        if len(str(self).encode()) > MAX_ID_BYTES:
            raise _invalid("too_long", f"must be at most {MAX_ID_BYTES} bytes")

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain}{self.path}"

    @property
    def is_trust_domain_id(self) -> bool:
        """True for ``spiffe://<td>`` itself (a signing authority's ID, never a workload's)."""
        return not self.path


def parse_spiffe_id(text: str) -> SpiffeId:
    """Parse ``spiffe://<trust domain>[/<path>]`` strictly, or raise :class:`InvalidSpiffeId`."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise _invalid("too_long", f"must be at most {MAX_ID_BYTES} bytes")
    rest = _strip_scheme(text)
    _check_uri_extras(rest)
    trust_domain, slash, path = rest.partition("/")
    return SpiffeId(trust_domain, slash + path)


def parse_trust_domain(text: str) -> str:
    """A trust domain name, given bare (``example.org``) or as its ID (``spiffe://example.org``)."""
    if text.lower().startswith(SCHEME_PREFIX):
        spiffe_id = parse_spiffe_id(text)
        if not spiffe_id.is_trust_domain_id:
            raise _invalid("trust_domain_path", "trust domain must not have a path")
        return spiffe_id.trust_domain
    _check_trust_domain(text)
    return text


def _strip_scheme(text: str) -> str:
    if text.startswith(SCHEME_PREFIX):
        return text[len(SCHEME_PREFIX) :]
    if text[: len(SCHEME_PREFIX)].lower() == SCHEME_PREFIX:
        raise _invalid("scheme", "scheme must be lowercase 'spiffe'")
    raise _invalid("scheme", "must start with 'spiffe://'")


def _check_uri_extras(rest: str) -> None:
    if "?" in rest:
        raise _invalid("query", "must not have a query")
    if "#" in rest:
        raise _invalid("fragment", "must not have a fragment")
    if "%" in rest:
        raise _invalid("percent_encoding", "must not contain percent-encoding")


def _check_trust_domain(trust_domain: str) -> None:
    if not trust_domain:
        raise _invalid("trust_domain_missing", "trust domain must not be empty")
    if "@" in trust_domain:
        raise _invalid("userinfo", "must not have user info")
    if ":" in trust_domain and not trust_domain.startswith("["):  # an IPv6 literal is no port
        raise _invalid("port", "trust domain must not have a port")
    if not _TD_CHARS.issuperset(trust_domain):
        raise _invalid(
            "trust_domain_chars", "trust domain must be lowercase letters, digits, '.', '-', '_'"
        )
    if len(trust_domain) > MAX_TRUST_DOMAIN_BYTES:
        raise _invalid(
            "trust_domain_too_long", f"trust domain must be at most {MAX_TRUST_DOMAIN_BYTES} bytes"
        )


def _check_path(path: str) -> None:
    if not path:
        return
    if not path.startswith("/"):
        raise _invalid("path_relative", "path must start with '/'")
    segments = path[1:].split("/")
    for index, segment in enumerate(segments):
        _check_segment(segment, last=index == len(segments) - 1)


def _check_segment(segment: str, *, last: bool) -> None:
    if not segment:
        if last:
            raise _invalid("trailing_slash", "path must not end with '/'")
        raise _invalid("empty_segment", "path must not contain empty segments ('//')")
    if segment in (".", ".."):
        raise _invalid("dot_segment", "path must not contain '.' or '..' segments")
    if not _SEGMENT_CHARS.issuperset(segment):
        raise _invalid("path_chars", "path segments must be letters, digits, '.', '-', '_'")


class LeafRejected(Exception):
    """A peer leaf certificate that is not a usable X.509-SVID.

    ``reason`` is one of :data:`LEAF_REJECT_REASONS`; it is a bounded label for the
    ``tls_handshake_failures_total`` metric. At request level it becomes ``peer_unverified``.
    """

    def __init__(self, reason: str, message: str) -> None:
        if reason not in LEAF_REJECT_REASONS:
            raise ValueError(f"identity: unknown leaf rejection reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message

    def refusal(self) -> IdentityRefused:
        """The request-level refusal for this rejection (401 ``peer_unverified``)."""
        return IdentityRefused("peer_unverified", self.message, detail=self.reason)


LEAF_REJECT_REASONS = frozenset({"not_spiffe", "ca_as_leaf", "bad_key_usage", "malformed"})


def spiffe_id_from_certificate(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID of an X.509-SVID leaf; raises :class:`LeafRejected` for anything else.

    Only the certificate's shape is checked here: chain, time and trust domain are the
    verifier's business.
    """
    extensions = _extensions(cert)
    _reject_ca(extensions)
    uri = _single_uri_san(extensions)
    try:
        spiffe_id = parse_spiffe_id(uri)
    except InvalidSpiffeId as exc:
        raise _rejected("not_spiffe", f"uri san: {exc.message}") from None
    if spiffe_id.is_trust_domain_id:  # X509-SVID 3.1
        raise _rejected("not_spiffe", "spiffe id must have a path, not be a trust domain id")
    return spiffe_id


def _rejected(reason: str, expected: str) -> LeafRejected:
    return LeafRejected(reason, f"identity: peer certificate {expected}")


def _extensions(cert: x509.Certificate) -> x509.Extensions:
    try:
        return cert.extensions
    except (ValueError, x509.DuplicateExtension) as exc:
        raise _rejected("malformed", f"extensions must parse ({type(exc).__name__})") from None


def _reject_ca(extensions: x509.Extensions) -> None:
    for ext in extensions:
        value = ext.value
        if isinstance(value, x509.BasicConstraints) and value.ca:
            raise _rejected("ca_as_leaf", "must not be a ca (basicConstraints ca=true)")
        if isinstance(value, x509.KeyUsage):
            _check_leaf_key_usage(value)


def _check_leaf_key_usage(usage: x509.KeyUsage) -> None:
    if usage.key_cert_sign or usage.crl_sign:
        raise _rejected("ca_as_leaf", "key usage must not include keyCertSign or cRLSign")
    if not usage.digital_signature:
        raise _rejected("bad_key_usage", "key usage must include digitalSignature")


def _single_uri_san(extensions: x509.Extensions) -> str:
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        expected = "has no subject alternative names; expected one spiffe uri"
        raise _rejected("not_spiffe", expected) from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise _rejected("not_spiffe", f"must have exactly one uri san, found {len(uris)}")
    return uris[0]
