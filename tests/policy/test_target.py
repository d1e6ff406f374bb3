"""The canonical request: what is matched is what is forwarded (PRODUCT.md, "Canonical path")."""

from __future__ import annotations

import pytest

from sidecar.errors import RequestRefused
from sidecar.http.target import (
    PathOptions,
    authority_matches,
    canonical_path,
    check_header_names,
    check_query,
    format_authority,
    join_base,
    normalize_host,
    split_route_prefix,
    strip_base,
)
from sidecar.http.target import _decode, _remove_dot_segments

KEEP_SLASHES = PathOptions(merge_slashes=False)
ENCODED_SLASH = PathOptions(allow_encoded_slash=True)

CANONICAL = [
    # already clean: the fast path returns the input unchanged
    ("/v1/invoices/42", "/v1/invoices/42"),
    ("/", "/"),
    # RFC 3986 section 3.3: sub-delims, ':' and '@' are pchar and stay raw
    ("/a:b@c/!$&'()*+,=", "/a:b@c/!$&'()*+,="),
    # section 6.2.2.2: percent-encoded unreserved characters are decoded (mixed-case hex)
    ("/%7e/%41%62%2D%5f%2e%30", "/~/Ab-_.0"),
    # section 6.2.2.1: hex of remaining escapes uppercased; %3b is data, not a ';' parameter
    ("/a%3b%2c%3f%25", "/a%3B%2C%3F%25"),
    # '%23' is kept encoded: it is data, never a fragment separator
    ("/a%23b", "/a%23b"),
    # encoded non-ASCII (UTF-8) stays encoded with uppercase hex
    ("/caf%c3%a9", "/caf%C3%A9"),
    # %25 stays encoded, so '%252e%252e' is not double-decoded into '..' (IIS double decode)
    ("/%252e%252e/admin", "/%252e%252e/admin"),
    # section 5.2.4: dot segments removed
    ("/a/b/../c", "/a/c"),
    ("/a/./b", "/a/b"),
    ("/a/b/..", "/a/"),
    ("/a/b/.", "/a/b/"),
    # dot segments never climb above the root (Envoy CVE-2019-9901 style '/../admin')
    ("/../../admin", "/admin"),
    ("/..", "/"),
    # encoded dot segments are dot segments: decoded before removal (Envoy CVE-2019-9901)
    ("/public/%2e%2e/admin", "/admin"),
    ("/public/.%2E/admin", "/admin"),
    ("/public/%2E./admin", "/admin"),
    ("/public/%2e/admin", "/public/admin"),
    # '..' as part of a longer segment is not a dot segment
    ("/a/..b/...", "/a/..b/..."),
    ("/.well-known/jwks.json", "/.well-known/jwks.json"),
    # merge_slashes (Envoy merge_slashes, nginx merge_slashes on): '//' and '///' collapse
    ("//admin", "/admin"),
    ("/a///b//", "/a/b/"),
    # '//' merged before dot removal, like nginx: '/a//../b' is '/a/../b'
    ("/a//../b", "/b"),
    # absolute-URI-looking path is just a path
    ("/http://evil.example/x", "/http:/evil.example/x"),
]


@pytest.mark.parametrize(("raw", "expected"), CANONICAL)
def test_canonical_form(raw: str, expected: str) -> None:
    """Each raw path maps to exactly this canonical form."""
    assert canonical_path(raw, PathOptions()) == expected


@pytest.mark.parametrize(("raw", "_"), CANONICAL)
def test_canonical_is_idempotent(raw: str, _: str) -> None:
    """Canonicalizing a canonical path changes nothing (matcher and signer agree)."""
    once = canonical_path(raw)
    assert canonical_path(once) == once


