"""The router: the clean-target fast path decides exactly as the general path does; hosts and wildcards."""

from __future__ import annotations

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config import parse_config
from sidecar.errors import ConfigInvalid, RequestRefused
from sidecar.http.target import canonical_path, split_route_prefix
from sidecar.routing import Router, forward_path
from tests.harness import raw_http
from tests.scenarios.connect import billing_config, exchange, get, intercept_ca, start_https_upstream, tunnel
from tests.scenarios.outbound import POLICY, config_for

CONFIG = {
    "agent": {"name": "a"},
    "outbound": {"listen": "127.0.0.1:15001", "upstreams": {
        "a": {"url": "http://127.0.0.1:9001"},
        "billing-api": {"url": "http://127.0.0.1:9002/api"},
        "b": {"url": "http://127.0.0.1:9003"},
    }},
}

TARGETS = [
    "/a/x", "/a", "/a/", "/a?q", "/a/?q=1", "/billing-api/v1/x?y=1", "/billing-api", "/billing-api/",
    "/a/x?u=/b/../c?d=%2F", "/a/.well-known/x", "/a/x.", "/a/x..y/z", "/a/~user/!$&'()*+,=:@",
    "/a/../b/x", "/a/./x", "/a/x/..", "/a/x/.", "/a//x", "/a/x//", "/a/%2e%2e/b/x", "/a/%2F", "/a/x%20y",
    "/a/x;p=1", "/a/x\\y", "/a/x#f", "/a/x?q#f", "/a/x?q= 1", "/a/x?q=\u00e9", "/a/x?q=\x7f",
    "/../b/x", "/./b/x", "/%61/x", "//b/x", "/", "/a;x=1/x", "/nope/x", "/.a/x", "/a.b/x", "/-/x",
]


def _general(router: Router, target: str):
    """The route by the general path alone (what the router did before the fast path)."""
    name, raw_rest, query = split_route_prefix(target)
    upstream = router._by_name.get(name)
    if upstream is None:
        raise RequestRefused("unknown_upstream", "")
    path = canonical_path(raw_rest, upstream.paths)
    return (upstream.name, path, forward_path(upstream.base_path, path, target), query)


def _outcome(call):
    """(upstream name, path, forwarded path, query), or the refusal's reason."""
    try:
        return call()
    except RequestRefused as refused:
        return refused.reason


def _routed(router: Router, target: str, headers):
    route = router.route(target, headers)
    return (route.upstream.name, route.path, route.forward_path, route.query)


@pytest.mark.parametrize("target", TARGETS)
def test_fast_path_and_general_path_agree(target):
    """Same upstream, canonical path, forwarded path and query, or the same refusal, for every target."""
    config = parse_config(CONFIG)
    router = Router(config.outbound.upstreams, config.outbound.listen)
    headers = CIMultiDictProxy(CIMultiDict({"Host": "127.0.0.1:15001"}))
    assert _outcome(lambda: _routed(router, target, headers)) == _outcome(lambda: _general(router, target))


@pytest.mark.parametrize("target, forwarded", [
    ("/billing-api", "/api"),  # the upstream's URL itself: an MCP endpoint at /mcp is not /mcp/
    ("/billing-api?x=1", "/api"),
    ("/billing-api/", "/api/"),  # a slash the agent wrote is kept
    ("/a", "/"),
])
def test_a_bare_route_prefix_forwards_the_upstreams_url_itself(target, forwarded):
    """/<name> alone is sent to the upstream's URL as configured, with no slash added (issue 13 item 2)."""
    config = parse_config(CONFIG)
    router = Router(config.outbound.upstreams, config.outbound.listen)
    route = router.route(target, CIMultiDictProxy(CIMultiDict({"Host": "127.0.0.1:15001"})))
    assert (route.path, route.forward_path) == ("/", forwarded)


# --- hosts: names and leading-label wildcards (issue 14 item 1) ---------------------------

WILDCARDS = {
    "agent": {"name": "a"},
    "outbound": {"listen": "127.0.0.1:15001", "upstreams": {
        "s3": {"url": "https://s3.us-east-1.amazonaws.com", "hosts": ["*.s3.us-east-1.amazonaws.com"]},
        "special": {"url": "https://127.0.0.1:9004", "hosts": ["logs.s3.us-east-1.amazonaws.com"]},
        "books": {"url": "https://127.0.0.1:9005", "hosts": ["*.Bücher.Example."]},
        "plain": {"url": "https://127.0.0.1:9006", "hosts": ["Billing.Internal."]},
    }},
}


def _wildcard_router() -> Router:
    config = parse_config(WILDCARDS)
    return Router(config.outbound.upstreams, config.outbound.listen)


