"""``--format html``: one self-contained file, readable offline (no network, fonts or scripts from elsewhere).

Everything is drawn here as inline SVG, so the page shows the same without its script: an access map
per agent (agent -> upstream or caller -> path pattern or tool, edges as wide as their counts) and
the decisions over time (stacked bars). The small inline script only highlights an agent's edges on
hover and records any script error into ``#errors`` (a test reads it from the rendered DOM). Every
string from the events is escaped: an agent-chosen path or tool name is text, never markup.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

from sidecar.report.render import render_text

MAX_LEAVES = 40
ROW = 24
COLUMNS = (10, 250, 520)
NODE_WIDTH = (200, 230, 330)
CHART_W, CHART_H, MAX_BAR = 760, 160, 24
COLOURS = {"allow": "#2e7d32", "deny": "#c62828", "approval_required": "#ef6c00"}

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#1d2430;background:#fafbfc}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 6px}h3{font-size:15px;margin:16px 0 4px}
section.agent{background:#fff;border:1px solid #d8dee4;border-radius:8px;padding:12px 16px;margin:16px 0}
table{border-collapse:collapse;margin:4px 0 8px}td,th{border-bottom:1px solid #eaeef2;padding:2px 10px 2px 0;
text-align:left;vertical-align:top}th{font-weight:600;color:#57606a}
.muted{color:#57606a}.bad{color:#c62828;font-weight:600}.ok{color:#2e7d32;font-weight:600}
svg text{font:12px system-ui,sans-serif;fill:#1d2430}svg .edge{fill:none;stroke:#8fa4bf;stroke-opacity:.7}
svg .node rect{fill:#eef3f8;stroke:#8fa4bf;rx:5}svg .node[data-kind=agent] rect{fill:#dbe9ff;stroke:#3b6fb6}
svg .node[data-kind=leaf] rect{fill:#f6f8fa}svg.map.hot .edge{stroke:#3b6fb6;stroke-opacity:1}
pre{background:#f6f8fa;border:1px solid #d8dee4;border-radius:6px;padding:10px;overflow:auto;font-size:12px}
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px;border-radius:2px}
"""

SCRIPT = """
(function(){
  var errors=document.getElementById('errors');
  window.onerror=function(m){errors.textContent+=String(m)+'\\n';errors.hidden=false;};
  document.querySelectorAll('svg.map').forEach(function(svg){
    svg.addEventListener('mouseenter',function(){svg.classList.add('hot');});
    svg.addEventListener('mouseleave',function(){svg.classList.remove('hot');});
  });
  document.body.setAttribute('data-ready','1');
})();
"""


def render_html(data: dict[str, Any]) -> str:
    period = data["period"]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<meta http-equiv=Content-Security-Policy content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'; img-src data:\">",
        f"<title>sidecar access review</title><style>{CSS}</style></head><body>",
        "<pre id=errors hidden></pre>",
        "<h1>Access review</h1>",
        f"<p class=muted>{data['events']} event(s), {escape(str(period['from'] or '-'))} .. "
        f"{escape(str(period['to'] or '-'))}; policy {escape(_policy(data['policy']))}</p>",
        _proof(data["proof"]),
        "<h2>Decisions over time</h2>", _chart(data["timeline"]),
        "<h2>Agents</h2>", *(_agent(a) for a in data["agents"]),
        "<h2>Suggested least-privilege policy</h2>",
        f"<pre id=suggested-policy>{escape(data['suggested_policy'])}</pre>",
        "<h2>Full text report</h2>", f"<details><summary>show</summary><pre>{escape(render_text(data))}</pre></details>",
        f"<script>{SCRIPT}</script></body></html>",
    ]
    return "\n".join(parts)


def _policy(policy: dict[str, Any]) -> str:
    return f"{policy['version']} ({', '.join(policy['files'])})"


def _proof(proof: dict[str, Any]) -> str:
    verdict = "<span class=ok>holds</span>" if proof["holds"] else "<span class=bad>fails</span>"
    return (f"<p id=proof data-holds={'yes' if proof['holds'] else 'no'}>Suggested policy {verdict}: "
            f"{proof['redecided']} exchange(s) re-decided, {proof['kept']} of {proof['used']} used one(s) unchanged, "
            f"{proof['changed']} changed, {proof['widened']} refused one(s) widened.</p>")


def _agent(a: dict[str, Any]) -> str:
    d = a["decisions"]
    rows = [("exchanges", f"{a['events']}: {d.get('allow', 0)} allowed, {d.get('deny', 0)} denied, "
                          f"{d.get('approval_required', 0)} held"),
            ("human-driven", f"{a['human_share']:.0%}"),
            ("delegation", ", ".join(f"{k} {n}" for k, n in sorted(a["delegation"].items()))),
            ("credentials", ", ".join(f"{c['type']} {c['provider']} ({'standing' if c['standing'] else 'short-lived'})"
                                      f" {c['count']}" for c in a["credentials"]) or "none"),
            ("denials", ", ".join(f"{x['reason']} ({x['rule']}) {x['count']}" for x in a["denials"]) or "none")]
    table = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
    items = "".join(f"<li>{escape(_unused(u))}</li>" for u in a["unused"]) or "<li>nothing</li>"
    return (f"<section class=agent data-agent=\"{escape(a['id'])}\"><h3>{escape(a['name'] or a['id'])} "
            f"<span class=muted>{escape(a['id'])}</span></h3><table>{table}</table>"
            f"<h3>Access map</h3>{_map(a)}<h3>Allowed but never used</h3><ul class=unused>{items}</ul></section>")