@pytest.mark.parametrize(
    "raw",
    [
        "/v1/invoices/42",  # ordinary
        "/.well-known/jwks.json",  # '/.' that is not a dot segment
        "/a/..b/.c/d../e.",  # dots inside longer segments
        "/a/...",  # three dots is an ordinary segment (RFC 3986 section 5.2.4)
        "/x/",  # trailing slash kept
        "/a:b@c/!$&'()*+,=",  # sub-delims, ':' and '@'
    ],
)
def test_fast_path_agrees_with_full_algorithm(raw: str) -> None:
    """Clean paths come back as the same object, equal to what the full algorithm yields."""
    assert canonical_path(raw) is raw
    assert _remove_dot_segments(_decode(raw, PathOptions()), True) == raw


REFUSED = [
    # NUL raw and encoded (Tomcat/nginx NUL truncation)
    ("/a\x00b", "control character"),
    ("/a%00b", "%00"),
    # CR/LF raw and encoded (request splitting, header injection)
    ("/a\r\nX-Injected: 1", "control character"),
    ("/a%0d%0aSet-Cookie:x", "%0D"),
    ("/a%0A", "%0A"),
    # DEL and TAB (RFC 3986 section 2: not in any character class)
    ("/a\x7f", "control character"),
    ("/a%7F", "%7F"),
    ("/a\tb", "control character"),
    # backslash raw and encoded (IIS/Windows upstreams treat it as '/': '/..\\admin')
    ("/public\\..\\admin", "backslash"),
    ("/public/%5C../admin", "%5C"),
    ("/public/%5c", "%5C"),
    # raw '#' (fragment must never reach the server; oauth2-proxy skip-auth regex bypass)
    ("/admin#/public", "fragment"),
    # ';' path parameters (Tomcat '/..;/admin', Spring '/admin;x=1' matcher bypass)
    ("/admin;x=1", "path parameters"),
    ("/public/..;/admin", "path parameters"),
    # encoded slash (Envoy CVE-2019-9901 family, Istio AuthorizationPolicy %2F bypass)
    ("/public%2F..%2Fadmin", "%2F"),
    ("/public%2f..%2fadmin", "%2F"),
    ("/a/%2e%2e%2fadmin", "%2F"),
    # invalid escapes: non-hex, truncated, trailing '%' (RFC 3986 section 2.1)
    ("/a%G1", "invalid percent-escape"),
    ("/a%2", "invalid percent-escape"),
    ("/a%", "invalid percent-escape"),
    ("/a%%32%65", "invalid percent-escape"),
    # overlong UTF-8 '%c0%ae' is kept encoded, but IIS-style '%u002e' is no escape at all
    ("/a/%u002e%u002e/admin", "invalid percent-escape"),
    # raw non-ASCII must arrive percent-encoded (fullwidth '．．' normalizing to '..')
    ("/caf\u00e9", "non-ASCII"),
    ("/\uff0e\uff0e/admin", "non-ASCII"),
    ("/a\udcc3", "non-ASCII"),
    # characters outside pchar (RFC 3986 section 3.3) must be percent-encoded
    ("/a b", "must be percent-encoded"),
    ("/a|b", "must be percent-encoded"),
    ("/a<script>", "must be percent-encoded"),
    ("/a?b", "unexpected '?'"),
    # a path must be absolute (RFC 9112 origin-form)
    ("admin", "must start with '/'"),
    ("", "must start with '/'"),
    ("*", "must start with '/'"),
]


@pytest.mark.parametrize(("raw", "why"), REFUSED)
def test_refused_paths(raw: str, why: str) -> None:
    """Each input is refused with bad_request and a message saying what was wrong."""
    with pytest.raises(RequestRefused) as info:
        canonical_path(raw, PathOptions())
    assert info.value.reason == "bad_request"
    assert info.value.message.startswith("paths: ")
    assert why in info.value.message


def test_refusal_message_truncates_and_escapes_the_path() -> None:
    """A long hostile path shows up escaped and cut short in the message."""
    with pytest.raises(RequestRefused) as info:
        canonical_path("/" + "a" * 500 + "\r\n")
    assert "\r" not in info.value.message and "..." in info.value.message
    assert len(info.value.message) < 250


