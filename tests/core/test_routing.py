"""The router's clean-target fast path decides exactly as the general path does."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config import parse_config
from sidecar.errors import RequestRefused
from sidecar.http.target import canonical_path, split_route_prefix
from sidecar.routing import Router, forward_path

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
