"""What a hivlp module imports, read from its source (module level and inside functions), for the
tests that check the floor order (`test_layout.py`) and DVC's code dependencies (`test_dvc.py`)."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO


def module_file(name: str) -> Path | None:
    """The file of hivlp module `name` (a package's __init__.py), or None for a name in a module."""
    base = REPO.joinpath(*name.split("."))
    for cand in (base / "__init__.py", base.with_suffix(".py")):
        if cand.is_file():
            return cand
    return None


def hivlp_imports(path: Path) -> set[Path]:
    """Files of the hivlp modules `path` imports, with the packages Python runs on the way in."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    files = set()
    for name in names:
        parts = name.split(".")
        if parts[0] != "hivlp":
            continue
        for i in range(1, len(parts) + 1):
            f = module_file(".".join(parts[:i]))
            if f is not None:
                files.add(f)
    return files
