"""One training engine; pre-training and fine-tuning are two recipes (configs) over it.

Per epoch: shuffled batches of (image, caption) pairs -> multi-level contrastive loss -> AdamW with
warmup + cosine, gradient clipping and accumulation; then validation R@K/AR per level on the val
split; the best checkpoint (by full-dimension val AR) is published at `out_dir`. The resume state
(`out_dir/resume/`) makes an interrupted run continue exactly where it stopped.

`out_dir` is checked before any work: a saved state (or a published checkpoint) of a run with another
identity (config fields that change the result, the data's content, the init checkpoint) is refused,
naming the differing fields; a finished run with the same identity is not run again. `resume=False`
(`--no-resume`) starts afresh and replaces what is there.

On CPU (or whenever `train.cache_features` is on) the frozen trunk of both towers runs once and is
cached on disk; each epoch then runs only the trainable top. Without the cache (GPU), images are
decoded and augmented every epoch and the towers run whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from hivlp.config import RunConfig
from hivlp.data.images import files_fingerprint
from hivlp.data.karpathy import RetrievalSplit, load_split, read_pairs, retrieval_split
from hivlp.errors import ConfigError
from hivlp.io import atomic_write_json, check_output_dir, remove_stale_temps
from hivlp.losses import HierarchicalContrastiveLoss
from hivlp.model import create_model
from hivlp.model.checkpoint import (
    META,
    load_checkpoint,
    publish_checkpoint,
    read_meta,
    remove_interrupted_writes,
)
from hivlp.retrieval.evaluate import evaluate_embeddings, format_table
from hivlp.tracking import RunTracker
from hivlp.train import distributed as D
from hivlp.train.cache import TextFeatures, image_trunk_features, text_trunk_features
from hivlp.train.state import (
    Position,
    ResumeError,
    has_state,
    identity_diff,
    load_state,
    read_identity,
    refuse_other_run,
    run_identity,
    save_state,
)
from hivlp.train.teacher import teacher_caption_features

log = logging.getLogger(__name__)

RESUME_DIR = "resume"


# ---------------------------------------------------------------------------------------------
# Data


def load_train_data(cfg: RunConfig) -> RetrievalSplit:
    """The train split of every corpus in `data.datasets`, concatenated (image indices offset)."""
    parts = []
    for ds in cfg.data.datasets:
        pairs = read_pairs(ds, cfg.data.image_root, cfg.data.train_split, cfg.data.allow_outside_root)
        if pairs.empty:
            raise ConfigError(f"data.datasets: {ds} has no captions in split {cfg.data.train_split!r}")
        parts.append(retrieval_split(pairs, cfg.data.limit_train_images))
    if len(parts) == 1:
        return parts[0]
    offset, t2i = 0, []
    for p in parts:
        t2i.append(p.text_to_image + offset)
        offset += p.n_images
    return RetrievalSplit(
        image_paths=sum((p.image_paths for p in parts), []),
        filenames=sum((p.filenames for p in parts), []),
        imgids=sum((p.imgids for p in parts), []),
        captions=sum((p.captions for p in parts), []),
        sentids=sum((p.sentids for p in parts), []),
        text_to_image=np.concatenate(t2i),
    )


def load_val_data(cfg: RunConfig) -> RetrievalSplit:
    ds = cfg.data.val_dataset or cfg.data.datasets[0]
    return load_split(ds, cfg.data.val_split, cfg.data.image_root, cfg.data.limit_val_images,
                      cfg.data.allow_outside_root)


def data_fingerprint(data: RetrievalSplit) -> str:
    """What a split trains or validates on, by content: image file names with each file's size and
    mtime, captions, and which caption belongs to which image (not where the dataset lies)."""
    h = hashlib.sha256(json.dumps([data.filenames, data.captions, data.text_to_image.tolist()]).encode())
    h.update(files_fingerprint(data.image_paths, with_paths=False).encode())
    return h.hexdigest()


def epoch_order(data: RetrievalSplit, unit: str, seed: int, epoch: int) -> np.ndarray:
    """Caption indices of one epoch; a pure function of (seed, epoch), so resume replays it exactly."""
    rng = np.random.default_rng([seed, epoch])
    if unit == "caption":
        return rng.permutation(data.n_texts)
    # One random caption per image, images in random order.
    by_image: list[list[int]] = [[] for _ in range(data.n_images)]
    for t, i in enumerate(data.text_to_image):
        by_image[i].append(t)
    picks = np.array([c[rng.integers(len(c))] for c in by_image if c])
    return picks[rng.permutation(len(picks))]


# ---------------------------------------------------------------------------------------------
# Model step


class _Step(nn.Module):
    """What DDP wraps: one forward from trunk features (cached) or from raw inputs (uncached)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_in, text_in, text_mask, from_trunk: bool):
        m = self.model
        if from_trunk:
            return m.encode_image_from_trunk(image_in), m.encode_text_from_trunk(text_in, text_mask)
        return m.encode_image(image_in), m.encode_text(text_in, text_mask)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup then cosine decay to `min_ratio`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(model, cfg: RunConfig) -> torch.optim.Optimizer:
    groups = model.trainable_parameters()
    t = cfg.train
    param_groups = []
    for name, lr in (("head", t.lr), ("towers", t.tower_lr)):
        params = [p for p in groups.get(name, []) if p.requires_grad]
        if not params:
            continue
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        if decay:
            param_groups.append({"params": decay, "lr": lr, "base_lr": lr, "weight_decay": t.weight_decay, "name": f"{name}_decay"})
        if no_decay:
            param_groups.append({"params": no_decay, "lr": lr, "base_lr": lr, "weight_decay": 0.0, "name": f"{name}_no_decay"})
    if not param_groups:
        raise ConfigError("nothing to train: no trainable parameters (check model.* trainable settings)")
    return torch.optim.AdamW(param_groups, betas=(0.9, 0.98), eps=1e-6)


