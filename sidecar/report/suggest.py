"""A least-privilege policy that allows exactly what the events show was used, and its proof.

One rule per agent and :class:`~sidecar.report.usage.GrantKey` (direction, upstream, caller,
credential, allowed or approved, MCP or plain HTTP), methods that used the same path patterns
sharing a rule. An MCP rule lists the tools called (lifecycle methods pass with them, as the
engine lets them) and the other MCP methods used. A rule names a credential only when the
exchanges used another than the upstream's default, and narrows scopes only when every exchange
used the same, narrower set. When every exchange of a rule was delegated, the rule requires it.
Approved exchanges become ``require_approval`` rules: a human stays in that loop.

:func:`prove` re-decides every logged exchange under the suggested set with the engine the
sidecar runs (``sidecar.replay.described`` builds the request as ``explain`` does, and
``explain.decide`` calls ``PolicySet.decide``): each used exchange must keep its effect. Refused
exchanges that the generalized patterns would now allow are counted as widened, with examples.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from sidecar.config_model import Config
from sidecar.policy.engine import PolicySet
from sidecar.policy.mcp import is_lifecycle
from sidecar.report.usage import OTHER, AgentUsage, Grant, GrantKey, Usage, policy_effect, used

EXAMPLES = 5
_ID_CHARS = re.compile(r"[^A-Za-z0-9._:-]+")


def suggest(usage: Usage, config: Config) -> tuple[dict[str, Any], Counter[str]]:
    """The suggested policy file's content (version 1, default deny), and the exchanges left out
    because this config cannot name what they used (an upstream it does not define), by upstream."""
    rules: list[dict[str, Any]] = []
    left_out: Counter[str] = Counter()
    for agent in usage.agents.values():
        rules.extend(_agent_rules(agent, config, {r["id"] for r in rules}, left_out))
    return {"version": 1, "default": "deny", "rules": rules}, left_out


def to_yaml(policy: dict[str, Any], left_out: Counter[str], *, usage: Usage) -> str:
    header = (f"# least-privilege policy suggested by `sidecar report` from {usage.events} event(s)"
              f" ({usage.first_ts or '-'} .. {usage.last_ts or '-'}): it allows exactly what was used.\n")
    header += "".join(f"# left out: {n} exchange(s) with upstream {name!r}, which this config does not define\n"
                      for name, n in sorted(left_out.items()))
    return header + yaml.safe_dump(policy, sort_keys=False, allow_unicode=True, width=120)


def _agent_rules(agent: AgentUsage, config: Config, taken: set[str], left_out: Counter[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    ids = _ids(_ID_CHARS.sub("-", agent.name or agent.id.rsplit("/", 1)[-1]).strip("-._:") or "agent", taken)
    for key, grant in sorted(agent.grants.items(), key=lambda kv: _order(kv[0])):
        if key.upstream is not None and key.upstream not in config.outbound.upstreams:
            left_out[key.upstream] += grant.count
            continue
        for methods, paths in _method_groups(grant):
            rule = _rule(next(ids), agent.id, key, grant, config)
            rule["description"] = f"used {sum(grant.methods[m] for m in methods)} time(s)"
            rule["methods"] = methods
            if paths:
                rule["paths"] = paths
            out.append(_ordered(rule))
    return out


def _ids(base: str, taken: set[str]) -> Iterator[str]:
    """``least-<agent name>-1``, ``-2``...; numbers another agent of the same name took are skipped."""
    for n in itertools.count(1):
        if (rule_id := f"least-{base}-{n}") not in taken:
            yield rule_id


def _order(key: GrantKey) -> tuple[str, ...]:
    return tuple("" if v is None else str(v) for v in key)


def _method_groups(grant: Grant) -> list[tuple[list[str], list[str]]]:
    """Methods that used the same path patterns share one rule."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for method, trie in grant.paths.items():
        groups.setdefault(tuple(trie.patterns()), []).append(method)
    return [(sorted(methods), list(paths)) for paths, methods in sorted(groups.items(), key=lambda kv: kv[1])]


def _rule(rule_id: str, agent_id: str, key: GrantKey, grant: Grant, config: Config) -> dict[str, Any]:
    rule: dict[str, Any] = {"id": rule_id, "direction": key.direction,
                            "effect": "require_approval" if key.approval else "allow", "agents": [agent_id]}
    if key.upstream is not None:
        rule["upstream"] = key.upstream
    if key.caller is not None:
        rule["callers"] = [key.caller]
    if key.mcp and config.outbound.upstreams[key.upstream or ""].protocol == "mcp" and (mcp := _mcp(grant)):
        rule["mcp"] = mcp
    if (when := _delegation(grant.delegations)) is not None:
        rule["when"] = {"delegation": when}
    rule.update(_credential(key, grant, config))
    return rule


