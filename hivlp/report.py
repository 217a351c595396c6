"""A run's results as small files that git and DVC keep history of (the `report` stage of `dvc.yaml`).

`outputs/` is git-ignored and holds the big things (checkpoints, caches); these files are committed:

- `metrics/val.json` (a DVC metrics file): the val AR of every nested level (`ar_032` ... `ar_512`,
  zero-padded so DVC's alphabetically sorted columns keep the level order, and first) and of
  coarse-to-fine search (`ar_c2f`); the split's size (`counts`); the six recalls and AR of each level
  (`recall.<level>.<metric>`). Read from `hivlp evaluate`'s metrics JSON. `dvc metrics show`,
  `dvc metrics diff` and `dvc exp show` read it.
- `plots/history.csv` (a DVC plots file): one row per training epoch over the runs given, in order
  (pre-training, then fine-tuning): `epoch` counts on across the runs, `run` and `run_epoch` say
  where the row comes from, then the val AR per level and the full level's R@1 both ways, read from
  each run's `history.json` (what the trainer writes beside its checkpoint every epoch).
- `plots/levels.csv` (a DVC plots file): one row per level (`dim`) of the evaluated checkpoint, its
  seven recall metrics: recall against the embedding size.

Inputs are read, never changed; a missing or malformed input is one line naming the file and field.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from hivlp.errors import UsageError
from hivlp.io import atomic_write_json, atomic_write_text, read_json_file
from hivlp.retrieval.metrics import RECALL_KEYS

METRICS_FILE = "val.json"
HISTORY_PLOT = "history.csv"
LEVELS_PLOT = "levels.csv"
C2F = "c2f"  # the coarse-to-fine row's name in the files written here

_HINT_EVAL = "run `hivlp evaluate` (or `dvc repro evaluate`) first"
_HINT_RUN = "it is written by `hivlp pretrain` / `hivlp finetune` beside the checkpoint"


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{where}: expected a finite number, got {value!r}; the file is not hivlp's output, "
                         "re-create it")
    return float(value)


def _recalls(m: Any, where: str) -> dict[str, float]:
    if not isinstance(m, dict):
        raise UsageError(f"{where}: expected an object with {', '.join(RECALL_KEYS)}; re-create the file")
    missing = [k for k in RECALL_KEYS if k not in m]
    if missing:
        raise UsageError(f"{where}: missing {', '.join(missing)}; re-create the file")
    return {k: round(_number(m[k], f"{where}.{k}"), 2) for k in RECALL_KEYS}


def _levels(metrics: dict, where: str, hint: str = _HINT_EVAL) -> list[int]:
    """The nested levels of a metrics object (its `dim_<d>` keys), ascending."""
    levels = []
    for key in metrics:
        if key.startswith("dim_"):
            if not key[4:].isdigit():
                raise UsageError(f"{where}: level key {key!r} is not dim_<integer>; re-create the file")
            levels.append(int(key[4:]))
    if not levels:
        raise UsageError(f"{where}: no dim_<d> level entries; is it hivlp's output? {hint}")
    return sorted(levels)


def _read_object(path: Path, hint: str, kind: type) -> Any:
    data = read_json_file(path, hint)
    if not isinstance(data, kind):
        raise UsageError(f"{path}: expected a JSON {'object' if kind is dict else 'list'}; {hint}")
    return data


def level_name(d: int) -> str:
    """A level's name in the committed metrics: zero-padded, so DVC's alphabetical columns run 032 ... 512."""
    return f"{d:03d}"


def val_metrics(metrics: dict, where: str = "metrics") -> dict[str, Any]:
    """The committed metrics of one evaluation: AR per level and c2f (top-level keys, so DVC's
    alphabetically sorted columns show them first), the split's size, then all recalls per level."""
    levels = _levels(metrics, where)
    recall: dict[str, Any] = {level_name(d): _recalls(metrics[f"dim_{d}"], f"{where}: dim_{d}") for d in levels}
    if "coarse_to_fine" in metrics:
        recall[C2F] = _recalls(metrics["coarse_to_fine"], f"{where}: coarse_to_fine")
    out: dict[str, Any] = {f"ar_{name}": m["r_mean"] for name, m in recall.items()}
    counts = metrics.get("counts")
    if isinstance(counts, dict):
        out["counts"] = {k: int(_number(counts[k], f"{where}: counts.{k}")) for k in ("images", "texts") if k in counts}
    out["recall"] = recall
    return out


