"""Batch encoding of images and captions into full D-dim embeddings (numpy, float32, unnormalised).

Callers cut levels with `level_np`. Encoding runs in eval mode without gradients and restores the
model's previous mode afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hivlp.config import DataConfig
from hivlp.data.datasets import CaptionCollate, CaptionDataset, ImageDataset
from hivlp.data.karpathy import RetrievalSplit
from hivlp.model.dual_encoder import DualEncoder

DEFAULT_MAX_TOKENS = DataConfig.max_text_tokens


@contextmanager
def _eval_mode(model: DualEncoder) -> Iterator[None]:
    """Eval mode for the duration, then the model's previous train/eval mode again."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def encode_images(
    model: DualEncoder,
    paths: Sequence[str | Path],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 2,
    progress: bool = True,
) -> np.ndarray:
    """[N, D] image embeddings, in the order of `paths` (eval transform; workers decode JPEGs)."""
    ds = ImageDataset(paths, model.image_tower.transform(train=False))
    dl = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    out = np.zeros((len(ds), model.embed_dim), dtype=np.float32)
    model.to(device)
    with _eval_mode(model):
        for pixels, idx in tqdm(dl, desc="encoding images", unit="batch", disable=not progress):
            out[idx.numpy()] = model.encode_image(pixels.to(device)).float().cpu().numpy()
    return out


@torch.no_grad()
def encode_texts(
    model: DualEncoder,
    captions: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> np.ndarray:
    """[M, D] caption embeddings, in the order of `captions`.

    Captions are batched by length (less padding, same result: mean pooling ignores padding) and the
    rows put back in the input order.
    """
    captions = list(captions)
    order = sorted(range(len(captions)), key=lambda i: len(captions[i]))
    ds = CaptionDataset(captions)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    dl = DataLoader(
        ds,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=CaptionCollate(model.text_tower.tokenize, max_tokens),
    )
    out = np.zeros((len(ds), model.embed_dim), dtype=np.float32)
    model.to(device)
    with _eval_mode(model):
        for ids, mask, idx in tqdm(dl, desc="encoding captions", unit="batch", disable=not progress):
            out[idx.numpy()] = model.encode_text(ids.to(device), mask.to(device)).float().cpu().numpy()
    return out


def encode_split(
    model: DualEncoder,
    split: RetrievalSplit,
    image_batch_size: int = 64,
    text_batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 2,
    progress: bool = True,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> tuple[np.ndarray, np.ndarray]:
    """(image embeddings [N, D], caption embeddings [M, D]) of a retrieval split, in its order."""
    img = encode_images(model, split.image_paths, image_batch_size, device, num_workers, progress)
    txt = encode_texts(model, split.captions, text_batch_size, device, 0, progress, max_tokens)
    return img, txt