# ---------------------------------------------------------------------------------------------
# Validation metrics of the val split during training


@torch.no_grad()
def _embed_from_cache(model, img_feats: torch.Tensor, txt: TextFeatures, device, batch: int):
    model.eval()
    img = [model.encode_image_from_trunk(img_feats[i : i + batch].float().to(device)).float().cpu()
           for i in range(0, len(img_feats), batch)]
    tx = [model.encode_text_from_trunk(txt.features[i : i + batch].float().to(device),
                                       txt.mask[i : i + batch].long().to(device)).float().cpu()
          for i in range(0, len(txt.features), batch)]
    return torch.cat(img).numpy(), torch.cat(tx).numpy()


def val_metrics(model, cfg: RunConfig, val: RetrievalSplit, cache, device) -> dict:
    """Per-level val metrics (the model's own levels + coarse-to-fine)."""
    if cache is not None:
        img, txt = _embed_from_cache(model, cache[0], cache[1], device, cfg.train.eval_batch_size)
    else:
        from hivlp.model.encode import encode_split

        model.eval()
        img, txt = encode_split(model, val, cfg.data.max_text_tokens, device=device)
    return evaluate_embeddings(
        img, txt, val.text_to_image, model.levels,
        coarse_dim=cfg.train.eval_coarse_dim, shortlist=cfg.train.eval_shortlist,
    )


def _flat_val_metrics(metrics: dict) -> dict[str, float]:
    out = {}
    for level, vals in metrics.items():
        if not isinstance(vals, dict):
            continue
        for k, v in vals.items():
            if k in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"):
                out[f"val_{level}_{k}"] = float(v)
    return out


# ---------------------------------------------------------------------------------------------
# The engine


@dataclass
class TrainResult:
    out_dir: Path
    best_metric: float
    best_epoch: int
    history: list[dict]
    seconds: float
    run_id: str | None
    step_losses: list[float]  # total loss at every optimizer step of this process (rank 0's view)


def run_recipe(
    config: str | Path,
    out_dir: str | Path,
    recipe: str,
    datasets: list[str] | None = None,
    image_root: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    init: str | Path | None = None,
    resume: bool = True,
    keep_resume_state: bool = True,
) -> TrainResult:
    """Load a recipe YAML with the usual overrides (datasets, image root, `key=value`s) and train.

    The one entry point of the CLI, the KFP components and anything else that starts a recipe.
    `keep_resume_state=False` drops the optimizer state afterwards (a pipeline's model artifact
    is the checkpoint alone).
    """
    from hivlp.config import load_config

    sets = [f"recipe={recipe}", *overrides]
    if datasets:
        sets.append(f"data.datasets={json.dumps([str(d) for d in datasets])}")
    if image_root:
        sets.append(f"data.image_root={json.dumps(str(image_root))}")
    result = train(load_config(config, sets), out_dir, init=init, resume=resume)
    if not keep_resume_state:
        shutil.rmtree(Path(out_dir) / RESUME_DIR, ignore_errors=True)
    return result


