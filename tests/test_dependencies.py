"""The library does not depend on the corpus job: no module of musicbert/ imports preprocess."""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "musicbert"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_musicbert_never_imports_preprocess():
    files = sorted(LIBRARY.rglob("*.py"))
    assert len(files) > 20
    offenders = {
        str(f.relative_to(LIBRARY.parent)): sorted(m for m in imported_modules(f) if m.split(".")[0] == "preprocess")
        for f in files
    }
    assert {f: m for f, m in offenders.items() if m} == {}
