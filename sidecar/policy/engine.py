"""The policy engine: load and index policy files, and decide one request -> :class:`Decision`.

Only rules of the request's direction apply; they are indexed at load by (direction, upstream,
method), rules without an upstream or methods merged into every bucket in file order, so a
decision looks at the few rules that could match. Within the bucket, in file order:

- a matching ``deny`` refuses (``rule_denied``), and a condition that cannot be evaluated
  refuses (``condition_error``) whatever its rule's effect: the first of these in file order
  decides, even when another rule would allow;
- else a matching ``require_approval`` holds the request (reason ``approval_required``; the
  pipeline turns it into ``approved``, ``approval_denied`` or ``approval_timeout``);
- else a matching ``allow`` permits: the first in file order supplies credential, scopes and
  delegation; the rate limit of every matching allow rule is charged (one exhausted bucket
  refuses with ``rate_limited`` and ``retry_after``);
- else ``default`` applies, with ``rule_id: "default"``.

A rule matches when its static matchers accept the request and its ``when`` holds (delegation,
then hours, then expr: an expression is evaluated only for rules that otherwise match). Shadow
rules (``mode: audit`` on the rule or its file; a rule cannot opt back out of an audit file) are
decided the same way, separately: their outcome goes into ``audit`` (None when no shadow rule
matched) and never changes the enforced one. With ``mode="audit"`` every decision allows with
``rule_id: "default"`` and the upstream's default credential, and ``audit`` carries the would-be
enforced outcome (shadow rules are not consulted then).

Choices where PRODUCT.md is silent: the first matching rule of the deciding effect supplies
credential, scopes and delegation (so an approved request uses its approval rule's credential);
``rate_limit`` keyed by task falls back to one bucket per agent for requests without a task
(stricter than per task, never unlimited); a naive ``Facts.now`` is taken as UTC; files without
``default`` mean ``deny`` and must then agree with the others.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from sidecar.errors import ConfigError, ConfigInvalid
from sidecar.fields import Fields
from sidecar.policy.conditions import LoadContext
from sidecar.policy.facts import ConditionFailed, Facts, McpDetail
from sidecar.policy.model import DIRECTIONS, Budget, Rule, parse_rule
from sidecar.policy.ratelimit import Limit, RateLimiter

Index = dict[str, dict[str | None, dict[str | None, tuple[Rule, ...]]]]
EVENT_DECISION = {"allow": "allow", "deny": "deny", "require_approval": "approval_required"}


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one policy decision, as the pipeline and the trust-decision event need it."""

    effect: str  # "allow" | "deny" | "require_approval"
    reason: str  # allowed | no_matching_rule | rule_denied | condition_error | rate_limited | approval_required
    rule_id: str  # "default" when no rule matched
    credential: str | None  # None: use the upstream's default credential
    scopes: tuple[str, ...] | None
    delegation: str | None  # the deciding rule's when.delegation
    audit: Mapping[str, str] | None  # {"decision", "rule_id", "reason"} of shadow rules
    retry_after: int | None  # seconds, with rate_limited
    policy_version: str
    detail: str | None = None  # for reason_detail (what a condition failed on); never a request value
    budget: Budget | None = None  # the allowing rule's LLM token budget (counted by the pipeline)


class _Outcome(NamedTuple):
    effect: str
    reason: str
    rule: Rule | None
    detail: str | None = None
    retry_after: int | None = None

    def audit(self) -> dict[str, str]:
        rule_id = self.rule.id if self.rule else "default"
        return {"decision": EVENT_DECISION[self.effect], "rule_id": rule_id, "reason": self.reason}


