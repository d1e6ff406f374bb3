"""The table of rule conditions: one row per key a rule may state, each reading one Facts field."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from typing import Any

from sidecar.errors import ConfigError
from sidecar.exchange import AgentInfo
from sidecar.fields import Fields
from sidecar.policy.conditions import CONDITIONS, ConditionType, LoadContext, RuleHead, compile_conditions
from sidecar.policy.facts import Facts
from sidecar.policy.globs import Check, glob_check, patterns

NOW = datetime(2026, 3, 10, 16, 0, tzinfo=timezone.utc)
HEAD = RuleHead("outbound", "allow", "billing-api", LoadContext({"billing-api": "http"}, {}, False))


def facts(**overrides: Any) -> Facts:
    base = Facts("outbound", "GET", "https", "billing.internal", "/v1/invoices/7", "", {}, 0, "billing-api",
                 AgentInfo("spiffe://example.org/agent", "billing-agent", "production"))
    return dataclasses.replace(base, **overrides)


def test_the_table_lists_every_condition_in_matching_order() -> None:
    """Static conditions first, cheapest first; then when: delegation, hours, and the expression last."""
    assert [row.key for row in CONDITIONS] == [
        "hosts", "agents", "callers", "paths", "headers", "mcp", "a2a", "llm", "grpc", "when.delegation", "when.hours",
        "when.expr"]


def test_every_row_reads_a_facts_field() -> None:
    """The field a row names is one Facts has ("agent.id": the agent's), so its parser can read it."""
    fields = {f.name for f in dataclasses.fields(Facts)}
    for row in CONDITIONS:
        assert row.reads.partition(".")[0] in fields, row.key


def test_a_new_condition_is_one_parser_and_one_row() -> None:
    """A tasks: glob over Facts.task_id needs nothing but its row: the compiler iterates the table."""
    def tasks(f: Fields, row: ConditionType, head: RuleHead) -> Check | None:
        found = patterns(f, row.name)
        return glob_check(found, row.reads) if found else None

    errors: list[ConfigError] = []
    table = (*CONDITIONS, ConditionType("tasks", "task_id", tasks))
    checks, conditional = compile_conditions(Fields({"tasks": ["ops-*"]}, "r", errors), HEAD, table)
    assert not errors and not conditional
    assert [check(facts(task_id="ops-7"), NOW) for check in checks] == [True]
    assert [check(facts(task_id="dev-1"), NOW) for check in checks] == [False]


def test_only_stated_conditions_are_compiled_and_when_marks_the_rule_conditional() -> None:
    """A rule without conditions has no checks; one with a when needs the decision time."""
    errors: list[ConfigError] = []
    assert compile_conditions(Fields({}, "r", errors), HEAD) == ((), False)
    checks, conditional = compile_conditions(Fields({"when": {"delegation": "forbidden"}}, "r", errors), HEAD)
    assert not errors and conditional and len(checks) == 1
    assert checks[0](facts(), NOW) and not checks[0](facts(delegation="delegated"), NOW)
