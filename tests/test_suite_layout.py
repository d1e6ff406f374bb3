"""The suite's own layout: tests are filed by behaviour, and a test file is only ever a list of specifications.

Fixtures live in a ``conftest.py`` or ``tests/peers/``, shared setups in ``tests/scenarios/``, helpers
shared within one directory beside it; a test file importing another one would make a fixture's home
an accident of which test came first.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (function-local imports included)."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


def test_no_test_file_imports_another_test_file() -> None:
    """No module under tests/ imports a ``test_*`` module (round-filed review files included)."""
    offenders = {
        f"{path.relative_to(TESTS)} imports {module}"
        for path in TESTS.rglob("*.py")
        for module in imported_modules(path)
        if module.startswith("tests.") and module.rsplit(".", 1)[-1].startswith("test_")
    }
    assert not offenders, sorted(offenders)
    assert not list(TESTS.glob("test_security_review*.py")), "tests are filed by behaviour, not by review round"
