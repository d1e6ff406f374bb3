"""Policy rules: read from YAML, checked and compiled at load into matchers.

One :class:`Rule` per ``rules[i]`` entry. Everything a request is compared with is compiled
here, once: glob patterns become regexes or sets, ``hours`` a zone and minute window, ``expr`` a
CEL program. Per request, the engine runs :attr:`Rule.checks`, a tuple of precompiled checks (the
static part: agents, callers, hosts, paths, headers, mcp), and :meth:`Rule.holds` the ``when`` part.

Glob patterns (``paths``, ``agents``, ``callers``, ``mcp``): ``*`` matches within one
``/``-separated segment (a whole-segment ``*`` needs a non-empty segment), ``**`` as a whole
segment matches any number of segments, including none: ``/tasks/**`` matches ``/tasks``,
``/tasks/`` and ``/tasks/a/b``. Matching is case-sensitive. ``hosts`` are lowercased names,
optionally ``*.example.com`` (any name below ``example.com``, not the name itself).

Deny and require_approval rules match every equivalent spelling: their ``paths`` also match the
path with its trailing slash toggled, ``//`` merged and a kept ``%2F`` decoded
(:func:`~sidecar.http.target.equivalent_paths`), their ``headers`` every element of a
comma-separated field (:func:`~sidecar.http.target.header_elements`). Allow rules stay strict.
"""

from __future__ import annotations

import re
from operator import attrgetter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sidecar.fields import Fields
from sidecar.http.target import equivalent_paths, header_elements
from sidecar.policy.cel import CelCompileError, Condition, compile_condition
from sidecar.policy.facts import Facts
from sidecar.policy.mcp import TRANSPORT_METHODS, is_lifecycle

EFFECTS = ("allow", "deny", "require_approval")
DIRECTIONS = ("outbound", "inbound")
DELEGATIONS = ("required", "forbidden", "impersonation_allowed")
# which Facts.delegation values satisfy when.delegation
SATISFIES = {
    "required": frozenset({"delegated", "impersonated"}),
    "impersonation_allowed": frozenset({"delegated", "impersonated"}),
    "forbidden": frozenset({"none"}),
}
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_RULE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
_METHOD = re.compile(r"^[A-Z]+$")
_TIME = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$|^24:00$")
_DOUBLE_STAR = re.compile(r"(?:^|/)\*\*(?:/|$)")
_DOUBLE_STAR_REGEX = {(True, True): "(?:/|/.*/)", (True, False): "(?:/.*)?", (False, True): "(?:.*/)?",
                      (False, False): ".*"}

Check = Callable[["Facts"], bool]


@dataclass(frozen=True, slots=True)
class RateLimit:
    requests: int
    per: float  # seconds
    key: str  # agent | task


@dataclass(frozen=True, slots=True)
class Hours:
    """``[start, end)`` minutes of the local day in ``zone``, on ``days`` (0 = Monday)."""

    days: frozenset[int]
    start: int
    end: int
    zone: ZoneInfo

    def contains(self, now: datetime) -> bool:
        local = now.astimezone(self.zone)
        minute = local.hour * 60 + local.minute
        if self.start < self.end:
            return local.weekday() in self.days and self.start <= minute < self.end
        # an overnight window (22:00-06:00) belongs to the day it starts on
        if minute >= self.start:
            return local.weekday() in self.days
        return minute < self.end and (local.weekday() - 1) % 7 in self.days


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
    checks: tuple[Check, ...]
    delegation: str | None
    hours: Hours | None
    condition: Condition | None
    credential: str | None
    scopes: tuple[str, ...] | None
    rate_limit: RateLimit | None
    description: str = ""
    conditional: bool = field(init=False, default=False)  # has a when: the engine skips holds() otherwise

    def __post_init__(self) -> None:
        has_when = self.delegation is not None or self.hours is not None or self.condition is not None
        object.__setattr__(self, "conditional", has_when)

    def holds(self, facts: Facts, now: datetime) -> bool:
        """The ``when`` part, in order; raises ConditionFailed when ``expr`` cannot be evaluated."""
        if self.delegation is not None and facts.delegation not in SATISFIES[self.delegation]:
            return False
        if self.hours is not None and not self.hours.contains(now):
            return False
        return self.condition is None or self.condition.evaluate(facts, now)


