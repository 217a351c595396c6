"""The hierarchical dual encoder: towers, heads, named presets, checkpoints and the one encoding path."""

from hivlp.model.checkpoint import load_checkpoint, save_checkpoint
from hivlp.model.dual_encoder import (
    DualEncoder,
    HierarchicalHead,
    build_model,
    create_model,
    level_embedding,
    level_np,
)
from hivlp.model.encode import (
    Encoder,
    encode_images,
    encode_split,
    encode_texts,
    load_encoder,
)
from hivlp.model.presets import list_models, register_model_config, resolve_model_config
from hivlp.model.towers import ImageTower, TextTower

__all__ = [
    "DualEncoder",
    "Encoder",
    "HierarchicalHead",
    "ImageTower",
    "TextTower",
    "build_model",
    "create_model",
    "encode_images",
    "encode_split",
    "encode_texts",
    "level_embedding",
    "level_np",
    "list_models",
    "load_checkpoint",
    "load_encoder",
    "register_model_config",
    "resolve_model_config",
    "save_checkpoint",
]
