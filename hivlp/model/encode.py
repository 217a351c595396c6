"""The one path from a model to embeddings: batch encoding of images and captions into full D-dim
vectors (numpy, float32, unnormalised; callers cut levels with `level_np`).

`load_encoder(checkpoint)` is what every consumer of a checkpoint uses (evaluate, export, bench, the
registered MLflow model, search, serve): it loads and verifies the checkpoint once and encodes with the
checkpoint's own settings (`data.max_text_tokens`), so no caller can tokenise differently from how the
model was trained. Encoding runs in eval mode without gradients and restores the model's previous mode.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hivlp.config import RunConfig
from hivlp.data.datasets import CaptionCollate, CaptionDataset, ImageDataset
from hivlp.data.karpathy import RetrievalSplit
from hivlp.device import pick_device
from hivlp.model.dual_encoder import DualEncoder


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
    *,
    max_tokens: int,
) -> np.ndarray:
    """[M, D] caption embeddings, in the order of `captions`, each truncated to `max_tokens` tokens
    (the model's training setting, `data.max_text_tokens`).

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
    max_tokens: int,
    image_batch_size: int = 64,
    text_batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 2,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(image embeddings [N, D], caption embeddings [M, D]) of a retrieval split, in its order."""
    img = encode_images(model, split.image_paths, image_batch_size, device, num_workers, progress)
    txt = encode_texts(model, split.captions, text_batch_size, device, 0, progress, max_tokens=max_tokens)
    return img, txt


@dataclass
class Encoder:
    """A loaded checkpoint, ready to encode: the model, its run config, where it came from."""

    model: DualEncoder
    config: RunConfig
    device: torch.device
    checkpoint: Path
    weights_sha256: str

    @property
    def levels(self) -> list[int]:
        return list(self.model.levels)

    @property
    def dim(self) -> int:
        return self.model.embed_dim

    @property
    def max_tokens(self) -> int:
        return self.config.data.max_text_tokens

    def texts(self, captions: Sequence[str], batch_size: int = 256, progress: bool = True) -> np.ndarray:
        return encode_texts(self.model, captions, batch_size, self.device, 0, progress, max_tokens=self.max_tokens)

    def images(
        self, paths: Sequence[str | Path], batch_size: int = 64, num_workers: int = 2, progress: bool = True
    ) -> np.ndarray:
        return encode_images(self.model, paths, batch_size, self.device, num_workers, progress)

    def split(
        self, split: RetrievalSplit, batch_size: int = 64, num_workers: int = 2, progress: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        return encode_split(self.model, split, self.max_tokens, image_batch_size=batch_size,
                            device=self.device, num_workers=num_workers, progress=progress)


def load_encoder(checkpoint: str | Path, device: str | torch.device = "auto") -> Encoder:
    """Load and verify a checkpoint folder (see `hivlp.model.checkpoint`) on `device` for encoding."""
    from hivlp.model.checkpoint import load_checkpoint, read_meta

    dev = pick_device(device)
    model, cfg = load_checkpoint(checkpoint, device=dev)
    return Encoder(model, cfg, dev, Path(checkpoint), str(read_meta(checkpoint)["weights_sha256"]))
