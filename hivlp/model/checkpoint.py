"""Checkpoints: the one place that says what a checkpoint folder is.

    config.yaml         the full RunConfig, model section resolved (towers, weights, levels)
    model.safetensors   the whole state dict (safetensors: nothing is unpickled on load)
    text_tower/         tokenizer + text architecture config (no weights), so loading reads no package files
    meta.json           written last: format, levels, metrics, provenance, and the sha256 of every file above

`meta.json` marks a complete checkpoint: a folder without it is refused, and so is one whose files no
longer hash to what it records (an edited `config.yaml` as much as swapped weights). `weights_sha256`
(the hash of `model.safetensors`) is the checkpoint's identity everywhere else: exports, indexes and
registered model versions carry it.

A training run's output folder holds more (`resume/`, `history.json`); `CHECKPOINT_FILES` are what a
model is rebuilt from, so copying a checkpoint (`copy_checkpoint`) copies those alone.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

import hivlp
from hivlp.config import RunConfig, config_from_dict, save_config
from hivlp.errors import ConfigError, UsageError
from hivlp.io import (
    apply_umask,
    atomic_dir,
    atomic_write_json,
    new_temp_dir,
    remove_stale_temps,
    sha256_file,
)
from hivlp.model.dual_encoder import DualEncoder, build_model

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "hivlp-checkpoint/2"
# Format 1 recorded the weights' hash alone; such checkpoints still load (with a warning).
_OLD_FORMATS = ("hivlp-checkpoint/1",)
CONFIG = "config.yaml"
WEIGHTS = "model.safetensors"
TEXT_FILES = "text_tower"
META = "meta.json"
CHECKPOINT_FILES = (CONFIG, WEIGHTS, TEXT_FILES, META)
STAGING = "checkpoint"  # publish_checkpoint stages in a temp named after it (`.checkpoint.<writer>.tmp`)
_HASHED = (CONFIG, WEIGHTS, TEXT_FILES)


class CheckpointError(UsageError):
    """A folder is not a usable checkpoint: missing, incomplete, modified or unreadable."""


def _hashed_files(folder: Path) -> dict[str, str]:
    """sha256 of every file a checkpoint is rebuilt from, keyed by its path relative to `folder`."""
    out = {}
    for name in _HASHED:
        p = folder / name
        paths = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p] if p.is_file() else []
        for q in paths:
            out[q.relative_to(folder).as_posix()] = sha256_file(q)
    return out


def save_checkpoint(
    model: DualEncoder,
    run_config: RunConfig,
    out_dir: str | Path,
    metrics: dict | None = None,
    extra_meta: dict | None = None,
) -> Path:
    """Write the checkpoint folder atomically (a crash leaves the previous one, or nothing).

    `extra_meta` adds provenance to meta.json (e.g. the MLflow run id and epoch that produced it).
    """
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        _write_files(model, run_config, tmp, metrics, extra_meta)
    return out


def _write_files(
    model: DualEncoder, run_config: RunConfig, folder: Path, metrics: dict | None, extra_meta: dict | None
) -> None:
    """The checkpoint files into an empty (temp) folder, meta.json last."""
    cfg = copy.deepcopy(run_config)
    cfg.model = copy.deepcopy(model.config)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_config(cfg, folder / CONFIG)
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    apply_umask(folder / WEIGHTS)  # safetensors writes 0600; a checkpoint is as readable as its other files
    model.text_tower.save_files(folder / TEXT_FILES)
    files = _hashed_files(folder)
    atomic_write_json(
        folder / META,
        {
            "format": CHECKPOINT_FORMAT,
            "hivlp_version": hivlp.__version__,
            "levels": list(model.levels),
            "embed_dim": model.embed_dim,
            "image_tower": model.config.image_tower,
            "text_tower": model.config.text_tower,
            "metrics": metrics or {},
            "weights_sha256": files[WEIGHTS],
            "files_sha256": files,
            **(extra_meta or {}),
        },
    )


def read_meta(path: str | Path) -> dict[str, Any]:
    """meta.json of a checkpoint folder; refuses a folder that has none (an incomplete checkpoint)."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(
            f"{p}: checkpoint folder not found; pass the folder written by `hivlp pretrain` / `hivlp finetune`"
        )
    meta_path = p / META
    if not meta_path.is_file():
        raise CheckpointError(
            f"{meta_path} is missing: {p} is not a complete hivlp checkpoint (meta.json is written last, "
            "so its absence means the save did not finish); re-run the training command or use another checkpoint"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({e}); the checkpoint is corrupt, re-create it") from None
    except RecursionError:
        raise CheckpointError(f"{meta_path}: JSON nested too deeply; the checkpoint is corrupt, re-create it") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("weights_sha256"), str):
        raise CheckpointError(f"{meta_path}: no weights_sha256 recorded; the checkpoint is corrupt, re-create it")
    files = meta.get("files_sha256")
    if files is not None and not (
        isinstance(files, dict)
        and all(isinstance(k, str) and isinstance(v, str) and _inside(k) for k, v in files.items())
    ):
        raise CheckpointError(
            f"{meta_path}: files_sha256 must map file names inside the checkpoint to hashes; "
            "the checkpoint is corrupt, re-create it"
        )
    return meta


