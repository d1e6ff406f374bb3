"""CEL conditions: checked at load, evaluated per request, failing closed without leaking values."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from typing import Any

import pytest

from sidecar.config_model import AgentMeta
from sidecar.exchange import AgentInfo
from sidecar.policy.cel import CelCompileError, ConditionFailed, compile_condition
from sidecar.policy.cel_syntax import references
from sidecar.policy.facts import Facts

NOW = datetime(2026, 3, 10, 16, 0, tzinfo=timezone.utc)


def facts(agent_meta: AgentMeta = AgentMeta(), **overrides: Any) -> Facts:
    agent = AgentInfo("spiffe://example.org/ns/agents/sa/billing-1", "billing-agent", "production", agent_meta)
    base: dict[str, Any] = dict(
        direction="outbound", method="PUT", scheme="https", host="billing.internal", path="/v1/invoices/7",
        query="a=1", headers={"x-region": ("US", "EU")}, size=100, upstream="billing-api", agent=agent,
        task_id="t1", task_trigger="support")
    base.update(overrides)
    return Facts(**base)


class ExplodingHeaders(Mapping[str, tuple[str, ...]]):
    """Headers that fail if anything reads them."""

    def __getitem__(self, key: str) -> tuple[str, ...]:
        raise AssertionError("headers were read")

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("headers were read")

    def __len__(self) -> int:
        raise AssertionError("headers were read")


@pytest.mark.parametrize("source, message", [
    ("task.trigger ==", "cel: cannot compile"),                   # syntax error
    ("user == 'a'", "unknown variable 'user'"),                   # not a documented variable
    ("request.body == 'a'", "request has no field 'body'"),       # not a field of request
    ("principal.email == 'a'", "principal has no field 'email'"),
    ("lower(agent.id) == 'a'", "unknown function 'lower'"),       # would compile, then fail on every request
])
def test_compile_errors(source: str, message: str) -> None:
    """Expressions that can never work are refused at load with what was expected."""
    with pytest.raises(CelCompileError, match=message):
        compile_condition(source)


@pytest.mark.parametrize("source", [
    "[1, 2].all(x, x > 0)",                       # comprehension variables are not unknown variables
    "request.headers.exists(k, k == 'x-region')",
    "'request.body' != request.path",             # names inside string literals are not field selections
    "size(request) == 7",                         # the whole request object
])
def test_compiles(source: str) -> None:
    """Valid expressions over the documented variables compile."""
    assert compile_condition(source).source == source


@pytest.mark.parametrize("source, overrides, expected", [
    ('request.method == "PUT" && request.path.startsWith("/v1/")', {}, True),
    ('request.headers["x-region"] == ["US", "EU"]', {}, True),        # every value, in order
    ('"x-trace" in request.headers', {}, False),
    ("request.size < 65536 && request.query == 'a=1'", {}, True),
    ('agent.name == "billing-agent" && agent.environment == "production"', {}, True),
    ("caller.id.endsWith('/orchestrator')", {"caller_id": "spiffe://e.org/orchestrator"}, True),
    ("principal == null", {}, True),                                  # no principal: null
    ("principal.sub == 'alice'", {"principal": ("https://idp", "alice")}, True),
    ("delegation == 'delegated'", {"delegation": "delegated"}, True),
    ("task.trigger == 'support'", {}, True),
    ("task == null", {"task_id": None}, True),
    ("mcp.method == 'tools/call' && mcp.tool == 'search'", {"mcp_method": "tools/call", "mcp_tool": "search"}, True),
    ("mcp == null", {}, True),
    ("now == timestamp('2026-03-10T16:00:00Z')", {}, True),          # now is the decision time
    ("now.getDayOfWeek() == 2", {}, True),                            # Tuesday (UTC)
])
def test_evaluate(source: str, overrides: dict[str, Any], expected: bool) -> None:
    """The documented variables carry the request's facts."""
    assert compile_condition(source).evaluate(facts(**overrides), NOW) is expected


@pytest.mark.parametrize("source, overrides, message", [
    ("task.trigger == 'support'", {"task_id": None}, "no matching overload"),     # field of null
    ("principal.sub == 'a'", {}, "no matching overload"),
    ('request.headers["x-absent"][0] == "a"', {}, "no such key or field 'x-absent'"),
    ("request.size", {}, "returned int, expected a boolean"),                    # not a boolean
    ("request.size / 0 == 1", {}, "division by zero"),
])
def test_evaluation_failures(source: str, overrides: dict[str, Any], message: str) -> None:
    """Anything that cannot be evaluated raises ConditionFailed (the engine's condition_error)."""
    with pytest.raises(ConditionFailed, match=message):
        compile_condition(source).evaluate(facts(**overrides), NOW)


def test_failures_do_not_repeat_request_values() -> None:
    """A failure message never carries a header value, which may be a secret."""
    condition = compile_condition('int(request.headers["x-key"][0]) > 1')
    with pytest.raises(ConditionFailed) as caught:
        condition.evaluate(facts(headers={"x-key": ("s3cret-token",)}), NOW)
    assert "s3cret" not in str(caught.value)


def test_only_needed_values_are_built() -> None:
    """An expression that selects request.size never converts the headers."""
    condition = compile_condition("request.size < 1000 && agent.id != ''")
    assert condition.evaluate(facts(headers=ExplodingHeaders()), NOW) is True
    with pytest.raises(AssertionError, match="headers were read"):
        compile_condition("size(request) > 0").evaluate(facts(headers=ExplodingHeaders()), NOW)


