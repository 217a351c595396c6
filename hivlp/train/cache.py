"""On-disk cache of the frozen trunk's outputs, so each epoch on CPU runs only the trainable part.

A cache entry is keyed by its tower's trunk signature (tower name, frozen weights, trainable depth, eval
transform), the exact inputs (image paths with each file's size and mtime, or the captions' text), the
augmentation settings and the tokenisation length: change any of them, including an image replaced in
place under the same name, and a new entry is computed. Entries are safetensors files written under a
unique temp name and renamed, so concurrent writers never see each other's half; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hivlp.data.datasets import ImageDataset
from hivlp.data.images import files_fingerprint, load_image
from hivlp.io import atomic_file
from hivlp.model.towers import mirror_average

log = logging.getLogger(__name__)


@dataclass
class TextFeatures:
    features: torch.Tensor  # [M, H] pooled, or [M, T, H] hidden states
    mask: torch.Tensor  # [M, T] attention mask (int8)


def _key(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:24]


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.with_name(path.name + ".partial").unlink(missing_ok=True)  # the fixed temp name of earlier versions
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def _load(path: Path) -> dict[str, torch.Tensor] | None:
    """A cache entry, or None when there is none or it cannot be read (then it is computed again)."""
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors' own error types for a damaged file
        log.warning("feature cache entry %s is unreadable (%s); computing it again", path, e)
        return None


def _storage_dtype(t: torch.Tensor) -> torch.Tensor:
    # Pooled vectors are small: keep fp32. Feature maps / hidden states are large: fp16 halves the disk.
    return t.float() if t.dim() == 2 else t.half()


class SeededTransform:
    """Applies a random transform with its randomness fixed by (seed, item): the same augmented view
    every time, in any worker, so cached augmented views are reproducible. Picklable for workers."""

    def __init__(self, transform: Callable[[Any], torch.Tensor], seed: int) -> None:
        self.transform = transform
        self.seed = seed

    def __call__(self, image: Any, item: int) -> torch.Tensor:
        # timm's random-resized-crop draws from `random`, torchvision's flip from torch.
        k = (self.seed * 1_000_003 + item) % (2**31)
        random.seed(k)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(k)
            return self.transform(image)


class _ViewDataset(ImageDataset):
    """Item v * N + i: augmented view v of image i."""

    def __init__(self, paths: list[str], transform: SeededTransform, views: int) -> None:
        super().__init__(paths, transform)  # type: ignore[arg-type]
        self.views = views

    def __len__(self) -> int:
        return len(self.paths) * self.views

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_image(self.paths[index % len(self.paths)]), index), index


@torch.no_grad()
def image_trunk_features(
    model, paths: list[str], cache_dir: str | Path, device: torch.device, batch_size: int = 64,
    num_workers: int = 2, desc: str = "images", views: int = 0, seed: int = 0, flip_average: bool = False,
) -> torch.Tensor:
    """Trunk outputs for `paths`, computed once and cached: [N, ...] with the eval transform, or with
    `views` > 0, [views, N, ...] of seeded augmented views (the train transform), for training.
    `flip_average` (pooled trunks only): the mean over each image and its mirror, as `image_tta_flip`
    encodes at inference."""
    sig = model.trunk_signature("image")
    if flip_average and (views or model.image_tower.trainable_blocks):
        raise ValueError("flip_average caches pooled features of a fully frozen image tower, without views")
    aug = model.image_tower.transform(train=True) if views else None
    files = files_fingerprint(paths)
    key = (_key(sig, "image-views", views, seed, repr(aug), paths, files) if views
           else _key(sig, "image-flip-average", paths, files) if flip_average else _key(sig, "image", paths, files))
    path = Path(cache_dir) / f"img-{key}.safetensors"
    hit = _load(path)
    if hit is not None:
        log.info("feature cache hit: %s (%d %s)", path, len(paths), desc)
        return hit["features"]
    if views:
        ds: ImageDataset = _ViewDataset(paths, SeededTransform(aug, seed), views)
        desc = f"{desc} x{views} augmented views"
    else:
        ds = ImageDataset(paths, model.image_tower.transform(train=False))
    dl = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    tower = model.image_tower.eval()
    chunks = []
    for pixels, _ in tqdm(dl, desc=f"caching {desc} trunk", unit="batch"):
        pixels = pixels.to(device)
        h = mirror_average(tower.forward_trunk, pixels) if flip_average else tower.forward_trunk(pixels)
        chunks.append(_storage_dtype(h.cpu()))
    feats = torch.cat(chunks)
    if views:
        feats = feats.reshape(views, len(paths), *feats.shape[1:])
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(path, {"features": feats})
    return feats


@torch.no_grad()
def text_trunk_features(
    model, captions: list[str], cache_dir: str | Path, device: torch.device, max_tokens: int,
    batch_size: int = 256, desc: str = "captions",
) -> TextFeatures:
    """Trunk outputs for `captions`, padded to `max_tokens`, computed once and cached."""
    sig = model.trunk_signature("text")
    path = Path(cache_dir) / f"txt-{_key(sig, 'text', max_tokens, captions)}.safetensors"
    d = _load(path)
    if d is not None:
        log.info("feature cache hit: %s (%d %s)", path, len(captions), desc)
        return TextFeatures(d["features"], d["mask"])
    tower = model.text_tower.eval()
    feats, masks = [], []
    for i in tqdm(range(0, len(captions), batch_size), desc=f"caching {desc} trunk", unit="batch"):
        tok = tower.tokenize(captions[i : i + batch_size], max_tokens=max_tokens, pad_to_max=True)
        ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
        feats.append(_storage_dtype(tower.forward_trunk(ids, mask).cpu()))
        masks.append(mask.to(torch.int8).cpu())
    out = TextFeatures(torch.cat(feats), torch.cat(masks))
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(path, {"features": out.features, "mask": out.mask})
    return out
