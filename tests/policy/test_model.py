"""Loading policy files: every problem reported at once, each with its file and rule path."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.errors import ConfigInvalid
from sidecar.policy.engine import load_policy
from sidecar.policy.globs import glob_regex

UPSTREAMS = {"billing-api": "http", "crm-api": "http", "tools-mcp": "mcp", "greeter": "grpc"}
CREDENTIALS = {"billing-oauth": ("invoices.read", "invoices.write"), "on-behalf-of-user": ("crm.read",)}


def write(tmp_path: Path, name: str, doc: Any) -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


def problems(*paths: Path) -> list[str]:
    """Load the files and return every reported problem as text."""
    with pytest.raises(ConfigInvalid) as caught:
        load_policy(list(paths), upstreams=UPSTREAMS, credentials=CREDENTIALS)
    return [str(e) for e in caught.value.errors]


def rule(**fields: Any) -> dict[str, Any]:
    return {"id": "r", "direction": "outbound", "effect": "allow", **fields}


@pytest.mark.parametrize("entry, where, message", [
    (rule(colour="red"), "colour", "unknown key"),                                  # unknown rule key
    (rule(when={"expr": "true", "hour": 1}), "when.hour", "unknown key"),           # unknown nested key
    (rule(upstream="nope"), "upstream", "unknown upstream 'nope'"),                  # upstream must exist
    (rule(credential="nope"), "credential", "unknown credential 'nope'"),            # credential must exist
    # a credential goes only to the upstream its rule names, never to every upstream (issue 11 item 6)
    (rule(credential="billing-oauth"), "credential", "needs upstream"),
    (rule(effect="require_approval", credential="billing-oauth"), "credential", "needs upstream"),
    (rule(credential="billing-oauth", scopes=["admin"]), "scopes", "must be a subset"),  # scopes beyond the credential
    (rule(scopes=["invoices.read"]), "scopes", "needs credential"),                  # scopes narrow a named credential
    (rule(credential="billing-oauth", scopes=None), "scopes", "at least one scope"),  # scopes: null
    (rule(credential="billing-oauth", scopes=[]), "scopes", "at least one scope"),    # scopes: []
    (rule(when={"expr": "task.trigger =="}), "when.expr", "cel: cannot compile"),    # CEL syntax
    (rule(when={"expr": "user.id == 'a'"}), "when.expr", "unknown variable 'user'"),  # not a documented variable
    (rule(when={"expr": "request.sise > 1"}), "when.expr", "no field 'sise'"),       # not a field of request
    (rule(when={"expr": "lower(request.path) == 'a'"}), "when.expr", "unknown function 'lower'"),
    (rule(when={"hours": {"from": "09:00", "to": "17:00", "tz": "Mars/Olympus"}}), "when.hours.tz",
     "unknown IANA time zone"),                                                      # tz checked at load
    (rule(when={"hours": {"from": 540, "to": "17:00"}}), "when.hours.from", "quote it"),  # unquoted 09:00
    (rule(when={"hours": {"from": "09:00", "to": "09:00"}}), "when.hours.to", "must differ"),
    (rule(when={"hours": {"days": ["monday"], "from": "09:00", "to": "17:00"}}), "when.hours.days[0]",
     "must be one of mon"),
    (rule(when={"delegation": "maybe"}), "when.delegation", "must be one of required"),
    (rule(upstream="billing-api", mcp={"tools": ["a"]}), "mcp", "has protocol http"),  # mcp needs protocol mcp
    (rule(upstream="billing-api", grpc={"methods": ["Get*"]}), "grpc", "has protocol http"),  # grpc needs grpc
    (rule(grpc={"methods": ["Get*"]}), "grpc", "needs an outbound rule with an upstream"),
    (rule(upstream="greeter", grpc={}), "grpc", "must list services, methods or both"),
    (rule(upstream="greeter", grpc={"method": ["Get"]}), "grpc.method", "unknown key"),
    (rule(upstream="greeter", grpc={"methods": ["a/**/b/**/c**"]}), "grpc.methods[0]", ""),
    (rule(mcp={"tools": ["a"]}), "mcp", "needs an outbound rule with an upstream"),
    (rule(upstream="tools-mcp", mcp={}), "mcp", "must list tools, methods, resources, prompts or server_requests"),
    (rule(callers=["spiffe://example.org/*"]), "callers", "only to inbound rules"),
    (rule(direction="inbound", upstream="billing-api"), "upstream", "only to outbound rules"),
    (rule(direction="inbound", credential="billing-oauth"), "credential", "only to outbound allow"),
    (rule(effect="deny", credential="billing-oauth"), "credential", "only to outbound allow"),
    (rule(methods=["get"]), "methods[0]", "uppercase HTTP method"),
    (rule(paths=["v1/x"]), "paths[0]", "must start with '/'"),
    (rule(paths=["/v1/x**"]), "paths[0]", "'**' must be a whole segment"),
    (rule(hosts=["a.*.com"]), "hosts[0]", "host name or *.domain"),
    (rule(headers={"x_region": ["US"]}), "headers.x_region", "'_'"),
    (rule(headers={"x-region": "US"}), "headers.x-region", "non-empty list"),
    (rule(effect="deny", rate_limit={"requests": 1, "per": "1m"}), "rate_limit", "only to allow rules"),
    (rule(rate_limit={"requests": 0, "per": "1m"}), "rate_limit.requests", ">= 1"),
    (rule(rate_limit={"requests": 1, "per": "soon"}), "rate_limit.per", "duration"),
    (rule(rate_limit={"requests": 1, "per": "1m", "key": "user"}), "rate_limit.key", "agent, task"),
    (rule(effect="permit"), "effect", "must be one of allow, deny, require_approval"),
    ({"id": "r", "direction": "outbound"}, "effect", "is required"),                 # effect is required
    ({"id": "r", "effect": "allow"}, "direction", "is required"),                   # direction is required
    (rule(id="default"), "id", "not 'default'"),                                    # reserved for the default
    (rule(mode="shadow"), "mode", "must be one of enforce, audit"),
])
def test_rule_problem(tmp_path: Path, entry: dict[str, Any], where: str, message: str) -> None:
    """Each problem names the file, the rule's index and id, and the key."""
    path = write(tmp_path, "policy.yaml", {"version": 1, "rules": [rule(id="fine"), entry]})
    found = problems(path)
    rule_id = entry.get("id") if isinstance(entry.get("id"), str) else None
    prefix = f"{path}: rules[1]" + (f" ({rule_id})" if rule_id else "") + f".{where}: "
    assert any(p.startswith(prefix) and message in p for p in found), found


