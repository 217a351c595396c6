"""The hierarchical dual encoder: towers, heads, named configs, checkpoints and batch encoding."""

from hivlp.model.checkpoint import load_checkpoint, save_checkpoint
from hivlp.model.dual_encoder import (
    DualEncoder,
    HierarchicalHead,
    build_model,
    create_model,
    level_embedding,
    level_np,
)
from hivlp.model.encode import encode_images, encode_split, encode_texts
from hivlp.model.registry import list_models, register_model_config, resolve_model_config
from hivlp.model.towers import ImageTower, TextTower

__all__ = [
    "DualEncoder",
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
    "register_model_config",
    "resolve_model_config",
    "save_checkpoint",
]
