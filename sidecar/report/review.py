"""What the policy grants each agent that the events never show it using, and rules never matched.

The policy files are compiled by the project's own loader first (``explain.candidate_policy``: an
invalid file is refused as ``sidecar run`` would refuse it); the rules' listed methods, paths and
MCP tools are then read from the same files, because a compiled rule keeps only its matchers.
While events stream in, :meth:`Coverage.add` marks, per agent and deciding rule, which listed
method, path pattern and tool an exchange used; memory is bounded by agents times rules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sidecar.policy.engine import PolicySet
from sidecar.policy.globs import compile_globs
from sidecar.report.usage import used

Matcher = Callable[[str | None], bool]


@dataclass(frozen=True)
class ListedRule:
    """One rule as its file lists it: the grants a reviewer reads, with a matcher per pattern."""

    id: str
    where: str
    direction: str
    effect: str
    shadow: bool
    upstream: str | None
    methods: tuple[str, ...]
    paths: tuple[str, ...]
    tools: tuple[str, ...]
    mcp_methods: tuple[str, ...]
    conditional: bool
    agents: Matcher | None
    path_matchers: tuple[Matcher, ...]
    tool_matchers: tuple[Matcher, ...]

    @property
    def grants(self) -> bool:
        return self.effect != "deny" and not self.shadow

    def applies_to(self, agent_id: str) -> bool:
        return self.agents is None or self.agents(agent_id)

    def describe(self) -> str:
        parts = [self.direction, self.effect]
        if self.upstream:
            parts.append(f"upstream {self.upstream}")
        parts.append(" ".join(self.methods) if self.methods else "any method")
        parts.append(" ".join(self.paths) if self.paths else "any path")
        if self.tools:
            parts.append("tools " + " ".join(self.tools))
        if self.mcp_methods:
            parts.append("mcp methods " + " ".join(self.mcp_methods))
        if self.conditional:
            parts.append("(conditional)")
        return ", ".join(parts)


def listed_rules(policy: PolicySet) -> list[ListedRule]:
    """The compiled rules of ``policy`` with their listed grants, in file order."""
    raw = _raw_rules(policy.files)
    return [_listed(rule.id, rule.where, rule.shadow, rule.conditional, raw.get(rule.id, {})) for rule in policy.rules]


def _raw_rules(files: Sequence[Path]) -> dict[str, Mapping[str, Any]]:
    out: dict[str, Mapping[str, Any]] = {}
    for path in files:
        content = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        for raw in content.get("rules") or ():
            if isinstance(raw, Mapping) and isinstance(raw.get("id"), str):
                out[raw["id"]] = raw
    return out


def _listed(rule_id: str, where: str, shadow: bool, conditional: bool, raw: Mapping[str, Any]) -> ListedRule:
    mcp = raw.get("mcp") or {}
    paths, tools = tuple(raw.get("paths") or ()), tuple(mcp.get("tools") or ())
    agents = tuple(raw.get("agents") or ())
    return ListedRule(
        rule_id, where, raw.get("direction", ""), raw.get("effect", ""), shadow, raw.get("upstream"),
        tuple(raw.get("methods") or ()), paths, tools, tuple(mcp.get("methods") or ()), conditional,
        compile_globs(agents) if agents else None, tuple(compile_globs((p,)) for p in paths),
        tuple(compile_globs((t,)) for t in tools))


@dataclass
class RuleUse:
    """What one agent's exchanges decided by one rule used of what it lists."""

    count: int = 0
    methods: set[str] = field(default_factory=set)
    paths: set[int] = field(default_factory=set)  # indexes into ListedRule.paths
    tools: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class Unused:
    """A grant the events never show: a whole rule, or listed methods, paths or tools of a used one."""

    rule: ListedRule
    methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()

    @property
    def whole_rule(self) -> bool:
        return not (self.methods or self.paths or self.tools)

    def as_dict(self) -> dict[str, Any]:
        if self.whole_rule:
            return {"rule": self.rule.id, "unused": "rule", "grants": self.rule.describe()}
        return {"rule": self.rule.id, "unused": "parts", "methods": list(self.methods), "paths": list(self.paths),
                "tools": list(self.tools)}


class Coverage:
    """Per (agent, rule): which listed grants the exchanges used."""

    def __init__(self, rules: list[ListedRule]) -> None:
        self.rules = rules
        self._by_id = {r.id: r for r in rules}
        self.uses: dict[tuple[str, str], RuleUse] = {}

    def add(self, event: dict[str, Any]) -> None:
        rule = self._by_id.get(event.get("rule_id") or "")
        if rule is None or not used(event):
            return
        use = self.uses.setdefault((event["agent"]["id"], rule.id), RuleUse())
        use.count += 1
        target = event["target"]
        use.methods.add(target["method"])
        path = target.get("path")
        use.paths.update(i for i, match in enumerate(rule.path_matchers) if i not in use.paths and match(path))
        if target.get("mcp_method") == "tools/call":
            tool = target.get("mcp_tool")
            use.tools.update(i for i, match in enumerate(rule.tool_matchers) if i not in use.tools and match(tool))

    def unused_for(self, agent_id: str) -> list[Unused]:
        """The enforced allow and approval rules that apply to the agent, less what it used of them."""
        out = []
        for rule in self.rules:
            if not rule.grants or not rule.applies_to(agent_id):
                continue
            use = self.uses.get((agent_id, rule.id))
            if use is None:
                out.append(Unused(rule))
                continue
            unused = Unused(rule, tuple(m for m in rule.methods if m not in use.methods),
                            tuple(p for i, p in enumerate(rule.paths) if i not in use.paths),
                            tuple(t for i, t in enumerate(rule.tools) if i not in use.tools))
            if not unused.whole_rule:
                out.append(unused)
        return out

    def never_matched(self, hits: Mapping[str, int]) -> list[ListedRule]:
        """Rules (of any effect, shadow included) that decided no exchange at all."""
        return [r for r in self.rules if not hits.get(r.id)]