@dataclass(frozen=True, slots=True)
class LoadContext:
    """What a rule may refer to, and the file it is read from."""

    upstreams: Mapping[str, str]  # name -> protocol
    credentials: Mapping[str, tuple[str, ...]]  # name -> configured scopes
    file_audit: bool


# -- glob patterns ------------------------------------------------------------------


def glob_regex(pattern: str) -> str:
    """``*`` within one segment, ``**`` as whole segments; raises ValueError for a stray ``**``."""
    out, pos = [], 0
    for m in _DOUBLE_STAR.finditer(pattern):
        out.append(_segments_regex(pattern[pos:m.start()]))
        token = m.group()
        out.append(_DOUBLE_STAR_REGEX[(token.startswith("/"), token.endswith("/"))])
        pos = m.end()
    out.append(_segments_regex(pattern[pos:]))
    return "".join(out)


def _segments_regex(text: str) -> str:
    parts = []
    for segment in text.split("/"):
        if "**" in segment:
            raise ValueError(f"'**' must be a whole segment, got {segment!r}")
        if segment == "*":
            parts.append("[^/]+")
        else:
            parts.append("[^/]*".join(re.escape(piece) for piece in segment.split("*")))
    return "/".join(parts)


def _compile(patterns: tuple[str, ...]) -> tuple[frozenset[str], tuple[str, ...], Callable[[str], Any] | None]:
    """Exact names (set lookup), the literal prefixes of the others (a cheap pre-check), one regex."""
    exact = frozenset(p for p in patterns if "*" not in p)
    wild = [p for p in patterns if "*" in p]
    if not wild:
        return exact, (), None
    regex = re.compile("|".join(f"(?:{glob_regex(w)})" for w in wild))
    # up to the first *, without the / that a ** may swallow (/tasks/** matches /tasks)
    return exact, tuple(w[:w.index("*")].rstrip("/") for w in wild), regex.fullmatch


def compile_globs(patterns: tuple[str, ...]) -> Callable[[str | None], bool]:
    """One matcher for a list of patterns."""
    exact, prefixes, fullmatch = _compile(patterns)
    if fullmatch is None:
        return lambda value: value in exact
    return lambda value: value in exact or (
        value is not None and value.startswith(prefixes) and fullmatch(value) is not None)


def glob_check(patterns: tuple[str, ...], attribute: str) -> Check:
    """The same matcher applied to one attribute of the facts (one call level less per request)."""
    exact, prefixes, fullmatch = _compile(patterns)
    get = attrgetter(attribute)
    if fullmatch is None:
        return lambda facts: get(facts) in exact

    def check(facts: Facts) -> bool:
        value = get(facts)
        return value in exact or (value is not None and value.startswith(prefixes) and fullmatch(value) is not None)

    return check


def _patterns(f: Fields, key: str, *, must_start: str = "") -> tuple[str, ...]:
    """A list of glob patterns, checked; empty when absent or invalid."""
    patterns = f.str_list(key)
    for i, pattern in enumerate(patterns):
        try:
            glob_regex(pattern)
        except ValueError as exc:
            f.error(f"{key}[{i}]", str(exc))
            return ()
        if must_start and not pattern.startswith(must_start):
            f.error(f"{key}[{i}]", f"must start with {must_start!r}, got {pattern!r}")
    return patterns


# -- rule fields --------------------------------------------------------------------