class PolicySet:
    """A loaded, indexed set of rules; :meth:`decide` is the per-request entry point."""

    __slots__ = ("rules", "default", "version", "mode", "files", "credential_upstreams", "headers_read", "_limiter",
                 "_clock",
                 "_enforced", "_shadow", "_default", "_decisions", "_needs_clock")
    _shadow: Index | None

    def __init__(self, rules: Sequence[Rule], *, default: str, version: str, mode: str, files: Sequence[Path],
                 limiter: RateLimiter, clock: Callable[[], datetime]) -> None:
        self.rules = tuple(rules)
        self.default, self.version, self.mode, self.files = default, version, mode, tuple(files)
        self._limiter, self._clock = limiter, clock
        # (credential, upstream) of every rule that names a credential: what the rules configure
        self.credential_upstreams = frozenset((r.credential, r.upstream) for r in self.rules if r.credential)
        # the header names rules read by name: what events record for replay
        self.headers_read = frozenset(n for r in self.rules for n in r.headers_read or ())
        self._enforced = build_index([r for r in self.rules if not r.shadow])
        shadows = [r for r in self.rules if r.shadow]
        self._shadow = build_index(shadows) if shadows else None
        reason = "allowed" if default == "allow" else "no_matching_rule"
        self._default = _Outcome(default, reason, None)
        self._decisions: dict[_Outcome, Decision] = {}  # bounded: at most three outcomes per rule, plus default
        self._needs_clock = any(r.conditional for r in self.rules)  # only conditions and hours read the time

    def decide(self, facts: Facts, *others: Facts) -> Decision:
        """The decision on ``facts``; ``others`` are other readings of the same request (a passed
        method override): every reading must be allowed, and the strictest outcome decides."""
        now = self._now(facts) if self._needs_clock else _NO_CLOCK
        enforced = self._enforce(self._enforced, (facts, *others), now, self._default) or self._default
        if self.mode == "audit":
            return Decision("allow", "allowed", "default", None, None, None, enforced.audit(), None, self.version)
        shadow = self._enforce(self._shadow, (facts,), now, None) if self._shadow is not None else None
        return self._decision(enforced, shadow.audit() if shadow else None)

    def mcp_tool_allowed(self, facts: Facts, tool: str) -> bool:
        """Would ``tools/call`` of ``tool`` be allowed or approvable (rate limits aside)?"""
        return self.mcp_allowed(facts, "tools/call", tool)

    def mcp_allowed(self, facts: Facts, method: str, name: str) -> bool:
        """Would ``method`` (tools/call, resources/read, prompts/get) of the listed ``name`` be allowed or
        approvable (rate limits aside)? What a list response keeps."""
        if self.mode == "audit":
            return True
        if method == "tools/call":
            call = replace(facts, mcp_method=method, mcp_tool=name, mcp=None)
        else:
            detail = McpDetail(resource=name) if method == "resources/read" else McpDetail(prompt=name)
            call = replace(facts, mcp_method=method, mcp_tool=None, mcp=detail)
        outcome = self._evaluate(self._enforced, call, self._now(call)) or self._default
        return outcome.effect in ("allow", "require_approval")

    def weigh(self, facts: Facts) -> Decision:
        """The decision on ``facts`` with no rate limit charged and no shadow rules: what the sidecar decides
        on a server's request to the agent, which is answered at once (never held for approval)."""
        if self.mode == "audit":
            return self.decide(facts)
        outcome = self._evaluate(self._enforced, facts, self._now(facts)) or self._default
        return self._decision(outcome, None)

    def rules_for(self, direction: str, upstream: str | None, method: str, *, shadow: bool = False) -> tuple[Rule, ...]:
        """The rules, in file order, a request with these keys is evaluated against."""
        index = self._shadow if shadow else self._enforced
        return _bucket(index, direction, upstream, method) if index is not None else ()

    def _now(self, facts: Facts) -> datetime:
        now = facts.now or self._clock()
        return now if now.tzinfo is not None else now.replace(tzinfo=timezone.utc)

    def _match(self, index: Index, facts: Facts, now: datetime) -> tuple[_Outcome | None, list[Rule]]:
        """A deny, condition error or approval that decides, else None; and the matching allow rules."""
        approval: Rule | None = None
        allows: list[Rule] = []
        for rule in _bucket(index, facts.direction, facts.upstream, facts.method):
            try:
                for check in rule.checks:  # the compiled conditions; this loop is the per-request cost
                    if not check(facts, now):
                        break
                else:
                    if rule.effect == "deny":
                        return _Outcome("deny", "rule_denied", rule), allows
                    if rule.effect == "allow":
                        allows.append(rule)
                    elif approval is None:
                        approval = rule
            except ConditionFailed as exc:  # a when.expr that cannot be evaluated: after the rest matched
                return _Outcome("deny", "condition_error", rule, str(exc)), allows
        if approval is not None:
            return _Outcome("require_approval", "approval_required", approval), allows
        return None, allows

    def _evaluate(self, index: Index, facts: Facts, now: datetime) -> _Outcome | None:
        """The outcome of the rules alone, rate limits not charged; None when no rule matched."""
        outcome, allows = self._match(index, facts, now)
        if outcome is None and allows:
            return _Outcome("allow", "allowed", allows[0])
        return outcome

    def _enforce(self, index: Index, readings: tuple[Facts, ...], now: datetime,
                 default: _Outcome | None) -> _Outcome | None:
        """Deny if any reading is denied, else hold if any needs approval, else charge the rate limits
        of every allowing rule once; the first reading's allow supplies credential and scopes.
        A reading no rule matches takes ``default`` (None: the whole outcome is None)."""
        held: _Outcome | None = None
        allowed: _Outcome | None = None
        limited: dict[tuple[str, str, str], Rule] = {}
        for facts in readings:
            outcome, allows = self._match(index, facts, now)
            if outcome is None:
                outcome = _Outcome("allow", "allowed", allows[0]) if allows else default
                if outcome is None:
                    return None
                limited.update((_limit_key(r, facts), r) for r in allows if r.rate_limit is not None)
            if outcome.effect == "deny":
                return outcome
            if outcome.effect == "require_approval":
                held = held or outcome
            allowed = allowed or outcome
        return held or self._charge(limited) or allowed

    def _charge(self, limited: dict[tuple[str, str, str], Rule]) -> _Outcome | None:
        """Take one token from each rate-limit bucket; the outcome of the first exhausted one, if any."""
        if not limited:
            return None
        hit = self._limiter.take(Limit(k, r.rate_limit.requests, r.rate_limit.per)  # type: ignore[union-attr]
                                 for k, r in limited.items())
        if hit is None:
            return None
        key: Any = hit[0].key  # one of limited's keys, handed back as the limiter's Hashable
        return _Outcome("deny", "rate_limited", limited[key], retry_after=hit[1])

    def _decision(self, outcome: _Outcome, audit: Mapping[str, str] | None) -> Decision:
        """Decisions without audit, detail or retry_after are built once per outcome and reused."""
        plain = audit is None and outcome.detail is None and outcome.retry_after is None
        if plain and (cached := self._decisions.get(outcome)) is not None:
            return cached
        rule = outcome.rule
        if rule is None:
            decision = Decision(outcome.effect, outcome.reason, "default", None, None, None, audit, None, self.version)
        else:
            grants = outcome.effect != "deny"
            decision = Decision(outcome.effect, outcome.reason, rule.id, rule.credential if grants else None,
                                rule.scopes if grants else None, rule.delegation, audit, outcome.retry_after,
                                self.version, outcome.detail, rule.budget if grants else None)
        if plain:
            self._decisions[outcome] = decision
        return decision