def history_rows(histories: list[tuple[str, str, list]]) -> list[dict[str, Any]]:
    """Rows of the per-epoch plot from (run name, file name, history.json content), in training order."""
    rows: list[dict[str, Any]] = []
    levels: list[int] | None = None
    for run, source, history in histories:
        for i, entry in enumerate(history):
            where = f"{source} entry {i}"
            if not isinstance(entry, dict) or not isinstance(entry.get("metrics"), dict):
                raise UsageError(f"{where}: expected an object with 'metrics'; {_HINT_RUN}")
            m = entry["metrics"]
            lv = _levels(m, where, _HINT_RUN)
            levels = levels or lv
            if lv != levels:
                raise UsageError(f"{where}: levels {lv} differ from the earlier runs' {levels}; "
                                 "report runs of one model only")
            row: dict[str, Any] = {
                "epoch": len(rows) + 1,
                "run": run,
                "run_epoch": int(_number(entry.get("epoch", i + 1), f"{where}: epoch")),
                "step": int(_number(entry.get("step", 0), f"{where}: step")),
                "seconds": _number(entry.get("seconds", 0.0), f"{where}: seconds"),
            }
            for d in lv:
                row[f"ar_{level_name(d)}"] = _recalls(m[f"dim_{d}"], f"{where}: dim_{d}")["r_mean"]
            if "coarse_to_fine" in m:
                row[f"ar_{C2F}"] = _recalls(m["coarse_to_fine"], f"{where}: coarse_to_fine")["r_mean"]
            full = _recalls(m[f"dim_{lv[-1]}"], f"{where}: dim_{lv[-1]}")
            row["txt_r1"], row["img_r1"] = full["txt_r1"], full["img_r1"]
            rows.append(row)
    return rows


def level_rows(metrics: dict, where: str = "metrics") -> list[dict[str, Any]]:
    """Rows of the recall-by-dimension plot: one per nested level."""
    return [{"dim": d, **_recalls(metrics[f"dim_{d}"], f"{where}: dim_{d}")} for d in _levels(metrics, where)]


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    columns = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_report(
    metrics_json: str | Path,
    histories: list[str | Path],
    metrics_dir: str | Path = "metrics",
    plots_dir: str | Path = "plots",
) -> dict[str, Path]:
    """Write metrics/val.json, plots/history.csv and plots/levels.csv from an evaluation's metrics JSON
    and the runs' history.json files (each named after its folder: outputs/pretrain -> pretrain).
    Everything is read and checked before anything is written. Returns the paths written."""
    src = Path(metrics_json)
    metrics = _read_object(src, _HINT_EVAL, dict)
    committed = val_metrics(metrics, str(src))
    levels = level_rows(metrics, str(src))
    runs = []
    for h in histories:
        p = Path(h)
        runs.append((p.parent.name or str(p), str(p), _read_object(p, _HINT_RUN, list)))
    history = history_rows(runs)
    if not history:
        raise UsageError(f"{', '.join(map(str, histories)) or 'no history.json given'}: no epoch recorded; "
                         "pass the history.json of at least one finished run")
    out = {
        "metrics": Path(metrics_dir) / METRICS_FILE,
        "history": Path(plots_dir) / HISTORY_PLOT,
        "levels": Path(plots_dir) / LEVELS_PLOT,
    }
    for p in out.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out["metrics"], committed)
    atomic_write_text(out["history"], _csv(history))
    atomic_write_text(out["levels"], _csv(levels))
    return out
