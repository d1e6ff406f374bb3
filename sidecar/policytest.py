"""``sidecar test POLICY... --cases CASES.yaml``: policy unit tests.

Each case describes a request (what ``explain`` takes) and the decision it expects; the policy
files are compiled as ``sidecar run`` compiles them and each request goes through the same
routing, canonical path, header screening, MCP parsing and :meth:`PolicySet.decide` (rate limits
are not charged). A case file::

    cases:
      - name: the example API can be read
        request: {method: GET, url: /example-api/v1/items}     # or upstream: + path:
        expect: {decision: allow, rule: example-api-read, reason: allowed}

``request`` keys: ``direction`` (outbound), ``method`` (GET), ``url`` or ``upstream`` + ``path``,
``headers`` (mapping), ``body``, ``caller``, ``agent``, ``principal`` (``{iss, sub}``),
``delegation``, ``task`` (``{id, trigger}``), ``mcp`` (``{method, tool, resource, prompt, arguments}``: a
JSON-RPC POST body; or ``{server_request}``: the server asking the agent, ``mcp.method`` ``rpc.server_request``),
``a2a`` (``{method, parts, task_id, context_id, push_url}``: an A2A JSON-RPC POST body, ``parts`` a list
of ``text``, ``file``, ``data``), ``llm`` (``{model, max_tokens, stream}``: the body of a POST to the
LLM API endpoint ``url`` names), ``at`` (RFC 3339). ``expect``: ``decision`` (allow / deny / require_approval), optional ``rule``
and ``reason``. Exit 0 when every case passes, 1 when one fails or an input is unusable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from sidecar.config import config_path, load_config
from sidecar.config_model import Config
from sidecar.errors import ConfigError, ConfigInvalid
from sidecar.explain import Described, Verdict, candidate_policy, decide, router_for
from sidecar.fields import Fields
from sidecar.policy.a2a import MESSAGE_METHODS, method_name
from sidecar.policy.engine import PolicySet
from sidecar.policy.llm import ENDPOINTS, endpoint_of
from sidecar.policy.mcp import described_body

EFFECTS = ("allow", "deny", "require_approval")
DIRECTIONS = ("outbound", "inbound")
DELEGATIONS = ("delegated", "impersonated", "asserted", "none")


@dataclass(frozen=True)
class Case:
    where: str  # "config/policy.cases.yaml: cases[0]"
    name: str
    request: Described
    decision: str
    rule: str | None
    reason: str | None


@dataclass(frozen=True)
class Result:
    case: Case
    verdict: Verdict

    @property
    def failures(self) -> list[str]:
        c, v = self.case, self.verdict
        expected = (("decision", c.decision, v.effect), ("rule", c.rule, v.rule_id), ("reason", c.reason, v.reason))
        return [f"{what} {want!r}, got {got!r}" for what, want, got in expected if want is not None and want != got]


# -- reading cases ----------------------------------------------------------------------

def load_cases(path: Path) -> list[Case]:
    """Every case of a file; raises ConfigInvalid naming each problem with its path."""
    errors: list[ConfigError] = []
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigInvalid([ConfigError(str(path), f"cannot read cases: {getattr(exc, 'strerror', None) or exc}")])
    except yaml.YAMLError as exc:
        raise ConfigInvalid([ConfigError(str(path), f"not valid YAML: {exc}")]) from None
    root = _FileFields(raw, str(path), errors)
    entries = root.items("cases", required=True)
    root.done()
    cases = [c for c in (_case(f) for f in entries) if c is not None]
    if not errors and not cases:
        errors.append(ConfigError(f"{path}: cases", "must list at least one case"))
    if errors:
        raise ConfigInvalid(errors)
    return cases


class _FileFields(Fields):
    """The root of a case file: paths read ``config/policy.cases.yaml: cases[0].expect``."""

    def at(self, key: str) -> str:
        return f"{self.path}: {key}"


def _case(f: Fields) -> Case | None:
    before = len(f.errors)
    name = f.text("name", required=True) or f.path
    request = _request(f.sub("request", required=True))
    expect = f.sub("expect", required=True)
    decision = expect.choice("decision", EFFECTS, required=True)
    rule, reason = expect.text("rule"), expect.text("reason")
    expect.done()
    f.done()
    if len(f.errors) > before or request is None or decision is None:
        return None
    return Case(f.path, name, request, decision, rule, reason)


def _request(f: Fields) -> Described | None:
    direction = f.choice("direction", DIRECTIONS, "outbound")
    method = f.text("method", "GET").upper()
    url = _url(f, direction)
    headers = tuple((str(k), str(v)) for k, v in f.mapping("headers").items())
    body = f.text("body", "").encode()
    server_request = None
    for key, build in (("mcp", _mcp_body), ("a2a", _a2a_body), ("llm", _llm_body)):
        sub = f.sub(key)
        if key == "mcp":
            server_request = sub.text("server_request")
        if f.has(key) and not (key == "mcp" and server_request is not None):
            body, method = build(sub, url or ""), "POST"
            headers = (*headers, ("Content-Type", "application/json"))
        sub.done()
    principal, delegation = _principal(f.sub("principal")), f.choice("delegation", DELEGATIONS)
    task = f.sub("task")
    task_id = task.text("id", "test-task") if f.has("task") else None
    trigger = task.text("trigger")
    task.done()
    at = _at(f)
    caller, agent = f.text("caller"), f.text("agent")
    f.done()
    if url is None:
        return None
    return Described(url=url, direction=direction, method=method, headers=headers, body=body, agent_id=agent,
                     caller=caller, principal=principal, delegation=delegation, task_id=task_id, task_trigger=trigger,
                     at=at, mcp_server_request=server_request)


def _url(f: Fields, direction: str) -> str | None:
    url, upstream, path = f.text("url"), f.text("upstream"), f.text("path")
    if url is not None and (upstream is not None or path is not None):
        f.error("url", "give url, or upstream and path, not both")
    elif url is None and path is None:
        f.error("url", "is required (or upstream and path)")
    elif url is None and upstream is None and direction == "outbound":
        f.error("upstream", "is required with path on an outbound request")
    elif url is None:
        return f"/{upstream}{path}" if direction == "outbound" else path
    return url


def _mcp_body(f: Fields, url: str) -> bytes:
    method = f.text("method", "tools/call")
    arguments = f.mapping("arguments") if f.has("arguments") else None
    return described_body(method, f.text("tool"), f.text("resource"), f.text("prompt"), dict(arguments or {}))


PART_CONTENT = {"text": {"text": "test"}, "file": {"url": "https://example.com/test.pdf"}, "data": {"data": {}}}


def _a2a_body(f: Fields, url: str) -> bytes:
    """``a2a: {method, parts, task_id, context_id, push_url}``: the JSON-RPC body an A2A client sends."""
    method = f.text("method", "SendMessage")
    kinds = f.text_list("parts", ["text"])
    for i, kind in enumerate(kinds):
        if kind not in PART_CONTENT:
            f.error(f"parts[{i}]", f"must be one of {', '.join(PART_CONTENT)}, got {kind!r}")
    task_id, context_id, push_url = f.text("task_id"), f.text("context_id"), f.text("push_url")
    canonical = method_name(method) or method
    if canonical in MESSAGE_METHODS:
        message = {"messageId": "test", "role": "ROLE_USER", "parts": [PART_CONTENT.get(k, {}) for k in kinds],
                   **({"taskId": task_id} if task_id else {}), **({"contextId": context_id} if context_id else {})}
        params: dict[str, Any] = {"message": message}
        if push_url:
            params["configuration"] = {"taskPushNotificationConfig": {"url": push_url}}
    elif canonical.endswith("PushNotificationConfig") or canonical.endswith("PushNotificationConfigs"):
        params = {"taskId": task_id or "test-task", **({"url": push_url} if push_url else {})}
    else:
        params = {"id": task_id or "test-task"} if canonical != "ListTasks" else {}
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()


def _llm_body(f: Fields, url: str) -> bytes:
    """``llm: {model, max_tokens, stream}``: the JSON body of a call to the endpoint ``url`` ends in."""
    body: dict[str, Any] = {"model": f.text("model", required=True) or "", "stream": f.flag("stream", False)}
    cap = f.integer("max_tokens", minimum=0)
    endpoint = endpoint_of(url.partition("?")[0])
    if endpoint is None:
        f.error("", f"needs the url of an LLM API endpoint ({', '.join(ENDPOINTS)}), got {url!r}")
    elif cap is not None and ENDPOINTS[endpoint]:
        body[ENDPOINTS[endpoint][0]] = cap
    if endpoint == "/embeddings":
        body.pop("stream")
    return json.dumps(body).encode()


def _principal(f: Fields) -> tuple[str, str] | None:
    if not f.raw:
        f.done()
        return None
    iss, sub = f.text("iss", "test"), f.text("sub", required=True)
    f.done()
    return (iss, sub) if sub else None


def _at(f: Fields) -> datetime | None:
    value = f.raw_value("at")
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        f.error("at", f"must be an RFC 3339 time (2026-01-31T10:00:00Z), got {value!r}")
        return None


# -- running ----------------------------------------------------------------------------

def run_cases(cases: list[Case], config: Config, policy: PolicySet) -> list[Result]:
    router = router_for(config)
    return [Result(case, decide(case.request, config, policy, router)) for case in cases]


def describe(d: Described) -> str:
    """One line saying what the request was (for failure messages)."""
    who = [f"{k} {v}" for k, v in (("caller", d.caller), ("agent", d.agent_id)) if v]
    if d.principal:
        who.append(f"principal {d.principal[1]}")
    return " ".join([d.direction, d.method, d.url, *who])


def failure_lines(r: Result, policy: PolicySet) -> list[str]:
    """The request, the expected and the actual decision, and the rule that decided."""
    v = r.verdict
    actual = f"{v.effect}, rule {v.rule_id or '-'}, reason {v.reason}" + (f" ({v.refusal})" if v.refusal else "")
    mcp = " ".join(p for p in (v.shown.get("mcp_method"), v.shown.get("mcp_tool")) if p)
    return [f"FAIL {r.case.name} ({r.case.where})",
            f"  request:  {describe(r.case.request)}" + (f" (mcp {mcp})" if mcp else ""),
            f"  expected: {_expected(r.case)}", f"  actual:   {actual}",
            f"  deciding rule: {_rule_where(policy, v.rule_id)}", *(f"  - {f}" for f in r.failures)]


def report(results: list[Result], policy: PolicySet) -> str:
    lines = [line for r in results if r.failures for line in failure_lines(r, policy)]
    failed = sum(1 for r in results if r.failures)
    lines.append(f"{len(results) - failed} passed, {failed} failed (policy {policy.version})")
    return "\n".join(lines)


def _expected(c: Case) -> str:
    return ", ".join([c.decision, *(f"{k} {v}" for k, v in (("rule", c.rule), ("reason", c.reason)) if v)])


def _rule_where(policy: PolicySet, rule_id: str | None) -> str:
    if rule_id is None:
        return "none (refused before policy)"
    if rule_id == "default":
        return f"default ({policy.default}: no rule matched)"
    rule = next((r for r in policy.rules if r.id == rule_id), None)
    return rule.where if rule is not None else rule_id


def junit(results: list[Result], policy: PolicySet, path: Path) -> None:
    """JUnit XML, one testcase per case, a failure element (with the report's lines) on each failed one."""
    failed = str(sum(1 for r in results if r.failures))
    root = ET.Element("testsuites", name="sidecar test", tests=str(len(results)), failures=failed, errors="0")
    suite = ET.SubElement(root, "testsuite", name=f"policy {policy.version}", tests=str(len(results)),
                          failures=failed, errors="0", skipped="0", time="0")
    for r in results:
        case = ET.SubElement(suite, "testcase", classname=r.case.where.split(":")[0], name=r.case.name, time="0")
        if r.failures:
            failure = ET.SubElement(case, "failure", message="; ".join(r.failures), type="PolicyMismatch")
            failure.text = "\n".join(failure_lines(r, policy))
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def policy_test(args: argparse.Namespace) -> int:
    """``sidecar test``: 0 when every case passes, 1 otherwise (or on unusable input)."""
    try:
        config = load_config(config_path(args.config, os.environ))
        policy = candidate_policy(config, [Path(p) for p in args.policy])
        cases = [c for path in args.cases for c in load_cases(Path(path))]
    except ConfigInvalid as exc:
        for error in exc.errors:
            print(f"error: {error}", file=sys.stderr)
        return 1
    results = run_cases(cases, config, policy)
    print(report(results, policy))
    if args.junit:
        try:
            junit(results, policy, Path(args.junit))
        except OSError as exc:
            print(f"error: test: cannot write {args.junit}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    return 1 if any(r.failures for r in results) else 0
