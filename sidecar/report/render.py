"""The report as one JSON-ready mapping (``--format json``) and as text (the default).

:func:`report_data` is the one model: the text and HTML renderings read only from it.
"""

from __future__ import annotations

from typing import Any

from sidecar.report.review import Coverage
from sidecar.report.suggest import Proof
from sidecar.report.usage import AgentUsage, Grant, GrantKey, Usage

SCHEMA = 1


def report_data(usage: Usage, coverage: Coverage, policy_info: dict[str, Any], suggested: str,
                proof: Proof) -> dict[str, Any]:
    return {
        "report_version": SCHEMA,
        "events": usage.events,
        "period": {"from": usage.first_ts, "to": usage.last_ts},
        "policy": policy_info,
        "agents": [_agent(a, coverage) for a in sorted(usage.agents.values(), key=lambda a: (a.name, a.id))],
        "rules_never_matched": [{"rule": r.id, "where": r.where, "effect": r.effect, "shadow": r.shadow}
                                for r in coverage.never_matched(usage.rule_hits)],
        "timeline": {"bucket_seconds": usage.timeline.width,
                     "rows": [{"at": at, "allow": r[0], "deny": r[1], "approval_required": r[2]}
                              for at, r in usage.timeline.rows()]},
        "suggested_policy": suggested,
        "proof": proof.as_dict(),
    }


def _agent(agent: AgentUsage, coverage: Coverage) -> dict[str, Any]:
    standing = sum(n for (_, _, s), n in agent.credentials.items() if s)
    actors = dict(agent.actors)
    return {
        "id": agent.id, "name": agent.name, "environment": agent.environment, "meta": agent.meta,
        "events": agent.events, "decisions": dict(agent.decisions),
        "used": [_grant(k, g) for k, g in sorted(agent.grants.items(), key=lambda kv: -kv[1].count)],
        "credentials": [{"type": t, "provider": p, "standing": s, "count": n}
                        for (t, p, s), n in sorted(agent.credentials.items())],
        "standing": standing, "short_lived": sum(agent.credentials.values()) - standing,
        "denials": [{"reason": reason, "rule": rule, "count": n}
                    for (reason, rule), n in agent.denials.most_common()],
        "actors": actors, "human_share": round(actors.get("human", 0) / agent.events, 4) if agent.events else 0.0,
        "delegation": dict(agent.delegations),
        "tasks": {"events": agent.with_task, "triggers": dict(agent.triggers.most_common())},
        "rules": dict(agent.rules.most_common()),
        "unused": [u.as_dict() for u in coverage.unused_for(agent.id)],
    }


def _grant(key: GrantKey, grant: Grant) -> dict[str, Any]:
    return {
        "direction": key.direction, "upstream": key.upstream, "caller": key.caller, "credential": key.credential,
        "via": "approval" if key.approval else "allow", "kind": "mcp" if key.mcp else "http", "count": grant.count,
        "methods": {m: trie.patterns() for m, trie in sorted(grant.paths.items())},
        "mcp_methods": dict(grant.mcp_methods.most_common()), "tools": dict(grant.tools.most_common()),
        "delegation": dict(grant.delegations),
    }


# -- text -------------------------------------------------------------------------------------


def render_text(data: dict[str, Any]) -> str:
    period = data["period"]
    lines = [f"access review: {data['events']} event(s), {period['from'] or '-'} .. {period['to'] or '-'}"]
    policy = data["policy"]
    lines.append(f"policy: {policy['version']} from {', '.join(policy['files'])}")
    for agent in data["agents"]:
        lines += [""] + _agent_text(agent)
    lines += ["", "rules never matched:"]
    lines += [f"  {r['rule']} ({r['effect']}{', audit' if r['shadow'] else ''}) at {r['where']}"
              for r in data["rules_never_matched"]] or ["  none"]
    lines += ["", *_proof_text(data["proof"]), "", "suggested least-privilege policy:", data["suggested_policy"]]
    return "\n".join(lines)


def _agent_text(a: dict[str, Any]) -> list[str]:
    d = a["decisions"]
    lines = [f"agent {a['name']} ({a['id']}, {a['environment']})" + _meta_text(a["meta"]),
             f"  exchanges: {a['events']}: {d.get('allow', 0)} allowed, {d.get('deny', 0)} denied, "
             f"{d.get('approval_required', 0)} held for approval",
             f"  actors: {_counts(a['actors'])} (human-driven {a['human_share']:.0%}); "
             f"delegation: {_counts(a['delegation'])}; with a task: {a['tasks']['events']}",
             "  used:"]
    lines += [line for g in a["used"] for line in _grant_text(g)] or ["    nothing"]
    lines.append("  credentials:")
    lines += [f"    {c['type']} {c['provider']} ({'standing' if c['standing'] else 'short-lived'}): {c['count']}"
              for c in a["credentials"]] or ["    none"]
    lines.append("  denials:")
    lines += [f"    {x['reason']} (rule {x['rule']}): {x['count']}" for x in a["denials"]] or ["    none"]
    lines.append("  allowed but never used:")
    lines += [_unused_text(u) for u in a["unused"]] or ["    nothing"]
    return lines


def _meta_text(meta: dict[str, Any]) -> str:
    return "" if not meta else " " + ", ".join(f"{k}={v}" for k, v in sorted(meta.items()))


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "-"


def _grant_text(g: dict[str, Any]) -> list[str]:
    where = f"upstream {g['upstream']}" if g["upstream"] else f"inbound from {g['caller'] or '?'}"
    how = [g["kind"]] + (["via approval"] if g["via"] == "approval" else []) + \
        ([f"credential {g['credential']}"] if g["credential"] else [])
    lines = [f"    {where} ({', '.join(how)}): {g['count']}"]
    for method, patterns in g["methods"].items():
        shown = ", ".join(f"{p} ({n})" for p, n in patterns.items()) or "(no path)"
        lines.append(f"      {method} {shown}")
    if g["tools"]:
        lines.append("      tools: " + ", ".join(f"{t} ({n})" for t, n in g["tools"].items()))
    if g["mcp_methods"]:
        lines.append("      mcp methods: " + ", ".join(f"{m} ({n})" for m, n in g["mcp_methods"].items()))
    return lines


def _unused_text(u: dict[str, Any]) -> str:
    if u["unused"] == "rule":
        return f"    rule {u['rule']}: never used ({u['grants']})"
    parts = [f"{k} {' '.join(u[k])}" for k in ("methods", "paths", "tools") if u[k]]
    return f"    rule {u['rule']}: never used: {'; '.join(parts)}"


def _proof_text(proof: dict[str, Any]) -> list[str]:
    verdict = "holds" if proof["holds"] else "FAILS"
    lines = [f"proof ({verdict}): {proof['redecided']} exchange(s) re-decided under the suggested policy with "
             f"PolicySet.decide: {proof['kept']} of {proof['used']} used exchange(s) keep their decision, "
             f"{proof['changed']} change, "
             f"{proof['widened']} refused one(s) would be allowed by a generalized pattern"]
    lines += [f"  not re-decided: {why}: {n}" for why, n in proof["not_redecided"].items()]
    for kind, examples in proof["examples"].items():
        lines += [f"  {kind}: {e}" for e in examples]
    return lines