@pytest.mark.parametrize("source", [
    'request.size > 0 && r"\\" != "request.headers"',          # a raw string ending in a backslash
    "request.size > 0 // request.headers",                    # a comment
    "request.size > 0 && '''\nrequest.headers''' != ''",       # a triple-quoted string over two lines
])
def test_names_in_literals_and_comments_are_not_references(source: str) -> None:
    """Only the syntax tree counts: a name inside a string or a comment builds no headers."""
    assert compile_condition(source).evaluate(facts(headers=ExplodingHeaders()), NOW) is True


@pytest.mark.parametrize("source, overrides", [
    ("[1].exists(request, request > 0) && request.size > 0", {}),   # bound in the macro, read outside it
    ("agent.labels.exists(agent, agent == 'team')", {"agent_meta": AgentMeta(labels=(("team", "a"),))}),
])
def test_a_variable_a_comprehension_rebinds_is_still_read_outside_it(source: str, overrides: dict[str, Any]) -> None:
    """A comprehension's variable shadows a global only inside the comprehension."""
    assert compile_condition(source).evaluate(facts(**overrides), NOW) is True


@pytest.mark.parametrize("source, fields", [
    ("request.size > 0 && request.method == 'GET'", {"request": {"size", "method"}}),
    ("size(request) > 0 && request.size > 0", {"request": None}),       # used whole once: built whole
    ("has(task.trigger) && now.getHours() > 1", {"task": {"trigger"}, "now": None}),
    ("{'a': mcp.tool}.all(k, k == caller.id)", {"mcp": {"tool"}, "caller": {"id"}}),
    ("[1, 2].map(x, x > 1, x * 2).size() == 1", {}),                  # x is only ever bound
])
def test_references_from_the_syntax_tree(source: str, fields: dict[str, set[str] | None]) -> None:
    """Each variable an expression reads, with the fields it selects (None: the whole value)."""
    assert references(source).fields == fields


def test_an_expression_the_two_parsers_read_differently_is_refused() -> None:
    """The engine compiles a qualified message name this module does not read: refused at load, not guessed."""
    with pytest.raises(CelCompileError, match="rewrite it in plain CEL"):
        compile_condition("x.y{a: 1} == 1")


META = AgentMeta(owner="payments@example.com", purpose="billing", trust_level="internal",
                 data_classes=("pii",), labels=(("team", "payments"),))


@pytest.mark.parametrize("source, meta, expected", [
    # ordering by the declared trust levels, not by spelling ("internal" > "production" as strings)
    ("agent.trust_rank >= trust_levels.internal", META, True),
    ("agent.trust_rank >= trust_levels.production", META, False),
    ("agent.trust_level == 'internal' && agent.trust_rank == 1", META, True),
    # labels, data classes and owner are plain values
    ("agent.labels.team == 'payments'", META, True),
    ("'team' in agent.labels && !('tier' in agent.labels)", META, True),
    ("'pii' in agent.data_classes", META, True),
    ("agent.owner.endsWith('@example.com')", META, True),
    # nothing declared: empty labels and data classes, null owner
    ("size(agent.labels) == 0 && size(agent.data_classes) == 0 && agent.owner == null", AgentMeta(), True),
])
def test_agent_metadata_in_conditions(source: str, meta: AgentMeta, expected: bool) -> None:
    """agent.trust_level, trust_rank, labels, data_classes and owner are CEL values; trust levels
    compare by their declared rank (issue 18 item 1)."""
    assert compile_condition(source).evaluate(facts(agent_meta=meta), NOW) is expected


@pytest.mark.parametrize("source, meta", [
    ("agent.trust_rank >= trust_levels.internal", AgentMeta()),     # no level declared: null rank
    ("agent.trust_rank >= trust_levels.root", META),               # a level no one declared
])
def test_trust_comparisons_without_a_rank_fail_closed(source: str, meta: AgentMeta) -> None:
    """A rank comparison on an agent without a level, or with an undeclared level, is a condition error
    (issue 18 item 1)."""
    with pytest.raises(ConditionFailed):
        compile_condition(source).evaluate(facts(agent_meta=meta), NOW)


@pytest.mark.parametrize("source, keys", [
    ('request.headers["X-Env"][0] == "prod"', {"x-env"}),                       # indexed by a literal name
    ('"x-tenant" in request.headers && request.size > 0', {"x-tenant"}),        # membership of a literal name
    ("request.method == 'GET'", set()),                                          # no header at all
    ("request.headers.size() > 3", None),                                        # sized: any header counts
    ('request.headers.exists(k, k.startsWith("x-"))', None),                     # iterated
    ('request.headers["x-" + "env"][0] == "a"', None),                           # a computed name
    ("size(request) > 0", None),                                                 # request used whole
    ('[1].all(request, request > 0) && "a" in request.headers', {"a"}),  # a bound name is not the variable
])
def test_the_header_names_an_expression_reads(source: str, keys: set[str] | None) -> None:
    """What events record for replay: the names read by literal, or None when any header may be read (issue 18)."""
    assert references(source).header_keys == keys
    compiled = compile_condition(source)
    assert compiled.header_keys == (None if keys is None else frozenset(keys))


def test_an_expression_reading_named_headers_builds_only_those() -> None:
    """Only the named headers are converted; the answer is the same as with all of them."""
    condition = compile_condition('request.headers["x-env"][0] == "prod" && !("x-debug" in request.headers)')
    assert condition.evaluate(facts(headers={"x-env": ("prod",), "x-other": ("1",)}), NOW) is True
    assert condition.evaluate(facts(headers={"x-env": ("prod",), "x-debug": ("1",)}), NOW) is False
