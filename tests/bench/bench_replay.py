"""``sidecar replay`` throughput (events/s) and peak memory on N synthetic trust-decision events.

Not part of the test run: ``python -m tests.bench.bench_replay [N]`` (default 1,000,000). A
generator process writes N schema-2 events (a few hundred distinct ones, cycled: several agents
with metadata, three upstreams, allows and denials, MCP calls, tasks, a method override, refusals
before policy) into the stdin of a real ``sidecar replay --events -`` process, which re-decides
them under a candidate policy one rule stricter than the one they were logged under. Prints the
events per second and the replay process's peak RSS (it must not grow with N: run it with
100000 and 1000000 to compare).
"""

from __future__ import annotations

import itertools
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

AGENTS = [{"id": f"spiffe://example.org/ns/agents/sa/agent-{i}", "name": f"agent-{i}", "environment": "production",
           "owner": "team@example.com", "purpose": "bench", "trust_level": ("sandbox", "internal", "production")[i % 3],
           "data_classes": ["pii"], "labels": {"team": f"t{i % 4}"}} for i in range(12)]
UPSTREAMS = {"billing": "https://billing.example/api", "crm": "https://crm.example/", "tools": "https://tools.example/mcp"}
CONFIG = {"outbound": {"upstreams": {name: {"url": url, **({"protocol": "mcp"} if name == "tools" else {})}
                                     for name, url in UPSTREAMS.items()}}}
RULES = [
    {"id": "billing-read", "direction": "outbound", "upstream": "billing", "methods": ["GET"], "paths": ["/v1/**"],
     "effect": "allow"},
    {"id": "billing-write", "direction": "outbound", "upstream": "billing", "methods": ["POST", "PUT"],
     "paths": ["/v1/invoices/*"], "when": {"expr": "agent.trust_rank >= trust_levels.internal"}, "effect": "allow"},
    {"id": "crm-read", "direction": "outbound", "upstream": "crm", "methods": ["GET"], "paths": ["/contacts/**"],
     "effect": "allow"},
    {"id": "tools", "direction": "outbound", "upstream": "tools", "mcp": {"tools": ["search", "draft"]},
     "effect": "allow"},
    {"id": "no-admin", "direction": "outbound", "upstream": "billing", "paths": ["/v1/admin/**"], "effect": "deny"},
]
STRICTER = [{"id": "no-puts", "direction": "outbound", "upstream": "billing", "methods": ["PUT"], "effect": "deny"},
            *RULES]


def _event(i: int) -> dict:
    agent = AGENTS[i % len(AGENTS)]
    kind = i % 8
    upstream, method, path, mcp, rule, decision, reason = {
        0: ("billing", "GET", f"/v1/invoices/{i}", None, "billing-read", "allow", "allowed"),
        1: ("billing", "PUT", f"/v1/invoices/{i}", None, "billing-write", "allow", "allowed"),
        2: ("billing", "GET", "/v1/admin/users", None, "no-admin", "deny", "rule_denied"),
        3: ("crm", "GET", f"/contacts/{i}/notes", None, "crm-read", "allow", "allowed"),
        4: ("crm", "DELETE", f"/contacts/{i}", None, "default", "deny", "no_matching_rule"),
        5: ("tools", "POST", "/", ("tools/call", "search"), "tools", "allow", "allowed"),
        6: ("tools", "POST", "/", ("tools/call", "delete_all"), "default", "deny", "no_matching_rule"),
        7: ("nowhere", "GET", "/x", None, None, "deny", "unknown_upstream"),
    }[kind]
    if kind == 1 and agent["trust_level"] == "sandbox":
        rule, decision, reason = "default", "deny", "no_matching_rule"
    task = {"id": f"{i:032x}", "trigger": "support"} if i % 5 == 0 else None
    return {
        "event": "trust_decision", "schema_version": 2, "ts": "2026-12-01T10:00:00.000Z", "decision_id": f"{i:024x}",
        "direction": "outbound", "protocol": "mcp" if mcp else "http", "decision": decision, "reason": reason,
        "rule_id": rule, "policy_version": "0123456789abcdef", "audit": None, "agent": agent, "caller": None,
        "actor_type": "human" if task else "workload",
        "principal": {"iss": "admin", "sub": "alice@example.com"} if task else None,
        "delegation": "asserted" if task else "none", "act_chain": [], "task": task,
        "target": {"upstream": upstream, "method": method, "host": f"{upstream}.example", "path": path,
                   "mcp_method": mcp[0] if mcp else None, "mcp_tool": mcp[1] if mcp else None,
                   "override": None, "copy_source": None, "scheme": "https", "query": "page=2" if kind == 3 else "",
                   "size": 64 if mcp else 0},
        "credential": None, "approval": None, "reason_detail": None, "outcome": "completed", "status": 200,
        "upstream_status": 200, "duration_ms": 1.234, "trace_id": None,
    }


def generate(n: int) -> None:
    """Write n event lines to stdout: 480 distinct ones, cycled."""
    lines = [json.dumps(_event(i)).encode() + b"\n" for i in range(480)]
    out = sys.stdout.buffer
    chunk = b"".join(lines)
    full, rest = divmod(n, len(lines))
    for _ in range(full):
        out.write(chunk)
    out.write(b"".join(itertools.islice(lines, rest)))
    out.flush()


def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config, policy = Path(tmp) / "sidecar.yaml", Path(tmp) / "stricter.yaml"
        config.write_text(yaml.safe_dump({**CONFIG, "state_dir": f"{tmp}/state"}))
        policy.write_text(yaml.safe_dump({"version": 1, "default": "deny", "rules": STRICTER}))
        gen = subprocess.Popen([sys.executable, "-m", "tests.bench.bench_replay", "--generate", str(n)],
                               stdout=subprocess.PIPE)
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "sidecar", "replay", "-c", str(config), "--events", "-",
                                 "--policy", str(policy)], stdin=gen.stdout, capture_output=True, text=True,
                                timeout=3600)
        elapsed = time.perf_counter() - started
        gen.wait(timeout=60)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(result.stdout.strip().splitlines()[0] if result.stdout else result.stderr)
    print(f"exit {result.returncode}; {n} events in {elapsed:.1f} s: {n / elapsed:,.0f} events/s; "
          f"peak RSS of the largest child {peak_kib / 1024:.0f} MiB")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--generate"]:
        generate(int(sys.argv[2]))
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
