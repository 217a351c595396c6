"""Exact-resume training state: model, optimizer, RNG and position, in safetensors + JSON (no pickle)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hivlp.io import atomic_dir


@dataclass
class Position:
    epoch: int = 0  # epoch in progress
    batch: int = 0  # micro-batches of that epoch already consumed
    step: int = 0  # optimizer steps taken in total
    best_metric: float = float("-inf")
    best_epoch: int = -1


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
    path: str | Path, model: torch.nn.Module, opt: torch.optim.Optimizer, pos: Position
) -> None:
    """Write the resume state folder atomically (a crash mid-write keeps the previous state)."""
    with atomic_dir(path) as tmp:
        model_sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(model_sd, str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(opt)
        rng = {"rng.cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"rng.cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file({**opt_tensors, **rng}, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(
            json.dumps({"position": asdict(pos), "optimizer": opt_meta}, indent=1)
        )


def has_state(path: str | Path) -> bool:
    return (Path(path) / "state.json").is_file()


def load_state(
    path: str | Path, model: torch.nn.Module, opt: torch.optim.Optimizer
) -> Position:
    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    tensors = load_file(str(path / "optimizer.safetensors"))
    opt.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    return Position(**meta["position"])
