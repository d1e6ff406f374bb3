"""The import rules of docs/ARCHITECTURE.md, checked on the source (issue 15, acceptance).

Every import counts: module level, inside functions, and under ``TYPE_CHECKING`` (a cycle hidden
there is still a cycle a reader has to hold in their head).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "sidecar"

# The stages of a request and what runs them: the foundation and the evidence never reach into them.
STAGES = ("sidecar.pipeline", "sidecar.identity", "sidecar.policy", "sidecar.credentials", "sidecar.forward",
          "sidecar.routing", "sidecar.tasks", "sidecar.revocation", "sidecar.connect", "sidecar.mcp_transport",
          "sidecar.mcp_filter", "sidecar.approvals", "sidecar.runtime", "sidecar.server", "sidecar.http1", "sidecar.app",
          "sidecar.admin", "sidecar.health", "sidecar.inventory",
          "sidecar.fleet")

# (package, prefixes it must never import, why)
NEVER = [
    ("sidecar.policy", ("sidecar.credentials", "sidecar.forward", "sidecar.pipeline", "sidecar.runtime"),
     "policy only decides: it is handed facts and returns a decision"),
    ("sidecar.credentials", ("sidecar.policy", "sidecar.pipeline", "sidecar.forward", "sidecar.runtime"),
     "a provider mints and attaches a credential; it does not decide and does not send"),
    ("sidecar.observe", STAGES, "the evidence records what the stages did; it calls none of them"),
    ("sidecar.config", ("sidecar.pipeline", "sidecar.forward", "sidecar.runtime", "sidecar.app",
                        "sidecar.server", "sidecar.identity", "sidecar.observe"),
     "config is read before anything runs (validate, the schema) and imports no runtime module"),
    ("sidecar.forward", ("sidecar.pipeline", "sidecar.policy", "sidecar.credentials", "sidecar.runtime",
                         "sidecar.app"), "the forwarding leg sends what it is given"),
    ("sidecar.identity", ("sidecar.pipeline", "sidecar.policy", "sidecar.credentials", "sidecar.runtime",
                          "sidecar.app"), "identity says who; it does not decide"),
    ("sidecar.http1", ("sidecar.pipeline", "sidecar.policy", "sidecar.credentials", "sidecar.forward",
                       "sidecar.runtime", "sidecar.app", "sidecar.identity", "sidecar.connect"),
     "a server parses and writes HTTP and hands each request to its handler; it decides nothing"),
    ("sidecar.control", STAGES, "admin and health see the running sidecar through this protocol: it names no stage"),
    ("sidecar.reload", STAGES, "the reload contract sits under the stages that implement it (policy, identity)"),
]
# (package, the only sidecar prefixes it may import)
ONLY = [
    ("sidecar.errors", ()),
    ("sidecar.fields", ("sidecar.errors",)),
    ("sidecar.http", ("sidecar.errors",)),
]


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {_name(p): p for p in ROOT.rglob("*.py")}


def _imported(node: ast.AST, package: str) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*parts, *([node.module] if node.module else [])])
        yield base
        yield from (f"{base}.{alias.name}" for alias in node.names)


@cache
def imports() -> dict[str, frozenset[str]]:
    """Module -> the sidecar modules it imports, anywhere in its source."""
    known = modules()
    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = {t for node in ast.walk(ast.parse(path.read_text())) for t in _imported(node, package)}
        graph[name] = frozenset(t for t in found if t in known and t != name)
    return graph


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph, index, low, stack, on, found = imports(), {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                on.discard(w)
                component.append(w)
            on.discard(v)
            if component:
                found.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_the_sidecar():
    """The checks below would pass vacuously on an empty graph: the pipeline must be seen importing its stages."""
    assert {"sidecar.forward.transport", "sidecar.identity.inbound", "sidecar.runtime"} <= imports()["sidecar.pipeline"]


def test_no_module_of_the_sidecar_is_part_of_an_import_cycle():
    """No cycle anywhere, TYPE_CHECKING and function-local imports included."""
    assert cycles() == []


def test_no_module_of_policy_is_part_of_an_import_cycle():
    """The policy package is already out of every cycle (Facts in policy/facts.py): it stays out."""
    assert [c for c in cycles() if any(_within(m, "sidecar.policy") for m in c)] == []


def test_the_control_plane_is_in_no_import_cycle():
    """admin, health, approvals, inventory and fleet see the sidecar through sidecar.control: none is in a cycle and
    only sidecar.app, which builds them, imports them (issue 15 item 6)."""
    control_side = {"sidecar.app", "sidecar.admin", "sidecar.health", "sidecar.approvals", "sidecar.inventory",
                    "sidecar.fleet", "sidecar.control", "sidecar.reload"}
    assert [cycle for cycle in cycles() if control_side & set(cycle)] == []
    assert sorted(name for name in control_side if "sidecar.app" in imports()[name]) == []


@pytest.mark.parametrize(("package", "never", "why"), NEVER, ids=[p for p, _, _ in NEVER])
def test_a_package_never_imports_what_its_layer_forbids(package: str, never: tuple[str, ...], why: str):
    """Each rule of ARCHITECTURE.md, by package (the reason is the rule's)."""
    broken = sorted(f"{m} -> {t}" for m, targets in imports().items() if _within(m, package)
                    for t in targets if any(_within(t, n) for n in never))
    assert broken == [], why


@pytest.mark.parametrize(("package", "only"), ONLY, ids=[p for p, _ in ONLY])
def test_the_foundation_imports_nothing_above_it(package: str, only: tuple[str, ...]):
    """errors, fields and http sit under everything: they import (almost) nothing of the sidecar."""
    broken = sorted(f"{m} -> {t}" for m, targets in imports().items() if _within(m, package)
                    for t in targets if not _within(t, package) and not any(_within(t, o) for o in only))
    assert broken == []


def test_reading_the_config_loads_no_server_and_no_client():
    """``sidecar validate`` and the schema load the config without aiohttp (nothing of the runtime comes with it)."""
    probe = "import sys, sidecar.config; print(sorted(m for m in ('aiohttp', 'sidecar.app', 'sidecar.pipeline') " \
            "if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