def parse_rule(f: Fields, order: int, ctx: LoadContext) -> Rule | None:
    """Read one ``rules[i]`` mapping; problems go into ``f.errors`` and the rule is then None."""
    before = len(f.errors)
    rule_id = f.str("id", required=True)
    if rule_id is not None and (not _RULE_ID.match(rule_id) or rule_id == "default"):
        f.error("id", "must be letters, digits and . _ : - (and not 'default')")
    direction = f.choice("direction", DIRECTIONS, required=True)
    effect = f.choice("effect", EFFECTS, required=True)
    mode = f.choice("mode", ("enforce", "audit"), "enforce")
    upstream = _upstream(f, direction, ctx)
    methods = _methods(f)
    checks = _checks(f, direction, effect, upstream, ctx)
    delegation, hours, condition = _when(f.sub("when"))
    credential, scopes = _credential(f, direction, effect, upstream, ctx)
    rate_limit = _rate_limit(f, effect)
    description = f.str("description", "")
    f.done()
    if len(f.errors) > before:
        return None
    return Rule(rule_id, order, f.path, direction, effect, ctx.file_audit or mode == "audit", upstream, methods,
                checks, delegation, hours, condition, credential, scopes, rate_limit, description)


def _upstream(f: Fields, direction: str | None, ctx: LoadContext) -> str | None:
    name = f.str("upstream")
    if name is None:
        return None
    if direction == "inbound":
        f.error("upstream", "applies only to outbound rules")
    elif name not in ctx.upstreams:
        known = ", ".join(sorted(ctx.upstreams)) or "none configured"
        f.error("upstream", f"unknown upstream {name!r}; configured: {known}")
    return name


def _methods(f: Fields) -> frozenset[str]:
    methods = f.str_list("methods")
    for i, method in enumerate(methods):
        if not _METHOD.match(method):
            f.error(f"methods[{i}]", f"must be an uppercase HTTP method such as GET, got {method!r}")
    return frozenset(methods)


def _checks(f: Fields, direction: str | None, effect: str | None, upstream: str | None,
            ctx: LoadContext) -> tuple[Check, ...]:
    """The static matchers, cheapest first."""
    checks: list[Check] = []
    hosts = _hosts(f)
    if hosts is not None:
        checks.append(hosts)
    if agents := _patterns(f, "agents"):
        checks.append(glob_check(agents, "agent.id"))
    if callers := _patterns(f, "callers"):
        if direction == "outbound":
            f.error("callers", "applies only to inbound rules")
        checks.append(glob_check(callers, "caller_id"))
    if paths := _patterns(f, "paths", must_start="/"):
        checks.append(glob_check(paths, "path") if effect == "allow" else _any_spelling(paths))
    checks.extend(c for c in (_headers(f, effect), _mcp(f, direction, effect, upstream, ctx)) if c is not None)
    return tuple(checks)


def _any_spelling(patterns: tuple[str, ...]) -> Check:
    """Deny and approval paths: the canonical path or any equivalent spelling of it matches."""
    match = compile_globs(patterns)

    def check(facts: Facts) -> bool:
        return match(facts.path) or any(match(p) for p in equivalent_paths(facts.path))

    return check


def _hosts(f: Fields) -> Check | None:
    hosts = tuple(h.lower().rstrip(".") for h in f.str_list("hosts"))
    for i, host in enumerate(hosts):
        if "*" in host[2:] or (host.startswith("*") and not host.startswith("*.")):
            f.error(f"hosts[{i}]", f"must be a host name or *.domain, got {host!r}")
    if not hosts:
        return None
    exact = frozenset(h for h in hosts if not h.startswith("*."))
    suffixes = tuple(h[1:] for h in hosts if h.startswith("*."))
    if not suffixes:
        return lambda facts: facts.host in exact
    return lambda facts: facts.host in exact or facts.host.endswith(suffixes)


def _headers(f: Fields, effect: str | None) -> Check | None:
    """Allow: every value of the header must be listed, as sent. Deny, require_approval: any value,
    or any element of a comma-separated list (``X-Region: US, EU`` is the two values US and EU)."""
    wanted: dict[str, frozenset[str]] = {}
    for name, values in f.mapping("headers").items():
        where = f"headers.{name}"
        if "_" in name or not name:
            f.error(where, "header names with '_' never reach policy (such requests are refused)")
        elif not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            f.error(where, "must be a non-empty list of header values")
        else:
            wanted[name.lower()] = frozenset(values)
    if not wanted:
        return None
    every = effect == "allow"
    items = tuple(wanted.items())

    def check(facts: Facts) -> bool:
        for name, listed in items:
            values = facts.headers.get(name)
            if not values:
                return False
            if every:
                if not listed.issuperset(values):
                    return False
            elif listed.isdisjoint(values) and listed.isdisjoint(header_elements(values)):
                return False
        return True

    return check


