"""Distributed training trains the single-process objective: 2 gloo processes over a global batch give
the loss and the gradients of 1 process over the same batch (cross-rank negatives, not per-rank ones).

Runs the engine's own micro-step (`hivlp.train.trainer._micro_step`) on the real dual encoder's heads
over real pretrained-tower features of Flickr8k images and captions, wrapped in DDP as training wraps it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

from hivlp.data.karpathy import RetrievalSplit, load_split

BATCH = 11  # odd: the two ranks embed 6 and 5 rows


def _setup(train_dir: Path):
    """Model, loss, data, cached features and the global batch, identical in every process."""
    from hivlp.config import load_config
    from hivlp.losses import HierarchicalContrastiveLoss
    from hivlp.model import create_model
    from hivlp.train.cache import TextFeatures

    torch.manual_seed(0)
    cfg = load_config(None, ["model.head=mlp", "loss.hard_negative_weight=1.0"], check_files=False)
    model = create_model(cfg.model)
    feats = torch.load(train_dir / "feats.pt", weights_only=True)
    data = RetrievalSplit(
        image_paths=[""] * len(feats["img"]), filenames=[""] * len(feats["img"]), imgids=list(range(len(feats["img"]))),
        captions=[""] * len(feats["txt"]), sentids=list(range(len(feats["txt"]))), text_to_image=feats["t2i"].numpy(),
    )
    cache = (feats["img"], TextFeatures(feats["txt"], feats["mask"]))
    loss_fn = HierarchicalContrastiveLoss(model.levels, [8, 8, 1, 1, 1], hard_negative_weight=1.0)
    batch = np.random.default_rng(3).permutation(len(feats["txt"]))[:BATCH]
    return model, loss_fn, data, cache, batch


def _step(model, loss_fn, data, cache, batch, info):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from hivlp.train.trainer import _micro_step, _Step

    step = _Step(model)
    if info.enabled:
        step = DDP(step)
    losses = _micro_step(step, model, loss_fn, batch, info, data, cache, None, 40, torch.device("cpu"),
                         amp=False, accum=1)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses["loss"], grads


def _rank(rank: int, world: int, workdir: str) -> None:
    from hivlp.train import distributed as D

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ["HIVLP_TEST_PORT"]})
    torch.set_num_threads(1)
    info = D.init_distributed("cpu")
    model, loss_fn, data, cache, batch = _setup(Path(workdir))
    loss, grads = _step(model, loss_fn, data, cache, batch, info)
    torch.save({"loss": torch.tensor(loss), **grads}, Path(workdir) / f"rank{rank}.pt")
    D.shutdown(info)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_process(slice_json, tmp_path):
    from hivlp.config import ModelConfig
    from hivlp.data.datasets import ImageDataset
    from hivlp.model import create_model
    from hivlp.train.distributed import DistInfo

    # Real pooled tower features (frozen trunk = whole towers) of 8 train images and their 40 captions.
    split = load_split(slice_json, "train", limit_images=8)
    towers = create_model(ModelConfig())
    with torch.no_grad():
        images = ImageDataset(split.image_paths, towers.image_tower.transform())
        img = towers.image_tower(torch.stack([images[i][0] for i in range(len(images))]))
        tok = towers.text_tower.tokenize(split.captions, max_tokens=40)
        txt = towers.text_tower(tok["input_ids"], tok["attention_mask"])
    torch.save({"img": img, "txt": txt, "mask": tok["attention_mask"].to(torch.int8),
                "t2i": torch.as_tensor(split.text_to_image)}, tmp_path / "feats.pt")

    os.environ["HIVLP_TEST_PORT"] = str(_free_port())
    mp.spawn(_rank, args=(2, str(tmp_path)), nprocs=2, join=True)

    model, loss_fn, data, cache, batch = _setup(tmp_path)
    loss, grads = _step(model, loss_fn, data, cache, batch, DistInfo())
    assert grads, "no trainable parameter got a gradient"
    # The comparison can fail: rank 0's six rows alone (per-rank negatives) give another loss.
    first_half, _ = _step(*_setup(tmp_path)[:4], batch[:6], DistInfo())
    assert abs(first_half - loss) > 1e-3
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        got_loss = float(got.pop("loss"))
        assert abs(got_loss - loss) < 1e-5, (rank, got_loss, loss)
        assert set(got) == set(grads)
        for name, g in grads.items():
            torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=f"rank {rank}: {name}")


def test_split_sizes_cover_the_batch():
    from hivlp.train.distributed import split_sizes

    assert split_sizes(BATCH, 2) == [6, 5] and split_sizes(1, 2) == [1, 0] and sum(split_sizes(64, 3)) == 64
