"""Other readings of one request: method and URL overrides, and tokens in parameters (issue 11)."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from sidecar.config_model import AgentMeta
from sidecar.errors import RequestRefused
from sidecar.exchange import AgentInfo
from sidecar.http.target import DEFAULT_OPTIONS
from sidecar.policy.facts import build_facts
from sidecar.policy.readings import NONE, Reading, screen

ALL_PASSED = frozenset({"x-http-method-override", "x-http-method", "x-method-override", "x-original-url",
                        "x-rewrite-url", "_method", "access_token"})


def run(headers: dict[str, str] | None = None, query: str = "", form: bytes | None = None,
        passed: frozenset[str] = frozenset(), base: str = "/api") -> Reading:
    return screen(CIMultiDict(headers or {}), query, form, passed, DEFAULT_OPTIONS, base)


@pytest.mark.parametrize("headers, query, form, reason", [
    ({"X-HTTP-Method-Override": "DELETE"}, "", None, "request_override"),  # Google APIs, Express
    ({"x-http-method": "DELETE"}, "", None, "request_override"),           # OData; names compare caselessly
    ({"X-Method-Override": "DELETE"}, "", None, "request_override"),
    ({"X-Original-URL": "/api/admin"}, "", None, "request_override"),       # IIS, Symfony
    ({"X-Rewrite-URL": "/api/admin"}, "", None, "request_override"),
    ({}, "a=1&_method=DELETE", None, "request_override"),                   # Symfony, Laravel
    ({}, "a=1;_method=DELETE", None, "request_override"),                   # ';' separates too
    ({}, "%5Fmethod=DELETE", None, "request_override"),                     # the decoded name counts
    ({}, "", b"_method=PUT&x=1", "request_override"),                      # Rails, Laravel forms
    ({}, "access_token=t", None, "credential_parameter"),                   # RFC 6750 §2.3
    ({}, "", b"x=1&access%5Ftoken=t", "credential_parameter"),              # RFC 6750 §2.2
])
def test_not_passed_overrides_and_tokens_are_refused(headers: dict[str, str], query: str, form: bytes | None,
                                                     reason: str) -> None:
    """Each is refused with its reason code unless the upstream passes it (issue 11 items 9 and 12)."""
    with pytest.raises(RequestRefused) as refused:
        run(headers, query, form)
    assert refused.value.reason == reason and refused.value.status == 400
    assert "DELETE" not in refused.value.message and "=t" not in refused.value.message
    run(headers, query, form, passed=ALL_PASSED)  # passed: no refusal


@pytest.mark.parametrize("headers, query, form, expected", [
    ({}, "a=1&method=DELETE&xaccess_token=1", None, NONE),                        # other names are data
    ({"X-HTTP-Method-Override": " delete "}, "", None, Reading("DELETE", None)),  # trimmed, uppercased
    ({}, "_method=put", None, Reading("PUT", None)),
    ({"X-Original-URL": "/api/v1/admin//x?q=1"}, "", None, Reading(None, "/v1/admin/x")),  # canonical, base removed
    ({"X-HTTP-Method": "DELETE", "X-Rewrite-URL": "/api/a"}, "", None, Reading("DELETE", "/a")),
])
def test_passed_overrides_give_the_other_reading(headers: dict[str, str], query: str, form: bytes | None,
                                                 expected: Reading) -> None:
    """A passed override yields the method and rule path the upstream would act on (issue 11 item 9)."""
    assert run(headers, query, form, passed=ALL_PASSED) == expected


@pytest.mark.parametrize("headers", [
    {"X-HTTP-Method-Override": "GET", "X-HTTP-Method": "DELETE"},  # two overrides that disagree
    {"X-HTTP-Method-Override": "DEL ETE"},                         # not a method token
    {"X-Original-URL": "/elsewhere/admin"},                        # outside the upstream's base path
])
def test_ambiguous_passed_overrides_are_refused(headers: dict[str, str]) -> None:
    """A passed override that cannot be decided on one reading is refused (issue 11 item 9)."""
    with pytest.raises(RequestRefused) as refused:
        run(headers, passed=ALL_PASSED)
    assert refused.value.reason == "request_override"


@pytest.mark.parametrize("reading, expected", [
    (NONE, []),  # no passed override (nearly every request): nothing besides the request line
    (Reading("DELETE", None), [("DELETE", "/api/items")]),
    (Reading(None, "/api/admin"), [("GET", "/api/admin")]),
    (Reading("DELETE", "/api/admin"), [("GET", "/api/admin"), ("DELETE", "/api/items"), ("DELETE", "/api/admin")]),
    (Reading("GET", "/api/items"), []),  # an override naming the request line itself adds no reading
])
def test_the_other_readings_policy_must_also_allow(reading: Reading, expected: list[tuple[str, str]]) -> None:
    """Every combination of the overridden method and path besides the request line, the rest of the facts kept."""
    agent = AgentInfo("spiffe://example.org/ns/agents/sa/billing-1", "billing-agent", "production", AgentMeta())
    facts = build_facts(direction="outbound", method="GET", scheme="https", host="api.example.com",
                        path="/api/items", query="a=1", headers={}, size=None, upstream="api", agent=agent)
    others = reading.alternatives(facts)
    assert sorted((f.method, f.path) for f in others) == sorted(expected)
    assert all((f.host, f.query, f.upstream, f.agent) == ("api.example.com", "a=1", "api", agent) for f in others)
