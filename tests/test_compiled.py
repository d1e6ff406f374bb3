"""The modules setup.py compiles with mypyc (SIDECAR_MYPYC=1) keep to what mypyc can compile faithfully.

mypyc gives each local name one type per function: ``except A as exc`` then ``except B as exc`` compiles,
and the second raises ``TypeError`` when B is caught (seen: a client gone mid-stream became an
internal_error). The interpreter cannot show that, so it is checked here on the source.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compiled() -> list[Path]:
    return [ROOT / m for m in re.findall(r'"(sidecar/[^"]+\.py)"', (ROOT / "setup.py").read_text())]


def test_setup_lists_modules_that_exist() -> None:
    modules = compiled()
    assert modules and all(m.is_file() for m in modules)
    assert ROOT / "sidecar/pipeline.py" in modules


def test_no_except_name_is_bound_to_two_exception_types_in_one_function() -> None:
    reused = []
    for module in compiled():
        for fn in ast.walk(ast.parse(module.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            caught: dict[str, set[str]] = {}
            for node in ast.walk(fn):
                if isinstance(node, ast.ExceptHandler) and node.name and node.type is not None:
                    caught.setdefault(node.name, set()).add(ast.unparse(node.type))
            reused += [f"{module.relative_to(ROOT)}:{fn.name}: {name} {sorted(types)}"
                       for name, types in caught.items() if len(types) > 1]
    assert reused == []
