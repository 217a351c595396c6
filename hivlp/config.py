"""Typed run configs: dataclasses loaded from YAML, overridable with `--set key=value`.

Loading is strict so that a typo fails at once, naming the field: unknown keys, wrong types and
inconsistent values (levels not nested, missing dataset files) raise `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hivlp import DEFAULT_LEVELS
from hivlp.errors import ConfigError

DEFAULT_DATASET = "data/flickr8k/dataset_flickr8k.json"


@dataclass
class DataConfig:
    """Where the pairs come from. `datasets` is a list so pre-training can mix corpora."""

    datasets: list[str] = field(default_factory=lambda: [DEFAULT_DATASET])
    image_root: str | None = None  # default: each dataset JSON's own folder
    train_split: str = "train"
    val_split: str = "val"
    val_dataset: str | None = None  # default: the first of `datasets`
    max_text_tokens: int = 40
    limit_train_images: int | None = None  # use only the first N train images (smoke runs, tests)
    limit_val_images: int | None = None
    # Image paths must stay inside the image root (no `..`, absolute paths or symlinks leading out);
    # true lets a dataset whose images really live elsewhere be read.
    allow_outside_root: bool = False


@dataclass
class ModelConfig:
    """The dual encoder: two towers, a hierarchical head, nested levels."""

    name: str = "effl0-minilm"  # a name in hivlp.model.presets; the fields below override it
    image_tower: str | None = None  # timm model name
    image_weights: str | None = None  # "package", "hub", "none" or a local file path
    image_size: int | None = None  # input resolution; None = the tower's own (timm data config)
    text_tower: str | None = None  # "package" (MiniLM), "package-mpnet" (MPNet), a local folder or a cached hub name
    embed_dim: int = 512
    levels: list[int] = field(default_factory=lambda: list(DEFAULT_LEVELS))
    head: str = "linear"  # "linear" or "mlp"
    head_hidden: int = 1024
    # How much of each tower learns. 0 = frozen; N = the top N blocks (image) / layers (text).
    image_trainable_blocks: int = 0
    text_trainable_layers: int = 0
    # BatchNorm in trained image stages keeps its ImageNet statistics (eval mode; scale/shift still
    # learn): small caption datasets give noisy batch statistics.
    image_frozen_bn: bool = True
    # Test-time augmentation: at inference an image's tower features are the mean over the image and
    # its mirror image (2x image compute when encoding; text is unchanged; training is unchanged).
    image_tta_flip: bool = False
    init_temperature: float | list[float] = 0.05  # a list: one starting temperature per level
    learn_temperature: bool = True
    temperature_per_level: bool = False  # one learned temperature per level (implied by a list above)


@dataclass
class LossConfig:
    """Multi-level symmetric InfoNCE plus an optional hardest-negative hinge (VSE++)."""

    level_weights: list[float] | None = None  # one per level; default equal
    hard_negative_weight: float = 0.0
    hard_negative_margin: float = 0.2
    hard_negative_levels: str = "full"  # "full": hinge on the full level; "all": every level, level-weighted
    distill_weight: float = 0.0  # KL of each lower level's similarities towards the full level's


@dataclass
class TeacherConfig:
    """Distillation from a big text tower: the student's caption embeddings (every level) are pulled
    towards the teacher's caption-to-caption similarities (hivlp.losses.caption_distillation). The
    teacher's features are computed once per caption set and cached by content (train.cache_dir)."""

    text_tower: str | None = None  # e.g. "package-mpnet"; None = no teacher
    features: str | None = None  # or a file of teacher caption features (a copied tch-*.safetensors cache entry)
    weight: float = 1.0
    temperature: float = 0.05


@dataclass
class TrainConfig:
    epochs: int = 2
    batch_size: int = 256
    lr: float = 1e-3
    tower_lr: float = 1e-4  # for unfrozen tower parameters
    weight_decay: float = 0.05
    warmup_steps: int = 50
    grad_clip: float = 1.0
    grad_accum: int = 1
    seed: int = 0
    amp: bool = True  # used on CUDA only
    cache_features: bool = True  # cache the frozen trunk's outputs on disk
    cache_dir: str = "outputs/cache"
    # Cached path only: train on this many seeded augmented views of each train image (cached once;
    # each caption draws one per epoch) instead of the single eval view. 0 = no image augmentation.
    image_views: int = 0
    num_workers: int = 2
    log_every: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps (tests, smoke runs)
    save_every_steps: int = 0  # also save the resume state every N optimizer steps (0: epoch ends only)
    epoch_unit: str = "caption"  # "caption": every caption once an epoch; "image": one random caption per image
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    eval_batch_size: int = 512
    eval_shortlist: int = 50  # coarse-to-fine shortlist reported during validation
    eval_coarse_dim: int = 64
    device: str = "auto"


