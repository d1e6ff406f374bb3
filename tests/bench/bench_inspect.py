"""What reading an agent protocol's body costs per request, against a plain allowed request (issue 13).

For a 4 KiB and a 256 KiB body: the plain request is decided on its facts alone (no body read for
policy); an MCP ``tools/call``, an A2A ``SendMessage`` and an OpenAI ``chat/completions`` are parsed
strictly and then decided under a rule of their protocol (``mcp: {tools}``, ``a2a: {methods}`` with a
text-only CEL condition, ``llm: {models}``). In-process, µs per request, the median of rounds; the
body bytes are already in memory (reading them off the socket costs the same for every protocol).

The answer side too: an MCP server's ``tools/list`` answer filtered under ``mcp: {tools: [search]}`` (all
but one tool dropped, the answer written anew) and a ``tools/call`` answer read (parsed, passed unchanged),
each as ``application/json`` (read whole) and as one ``text/event-stream`` event (fed in 64 KiB pieces, as
the relay reads them), against a plain relayed answer (the same pieces passed on untouched).
Run: ``python -m tests.bench.bench_inspect [N]``.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.exchange import AgentInfo
from sidecar.forward.relay import WholeAnswer
from sidecar.mcp_filter import answer_filter
from sidecar.policy.a2a import parse_a2a_request
from sidecar.policy.engine import PolicySet, load_policy
from sidecar.policy.facts import Facts, build_facts
from sidecar.policy.llm import parse_llm_request
from sidecar.policy.mcp import parse_mcp_request

SIZES = {"4 KiB": 4 * 1024, "256 KiB": 256 * 1024}
AGENT = AgentInfo("spiffe://example.org/agent", "bench-agent", "production")
RULES = [
    {"id": "plain", "direction": "outbound", "upstream": "api", "effect": "allow"},
    {"id": "tools", "direction": "outbound", "upstream": "tools", "mcp": {"tools": ["search"]}, "effect": "allow"},
    {"id": "planner", "direction": "outbound", "upstream": "planner", "a2a": {"methods": ["SendMessage"]},
     "when": {"expr": "a2a.part_kinds.all(k, k == 'text')"}, "effect": "allow"},
    {"id": "models", "direction": "outbound", "upstream": "llm", "llm": {"models": ["gpt-4o-mini"]},
     "effect": "allow"},
]
PROTOCOLS = {"api": "http", "tools": "mcp", "planner": "a2a", "llm": "openai"}


def bodies(size: int) -> dict[str, bytes]:
    """One body per protocol whose free text makes it ``size`` bytes, give or take its envelope."""
    text = "x" * size
    return {
        "mcp": json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                           "params": {"name": "search", "arguments": {"q": text}}}).encode(),
        "a2a": json.dumps({"jsonrpc": "2.0", "id": "1", "method": "SendMessage", "params": {"message": {
            "role": "ROLE_USER", "messageId": "m", "parts": [{"text": text}]}}}).encode(),
        "openai": json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}],
                              "max_completion_tokens": 256}).encode(),
    }


def facts(upstream: str, size: int, **read: Any) -> Facts:
    return build_facts(direction="outbound", method="POST", scheme="https", host=f"{upstream}.example",
                       path="/", query="", headers={"content-type": "application/json"}, size=size,
                       upstream=upstream, agent=AGENT, **read)


def requests(policy: PolicySet, size: int) -> dict[str, Callable[[], object]]:
    body = bodies(size)
    limit = 1 << 20

    def plain() -> object:
        return policy.decide(facts("api", size))

    def mcp() -> object:
        call = parse_mcp_request(body["mcp"], "application/json", limit)
        return policy.decide(facts("tools", len(body["mcp"]), mcp_method=call.method, mcp_tool=call.tool))

    def a2a() -> object:
        call = parse_a2a_request(body["a2a"], "application/json", limit)
        return policy.decide(facts("planner", len(body["a2a"]), a2a=call))

    def llm() -> object:
        call = parse_llm_request(body["openai"], "application/json", "/chat/completions", limit)
        return policy.decide(facts("llm", len(body["openai"]), llm=call))

    return {"plain allowed": plain, "mcp tools/call": mcp, "a2a SendMessage": a2a, "openai chat": llm}


PIECE = 64 * 1024  # what the relay reads at a time, at most


def answers(size: int) -> dict[str, bytes]:
    """MCP answers of about ``size`` bytes: a tools/list of many described tools, a tools/call's text."""
    count = max(size // 256, 2)
    listed = [{"name": "search" if i == 0 else f"tool_{i}", "description": "d" * 200,
               "inputSchema": {"type": "object"}} for i in range(count)]
    return {
        "tools/list": json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"tools": listed}}).encode(),
        "tools/call": json.dumps({"jsonrpc": "2.0", "id": 1, "result": {
            "content": [{"type": "text", "text": "x" * size}]}}).encode(),
    }


