"""Policy rules: read from YAML, checked and compiled at load into matchers.

One :class:`Rule` per ``rules[i]`` entry. Everything a request is compared with is compiled
here, once, by the table of :mod:`sidecar.policy.conditions`: glob patterns become regexes or
sets (:mod:`sidecar.policy.globs`), ``hours`` a zone and minute window, ``expr`` a CEL program.
Per request, the engine runs :attr:`Rule.checks`, the tuple of compiled checks (the static part:
hosts, agents, callers, paths, headers, mcp, a2a, llm, grpc; then the ``when`` part: delegation, hours, expr).
What an allow grants (credential, scopes, rate_limit, an LLM token budget) is read here too, beside the conditions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.fields import Fields
from sidecar.policy.conditions import LoadContext, RuleHead, compile_conditions, headers_read
from sidecar.policy.globs import Check

EFFECTS = ("allow", "deny", "require_approval")
DIRECTIONS = ("outbound", "inbound")
_RULE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
_METHOD = re.compile(r"^[A-Z]+$")


@dataclass(frozen=True, slots=True)
class RateLimit:
    requests: int
    per: float  # seconds
    key: str  # agent | task


@dataclass(frozen=True, slots=True)
class Budget:
    """``budget: {tokens, per}``: LLM tokens per (rule, agent, task, principal) per window (seconds)."""

    tokens: int
    per: float


@dataclass(frozen=True, slots=True, eq=False)
class Rule:
    """One compiled rule; ``order`` is its position across all files (file order, then list order).

    Compared and hashed by identity: a compiled rule holds closures, and lookups stay cheap.
    """

    id: str
    order: int
    where: str  # "config/policy.yaml: rules[2]"
    direction: str
    effect: str
    shadow: bool
    upstream: str | None
    methods: frozenset[str]
    checks: tuple[Check, ...]  # every condition, static then when; the expr's raises ConditionFailed
    conditional: bool  # has a when: the engine reads its clock only when some rule has one
    delegation: str | None  # when.delegation, also what the decision grants
    credential: str | None
    scopes: tuple[str, ...] | None
    rate_limit: RateLimit | None
    description: str = ""
    budget: Budget | None = None
    headers_read: frozenset[str] | None = frozenset()  # the header names it reads; None: any (conditions.headers_read)


# -- rule fields --------------------------------------------------------------------


def parse_rule(f: Fields, order: int, ctx: LoadContext) -> Rule | None:
    """Read one ``rules[i]`` mapping; problems go into ``f.errors`` and the rule is then None."""
    before = len(f.errors)
    rule_id = f.text("id", required=True)
    if rule_id is not None and (not _RULE_ID.match(rule_id) or rule_id == "default"):
        f.error("id", "must be letters, digits and . _ : - (and not 'default')")
    direction = f.choice("direction", DIRECTIONS, required=True)
    effect = f.choice("effect", EFFECTS, required=True)
    mode = f.choice("mode", ("enforce", "audit"), "enforce")
    upstream = _upstream(f, direction, ctx)
    methods = _methods(f)
    checks, conditional = compile_conditions(f, RuleHead(direction, effect, upstream, ctx))
    credential, scopes = _credential(f, direction, effect, upstream, ctx)
    rate_limit = _rate_limit(f, effect)
    budget = _budget(f, effect)
    description = f.text("description", "")
    f.done()
    if len(f.errors) > before or rule_id is None or direction is None or effect is None:
        return None
    return Rule(rule_id, order, f.path, direction, effect, ctx.file_audit or mode == "audit", upstream, methods,
                checks, conditional, _delegation(f), credential, scopes, rate_limit, description, budget,
                headers_read(f.raw))


def _delegation(f: Fields) -> str | None:
    """``when.delegation`` of a rule already read without errors (the condition's row checked it)."""
    when = f.raw.get("when")
    required = when.get("delegation") if isinstance(when, Mapping) else None
    return required if isinstance(required, str) else None


def _upstream(f: Fields, direction: str | None, ctx: LoadContext) -> str | None:
    name = f.text("upstream")
    if name is None:
        return None
    if direction == "inbound":
        f.error("upstream", "applies only to outbound rules")
    elif name not in ctx.upstreams:
        known = ", ".join(sorted(ctx.upstreams)) or "none configured"
        f.error("upstream", f"unknown upstream {name!r}; configured: {known}")
    return name


def _methods(f: Fields) -> frozenset[str]:
    methods = f.text_list("methods")
    for i, method in enumerate(methods):
        if not _METHOD.match(method):
            f.error(f"methods[{i}]", f"must be an uppercase HTTP method such as GET, got {method!r}")
    return frozenset(methods)


def _credential(f: Fields, direction: str | None, effect: str | None, upstream: str | None,
                ctx: LoadContext) -> tuple[str | None, tuple[str, ...] | None]:
    name = f.text("credential")
    scopes = f.text_list("scopes") or None
    if f.has("scopes") and scopes is None:
        f.error("scopes", "must list at least one scope (omit it to use the credential's own scopes)")
    if name is None and scopes is None:
        return None, None
    if direction == "inbound" or effect == "deny":
        f.error("credential" if name else "scopes", "applies only to outbound allow and require_approval rules")
    elif name is None:
        f.error("scopes", "needs credential: scopes narrow that credential's scopes")
    elif name not in ctx.credentials:
        known = ", ".join(sorted(ctx.credentials)) or "none configured"
        f.error("credential", f"unknown credential {name!r}; configured: {known}")
    elif scopes is not None:
        extra = [s for s in scopes if s not in ctx.credentials[name]]
        if extra:
            have = ", ".join(ctx.credentials[name]) or "none"
            f.error("scopes", f"must be a subset of credential {name}'s scopes ({have}); not there: {', '.join(extra)}")
    if name is not None and upstream is None and direction == "outbound" and effect != "deny":
        f.error("credential", "needs upstream: a credential goes only to the upstream its rule names "
                              "(without one, every upstream the rule matches would receive it)")
    return name, scopes


def _budget(f: Fields, effect: str | None) -> Budget | None:
    """Counted from the usage an LLM API reports (``protocol: openai`` or ``anthropic``, sidecar.llm_usage)."""
    if not f.has("budget"):
        return None
    sub = f.sub("budget")
    tokens = sub.integer("tokens", minimum=1, required=True)
    per = sub.duration("per", required=True)
    sub.done()
    if effect != "allow":
        f.error("budget", "applies only to allow rules")
    if per is not None and per <= 0:
        sub.error("per", "must be a positive duration")
    return Budget(tokens, per) if tokens is not None and per and per > 0 else None


def _rate_limit(f: Fields, effect: str | None) -> RateLimit | None:
    if not f.has("rate_limit"):
        return None
    sub = f.sub("rate_limit")
    requests = sub.integer("requests", minimum=1, required=True)
    per = sub.duration("per", required=True)
    key = sub.choice("key", ("agent", "task"), "agent")
    sub.done()
    if effect != "allow":
        f.error("rate_limit", "applies only to allow rules")
    if per is not None and per <= 0:
        sub.error("per", "must be a positive duration")
    if requests is None or not per or per <= 0:
        return None
    return RateLimit(requests, per, key)