KEEP_SLASHES_CASES = [
    # RFC 3986 section 5.2.4 keeps empty segments
    ("/a//b", "/a//b"),
    ("/a/b/", "/a/b/"),
    # '..' removes the empty segment before it
    ("/a//..", "/a/"),
    ("/.//x", "//x"),
    ("/a/./b/../c", "/a/c"),
]


@pytest.mark.parametrize(("raw", "expected"), KEEP_SLASHES_CASES)
def test_merge_slashes_off(raw: str, expected: str) -> None:
    """With merge_slashes false, empty segments stay and dot removal follows RFC 3986 exactly."""
    assert canonical_path(raw, KEEP_SLASHES) == expected


ENCODED_SLASH_CASES = [
    # kept encoded, uppercase, never a separator: one segment 'a%2Fb'
    ("/a%2fb", "/a%2Fb"),
    ("/a%2Fb/../c", "/c"),
    # '%2F' segment is never merged nor turned into a dot segment here
    ("/x/%2F/y", "/x/%2F/y"),
]


@pytest.mark.parametrize(("raw", "expected"), ENCODED_SLASH_CASES)
def test_allow_encoded_slash(raw: str, expected: str) -> None:
    """With allow_encoded_slash, %2F stays encoded and is data, not a separator."""
    assert canonical_path(raw, ENCODED_SLASH) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "/public/..%2Fadmin",  # an upstream decoding %2F would see '/public/../admin'
        "/public/%2e%2e%2fadmin",  # the same with encoded dots
        "/a%2F.%2Fb",  # '.' hidden between encoded slashes
    ],
)
def test_allow_encoded_slash_refuses_hidden_dot_segments(raw: str) -> None:
    """Dot segments next to a kept %2F are refused, because the upstream may decode it."""
    with pytest.raises(RequestRefused, match="dot segment"):
        canonical_path(raw, ENCODED_SLASH)


def test_encoded_backslash_refused_even_with_encoded_slash() -> None:
    """%5C is always refused, whatever allow_encoded_slash says."""
    with pytest.raises(RequestRefused, match="%5C"):
        canonical_path("/a%5Cb", ENCODED_SLASH)


ROUTE_PREFIX = [
    ("/billing-api/v1/x?y=1", ("billing-api", "/v1/x", "y=1")),
    # no rest: the upstream root
    ("/billing-api", ("billing-api", "/", "")),
    ("/billing-api/", ("billing-api", "/", "")),
    ("/billing-api?q", ("billing-api", "/", "q")),
    # split before dot removal: '/a/../b/x' stays in upstream 'a' (rest canonicalizes to '/b/x')
    ("/a/../b/x", ("a", "/../b/x", "")),
    ("/a/%2e%2e/b/x", ("a", "/%2e%2e/b/x", "")),
    # the query is returned raw, '?' inside it included
    ("/a/x?u=/b/../c?d=%2F", ("a", "/x", "u=/b/../c?d=%2F")),
]


@pytest.mark.parametrize(("target", "expected"), ROUTE_PREFIX)
def test_split_route_prefix(target: str, expected: tuple[str, str, str]) -> None:
    """The first raw segment names the upstream; the rest and the query come back raw."""
    assert split_route_prefix(target) == expected


@pytest.mark.parametrize(
    ("target", "rest"),
    [
        ("/a/../b/x", "/b/x"),  # raw '..' right after the upstream segment
        ("/a/%2e%2e/b/x", "/b/x"),  # encoded '..' (Envoy CVE-2019-9901 style)
        ("/a/%2E%2E/%2e%2e/../b/x", "/b/x"),  # several levels above the rest's root
        ("/a/.%2e/.%2E/b/x", "/b/x"),  # half-encoded dot segments
    ],
)
def test_route_prefix_never_switches_upstream(target: str, rest: str) -> None:
    """Dot segments in the rest stay under the upstream named by the raw first segment."""
    name, raw_rest, _ = split_route_prefix(target)
    assert (name, canonical_path(raw_rest)) == ("a", rest)


