"""The conditions a rule may state, as one table: config key, parser, the ``Facts`` field it reads.

:data:`CONDITIONS` lists them in the order a request is matched: the static ones, cheapest first,
then ``when`` (delegation, hours, expr: an expression is evaluated only for rules that otherwise
match, so its errors are ``condition_error`` only then). Each parser reads its key from the rule at
load and returns one compiled :data:`~sidecar.policy.globs.Check`, or None when the rule does not
state it; per request the engine only calls the compiled checks. A new condition is one parser,
one ``Facts`` field and one row. ``methods`` and ``upstream`` are not rows: they are the keys the
engine indexes rules by, matched by the bucket lookup rather than per rule.

``hosts`` are lowercased names, optionally ``*.example.com`` (any name below ``example.com``, not
the name itself). Deny and require_approval rules match every equivalent spelling: their ``paths``
also match the path with its trailing slash toggled, ``//`` merged and a kept ``%2F`` decoded
(:func:`~sidecar.http.target.equivalent_paths`), their ``headers`` every element of a
comma-separated field (:func:`~sidecar.http.target.header_elements`). Allow rules stay strict.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from yarl import URL

from sidecar.fields import Fields
from sidecar.http.target import equivalent_paths, header_elements
from sidecar.policy.facts import Facts, McpDetail
from sidecar.policy.globs import Check, compile_globs, glob_check, patterns
from sidecar.policy.a2a import METHODS, method_name
from sidecar.policy.mcp import DEFAULT_SERVER_REQUESTS, RESOURCE_METHODS, SERVER_REQUEST_METHOD, TRANSPORT_METHODS, \
    is_lifecycle

DELEGATIONS = ("required", "forbidden", "impersonation_allowed")
# which Facts.delegation values satisfy when.delegation
SATISFIES = {
    "required": frozenset({"delegated", "impersonated"}),
    "impersonation_allowed": frozenset({"delegated", "impersonated"}),
    "forbidden": frozenset({"none"}),
}
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_TIME = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$|^24:00$")


@dataclass(frozen=True, slots=True)
class LoadContext:
    """What a rule may refer to, and the file it is read from."""

    upstreams: Mapping[str, str]  # name -> protocol
    credentials: Mapping[str, tuple[str, ...]]  # name -> configured scopes
    file_audit: bool
    inbound_protocol: str | None = None  # inbound.protocol, None without an inbound listener


class RuleHead(NamedTuple):
    """What a condition's parser may consult besides its own key."""

    direction: str | None
    effect: str | None
    upstream: str | None
    ctx: LoadContext


@dataclass(frozen=True, slots=True)
class ConditionType:
    """One row of the table: where a rule states the condition, and what it decides on."""

    key: str  # "hosts", or "when.hours" for a key inside when
    reads: str  # the Facts field its check reads ("now": the decision time)
    parse: Callable[[Fields, ConditionType, RuleHead], Check | None]

    @property
    def section(self) -> str:
        return self.key.rpartition(".")[0]

    @property
    def name(self) -> str:
        return self.key.rpartition(".")[2]


@dataclass(frozen=True, slots=True)
class Hours:
    """``[start, end)`` minutes of the local day in ``zone``, on ``days`` (0 = Monday); a check itself."""

    days: frozenset[int]
    start: int
    end: int
    zone: ZoneInfo

    def __call__(self, facts: Facts, now: datetime) -> bool:
        local = now.astimezone(self.zone)
        minute = local.hour * 60 + local.minute
        if self.start < self.end:
            return local.weekday() in self.days and self.start <= minute < self.end
        # an overnight window (22:00-06:00) belongs to the day it starts on
        if minute >= self.start:
            return local.weekday() in self.days
        return minute < self.end and (local.weekday() - 1) % 7 in self.days


def compile_conditions(f: Fields, head: RuleHead,
                       table: Sequence[ConditionType] | None = None) -> tuple[tuple[Check, ...], bool]:
    """The rule's checks in table order (:data:`CONDITIONS` unless given), and whether it has a
    ``when`` (reads the time, may fail)."""
    checks: list[Check] = []
    conditional = False
    sections: dict[str, Fields] = {"": f}
    for row in CONDITIONS if table is None else table:
        if row.section not in sections:
            sections[row.section] = f.sub(row.section)
        check = row.parse(sections[row.section], row, head)
        if check is not None:
            checks.append(check)
            conditional = conditional or row.section == "when"
    for name, section in sections.items():
        if name:
            section.done()
    return tuple(checks), conditional


