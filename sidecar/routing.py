"""Outbound routing: which upstream an agent's request is for, and its canonical path.

Three ways in, one result (:class:`Route`), so that rules see the same path in every mode:

- route-prefix: ``GET /billing-api/v1/x`` on the listener; ``Host`` must be the listener's
  own address (a rebinding page's ``Host`` is some other name: ``host_mismatch``);
- forward-proxy (``HTTP_PROXY``): ``GET http://billing.internal/api/v1/x``; the authority
  maps to an upstream through ``hosts`` and must agree with ``Host``; the path must start
  with the upstream's base path, which is removed for matching and kept for forwarding;
- CONNECT interception: the decrypted request's ``Host`` names the upstream, as above.

An upstream's ``hosts`` name it exactly or by a leading-label wildcard: ``*.s3.us-east-1.amazonaws.com``
maps ``bucket.s3.us-east-1.amazonaws.com``, one label deep only (never ``a.b.s3...`` nor
``s3...`` itself). A listed name wins over a wildcard that also covers it. A request a wildcard
matched is sent with the name the agent used (``Route.host``: S3's virtual-hosted buckets), over
the upstream's own connection; any other is sent with the upstream's own host. Wildcards are read
at config load by :func:`host_pattern`: a whole leading label over at least two labels, so never
``*`` alone nor a top-level domain (``*.com``), and never over a public suffix of the Public Suffix
List's ICANN section (``*.co.uk``, ``*.kawasaki.jp``).

Anything else is refused: no route means no request (``unknown_upstream``); there is no
open proxy. Requests that look browser-made (``Origin``, ``Sec-Fetch-Site``) are refused
first (``browser_origin``).
"""

from __future__ import annotations

import re
from functools import cache
from typing import Mapping, NamedTuple

from multidict import CIMultiDictProxy
from publicsuffixlist import PublicSuffixList

from sidecar.config_model import Upstream
from sidecar.errors import RequestRefused
from sidecar.fields import ListenAddress
from sidecar.http.target import (
    canonical_path, check_query, format_authority, has_dot_segment, join_base, normalize_host, split_route_prefix,
    strip_base,
)

WILDCARD = "*."
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

# The common route-prefix target in one match: a plain upstream name (not '.' or '..'), a path of
# unreserved and sub-delim characters only (nothing to decode), a query of printable ASCII without
# '#'. Anything else takes the general path (split_route_prefix + canonical_path), which decides the
# same way on these targets: tests/policy/test_target.py compares the two.
_CLEAN_PREFIX = re.compile(r"/([A-Za-z0-9\-_~][A-Za-z0-9\-._~]*)(/[A-Za-z0-9\-._~!$&'()*+,=:@/]*)?"
                           r"(?:\?([\x21\x22\x24-\x7e]*))?")


def forward_path(base_path: str, path: str, raw_target: str) -> str:
    """Route-prefix mode's path sent upstream: a bare ``/<name>`` is the upstream's URL itself, with no
    slash added (an MCP endpoint ``/mcp`` is not ``/mcp/``, which SDK servers redirect and SDK clients
    will not follow); anything else is base path + canonical path."""
    if "/" not in raw_target.partition("?")[0][1:]:
        return base_path or "/"
    return join_base(base_path, path)


class Route(NamedTuple):
    upstream: Upstream
    mode: str  # prefix | proxy | connect
    path: str  # canonical, without the upstream's base path: what rules match
    forward_path: str  # base path + canonical path: what is sent and signed
    query: str  # raw query, forwarded byte for byte
    host: str  # the name the request is sent with: the upstream's host, or the one a wildcard matched

    @property
    def host_header(self) -> str:
        """``Host`` as sent: the upstream's (formatted once, at load), or the wildcard-matched name's."""
        up = self.upstream
        return up.host_header if self.host == up.host else format_authority(self.host, up.port, up.scheme)


