"""The package's layer map (``gateway/__init__.py``) is the truth: every module is on it, and
each imports only from the rows below its own."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import gateway

ROOT = Path(gateway.__file__).parent
MODULES = {p.stem for p in ROOT.glob("*.py")} - {"__init__"}


def rows() -> dict[str, int]:
    """Each module's row: a row lists modules, each followed by two spaces or more."""
    doc = ast.get_docstring(ast.parse((ROOT / "__init__.py").read_text(encoding="utf-8")))
    assert doc is not None
    found: dict[str, int] = {}
    lines = [line.strip() for line in doc.splitlines() if line.startswith("    ")]
    for row, line in enumerate(lines):
        for chunk in re.split(r"\s{2,}", line):
            name = chunk.split(" ")[0]
            if name in MODULES:
                found[name] = row
    return found


def imports(module: str) -> set[str]:
    tree = ast.parse((ROOT / f"{module}.py").read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("gateway."):
                names.add(node.module.split(".")[1])
            elif node.module == "gateway":
                names.update(a.name for a in node.names if a.name in MODULES)
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("gateway."))
    return names - {module}


def test_every_module_is_on_the_map() -> None:
    assert MODULES - set(rows()) == set()


def test_imports_point_down_the_map() -> None:
    row = rows()
    upward = sorted(
        f"{m} (row {row[m]}) imports {i} (row {row[i]})"
        for m in MODULES
        for i in imports(m)
        if row[i] <= row[m]
    )
    assert upward == []


def test_no_module_over_400_lines() -> None:
    long = {m: n for m in MODULES if (n := len((ROOT / f"{m}.py").read_text().splitlines())) > 400}
    assert long == {}