@pytest.mark.parametrize("doc, where, message", [
    ({"rules": []}, "version", "is required"),                        # version is required
    ({"version": 2, "rules": []}, "version", "must be 1"),            # only version 1 exists
    ({"version": 1, "default": "maybe"}, "default", "must be one of deny, allow"),
    ({"version": 1, "mode": "loud"}, "mode", "must be one of enforce, audit"),
    ({"version": 1, "rulez": []}, "rulez", "unknown key"),            # unknown top-level key
    ({"version": 1, "rules": {"id": "a"}}, "rules", "must be a list"),
    ({"version": 1, "rules": ["allow everything"]}, "rules[0]", "must be a mapping"),   # a rule that is not a mapping
])
def test_file_problem(tmp_path: Path, doc: dict[str, Any], where: str, message: str) -> None:
    """File-level keys are checked like rule keys, with the file's path."""
    path = write(tmp_path, "policy.yaml", doc)
    assert any(p.startswith(f"{path}: {where}: ") and message in p for p in problems(path))


@pytest.mark.parametrize("text, message", [
    ("version: 1\nversion: 1\n", "duplicate key 'version'"),                          # YAML duplicate key
    ("version: 1\nrules:\n  - {id: a, effect: allow, effect: deny}\n", "duplicate key 'effect'"),
    ("version: 1\nrules: [\n", "not valid YAML at line"),                             # syntax error
    ("- just\n- a list\n", "must be a mapping"),                                      # not a mapping
])
def test_unreadable_yaml(tmp_path: Path, text: str, message: str) -> None:
    """YAML that cannot be read unambiguously is refused with the file's path."""
    path = write(tmp_path, "policy.yaml", text)
    assert any(p.startswith(str(path)) and message in p for p in problems(path))


