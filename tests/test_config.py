"""Typed configs: the shipped recipes load, and bad configs fail fast naming the field."""

from __future__ import annotations

import pytest

from hivlp.config import load_config, parse_overrides
from hivlp.errors import ConfigError

from .conftest import REPO


@pytest.mark.parametrize("recipe", ["pretrain", "finetune"])
def test_shipped_recipes_load(recipe, flickr8k_json):
    cfg = load_config(REPO / "configs" / f"{recipe}.yaml", [f"data.datasets=[{flickr8k_json}]"])
    assert cfg.recipe == recipe
    assert cfg.model.levels == sorted(cfg.model.levels)


def test_overrides_parse_types():
    d = parse_overrides(["train.lr=1e-4", "train.epochs=3", "model.levels=[64,512]", "tracking.enabled=false"])
    assert d == {"train": {"lr": 1e-4, "epochs": 3}, "model": {"levels": [64, 512]}, "tracking": {"enabled": False}}


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.lrr=0.1", "train.lrr"),  # unknown key
        ("train.lr=fast", "train.lr"),  # wrong type
        ("train.epochs=1.5", "train.epochs"),
        ("model.levels=[64,32,512]", "model.levels"),  # not nested
        ("model.levels=[32,64,256]", "model.levels"),  # last level != embed_dim
        ("loss.level_weights=[1,1]", "loss.level_weights"),
        ("data.datasets=[/nonexistent/flickr.json]", "data.datasets[0]"),  # missing dataset
        ("tracking.enabled=maybe", "tracking.enabled"),
        ("train.image_views=-1", "train.image_views"),
    ],
)
def test_bad_config_names_the_field(override, field, flickr8k_json):
    base = [f"data.datasets=[{flickr8k_json}]"]
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "pretrain.yaml", [*base, override])
    assert field in str(e.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")
