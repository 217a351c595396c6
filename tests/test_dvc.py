"""The DVC pipeline: every stage depends on all the code it runs, so a code change re-runs what it
affects (a missing dependency would let `dvc repro` keep results the current code no longer makes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from .conftest import REPO
from .imports import hivlp_imports

PACKAGE = REPO / "hivlp"


def code_closure(entry: Path) -> set[Path]:
    """The files `entry` runs: itself and every hivlp module reachable through imports."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo.extend(hivlp_imports(f) - seen)
    return seen


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_depends_on_all_the_code_it_runs(stage):
    spec = STAGES[stage]
    command = spec["cmd"].split()[1]
    entry = PACKAGE / "cli" / f"{command}.py"
    deps = [REPO / d for d in spec["deps"]]
    missing = sorted(
        str(f.relative_to(REPO)) for f in code_closure(entry)
        if not any(f == d or d in f.parents for d in deps)
    )
    assert not missing, f"dvc.yaml stage {stage!r} runs code it does not list in deps: {missing}"
