"""``sidecar explain``: the decision the config would make for one request, sending nothing.

It runs the same routing, canonical path, MCP parsing and policy as the pipeline, so what
it prints is what the sidecar would do. Exit codes: 0 allow, 3 deny (also refusals before
policy, such as ``unknown_upstream``), 4 approval required, 2 usage or config error.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config import Config, config_path, load_config
from sidecar.errors import ConfigInvalid, Refusal
from sidecar.forward import (
    DropSet, clean_request_headers, echo_method, inbound_drop_set, is_form_type, request_drop_set,
)
from sidecar.policy.engine import Decision, Facts, PolicySet
from sidecar.policy.mcp import parse_mcp_request
from sidecar.policy.paths import DEFAULT_OPTIONS, PathOptions, canonical_path, check_header_names
from sidecar.policy.readings import Reading, screen
from sidecar.routing import Route, Router

EXIT = {"allow": 0, "deny": 3, "require_approval": 4}


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


def _headers(pairs: list[str]) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--header must be K=V, got {pair!r}")
        headers.add(name.strip(), value)
    return headers


def _route(config: Config, url: str, headers: CIMultiDict[str]) -> Route:
    router = Router(config.outbound.upstreams, config.outbound.listen)
    if url.startswith("/"):
        headers.setdefault("Host", str(config.outbound.listen))
    else:
        headers.setdefault("Host", url.split("://", 1)[-1].split("/", 1)[0].split("?", 1)[0])
    proxy = CIMultiDictProxy(headers)
    check_header_names(proxy.keys())
    router.check_boundary(proxy)
    return router.route(url, proxy)


def _forwarded(headers: CIMultiDict[str], drop: DropSet, query: str, body: bytes, passed: frozenset[str],
               paths: PathOptions, base_path: str) -> tuple[dict[str, tuple[str, ...]], Reading]:
    """The headers policy sees (the forwarded ones) and the other reading, as the pipeline has them."""
    forwarded = clean_request_headers(CIMultiDictProxy(headers), drop)
    form = body if is_form_type(headers.get("Content-Type", "")) else None
    reading = screen(forwarded, query, form, passed, paths, base_path)
    return {k.lower(): tuple(forwarded.getall(k)) for k in forwarded}, reading


def _facts(args: argparse.Namespace, config: Config,
           headers: CIMultiDict[str]) -> tuple[Facts, dict[str, Any], Reading]:
    body = Path(args.body).read_bytes() if args.body else b""
    now = datetime.fromisoformat(args.at.replace("Z", "+00:00")) if args.at else datetime.now(timezone.utc)
    base: dict[str, Any] = dict(
        method=args.method.upper(), query="", size=len(body), agent_id=_agent_id(config, args.agent),
        agent_name=config.agent_name, agent_environment=config.environment, now=now,
        principal=("explain", args.task_principal) if args.task_principal else None,
        delegation="delegated" if args.task_principal else "none",
        task_id="explain-task" if args.task_principal or args.task_trigger else None, task_trigger=args.task_trigger)
    shown: dict[str, Any] = {}
    if args.direction == "inbound":
        raw_path, _, query = args.url.partition("?")
        path = canonical_path(raw_path)
        echo_method(base["method"], False)
        passed = config.inbound.pass_headers if config.inbound else frozenset()
        agent_base = urlsplit(config.inbound.forward_to).path.rstrip("/") if config.inbound else ""
        seen, reading = _forwarded(headers, inbound_drop_set(passed), query, body, passed, DEFAULT_OPTIONS, agent_base)
        shown.update(upstream=None, path=path, override=reading.event())
        return Facts(direction="inbound", scheme="https", host="", path=path, upstream=None, caller_id=args.caller,
                     headers=seen, **{**base, "query": query}), shown, reading
    route = _route(config, args.url, headers)
    echo_method(base["method"], route.upstream.allow_trace)
    up = route.upstream
    seen, reading = _forwarded(headers, request_drop_set(config.outbound.strip_headers, up.pass_headers),
                               route.query, body, up.pass_headers, up.paths, up.base_path)
    mcp = parse_mcp_request(body, headers.get("Content-Type"), config.outbound.limits.max_body_bytes) \
        if route.upstream.protocol == "mcp" and base["method"] == "POST" else None
    shown.update(upstream=route.upstream.name, path=route.path, forwarded_path=route.forward_path,
                 mcp_method=mcp.method if mcp else None, mcp_tool=mcp.tool if mcp else None,
                 override=reading.event())
    return Facts(direction="outbound", scheme=route.upstream.scheme, host=route.upstream.host, path=route.path,
                 upstream=route.upstream.name, mcp_method=shown["mcp_method"], mcp_tool=shown["mcp_tool"],
                 headers=seen, **{**base, "query": route.query}), shown, reading


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
        headers = _headers(args.header)
    except ConfigInvalid as exc:
        for error in exc.errors:
            print(f"error: {error}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        facts, shown, reading = _facts(args, config, headers)
    except Refusal as refusal:
        _print({}, None, refusal, config)
        return 3
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    decision = policy.decide(facts, *reading.alternatives(facts))
    _print(shown, decision, None, config)
    return EXIT.get(decision.effect, 3)
