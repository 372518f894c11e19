"""Imports go one way: core imports nothing of ours, runtime only core (DESIGN.md section 1)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = {"core": {"core"}, "runtime": {"core", "runtime"}}
OURS = {"core", "compress", "train", "export", "runtime"}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_lies_below_it(package):
    offending = []
    for path in sorted((ROOT / package).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                top = name.split(".")[0]
                if top in OURS and top not in ALLOWED[package]:
                    offending.append(f"{path.name}:{node.lineno} imports {name}")
    assert not offending, offending
