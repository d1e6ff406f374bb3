"""The policy engine: matchers, how matching rules combine, conditions, audit, rate limits, hours."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.exchange import AgentInfo
from sidecar.policy.engine import Decision, PolicySet, load_policy
from sidecar.policy.facts import Facts
from sidecar.policy.ratelimit import RateLimiter

UTC = timezone.utc
UPSTREAMS = {"billing-api": "http", "crm-api": "http", "tools-mcp": "mcp"}
CREDENTIALS = {"billing-oauth": ("invoices.read", "invoices.write"), "on-behalf-of-user": ("crm.read",)}
AGENT = "spiffe://example.org/ns/agents/sa/billing-1"
TUESDAY_NOON_NY = datetime(2026, 3, 10, 16, 0, tzinfo=UTC)  # 12:00 EDT


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def load(tmp_path: Path, rules: list[dict[str, Any]], *, default: str = "deny", mode: str = "enforce",
         file_mode: str | None = None, limiter: RateLimiter | None = None, clock: Any = None) -> PolicySet:
    doc: dict[str, Any] = {"version": 1, "default": default, "rules": rules}
    if file_mode:
        doc["mode"] = file_mode
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_policy([path], upstreams=UPSTREAMS, credentials=CREDENTIALS, mode=mode, limiter=limiter, clock=clock)


def rule(rule_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": rule_id, "direction": "outbound", "effect": "allow", **fields}


def facts(agent_id: str = AGENT, **overrides: Any) -> Facts:
    base: dict[str, Any] = dict(
        direction="outbound", method="GET", scheme="https", host="billing.internal", path="/v1/invoices/7",
        query="", headers={}, size=0, upstream="billing-api", agent=AgentInfo(agent_id, "billing-agent", "production"),
        now=TUESDAY_NOON_NY)
    base.update(overrides)
    return Facts(**base)


def decide(tmp_path: Path, rules: list[dict[str, Any]], **overrides: Any) -> Decision:
    return load(tmp_path, rules).decide(facts(**overrides))


# -- matchers -----------------------------------------------------------------------------


@pytest.mark.parametrize("methods, method, allowed", [
    (["PUT", "PATCH"], "PATCH", True),   # a listed verb
    (["PUT", "PATCH"], "GET", False),    # an unlisted verb
    (None, "DELETE", True),              # no methods: any verb
])
def test_methods(tmp_path: Path, methods: list[str] | None, method: str, allowed: bool) -> None:
    """A rule with methods matches only those verbs."""
    fields = {"methods": methods} if methods else {}
    assert (decide(tmp_path, [rule("r", **fields)], method=method).effect == "allow") is allowed


@pytest.mark.parametrize("pattern, path, allowed", [
    ("/v1/invoices/*", "/v1/invoices/7", True),        # * is one segment
    ("/v1/invoices/*", "/v1/invoices/", False),        # a whole-segment * needs a non-empty segment
    ("/v1/invoices/*", "/v1/invoices/7/lines", False),  # * never crosses a /
    ("/v1/inv*", "/v1/invoices", True),                # * inside a segment
    ("/tasks/**", "/tasks", True),                     # ** matches zero segments
    ("/tasks/**", "/tasks/", True),                    # ... an empty one
    ("/tasks/**", "/tasks/a/b/c", True),               # ... or many
    ("/tasks/**", "/tasksx", False),                   # ** is whole segments, not a prefix
    ("/a/**/b", "/a/b", True),                         # ** in the middle, zero segments
    ("/a/**/b", "/a/x/y/b", True),                     # ** in the middle, two segments
    ("/a/**/b", "/a/xb", False),                       # ... not part of a segment
    ("/**", "/", True),                                # everything
    ("/health", "/health", True),                      # a literal path
    ("/health", "/health/", False),                    # a literal is exact
    ("/v1/invoices/*", "/V1/invoices/7", False),       # matching is case-sensitive
    ("/v1/a.b", "/v1/aXb", False),                     # regex characters are literal
])
def test_paths(tmp_path: Path, pattern: str, path: str, allowed: bool) -> None:
    """Path patterns: * one segment, ** any number of whole segments, case-sensitive."""
    assert (decide(tmp_path, [rule("r", paths=[pattern])], path=path).effect == "allow") is allowed


@pytest.mark.parametrize("effect, values, matched", [
    ("allow", ("US",), True),          # the one value is listed
    ("allow", ("US", "US"), True),     # every repeated value is listed
    ("allow", ("US", "EU"), False),    # allow: one unlisted value spoils the match
    ("allow", None, False),            # allow: an absent header does not match
    ("deny", ("EU", "US"), True),      # deny: any listed value matches
    ("deny", ("EU",), False),          # deny: no listed value
    ("deny", None, False),             # deny: an absent header does not match either
])
def test_headers(tmp_path: Path, effect: str, values: tuple[str, ...] | None, matched: bool) -> None:
    """Header conditions: allow needs every value of a repeated header listed, deny any."""
    rules = [rule("r", effect=effect, headers={"X-Region": ["US"]}), rule("fallback")]
    headers = {"x-region": values} if values else {}
    decision = decide(tmp_path, rules, headers=headers)
    assert (decision.rule_id == "r") is matched


@pytest.mark.parametrize("effect, values, matched", [
    ("deny", ("US, EU",), True),             # one field, two values (RFC 9110 §5.3)
    ("deny", ("US,EU",), True),              # ... without whitespace
    ("deny", ('"EU"',), True),               # a quoted-string element is its content
    ("deny", ('"US, EU"',), False),          # a comma inside a quoted string does not split
    ("deny", ("US", " , EU"), True),         # empty elements are dropped
    ("deny", ("EURO",), False),              # elements are compared whole
    ("require_approval", ("US, EU",), True),  # approval rules match like deny rules
    ("allow", ("US, EU",), False),           # allow stays strict: the field as sent must be listed
    ("allow", ("EU, EU",), False),           # ... even when each element is listed
])
def test_deny_header_values_match_every_list_element(tmp_path: Path, effect: str, values: tuple[str, ...],
                                                     matched: bool) -> None:
    """Deny and approval header conditions split list fields on commas outside quoted strings; allow
    conditions do not (issue 11 item 11)."""
    rules = [rule("r", effect=effect, headers={"X-Region": ["EU"]}), rule("fallback")]
    decision = decide(tmp_path, rules, headers={"x-region": values})
    assert (decision.rule_id == "r") is matched


@pytest.mark.parametrize("effect, pattern, path, matched", [
    ("deny", "/v1/admin", "/v1/admin/", True),                 # a trailing slash is the same resource
    ("deny", "/v1/admin/", "/v1/admin", True),                 # ... either way round
    ("deny", "/v1/admin/*", "/v1/admin/users/", True),         # ... under a wildcard too
    ("deny", "/v1/admin", "/v1//admin", True),                 # kept // (merge_slashes: false) merged
    ("deny", "/v1/admin/users", "/v1/admin%2Fusers", True),    # kept %2F (allow_encoded_slash) decoded
    ("deny", "/v1/admin", "/v1/administrator", False),         # not a prefix match
    ("require_approval", "/v1/admin", "/v1/admin/", True),     # approval rules match like deny rules
    ("allow", "/v1/admin", "/v1/admin/", False),               # allow stays exact
])
def test_deny_paths_match_every_equivalent_spelling(tmp_path: Path, effect: str, pattern: str, path: str,
                                                    matched: bool) -> None:
    """Deny and approval path patterns match equivalent spellings of the canonical path; allow
    patterns match it as it is (issue 11 item 11)."""
    rules = [rule("r", effect=effect, paths=[pattern]), rule("fallback")]
    assert (decide(tmp_path, rules, path=path).rule_id == "r") is matched


@pytest.mark.parametrize("pattern, agent_id, matched", [
    ("spiffe://example.org/ns/agents/sa/billing-*", AGENT, True),                          # * in the last segment
    ("spiffe://example.org/ns/agents/sa/billing-*", "spiffe://example.org/ns/agents/sa/crm-1", False),
    ("spiffe://example.org/ns/agents/sa/billing-*", AGENT + "/x", False),                  # * stays in its segment
    ("spiffe://example.org/**", AGENT, True),                                              # ** below the domain
    ("spiffe://example.org/**", "spiffe://example.org.evil/ns/a", False),                  # ... not another domain
    (AGENT, AGENT, True),                                                                  # a literal ID
])
def test_agents(tmp_path: Path, pattern: str, agent_id: str, matched: bool) -> None:
    """agents patterns match agent.id like path globs."""
    assert (decide(tmp_path, [rule("r", agents=[pattern])], agent_id=agent_id).effect == "allow") is matched


@pytest.mark.parametrize("caller, matched", [
    ("spiffe://example.org/ns/orchestrator/main", True),   # one segment below the pattern's prefix
    ("spiffe://example.org/ns/orchestrator", False),       # the * segment must be there
    ("spiffe://example.org/ns/orchestrator/a/b", False),   # ... and only one
    (None, False),                                         # no caller at all
])
def test_callers(tmp_path: Path, caller: str | None, matched: bool) -> None:
    """callers patterns match the inbound caller's SPIFFE ID; rules apply only in their direction."""
    rules = [{"id": "in", "direction": "inbound", "effect": "allow", "paths": ["/tasks/**"],
              "callers": ["spiffe://example.org/ns/orchestrator/*"]}]
    decision = decide(tmp_path, rules, direction="inbound", upstream=None, path="/tasks/1", caller_id=caller)
    assert (decision.effect == "allow") is matched


