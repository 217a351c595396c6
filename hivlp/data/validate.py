"""Validation of a Karpathy-format dataset before anything trains on it.

Three layers, each catching what the one before cannot:
1. schema: the reader (`hivlp.data.karpathy.read_json`) parses the JSON and checks every entry has
   the fields and types it relies on; a failure there is a `DatasetError` (CLI exit 2) naming the
   file, the entry index and the field;
2. files: every image must exist and fully decode (PIL `load()`; truncated JPEGs raise), checked in
   a thread pool;
3. rules: a great-expectations suite over two tables built from the JSON: the pairs table (one
   row per caption) and an images table (one row per JSON entry, with the file-check results
   as columns), so GE's statistics cover every rule and its per-row offenders
   (`unexpected_index_list`) become problems that name the filename, imgid and sentid.

Warnings (an image with a caption count other than 5) do not fail a dataset; errors do.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageFile
from tqdm import tqdm

from hivlp.errors import DatasetError, UsageError

if TYPE_CHECKING:
    import pandas as pd

# pandas (and the reader, which needs it) is imported inside the functions: the CLI imports this
# module to register its options, and `hivlp --help` must stay fast.

DEFAULT_SPLITS = ("train", "val", "test", "restval")
ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True)
class ValidationLimits:
    """What a sane dataset stays within; every field is a CLI option."""

    allowed_splits: tuple[str, ...] = DEFAULT_SPLITS
    min_words: int = 2
    max_words: int = 100
    max_chars: int = 500
    captions_per_image: int = 5

    def __post_init__(self) -> None:
        if not self.allowed_splits:
            raise UsageError("allowed splits must not be empty (e.g. --splits train,val,test,restval)")
        if self.min_words < 1:
            raise UsageError(f"--min-words must be at least 1, got {self.min_words}")
        if self.max_words < self.min_words:
            raise UsageError(f"--max-words ({self.max_words}) must be >= --min-words ({self.min_words})")
        if self.max_chars < 1:
            raise UsageError(f"--max-chars must be at least 1, got {self.max_chars}")
        if self.captions_per_image < 1:
            raise UsageError(f"--captions-per-image must be at least 1, got {self.captions_per_image}")


@dataclass
class Problem:
    """One finding, named so a person can find the entry and knows what to do about it.

    `sentid` is None for image-level problems (files, duplicates, splits, caption counts).
    """

    kind: str
    severity: str  # ERROR or WARNING
    filename: str
    imgid: int
    sentid: int | None
    message: str
    hint: str
    entry: int  # index in the JSON's "images" list

    def where(self) -> str:
        sentid = f" sentid={self.sentid}" if self.sentid is not None else ""
        return f"{self.filename} imgid={self.imgid}{sentid} images[{self.entry}]"


@dataclass
class ValidationReport:
    """Everything the CLI prints and writes; `ok` is what gates a pipeline."""

    dataset: str
    json_path: str
    image_root: str
    split: str | None
    limits: ValidationLimits
    counts: dict[str, Any]
    problems: list[Problem]
    expectations: dict[str, Any]  # GE statistics plus one entry per expectation
    seconds: dict[str, float]  # load, files, expectations, total (printed; not in the report file)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def problem_counts(self) -> dict[str, dict[str, Any]]:
        """Per kind, in the order problems are listed: severity and count."""
        out: dict[str, dict[str, Any]] = {}
        for p in self.problems:
            entry = out.setdefault(p.kind, {"severity": p.severity, "count": 0})
            entry["count"] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        """The report file's content: a function of the dataset and the limits alone (no timings, paths as
        given), so validating an unchanged dataset rewrites the same bytes (DVC sees no change)."""
        return {
            "dataset": self.dataset,
            "json_path": self.json_path,
            "image_root": self.image_root,
            "split": self.split,
            "ok": self.ok,
            "n_errors": len(self.errors),
            "n_warnings": len(self.warnings),
            "counts": self.counts,
            "limits": {**asdict(self.limits), "allowed_splits": list(self.limits.allowed_splits)},
            "problem_counts": self.problem_counts(),
            "problems": [asdict(p) for p in self.problems],
            "expectations": self.expectations,
        }


# ---------------------------------------------------------------------------------------------
# 2. files


def check_image(path: str) -> tuple[bool, str | None]:
    """(exists, decode error or None). Decodes every pixel: a header-only open misses truncation."""
    if not os.path.isfile(path):
        return False, None
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return True, f"{type(e).__name__}: {e}"
    return True, None


def check_images(
    paths: list[str], workers: int | None = None, progress: bool = True
) -> dict[str, tuple[bool, str | None]]:
    """check_image over unique paths in a thread pool (PIL releases the GIL while decoding).

    Threads decode as fast as processes here (PIL releases the GIL) and
    need no forking of a process that holds pandas and great-expectations.
    """
    unique = list(dict.fromkeys(paths))
    results: dict[str, tuple[bool, str | None]] = {}
    # Truncated files only raise while PIL is not told to pad them; image loaders often set that
    # process-wide, so it is switched off for the check and restored after.
    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with (
            ThreadPoolExecutor(max_workers=workers) as pool,
            tqdm(
                total=len(unique), desc="checking images", unit="img", file=sys.stderr,
                disable=not progress, mininterval=0.5,
            ) as bar,
        ):
            for path, result in zip(unique, pool.map(check_image, unique)):
                results[path] = result
                bar.update(1)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient
    return results


# ---------------------------------------------------------------------------------------------
# 3. rules


def _images_table(data: dict, paths: list[str]) -> pd.DataFrame:
    """One row per JSON entry; `paths` are the reader's (`karpathy.image_paths`), checked to stay
    inside the image root."""
    import pandas as pd

    rows = [
        (i, img["imgid"], img["filename"], path, img["split"], len(img["sentences"]))
        for i, (img, path) in enumerate(zip(data["images"], paths))
    ]
    return pd.DataFrame(rows, columns=["entry", "imgid", "filename", "path", "split", "n_captions"])


def _add_caption_lengths(pairs: pd.DataFrame) -> pd.DataFrame:
    """Derived columns for the length rules; null for blank captions, which have their own rule."""
    text = pairs["caption"].fillna("").astype(str)
    blank = text.str.strip() == ""
    pairs = pairs.copy()
    pairs["caption_words"] = text.str.split().str.len().where(~blank).astype("Int64")
    pairs["caption_chars"] = text.str.len().where(~blank).astype("Int64")
    return pairs


def _short(text: Any, n: int = 60) -> str:
    s = str(text)
    return repr(s if len(s) <= n else s[: n - 3] + "...")


def _entries(rows: pd.DataFrame) -> str:
    return ", ".join(f"images[{e}]" for e in rows["entry"])


def _grouped(rows: pd.DataFrame, key: str, say: Callable[[Any, pd.DataFrame], str]) -> list[str]:
    """One message per row, built from the whole group sharing `key` (all duplicates are offenders)."""
    groups = {k: g for k, g in rows.groupby(key, sort=False)}
    return [say(k, groups[k]) for k in rows[key]]


@dataclass(frozen=True)
class _Rule:
    """One expectation and how to turn its offending rows into problems."""

    name: str  # unique; carried in the expectation's meta to find the rule from its result
    kind: str
    table: str  # "pairs" or "images"
    expectation: Callable[[Any, Any], Any]  # (gx.expectations, Column) -> Expectation
    describe: Callable[[pd.DataFrame], list[str]]  # offending rows -> one message each
    hint: str
    severity: str = ERROR


def _rules(limits: ValidationLimits) -> list[_Rule]:
    lim = limits
    splits = list(lim.allowed_splits)
    return [
        # --- files (images table)
        _Rule("missing_image", "missing_image", "images",
              lambda E, C: E.ExpectColumnValuesToBeInSet(column="file_exists", value_set=[True]),
              lambda r: [f"{p} does not exist" for p in r["path"]],
              "restore the file (e.g. `dvc pull`), fix --image-root or the entry's filepath, "
              "or remove the entry from the JSON"),
        _Rule("corrupt_image", "corrupt_image", "images",
              lambda E, C: E.ExpectColumnValuesToBeInSet(column="file_decodes", value_set=[True]),
              lambda r: [f"{p} does not decode ({e})" for p, e in zip(r["path"], r["decode_error"])],
              "re-download or re-export the image file, or remove the entry from the JSON"),
        # --- images table
        _Rule("duplicate_filename", "duplicate_filename", "images",
              lambda E, C: E.ExpectColumnValuesToBeUnique(column="path"),
              lambda r: _grouped(
                  r, "path", lambda k, g: f"{k} is listed by {len(g)} entries ({_entries(g)})"),
              "merge the entries' captions into one entry and delete the others"),
        _Rule("duplicate_imgid", "duplicate_imgid", "images",
              lambda E, C: E.ExpectColumnValuesToBeUnique(column="imgid"),
              lambda r: _grouped(
                  r, "imgid", lambda k, g: f"imgid {k} is used by {len(g)} entries ({_entries(g)})"),
              "give every image entry its own imgid"),
        _Rule("unknown_split", "unknown_split", "images",
              lambda E, C: E.ExpectColumnValuesToBeInSet(column="split", value_set=splits),
              lambda r: [f"split {s!r} is not one of {', '.join(splits)}" for s in r["split"]],
              f"set the entry's split to one of {', '.join(splits)} (or allow it with --splits)"),
        _Rule("no_captions", "no_captions", "images",
              lambda E, C: E.ExpectColumnValuesToBeBetween(column="n_captions", min_value=1),
              lambda r: ["image has no captions" for _ in range(len(r))],
              "add the image's captions to its 'sentences', or remove the entry"),
        # --- pairs table
        _Rule("null_caption", "empty_caption", "pairs",
              lambda E, C: E.ExpectColumnValuesToNotBeNull(column="caption"),
              lambda r: ["caption is null" for _ in range(len(r))],
              "write the caption in the sentence's 'raw' field, or remove the sentence"),
        _Rule("blank_caption", "empty_caption", "pairs",
              lambda E, C: E.ExpectColumnValuesToMatchRegex(column="caption", regex=r"\S"),
              lambda r: [f"caption is empty or whitespace only: {_short(c)}" for c in r["caption"]],
              "write the caption in the sentence's 'raw' field, or remove the sentence"),
        _Rule("caption_min_words", "caption_too_short", "pairs",
              lambda E, C: E.ExpectColumnValuesToBeBetween(
                  column="caption_words", min_value=lim.min_words),
              lambda r: [f"caption has {w} word(s), minimum {lim.min_words}: {_short(c)}"
                         for w, c in zip(r["caption_words"], r["caption"])],
              "rewrite the caption as a describing sentence, or lower --min-words"),
        _Rule("caption_max_words", "caption_too_long", "pairs",
              lambda E, C: E.ExpectColumnValuesToBeBetween(
                  column="caption_words", max_value=lim.max_words),
              lambda r: [f"caption has {w} words, maximum {lim.max_words}: {_short(c)}"
                         for w, c in zip(r["caption_words"], r["caption"])],
              "shorten the caption to one sentence, or raise --max-words / --max-chars"),
        # Only where the word bound holds, so one overlong caption is one problem.
        _Rule("caption_max_chars", "caption_too_long", "pairs",
              lambda E, C: E.ExpectColumnValuesToBeBetween(
                  column="caption_chars", max_value=lim.max_chars,
                  row_condition=C("caption_words") <= lim.max_words),
              lambda r: [f"caption has {n} characters, maximum {lim.max_chars}: {_short(c)}"
                         for n, c in zip(r["caption_chars"], r["caption"])],
              "shorten the caption to one sentence, or raise --max-words / --max-chars"),
        _Rule("duplicate_sentid", "duplicate_sentid", "pairs",
              lambda E, C: E.ExpectColumnValuesToBeUnique(column="sentid"),
              lambda r: _grouped(r, "sentid", lambda k, g: (
                  f"sentid {k} is used by {len(g)} captions "
                  f"(of {', '.join(dict.fromkeys(g['filename']))})")),
              "give every sentence its own sentid (renumber the sentids)"),
        # --- warnings last
        _Rule("caption_count", "caption_count", "images",
              lambda E, C: E.ExpectColumnValuesToBeBetween(
                  column="n_captions", min_value=lim.captions_per_image, max_value=lim.captions_per_image,
                  row_condition=C("n_captions") > 0),
              lambda r: [f"image has {n} captions, expected {lim.captions_per_image}"
                         for n in r["n_captions"]],
              "check the entry is complete; retrieval metrics assume a fixed count per image "
              "(--captions-per-image sets it)",
              severity=WARNING),
    ]


def _run_suites(
    tables: dict[str, pd.DataFrame], rules: list[_Rule]
) -> tuple[list[Problem], dict[str, Any]]:
    """Run one GE suite per table; turn unexpected rows into problems; return them with GE's stats."""
    import warnings

    # GE logs at INFO and warns about its own deprecations on import: noise to a dataset author.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import great_expectations as gx
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )
        from great_expectations.expectations.row_conditions import Column

    ctx = gx.get_context(
        mode="ephemeral",
        project_config=DataContextConfig(
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False),
            store_backend_defaults=InMemoryStoreBackendDefaults(),
        ),
    )
    source = ctx.data_sources.add_pandas("hivlp")
    by_name = {r.name: r for r in rules}
    problems: dict[str, list[Problem]] = {r.name: [] for r in rules}
    stats = {"evaluated_expectations": 0, "successful_expectations": 0, "unsuccessful_expectations": 0}
    details = []
    for table_name, table in tables.items():
        batch = source.add_dataframe_asset(table_name).add_batch_definition_whole_dataframe("all")
        suite = ctx.suites.add(gx.ExpectationSuite(name=table_name))
        for rule in rules:
            if rule.table == table_name:
                exp = rule.expectation(gx.expectations, Column)
                exp.meta = {"rule": rule.name}
                exp.severity = "warning" if rule.severity == WARNING else "critical"
                suite.add_expectation(exp)
        definition = ctx.validation_definitions.add(
            gx.ValidationDefinition(name=table_name, data=batch, suite=suite)
        )
        result = definition.run(batch_parameters={"dataframe": table}, result_format="COMPLETE")
        for key in stats:
            stats[key] += int(result.statistics[key])
        for r in result.results:
            config = r.expectation_config
            rule = by_name[config.meta["rule"]]
            if r.exception_info.get("raised_exception"):
                raise RuntimeError(
                    f"great-expectations could not evaluate {config.type} on {table_name}."
                    f"{config.kwargs.get('column')}: {r.exception_info.get('exception_message')}"
                )
            details.append({
                "rule": rule.name, "kind": rule.kind, "table": table_name, "type": config.type,
                "column": config.kwargs.get("column"), "severity": rule.severity, "success": bool(r.success),
                "element_count": r.result.get("element_count"),
                "unexpected_count": r.result.get("unexpected_count", 0),
            })
            index = r.result.get("unexpected_index_list") or []
            if not r.success and not index:
                raise RuntimeError(f"great-expectations reported {config.type} failed but named no rows")
            if index:
                problems[rule.name] = _problems(rule, table.loc[index])
    # Rule order, then entry order: problems of one kind stay together.
    ordered = [p for rule in rules for p in problems[rule.name]]
    stats["success_percent"] = (
        100.0 * stats["successful_expectations"] / stats["evaluated_expectations"]
        if stats["evaluated_expectations"] else 100.0
    )
    return ordered, {**stats, "results": details}