def train(cfg: RunConfig, out_dir: str | Path, init: str | Path | None = None, resume: bool = True) -> TrainResult:
    """Run a recipe. `init` (fine-tuning) is a checkpoint folder whose weights start the run."""
    t0 = time.time()
    out_dir = check_output_dir(out_dir, "--out")
    info = D.init_distributed(cfg.train.device)
    device = info.device
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)

    # Model: fresh (pre-training) or from a checkpoint (fine-tuning: its architecture, this run's depth).
    init_sha = init_run = None
    if init is not None:
        model, init_cfg = load_checkpoint(init, device="cpu")
        init_meta = read_meta(init)
        init_sha, init_run = init_meta["weights_sha256"], init_meta.get("mlflow_run_id")
        cfg = replace(cfg, model=replace(
            init_cfg.model,
            image_trainable_blocks=cfg.model.image_trainable_blocks,
            text_trainable_layers=cfg.model.text_trainable_layers,
            learn_temperature=cfg.model.learn_temperature,
            image_frozen_bn=cfg.model.image_frozen_bn,
            image_tta_flip=cfg.model.image_tta_flip,
        ))
        model.config = cfg.model  # one config object, as in the fresh branch
    else:
        model = create_model(cfg.model)
        cfg = replace(cfg, model=model.config)
    model.set_trainable(cfg.model.image_trainable_blocks, cfg.model.text_trainable_layers)
    model.logit_scale.requires_grad_(cfg.model.learn_temperature)
    model.to(device)

    train_data = load_train_data(cfg)
    val_data = load_val_data(cfg)
    use_cache = cfg.train.cache_features
    identity = run_identity(identity_fields(cfg), **{
        "data.train_fingerprint": data_fingerprint(train_data),
        "data.val_fingerprint": data_fingerprint(val_data),
        "init.weights_sha256": init_sha,
    })

    # What --out holds decides, before any work, whether this run resumes, is already done, or is refused.
    resume_dir = out_dir / RESUME_DIR
    opt = _optimizer(model, cfg)
    pos = Position()
    if info.is_main and out_dir.is_dir():
        remove_interrupted_writes(out_dir)
        removed = remove_stale_temps(out_dir, RESUME_DIR)
        if removed:
            log.info("removed %d temporary folder(s) of an interrupted save in %s", len(removed), out_dir)
    if not resume:
        if info.is_main and resume_dir.exists():
            shutil.rmtree(resume_dir)  # --no-resume: this run replaces the saved one
    elif has_state(resume_dir):
        saved = read_identity(resume_dir)
        if saved is None:
            log.warning("%s was saved before runs recorded their config; resuming without checking it", resume_dir)
        elif diffs := identity_diff(saved, identity):
            raise refuse_other_run(out_dir, "the saved state of a run", diffs)
        pos = load_state(resume_dir, model, opt)
        log.info("resuming from %s: epoch %d, batch %d, step %d", resume_dir, pos.epoch, pos.batch, pos.step)
    elif (out_dir / META).is_file():
        saved = read_meta(out_dir).get("run_identity")
        if isinstance(saved, dict) and (diffs := identity_diff(saved, identity)):
            raise refuse_other_run(out_dir, "the checkpoint of a run", diffs)
    history: list[dict] = _read_history(out_dir) if pos.step else []
    t = cfg.train
    if pos.step and (pos.epoch >= t.epochs or (t.max_steps is not None and pos.step >= t.max_steps)):
        # The same run, already done: report it and leave everything (checkpoint, MLflow) as it is.
        log.info("%s: this run is already finished (epoch %d, step %d); nothing to do "
                 "(pass --no-resume to train it again from scratch)", out_dir, pos.epoch, pos.step)
        run_id = read_meta(out_dir).get("mlflow_run_id") if (out_dir / META).is_file() else None
        D.shutdown(info)
        return TrainResult(out_dir, pos.best_metric, pos.best_epoch, history, time.time() - t0, run_id, [])

    # Feature cache: rank 0 computes, the others wait and read it.
    train_cache = val_cache = None
    if use_cache:
        if info.is_main:
            train_cache, val_cache = _build_caches(model, cfg, train_data, val_data, device)
        D.barrier(info)
        if not info.is_main:
            train_cache, val_cache = _build_caches(model, cfg, train_data, val_data, device)

    # Teacher caption features (distillation): computed once and cached by content, like the trunk cache.
    # Rank 0 computes, the others wait and read the cache entry.
    def _teacher():
        return teacher_caption_features(cfg.teacher, train_data.captions, t.cache_dir, device, cfg.data.max_text_tokens)

    teacher = _teacher() if info.is_main else None
    D.barrier(info)
    if not info.is_main:
        teacher = _teacher()
    if teacher is not None and len(teacher) != len(train_data.captions):
        raise ConfigError(f"teacher.features: {len(teacher)} rows for {len(train_data.captions)} train captions")
    loss_fn = HierarchicalContrastiveLoss(
        model.levels, cfg.loss.level_weights, cfg.loss.hard_negative_weight, cfg.loss.hard_negative_margin,
        cfg.loss.distill_weight, cfg.loss.hard_negative_levels,
        cfg.teacher.weight if teacher is not None else 0.0, cfg.teacher.temperature,
    )
    step_module: nn.Module = _Step(model)
    if info.enabled:
        step_module = DDP(step_module, device_ids=[device.index] if device.type == "cuda" else None)

    n_pairs = len(epoch_order(train_data, t.epoch_unit, t.seed, 0))
    # Each rank embeds its slice of every global batch of t.batch_size pairs; the loss is taken over the
    # whole global batch (see _micro_step), so N processes train the objective of one.
    batches_per_epoch = math.ceil(n_pairs / t.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / t.grad_accum)
    total_steps = steps_per_epoch * t.epochs

    out_dir.mkdir(parents=True, exist_ok=True)

    amp = t.amp and device.type == "cuda"
    train_transform = None if use_cache else model.image_tower.transform(train=True)
    tracker = RunTracker(cfg, enabled=info.is_main, parent_run_id=init_run, parent_weights_sha256=init_sha)
    stopped = False
    step_losses: list[float] = []
    with tracker:
        tracker.set_tags({"hivlp.init": init or "", "hivlp.world_size": info.world_size,
                          "hivlp.cache_features": use_cache, "hivlp.resumed_at_step": pos.step})
        try:
            while pos.epoch < t.epochs and not stopped:
                order = epoch_order(train_data, t.epoch_unit, t.seed, pos.epoch)
                views = epoch_views(train_data.n_texts, t.image_views, t.seed, pos.epoch) if use_cache else None
                model.train()
                loader = _batches(order, t.batch_size, pos.batch)
                bar = tqdm(loader, total=batches_per_epoch, initial=pos.batch, desc=f"{cfg.recipe} epoch {pos.epoch + 1}/{t.epochs}",
                           unit="batch", disable=not info.is_main)
                for b_idx, global_batch in bar:
                    losses = _micro_step(step_module, model, loss_fn, global_batch, info, train_data, train_cache,
                                         train_transform, cfg.data.max_text_tokens, device, amp, t.grad_accum,
                                         views, teacher)
                    pos.batch = b_idx + 1
                    end_of_epoch = pos.batch == batches_per_epoch
                    if pos.batch % t.grad_accum and not end_of_epoch:
                        continue
                    factor = lr_factor(pos.step, total_steps, t.warmup_steps, t.min_lr_ratio)
                    for g in opt.param_groups:
                        g["lr"] = g["base_lr"] * factor
                    if t.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], t.grad_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    pos.step += 1
                    step_losses.append(losses["loss"])
                    if info.is_main and (pos.step % t.log_every == 0 or pos.step == 1):
                        scales = model.logit_scale.detach().exp().reshape(-1).tolist()
                        temps = ({"logit_scale": scales[0]} if len(scales) == 1 else
                                 {f"logit_scale_d{d}": v for d, v in zip(model.levels, scales)})
                        tracker.log_metrics({**losses, "lr": opt.param_groups[0]["lr"], **temps}, step=pos.step)
                        bar.set_postfix(loss=f"{losses['loss']:.3f}", T=f"{1 / scales[-1]:.3f}")
                    if t.save_every_steps and pos.step % t.save_every_steps == 0 and info.is_main:
                        save_state(resume_dir, model, opt, pos, identity)
                    if t.max_steps is not None and pos.step >= t.max_steps:
                        stopped = True
                        break
                bar.close()
                if pos.batch >= batches_per_epoch:
                    _end_epoch(model, cfg, val_data, val_cache, device, info, tracker, out_dir, pos, history, t0, identity)
                    pos.epoch += 1
                    pos.batch = 0
                if info.is_main:
                    save_state(resume_dir, model, opt, pos, identity)
        except KeyboardInterrupt:
            if info.is_main:
                save_state(resume_dir, model, opt, pos, identity)
                log.warning("interrupted: resume state saved at %s (step %d); re-run the same command to continue",
                            resume_dir, pos.step)
            raise
        D.barrier(info)
        if info.is_main and pos.best_epoch < 0:
            # Stopped before any epoch ended (max_steps): still publish what there is, validated.
            metrics = val_metrics(model, cfg, val_data, val_cache, device)
            publish_checkpoint(model, cfg, out_dir, metrics, _provenance(tracker, cfg, pos, identity))
            pos.best_metric = metrics["full"]["r_mean"]
        if info.is_main and cfg.tracking.log_checkpoint:
            _log_checkpoint(tracker, out_dir)
        elapsed = time.time() - t0
        if info.is_main:
            tracker.log_metrics({"train_seconds": elapsed, "best_val_r_mean": pos.best_metric})
    run_id = tracker.run_id
    D.shutdown(info)
    return TrainResult(out_dir, pos.best_metric, pos.best_epoch, history, time.time() - t0, run_id, step_losses)