def _limit_key(rule: Rule, facts: Facts) -> tuple[str, str, str]:
    """Per agent, or per task; requests without a task share one bucket per agent."""
    if rule.rate_limit is not None and rule.rate_limit.key == "task":
        return (rule.id, "task", facts.task_id) if facts.task_id else (rule.id, "no-task", facts.agent.id)
    return rule.id, "agent", facts.agent.id


def _bucket(index: Index, direction: str, upstream: str | None, method: str) -> tuple[Rule, ...]:
    by_upstream = index.get(direction)
    if by_upstream is None:
        return ()
    by_method = by_upstream.get(upstream) or by_upstream[None]
    rules = by_method.get(method)
    return by_method[None] if rules is None else rules


def build_index(rules: Sequence[Rule]) -> Index:
    """direction -> upstream (None: any other) -> method (None: any other) -> rules in file order."""
    index: Index = {}
    for direction in DIRECTIONS:
        groups: dict[str | None, list[Rule]] = {None: []}
        for rule in rules:
            if rule.direction == direction:
                groups.setdefault(rule.upstream, []).append(rule)
        wildcard = groups[None]
        index[direction] = {up: _by_method(list(heapq.merge(own, wildcard, key=lambda r: r.order)) if up else own)
                            for up, own in groups.items()}
    return index


def _by_method(rules: list[Rule]) -> dict[str | None, tuple[Rule, ...]]:
    methods = {m for rule in rules for m in rule.methods}
    table: dict[str | None, tuple[Rule, ...]] = {None: tuple(r for r in rules if not r.methods)}
    for method in methods:
        table[method] = tuple(r for r in rules if not r.methods or method in r.methods)
    return table


# -- loading ----------------------------------------------------------------------------


