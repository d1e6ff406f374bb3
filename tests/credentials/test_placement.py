"""Where a secret goes on the outgoing request (a header after its scheme, or a query parameter),
read once from config and applied per request by setting what was built per credential."""

from __future__ import annotations

from typing import Any

import pytest
from multidict import CIMultiDict

from sidecar.credentials.base import OutboundRequest
from sidecar.credentials.placement import BEARER, Placement, header_only, header_or_query
from sidecar.errors import ConfigError
from sidecar.fields import Fields


def outbound(query: str = "", **headers: str) -> OutboundRequest:
    return OutboundRequest("GET", "https", "api.internal", 443, "/v1/items", query, CIMultiDict(headers))


@pytest.mark.parametrize(("placement", "query", "expected_headers", "expected_query"), [
    # a header replaces the agent's own, scheme first
    (BEARER, "", {"Authorization": "Bearer s3cr3t value"}, ""),
    (Placement("X-API-Key"), "page=2", {"Authorization": "agent's", "X-API-Key": "s3cr3t value"}, "page=2"),
    # a query parameter joins the raw query, name and value percent-encoded
    (Placement(None, "api key"), "", {"Authorization": "agent's"}, "api%20key=s3cr3t%20value"),
    (Placement(None, "api_key"), "page=2", {"Authorization": "agent's"}, "page=2&api_key=s3cr3t%20value"),
])
def test_apply_sets_what_format_built(placement: Placement, query: str, expected_headers: dict[str, str],
                                      expected_query: str) -> None:
    """format runs once per credential; apply only places its result."""
    out = outbound(query, Authorization="agent's")
    placement.apply(out, placement.format("s3cr3t value"))
    assert dict(out.headers) == expected_headers and out.query == expected_query


def read(parse: Any, raw: dict[str, Any]) -> tuple[Placement | None, list[str]]:
    errors: list[ConfigError] = []
    placement = parse(Fields(raw, "credentials.k", errors))
    return placement, [str(e) for e in errors]


@pytest.mark.parametrize(("raw", "expected"), [
    ({"header": "X-API-Key"}, Placement("X-API-Key")),
    ({"header": "Authorization", "scheme": "Token "}, Placement("Authorization", scheme="Token ")),
    ({"header": "Authorization"}, Placement("Authorization")),  # no scheme unless one is given
    ({"query": "api_key"}, Placement(None, "api_key")),
])
def test_header_or_query_reads_one_of_them(raw: dict[str, Any], expected: Placement) -> None:
    """static: a header (scheme optional, none by default) or a query parameter."""
    assert read(header_or_query, raw) == (expected, [])


@pytest.mark.parametrize(("raw", "error"), [
    ({}, "credentials.k: needs exactly one of header: NAME or query: NAME"),
    ({"header": "X-Key", "query": "key"}, "credentials.k: needs exactly one of header: NAME or query: NAME"),
    ({"header": "X_Key"}, "credentials.k.header: must be an HTTP header name without '_', ':' or spaces"),
    ({"header": "X-Key:"}, "credentials.k.header: must be an HTTP header name without '_', ':' or spaces"),
    ({"header": "X Key"}, "credentials.k.header: must be an HTTP header name without '_', ':' or spaces"),
])
def test_header_or_query_refuses_what_cannot_be_sent(raw: dict[str, Any], error: str) -> None:
    """Neither or both, or a header name a proxy would mangle or refuse: a config error with its path."""
    assert read(header_or_query, raw) == (None, [error])


@pytest.mark.parametrize(("raw", "expected"), [
    ({}, BEARER),  # Authorization, Bearer
    ({"header": "authorization"}, Placement("authorization", scheme="Bearer ")),
    ({"header": "X-Assertion"}, Placement("X-Assertion")),  # another header: no scheme unless given
    ({"header": "X-Assertion", "scheme": "JWT "}, Placement("X-Assertion", scheme="JWT ")),
])
def test_header_only_defaults_to_a_bearer_authorization(raw: dict[str, Any], expected: Placement) -> None:
    """jwt_assertion: a header, Authorization by default, with Bearer only before Authorization."""
    assert read(header_only, raw) == (expected, [])