def identity_fields(cfg: RunConfig) -> dict:
    """The flat config a run's identity is built from. Without a teacher the `teacher.*` fields are left
    out, so runs saved before the teacher section existed keep their identity (resume, not-run-again)."""
    flat = cfg.flat()
    if not (cfg.teacher.text_tower or cfg.teacher.features):
        flat = {k: v for k, v in flat.items() if not k.startswith("teacher.")}
    return flat


def _provenance(tracker: RunTracker, cfg: RunConfig, pos: Position, identity: dict) -> dict:
    return {"mlflow_run_id": tracker.run_id, "recipe": cfg.recipe, "epoch": pos.epoch + 1, "step": pos.step,
            "run_identity": identity}


def _log_checkpoint(tracker: RunTracker, out_dir: Path) -> None:
    """The published checkpoint, logged once as the run's MLflow model (models from code, the weights'
    one copy in MLflow: `hivlp promote` registers this logged model), and the history beside it."""
    if tracker.run_id is None:
        return
    from hivlp.registry import log_model

    log_model(out_dir)
    if (out_dir / "history.json").is_file():
        tracker.log_artifact(out_dir / "history.json")


def _build_caches(model, cfg: RunConfig, train_data, val_data, device):
    t = cfg.train
    tr_img = image_trunk_features(model, train_data.image_paths, t.cache_dir, device, num_workers=t.num_workers,
                                  desc="train images", views=t.image_views, seed=t.seed)
    tr_txt = text_trunk_features(model, train_data.captions, t.cache_dir, device, cfg.data.max_text_tokens, desc="train captions")
    # Validation encodes as inference will: with the mirror-image average when the model asks for it
    # (cacheable when the image tower is frozen; otherwise in-training validation goes without it).
    tta = model.config.image_tta_flip and model.image_tower.trainable_blocks == 0
    if model.config.image_tta_flip and not tta:
        log.warning("model.image_tta_flip: in-training validation without it (image tower partly trained); "
                    "`hivlp evaluate` applies it")
    va_img = image_trunk_features(model, val_data.image_paths, t.cache_dir, device, num_workers=t.num_workers,
                                  desc="val images", flip_average=tta)
    va_txt = text_trunk_features(model, val_data.captions, t.cache_dir, device, cfg.data.max_text_tokens, desc="val captions")
    return (tr_img, tr_txt), (va_img, va_txt)