def _hosts(f: Fields, row: ConditionType, head: RuleHead) -> Check | None:
    match = _host_check(f, row.name)
    return None if match is None else lambda facts, now: match(facts.host)


def _host_check(f: Fields, key: str) -> Callable[[str], bool] | None:
    """Lowercased host names, or ``*.domain`` (any name below it, not the name itself)."""
    hosts = tuple(h.lower().rstrip(".") for h in f.text_list(key))
    for i, host in enumerate(hosts):
        if "*" in host[2:] or (host.startswith("*") and not host.startswith("*.")):
            f.error(f"{key}[{i}]", f"must be a host name or *.domain, got {host!r}")
    if not hosts:
        return None
    exact = frozenset(h for h in hosts if not h.startswith("*."))
    suffixes = tuple(h[1:] for h in hosts if h.startswith("*."))
    if not suffixes:
        return exact.__contains__
    return lambda host: host in exact or host.endswith(suffixes)


def _globs(f: Fields, row: ConditionType, head: RuleHead) -> Check | None:
    """A list of glob patterns over ``row.reads``."""
    found = patterns(f, row.name)
    return glob_check(found, row.reads) if found else None


def _callers(f: Fields, row: ConditionType, head: RuleHead) -> Check | None:
    check = _globs(f, row, head)
    if check is not None and head.direction == "outbound":
        f.error(row.name, "applies only to inbound rules")
    return check


def _paths(f: Fields, row: ConditionType, head: RuleHead) -> Check | None:
    found = patterns(f, row.name, must_start="/")
    if not found:
        return None
    return glob_check(found, row.reads) if head.effect == "allow" else _any_spelling(found)


def _any_spelling(found: tuple[str, ...]) -> Check:
    """Deny and approval paths: the canonical path or any equivalent spelling of it matches."""
    match = compile_globs(found)

    def check(facts: Facts, now: datetime) -> bool:
        return match(facts.path) or any(match(p) for p in equivalent_paths(facts.path))

    return check


def _headers(f: Fields, row: ConditionType, head: RuleHead) -> Check | None:
    """Allow: every value of the header must be listed, as sent. Deny, require_approval: any value,
    or any element of a comma-separated list (``X-Region: US, EU`` is the two values US and EU)."""
    wanted: dict[str, frozenset[str]] = {}
    for name, values in f.mapping(row.name).items():
        where = f"{row.name}.{name}"
        if "_" in name or not name:
            f.error(where, "header names with '_' never reach policy (such requests are refused)")
        elif not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            f.error(where, "must be a non-empty list of header values")
        else:
            wanted[name.lower()] = frozenset(values)
    if not wanted:
        return None
    every = head.effect == "allow"
    items = tuple(wanted.items())

    def check(facts: Facts, now: datetime) -> bool:
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


def headers_read(raw: Mapping[str, object]) -> frozenset[str] | None:
    """The request headers a rule reads by name (lowercase): its ``headers`` keys and the names its
    ``when.expr`` indexes; None when the expression reads ``request.headers`` otherwise. What the
    trust-decision event records of a request, so that ``sidecar replay`` can decide it again."""
    stated = raw.get("headers")
    names = {str(k).lower() for k in stated} if isinstance(stated, Mapping) else set()
    when = raw.get("when")
    expr = when.get("expr") if isinstance(when, Mapping) else None
    if isinstance(expr, str):
        from sidecar.policy.cel_syntax import CelSyntaxError, references  # only a rule with an expr loads CEL
        try:
            keys = references(expr).header_keys
        except CelSyntaxError:  # refused at load by the expr's own parser
            keys = set()
        if keys is None:
            return None
        names |= keys
    return frozenset(names)