def product_policy_example() -> list[dict[str, Any]]:
    """The rules of docs/PRODUCT.md's policy example, as written there."""
    text = (Path(__file__).parents[2] / "docs" / "PRODUCT.md").read_text()
    block = next(b for b in text.split("```yaml")[1:] if "orchestrator-calls-agent" in b).split("```")[0]
    return yaml.safe_load(block)["rules"]


@pytest.mark.parametrize("caller, matched", [
    ("spiffe://example.org/ns/orchestrator/sa/main", True),      # a service account of the namespace
    ("spiffe://example.org/ns/orchestrator/sa/batch", True),     # another one
    ("spiffe://example.org/ns/other/sa/main", False),            # another namespace
])
def test_the_documented_inbound_example_matches_kubernetes_workload_ids(tmp_path: Path, caller: str,
                                                                       matched: bool) -> None:
    """PRODUCT.md's inbound rule admits the Kubernetes service-account IDs it is meant for (issue 11 item 19)."""
    rules = [r for r in product_policy_example() if r["id"] == "orchestrator-calls-agent"]
    decision = decide(tmp_path, rules, direction="inbound", upstream=None, path="/tasks/1", caller_id=caller)
    assert (decision.effect == "allow") is matched


def test_direction(tmp_path: Path) -> None:
    """An inbound rule never decides an outbound request, and the other way round."""
    rules = [{"id": "in", "direction": "inbound", "effect": "allow"}]
    assert decide(tmp_path, rules).rule_id == "default"
    assert decide(tmp_path, rules, direction="inbound", upstream=None).rule_id == "in"