_ORDER = ("id", "description", "direction", "effect", "agents", "callers", "upstream", "methods", "paths", "mcp",
          "when", "credential", "scopes")


def _ordered(rule: dict[str, Any]) -> dict[str, Any]:
    return {k: rule[k] for k in _ORDER if k in rule}


def _mcp(grant: Grant) -> dict[str, list[str]]:
    tools = ["**"] if OTHER in grant.tools else sorted(grant.tools)
    others = [m for m in grant.mcp_methods if m != "tools/call" and not (tools and is_lifecycle(m))]
    methods = ["**"] if OTHER in grant.mcp_methods else sorted(others)
    asked = ["**"] if OTHER in grant.server_requests else sorted(grant.server_requests)
    return {k: v for k, v in (("tools", tools), ("methods", methods), ("server_requests", asked)) if v}


def _delegation(delegations: Counter[str]) -> str | None:
    if not delegations or set(delegations) - {"delegated", "impersonated"}:
        return None
    return "impersonation_allowed" if delegations["impersonated"] else "required"


def _credential(key: GrantKey, grant: Grant, config: Config) -> dict[str, Any]:
    """``credential`` (and ``scopes``) when the upstream's default would not give what was used."""
    name = key.credential
    if name is None or key.upstream is None or name not in config.credentials:
        return {}
    upstream = config.outbound.upstreams.get(key.upstream)
    default = upstream.credential if upstream is not None else None
    configured = tuple(config.credentials[name].spec.scopes or ())
    scopes = next(iter(grant.scopes)) if len(grant.scopes) == 1 else ()
    narrower = bool(scopes) and set(scopes) < set(configured)
    if name == default and not narrower:
        return {}
    return {"credential": name, **({"scopes": list(scopes)} if narrower else {})}


# -- proof --------------------------------------------------------------------------------


@dataclass
class Proof:
    """Every logged exchange re-decided under the suggested policy."""

    used: int = 0  # exchanges that used a permission
    redecided: int = 0
    kept: int = 0  # used exchanges whose effect is unchanged: must be all of them
    changed: int = 0  # used exchanges the suggestion would decide otherwise: must be 0
    widened: int = 0  # refused exchanges the suggestion would allow
    not_redecided: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def holds(self) -> bool:
        """Every used exchange was re-decided, and kept its effect."""
        return self.kept == self.used

    def note(self, kind: str, text: str) -> None:
        shown = self.examples.setdefault(kind, [])
        if len(shown) < EXAMPLES:
            shown.append(text)

    def as_dict(self) -> dict[str, Any]:
        return {"holds": self.holds, "used": self.used, "redecided": self.redecided, "kept": self.kept, "changed": self.changed,
                "widened": self.widened, "not_redecided": dict(self.not_redecided), "examples": self.examples}


def prove(events: Iterable[dict[str, Any]], config: Config, policy: PolicySet) -> Proof:
    from sidecar.explain import decide, router_for
    from sidecar.replay import BadEvent, Candidate, NotRecorded, UndeclaredLevel, described

    proof, candidate = Proof(), Candidate(config, policy, router_for(config))
    for event in events:
        before = policy_effect(event)
        if before is None:
            continue
        proof.used += used(event)
        try:
            verdict = decide(described(event, candidate), config, policy, candidate.router)
        except BadEvent as exc:
            proof.not_redecided[str(exc)] += 1
            continue
        except UndeclaredLevel as exc:
            proof.not_redecided[f"trust level {exc.args[0]!r} is not in this config's agent.trust_levels"] += 1
            continue
        except NotRecorded as exc:
            proof.not_redecided[f"undecidable: the policy reads {exc.what}, which the event did not record"] += 1
            continue
        if verdict.refusal is not None:
            proof.not_redecided[f"refused before policy by this config ({verdict.refusal.reason})"] += 1
            continue
        proof.redecided += 1
        _judge(proof, event, before, verdict.effect, verdict.rule_id)
    return proof


def _judge(proof: Proof, event: dict[str, Any], before: str, after: str, rule_id: str | None) -> None:
    target = event["target"]
    example = (f"{event['agent'].get('name') or event['agent']['id']} {target['method']} "
               f"{target.get('upstream') or '(inbound)'}{target.get('path') or ''} ({event.get('decision_id')})")
    if used(event):
        if after == before:
            proof.kept += 1
        else:
            proof.changed += 1
            proof.note("changed", f"{example}: {before} -> {after} ({rule_id})")
    elif after == "allow":
        proof.widened += 1
        proof.note("widened", f"{example}: {event.get('reason')} -> allowed by {rule_id}")
