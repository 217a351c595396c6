"""The hierarchical dual encoder: two towers, one projection head each, nested embedding levels.

Each head maps its tower's pooled features to one D-dim vector; every prefix `x[:d]` for d in
`levels`, L2-normalised, is a usable embedding (Matryoshka-style). Encoders return the full,
unnormalised vector; `level_embedding` cuts and normalises.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hivlp.config import ModelConfig
from hivlp.model.presets import resolve_model_config
from hivlp.model.towers import ImageTower, TextTower, mirror_average


def level_embedding(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The level-`dim` embedding: the first `dim` coordinates, L2-normalised."""
    return F.normalize(x[..., :dim], dim=-1)


def level_np(x: np.ndarray, dim: int) -> np.ndarray:
    """numpy twin of `level_embedding` (float32), for retrieval code."""
    cut = np.asarray(x, dtype=np.float32)[..., :dim]
    norm = np.linalg.norm(cut, axis=-1, keepdims=True)
    return cut / np.maximum(norm, 1e-12)


class HierarchicalHead(nn.Module):
    """in_dim -> D projection whose prefixes serve as the nested levels.

    "linear": one Linear. "mlp": Linear-GELU-Linear plus a linear skip, so training starts close to a
    linear map and the non-linear branch adds what helps (mostly the low levels).
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "linear", hidden: int = 1024) -> None:
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(in_dim, out_dim)
        if kind == "mlp":
            self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        elif kind != "linear":
            raise ValueError(f"head kind must be 'linear' or 'mlp', got {kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.proj(x)
        return out + self.mlp(x) if self.kind == "mlp" else out


def _hash_state(h: Any, prefix: str, module: nn.Module) -> None:
    for name, t in module.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{prefix}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


class DualEncoder(nn.Module):
    """Image and text towers with hierarchical heads and a learned temperature."""

    def __init__(self, config: ModelConfig, image_tower: ImageTower, text_tower: TextTower) -> None:
        super().__init__()
        self.config = config
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.embed_dim = config.embed_dim
        self.levels = list(config.levels)
        self.image_head = HierarchicalHead(image_tower.feature_dim, config.embed_dim, config.head, config.head_hidden)
        self.text_head = HierarchicalHead(text_tower.feature_dim, config.embed_dim, config.head, config.head_hidden)
        # Low levels have a narrower spread of cosines than the full one; `temperature_per_level`
        # lets each level learn its own temperature (shape [n_levels] instead of a scalar).
        init = torch.tensor(config.init_temperature, dtype=torch.float32)
        if config.temperature_per_level or init.dim():
            init = init.expand(len(self.levels)).clone()
        self.logit_scale = nn.Parameter(torch.log(1.0 / init), requires_grad=config.learn_temperature)
        self.set_trainable(config.image_trainable_blocks, config.text_trainable_layers)

    # -- encoders (full D-dim, not normalised) --------------------------------------------------

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Full embedding of a pixel batch; in eval mode with `image_tta_flip`, of the mean of the tower
        features of each image and its mirror image."""
        if self.config.image_tta_flip and not self.training:
            return self.image_head(mirror_average(self.image_tower, pixels))
        return self.image_head(self.image_tower(pixels))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_head(self.text_tower(input_ids, attention_mask))

    def encode_image_from_trunk(self, h: torch.Tensor) -> torch.Tensor:
        return self.image_head(self.image_tower.forward_top(h))

    def encode_text_from_trunk(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_head(self.text_tower.forward_top(h, attention_mask))

    # -- training support -----------------------------------------------------------------------

    def set_trainable(self, image_blocks: int, text_layers: int) -> None:
        """Unfreeze the top `image_blocks` stages / `text_layers` layers; recorded in `config`."""
        self.image_tower.set_trainable(image_blocks, self.config.image_frozen_bn)
        self.text_tower.set_trainable(text_layers)
        self.config.image_trainable_blocks = image_blocks
        self.config.text_trainable_layers = text_layers

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameters that learn, by group: "head" (heads + temperature) and "towers" (unfrozen tower parts)."""
        head = [*self.image_head.parameters(), *self.text_head.parameters()]
        if self.logit_scale.requires_grad:
            head.append(self.logit_scale)
        towers = [p for t in (self.image_tower, self.text_tower) for p in t.parameters() if p.requires_grad]
        return {"head": head, "towers": towers}

    def trunk_signature(self, tower: str = "both") -> str:
        """A key for cached trunk outputs: changes whenever the frozen trunk's outputs could change.

        Hashes tower names, trainable depths, the eval image transform, the tokenizer vocabulary and the
        actual frozen weights (so a fine-tuned checkpoint never reuses features of the pretrained one).
        `tower` = "image" or "text" keys one tower alone, so changing the other's depth keeps its cache.
        """
        if tower not in ("both", "image", "text"):
            raise ValueError(f"tower must be 'both', 'image' or 'text', got {tower!r}")
        h = hashlib.sha256()
        it, tt = self.image_tower, self.text_tower
        if tower in ("both", "image"):
            h.update(f"image:{it.name}:{it.trainable_blocks}:{it.transform(train=False)!r}".encode())
            for i, m in enumerate(it.trunk_modules()):
                _hash_state(h, f"image{i}", m)
        if tower in ("both", "text"):
            vocab = sorted(tt.tokenizer.get_vocab().items())
            h.update(f"text:{tt.name}:{tt.trainable_layers}:{type(tt.tokenizer).__name__}:{vocab}".encode())
            for i, m in enumerate(tt.trunk_modules()):
                _hash_state(h, f"text{i}", m)
        return h.hexdigest()[:20]


def create_model(cfg: ModelConfig) -> DualEncoder:
    """Build the dual encoder a ModelConfig describes, preset defaults filled in, pretrained weights loaded."""
    return build_model(resolve_model_config(cfg))


def build_model(
    resolved: ModelConfig, *, load_weights: bool = True, text_files: str | Path | None = None
) -> DualEncoder:
    """Build from an already-resolved config, as saved in a checkpoint (no preset lookup).

    `load_weights=False` leaves the towers randomly initialised (nothing read from the pretrained weight
    files) for callers that load a full state dict next; `text_files` points the text tower at a
    checkpoint's own copy of its tokenizer and config.
    """
    image = ImageTower(resolved.image_tower, resolved.image_weights if load_weights else "none", resolved.image_size)
    text = TextTower(resolved.text_tower, load_weights=load_weights, files=text_files)
    return DualEncoder(copy.deepcopy(resolved), image, text)