@pytest.mark.parametrize("host, matched", [
    ("billing.internal", True),      # a listed name
    ("api.example.com", True),       # one label below *.example.com
    ("a.b.example.com", True),       # several labels below
    ("example.com", False),          # *.example.com is not example.com itself
    ("evilexample.com", False),      # nor a name that merely ends the same
])
def test_hosts(tmp_path: Path, host: str, matched: bool) -> None:
    """hosts: listed names, or any name below a *.domain."""
    rules = [rule("r", hosts=["Billing.Internal.", "*.example.com"])]
    assert (decide(tmp_path, rules, host=host).effect == "allow") is matched


@pytest.mark.parametrize("mcp, method, tool, matched", [
    ({"tools": ["search_*"]}, "tools/call", "search_tickets", True),   # a listed tool (glob)
    ({"tools": ["search_*"]}, "tools/call", "delete_all", False),      # an unlisted tool
    ({"tools": ["search_*"]}, "initialize", None, True),               # lifecycle passes with tools
    ({"tools": ["search_*"]}, "ping", None, True),
    ({"tools": ["search_*"]}, "tools/list", None, True),
    ({"tools": ["search_*"]}, "notifications/initialized", None, True),
    ({"tools": ["search_*"]}, "resources/read", None, False),          # other methods do not
    ({"tools": ["search_*"]}, None, None, False),                      # no JSON-RPC call (a GET stream)
    ({"methods": ["resources/*"]}, "resources/read", None, True),      # a listed method
    ({"methods": ["resources/*"]}, "resources/templates/list", None, False),  # * is one segment
    ({"methods": ["resources/*"]}, "initialize", None, False),         # methods alone: no lifecycle
])
def test_mcp(tmp_path: Path, mcp: dict[str, Any], method: str | None, tool: str | None, matched: bool) -> None:
    """mcp rules match JSON-RPC methods and tools/call tools; with tools, the lifecycle too."""
    rules = [rule("r", upstream="tools-mcp", mcp=mcp)]
    decision = decide(tmp_path, rules, upstream="tools-mcp", method="POST", mcp_method=method, mcp_tool=tool)
    assert (decision.effect == "allow") is matched


def test_mcp_deny_rule_does_not_match_lifecycle(tmp_path: Path) -> None:
    """A deny rule naming a tool denies that tool only, never initialize or tools/list."""
    rules = [rule("no-delete", upstream="tools-mcp", effect="deny", mcp={"tools": ["delete_all"]}),
             rule("tools", upstream="tools-mcp", mcp={"tools": ["*"]})]
    policy = load(tmp_path, rules)
    base = dict(upstream="tools-mcp", method="POST")
    assert policy.decide(facts(**base, mcp_method="tools/list")).rule_id == "tools"
    assert policy.decide(facts(**base, mcp_method="tools/call", mcp_tool="delete_all")).rule_id == "no-delete"


@pytest.mark.parametrize("tool, allowed", [
    ("search_tickets", True),   # an allow rule lists it
    ("draft_reply", True),      # require_approval: callable after approval, so listed
    ("delete_all", False),      # denied explicitly
    ("other", False),           # no rule: default deny
])
def test_mcp_tool_allowed(tmp_path: Path, tool: str, allowed: bool) -> None:
    """tools/list filtering asks whether tools/call of each tool would be allowed or approvable."""
    rules = [rule("deny", upstream="tools-mcp", effect="deny", mcp={"tools": ["delete_all"]}),
             rule("approve", upstream="tools-mcp", effect="require_approval", mcp={"tools": ["draft_reply"]}),
             rule("read", upstream="tools-mcp", mcp={"tools": ["search_tickets"]})]
    listing = facts(upstream="tools-mcp", method="POST", mcp_method="tools/list")
    assert load(tmp_path, rules).mcp_tool_allowed(listing, tool) is allowed


def test_mcp_tool_allowed_spends_no_rate_limit(tmp_path: Path) -> None:
    """Filtering a tool list neither consumes nor is refused by rate limits."""
    limiter = RateLimiter(FakeClock())
    rules = [rule("read", upstream="tools-mcp", mcp={"tools": ["search"]},
                  rate_limit={"requests": 1, "per": "1m"})]
    policy = load(tmp_path, rules, limiter=limiter)
    call = facts(upstream="tools-mcp", method="POST", mcp_method="tools/call", mcp_tool="search")
    assert policy.mcp_tool_allowed(call, "search") and policy.mcp_tool_allowed(call, "search")
    assert policy.decide(call).effect == "allow"
    assert policy.mcp_tool_allowed(call, "search")