def _unused(u: dict[str, Any]) -> str:
    if u["unused"] == "rule":
        return f"rule {u['rule']}: {u['grants']}"
    return f"rule {u['rule']}: " + "; ".join(f"{k} {' '.join(u[k])}" for k in ("methods", "paths", "tools") if u[k])


def _map_edges(a: dict[str, Any]) -> tuple[list[tuple[str, int]], list[tuple[int, str, int]]]:
    """The middle nodes (upstream or caller, count) and the leaves (middle index, label, count)."""
    middle: dict[str, int] = {}
    leaves: list[tuple[int, str, int]] = []
    for g in a["used"]:
        label = g["upstream"] or f"from {g['caller'] or '?'}"
        index = list(middle).index(label) if label in middle else len(middle)
        middle[label] = middle.get(label, 0) + g["count"]
        for method, patterns in g["methods"].items():
            leaves += [(index, f"{method} {p}", n) for p, n in patterns.items()]
        leaves += [(index, f"tool {t}", n) for t, n in g["tools"].items()]
    return list(middle.items()), leaves


def _map(a: dict[str, Any]) -> str:
    middle, leaves = _map_edges(a)
    if not middle:
        return "<p class=muted>no allowed exchange</p>"
    hidden = len(leaves) - MAX_LEAVES
    leaves = sorted(sorted(leaves, key=lambda leaf: -leaf[2])[:MAX_LEAVES], key=lambda leaf: leaf[0])
    height = ROW * max(len(middle), len(leaves), 1) + 12
    top = max(n for _, n in middle)
    out = [f"<svg class=map role=img width={COLUMNS[2] + NODE_WIDTH[2] + 10} height={height} "
           f"aria-label=\"access map of {escape(a['name'] or a['id'])}\">"]
    agent_y = height // 2 - ROW // 2
    for i, (label, n) in enumerate(middle):
        out.append(_edge(COLUMNS[0] + NODE_WIDTH[0], agent_y, COLUMNS[1], _y(i), n, top))
    for i, (parent, label, n) in enumerate(leaves):
        out.append(_edge(COLUMNS[1] + NODE_WIDTH[1], _y(parent), COLUMNS[2], _y(i), n, top))
    out.append(_node("agent", a["name"] or a["id"], a["events"], COLUMNS[0], agent_y, NODE_WIDTH[0]))
    out += [_node("target", label, n, COLUMNS[1], _y(i), NODE_WIDTH[1]) for i, (label, n) in enumerate(middle)]
    out += [_node("leaf", label, n, COLUMNS[2], _y(i), NODE_WIDTH[2]) for i, (_, label, n) in enumerate(leaves)]
    out.append("</svg>")
    if hidden > 0:
        out.append(f"<p class=muted>{hidden} less used pattern(s) not drawn</p>")
    return "".join(out)


def _y(row: int) -> int:
    return 6 + row * ROW


def _edge(x1: int, y1: int, x2: int, y2: int, n: int, top: int) -> str:
    width = 1 + 7 * math.log1p(n) / math.log1p(max(top, 1))
    a, b = y1 + ROW // 2 - 2, y2 + ROW // 2 - 2
    mid = (x1 + x2) // 2
    return (f"<path class=edge data-count={n} stroke-width={width:.1f} "
            f"d=\"M{x1},{a} C{mid},{a} {mid},{b} {x2},{b}\"><title>{n}</title></path>")


def _node(kind: str, label: str, n: int, x: int, y: int, width: int) -> str:
    shown = label if len(label) * 7 < width - 40 else label[:max((width - 40) // 7 - 1, 1)] + "…"
    return (f"<g class=node data-kind={kind} data-label=\"{escape(label)}\" data-count={n}>"
            f"<rect x={x} y={y} width={width} height={ROW - 4}></rect>"
            f"<text x={x + 6} y={y + ROW - 9}>{escape(shown)} <tspan class=muted>({n})</tspan></text>"
            f"<title>{escape(label)}: {n}</title></g>")


def _chart(timeline: dict[str, Any]) -> str:
    rows = timeline["rows"]
    if not rows:
        return "<p class=muted>no timestamps</p>"
    top = max(r["allow"] + r["deny"] + r["approval_required"] for r in rows) or 1
    bar = min(CHART_W / len(rows), MAX_BAR)
    out = [f"<svg id=timeline role=img width={CHART_W} height={CHART_H + 20} aria-label=\"decisions over time\">"]
    for i, r in enumerate(rows):
        y = CHART_H
        for kind in ("allow", "approval_required", "deny"):
            h = CHART_H * r[kind] / top
            if h:
                y -= h
                out.append(f"<rect class=\"bar {kind}\" x={i * bar:.1f} y={y:.1f} width={max(bar - 1, 1):.1f} "
                           f"height={h:.1f} fill=\"{COLOURS[kind]}\"><title>{escape(r['at'])}: {r[kind]} {kind}"
                           f"</title></rect>")
    out.append(f"<text x=0 y={CHART_H + 16}>{escape(rows[0]['at'])}</text>")
    end = max(len(rows) * bar, 300)
    out.append(f"<text x={end:.0f} y={CHART_H + 16} text-anchor=end>{escape(rows[-1]['at'])}</text></svg>")
    legend = "".join(f"<span style=\"background:{c}\"></span>{k}" for k, c in COLOURS.items())
    return "".join(out) + (f"<p class=\"legend muted\">{legend}; {timeline['bucket_seconds']} s per bar, "
                           f"the highest {top} exchange(s)</p>")