def _mcp(f: Fields, direction: str | None, effect: str | None, upstream: str | None,
         ctx: LoadContext) -> Check | None:
    """``mcp.methods`` and ``mcp.tools`` (tools/call); allow rules with tools also pass the lifecycle, and
    every allow rule the transport's GET stream and session DELETE."""
    if not f.has("mcp"):
        return None
    sub = f.sub("mcp")
    tool_patterns, method_patterns = _patterns(sub, "tools"), _patterns(sub, "methods")
    tools = compile_globs(tool_patterns) if tool_patterns else None
    methods = compile_globs(method_patterns) if method_patterns else None
    sub.done()
    if not tool_patterns and not method_patterns:
        sub.error("", "must list tools, methods or both")
    if direction == "inbound" or upstream is None:
        f.error("mcp", "needs an outbound rule with an upstream of protocol mcp")
    elif ctx.upstreams.get(upstream) not in (None, "mcp"):
        f.error("mcp", f"upstream {upstream!r} has protocol {ctx.upstreams[upstream]}; mcp rules need protocol mcp")
    lifecycle = effect == "allow" and bool(tool_patterns)
    transport = effect == "allow"  # the streamable-HTTP transport's GET stream and session DELETE

    def check(facts: Facts) -> bool:
        method = facts.mcp_method
        if method is None:
            return False
        if methods is not None and methods(method):
            return True
        if tools is not None and method == "tools/call" and tools(facts.mcp_tool):
            return True
        return lifecycle and is_lifecycle(method) or transport and method in TRANSPORT_METHODS

    return check


def _when(f: Fields) -> tuple[str | None, Hours | None, Condition | None]:
    delegation = f.choice("delegation", DELEGATIONS)
    hours = _hours(f.sub("hours")) if f.has("hours") else None
    condition = None
    source = f.str("expr")
    if source is not None:
        try:
            condition = compile_condition(source)
        except CelCompileError as exc:
            f.error("expr", str(exc))
    f.done()
    return delegation, hours, condition


def _hours(f: Fields) -> Hours | None:
    days = f.str_list("days", DAYS)
    for i, day in enumerate(days):
        if day not in DAYS:
            f.error(f"days[{i}]", f"must be one of {', '.join(DAYS)}, got {day!r}")
    start, end = _minutes(f, "from"), _minutes(f, "to")
    zone = _zone(f)
    f.done()
    if start == 1440:
        f.error("from", 'must be "00:00" to "23:59"')
    if start is not None and start == end:
        f.error("to", "must differ from from (the window is [from, to))")
    if start is None or end is None or zone is None or start in (end, 1440):
        return None
    return Hours(frozenset(DAYS.index(d) for d in days if d in DAYS), start, end % 1440 or 1440, zone)


def _minutes(f: Fields, key: str) -> int | None:
    raw = f.raw_value(key)
    if raw is None:
        f.error(key, 'is required: a local time such as "09:00"')
        return None
    if not isinstance(raw, str) or not _TIME.match(raw):
        hint = " (quote it: YAML reads an unquoted 09:00 as a number)" if isinstance(raw, int) else ""
        f.error(key, f'must be a time "HH:MM" from "00:00" to "24:00"{hint}')
        return None
    return int(raw[:2]) * 60 + int(raw[3:])


def _zone(f: Fields) -> ZoneInfo | None:
    name = f.str("tz", "UTC")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        f.error("tz", f"unknown IANA time zone {name!r} (for example America/New_York)")
        return None


def _credential(f: Fields, direction: str | None, effect: str | None, upstream: str | None,
                ctx: LoadContext) -> tuple[str | None, tuple[str, ...] | None]:
    name = f.str("credential")
    scopes = f.str_list("scopes") or None
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


def _rate_limit(f: Fields, effect: str | None) -> RateLimit | None:
    if not f.has("rate_limit"):
        return None
    sub = f.sub("rate_limit")
    requests = sub.int("requests", minimum=1, required=True)
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