def _problems(rule: _Rule, rows: pd.DataFrame) -> list[Problem]:
    rows = rows.sort_values(["entry"] + (["sentid"] if "sentid" in rows else []), kind="stable")
    sentids = rows["sentid"] if "sentid" in rows else [None] * len(rows)
    return [
        Problem(
            kind=rule.kind, severity=rule.severity, filename=str(fn), imgid=int(imgid),
            sentid=None if sid is None else int(sid), message=msg, hint=rule.hint, entry=int(entry),
        )
        for fn, imgid, sid, entry, msg in zip(
            rows["filename"], rows["imgid"], sentids, rows["entry"], rule.describe(rows)
        )
    ]


# ---------------------------------------------------------------------------------------------


def _load(json_path: Path) -> dict:
    from hivlp.data.karpathy import read_json

    data = read_json(json_path)
    if not data["images"]:
        raise DatasetError(f"{json_path}: the 'images' list is empty")
    return data


def validate_dataset(
    json_path: str | Path,
    image_root: str | Path | None = None,
    split: str | None = None,
    workers: int | None = None,
    limits: ValidationLimits | None = None,
    progress: bool = True,
    allow_outside_root: bool = False,
) -> ValidationReport:
    """Validate a Karpathy-format JSON and its image files.

    Raises DatasetError when the JSON is unreadable or malformed, an id is out of range or an image
    path leads outside the image root (unless `allow_outside_root`): then nothing else is checked,
    and no file is opened;
    every other finding is a Problem in the returned report. `split` limits all checks to one split;
    `workers` is the number of image-checking threads (default: the thread pool's own).
    """
    from hivlp.data.karpathy import image_paths, image_root_for, pairs_from_json

    started = time.perf_counter()
    limits = limits or ValidationLimits()
    json_path = Path(json_path)
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    if image_root is not None and not Path(image_root).is_dir():
        raise UsageError(f"--image-root {image_root}: not a folder")
    data = _load(json_path)
    root = image_root_for(json_path, image_root)

    paths = image_paths(data, root, json_path, allow_outside_root)
    images = _images_table(data, paths)
    pairs = pairs_from_json(data, root, json_path, allow_outside_root=True)  # paths checked just above
    # pairs_from_json emits every entry's sentences in order, so the entry index repeats per caption.
    pairs.insert(0, "entry", images["entry"].repeat(images["n_captions"]).to_numpy())
    if split is not None:
        present = sorted(images["split"].unique())
        images = images[images["split"] == split].reset_index(drop=True)
        pairs = pairs[pairs["split"] == split].reset_index(drop=True)
        if images.empty:
            raise UsageError(
                f"{json_path}: no images in split {split!r} (splits present: {', '.join(present)})"
            )
    pairs = _add_caption_lengths(pairs)
    loaded = time.perf_counter()

    checked = check_images(images["path"].tolist(), workers=workers, progress=progress)
    status = [checked[p] for p in images["path"]]
    images["file_exists"] = [exists for exists, _ in status]
    images["decode_error"] = [error for _, error in status]
    # Null (skipped by the rule) where the file is missing: that is missing_image's problem.
    images["file_decodes"] = [error is None if exists else None for exists, error in status]
    files_done = time.perf_counter()

    problems, expectations = _run_suites({"images": images, "pairs": pairs}, _rules(limits))
    done = time.perf_counter()

    counts = {
        "images": len(images),
        "captions": len(pairs),
        "images_per_split": {str(k): int(v) for k, v in images["split"].value_counts(sort=False).items()},
        "captions_per_split": {str(k): int(v) for k, v in pairs["split"].value_counts(sort=False).items()},
        "image_files_checked": len(checked),
    }
    return ValidationReport(
        dataset=str(data.get("dataset") or json_path.stem),
        json_path=str(json_path),
        image_root=str(image_root if image_root is not None else json_path.parent),
        split=split,
        limits=limits,
        counts=counts,
        problems=problems,
        expectations=expectations,
        seconds={
            "load": round(loaded - started, 3),
            "files": round(files_done - loaded, 3),
            "expectations": round(done - files_done, 3),
            "total": round(done - started, 3),
        },
    )