def epoch_views(n_texts: int, views: int, seed: int, epoch: int) -> np.ndarray | None:
    """Which cached augmented view each caption's image shows this epoch (None: single view).
    A pure function of (seed, epoch), like `epoch_order`, so resume replays it exactly."""
    if views <= 0:
        return None
    return np.random.default_rng([seed, epoch, 1]).integers(views, size=n_texts)


def _batches(order: np.ndarray, batch_size: int, start: int):
    n = math.ceil(len(order) / batch_size)
    for b in range(start, n):
        yield b, order[b * batch_size : (b + 1) * batch_size]


def _micro_step(step_module, model, loss_fn, global_batch, info, data, cache, transform, max_tokens, device, amp,
                accum, views: np.ndarray | None = None, teacher: torch.Tensor | None = None) -> dict:
    """Forward + backward of one micro-batch of caption indices `global_batch`.

    Each rank embeds its contiguous slice (sizes differ by at most one); the embeddings of all ranks are
    gathered (gradients flowing back to each rank's own rows) and the loss is taken over the whole global
    batch, so every caption meets every other as a negative, as in a single process. Inputs come from
    the cached trunk outputs (`views`: the augmented view of each caption's image), or (no cache) from
    images decoded and augmented with `transform` and captions tokenised to `max_tokens`."""
    sizes = D.split_sizes(len(global_batch), info.world_size)
    start = sum(sizes[: info.rank])
    mine = global_batch[start : start + sizes[info.rank]]
    if len(mine) == 0:  # fewer captions than ranks: embed a stand-in row that the gather drops
        mine = global_batch[:1]
    image_idx = data.text_to_image[mine]
    use_cache = cache is not None
    if use_cache:
        (img_feats, txt) = cache
        if views is None:
            img_in = img_feats[torch.as_tensor(image_idx)].float().to(device)
        else:
            img_in = img_feats[torch.as_tensor(views[mine]), torch.as_tensor(image_idx)].float().to(device)
        cap = torch.as_tensor(mine)
        text_in = txt.features[cap].float().to(device)
        mask = txt.mask[cap].long().to(device)
    else:
        from hivlp.data.images import load_image

        img_in = torch.stack([transform(load_image(data.image_paths[i])) for i in image_idx]).to(device)
        tok = model.text_tower.tokenize([data.captions[i] for i in mine], max_tokens=max_tokens)
        text_in, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
        img_emb, txt_emb = step_module(img_in, text_in, mask, use_cache)
        img_emb = D.gather_rows(img_emb.float(), info, sizes)
        txt_emb = D.gather_rows(txt_emb.float(), info, sizes)
        total, parts = loss_fn(img_emb, txt_emb, model.logit_scale,
                               torch.as_tensor(data.text_to_image[global_batch], device=device),
                               None if teacher is None else teacher[torch.as_tensor(global_batch)].to(device))
    (total / accum).backward()
    return {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in parts.items()}}