@pytest.mark.parametrize(
    "target",
    [
        "/../b/x",  # dot segment as the upstream name
        "/./b/x",  # '.' as the upstream name
        "/%61/x",  # percent-encoded upstream name ('a'): never decoded
        "/%2e%2e/b/x",  # encoded '..' as the upstream name
        "//b/x",  # empty upstream name
        "/",  # no upstream at all
        "/a;x=1/x",  # ';' parameters on the upstream segment
        "/a\\b/x",  # backslash in the upstream segment
        "/a#b/x",  # fragment in the target
        "/a/x#frag",  # fragment anywhere in the target
        "/a/x?q=1\r\nX: y",  # CRLF in the query (request splitting)
        "/a/x?q= 1",  # whitespace in the query
        "/a/x?q=\u00e9",  # raw non-ASCII in the query
        "http://a/x",  # absolute form is not route-prefix form
    ],
)
def test_split_route_prefix_refuses(target: str) -> None:
    """Upstream names are plain names; hostile targets are refused with bad_request."""
    with pytest.raises(RequestRefused) as info:
        split_route_prefix(target)
    assert info.value.reason == "bad_request"


def test_check_query_allows_ordinary_queries() -> None:
    """Percent-encoded and sub-delim queries pass byte for byte."""
    check_query("a=1&b=%2F%00&c=[x]|{y}&d=/..;")


JOIN = [
    ("/api", "/x", "/api/x"),
    ("/api/", "/x", "/api/x"),
    ("/", "/x", "/x"),
    ("", "/x", "/x"),
    ("/api", "/", "/api/"),
    ("/a/b", "/c/", "/a/b/c/"),
]


@pytest.mark.parametrize(("base", "canonical", "expected"), JOIN)
def test_join_base(base: str, canonical: str, expected: str) -> None:
    """Base path and canonical path join with exactly one slash between them."""
    assert join_base(base, canonical) == expected


STRIP = [
    ("/api", "/api", "/"),
    ("/api/x", "/api", "/x"),
    ("/api/", "/api", "/"),
    ("/api/x", "/api/", "/x"),
    # segment boundary: '/apix' is not under '/api'
    ("/apix", "/api", None),
    ("/ap", "/api", None),
    ("/other/api/x", "/api", None),
    ("/x", "/", "/x"),
    ("/x", "", "/x"),
]


@pytest.mark.parametrize(("full", "base", "expected"), STRIP)
def test_strip_base(full: str, base: str, expected: str | None) -> None:
    """The path under the base path at a segment boundary, or None (unknown_upstream)."""
    assert strip_base(full, base) == expected


HOSTS = [
    # RFC 3986 section 3.2.2 / 6.2.2.1: host is case-insensitive
    ("Billing.Internal", "https", ("billing.internal", 443)),
    # one trailing dot (FQDN) removed: 'billing.internal.' must not dodge a host rule
    ("billing.internal.", "https", ("billing.internal", 443)),
    ("billing.internal.:8443", "https", ("billing.internal", 8443)),
    # default ports by scheme (section 6.2.3)
    ("example.com", "http", ("example.com", 80)),
    ("example.com:80", "http", ("example.com", 80)),
    ("example.com:443", "HTTPS", ("example.com", 443)),
    # IPv6 literal (section 3.2.2), compressed and lowercased
    ("[::1]", "http", ("::1", 80)),
    ("[0:0:0:0:0:0:0:1]:8080", "http", ("::1", 8080)),
    ("[FE80::A]", "https", ("fe80::a", 443)),
    # IPv4 literal
    ("127.0.0.1:17001", "http", ("127.0.0.1", 17001)),
    ("10.0.0.1.", "http", ("10.0.0.1", 80)),
]


@pytest.mark.parametrize(("host", "scheme", "expected"), HOSTS)
def test_normalize_host(host: str, scheme: str, expected: tuple[str, int]) -> None:
    """Hosts compare lowercased, without a trailing dot or default port."""
    assert normalize_host(host, scheme) == expected