@dataclass
class TrackingConfig:
    enabled: bool = True
    experiment: str = "hivlp"
    run_name: str | None = None
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI or sqlite under outputs/
    artifact_location: str | None = None  # default: outputs/mlartifacts
    log_checkpoint: bool = True
    system_metrics: bool = True


@dataclass
class RunConfig:
    recipe: str = "pretrain"  # "pretrain" or "finetune"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for logging as MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, obj: Any) -> None:
            for k, v in obj.items():
                key = f"{prefix}{k}"
                if isinstance(v, dict):
                    walk(key + ".", v)
                else:
                    out[key] = v

        walk("", self.to_dict())
        return out


# ---------------------------------------------------------------------------------------------
# Strict conversion from plain data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; allow int->float. Raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of fields, got {type(value).__name__}")
        return _from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):  # nan and inf pass every `x <= 0` check and ruin a run later
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return number
        if isinstance(value, str) and value.strip().lower().lstrip("+-.") in ("nan", "inf", "infinity"):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
    raise ConfigError(f"{where}: unsupported config type {_type_name(tp)}")


def _from_dict(cls: type, data: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = _coerce(v, hints[k], f"{where}.{k}" if where else k)
    return cls(**kwargs)


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: list[str] | None) -> dict:
    """`["train.lr=1e-4", "model.levels=[64,512]"]` -> nested dict; values parsed as YAML."""
    nested: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.lr=1e-4")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {_one_line(e)}") from None
        except RecursionError:
            raise ConfigError(f"--set {key}: value nested too deeply") from None
        # YAML 1.1 reads an unquoted 1e-4 as a string (no dot); take it as the number it means. A quoted
        # value ('"1.5"') stays the string it was written as.
        if isinstance(value, str) and raw.strip()[:1] not in ("'", '"'):
            try:
                value = float(value) if any(c in value for c in "eE.") else value
            except ValueError:
                pass
        node = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return nested


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _read_yaml_chain(p: Path, seen: list[Path]) -> dict:
    """A recipe file, merged over the file its `extends:` key names (relative to it), recursively."""
    if not p.is_file():
        raise ConfigError(f"config file {p} not found" + (f" (extended by {seen[-1]})" if seen else ""))
    if p.resolve() in seen:
        raise ConfigError(f"config file {p}: `extends` loops back to itself ({' -> '.join(map(str, seen))})")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {_one_line(e)}") from None
    except RecursionError:
        raise ConfigError(f"config file {p}: nested too deeply to read") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p}: cannot read it ({e})") from None
    if loaded is None:
        # An empty recipe is a truncated or wrong file far more often than a wish for the defaults.
        raise ConfigError(
            f"config file {p} is empty; write the recipe's sections (see configs/{p.name if p.name in ('pretrain.yaml', 'finetune.yaml') else 'pretrain.yaml'}) "
            "or pass another --config"
        )
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p}: top level must be a mapping of sections")
    parent = loaded.pop("extends", None)
    if parent is None:
        return loaded
    if not isinstance(parent, str):
        raise ConfigError(f"config file {p}: extends must be a file name, got {parent!r}")
    return _deep_merge(_read_yaml_chain(p.parent / parent, [*seen, p.resolve()]), loaded)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict | None = None,
    check_files: bool = True,
) -> RunConfig:
    """Read a YAML config (or the defaults), apply `--set` overrides, validate, return RunConfig.

    A config file may start with `extends: other.yaml` (relative to it): that file is read first and
    this one overrides it field by field, so a variant recipe states only what it changes."""
    data: dict = dict(base or {})
    if path is not None:
        data = _deep_merge(data, _read_yaml_chain(Path(path), []))
    data = _deep_merge(data, parse_overrides(overrides))
    cfg = _from_dict(RunConfig, data)
    check_config(cfg, check_files=check_files)
    return cfg


def config_from_dict(data: dict, check_files: bool = False) -> RunConfig:
    cfg = _from_dict(RunConfig, data)
    check_config(cfg, check_files=check_files)
    return cfg


# (section, field, smallest allowed value) for the numbers whose range is simple; None passes (unset).
_LOWER_BOUNDS: list[tuple[str, str, float]] = [
    ("data", "max_text_tokens", 1),
    ("data", "limit_train_images", 1),
    ("data", "limit_val_images", 1),
    ("model", "embed_dim", 1),
    ("model", "head_hidden", 1),
    ("loss", "hard_negative_weight", 0),
    ("loss", "distill_weight", 0),
    ("teacher", "weight", 0),
    ("train", "epochs", 1),
    ("train", "batch_size", 1),
    ("train", "grad_accum", 1),
    ("train", "tower_lr", 0),
    ("train", "weight_decay", 0),
    ("train", "warmup_steps", 0),
    ("train", "grad_clip", 0),
    ("train", "num_workers", 0),
    ("train", "log_every", 1),
    ("train", "max_steps", 1),
    ("train", "save_every_steps", 0),
    ("train", "eval_batch_size", 1),
    ("train", "eval_shortlist", 1),
]