class _FileFields(Fields):
    """The root of one policy file: paths read ``config/policy.yaml: default``."""

    def at(self, key: str) -> str:
        return f"{self.path}: {key}"


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses duplicate keys (a second ``effect:`` would silently win)."""


def _strict_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


_UNREADABLE: Any = object()
_NO_CLOCK = datetime.min.replace(tzinfo=timezone.utc)  # passed when no rule reads the time


@dataclass(frozen=True, slots=True)
class _File:
    path: str
    default: str | None
    rules: tuple[Rule, ...]
    content: Any
    first_ids: tuple[tuple[str, str], ...]  # (id, where) of every rule entry, valid or not


def load_policy(files: Sequence[Path], *, upstreams: Mapping[str, str], credentials: Mapping[str, tuple[str, ...]],
                mode: str = "enforce", limiter: RateLimiter | None = None,
                clock: Callable[[], datetime] | None = None, inbound_protocol: str | None = None) -> PolicySet:
    """Read, check and compile every file; raises ConfigInvalid with every problem found."""
    if mode not in ("enforce", "audit"):
        raise ValueError(f"policy: mode must be enforce or audit, got {mode!r}")
    errors: list[ConfigError] = []
    loaded: list[_File] = []
    for path in files:
        loaded.append(_load_file(Path(path), upstreams, credentials, len(loaded) * 1_000_000, errors,
                                 inbound_protocol))
    _check_across(loaded, errors)
    if errors:
        raise ConfigInvalid(errors)
    default = next((f.default for f in loaded if f.default), "deny")
    return PolicySet([r for f in loaded for r in f.rules], default=default, version=policy_version(loaded),
                     mode=mode, files=[Path(f) for f in files],
                     limiter=limiter if limiter is not None else RateLimiter(),  # an empty limiter is falsy
                     clock=clock or (lambda: datetime.now(timezone.utc)))


def _load_file(path: Path, upstreams: Mapping[str, str], credentials: Mapping[str, tuple[str, ...]],
               first_order: int, errors: list[ConfigError], inbound_protocol: str | None = None) -> _File:
    name = str(path)
    content = _read_yaml(path, errors)
    if not isinstance(content, dict):
        if content is not _UNREADABLE:
            errors.append(ConfigError(name, "must be a mapping with version, default, mode and rules"))
        return _File(name, None, (), None, ())
    f = _FileFields(content, name, errors)
    version = f.integer("version", required=True, minimum=1)
    if version is not None and version != 1:
        f.error("version", f"must be 1 (the only policy format), got {version}")
    default = f.choice("default", ("deny", "allow"), "deny")
    ctx = LoadContext(upstreams, credentials, f.choice("mode", ("enforce", "audit"), "enforce") == "audit",
                      inbound_protocol)
    raw_rules = f.raw_value("rules") or []
    f.done()
    if not isinstance(raw_rules, list):
        f.error("rules", "must be a list of rules")
        raw_rules = []
    rules, ids = [], []
    for i, raw in enumerate(raw_rules):
        rule_id = raw_rule_id(raw)
        where = f"{name}: rules[{i}]" + (f" ({rule_id})" if rule_id else "")
        if not isinstance(raw, Mapping):
            errors.append(ConfigError(where, "must be a mapping (a rule with id, direction and effect)"))
            continue
        rule = parse_rule(Fields(raw, where, errors, path.parent), first_order + i, ctx)
        rules.append(rule)
        if rule_id:
            ids.append((rule_id, where))
    return _File(name, default, tuple(r for r in rules if r is not None), content, tuple(ids))


def raw_rule_id(raw: Any) -> str | None:
    """The id of a raw rule mapping, for error paths (``rules[2] (billing-update-invoices)``)."""
    rule_id = raw.get("id") if isinstance(raw, Mapping) else None
    return rule_id if isinstance(rule_id, str) else None


def _read_yaml(path: Path, errors: list[ConfigError]) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        errors.append(ConfigError(str(path), f"cannot read policy file: {getattr(exc, 'strerror', None) or exc}"))
        return _UNREADABLE
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as bad:  # its own name: compiled (mypyc), one name holds one type in a function
        mark = getattr(bad, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(bad, "problem", None) or "malformed"
        errors.append(ConfigError(str(path), f"not valid YAML{where}: {problem}"))
        return _UNREADABLE


def _check_across(loaded: list[_File], errors: list[ConfigError]) -> None:
    """Rule ids are unique across files; every file says the same default."""
    first: dict[str, str] = {}
    for f in loaded:
        for rule_id, where in f.first_ids:
            if rule_id in first:
                message = f"duplicate rule id {rule_id!r}, first used at {first[rule_id]}"
                errors.append(ConfigError(f"{where}.id", message))
            else:
                first[rule_id] = where
    read = [f for f in loaded if f.default is not None]
    for f in read[1:]:
        if f.default != read[0].default:
            errors.append(ConfigError(f"{f.path}: default", f"files disagree on default: {read[0].path} says "
                                      f"{read[0].default}, this file says {f.default} (an absent default is deny)"))


def policy_version(loaded: Sequence[_File]) -> str:
    """A short sha256 over the files' parsed content in load order: stable across identical reloads."""
    normalized = json.dumps([f.content for f in loaded], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(normalized.encode()).hexdigest()[:16]