def _inside(name: str) -> bool:
    """A recorded file name stays inside the checkpoint folder (verification never reads elsewhere)."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


def checkpoint_sha256(path: str | Path) -> str:
    """The checkpoint's identity: the sha256 of its weights, as recorded in meta.json."""
    return str(read_meta(path)["weights_sha256"])


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check every recorded file hash (config, weights, tokenizer); return meta.json's content."""
    p = Path(path)
    meta = read_meta(p)
    missing = [name for name in (CONFIG, WEIGHTS) if not (p / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{p / missing[0]} is missing: {p} is not a complete hivlp checkpoint; re-create or re-download it"
        )
    recorded = meta.get("files_sha256")
    if recorded is None:
        if meta.get("format") not in _OLD_FORMATS:
            raise CheckpointError(f"{p / META}: no files_sha256 recorded; the checkpoint is corrupt, re-create it")
        log.warning("%s: format %s records the weights' hash only (config.yaml is not covered); "
                    "re-save it to get a full integrity check", p, meta.get("format"))
        recorded = {WEIGHTS: meta["weights_sha256"]}
    for name, sha in recorded.items():
        f = p / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: {p} is incomplete; re-create or re-download the checkpoint")
        if sha256_file(f) != sha:
            raise CheckpointError(
                f"{f}: sha256 differs from {p / META}; the checkpoint was modified or is corrupt "
                "(an edited config.yaml counts too): re-create or re-download it"
            )
    if recorded.get(WEIGHTS) != meta["weights_sha256"]:
        raise CheckpointError(f"{p / META}: weights_sha256 and files_sha256 disagree; the checkpoint is corrupt")
    return meta


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[DualEncoder, RunConfig]:
    """Rebuild the model (eval mode, on `device`) and its RunConfig from a verified checkpoint folder."""
    p = Path(path)
    verify_checkpoint(p)
    try:
        raw = yaml.safe_load((p / CONFIG).read_text())
    except yaml.YAMLError as e:
        raise CheckpointError(f"{p / CONFIG}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{p / CONFIG}: expected a mapping of config sections; re-create the checkpoint")
    try:
        cfg = config_from_dict(raw, check_files=False)
    except ConfigError as e:
        raise CheckpointError(f"{p / CONFIG}: {e}; the checkpoint does not fit this hivlp version, re-create it") from None
    text_files = p / TEXT_FILES if (p / TEXT_FILES).is_dir() else None
    model = build_model(cfg.model, load_weights=False, text_files=text_files)
    try:
        state = load_file(str(p / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for foreign or truncated files
        raise CheckpointError(f"{p / WEIGHTS}: not a safetensors file ({e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{p / WEIGHTS} does not match the model in {p / CONFIG}: {e}") from None
    return model.to(device).eval(), cfg


def remove_interrupted_writes(out_dir: str | Path) -> list[Path]:
    """Remove what interrupted checkpoint publishes left in a training's output folder."""
    out = Path(out_dir)
    shutil.rmtree(out / ".checkpoint.tmp", ignore_errors=True)
    return remove_stale_temps(out, STAGING)


def copy_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Copy the files a checkpoint is (not resume state or history) into a new folder `dst`."""
    src, dst = Path(src), Path(dst)
    verify_checkpoint(src)
    dst.mkdir(parents=True)
    for name in CHECKPOINT_FILES:
        s = src / name
        if s.is_dir():
            shutil.copytree(s, dst / name)
        elif s.is_file():
            shutil.copy2(s, dst / name)
    return dst


def publish_checkpoint(
    model: DualEncoder, run_config: RunConfig, out_dir: str | Path, metrics: dict | None = None,
    extra_meta: dict | None = None,
) -> Path:
    """Write a checkpoint into `out_dir`, a folder that holds other things too (a training run's resume
    state and history), replacing the checkpoint files already there.

    The checkpoint is staged whole first; `meta.json` is removed before the swap and moved in last, so
    an interrupted swap leaves a folder that `load_checkpoint` refuses rather than a mix of two.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / ".checkpoint.tmp", ignore_errors=True)  # the staging name of earlier versions
    staging = new_temp_dir(out / STAGING)  # removes what an interrupted publish left
    try:
        _write_files(model, run_config, staging, metrics, extra_meta)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (out / META).unlink(missing_ok=True)
    for name in [n for n in CHECKPOINT_FILES if n != META] + [META]:
        dst = out / name
        if dst.is_dir():
            shutil.rmtree(dst)
        if (staging / name).exists():
            os.replace(staging / name, dst)
    shutil.rmtree(staging, ignore_errors=True)
    return out