def _mcp(f: Fields, row: ConditionType, head: RuleHead) -> Check | None:
    """``mcp.methods``, ``mcp.tools`` (tools/call), ``mcp.resources`` (URI globs: resources/read, subscribe,
    unsubscribe), ``mcp.prompts`` (prompts/get) and ``mcp.server_requests`` (what the server may ask the agent).
    An allow rule naming tools, resources or prompts also passes the lifecycle (their lists are filtered);
    every allow rule passes the transport's GET stream and session DELETE, and the server's ping, roots/list
    and elicitation/create (sampling only when listed)."""
    if not f.has(row.name):
        return None
    sub = f.sub(row.name)
    named = {key: patterns(sub, key) for key in _MCP_KEYS}
    matchers = {key: compile_globs(found) if found else None for key, found in named.items()}
    sub.done()
    if not any(named.values()):
        sub.error("", "must list tools, methods, resources, prompts or server_requests (one or more)")
    _check_protocol(f, row.name, head, "mcp")
    allow = head.effect == "allow"
    lifecycle = allow and bool(named["tools"] or named["resources"] or named["prompts"])
    return _McpCheck(matchers["methods"], matchers["tools"], matchers["resources"], matchers["prompts"],
                     matchers["server_requests"], lifecycle, allow)


_MCP_KEYS = ("tools", "methods", "resources", "prompts", "server_requests")
Matcher = Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class _McpCheck:
    """An ``mcp:`` condition, compiled; a check itself."""

    methods: Matcher | None
    tools: Matcher | None
    resources: Matcher | None
    prompts: Matcher | None
    server_requests: Matcher | None
    lifecycle: bool  # an allow rule naming what the lifecycle and its lists serve
    allow: bool  # an allow rule: the transport and the server's default requests pass

    def __call__(self, facts: Facts, now: datetime) -> bool:
        method = facts.mcp_method
        if method is None:
            return False
        if method == SERVER_REQUEST_METHOD:
            return self._server_request(facts)
        if self.methods is not None and self.methods(method):
            return True
        if method == "tools/call":
            if self.tools is not None and self.tools(facts.mcp_tool or ""):
                return True
        elif facts.mcp is not None and self._named(method, facts.mcp):
            return True
        return self.lifecycle and is_lifecycle(method) or self.allow and method in TRANSPORT_METHODS

    def _named(self, method: str, detail: McpDetail) -> bool:
        if method in RESOURCE_METHODS:
            return self.resources is not None and self.resources(detail.resource or "")
        return method == "prompts/get" and self.prompts is not None and self.prompts(detail.prompt or "")

    def _server_request(self, facts: Facts) -> bool:
        asked = facts.mcp.server_request if facts.mcp is not None else None
        if asked is None:
            return False
        if self.server_requests is not None and self.server_requests(asked):
            return True
        return self.allow and asked in DEFAULT_SERVER_REQUESTS


def _check_protocol(f: Fields, key: str, head: RuleHead, protocol: str, *others: str) -> None:
    """A protocol's rule key needs that protocol on the side it applies to: its upstream's, or
    ``inbound.protocol`` for an inbound rule (A2A only: the agent serving other agents)."""
    protocols = head.ctx.upstreams
    named = " or ".join((protocol, *others))
    if head.direction == "inbound" and protocol == "a2a":
        if head.ctx.inbound_protocol != "a2a":
            f.error(key, "an inbound rule with a2a needs inbound.protocol: a2a (the agent serving A2A), got "
                         f"{head.ctx.inbound_protocol or 'no inbound listener'}")
    elif head.direction == "inbound" or head.upstream is None:
        f.error(key, f"needs an outbound rule with an upstream of protocol {named}")
    elif protocols.get(head.upstream) not in (None, protocol, *others):
        f.error(key, f"upstream {head.upstream!r} has protocol {protocols[head.upstream]}; {key} rules need "
                     f"protocol {named}")


def _a2a(f: Fields, row: ConditionType, head: RuleHead) -> Check | None:
    """``a2a.methods`` (either spelling) and ``a2a.push_hosts``: an allow rule passes a request that
    registers a push-notification URL only when it lists that URL's host (an SSRF vector)."""
    if not f.has(row.name):
        return None
    sub = f.sub(row.name)
    methods = _a2a_methods(sub)
    hosts = _host_check(sub, "push_hosts")
    sub.done()
    if methods is None and hosts is None:
        sub.error("", "must list methods, push_hosts or both")
    _check_protocol(f, row.name, head, "a2a")
    allow = head.effect == "allow"

    def check(facts: Facts, now: datetime) -> bool:
        call = facts.a2a
        if call is None or (methods is not None and call.method not in methods):
            return False
        if call.push_url is None:
            return allow or hosts is None
        return hosts is not None and hosts(URL(call.push_url).host or "") or not allow and hosts is None

    return check


