"""Exact-resume training state: model, optimizer, RNG and position, in safetensors + JSON (no pickle).

The state also records the run's identity (`run_identity`: every config field that changes the
result, the data's fingerprint, the init checkpoint's weights), so a later run into the same `--out`
resumes only the run it would continue; anything else is refused, naming the differing fields.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hivlp.errors import UsageError
from hivlp.io import apply_umask, atomic_dir, recover_interrupted_swap

# Config fields that say how or where a run executes, not what it computes: they may differ on resume.
# (`train.max_steps` stops a run early; a later run with a larger value continues it.)
NOT_IDENTITY = (
    "tracking.",
    "train.max_steps",
    "train.num_workers",
    "train.log_every",
    "train.save_every_steps",
    "train.cache_dir",
    "train.eval_batch_size",
    "train.device",
    "data.datasets",  # paths: the data's content is compared through its fingerprint instead
    "data.val_dataset",
    "data.image_root",
    "data.allow_outside_root",
)
FRESH_FLAG = "--no-resume"


class ResumeError(UsageError):
    """The saved state in `--out` belongs to another run, or cannot be read back into this one."""


@dataclass
class Position:
    epoch: int = 0  # epoch in progress
    batch: int = 0  # micro-batches of that epoch already consumed
    step: int = 0  # optimizer steps taken in total
    best_metric: float = float("-inf")
    best_epoch: int = -1


def run_identity(flat_config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The fields a resumed run must share with the saved one: the flat config (dotted keys) less
    `NOT_IDENTITY`, plus `extra` (data fingerprints, init weights)."""
    ident = {k: v for k, v in flat_config.items() if not k.startswith(NOT_IDENTITY)}
    ident.update(extra)
    return json.loads(json.dumps(ident))  # as JSON will give it back (tuples -> lists)


def identity_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'field: saved -> current' for every field that differs."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k, "<unset>"), current.get(k, "<unset>")
        if a != b:
            out.append(f"{k}: {_short(a)} -> {_short(b)}")
    return out


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 24 else s[:12] + "..."


def refuse_other_run(out_dir: Path, what: str, diffs: list[str]) -> ResumeError:
    shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
    return ResumeError(
        f"{out_dir} holds {what} with a different config ({shown}); re-run with the same config to resume "
        f"it, pass {FRESH_FLAG} to start afresh and replace it, or choose another --out"
    )


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        if not name.startswith("opt."):
            continue
        _, idx, k = name.split(".", 2)
        state.setdefault(int(idx), {})[k] = t
    for idx, st in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_state(
    path: str | Path, model: torch.nn.Module, opt: torch.optim.Optimizer, pos: Position,
    identity: dict[str, Any] | None = None,
) -> None:
    """Write the resume state folder atomically (a crash mid-write keeps the previous state, and the
    next save removes the crashed one's temp folder)."""
    with atomic_dir(path) as tmp:
        model_sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(model_sd, str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(opt)
        rng = {"rng.cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"rng.cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file({**opt_tensors, **rng}, str(tmp / "optimizer.safetensors"))
        for name in ("model.safetensors", "optimizer.safetensors"):
            apply_umask(tmp / name)  # safetensors writes 0600
        (tmp / "state.json").write_text(
            json.dumps({"position": asdict(pos), "optimizer": opt_meta, "identity": identity}, indent=1)
        )


def has_state(path: str | Path) -> bool:
    recover_interrupted_swap(path)
    return (Path(path) / "state.json").is_file()


def read_identity(path: str | Path) -> dict[str, Any] | None:
    """The identity a saved state recorded (None for states saved before identities were recorded)."""
    meta = _read_meta(Path(path))
    ident = meta.get("identity")
    return ident if isinstance(ident, dict) else None


def _read_meta(path: Path) -> dict:
    f = path / "state.json"
    try:
        meta = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _unreadable(f, f"not readable JSON ({type(e).__name__})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("position"), dict) or "optimizer" not in meta:
        raise _unreadable(f, "not a hivlp resume state")
    return meta


def _unreadable(f: Path, why: str) -> ResumeError:
    return ResumeError(
        f"{f}: the saved resume state cannot be used ({why}); pass {FRESH_FLAG} to start afresh "
        f"(it is replaced), or delete {f.parent}"
    )


def load_state(
    path: str | Path, model: torch.nn.Module, opt: torch.optim.Optimizer
) -> Position:
    """Restore model, optimizer and RNG from a saved state; ResumeError (naming the file) when it is
    unreadable or does not fit this model and optimizer."""
    path = Path(path)
    meta = _read_meta(path)
    try:
        model_state = load_file(str(path / "model.safetensors"))
    except Exception as e:  # missing, truncated, or not safetensors at all (safetensors' own error types)
        raise _unreadable(path / "model.safetensors", f"{type(e).__name__}: {e}") from None
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as e:
        first = " ".join(str(e).split())[:200]
        raise _unreadable(path / "model.safetensors", f"it does not fit the model: {first}") from None
    try:
        tensors = load_file(str(path / "optimizer.safetensors"))
        opt.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
        torch.set_rng_state(tensors["rng.cpu"])
        position = Position(**meta["position"])
    except Exception as e:
        raise _unreadable(path / "optimizer.safetensors", f"{type(e).__name__}: {e}") from None
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    return position