def _read_history(out_dir: Path) -> list[dict]:
    p = out_dir / "history.json"
    if not p.is_file():
        return []
    try:
        history = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ResumeError(f"{p}: unreadable ({type(e).__name__}); pass --no-resume to start afresh") from None
    if not isinstance(history, list):
        raise ResumeError(f"{p}: expected a list of epochs; pass --no-resume to start afresh")
    return history


def _end_epoch(model, cfg, val_data, val_cache, device, info, tracker, out_dir, pos: Position, history, t0,
               identity: dict) -> None:
    if not info.is_main:
        D.barrier(info)
        return
    metrics = val_metrics(model, cfg, val_data, val_cache, device)
    r_mean = metrics["full"]["r_mean"]
    flat = _flat_val_metrics(metrics)
    tracker.log_metrics(flat, step=pos.step)
    entry = {"epoch": pos.epoch + 1, "step": pos.step, "seconds": round(time.time() - t0, 1), "metrics": metrics}
    history.append(entry)
    improved = r_mean > pos.best_metric
    if improved:
        pos.best_metric, pos.best_epoch = r_mean, pos.epoch + 1
        publish_checkpoint(model, cfg, out_dir, metrics, _provenance(tracker, cfg, pos, identity))
    atomic_write_json(out_dir / "history.json", history)
    log.info("epoch %d val (%s):\n%s", pos.epoch + 1, "new best" if improved else f"best {pos.best_metric:.2f}",
             format_table(metrics))
    D.barrier(info)