# -- combining rules ---------------------------------------------------------------------------


@pytest.mark.parametrize("order", [
    ["deny", "allow"],   # deny first
    ["allow", "deny"],   # deny last: still wins
])
def test_deny_wins_over_allow(tmp_path: Path, order: list[str]) -> None:
    """Any matching deny wins, wherever it stands."""
    rules = [rule(effect, effect=effect) for effect in order]
    decision = decide(tmp_path, rules)
    assert (decision.effect, decision.reason, decision.rule_id) == ("deny", "rule_denied", "deny")
    assert decision.credential is None and decision.scopes is None


def test_approval_over_allow(tmp_path: Path) -> None:
    """A matching require_approval holds the request even when an allow rule matches first."""
    rules = [rule("allow"), rule("hold", effect="require_approval", upstream="billing-api", credential="billing-oauth",
                                 scopes=["invoices.write"])]
    decision = decide(tmp_path, rules)
    assert (decision.effect, decision.reason, decision.rule_id) == ("require_approval", "approval_required", "hold")
    assert (decision.credential, decision.scopes) == ("billing-oauth", ("invoices.write",))


def test_first_allow_supplies_credential_and_scopes(tmp_path: Path) -> None:
    """The first matching allow rule in file order supplies credential, scopes and delegation."""
    rules = [rule("skipped", methods=["POST"], upstream="billing-api", credential="on-behalf-of-user"),
             rule("first", upstream="billing-api", credential="billing-oauth", scopes=["invoices.read"],
                  when={"delegation": "impersonation_allowed"}),
             rule("second", upstream="billing-api", credential="billing-oauth", scopes=["invoices.write"])]
    decision = decide(tmp_path, rules, delegation="delegated")
    assert (decision.rule_id, decision.credential, decision.scopes) == ("first", "billing-oauth", ("invoices.read",))
    assert decision.delegation == "impersonation_allowed"


@pytest.mark.parametrize("default, effect, reason", [
    ("deny", "deny", "no_matching_rule"),   # default deny
    ("allow", "allow", "allowed"),          # default allow
])
def test_default(tmp_path: Path, default: str, effect: str, reason: str) -> None:
    """No matching rule: the files' default applies with rule_id "default" and no credential."""
    decision = load(tmp_path, [rule("other", methods=["POST"])], default=default).decide(facts())
    assert (decision.effect, decision.reason, decision.rule_id) == (effect, reason, "default")
    assert decision.credential is None
    assert decision.audit is None and decision.policy_version


def test_rules_in_other_buckets_still_merge_in_file_order(tmp_path: Path) -> None:
    """Wildcard rules (no upstream, no methods) are merged with upstream rules in file order."""
    rules = [rule("wild"), rule("specific", upstream="billing-api", methods=["GET"], credential="billing-oauth")]
    policy = load(tmp_path, rules)
    assert [r.id for r in policy.rules_for("outbound", "billing-api", "GET")] == ["wild", "specific"]
    assert [r.id for r in policy.rules_for("outbound", "crm-api", "GET")] == ["wild"]
    assert (policy.decide(facts()).rule_id, policy.decide(facts()).credential) == ("wild", None)


# -- conditions --------------------------------------------------------------------------------


@pytest.mark.parametrize("expr, task", [
    ('task.trigger == "support"', None),           # field of a null task
    ('request.headers["x-missing"][0] == "a"', "t"),  # a missing map key
    ("request.size", "t"),                         # not a boolean
    ("request.size / 0 == 1", "t"),                # division by zero
])
@pytest.mark.parametrize("effect", ["allow", "deny", "require_approval"])
def test_condition_error_refuses_even_with_an_earlier_allow(tmp_path: Path, expr: str, task: str | None,
                                                            effect: str) -> None:
    """A condition that cannot be evaluated refuses with that rule's id, whatever its effect."""
    rules = [rule("allow-all"), rule("broken", effect=effect, when={"expr": expr})]
    decision = decide(tmp_path, rules, task_id=task, task_trigger="support" if task else None)
    assert (decision.effect, decision.reason, decision.rule_id) == ("deny", "condition_error", "broken")
    assert decision.detail and decision.detail.startswith("cel: ")


def test_first_refusal_in_file_order_decides(tmp_path: Path) -> None:
    """A deny before a broken condition denies; the broken condition before a deny refuses with it."""
    broken = rule("broken", when={"expr": "task.id == 'x'"})
    assert decide(tmp_path, [rule("deny", effect="deny"), broken]).reason == "rule_denied"
    assert decide(tmp_path, [broken, rule("deny", effect="deny")]).reason == "condition_error"


def test_expr_runs_only_when_the_rest_matches(tmp_path: Path) -> None:
    """A rule whose static matchers or delegation fail never evaluates its expression."""
    rules = [rule("other-path", paths=["/other"], when={"expr": "task.id == 'x'"}),
             rule("needs-human", when={"delegation": "required", "expr": "task.id == 'x'"}),
             rule("allow")]
    assert decide(tmp_path, rules).rule_id == "allow"


