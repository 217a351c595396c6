"""Tiny real checkpoints for the registry tests: timm's `test_efficientnet` + a 2-layer BERT (the fault
world's towers), 512-d with the usual levels, random weights of different seeds; a val slice of real
Flickr8k images; their evaluations as `hivlp evaluate` writes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .conftest import write_slice
from .faultworld import tiny_text_tower

LEVELS = [32, 64, 128, 256, 512]


def tiny_checkpoint(out: Path, text_tower: Path, seed: int, logit_shift: float = 0.0) -> Path:
    import torch

    from hivlp.config import ModelConfig, RunConfig
    from hivlp.model import create_model, save_checkpoint

    torch.manual_seed(seed)
    cfg = ModelConfig(image_tower="test_efficientnet", image_weights="none", text_tower=str(text_tower),
                      embed_dim=512, levels=LEVELS, head="linear")
    model = create_model(cfg)
    if logit_shift:
        with torch.no_grad():
            model.logit_scale.add_(logit_shift)  # other weights, the same embeddings
    run = RunConfig()
    run.data.max_text_tokens = 16
    return save_checkpoint(model, run, out)


def retemper(src: Path, out: Path, shift: float) -> Path:
    """A copy of checkpoint `src` with its temperature shifted: other weights, the same embeddings."""
    import torch

    from hivlp.model import load_checkpoint, save_checkpoint

    model, cfg = load_checkpoint(src)
    with torch.no_grad():
        model.logit_scale.add_(shift)
    return save_checkpoint(model, cfg, out)


def evaluate_to(ckpt: Path, dataset: Path, out: Path, split: str = "val") -> dict:
    from hivlp.retrieval.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(ckpt, dataset, split=split, coarse_dim=16, shortlist=8, device="cpu",
                                  progress=False)
    out.write_text(json.dumps(metrics))
    return metrics


@dataclass
class Checkpoints:
    root: Path
    dataset: Path
    text_tower: Path
    better: Path
    worse: Path
    tie: Path  # `better` with another temperature: other weights, identical retrieval
    metrics: dict  # name -> metrics.json path
    ar: dict  # name -> full r_mean


def build_checkpoints(root: Path, raw: dict, n_val: int = 16) -> Checkpoints:
    dataset = write_slice(raw, root / "data", n_train=0, n_val=n_val)
    text_tower = tiny_text_tower(root / "tiny-bert")
    found = {}
    for seed in range(6):
        ckpt = tiny_checkpoint(root / f"seed{seed}", text_tower, seed)
        ar = evaluate_to(ckpt, dataset, root / f"seed{seed}.json")["full"]["r_mean"]
        if all(abs(ar - a) > 0.5 for a, _ in found.values()):
            found[seed] = (ar, ckpt)
        if len(found) == 2:
            break
    assert len(found) == 2, "no two seeds with different AR"
    (hi_seed, (hi, better)), (lo_seed, (lo, worse)) = sorted(found.items(), key=lambda kv: -kv[1][0])
    tie = tiny_checkpoint(root / "tie", text_tower, hi_seed, logit_shift=0.25)
    tie_ar = evaluate_to(tie, dataset, root / "tie.json")["full"]["r_mean"]
    return Checkpoints(root, dataset, text_tower, better, worse, tie,
                       {"better": root / f"seed{hi_seed}.json", "worse": root / f"seed{lo_seed}.json",
                        "tie": root / "tie.json"},
                       {"better": hi, "worse": lo, "tie": tie_ar})


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    """Until `url` answers 200; fails (never skips) when the process dies or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def start(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    fh = open(log, "wb")  # noqa: SIM115 (closed with the process)
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"  # the venv's uvicorn, as when activated
    return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PATH": path, **(env or {})},
                            cwd=cwd, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def mlflow_bin() -> str:
    return str(Path(sys.executable).with_name("mlflow"))