def check_config(cfg: RunConfig, check_files: bool = True) -> None:
    """Cross-field checks; each error names the field."""
    if cfg.recipe not in ("pretrain", "finetune"):
        raise ConfigError(f"recipe: expected 'pretrain' or 'finetune', got {cfg.recipe!r}")
    m = cfg.model
    lv = m.levels
    if not lv:
        raise ConfigError("model.levels: at least one level is needed")
    if any(b <= a for a, b in zip(lv, lv[1:])):
        raise ConfigError(f"model.levels: must be strictly increasing (nested prefixes), got {lv}")
    if lv[0] <= 0:
        raise ConfigError(f"model.levels: dims must be positive, got {lv}")
    if lv[-1] != m.embed_dim:
        raise ConfigError(
            f"model.levels: the last level must equal model.embed_dim ({m.embed_dim}), got {lv}"
        )
    if m.head not in ("linear", "mlp"):
        raise ConfigError(f"model.head: expected 'linear' or 'mlp', got {m.head!r}")
    if m.image_size is not None and not 32 <= m.image_size <= 1024:
        raise ConfigError(f"model.image_size: expected 32..1024 pixels (or null for the tower's own), got {m.image_size}")
    temps = m.init_temperature if isinstance(m.init_temperature, list) else [m.init_temperature]
    if isinstance(m.init_temperature, list) and len(temps) != len(lv):
        raise ConfigError(f"model.init_temperature: {len(temps)} temperatures for {len(lv)} levels ({lv}); give one per level")
    if any(t <= 0 for t in temps):
        raise ConfigError(f"model.init_temperature: must be > 0, got {m.init_temperature}")
    if m.image_trainable_blocks < 0 or m.text_trainable_layers < 0:
        raise ConfigError("model.image_trainable_blocks / model.text_trainable_layers must be >= 0")
    w = cfg.loss.level_weights
    if w is not None and len(w) != len(lv):
        raise ConfigError(
            f"loss.level_weights: {len(w)} weights for {len(lv)} levels ({lv}); give one per level"
        )
    if w is not None and (any(x < 0 for x in w) or sum(w) <= 0):
        raise ConfigError(f"loss.level_weights: must be >= 0 with a positive sum, got {w}")
    t = cfg.train
    for section, name, low in _LOWER_BOUNDS:
        value = getattr(getattr(cfg, section), name)
        if value is not None and value < low:
            raise ConfigError(f"{section}.{name}: must be >= {low}, got {value}")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio: must be within 0..1, got {t.min_lr_ratio}")
    if t.image_views < 0:
        raise ConfigError(f"train.image_views: must be >= 0 (0 = no augmented views), got {t.image_views}")
    if cfg.loss.hard_negative_levels not in ("full", "all"):
        raise ConfigError(f"loss.hard_negative_levels: expected 'full' or 'all', got {cfg.loss.hard_negative_levels!r}")
    if t.epoch_unit not in ("caption", "image"):
        raise ConfigError(f"train.epoch_unit: expected 'caption' or 'image', got {t.epoch_unit!r}")
    if t.eval_coarse_dim not in lv:
        raise ConfigError(f"train.eval_coarse_dim: {t.eval_coarse_dim} is not one of model.levels {lv}")
    if cfg.teacher.temperature <= 0:
        raise ConfigError(f"teacher.temperature: must be > 0, got {cfg.teacher.temperature}")
    if cfg.teacher.text_tower and cfg.teacher.features:
        raise ConfigError("teacher: give either teacher.text_tower or teacher.features, not both")
    if check_files and cfg.teacher.features and not Path(cfg.teacher.features).is_file():
        raise ConfigError(f"teacher.features: file {cfg.teacher.features} not found")
    if t.lr <= 0:
        raise ConfigError(f"train.lr: must be > 0, got {t.lr}")
    if not cfg.data.datasets:
        raise ConfigError("data.datasets: give at least one Karpathy-format JSON")
    if check_files:
        for i, d in enumerate(cfg.data.datasets):
            if not Path(d).is_file():
                raise ConfigError(
                    f"data.datasets[{i}]: dataset file {d} not found "
                    "(run `make setup` to bring Flickr8k into data/, or pass --dataset PATH)"
                )
        if cfg.data.val_dataset and not Path(cfg.data.val_dataset).is_file():
            raise ConfigError(f"data.val_dataset: dataset file {cfg.data.val_dataset} not found")


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """The config as YAML, credentials in any URI removed (`hivlp.redact.scrub`): pass them through the
    environment (MLFLOW_TRACKING_USERNAME/PASSWORD, MILVUS_TOKEN), never in a file."""
    from hivlp.redact import scrub

    Path(path).write_text(yaml.safe_dump(scrub(cfg.to_dict(), strip=True), sort_keys=False))