@pytest.mark.parametrize("expr, allowed", [
    ('task.trigger == "support" && request.size < 65536', True),   # the PRODUCT.md example
    ('task.trigger == "support" && request.size < 10', False),     # too large
    ('request.headers["x-region"] == ["US"]', True),              # headers are lists of values
    ('agent.environment == "production" && delegation == "delegated"', True),
    ('principal.sub == "alice" && principal.iss.startsWith("https://")', True),
    ("now > timestamp('2026-01-01T00:00:00Z')", True),           # now is a timestamp
    ('caller == null && mcp == null', True),                     # absent objects are null
])
def test_expr(tmp_path: Path, expr: str, allowed: bool) -> None:
    """CEL conditions see the documented variables."""
    decision = decide(tmp_path, [rule("r", when={"expr": expr})], task_id="t1", task_trigger="support", size=100,
                      headers={"x-region": ("US",)}, delegation="delegated",
                      principal=("https://login.example.com", "alice"))
    assert (decision.effect == "allow") is allowed


@pytest.mark.parametrize("when, delegation, matched", [
    ("required", "delegated", True),            # a human-backed task
    ("required", "impersonated", True),
    ("required", "asserted", False),            # a bare principal never satisfies required
    ("required", "none", False),
    ("impersonation_allowed", "delegated", True),
    ("impersonation_allowed", "asserted", False),
    ("impersonation_allowed", "none", False),
    ("forbidden", "none", True),                # no human at all
    ("forbidden", "asserted", False),
    ("forbidden", "delegated", False),
])
def test_delegation(tmp_path: Path, when: str, delegation: str, matched: bool) -> None:
    """when.delegation compares with the request's delegation."""
    decision = decide(tmp_path, [rule("r", when={"delegation": when})], delegation=delegation)
    assert (decision.effect == "allow") is matched


BUSINESS_HOURS = {"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "from": "09:00", "to": "17:00",
                  "tz": "America/New_York"}


@pytest.mark.parametrize("instant, inside", [
    (datetime(2026, 3, 7, 13, 30, tzinfo=UTC), False),   # Sat before the spring change: 08:30 EST
    (datetime(2026, 3, 7, 21, 30, tzinfo=UTC), True),    # 16:30 EST
    (datetime(2026, 3, 8, 13, 30, tzinfo=UTC), True),    # the change day: same UTC time is 09:30 EDT
    (datetime(2026, 3, 8, 13, 0, tzinfo=UTC), True),     # 09:00 EDT: from is inclusive
    (datetime(2026, 3, 8, 20, 59, tzinfo=UTC), True),    # 16:59 EDT
    (datetime(2026, 3, 8, 21, 0, tzinfo=UTC), False),    # 17:00 EDT: to is exclusive
    (datetime(2026, 10, 31, 13, 30, tzinfo=UTC), True),  # before the autumn change: 09:30 EDT
    (datetime(2026, 11, 1, 13, 30, tzinfo=UTC), False),  # the change day: same UTC time is 08:30 EST
    (datetime(2026, 11, 1, 14, 0, tzinfo=UTC), True),    # 09:00 EST
    (datetime(2026, 11, 1, 22, 0, tzinfo=UTC), False),   # 17:00 EST
])
def test_hours_across_dst(tmp_path: Path, instant: datetime, inside: bool) -> None:
    """hours is [from, to) in local time of the zone, across both DST changes (clock injected)."""
    policy = load(tmp_path, [rule("r", when={"hours": BUSINESS_HOURS})], clock=lambda: instant)
    assert (policy.decide(facts(now=None)).effect == "allow") is inside


@pytest.mark.parametrize("window, instant, inside", [
    (("01:00", "02:00"), datetime(2026, 11, 1, 5, 30, tzinfo=UTC), True),   # 01:30 EDT, the first time round
    (("01:00", "02:00"), datetime(2026, 11, 1, 6, 30, tzinfo=UTC), True),   # 01:30 EST, the repeated hour
    (("01:00", "02:00"), datetime(2026, 11, 1, 7, 0, tzinfo=UTC), False),   # 02:00 EST
    (("02:00", "03:00"), datetime(2026, 3, 8, 6, 59, tzinfo=UTC), False),   # 01:59 EST
    (("02:00", "03:00"), datetime(2026, 3, 8, 7, 0, tzinfo=UTC), False),    # 03:00 EDT: 02:xx never happens
])
def test_hours_in_the_changing_hour(tmp_path: Path, window: tuple[str, str], instant: datetime,
                                    inside: bool) -> None:
    """Wall-clock windows: a repeated hour is inside twice, a skipped hour never."""
    hours = {"from": window[0], "to": window[1], "tz": "America/New_York"}
    assert (decide(tmp_path, [rule("r", when={"hours": hours})], now=instant).effect == "allow") is inside


