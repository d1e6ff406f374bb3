"""Policy decision time at 10, 1,000 and 10,000 rules, without and with a CEL condition.

Not part of the test run: ``PYTHONPATH=. python tests/bench/bench_policy.py``. Rules are spread over many
upstreams (20 rules each, four methods, wildcard paths, a few agent and header matchers) plus
two wildcard rules that land in every bucket; the request matches the last rule of its bucket.
Also compares the two CEL engines on compile-once/evaluate-many. Target: <= 10 us median at
10,000 rules without CEL. The machine is noisy: compare figures within one run only.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from sidecar.exchange import AgentInfo
from sidecar.policy.engine import PolicySet, load_policy
from sidecar.policy.facts import Facts

EXPR = 'task.trigger == "support" && request.size < 65536'
METHODS = ("GET", "POST", "PUT", "DELETE")
RULES_PER_UPSTREAM = 20
NOW = datetime(2026, 3, 10, 16, 0, tzinfo=timezone.utc)


def timings(fn: Callable[[], Any], n: int) -> tuple[float, float]:
    """Median and p99 in microseconds over n calls."""
    for _ in range(min(n, 2000)):
        fn()
    samples = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(n):
            start = time.perf_counter_ns()
            fn()
            samples.append(time.perf_counter_ns() - start)
    finally:
        gc.enable()
    samples.sort()
    return statistics.median(samples) / 1000, samples[int(n * 0.99)] / 1000


def make_rules(count: int, with_cel: bool) -> tuple[list[dict[str, Any]], dict[str, str]]:
    upstreams = {f"up-{u}": "http" for u in range(max(1, count // RULES_PER_UPSTREAM))}
    rules: list[dict[str, Any]] = [
        {"id": "no-admin", "direction": "outbound", "effect": "deny", "paths": ["/admin/**"]},
        {"id": "no-delete-all", "direction": "outbound", "effect": "deny", "methods": ["DELETE"],
         "paths": ["/**/all"]},
    ]
    names = list(upstreams)
    for i in range(count - len(rules)):
        up, j = names[i % len(names)], i // len(names)
        rule: dict[str, Any] = {"id": f"r{i}", "direction": "outbound", "upstream": up,
                                "methods": [METHODS[j % 4]], "paths": [f"/v1/res{j}/*", f"/v1/res{j}/**/items"],
                                "effect": "allow"}
        if j % 3 == 0:
            rule["agents"] = ["spiffe://example.org/ns/agents/sa/billing-*"]
        if j % 5 == 0:
            rule["headers"] = {"x-region": ["US", "EU"]}
        rules.append(rule)
    if with_cel:
        target = last_rule_for(rules, names[len(names) // 2])
        target["when"] = {"expr": EXPR}
    return rules, upstreams


def last_rule_for(rules: list[dict[str, Any]], upstream: str) -> dict[str, Any]:
    return [r for r in rules if r.get("upstream") == upstream and r["methods"] == ["GET"]][-1]


def build(count: int, with_cel: bool, tmp: Path) -> tuple[PolicySet, Facts]:
    rules, upstreams = make_rules(count, with_cel)
    path = tmp / f"policy-{count}-{with_cel}.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "default": "deny", "rules": rules}))
    policy = load_policy([path], upstreams=upstreams, credentials={})
    names = list(upstreams)
    target = last_rule_for(rules, names[len(names) // 2])
    facts = Facts(direction="outbound", method="GET", scheme="https", host="svc.internal",
                  path=target["paths"][0].replace("*", "42"), query="", headers={"x-region": ("US",)}, size=512,
                  upstream=target["upstream"],
                  agent=AgentInfo("spiffe://example.org/ns/agents/sa/billing-1", "billing-agent", "production"),
                  delegation="delegated",
                  task_id="t1", task_trigger="support", now=NOW)
    decision = policy.decide(facts)
    assert decision.rule_id == target["id"], (decision, target["id"])
    return policy, facts


def bench_decisions() -> None:
    print(f"{'rules':>7} {'cel':>5} {'bucket':>7} {'median us':>10} {'p99 us':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for count in (10, 1_000, 10_000):
            for with_cel in (False, True):
                policy, facts = build(count, with_cel, Path(tmp))
                bucket = len(policy.rules_for("outbound", facts.upstream, facts.method))
                median, p99 = timings(lambda: policy.decide(facts), 20_000)
                print(f"{count:>7} {'yes' if with_cel else 'no':>5} {bucket:>7} {median:>10.2f} {p99:>8.2f}")


def bench_cel_engines() -> None:
    activation = {"task": {"id": "t1", "trigger": "support"}, "request": {"size": 512}}
    print("\nCEL engines, compile once, evaluate many (task + request.size activation):")
    try:
        import cel

        start = time.perf_counter()
        program = cel.compile(EXPR)
        compile_us = (time.perf_counter() - start) * 1e6
        median, p99 = timings(lambda: program.execute(activation), 20_000)
        print(f"  common-expression-language (cel): compile {compile_us:.0f} us, "
              f"evaluate median {median:.2f} us, p99 {p99:.2f} us")
    except ImportError:
        print("  common-expression-language: not installed")
    try:
        import celpy

        env = celpy.Environment()
        start = time.perf_counter()
        runner = env.program(env.compile(EXPR))
        compile_us = (time.perf_counter() - start) * 1e6
        converted = {k: celpy.json_to_cel(v) for k, v in activation.items()}
        median, p99 = timings(lambda: runner.evaluate({k: celpy.json_to_cel(v) for k, v in activation.items()}), 3_000)
        pre_median, _ = timings(lambda: runner.evaluate(converted), 3_000)
        print(f"  cel-python (celpy): compile {compile_us:.0f} us, evaluate median {median:.2f} us, "
              f"p99 {p99:.2f} us ({pre_median:.2f} us with the activation converted beforehand)")
    except ImportError:
        print("  cel-python: not installed")


if __name__ == "__main__":
    bench_decisions()
    bench_cel_engines()