def pieces(body: bytes) -> list[bytes]:
    return [body[i:i + PIECE] for i in range(0, len(body), PIECE)]


def answer_cases(policy: PolicySet, size: int) -> dict[str, Callable[[], object]]:
    on = facts("tools", 0, mcp_method="tools/list")
    cases: dict[str, Callable[[], object]] = {}
    for method, body in answers(size).items():
        json_in = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json"}))
        sse_in = CIMultiDictProxy(CIMultiDict({"Content-Type": "text/event-stream"}))
        chunks, events = pieces(body), pieces(b"event: message\ndata: " + body + b"\n\n")

        def plain(chunks: list[bytes] = chunks) -> object:
            return [chunk for chunk in chunks]

        def read_json(method: str = method, body: bytes = body, headers: Any = json_in) -> object:
            whole = answer_filter(policy, on, method, headers, lambda m, i: True)
            assert isinstance(whole, WholeAnswer)
            return whole.read(body)

        def read_sse(method: str = method, events: list[bytes] = events, headers: Any = sse_in) -> object:
            feed = answer_filter(policy, on, method, headers, lambda m, i: True)
            assert callable(feed) and not isinstance(feed, WholeAnswer)
            return [feed(chunk, False) for chunk in events] + [feed(b"", True)]

        cases[f"plain {method}"] = plain
        cases[f"mcp {method} JSON"] = read_json
        cases[f"mcp {method} SSE"] = read_sse
    return cases


def per_call(fn: Callable[[], object], n: int, rounds: int = 5) -> float:
    """µs per call, the median of ``rounds`` rounds of ``n`` calls."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(times)


def main(n: int) -> None:
    path = Path(tempfile.mkdtemp(prefix="bench-inspect-")) / "policy.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "default": "deny", "rules": RULES}))
    policy = load_policy([path], upstreams=PROTOCOLS, credentials={})
    for label, size in SIZES.items():
        cases = requests(policy, size)
        for name, fn in cases.items():
            assert getattr(fn(), "effect") == "allow", name
        costs = {name: per_call(fn, n if size < 65536 else max(n // 20, 10)) for name, fn in cases.items()}
        print(f"-- body {label}")
        for name, cost in costs.items():
            print(f"{name:18s} {cost:10.1f} µs   (+{cost - costs['plain allowed']:9.1f} µs over plain)")
    for label, size in SIZES.items():
        cases = answer_cases(policy, size)
        kept = json.loads(cases["mcp tools/list JSON"]())["result"]["tools"]  # type: ignore[arg-type]
        assert [tool["name"] for tool in kept] == ["search"]
        costs = {name: per_call(fn, n if size < 65536 else max(n // 20, 10)) for name, fn in cases.items()}
        print(f"-- MCP answer {label}")
        for name, cost in costs.items():
            plain = costs["plain " + name.split()[1]]
            print(f"{name:22s} {cost:10.1f} µs   (+{cost - plain:9.1f} µs over plain relayed)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