@pytest.mark.parametrize("instant, inside", [
    (datetime(2026, 3, 9, 13, 30, tzinfo=UTC), True),    # Monday 09:30 EDT
    (datetime(2026, 3, 8, 14, 30, tzinfo=UTC), False),   # Sunday 10:30 EDT: not a listed day
    (datetime(2026, 3, 10, 2, 30, tzinfo=UTC), True),    # Monday 22:30 EDT, already Tuesday in UTC: local day counts
    (datetime(2026, 3, 9, 3, 30, tzinfo=UTC), False),    # Sunday 23:30 EDT, already Monday in UTC
])
def test_hours_days_are_local(tmp_path: Path, instant: datetime, inside: bool) -> None:
    """hours.days is the weekday of the local date in the zone."""
    hours = {"days": ["mon"], "from": "09:00", "to": "23:00", "tz": "America/New_York"}
    policy = load(tmp_path, [rule("r", when={"hours": hours})])
    assert (policy.decide(facts(now=instant)).effect == "allow") is inside


@pytest.mark.parametrize("local, inside", [
    (datetime(2026, 3, 13, 23, 0), True),    # Friday 23:00: the window starts on a listed day
    (datetime(2026, 3, 14, 5, 59), True),    # Saturday 05:59: Friday's window still
    (datetime(2026, 3, 14, 6, 0), False),    # Saturday 06:00: to is exclusive
    (datetime(2026, 3, 13, 3, 0), False),    # Friday 03:00: that is Thursday's window
])
def test_hours_overnight(tmp_path: Path, local: datetime, inside: bool) -> None:
    """A window with from after to runs overnight and belongs to the day it starts on."""
    hours = {"days": ["fri"], "from": "22:00", "to": "06:00", "tz": "UTC"}
    decision = decide(tmp_path, [rule("r", when={"hours": hours})], now=local.replace(tzinfo=UTC))
    assert (decision.effect == "allow") is inside


def test_hours_follow_a_stepped_wall_clock_at_once(tmp_path: Path) -> None:
    """The wall clock stepped an hour forward across the window's end, then back: the same loaded policy
    decides by the time it reads on each request (no decision kept from before the step), while the rate
    limit beside it runs on the monotonic clock, which a wall-clock step neither refills nor drains."""
    wall = [datetime(2026, 3, 10, 20, 30, tzinfo=UTC)]  # Tuesday 16:30 EDT: inside 09:00-17:00
    steady = FakeClock()
    policy = load(tmp_path, [rule("r", when={"hours": BUSINESS_HOURS}, rate_limit={"requests": 3, "per": "1h"})],
                  limiter=RateLimiter(steady), clock=lambda: wall[0])
    request = facts(now=None)  # as the listeners build them: the engine reads its clock

    def step(hours: int) -> tuple[str, str]:
        wall[0] = wall[0].replace(hour=wall[0].hour + hours)
        decision = policy.decide(request)
        return decision.effect, decision.reason

    assert step(0) == ("allow", "allowed")
    assert step(+1) == ("deny", "no_matching_rule")  # 17:30 EDT: outside, on the very next request
    assert step(-1) == ("allow", "allowed")  # back to 16:30: inside again, and the second of three
    assert step(0) == ("allow", "allowed")
    assert step(-1) == ("deny", "rate_limited")  # 15:30: inside, but the hour back gave back no tokens
    steady.now += 1200  # twenty minutes of the monotonic clock refill one
    assert step(0) == ("allow", "allowed")


# -- audit -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shadow, audit", [
    (rule("shadow", effect="deny", mode="audit"),
     {"decision": "deny", "rule_id": "shadow", "reason": "rule_denied"}),              # a shadow deny
    (rule("shadow", mode="audit", when={"expr": "task.id == 'x'"}),
     {"decision": "deny", "rule_id": "shadow", "reason": "condition_error"}),          # its own condition error
    (rule("shadow", effect="require_approval", mode="audit"),
     {"decision": "approval_required", "rule_id": "shadow", "reason": "approval_required"}),
    (rule("shadow", effect="deny", mode="audit", methods=["POST"]), None),             # no shadow rule matched
])
def test_shadow_rules(tmp_path: Path, shadow: dict[str, Any], audit: dict[str, str] | None) -> None:
    """A mode: audit rule records its would-be outcome in audit and never changes the enforced one."""
    decision = decide(tmp_path, [shadow, rule("allow", upstream="billing-api", credential="billing-oauth")])
    assert (decision.effect, decision.rule_id, decision.credential) == ("allow", "allow", "billing-oauth")
    assert decision.audit == audit


def test_audit_file_makes_every_rule_a_shadow(tmp_path: Path) -> None:
    """mode: audit on a file makes its rules shadows: the default decides, audit tells."""
    decision = load(tmp_path, [rule("would-allow")], file_mode="audit").decide(facts())
    assert (decision.effect, decision.rule_id) == ("deny", "default")
    assert decision.audit == {"decision": "allow", "rule_id": "would-allow", "reason": "allowed"}


@pytest.mark.parametrize("rules, audit", [
    ([rule("deny", effect="deny")], {"decision": "deny", "rule_id": "deny", "reason": "rule_denied"}),
    ([], {"decision": "deny", "rule_id": "default", "reason": "no_matching_rule"}),
    ([rule("hold", effect="require_approval")],
     {"decision": "approval_required", "rule_id": "hold", "reason": "approval_required"}),
    ([rule("broken", when={"expr": "task.id == 'x'"})],
     {"decision": "deny", "rule_id": "broken", "reason": "condition_error"}),
    ([rule("allow", upstream="billing-api", credential="billing-oauth")],
     {"decision": "allow", "rule_id": "allow", "reason": "allowed"}),
])
def test_global_audit_mode(tmp_path: Path, rules: list[dict[str, Any]], audit: dict[str, str]) -> None:
    """policy.mode audit: nothing is blocked or held, the upstream's default credential is used."""
    decision = load(tmp_path, rules, mode="audit").decide(facts())
    assert (decision.effect, decision.reason, decision.credential, decision.scopes) == ("allow", "allowed", None, None)
    assert decision.audit == audit