def _proxied(router: Router, url: str, host: str) -> tuple[str, str] | str:
    """(upstream, name sent as Host) for a forward-proxy request, or the refusal's reason."""
    headers = CIMultiDictProxy(CIMultiDict({"Host": host}))
    return _outcome(lambda: (lambda r: (r.upstream.name, r.host))(router.route(url, headers)))


@pytest.mark.parametrize("authority, expected", [
    ("bucket.s3.us-east-1.amazonaws.com", ("s3", "bucket.s3.us-east-1.amazonaws.com")),  # one label deep
    ("BUCKET.S3.US-EAST-1.AMAZONAWS.COM", ("s3", "bucket.s3.us-east-1.amazonaws.com")),  # case folds
    ("bucket.s3.us-east-1.amazonaws.com.", ("s3", "bucket.s3.us-east-1.amazonaws.com")),  # trailing dot
    ("bucket.s3.us-east-1.amazonaws.com:443", ("s3", "bucket.s3.us-east-1.amazonaws.com")),  # default port
    ("bucket.s3.us-east-1.amazonaws.com:8443", ("s3", "bucket.s3.us-east-1.amazonaws.com")),  # any port
    ("a-b-1.s3.us-east-1.amazonaws.com", ("s3", "a-b-1.s3.us-east-1.amazonaws.com")),
    ("logs.s3.us-east-1.amazonaws.com", ("special", "127.0.0.1")),  # a listed name wins over the wildcard
    ("x.xn--bcher-kva.example", ("books", "x.xn--bcher-kva.example")),  # IDN: the config's U-label, as punycode
    ("billing.internal", ("plain", "127.0.0.1")),  # a listed name is sent as the upstream's own host
    ("BILLING.internal.", ("plain", "127.0.0.1")),
])
def test_a_wildcard_maps_exactly_one_leading_label(authority, expected):
    """*.parent maps any one label below parent, in every spelling of the authority."""
    router = _wildcard_router()
    assert _proxied(router, f"https://{authority}/k", authority) == expected


@pytest.mark.parametrize("authority, reason", [
    ("s3.us-east-1.amazonaws.com", "unknown_upstream"),  # the parent itself is not below it
    ("a.b.s3.us-east-1.amazonaws.com", "unknown_upstream"),  # two labels deep
    ("a.logs.s3.us-east-1.amazonaws.com", "unknown_upstream"),  # nor below a listed name
    (".s3.us-east-1.amazonaws.com", "bad_request"),  # an empty label is not a name
    ("*.s3.us-east-1.amazonaws.com", "bad_request"),  # nor is the pattern itself
    ("bucket.s3.us-east-1.amazonaws.com.evil.example", "unknown_upstream"),  # a suffix is not a parent
    ("bucket-s3.us-east-1.amazonaws.com", "unknown_upstream"),  # nor a label that only ends like it
    ("x.bücher.example", "bad_request"),  # a raw U-label in Host is refused: agents send punycode
    ("bucket.s3.us-east-1.amazonaws.com%2e", "bad_request"),
    ("bucket.s3.us-east-1.amazonaws.com@evil.example", "bad_request"),
])
def test_what_a_wildcard_does_not_map(authority, reason):
    """The bypass table: names a wildcard must not cover are refused, never routed by a looser match."""
    router = _wildcard_router()
    assert _proxied(router, f"https://{authority}/k", authority) == reason


@pytest.mark.parametrize("host, expected", [
    ("bucket.s3.us-east-1.amazonaws.com", "s3"),
    ("logs.s3.us-east-1.amazonaws.com", "special"),
    ("a.b.s3.us-east-1.amazonaws.com", None),
    ("s3.us-east-1.amazonaws.com", None),
    ("10.0.0.1", None),
])
def test_connect_looks_hosts_up_the_same_way(host, expected):
    """CONNECT opens a tunnel by upstream_for_host, then routes its requests by for_host: the same match."""
    router = _wildcard_router()
    found = router.upstream_for_host(host)
    assert (found.name if found else None) == expected
    if expected is not None:
        assert router.for_host(host, "/k", "", "connect").upstream.name == expected


