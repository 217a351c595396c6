"""Lineage: what every MLflow run that trains or evaluates a model records about where it came from.

    git commit        `hivlp.git_commit` and `hivlp.git_dirty` (true when tracked files differ from the
                      commit); "unknown" outside a git checkout
    dataset           an MLflow dataset input (`mlflow.data`, context "training" or "evaluation") per
                      dataset JSON, with its digest: the md5 of the DVC file that tracks the folder
                      holding it (`data.dvc` for `data/...`) when there is one, else the dataset's
                      content digest (`hivlp.data.fingerprint`, sha256 over the JSON and every image)
    resolved config   the run's config as `config.yaml` (credentials scrubbed, see `hivlp.redact`)
    parent run        for fine-tuning, `hivlp.parent_run_id`: the MLflow run that trained the init
                      checkpoint (its meta.json), and `hivlp.parent_weights_sha256`

MLflow stores a dataset digest in 36 characters: a DVC md5 (`<32 hex>.dir`) fits as it is; a content
digest is cut to its first 32 hex digits there, and its full sha256 goes into the input's tags.
"""

from __future__ import annotations

import logging
import os
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hivlp.redact import scrub

log = logging.getLogger(__name__)

DIGEST_FIELD_MAX = 36  # MLflow's dataset digest column


@dataclass(frozen=True)
class GitState:
    commit: str
    dirty: bool | None  # None when unknown

    def tags(self) -> dict[str, str]:
        return {"hivlp.git_commit": self.commit,
                "hivlp.git_dirty": "unknown" if self.dirty is None else str(self.dirty).lower()}


def git_state(where: str | Path | None = None) -> GitState:
    """The commit checked out where the hivlp package lies (else `where`) and whether the tree is dirty."""
    cwd = Path(where) if where is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return GitState("unknown", None)
    status = git("status", "--porcelain", "--untracked-files=no")
    return GitState(commit, None if status is None else bool(status))


@dataclass(frozen=True)
class DatasetVersion:
    path: str
    name: str
    digest: str  # what MLflow stores (at most 36 characters)
    full_digest: str
    source: str  # "dvc:<file>" or "content"

    def tags(self) -> dict[str, str]:
        return {"hivlp.digest": self.full_digest, "hivlp.digest_source": self.source}


def dvc_md5(path: str | Path) -> tuple[str, Path] | None:
    """(md5, DVC file) of the nearest `<folder>.dvc` that tracks a folder holding `path`, if any.

    The path is made absolute without resolving links, so `data/` linked elsewhere still finds the
    `data.dvc` beside the link."""
    p = Path(os.path.abspath(path))
    for folder in [p, *p.parents]:
        dvc_file = folder.parent / f"{folder.name}.dvc"
        if folder.name and dvc_file.is_file():
            try:
                outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
            except (OSError, yaml.YAMLError):
                return None
            for out in outs:
                if isinstance(out, dict) and out.get("path") == folder.name and isinstance(out.get("md5"), str):
                    return out["md5"], dvc_file
            return None
    return None


def dataset_version(path: str | Path) -> DatasetVersion:
    """The dataset's digest: its DVC md5 when a DVC file tracks it, else its content digest."""
    found = dvc_md5(path)
    if found is not None:
        md5, dvc_file = found
        return DatasetVersion(str(path), Path(path).stem, md5[:DIGEST_FIELD_MAX], md5, f"dvc:{dvc_file.name}")
    from hivlp.data.fingerprint import dataset_digest

    d = dataset_digest(path).digest
    return DatasetVersion(str(path), Path(path).stem, d[:32], d, "content")


def log_lineage(
    mlflow: Any,
    datasets: list[str | Path],
    context: str,
    config: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
    parent_weights_sha256: str | None = None,
) -> dict[str, Any]:
    """Record git state, dataset inputs, the resolved config and the parent run on the active run.

    Returns what was recorded (tags and dataset versions) so callers can also write it elsewhere."""
    import mlflow.data
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    tags = git_state().tags()
    if parent_run_id:
        tags["hivlp.parent_run_id"] = parent_run_id
        tags["mlflow.parentRunId"] = parent_run_id
    if parent_weights_sha256:
        tags["hivlp.parent_weights_sha256"] = parent_weights_sha256
    versions = []
    seen = set()
    for ds in datasets:
        if str(ds) in seen:
            continue
        seen.add(str(ds))
        v = dataset_version(ds)
        versions.append(v)
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local file, either way
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(Path(os.path.abspath(ds))))
        dataset = MetaDataset(source, name=v.name, digest=v.digest)
        mlflow.log_input(dataset, context=context, tags=v.tags())
    mlflow.set_tags(tags)
    if config is not None:
        mlflow.log_text(yaml.safe_dump(scrub(config, strip=True), sort_keys=False), "config.yaml")
    return {"tags": tags, "datasets": [v.__dict__ for v in versions]}
