"""The house's floor order: every import points down (or sideways within a floor, without a circle),
and README's Layout names every module."""

from __future__ import annotations

from .conftest import REPO
from .imports import hivlp_imports

PACKAGE = REPO / "hivlp"

# Floors, bottom up. A module may import its own floor (no circles) and the floors below it.
FLOORS = [
    ["hivlp/__init__.py", "hivlp/errors.py", "hivlp/io.py", "hivlp/device.py", "hivlp/losses.py",
     "hivlp/redact.py", "hivlp/net.py"],
    ["hivlp/config.py", "hivlp/data/", "hivlp/pages.py"],
    ["hivlp/tracking.py", "hivlp/lineage.py", "hivlp/model/"],
    ["hivlp/registry.py", "hivlp/pyfunc_model.py", "hivlp/embeddings/"],
    ["hivlp/retrieval/", "hivlp/gate.py", "hivlp/report.py"],
    ["hivlp/serve/"],
    ["hivlp/train/"],
    ["hivlp/bench/"],
    ["hivlp/cli/", "hivlp/__main__.py"],
]


def _floor(rel: str) -> int:
    for i, members in enumerate(FLOORS):
        if any(rel == m or (m.endswith("/") and rel.startswith(m)) for m in members):
            return i
    raise AssertionError(f"{rel} is on no floor: add it to FLOORS in tests/test_layout.py")


def _modules() -> list[str]:
    return sorted(p.relative_to(REPO).as_posix() for p in PACKAGE.rglob("*.py"))


def test_every_import_points_down_and_no_module_circle():
    graph = {m: {f.relative_to(REPO).as_posix() for f in hivlp_imports(REPO / m)} - {m} for m in _modules()}
    upward = [
        f"{m} (floor {_floor(m)}) imports {d} (floor {_floor(d)})"
        for m, deps in graph.items() for d in deps
        if _floor(d) > _floor(m) and not d.endswith("__init__.py")
    ]
    assert not upward, "imports running up a floor:\n" + "\n".join(upward)

    # No circle between modules (a package's __init__ re-exporting its own modules does not count).
    def edges(m: str) -> set[str]:
        own_pkg = m.rsplit("/", 1)[0] + "/__init__.py"
        return {d for d in graph[m] if d != own_pkg and not (m.endswith("__init__.py") and d.startswith(m[:-11]))}

    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in edges(m):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(d):], d]) if d in path
                                     else f"import circle through {m} -> {d}")
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_readme_layout_names_every_module():
    readme = (REPO / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    missing = [m for m in _modules() if m.rsplit("/", 1)[-1] != "__init__.py" and f"`{m}`" not in layout
               and f"`{m.rsplit('/', 1)[-1]}`" not in layout]
    assert not missing, f"README's Layout does not name: {missing}"