def test_missing_file(tmp_path: Path) -> None:
    """A policy file that cannot be read is a problem, not a crash."""
    assert problems(tmp_path / "absent.yaml") == [f"{tmp_path / 'absent.yaml'}: cannot read policy file: "
                                                  "No such file or directory"]


def test_every_problem_across_files_at_once(tmp_path: Path) -> None:
    """Problems in several rules and files, and between files, are all reported together."""
    first = write(tmp_path, "a.yaml", {"version": 1, "rules": [
        rule(id="billing-update-invoices", when={"expr": "task.trigger =="}),
        rule(id="ok"),
        rule(id="bad-upstream", upstream="nope", credential="billing-oauth", scopes=["admin"]),
    ]})
    second = write(tmp_path, "b.yaml", {"version": 1, "default": "allow", "rules": [
        rule(id="ok"), rule(id="tools", upstream="crm-api", mcp={"tools": ["x"]}),
    ]})
    found = problems(first, second)
    expected = [
        f"{first}: rules[0] (billing-update-invoices).when.expr: cel: cannot compile",
        f"{first}: rules[2] (bad-upstream).upstream: unknown upstream 'nope'",
        f"{first}: rules[2] (bad-upstream).scopes: must be a subset",
        f"{second}: rules[0] (ok).id: duplicate rule id 'ok', first used at {first}: rules[1] (ok)",
        f"{second}: rules[1] (tools).mcp: upstream 'crm-api' has protocol http",
        f"{second}: default: files disagree on default: {first} says deny, this file says allow",
    ]
    for text in expected:
        assert any(p.startswith(text) for p in found), (text, found)
    assert len(found) == len(expected)


def test_files_agreeing_on_default(tmp_path: Path) -> None:
    """Files that all say default: allow load as default allow, with rules from every file."""
    first = write(tmp_path, "a.yaml", {"version": 1, "default": "allow", "rules": [rule(id="a")]})
    second = write(tmp_path, "b.yaml", {"version": 1, "default": "allow", "rules": [rule(id="b")]})
    policy = load_policy([first, second], upstreams=UPSTREAMS, credentials=CREDENTIALS)
    assert policy.default == "allow" and [r.id for r in policy.rules] == ["a", "b"]


def test_loaded_rule_shape(tmp_path: Path) -> None:
    """A loaded rule keeps what the pipeline and explain need."""
    path = write(tmp_path, "p.yaml", {"version": 1, "mode": "audit", "rules": [rule(
        id="r", upstream="billing-api", methods=["PUT"], credential="billing-oauth", scopes=["invoices.write"],
        when={"delegation": "required"}, rate_limit={"requests": 30, "per": "1m", "key": "task"})]})
    (loaded,) = load_policy([path], upstreams=UPSTREAMS, credentials=CREDENTIALS).rules
    assert (loaded.upstream, loaded.methods, loaded.credential, loaded.scopes) == (
        "billing-api", frozenset({"PUT"}), "billing-oauth", ("invoices.write",))
    assert loaded.shadow and loaded.delegation == "required"
    assert (loaded.rate_limit.requests, loaded.rate_limit.per, loaded.rate_limit.key) == (30, 60.0, "task")


@pytest.mark.parametrize("pattern, matches, misses", [
    ("/v1/*", ["/v1/a"], ["/v1/", "/v1/a/b"]),                       # whole-segment *
    ("/v1/a*", ["/v1/a", "/v1/abc"], ["/v1/b"]),                     # * within a segment may be empty
    ("/a/**", ["/a", "/a/", "/a/b/c"], ["/ab"]),                     # trailing **
    ("**/x", ["x", "a/x", "/a/b/x"], ["ax"]),                        # leading **
    ("/a/**/b", ["/a/b", "/a/x/b"], ["/a/xb", "/ab"]),               # ** in the middle
    ("/a+b(c)", ["/a+b(c)"], ["/aab(c)"]),                           # regex characters are literal
])
def test_glob_regex(pattern: str, matches: list[str], misses: list[str]) -> None:
    """Glob patterns compile to anchored regexes with * one segment and ** whole segments."""
    regex = re.compile(glob_regex(pattern))
    assert all(regex.fullmatch(m) for m in matches)
    assert not any(regex.fullmatch(m) for m in misses)
