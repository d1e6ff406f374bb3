"""``sidecar explain``: the decision the config would make for one request, sending nothing.

It runs the same routing, canonical path, MCP parsing and policy as the pipeline, so what
it prints is what the sidecar would do. :func:`decide` on a :class:`Described` request is
also what ``sidecar test`` (policy unit tests) and ``sidecar replay`` (logged requests) use. Exit codes: 0 allow, 3 deny (also refusals before
policy, such as ``unknown_upstream``), 4 approval required, 2 usage or config error.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence
from urllib.parse import urlsplit

from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config import config_path, load_config
from sidecar.config_model import Config
from sidecar.errors import ConfigError, ConfigInvalid, Refusal
from sidecar.exchange import AgentInfo
from sidecar.forward.body import is_form_type
from sidecar.grpc import call_of
from sidecar.http.headers import DropSet, clean_request_headers, echo_method, inbound_drop_set, request_drop_set
from sidecar.policy.a2a import A2aCall, parse_a2a_request
from sidecar.policy.engine import Decision, PolicySet
from sidecar.policy.facts import Agent, Facts, McpDetail, build_facts
from sidecar.policy.llm import AGENT_KEY_HEADERS, LLM_PROTOCOLS, LlmCall, endpoint_of, parse_llm_request
from sidecar.policy.mcp import SERVER_REQUEST_METHOD, parse_mcp_request, transport_method
from sidecar.http.target import DEFAULT_OPTIONS, PathOptions, canonical_path, check_header_names
from sidecar.policy.ratelimit import Limit, RateLimiter
from sidecar.policy.readings import Reading, screen
from sidecar.routing import Route, Router

EXIT = {"allow": 0, "deny": 3, "require_approval": 4}


@dataclass(frozen=True)
class Described:
    """A request described rather than received: what ``explain``, ``test`` and ``replay`` decide on.

    ``None`` fields take this sidecar's own values or the pipeline's (size: the body's length):
    without ``agent`` (a logged agent: replay) the request is this sidecar's agent, named and
    described by the config, with ``agent_id`` for its id when given. ``reading`` stands in for the
    override headers a logged request carried (replay); without it the headers are screened.
    ``recorded_headers`` (replay) are what policy sees instead of ``headers`` once the request is routed;
    ``a2a`` and ``llm`` (replay) the calls policy sees instead of parsing ``body``.
    """

    url: str
    direction: str = "outbound"
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    agent_id: str | None = None
    agent: Agent | None = None
    caller: str | None = None
    principal: tuple[str, str] | None = None
    delegation: str | None = None  # default: delegated with a principal, else none
    task_id: str | None = None
    task_trigger: str | None = None
    at: datetime | None = None
    size: int | None = -1  # -1: the body's length
    reading: Reading | None = None
    recorded_headers: Mapping[str, tuple[str, ...]] | None = None  # replay: the headers policy saw, as logged
    a2a: A2aCall | None = None  # replay: the logged A2A call (else parsed from the body, as the pipeline does)
    llm: LlmCall | None = None  # replay: the logged LLM API call (else parsed from the body)
    mcp_server_request: str | None = None  # a server's request to the agent (decided as mcp.method rpc.server_request)


@dataclass(frozen=True)
class Verdict:
    """What the sidecar would do: a policy decision, or a refusal before policy."""

    shown: dict[str, Any]
    decision: Decision | None = None
    refusal: Refusal | None = None

    @property
    def effect(self) -> str:
        return self.decision.effect if self.decision is not None else "deny"

    @property
    def rule_id(self) -> str | None:
        return self.decision.rule_id if self.decision is not None else None

    @property
    def reason(self) -> str:
        if self.decision is not None:
            return self.decision.reason
        assert self.refusal is not None
        return self.refusal.reason


def _agent_id(config: Config, override: str | None) -> str:
    if override:
        return override
    svid = config.identity.svid
    if svid is not None and svid.cert.exists():
        from cryptography import x509

        from sidecar.identity.spiffe import spiffe_id_from_certificate

        return str(spiffe_id_from_certificate(x509.load_pem_x509_certificate(svid.cert.read_bytes())))
    from sidecar.app import DEV_AGENT_PATH

    return f"spiffe://sidecar.local{DEV_AGENT_PATH.format(name=config.agent_name)}"


def header_pairs(pairs: list[str]) -> tuple[tuple[str, str], ...]:
    """``--header K=V`` values as (name, value) pairs."""
    out = []
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--header must be K=V, got {pair!r}")
        out.append((name.strip(), value))
    return tuple(out)


def router_for(config: Config) -> Router:
    """The router ``sidecar run`` builds from this config (build it once to decide many requests)."""
    return Router(config.outbound.upstreams, config.outbound.listen)


def _route(config: Config, router: Router, url: str, headers: CIMultiDict[str]) -> Route:
    if url.startswith("/"):
        headers.setdefault("Host", str(config.outbound.listen))
    else:
        headers.setdefault("Host", url.split("://", 1)[-1].split("/", 1)[0].split("?", 1)[0])
    proxy = CIMultiDictProxy(headers)
    check_header_names(proxy.keys())
    router.check_boundary(proxy)
    return router.route(url, proxy)


class _Target(NamedTuple):
    """What the direction's routing found: the request's target, its forwarded headers, what to show."""

    scheme: str
    host: str
    path: str
    query: str
    upstream: str | None
    forwarded: CIMultiDict[str]
    reading: Reading
    shown: dict[str, Any]
    mcp_method: str | None = None
    mcp_tool: str | None = None
    grpc_service: str | None = None  # a call to a protocol grpc upstream: from its path
    grpc_method: str | None = None
    a2a: A2aCall | None = None  # a POST to a protocol a2a upstream
    llm: LlmCall | None = None  # a POST to an endpoint of a protocol openai upstream
    mcp: McpDetail | None = None


def _forwarded(d: Described, headers: CIMultiDict[str], drop: DropSet, query: str, passed: frozenset[str],
               paths: PathOptions, base_path: str) -> tuple[CIMultiDict[str], Reading]:
    """The headers policy sees (the forwarded ones) and the other reading, as the pipeline has them."""
    forwarded = clean_request_headers(CIMultiDictProxy(headers), drop)
    form = d.body if is_form_type(headers.get("Content-Type", "")) else None
    reading = d.reading if d.reading is not None else screen(forwarded, query, form, passed, paths, base_path)
    return forwarded, reading


def _agent(d: Described, config: Config) -> Agent:
    """The logged agent, or this sidecar's own (under ``agent_id`` when given)."""
    if d.agent is not None:
        return d.agent
    return AgentInfo(_agent_id(config, d.agent_id), config.agent_name, config.environment, config.agent)


def _inbound(d: Described, config: Config, headers: CIMultiDict[str], method: str) -> _Target:
    raw_path, _, query = d.url.partition("?")
    path = canonical_path(raw_path)
    echo_method(method, False)
    passed = config.inbound.pass_headers if config.inbound else frozenset()
    agent_base = urlsplit(config.inbound.forward_to).path.rstrip("/") if config.inbound else ""
    forwarded, reading = _forwarded(d, headers, inbound_drop_set(passed), query, passed, DEFAULT_OPTIONS, agent_base)
    shown = dict(upstream=None, path=path, override=reading.event())
    return _Target("https", "", path, query, None, forwarded, reading, shown)


def _outbound(d: Described, config: Config, router: Router, headers: CIMultiDict[str], method: str) -> _Target:
    route = _route(config, router, d.url, headers)
    up = route.upstream
    echo_method(method, up.allow_trace)
    strip = (*config.outbound.strip_headers, *AGENT_KEY_HEADERS.get(up.protocol, ()))
    forwarded, reading = _forwarded(d, headers, request_drop_set(strip, up.pass_headers),
                                    route.query, up.pass_headers, up.paths, up.base_path)
    mcp_method, mcp_tool, detail = _mcp(d, config, headers, method, route.path) if up.protocol == "mcp" else \
        (None, None, None)
    a2a, llm = _a2a(d, up.protocol, method, headers, config), _llm(d, up.protocol, method, route.path, headers, config)
    shown = dict(upstream=up.name, path=route.path, forwarded_path=route.forward_path, mcp_method=mcp_method,
                 mcp_tool=mcp_tool, a2a_method=a2a.method if a2a else None, llm_model=llm.model if llm else None,
                 override=reading.event())
    if detail is not None:
        shown.update(mcp_resource=detail.resource, mcp_prompt=detail.prompt, mcp_server_request=detail.server_request)
    service, rpc = call_of(route.path) if up.protocol == "grpc" else (None, None)
    return _Target(up.scheme, up.host, route.path, route.query, up.name, forwarded, reading, shown, mcp_method,
                   mcp_tool, service, rpc, a2a, llm, detail)


def _mcp(d: Described, config: Config, headers: CIMultiDict[str], method: str,
         path: str) -> tuple[str | None, str | None, McpDetail | None]:
    """What policy sees of an MCP request: a server's request to the agent, the body's call, or the transport's."""
    if d.mcp_server_request is not None:
        return SERVER_REQUEST_METHOD, None, McpDetail(server_request=d.mcp_server_request)
    if method != "POST":
        return transport_method(method, path), None, None
    call = parse_mcp_request(d.body, headers.get("Content-Type"), config.outbound.limits.max_body_bytes)
    return call.method, call.tool, McpDetail.of(call.resource, call.prompt, call.arguments, call.size)


def _a2a(d: Described, protocol: str, method: str, headers: CIMultiDict[str], config: Config) -> A2aCall | None:
    """A POST to an A2A upstream is one A2A call: the logged one (replay), or its body parsed as the pipeline does."""
    if protocol != "a2a" or method != "POST":
        return None
    if d.a2a is not None:
        return d.a2a
    return parse_a2a_request(d.body, headers.get("Content-Type"), config.outbound.limits.max_body_bytes)


def _llm(d: Described, protocol: str, method: str, path: str, headers: CIMultiDict[str],
         config: Config) -> LlmCall | None:
    """A POST to an LLM API endpoint: the logged call (replay), or its body parsed as the pipeline does."""
    if protocol not in LLM_PROTOCOLS or method != "POST":
        return None
    endpoint = endpoint_of(path, protocol)
    if endpoint is None:
        return None
    if d.llm is not None:
        return d.llm
    return parse_llm_request(d.body, headers.get("Content-Type"), endpoint, config.outbound.limits.max_body_bytes)


def facts_for(d: Described, config: Config, router: Router) -> tuple[Facts, dict[str, Any], Reading]:
    """The Facts the pipeline would build for ``d``, what to show of them, and the other reading;
    raises :class:`Refusal` for what the pipeline refuses before policy."""
    method, agent = d.method.upper(), _agent(d, config)  # the agent first: its SVID may be unreadable
    headers: CIMultiDict[str] = CIMultiDict(d.headers)
    inbound = d.direction == "inbound"
    t = _inbound(d, config, headers, method) if inbound else _outbound(d, config, router, headers, method)
    facts = build_facts(
        direction=d.direction, method=method, scheme=t.scheme, host=t.host, path=t.path, query=t.query,
        headers=t.forwarded, size=len(d.body) if d.size == -1 else d.size, upstream=t.upstream,
        agent=agent, caller_id=d.caller if inbound else None, principal=d.principal,
        delegation=d.delegation or ("delegated" if d.principal else "none"), task_id=d.task_id,
        task_trigger=d.task_trigger, mcp_method=t.mcp_method, mcp_tool=t.mcp_tool, grpc_service=t.grpc_service,
        grpc_method=t.grpc_method, now=d.at or datetime.now(timezone.utc), a2a=t.a2a, llm=t.llm, mcp=t.mcp)
    if d.recorded_headers is not None:
        facts.headers = d.recorded_headers
    return facts, t.shown, t.reading


def decide(d: Described, config: Config, policy: PolicySet, router: Router | None = None) -> Verdict:
    """The pipeline's verdict on ``d`` under ``policy``: the same facts, the same ``PolicySet.decide``."""
    try:
        facts, shown, reading = facts_for(d, config, router or router_for(config))
    except Refusal as refusal:
        return Verdict({}, refusal=refusal)
    return Verdict(shown, decision=policy.decide(facts, *reading.alternatives(facts)))


def _described(args: argparse.Namespace) -> Described:
    trigger, principal = args.task_trigger, args.task_principal
    return Described(
        url=args.url, direction=args.direction, method=args.method, headers=header_pairs(args.header),
        body=Path(args.body).read_bytes() if args.body else b"", agent_id=args.agent, caller=args.caller,
        principal=("explain", principal) if principal else None,
        task_id="explain-task" if principal or trigger else None, task_trigger=trigger,
        at=datetime.fromisoformat(args.at.replace("Z", "+00:00")) if args.at else None)


def _print(shown: dict[str, Any], decision: Decision | None, refusal: Refusal | None, config: Config) -> None:
    for key, value in shown.items():
        if value is not None:
            print(f"{key}: {value}")
    if refusal is not None:
        print(f"decision: deny\nreason: {refusal.reason}\nmessage: {refusal.message}")
        return
    assert decision is not None
    upstream = config.outbound.upstreams.get(shown.get("upstream") or "")
    credential = decision.credential or (upstream.credential if upstream else None)
    print(f"decision: {decision.effect}\nrule: {decision.rule_id}\nreason: {decision.reason}")
    print(f"credential: {credential or '-'}")
    print(f"scopes: {' '.join(decision.scopes) if decision.scopes else '-'}")
    if decision.audit:
        print(f"audit: {dict(decision.audit)}")
    print(f"policy_version: {decision.policy_version}")


def explain(args: argparse.Namespace) -> int:
    from sidecar.app import build_policy

    try:
        config = load_config(config_path(args.config, os.environ))
        policy: PolicySet = build_policy(config, None)
        header_pairs(args.header)
    except ConfigInvalid as exc:
        for error in exc.errors:
            print(f"error: {error}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        verdict = decide(_described(args), config, policy)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print(verdict.shown, verdict.decision, verdict.refusal, config)
    return EXIT.get(verdict.decision.effect, 3) if verdict.decision is not None else 3


class NoLimits(RateLimiter):
    """A limiter that never refuses: ``test`` and ``replay`` decide on rules, not on request rates."""

    def take(self, limits: Iterable[Limit]) -> tuple[Limit, int] | None:
        return None


def load_candidate(config_arg: str | None, policy_files: Sequence[str] | None) -> tuple[Config, PolicySet] | None:
    """The config and a candidate policy (``policy_files``, default the config's own) for the commands that
    re-decide logged exchanges; None after printing every problem with its path."""
    try:
        config = load_config(config_path(config_arg, os.environ))
        files = [Path(p) for p in policy_files] if policy_files else list(config.policy.files)
        return config, candidate_policy(config, files)
    except ConfigInvalid as exc:
        for error in exc.errors:
            print(f"error: {error}", file=sys.stderr)
        return None


def candidate_policy(config: Config, files: Sequence[Path]) -> PolicySet:
    """``files`` (a directory: its ``*.yaml`` but ``*.cases.yaml``) compiled exactly as ``sidecar run``
    compiles the config's own; raises ConfigInvalid."""
    from sidecar.app import build_policy

    paths: list[Path] = []
    for f in files:
        found = sorted(p for p in f.glob("*.yaml") if not p.name.endswith(".cases.yaml")) if f.is_dir() else [f]
        if not found:
            raise ConfigInvalid([ConfigError(str(f), "no policy files (*.yaml) in this directory")])
        paths += found
    return build_policy(replace(config, policy=replace(config.policy, files=tuple(paths))), NoLimits())
