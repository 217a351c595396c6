"""The training engine on a real 64-image slice: it learns, resumes exactly, tracks, runs under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hivlp.config import load_config
from hivlp.data.karpathy import load_split
from hivlp.model import load_checkpoint
from hivlp.model.encode import encode_split
from hivlp.retrieval.metrics import recall_metrics
from hivlp.train.trainer import train

from .conftest import REPO


def _cfg(slice_json, cache_dir, *extra):
    return load_config(
        REPO / "configs" / "pretrain.yaml",
        [
            f"data.datasets=[{slice_json}]",
            "model.text_trainable_layers=0",
            "train.batch_size=32",
            "train.warmup_steps=2",
            "train.num_workers=0",
            f"train.cache_dir={cache_dir}",
            "tracking.enabled=false",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("feature-cache")


def _train_r1(model_dir, slice_json) -> float:
    model, _ = load_checkpoint(model_dir)
    split = load_split(slice_json, "train")
    img, txt = encode_split(model, split, 40, num_workers=0, progress=False)
    sims = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
    m = recall_metrics(sims, split.text_to_image)
    return (m["txt_r1"] + m["img_r1"]) / 2


def test_overfits_a_real_slice(slice_json, cache_dir, tmp_path):
    """A few steps on 64 real images: the loss falls and train-slice R@1 rises."""
    before = train(_cfg(slice_json, cache_dir, "train.max_steps=1", "train.lr=1e-9"), tmp_path / "before")
    result = train(_cfg(slice_json, cache_dir, "train.epochs=4", "train.lr=3e-3"), tmp_path / "after")
    losses = result.step_losses
    assert len(losses) == 4 * 10  # 320 captions / 32 per batch, 4 epochs
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    r1_before = _train_r1(before.out_dir, slice_json)
    r1_after = _train_r1(result.out_dir, slice_json)
    assert r1_after > r1_before + 10, (r1_before, r1_after)
    # Validation happened every epoch on the val split, per level.
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert {"full", "dim_32", "dim_64", "coarse_to_fine"} <= set(result.history[-1]["metrics"])


@pytest.mark.parametrize("variant", [(), ("train.image_views=2", "model.temperature_per_level=true")],
                         ids=["plain", "augmented-views+per-level-temperature"])
def test_resume_gives_the_same_weights(slice_json, cache_dir, tmp_path, variant):
    """Stop after 7 steps, resume to 13 (across the epoch boundary): identical weights and losses to an
    uninterrupted 13-step run."""
    extra = ("train.epochs=2", "train.lr=2e-3", *variant)
    straight = train(_cfg(slice_json, cache_dir, *extra, "train.max_steps=13"), tmp_path / "straight")
    interrupted = tmp_path / "interrupted"
    first = train(_cfg(slice_json, cache_dir, *extra, "train.max_steps=7"), interrupted)
    assert len(first.step_losses) == 7
    second = train(_cfg(slice_json, cache_dir, *extra, "train.max_steps=13"), interrupted)
    assert len(second.step_losses) == 6  # continued at step 7, across the epoch boundary
    a = load_file(str(straight.out_dir / "resume" / "model.safetensors"))
    b = load_file(str(interrupted / "resume" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    np.testing.assert_allclose(straight.step_losses[7:], second.step_losses, rtol=0, atol=0)


def test_mlflow_tracks_levels_and_checkpoint(slice_json, cache_dir, tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _cfg(slice_json, cache_dir, "train.epochs=1", "tracking.enabled=true",
               f"tracking.tracking_uri={uri}", f"tracking.artifact_location={(tmp_path / 'art').as_uri()}",
               "tracking.system_metrics=false", "train.log_every=1")
    result = train(cfg, tmp_path / "tracked")
    client = mlflow.MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.data.params["train.batch_size"] == "32"
    for key in ("loss", "loss_d32", "loss_d512", "val_full_r_mean", "val_dim_64_r_mean", "val_coarse_to_fine_r_mean"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(result.run_id, "loss")) == 10
    assert {a.path for a in client.list_artifacts(result.run_id)} >= {"config.yaml", "history.json"}
    # The checkpoint is logged once, as the run's MLflow model (models from code), not as loose files.
    (out,) = run.outputs.model_outputs
    model = client.get_logged_model(out.model_id)
    assert model.tags["hivlp.weights_sha256"] == json.loads((tmp_path / "tracked" / "meta.json").read_text())["weights_sha256"]
    files = mlflow.artifacts.download_artifacts(f"models:/{out.model_id}", dst_path=str(tmp_path / "dl"))
    names = {p.name for p in (Path(files) / "artifacts" / "checkpoint").iterdir()}
    assert {"model.safetensors", "config.yaml", "meta.json"} <= names


def test_finetune_starts_from_the_pretrained_checkpoint(slice_json, cache_dir, tmp_path):
    pre = train(_cfg(slice_json, cache_dir, "train.max_steps=2"), tmp_path / "pre")
    cfg = load_config(REPO / "configs" / "finetune.yaml", [
        f"data.datasets=[{slice_json}]", "model.text_trainable_layers=1", "train.batch_size=32",
        "train.num_workers=0", f"train.cache_dir={cache_dir}", "tracking.enabled=false", "train.max_steps=2"])
    ft = train(cfg, tmp_path / "ft", init=pre.out_dir)
    model, ft_cfg = load_checkpoint(ft.out_dir)
    assert ft_cfg.recipe == "finetune" and ft_cfg.model.text_trainable_layers == 1
    assert ft_cfg.loss.hard_negative_weight > 0
    pre_model, _ = load_checkpoint(pre.out_dir)
    # The heads moved away from the pre-trained weights, the frozen image tower did not.
    assert not torch.equal(model.image_head.state_dict()[next(iter(model.image_head.state_dict()))],
                           pre_model.image_head.state_dict()[next(iter(pre_model.image_head.state_dict()))])
    for (k, a), b in zip(model.image_tower.state_dict().items(), pre_model.image_tower.state_dict().values()):
        assert torch.equal(a, b), k


def test_torchrun_two_cpu_processes(slice_json, cache_dir, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
           "-m", "hivlp", "pretrain", "--config", str(REPO / "configs" / "pretrain.yaml"),
           "--dataset", str(slice_json), "--out", str(out),
           "--set", "model.text_trainable_layers=0", "--set", "train.batch_size=32",
           "--set", "train.max_steps=3", "--set", "train.num_workers=0",
           "--set", f"train.cache_dir={cache_dir}", "--set", "tracking.enabled=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "meta.json").is_file()
    model, _ = load_checkpoint(out)
    assert model.embed_dim == 512


def test_augmented_views_are_cached_reproducibly(slice_json, tmp_path):
    """`train.image_views`: V seeded augmented views per image, [V, N, F]; the same views whatever the
    worker count, different from each other and from the eval view; a second call reads the cache."""
    from hivlp.model import create_model
    from hivlp.train.cache import image_trunk_features

    cfg = _cfg(slice_json, tmp_path)
    model = create_model(cfg.model)
    paths = load_split(slice_json, "train").image_paths[:6]
    cpu = torch.device("cpu")
    views = image_trunk_features(model, paths, tmp_path / "a", cpu, num_workers=0, views=3, seed=7)
    assert views.shape == (3, 6, model.image_tower.feature_dim)
    again = image_trunk_features(model, paths, tmp_path / "b", cpu, num_workers=2, views=3, seed=7)
    assert torch.equal(views, again)
    assert len(list((tmp_path / "a").glob("img-*.safetensors"))) == 1

    def no_recompute(*args, **kwargs):
        raise AssertionError("a cached entry must be read, not recomputed")

    live = model.image_tower.forward_trunk
    model.image_tower.forward_trunk = no_recompute
    assert torch.equal(image_trunk_features(model, paths, tmp_path / "a", cpu, num_workers=0, views=3, seed=7), views)
    model.image_tower.forward_trunk = live
    plain = image_trunk_features(model, paths, tmp_path / "a", cpu, num_workers=0)
    assert plain.shape == (6, model.image_tower.feature_dim)
    assert not torch.allclose(views[0], views[1]) and not torch.allclose(views[0], plain)
    other_seed = image_trunk_features(model, paths, tmp_path / "a", cpu, num_workers=0, views=3, seed=8)
    assert not torch.allclose(other_seed, views)


def test_teacher_distillation_enters_the_loss(slice_json, cache_dir, tmp_path):
    """teacher.text_tower: its caption features are computed once into the cache and add a positive term
    to the training loss (MiniLM stands in for the big teacher to keep the test small)."""
    plain = train(_cfg(slice_json, cache_dir, "train.max_steps=2"), tmp_path / "plain")
    taught = train(_cfg(slice_json, cache_dir, "train.max_steps=2", "teacher.text_tower=package",
                        "teacher.weight=2.0"), tmp_path / "taught")
    entries = list(cache_dir.glob("tch-*.safetensors"))
    assert len(entries) == 1
    assert taught.step_losses[0] > plain.step_losses[0] + 1e-3  # same start, plus the teacher term
    stamp = entries[0].stat().st_mtime_ns
    train(_cfg(slice_json, cache_dir, "train.max_steps=1", "teacher.text_tower=package"), tmp_path / "again")
    assert entries[0].stat().st_mtime_ns == stamp  # reused, not recomputed


def test_identity_leaves_out_an_unused_teacher(slice_json, cache_dir):
    """Runs saved before the teacher section existed keep their identity; a teacher is part of it."""
    from hivlp.train.trainer import identity_fields

    assert not any(k.startswith("teacher.") for k in identity_fields(_cfg(slice_json, cache_dir)))
    taught = identity_fields(_cfg(slice_json, cache_dir, "teacher.text_tower=package-mpnet"))
    assert taught["teacher.text_tower"] == "package-mpnet" and taught["teacher.weight"] == 1.0