class Router:
    """Resolves outbound requests to upstreams; built once per config."""

    def __init__(self, upstreams: Mapping[str, Upstream], listen: ListenAddress) -> None:
        self._by_name = dict(upstreams)
        # a host maps to one upstream whatever port the agent wrote: the upstream's URL decides
        self._by_host = {host: up for up in upstreams.values() for host in up.hosts if not host.startswith(WILDCARD)}
        self._by_parent = {host[len(WILDCARD):]: up for up in upstreams.values() for host in up.hosts
                           if host.startswith(WILDCARD)}  # "*.example.com" under "example.com"
        self._own_hosts = _own_authorities(listen)

    def bound(self, listen: ListenAddress) -> None:
        """The listener's real address (after binding port 0, in tests)."""
        self._own_hosts = _own_authorities(listen)

    def check_boundary(self, headers: CIMultiDictProxy[str]) -> None:
        """The trust-boundary checks that apply to every outbound request (header names: check_headers)."""
        if "Origin" in headers or "Sec-Fetch-Site" in headers:
            raise RequestRefused("browser_origin", "outbound: requests carrying Origin or Sec-Fetch-Site look "
                                                   "browser-made and are refused on the agent's listener")
        if len(headers.getall("Host", ())) > 1:
            raise RequestRefused("bad_request", "outbound: more than one Host header")

    def route(self, raw_target: str, headers: CIMultiDictProxy[str]) -> Route:
        if raw_target.startswith("/"):
            return self._prefix(raw_target, headers.get("Host", ""))
        lowered = raw_target[:8].lower()
        if lowered.startswith("http://") or lowered.startswith("https://"):
            return self._absolute(raw_target, headers.get("Host"))
        raise RequestRefused("bad_request", "outbound: expected an origin-form path (/<upstream>/...) or an "
                                            "absolute http:// URI")

    def _prefix(self, raw_target: str, host: str) -> Route:
        try:
            own = normalize_host(host, "http") in self._own_hosts
        except RequestRefused:
            own = False
        if not own:
            raise RequestRefused("host_mismatch", "outbound: the Host header must be this listener's own "
                                                  "address in route-prefix mode")
        clean = _CLEAN_PREFIX.fullmatch(raw_target)
        if clean is not None:
            name, path, query = clean.group(1, 2, 3)
            path = path or "/"
            upstream = self._by_name.get(name)
            if upstream is not None and "//" not in path and not has_dot_segment(path):
                return Route(upstream, "prefix", path, forward_path(upstream.base_path, path, raw_target), query or "",
                             upstream.host)
        name, raw_rest, query = split_route_prefix(raw_target)
        upstream = self._by_name.get(name)
        if upstream is None:
            raise RequestRefused("unknown_upstream", f"outbound: no upstream named {name!r} is configured")
        path = canonical_path(raw_rest, upstream.paths)
        return Route(upstream, "prefix", path, forward_path(upstream.base_path, path, raw_target), query,
                     upstream.host)

    def _absolute(self, raw_target: str, host_header: str | None) -> Route:
        scheme, _, rest = raw_target.partition("://")
        authority, slash, path_query = rest.partition("/")
        if "?" in authority:
            authority, _, q = authority.partition("?")
            path_query = "?" + q
        raw_path, _, query = ("/" + path_query if slash else path_query or "/").partition("?")
        if not raw_path.startswith("/"):
            raw_path = "/" + raw_path
        host, port = normalize_host(authority, scheme.lower())
        if host_header is None or normalize_host(host_header, scheme.lower()) != (host, port):
            raise RequestRefused("host_mismatch", "outbound: the Host header and the absolute URI's authority "
                                                  "must name the same host")
        return self.for_host(host, raw_path, query, "proxy")

    def for_host(self, host: str, raw_path: str, query: str, mode: str) -> Route:
        """Forward-proxy and CONNECT modes: map a host to its upstream and strip the base path."""
        upstream = self.upstream_for_host(host)
        if upstream is None:
            raise RequestRefused("unknown_upstream", f"outbound: host {host} is not mapped to any upstream")
        check_query(query)
        full = canonical_path(raw_path, upstream.paths)
        path = strip_base(full, upstream.base_path)
        if path is None:
            raise RequestRefused("unknown_upstream", f"outbound: path is outside upstream {upstream.name}'s "
                                                     "base path")
        sent_as = upstream.host if host in self._by_host else host
        return Route(upstream, mode, path, join_base(upstream.base_path, path), query, sent_as)

    def upstream_for_host(self, host: str) -> Upstream | None:
        """The upstream a canonical host (``normalize_host``) maps to: by its name, else by the
        wildcard over its parent, which covers exactly one label."""
        exact = self._by_host.get(host)
        if exact is not None:
            return exact
        label, dot, parent = host.partition(".")
        return self._by_parent.get(parent) if label and dot else None


def host_pattern(text: str) -> str:
    """A ``hosts`` entry as matched: lowercase, no trailing dot, IDN as its ASCII (punycode) form.
    A wildcard is a whole leading label over a DNS name of at least two labels; raises ValueError
    saying what was expected."""
    name = _ascii_name(text.strip().lower().rstrip("."))
    if name == "*":
        raise ValueError(f"{text!r}: * alone would map every name; expected a wildcard over a domain, *.example.com")
    if not name.startswith(WILDCARD):
        if "*" in name:
            raise ValueError(f"{text!r}: a wildcard is a whole leading label only, as in *.example.com")
        return name
    parent = name[len(WILDCARD):]
    labels = parent.split(".")
    if "*" in parent or not all(_DNS_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        raise ValueError(f"{text!r}: expected *. followed by a DNS name, as in *.example.com")
    if len(labels) < 2:
        raise ValueError(f"{text!r}: a wildcard must sit below a registrable domain, not a top-level one")
    if _public_suffixes().is_public(parent):
        raise ValueError(f"{text!r}: {parent} is a public suffix, under which anyone registers domains; expected "
                         f"a wildcard over a registrable domain, as in *.example.co.uk")
    return name


@cache
def _public_suffixes() -> PublicSuffixList:
    """The Public Suffix List's ICANN section (``co.uk``, ``kawasaki.jp``), loaded once (~0.2 s) when a
    wildcard is first read. Its private section is left out: it lists names such as
    ``s3.us-east-1.amazonaws.com``, whose one-label wildcard is what virtual-hosted S3 needs."""
    return PublicSuffixList(only_icann=True)


def _ascii_name(name: str) -> str:
    """An internationalized name in the ASCII form a Host header carries (IDNA, label by label)."""
    if name.isascii():
        return name
    try:
        return ".".join(label if label.isascii() else label.encode("idna").decode("ascii")
                        for label in name.split("."))
    except UnicodeError:
        raise ValueError(f"{name!r}: expected a DNS name; this one is not a valid internationalized name") from None


def _own_authorities(listen: ListenAddress) -> frozenset[tuple[str, int]]:
    """(host, port) pairs a route-prefix Host header may name: the listener's own address."""
    names = {listen.host, "localhost", "127.0.0.1", "::1"} if listen.is_loopback else {listen.host}
    return frozenset((name.lower(), listen.port) for name in names)
