"""Checkpoints: one folder a model can be rebuilt from without the training code or pretrained files.

    config.yaml         the full RunConfig, model section resolved (towers, weights, levels)
    model.safetensors   the whole state dict (safetensors: nothing is unpickled on load)
    text_tower/         tokenizer + text architecture config (no weights), so loading reads no package files
    meta.json           hivlp version, levels, embed_dim, metrics, sha256 of model.safetensors
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

import hivlp
from hivlp.config import RunConfig, config_from_dict, save_config
from hivlp.errors import UsageError
from hivlp.io import atomic_dir, atomic_write_json, sha256_file
from hivlp.model.dual_encoder import DualEncoder, build_model

CHECKPOINT_FORMAT = "hivlp-checkpoint/1"
_REQUIRED = ("config.yaml", "model.safetensors")


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
    cfg = copy.deepcopy(run_config)
    cfg.model = copy.deepcopy(model.config)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        save_config(cfg, tmp / "config.yaml")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.text_tower.save_files(tmp / "text_tower")
        atomic_write_json(
            tmp / "meta.json",
            {
                "format": CHECKPOINT_FORMAT,
                "hivlp_version": hivlp.__version__,
                "levels": list(model.levels),
                "embed_dim": model.embed_dim,
                "image_tower": model.config.image_tower,
                "text_tower": model.config.text_tower,
                "metrics": metrics or {},
                "weights_sha256": sha256_file(tmp / "model.safetensors"),
                **(extra_meta or {}),
            },
        )
    return out


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[DualEncoder, RunConfig]:
    """Rebuild the model (eval mode, on `device`) and its RunConfig from a checkpoint folder."""
    p = Path(path)
    missing = [name for name in _REQUIRED if not (p / name).is_file()]
    if missing:
        raise UsageError(
            f"{p} is not a hivlp checkpoint (missing {', '.join(missing)}); pass the checkpoint folder "
            "written by `hivlp pretrain` / `hivlp finetune`"
        )
    try:
        cfg = config_from_dict(yaml.safe_load((p / "config.yaml").read_text()) or {}, check_files=False)
    except yaml.YAMLError as e:
        raise UsageError(f"{p / 'config.yaml'}: not valid YAML ({e})") from None
    meta_path = p / "meta.json"
    if meta_path.is_file():
        expected = json.loads(meta_path.read_text()).get("weights_sha256")
        if expected and sha256_file(p / "model.safetensors") != expected:
            raise UsageError(
                f"{p / 'model.safetensors'}: sha256 differs from meta.json; the checkpoint is corrupt or "
                "was modified, re-create or re-download it"
            )
    text_files = p / "text_tower" if (p / "text_tower").is_dir() else None
    model = build_model(cfg.model, load_weights=False, text_files=text_files)
    try:
        model.load_state_dict(load_file(str(p / "model.safetensors")), strict=True)
    except RuntimeError as e:
        raise UsageError(f"{p / 'model.safetensors'} does not match the model in config.yaml: {e}") from None
    return model.to(device).eval(), cfg