def _llm(f: Fields, row: ConditionType, head: RuleHead) -> Check | None:
    """``llm.models``: globs over the model an LLM API call names (``protocol: openai`` or ``anthropic``)."""
    if not f.has(row.name):
        return None
    sub = f.sub(row.name)
    models = patterns(sub, "models")
    sub.done()
    if not models:
        sub.error("", "must list models")
        return None
    _check_protocol(f, row.name, head, "openai", "anthropic")
    match = compile_globs(models)
    return lambda facts, now: facts.llm is not None and match(facts.llm.model)


def _grpc(f: Fields, row: ConditionType, head: RuleHead) -> Check | None:
    """``grpc.services`` and ``grpc.methods``: globs over a call's service (``package.Service``) and
    method (``protocol: grpc`` upstreams, from ``:path``); a rule listing both needs both to match."""
    if not f.has(row.name):
        return None
    sub = f.sub(row.name)
    service_patterns, method_patterns = patterns(sub, "services"), patterns(sub, "methods")
    sub.done()
    if not service_patterns and not method_patterns:
        sub.error("", "must list services, methods or both")
        return None
    _check_protocol(f, row.name, head, "grpc")
    services = compile_globs(service_patterns) if service_patterns else None
    methods = compile_globs(method_patterns) if method_patterns else None

    def check(facts: Facts, now: datetime) -> bool:
        return facts.grpc_method is not None and (services is None or services(facts.grpc_service)) and (
            methods is None or methods(facts.grpc_method))

    return check


def _a2a_methods(f: Fields) -> frozenset[str] | None:
    names = f.text_list("methods")
    for i, name in enumerate(names):
        if method_name(name) is None:
            f.error(f"methods[{i}]", f"must be an A2A method ({', '.join(METHODS)} or their previous names), "
                                     f"got {name!r}")
    return frozenset(method_name(n) or "" for n in names) if names else None


def _delegation(f: Fields, row: ConditionType, head: RuleHead) -> Check | None:
    required = f.choice(row.name, DELEGATIONS)
    if required is None:
        return None
    allowed = SATISFIES[required]
    return lambda facts, now: facts.delegation in allowed


def _expr(f: Fields, row: ConditionType, head: RuleHead) -> Check | None:
    source = f.text(row.name)
    if source is None:
        return None
    from sidecar.policy.cel import CelCompileError, compile_condition  # only a rule with an expr loads CEL
    try:
        return compile_condition(source).evaluate
    except CelCompileError as exc:
        f.error(row.name, str(exc))
        return None


def _hours(f: Fields, row: ConditionType, head: RuleHead) -> Check | None:
    if not f.has(row.name):
        return None
    sub = f.sub(row.name)
    days = sub.text_list("days", DAYS)
    for i, day in enumerate(days):
        if day not in DAYS:
            sub.error(f"days[{i}]", f"must be one of {', '.join(DAYS)}, got {day!r}")
    start, end = _minutes(sub, "from"), _minutes(sub, "to")
    zone = _zone(sub)
    sub.done()
    if start == 1440:
        sub.error("from", 'must be "00:00" to "23:59"')
    if start is not None and start == end:
        sub.error("to", "must differ from from (the window is [from, to))")
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
    name = f.text("tz", "UTC")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        f.error("tz", f"unknown IANA time zone {name!r} (for example America/New_York)")
        return None


CONDITIONS: tuple[ConditionType, ...] = (
    ConditionType("hosts", "host", _hosts),
    ConditionType("agents", "agent.id", _globs),
    ConditionType("callers", "caller_id", _callers),
    ConditionType("paths", "path", _paths),
    ConditionType("headers", "headers", _headers),
    ConditionType("mcp", "mcp_method", _mcp),  # and mcp_tool, the resource, prompt or server request it names
    ConditionType("a2a", "a2a", _a2a),  # its method and push URL
    ConditionType("llm", "llm", _llm),  # the model
    ConditionType("grpc", "grpc_method", _grpc),  # and grpc_service
    ConditionType("when.delegation", "delegation", _delegation),
    ConditionType("when.hours", "now", _hours),
    ConditionType("when.expr", "now", _expr),  # and the Facts fields the expression selects
)