def format_summary(report: ValidationReport, max_examples: int = 5) -> str:
    """The human summary: counts, problems grouped by kind with examples and a fix, then OK/FAILED."""
    c = report.counts
    ge = report.expectations
    scope = f", split {report.split}" if report.split else ""
    lines = [
        f"dataset {report.dataset} ({report.json_path}{scope})",
        f"  images: {c['images']}  captions: {c['captions']}",
    ]
    for s, n in c["images_per_split"].items():
        lines.append(f"  {s}: {n} images, {c['captions_per_split'].get(s, 0)} captions")
    lines.append(
        f"  expectations: {ge['evaluated_expectations']} evaluated, "
        f"{ge['successful_expectations']} successful; "
        f"{c['image_files_checked']} image files checked in {report.seconds.get('files', 0):.1f} s"
    )
    if not report.problems:
        lines.append("no problems found")
    else:
        lines.append(f"problems: {len(report.errors)} error(s), {len(report.warnings)} warning(s)")
        by_kind: dict[str, list[Problem]] = {}
        for p in report.problems:
            by_kind.setdefault(p.kind, []).append(p)
        for kind, group in by_kind.items():
            lines.append(f"{group[0].severity.upper()} {kind}: {len(group)}")
            for p in group[:max_examples]:
                lines.append(f"  - {p.where()}: {p.message}")
            if len(group) > max_examples:
                lines.append(f"  ... and {len(group) - max_examples} more (see the JSON report)")
            lines.append(f"  fix: {group[0].hint}")
    lines.append("OK" if report.ok else "FAILED")
    return "\n".join(lines)


