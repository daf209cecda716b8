"""The shape of the code base: no function over 80 lines in the package (tests and benchmarks aside).

A function longer than a screen is one nobody holds in their head (issue 15); this keeps it so.
Counted from the `def` line to the last line of its body, decorators excluded, nested functions
counted inside their parent (and on their own).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

MAX_LINES = 80
EXCLUDED = {"tests", "bench", ".venv", ".venv-processor", "build", "demo-out"}


def package_files() -> list[Path]:
    """Every Python file of the repository but the tests', the benchmarks' and virtual environments'."""
    return sorted(
        path
        for path in REPO.rglob("*.py")
        if not EXCLUDED.intersection(path.relative_to(REPO).parts[:1]) and "__pycache__" not in path.parts
    )


def long_functions(limit: int = MAX_LINES) -> list[str]:
    found = []
    for path in package_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_the_check_sees_the_package():
    folders = {path.relative_to(REPO).parts[0] for path in package_files()}
    assert {
        "app",
        "eval",
        "pipeline",
        "student",
        "teachers",
        "corpus",
        "teacher_cache",
        "workflows",
    } <= folders


def test_no_function_is_longer_than_80_lines():
    assert long_functions() == []