# -- rate limits -------------------------------------------------------------------------------


def test_rate_limit_refuses_with_retry_after(tmp_path: Path) -> None:
    """Past its limit an allow rule refuses with rate_limited and the seconds until a token is back."""
    clock = FakeClock()
    policy = load(tmp_path, [rule("r", rate_limit={"requests": 2, "per": "1m"})], limiter=RateLimiter(clock))
    assert [policy.decide(facts()).effect for _ in range(2)] == ["allow", "allow"]
    refused = policy.decide(facts())
    assert (refused.effect, refused.reason, refused.rule_id, refused.retry_after) == ("deny", "rate_limited", "r", 30)
    clock.now += 29
    assert policy.decide(facts()).retry_after == 1
    clock.now += 1
    assert policy.decide(facts()).effect == "allow"


def test_rate_limit_per_task(tmp_path: Path) -> None:
    """key: task gives each task its own bucket; requests without a task share one per agent."""
    clock = FakeClock()
    policy = load(tmp_path, [rule("r", rate_limit={"requests": 1, "per": "1m", "key": "task"})],
                  limiter=RateLimiter(clock))
    outcomes = [policy.decide(facts(task_id=t)).reason for t in ("t1", "t2", "t1", None, None)]
    assert outcomes == ["allowed", "allowed", "rate_limited", "allowed", "rate_limited"]


def test_rate_limit_per_agent(tmp_path: Path) -> None:
    """The default key is the agent: tasks share its bucket, other agents have their own."""
    policy = load(tmp_path, [rule("r", rate_limit={"requests": 1, "per": "1h"})], limiter=RateLimiter(FakeClock()))
    outcomes = [policy.decide(facts(task_id="t1", agent_id=a)).reason for a in (AGENT, AGENT, AGENT + "x")]
    assert outcomes == ["allowed", "rate_limited", "allowed"]


def test_rate_limit_survives_reload(tmp_path: Path) -> None:
    """A limiter handed to the reloaded policy keeps its buckets."""
    limiter = RateLimiter(FakeClock())
    rules = [rule("r", rate_limit={"requests": 1, "per": "1m"})]
    assert load(tmp_path, rules, limiter=limiter).decide(facts()).effect == "allow"
    assert load(tmp_path, rules, limiter=limiter).decide(facts()).reason == "rate_limited"


def test_rate_limit_of_every_matching_allow_rule(tmp_path: Path) -> None:
    """A broad limited rule caps requests that a narrower rule above it allows first."""
    rules = [rule("narrow", upstream="billing-api", paths=["/v1/invoices/*"], credential="billing-oauth"),
             rule("broad", rate_limit={"requests": 1, "per": "1m"})]
    policy = load(tmp_path, rules, limiter=RateLimiter(FakeClock()))
    assert policy.decide(facts()).rule_id == "narrow"
    refused = policy.decide(facts())
    assert (refused.reason, refused.rule_id, refused.credential) == ("rate_limited", "broad", None)


def test_denied_requests_spend_no_tokens(tmp_path: Path) -> None:
    """Only requests that would be allowed are charged."""
    rules = [rule("deny", effect="deny", methods=["DELETE"]), rule("r", rate_limit={"requests": 1, "per": "1m"})]
    policy = load(tmp_path, rules, limiter=RateLimiter(FakeClock()))
    assert policy.decide(facts(method="DELETE")).reason == "rule_denied"
    assert policy.decide(facts()).reason == "allowed"


def test_full_buckets_are_forgotten(tmp_path: Path) -> None:
    """Buckets that have refilled completely are swept, so per-task keys do not accumulate."""
    clock = FakeClock()
    limiter = RateLimiter(clock)
    policy = load(tmp_path, [rule("r", rate_limit={"requests": 2, "per": "1m", "key": "task"})], limiter=limiter)
    for task in ("t1", "t2"):
        policy.decide(facts(task_id=task))
    clock.now += 29
    limiter.sweep()
    assert len(limiter) == 2
    clock.now += 1  # one token was spent: 30 s refill it
    limiter.sweep()
    assert len(limiter) == 0


# -- other readings of one request (a passed method override) ---------------------------------


