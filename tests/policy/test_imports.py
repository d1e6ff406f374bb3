"""The policy package's imports: no cycle inside it, and nothing from the stages it decides for."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import sidecar

PACKAGE = Path(sidecar.__file__).parent / "policy"
FORBIDDEN = ("sidecar.credentials", "sidecar.forward")  # policy decides; it never fetches or sends


def imported(path: Path) -> Iterator[str]:
    """Every module ``path`` imports, at module level or inside a function (absolute imports only)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path.name}: relative import"
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def graph() -> dict[str, set[str]]:
    modules = {f"sidecar.policy.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: set(imported(path)) for name, path in modules.items()}


def cycle_from(start: str, edges: dict[str, set[str]]) -> list[str] | None:
    """A path of imports from ``start`` back to itself, if there is one."""
    stack, seen = [(start, [start])], set()
    while stack:
        module, path = stack.pop()
        for target in edges.get(module, ()):
            if target == start:
                return [*path, start]
            if target in edges and target not in seen:
                seen.add(target)
                stack.append((target, [*path, target]))
    return None


def test_no_import_cycle_inside_policy() -> None:
    """Facts, CEL, the conditions, the rules and the engine import downwards only."""
    edges = graph()
    cycles = [" -> ".join(c) for m in sorted(edges) if (c := cycle_from(m, edges))]
    assert not cycles


def test_policy_never_imports_credentials_or_forward() -> None:
    """A decision depends on the facts and the rules, not on the stages that act on it."""
    found = sorted((m, i) for m, targets in graph().items() for i in targets if i.startswith(FORBIDDEN))
    assert not found
