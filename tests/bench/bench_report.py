"""``sidecar report`` (and ``sidecar replay``) throughput and peak memory on synthetic events.

Not part of the test run: ``python -m tests.bench.bench_report [N ...]`` (default 100000 and
1000000). Writes N schema-2 trust-decision events to a temporary file (20 agents, four upstreams
one of them MCP, ids in paths, 1 in 20 refused, 1 in 10 for a human's task, a few tools), then runs
each command as its own process and reports events per second of wall time and the process's peak
RSS (``wait4``'s ``ru_maxrss``). Bounded memory shows as a peak RSS that does not grow with N.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import yaml

UPSTREAMS = {"crm": "http", "billing": "http", "search": "http", "tools": "mcp"}
TOOLS = ("search_tickets", "draft_reply", "lookup_order", "refund")
POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "crm-read", "direction": "outbound", "upstream": "crm", "methods": ["GET"], "paths": ["/**"],
     "effect": "allow"},
    {"id": "billing-rw", "direction": "outbound", "upstream": "billing", "methods": ["GET", "POST"],
     "paths": ["/v1/**"], "effect": "allow"},
    {"id": "billing-admin", "direction": "outbound", "upstream": "billing", "paths": ["/v1/admin/**"],
     "effect": "deny"},
    {"id": "search-all", "direction": "outbound", "upstream": "search", "effect": "allow"},
    {"id": "tools-some", "direction": "outbound", "upstream": "tools", "mcp": {"tools": list(TOOLS[:3])},
     "effect": "allow"},
]}


def config(tmp: Path) -> Path:
    (tmp / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    raw = {"agent": {"name": "bench"}, "state_dir": str(tmp / "state"), "policy": {"files": [str(tmp / "policy.yaml")]},
           "outbound": {"upstreams": {n: {"url": f"http://127.0.0.1:9/{n}", **({"protocol": p} if p == "mcp" else {})}
                                      for n, p in UPSTREAMS.items()}}}
    (tmp / "sidecar.yaml").write_text(yaml.safe_dump(raw))
    return tmp / "sidecar.yaml"


def _target(rng: random.Random) -> tuple[dict[str, Any], tuple[str, str]]:
    """A target, its logged decision and reason."""
    upstream = rng.choice(tuple(UPSTREAMS))
    t: dict[str, Any] = {"upstream": upstream, "method": "GET", "host": "127.0.0.1", "path": "/", "mcp_method": None,
                         "mcp_tool": None, "override": None, "copy_source": None, "scheme": "http", "query": "",
                         "size": 0}
    if upstream == "tools":
        tool = rng.choice(TOOLS)
        t.update(method="POST", mcp_method="tools/call", mcp_tool=tool)
        return t, ("allow", "allowed") if tool in TOOLS[:3] else ("deny", "no_matching_rule")
    if upstream == "billing":
        admin = rng.random() < 0.05
        t.update(method=rng.choice(("GET", "POST")), path=f"/v1/{'admin' if admin else 'invoices'}/{rng.randrange(10**6)}")
        return t, ("deny", "rule_denied") if admin else ("allow", "allowed")
    t["path"] = f"/{rng.choice(('accounts', 'contacts', 'notes'))}/{rng.randrange(10**6)}"
    return t, ("allow", "allowed")


def event(rng: random.Random, i: int) -> dict[str, Any]:
    target, (decision, reason) = _target(rng)
    rule = {"crm": "crm-read", "billing": "billing-rw", "search": "search-all", "tools": "tools-some"}[target["upstream"]]
    rule = "billing-admin" if reason == "rule_denied" else "default" if reason == "no_matching_rule" else rule
    human = rng.random() < 0.1
    agent = f"agent-{rng.randrange(20)}"
    return {
        "event": "trust_decision", "schema_version": 2, "ts": f"2026-03-10T{(i // 3600) % 24:02d}:{(i // 60) % 60:02d}:"
        f"{i % 60:02d}.000Z", "decision_id": f"{i:032x}", "direction": "outbound",
        "protocol": "mcp" if target["mcp_method"] else "http", "decision": decision, "reason": reason,
        "rule_id": rule, "policy_version": "bench", "audit": None,
        "agent": {"id": f"spiffe://sidecar.local/agent/{agent}", "name": agent, "environment": "bench", "owner": None,
                  "purpose": None, "trust_level": None, "data_classes": [], "labels": {}},
        "caller": None, "actor_type": "human" if human else "workload",
        "principal": {"iss": "https://idp", "sub": "alice"} if human else None,
        "delegation": "asserted" if human else "none", "act_chain": [],
        "task": {"id": f"{i:032x}", "trigger": "ticket"} if human else None, "target": target, "credential": None,
        "approval": None, "reason_detail": None, "outcome": "completed" if decision == "allow" else "refused",
        "status": 200 if decision == "allow" else 403, "upstream_status": 200 if decision == "allow" else None,
        "duration_ms": 1.0, "trace_id": None,
    }


def write_events(path: Path, n: int) -> None:
    rng = random.Random(18)
    with open(path, "wb") as out:
        for start in range(0, n, 10_000):
            out.write(b"".join(orjson.dumps(event(rng, i)) + b"\n" for i in range(start, min(start + 10_000, n))))


def measure(args: list[str]) -> tuple[float, int, int]:
    """Wall seconds, peak RSS in MiB and exit status of one command run as its own process."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "sidecar", *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    return time.perf_counter() - started, usage.ru_maxrss // 1024, os.waitstatus_to_exitcode(status)


def main(sizes: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cfg = config(tmp)
        print(f"{'command':8} {'events':>9} {'seconds':>8} {'events/s':>9} {'peak RSS MiB':>13} exit")
        for n in sizes:
            events = tmp / f"events-{n}.jsonl"
            write_events(events, n)
            runs = {"report": ["report", "-c", str(cfg), "--events", str(events), "--format", "json",
                               "--out", str(tmp / "report.json")],
                    "replay": ["replay", "-c", str(cfg), "--events", str(events), "--policy", str(tmp / "policy.yaml")]}
            for name, args in runs.items():
                seconds, rss, code = measure(args)
                print(f"{name:8} {n:>9} {seconds:>8.1f} {n / seconds:>9.0f} {rss:>13} {code}")
            events.unlink()


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [100_000, 1_000_000])
