"""What each agent did, folded from trust-decision events one at a time.

Memory grows with what is distinct (agents, upstreams, generalized path patterns, tools, reasons,
rules), never with the number of events: counters are keyed by bounded things, free-form names
(tools, callers, triggers) are capped at :data:`DISTINCT_CAP` per agent with the rest counted as
:data:`OTHER`, paths fold into :class:`~sidecar.report.paths.PathTrie` patterns, and the timeline
doubles its bucket width instead of adding buckets past :data:`MAX_BUCKETS`.

An exchange *used* a permission when policy allowed it (``rule_id`` set and the logged reason read
back as an allow, :func:`sidecar.replay.logged_effect`): a rate-limited call or one whose upstream
failed still used its rule. An approved one used it through an approval (:attr:`GrantKey.approval`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NamedTuple

from sidecar.policy.mcp import SERVER_REQUEST_METHOD
from sidecar.replay import logged_effect
from sidecar.report.paths import PathTrie

DISTINCT_CAP = 1024
OTHER = "(other)"
MAX_BUCKETS = 240
DECISIONS = ("allow", "deny", "approval_required")


def policy_effect(event: dict[str, Any]) -> str | None:
    """The policy effect behind a logged event (``replay``'s reading), None when policy did not decide."""
    if event.get("rule_id") is None or event.get("target") is None:
        return None
    return logged_effect(event)


def used(event: dict[str, Any]) -> bool:
    """Did this exchange use a permission (allowed, or approved and sent)?"""
    effect = policy_effect(event)
    return effect == "allow" or (effect == "require_approval" and event.get("reason") == "approved")


def bump(counter: Counter[str], key: str, n: int = 1) -> None:
    """Count ``key``, or :data:`OTHER` once the counter holds :data:`DISTINCT_CAP` names."""
    if key in counter or len(counter) < DISTINCT_CAP:
        counter[key] += n
    else:
        counter[OTHER] += n


class GrantKey(NamedTuple):
    """The shape of one suggested rule: who, where, with which credential, allowed or approved."""

    direction: str
    upstream: str | None
    caller: str | None
    credential: str | None  # the provider the exchange used
    approval: bool
    mcp: bool  # an MCP message (mcp_method set) rather than plain HTTP on the upstream


@dataclass
class Grant:
    """What was used under one :class:`GrantKey`: per method, the paths; MCP methods and tools."""

    count: int = 0
    paths: dict[str, PathTrie] = field(default_factory=dict)
    methods: Counter[str] = field(default_factory=Counter)  # readings per method
    mcp_methods: Counter[str] = field(default_factory=Counter)
    tools: Counter[str] = field(default_factory=Counter)
    server_requests: Counter[str] = field(default_factory=Counter)  # what the MCP server asked the agent
    delegations: Counter[str] = field(default_factory=Counter)
    scopes: set[tuple[str, ...]] = field(default_factory=set)

    def add(self, event: dict[str, Any]) -> None:
        target = event["target"]
        self.count += 1
        for method, path in _readings(target):
            trie = self.paths.setdefault(method, PathTrie())
            self.methods[method] += 1
            if path is not None:
                trie.add(path)
        if target.get("mcp_method") == SERVER_REQUEST_METHOD:  # the server asked the agent: not the agent's method
            bump(self.server_requests, target.get("mcp_server_request") or OTHER)
        elif target.get("mcp_method"):
            bump(self.mcp_methods, target["mcp_method"])
            if target["mcp_method"] == "tools/call" and target.get("mcp_tool"):
                bump(self.tools, target["mcp_tool"])
        self.delegations[event.get("delegation") or "none"] += 1
        credential = event.get("credential")
        if credential is not None and len(self.scopes) < 8:
            self.scopes.add(tuple(credential.get("scopes") or ()))


def _readings(target: dict[str, Any]) -> list[tuple[str, str | None]]:
    """Every (method, path) policy decided for the exchange: the request line, an override's
    combinations (``Reading.alternatives``) and an S3 copy's source, read with GET."""
    method, path = target["method"], target.get("path")
    pairs = [(method, path)]
    override = target.get("override")
    if override:
        methods = dict.fromkeys((method, override.get("method") or method))
        paths = dict.fromkeys((path, override.get("path") or path))
        pairs = [(m, p) for m in methods for p in paths]
    if target.get("copy_source"):
        pairs.append(("GET", target["copy_source"]))
    return pairs


@dataclass
class AgentUsage:
    """One agent's exchanges: decisions, what it used, how, and what was refused."""

    id: str
    name: str
    environment: str
    meta: dict[str, Any]
    events: int = 0
    decisions: Counter[str] = field(default_factory=Counter)
    grants: dict[GrantKey, Grant] = field(default_factory=dict)
    credentials: Counter[tuple[str, str, bool]] = field(default_factory=Counter)  # (type, provider, standing)
    denials: Counter[tuple[str, str]] = field(default_factory=Counter)  # (reason, rule_id or "-")
    actors: Counter[str] = field(default_factory=Counter)
    delegations: Counter[str] = field(default_factory=Counter)
    with_task: int = 0
    triggers: Counter[str] = field(default_factory=Counter)
    rules: Counter[str] = field(default_factory=Counter)  # deciding rule -> exchanges

    def add(self, event: dict[str, Any]) -> None:
        self.events += 1
        self.decisions[event.get("decision") or "deny"] += 1
        self.actors[event.get("actor_type") or "unstated"] += 1
        self.delegations[event.get("delegation") or "none"] += 1
        self._task(event.get("task"))
        if event.get("rule_id"):
            bump(self.rules, event["rule_id"])
        if event.get("decision") != "allow":
            self.denials[(event.get("reason") or "unknown", event.get("rule_id") or "-")] += 1
        credential = event.get("credential")
        if credential is not None:
            kind = (credential.get("type") or "?", credential.get("provider") or "?", bool(credential.get("standing")))
            self.credentials[kind] += 1
        if used(event):
            self._grant(event)

    def _grant(self, event: dict[str, Any]) -> None:
        key = grant_key(event)
        grant = self.grants.get(key)
        if grant is None:
            grant = self.grants[key] = Grant()
        grant.add(event)

    def _task(self, task: dict[str, Any] | None) -> None:
        if task is None:
            return
        self.with_task += 1
        bump(self.triggers, task.get("trigger") or "(none)")


def grant_key(event: dict[str, Any]) -> GrantKey:
    target, caller, credential = event["target"], event.get("caller"), event.get("credential")
    return GrantKey(event["direction"], target.get("upstream"), caller.get("id") if caller else None,
                    credential.get("provider") if credential else None, event.get("reason") == "approved",
                    bool(target.get("mcp_method")))


class Timeline:
    """Decisions per time bucket; past :data:`MAX_BUCKETS` buckets the width doubles."""

    def __init__(self) -> None:
        self.width = 1  # seconds
        self.buckets: dict[int, list[int]] = {}
        self._minute: tuple[str, int] = ("", 0)

    def add(self, ts: str | None, decision: str) -> None:
        second = self._epoch(ts)
        if second is None:
            return
        row = self.buckets.setdefault(second // self.width, [0, 0, 0])
        row[DECISIONS.index(decision) if decision in DECISIONS else 1] += 1
        if len(self.buckets) > MAX_BUCKETS:
            self._widen()

    def _epoch(self, ts: str | None) -> int | None:
        """Seconds since the epoch of an RFC 3339 UTC time; the minute is parsed once per minute."""
        if not ts or len(ts) < 19 or not ts[17:19].isdigit():
            return None
        prefix = ts[:16]
        if self._minute[0] != prefix:
            try:
                parsed = datetime.fromisoformat(prefix).replace(tzinfo=timezone.utc)
            except ValueError:
                return None
            self._minute = (prefix, int(parsed.timestamp()))
        return self._minute[1] + int(ts[17:19])

    def _widen(self) -> None:
        self.width *= 2
        merged: dict[int, list[int]] = {}
        for index, row in self.buckets.items():
            into = merged.setdefault(index // 2, [0, 0, 0])
            for i, n in enumerate(row):
                into[i] += n
        self.buckets = merged

    def rows(self) -> list[tuple[str, list[int]]]:
        """(bucket start as RFC 3339, [allow, deny, approval_required]) in time order."""
        return [(datetime.fromtimestamp(i * self.width, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), row)
                for i, row in sorted(self.buckets.items())]


@dataclass
class Usage:
    """Every agent's usage, the rules that decided anything, and the decisions over time."""

    agents: dict[str, AgentUsage] = field(default_factory=dict)
    rule_hits: Counter[str] = field(default_factory=Counter)  # enforced and shadow (audit) rule ids
    timeline: Timeline = field(default_factory=Timeline)
    events: int = 0
    first_ts: str | None = None
    last_ts: str | None = None

    def add(self, event: dict[str, Any]) -> None:
        self.events += 1
        agent = event["agent"]
        usage = self.agents.get(agent["id"])
        if usage is None:
            meta = {k: v for k, v in agent.items() if k not in ("id", "name", "environment") and v not in (None, [], {})}
            usage = self.agents[agent["id"]] = AgentUsage(agent["id"], agent.get("name") or "", agent.get("environment")
                                                          or "", meta)
        usage.add(event)
        self._rules(event)
        ts = event.get("ts")
        self.timeline.add(ts, event.get("decision") or "deny")
        if ts:
            self.first_ts = min(self.first_ts or ts, ts)
            self.last_ts = max(self.last_ts or ts, ts)

    def _rules(self, event: dict[str, Any]) -> None:
        if event.get("rule_id"):
            bump(self.rule_hits, event["rule_id"])
        audit = event.get("audit")
        if isinstance(audit, dict) and audit.get("rule_id"):
            bump(self.rule_hits, audit["rule_id"])
