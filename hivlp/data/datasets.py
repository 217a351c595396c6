"""Torch datasets over image paths and captions; items carry their index so batches can be reordered."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from hivlp.data.images import load_image


class ImageDataset(Dataset):
    """`paths[i]` -> (transform(image), i)."""

    def __init__(self, paths: Sequence[str | Path], transform: Callable[[Any], torch.Tensor]) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_image(self.paths[index])), index


class CaptionDataset(Dataset):
    """`captions[i]` -> (caption, i)."""

    def __init__(self, captions: Sequence[str]) -> None:
        self.captions = list(captions)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.captions[index], index


class CaptionCollate:
    """Tokenises a batch of (caption, index) items with a text tower's `tokenize`.

    A class rather than a closure so DataLoader workers can pickle it.
    Returns (input_ids [B,T], attention_mask [B,T], indices [B]).
    """

    def __init__(
        self, tokenize: Callable[..., dict[str, torch.Tensor]], max_tokens: int, pad_to_max: bool = False
    ) -> None:
        self.tokenize = tokenize
        self.max_tokens = max_tokens
        self.pad_to_max = pad_to_max

    def __call__(self, batch: list[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        texts = [t for t, _ in batch]
        tok = self.tokenize(texts, max_tokens=self.max_tokens, pad_to_max=self.pad_to_max)
        indices = torch.tensor([i for _, i in batch], dtype=torch.long)
        return tok["input_ids"], tok["attention_mask"], indices