def format_html(report: ValidationReport, max_examples: int = 20) -> str:
    """The report as a standalone HTML page (what the Kubeflow run page shows for `validate`): the
    verdict, counts per split, every great-expectations result, and the problems grouped by kind with
    examples and the fix. Built from the same report as `format_summary` and the JSON file."""
    from hivlp.pages import esc, html_page, html_table

    c, ge = report.counts, report.expectations
    verdict = ('<p class="ok">OK: no errors</p>' if report.ok else
               f'<p class="bad">FAILED: {len(report.errors)} error(s)</p>')
    scope = f", split {report.split}" if report.split else ""
    parts = [
        verdict,
        f'<p class="muted">{esc(report.json_path)}{esc(scope)}; images from {esc(report.image_root)}</p>',
        "<h2>Counts</h2>",
        html_table(["split", "images", "captions"],
                   [(s, n, c["captions_per_split"].get(s, 0)) for s, n in c["images_per_split"].items()]
                   + [("all", c["images"], c["captions"])]),
        f"<p>{c['image_files_checked']} image files opened and fully decoded; "
        f"{len(report.warnings)} warning(s).</p>",
        "<h2>Expectations (great-expectations)</h2>",
        f"<p>{ge['evaluated_expectations']} evaluated, {ge['successful_expectations']} successful, "
        f"{ge['unsuccessful_expectations']} unsuccessful ({ge['success_percent']:.1f}%).</p>",
        html_table(
            ["result", "rule", "table", "expectation", "column", "severity", "rows", "unexpected"],
            [('<span class="ok">pass</span>' if r["success"] else
              f'<span class="{"bad" if r["severity"] == ERROR else "warn"}">fail</span>',
              r["rule"], r["table"], r["type"], r["column"] or "", r["severity"],
              r["element_count"] if r["element_count"] is not None else "", r["unexpected_count"] or 0)
             for r in ge.get("results", [])],
            raw_columns=(0,),
        ),
        "<h2>Problems</h2>",
    ]
    if not report.problems:
        parts.append("<p>No problems found.</p>")
    by_kind: dict[str, list[Problem]] = {}
    for p in report.problems:
        by_kind.setdefault(p.kind, []).append(p)
    for kind, group in by_kind.items():
        cls = "bad" if group[0].severity == ERROR else "warn"
        parts.append(f'<h3><span class="{cls}">{esc(group[0].severity.upper())}</span> {esc(kind)}: {len(group)}</h3>')
        parts.append(f"<p>Fix: {esc(group[0].hint)}</p>")
        parts.append(html_table(["entry", "filename", "imgid", "sentid", "problem"],
                                [(p.entry, p.filename, p.imgid, "" if p.sentid is None else p.sentid, p.message)
                                 for p in group[:max_examples]]))
        if len(group) > max_examples:
            parts.append(f'<p class="muted">... and {len(group) - max_examples} more (see the JSON report)</p>')
    lim = report.limits
    parts += [
        "<h2>Limits</h2>",
        html_table(["limit", "value"], [("allowed splits", ", ".join(lim.allowed_splits)),
                                        ("words per caption", f"{lim.min_words}-{lim.max_words}"),
                                        ("characters per caption", lim.max_chars),
                                        ("captions per image", lim.captions_per_image)]),
    ]
    return html_page(f"Dataset validation: {report.dataset}", "\n".join(parts))


def require_valid(report: dict[str, Any], where: str) -> None:
    """Raise DatasetError, one line naming the error kinds and counts, when a report (`to_dict`) has errors.

    Separate from `validate_dataset` so a pipeline can publish the report first and fail after it: a
    task that fails publishes no artifacts on Kubeflow, and the report is what says what to fix."""
    if report.get("ok"):
        return
    kinds = ", ".join(f"{k} x{v['count']}" for k, v in report.get("problem_counts", {}).items()
                      if v.get("severity") == ERROR)
    raise DatasetError(f"{where}: {report.get('n_errors', '?')} validation error(s) ({kinds}); "
                       "see the validate task's report page for each entry and its fix")