@pytest.mark.parametrize(
    "host",
    [
        "",  # empty
        "user:pass@billing.internal",  # userinfo (credential smuggling, 'evil@good' confusion)
        "good.example@evil.example",  # userinfo hides the real host
        "billing.internal:",  # empty port
        "billing.internal:0",  # port out of range
        "billing.internal:65536",  # port out of range
        "billing.internal:+80",  # not digits
        "billing.internal:8o",  # not digits
        "billing internal",  # whitespace
        "billing.internal\r\nX: y",  # CRLF
        "billing.internal..",  # two trailing dots
        "bill_ing.internal",  # underscore is not LDH
        "-billing.internal",  # label starts with '-'
        "billing.internal/x",  # path inside authority
        "b%69lling.internal",  # percent-encoding in a reg-name
        "bïlling.internal",  # raw IDN: must arrive as punycode
        "::1",  # unbracketed IPv6
        "[::1",  # unclosed bracket
        "[::1]x",  # junk after bracket
        "[fe80::1%25eth0]",  # zone identifier
        "[not-v6]",  # not an IPv6 address
        "2130706433",  # integer IPv4 form (SSRF filter bypass)
        "0x7f.1",  # hex IPv4 form
        "127.1",  # short IPv4 form
        "0177.0.0.1",  # octal-looking IPv4
        "256.0.0.1",  # out-of-range octet
        "a" * 64 + ".example",  # label longer than 63
    ],
)
def test_normalize_host_refuses(host: str) -> None:
    """Anything that is not a DNS name or IP literal with an optional port is refused."""
    with pytest.raises(RequestRefused) as info:
        normalize_host(host, "https")
    assert info.value.reason == "bad_request"
    assert info.value.message.startswith("hosts: ")


def test_normalize_host_refuses_unknown_scheme() -> None:
    """Only http(s)/ws(s) have a default port; other schemes are refused."""
    with pytest.raises(RequestRefused):
        normalize_host("example.com", "ftp")


AUTHORITIES = [
    ("Example.com", "example.com:443", True),  # case and default port
    ("example.com.", "EXAMPLE.COM", True),  # trailing dot
    ("[::1]:443", "[0::1]", True),  # IPv6 spellings
    ("example.com", "example.com:8443", False),  # different port
    ("example.com", "example.org", False),  # different host
    ("127.0.0.1", "localhost", False),  # no resolution: names and IPs differ
]


@pytest.mark.parametrize(("host", "authority", "expected"), AUTHORITIES)
def test_authority_matches(host: str, authority: str, expected: bool) -> None:
    """The Host header and the absolute URI's authority agree only when normalized equal."""
    assert authority_matches(host, authority, "https") is expected


def test_authority_matches_refuses_userinfo() -> None:
    """A Host header with userinfo is refused outright, not compared."""
    with pytest.raises(RequestRefused):
        authority_matches("user@example.com", "example.com", "https")


@pytest.mark.parametrize(
    ("host", "port", "scheme", "expected"),
    [
        ("example.com", 443, "https", "example.com"),
        ("example.com", 8443, "https", "example.com:8443"),
        ("::1", 80, "http", "[::1]"),
        ("::1", 8080, "http", "[::1]:8080"),
    ],
)
def test_format_authority(host: str, port: int, scheme: str, expected: str) -> None:
    """format_authority inverts normalize_host (brackets for IPv6, default port omitted)."""
    assert format_authority(host, port, scheme) == expected
    assert normalize_host(expected, scheme) == (host, port)


def test_header_names_with_underscore_refused_without_value() -> None:
    """An underscore header name is refused by name (nginx/Envoy underscores_in_headers)."""
    with pytest.raises(RequestRefused) as info:
        check_header_names(["Content-Type", "X_Api_Key"])
    assert info.value.reason == "bad_request"
    assert "X_Api_Key" in info.value.message


def test_header_names_without_underscore_pass() -> None:
    """Ordinary header names pass."""
    check_header_names(["Content-Type", "X-Api-Key", "traceparent"])