@pytest.mark.parametrize("rules, reason, rule_id", [
    # the overriding method is denied: the request is refused
    ([rule("posts", methods=["POST"]), rule("no-deletes", effect="deny", methods=["DELETE"])],
     "rule_denied", "no-deletes"),
    # the overriding method matches no rule: default deny
    ([rule("posts", methods=["POST"])], "no_matching_rule", "default"),
    # the overriding method needs approval: held
    ([rule("posts", methods=["POST"]), rule("deletes", effect="require_approval", methods=["DELETE"])],
     "approval_required", "deletes"),
    # both allowed: the request line's rule supplies credential and scopes
    ([rule("posts", methods=["POST"], upstream="billing-api", credential="billing-oauth"), rule("deletes", methods=["DELETE"])],
     "allowed", "posts"),
])
def test_every_reading_of_a_request_must_be_allowed(tmp_path: Path, rules: list[dict[str, Any]], reason: str,
                                                    rule_id: str) -> None:
    """A request that an upstream may read as another method is decided on both; the strictest
    outcome wins (issue 11 item 9)."""
    request = facts(method="POST")
    decision = load(tmp_path, rules).decide(request, facts(method="DELETE"))
    assert (decision.reason, decision.rule_id) == (reason, rule_id)


def test_every_reading_is_charged_its_rate_limit(tmp_path: Path) -> None:
    """The overriding method's rate limit is charged too: an override cannot evade it (issue 11 item 9)."""
    rules = [rule("posts", methods=["POST"]), rule("deletes", methods=["DELETE"],
                                                    rate_limit={"requests": 1, "per": "1m"})]
    policy = load(tmp_path, rules, limiter=RateLimiter(FakeClock()))
    assert policy.decide(facts(method="POST"), facts(method="DELETE")).reason == "allowed"
    refused = policy.decide(facts(method="POST"), facts(method="DELETE"))
    assert (refused.reason, refused.rule_id) == ("rate_limited", "deletes")


# -- version -----------------------------------------------------------------------------------


def test_policy_version(tmp_path: Path) -> None:
    """The version is stable across identical reloads and comments, and changes with content."""
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nrules: [{id: a, direction: outbound, effect: allow}]\n")
    first = load_policy([path], upstreams=UPSTREAMS, credentials=CREDENTIALS).version
    path.write_text("# a comment\nversion: 1\nrules:\n  - {effect: allow, id: a, direction: outbound}\n")
    assert load_policy([path], upstreams=UPSTREAMS, credentials=CREDENTIALS).version == first
    path.write_text("version: 1\nrules: [{id: a, direction: outbound, effect: deny}]\n")
    assert load_policy([path], upstreams=UPSTREAMS, credentials=CREDENTIALS).version != first


def test_example_policy(tmp_path: Path) -> None:
    """The shipped example validates and allows its first rule's request in business hours."""
    example = Path(__file__).parents[2] / "config" / "policy.example.yaml"
    policy = load_policy([example], upstreams=UPSTREAMS, credentials=CREDENTIALS)
    request = facts(method="PUT", headers={"x-region": ("US",)}, size=100, delegation="delegated",
                    task_id="t1", task_trigger="support")
    decision = policy.decide(request)
    assert (decision.rule_id, decision.credential, decision.scopes) == (
        "billing-update-invoices", "billing-oauth", ("invoices.write",))


# -- equivalent spellings, as properties (issue 11 item 11) ------------------------------------

DENIED_PATH = ("v1", "admin", "users")


def _escaped(char: str, upper: bool) -> str:
    return f"%{ord(char):02X}" if upper else f"%{ord(char):02x}"


@st.composite
def spellings_of_denied_path(draw: st.DrawFn) -> str:
    """/v1/admin/users as a client may spell it: escapes in either case, //, ./ and x/../, a trailing /."""
    out = ""
    for segment in DENIED_PATH:
        out += draw(st.sampled_from(["/", "//", "/./", "/x/../"]))
        out += "".join(_escaped(c, draw(st.booleans())) if draw(st.booleans()) else c for c in segment)
    return out + draw(st.sampled_from(["", "/", "//", "/."]))


def test_every_spelling_of_a_denied_path_is_denied(tmp_path: Path) -> None:
    """Whatever spelling reaches the canonicalizer, a deny on /v1/admin/users refuses it."""
    from sidecar.http.target import canonical_path

    policy = load(tmp_path, [rule("all"), rule("no-users", effect="deny", paths=["/" + "/".join(DENIED_PATH)])])

    @settings(max_examples=300, database=None, deadline=None)
    @given(spellings_of_denied_path())
    def check(raw: str) -> None:
        assert policy.decide(facts(path=canonical_path(raw))).rule_id == "no-users", raw

    check()


TOKEN = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ-0123456789", min_size=1, max_size=6)


def test_a_denied_value_is_found_in_any_list(tmp_path: Path) -> None:
    """However a denied value is placed among others (one field or many, any whitespace, empty
    elements), a deny on it matches, before an allow rule that lists it."""
    policy = load(tmp_path, [rule("no-eu", effect="deny", headers={"x-region": ["EU"]}),
                             rule("only-eu", headers={"x-region": ["EU"]})])

    @settings(max_examples=300, database=None, deadline=None)
    @given(st.lists(TOKEN, max_size=4), st.lists(TOKEN, max_size=4), st.sampled_from([",", ", ", " ,", ",,", ", ,"]),
           st.booleans())
    def check(before: list[str], after: list[str], comma: str, split: bool) -> None:
        elements = [*before, "EU", *after]
        fields = tuple(elements) if split else (comma.join(elements),)
        decision = policy.decide(facts(headers={"x-region": fields}))
        assert decision.rule_id == "no-eu", fields

    check()
