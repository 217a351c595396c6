"""On-disk cache of the frozen trunk's outputs, so each epoch on CPU runs only the trainable part.

A cache entry is keyed by the model's trunk signature (tower names, weights, trainable depth), the
exact list of inputs (image paths or captions) and the tokenisation length: change any of them and a
new entry is computed. Entries are safetensors files written atomically; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hivlp.data.datasets import ImageDataset
from hivlp.io import atomic_write_bytes

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
    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    atomic_write_bytes(path, tmp.read_bytes())
    tmp.unlink()


def _storage_dtype(t: torch.Tensor) -> torch.Tensor:
    # Pooled vectors are small: keep fp32. Feature maps / hidden states are large: fp16 halves the disk.
    return t.float() if t.dim() == 2 else t.half()


@torch.no_grad()
def image_trunk_features(
    model, paths: list[str], cache_dir: str | Path, device: torch.device, batch_size: int = 64,
    num_workers: int = 2, desc: str = "images",
) -> torch.Tensor:
    """Trunk outputs for `paths` (eval transform), computed once and cached."""
    sig = model.trunk_signature()
    path = Path(cache_dir) / f"img-{_key(sig, 'image', paths)}.safetensors"
    if path.is_file():
        log.info("feature cache hit: %s (%d %s)", path, len(paths), desc)
        return load_file(str(path))["features"]
    ds = ImageDataset(paths, model.image_tower.transform(train=False))
    dl = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    tower = model.image_tower.eval()
    chunks = []
    for pixels, _ in tqdm(dl, desc=f"caching {desc} trunk", unit="batch"):
        chunks.append(_storage_dtype(tower.forward_trunk(pixels.to(device)).cpu()))
    feats = torch.cat(chunks)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(path, {"features": feats})
    return feats


@torch.no_grad()
def text_trunk_features(
    model, captions: list[str], cache_dir: str | Path, device: torch.device, max_tokens: int,
    batch_size: int = 256, desc: str = "captions",
) -> TextFeatures:
    """Trunk outputs for `captions`, padded to `max_tokens`, computed once and cached."""
    sig = model.trunk_signature()
    path = Path(cache_dir) / f"txt-{_key(sig, 'text', max_tokens, captions)}.safetensors"
    if path.is_file():
        log.info("feature cache hit: %s (%d %s)", path, len(captions), desc)
        d = load_file(str(path))
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