@pytest.mark.parametrize("entry, message", [
    ("*", "* alone would map every name"),  # everything
    ("*.", "* alone would map every name"),
    ("*.com", "not a top-level one"),  # a top-level domain
    ("*.COM.", "not a top-level one"),
    ("a*.example.com", "a wildcard is a whole leading label only"),  # a partial label
    ("*a.example.com", "a wildcard is a whole leading label only"),
    ("a.*.example.com", "a wildcard is a whole leading label only"),  # not leading
    ("*.*.example.com", "expected *. followed by a DNS name"),
    ("*.10.0.0.1", "expected *. followed by a DNS name"),  # not below an IP address
    ("*.exa_mple.com", "expected *. followed by a DNS name"),
    ("*.co.uk", "co.uk is a public suffix"),  # a public suffix of two labels: every .co.uk domain
    ("*.kawasaki.jp", "kawasaki.jp is a public suffix"),  # a wildcard rule of the list (*.kawasaki.jp)
    ("*.com.au", "com.au is a public suffix"),
])
def test_a_wildcard_is_checked_at_config_load(entry, message):
    """Every bad wildcard is a config error with its path, before anything runs."""
    raw = {"agent": {"name": "a"}, "outbound": {"upstreams": {"u": {"url": "https://127.0.0.1:9", "hosts": [entry]}}}}
    with pytest.raises(ConfigInvalid) as info:
        parse_config(raw)
    (error,) = info.value.errors
    assert error.path == "outbound.upstreams.u.hosts[0]" and message in error.message


def test_two_upstreams_cannot_claim_one_wildcard():
    """A wildcard maps to one upstream, like a name."""
    raw = {"agent": {"name": "a"}, "outbound": {"upstreams": {
        "u": {"url": "https://127.0.0.1:9", "hosts": ["*.example.com"]},
        "v": {"url": "https://127.0.0.1:8", "hosts": ["*.EXAMPLE.com"]}}}}
    with pytest.raises(ConfigInvalid, match=r"host \*\.example\.com already maps to upstream u"):
        parse_config(raw)


async def test_a_wildcard_matched_request_reaches_the_upstream_under_the_agents_name(make_sidecar, upstream):
    """Forward-proxy mode: a bucket-style name is sent as the agent wrote it (virtual-hosted addressing),
    over the upstream's own connection; a listed name is sent with the upstream's host, as before."""
    config = config_for(upstream, hosts=["*.billing.internal", "billing.internal"])
    h = await make_sidecar(config, POLICY)
    async with aiohttp.ClientSession() as s:
        for url in ("http://eu.billing.internal/api/v1/x", "http://billing.internal/api/v1/y",
                    "http://a.eu.billing.internal/api/v1/z"):
            async with s.get(url, proxy=h.outbound) as r:
                assert r.status == (403 if url.startswith("http://a.eu") else 200)
    port = upstream.url.rpartition(":")[2]
    assert [(seen.path, seen.header("Host")) for seen in upstream.seen] == [
        ("/api/v1/x", f"eu.billing.internal:{port}"), ("/api/v1/y", f"127.0.0.1:{port}")]
    assert [e["reason"] for e in await h.settle()][-1] == "unknown_upstream"


async def test_a_wildcard_opens_a_tunnel_one_label_below_it_and_no_deeper(make_sidecar, upstream_ca, tmp_path):
    """CONNECT: eu.billing.internal gets an intercepted tunnel whose request reaches the upstream under that
    name; a.eu.billing.internal gets no tunnel."""
    server = await start_https_upstream(upstream_ca)
    try:
        config = billing_config(server, upstream_ca, tmp_path)
        config["outbound"]["upstreams"]["billing"]["hosts"] = ["*.billing.internal"]
        h = await make_sidecar(config, POLICY)
        reader, writer = await tunnel(h, intercept_ca(h), "eu.billing.internal:443")
        try:
            status, _, _ = await exchange(reader, writer, get("/api/v1/x", "eu.billing.internal"))
        finally:
            writer.close()
        deeper = b"CONNECT a.eu.billing.internal:443 HTTP/1.1\r\nHost: a.eu.billing.internal:443\r\n\r\n"
        refused = await raw_http(h.port("outbound"), deeper)
    finally:
        await server.stop()
    assert status == 200 and server.seen[-1].header("Host") == f"eu.billing.internal:{server.port}"
    assert refused.startswith(b"HTTP/1.1 403") and b'"error":"unknown_upstream"' in refused


@pytest.mark.parametrize("entry", [
    "*.s3.us-east-1.amazonaws.com",  # the private section's S3 names are not refused: virtual-hosted buckets
    "*.example.co.uk",  # a registrable domain under a public suffix
    "*.sidecar.test",  # a name under a reserved test TLD
])
def test_a_wildcard_over_a_registrable_domain_loads(entry):
    """Only the ICANN section of the Public Suffix List refuses a wildcard's parent."""
    raw = {"agent": {"name": "a"}, "outbound": {"upstreams": {"u": {"url": "https://127.0.0.1:9", "hosts": [entry]}}}}
    assert parse_config(raw).outbound.upstreams["u"].hosts == (entry,)
