"""Typed configs: the shipped recipes load, and bad configs fail fast naming the field."""

from __future__ import annotations

import pytest

from hivlp.config import load_config, parse_overrides
from hivlp.errors import ConfigError

from .conftest import REPO


@pytest.mark.parametrize("recipe", ["pretrain", "finetune", "best-pretrain", "best-finetune"])
def test_shipped_recipes_load(recipe, flickr8k_json):
    cfg = load_config(REPO / "configs" / f"{recipe}.yaml", [f"data.datasets=[{flickr8k_json}]"])
    assert cfg.recipe == recipe.removeprefix("best-")
    assert cfg.model.levels == sorted(cfg.model.levels)
    if recipe == "best-pretrain":  # extends pretrain.yaml: its loss and head, a larger image tower
        shipped = load_config(REPO / "configs" / "pretrain.yaml", [f"data.datasets=[{flickr8k_json}]"])
        assert cfg.loss == shipped.loss and cfg.model.head == shipped.model.head
        assert cfg.model.name == "effl2-minilm-mlp" and cfg.tracking.run_name == "best-pretrain"


def test_overrides_parse_types():
    d = parse_overrides(["train.lr=1e-4", "train.epochs=3", "model.levels=[64,512]", "tracking.enabled=false"])
    assert d == {"train": {"lr": 1e-4, "epochs": 3}, "model": {"levels": [64, 512]}, "tracking": {"enabled": False}}


@pytest.mark.parametrize("raw", ['"1.5"', "'1.5'", '"2e-3"'])
def test_quoted_override_stays_a_string(raw):
    assert parse_overrides([f"tracking.run_name={raw}"]) == {"tracking": {"run_name": raw[1:-1]}}
    cfg = load_config(None, [f"tracking.run_name={raw}"], check_files=False)
    assert cfg.tracking.run_name == raw[1:-1]


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
        ("loss.hard_negative_levels=low", "loss.hard_negative_levels"),
        ("model.init_temperature=[0.1,0.05]", "model.init_temperature"),  # not one per level
        ("model.init_temperature=0", "model.init_temperature"),
        ("teacher.weight=-1", "teacher.weight"),
        ("teacher.temperature=0", "teacher.temperature"),
        ("teacher.features=/nonexistent/teacher.safetensors", "teacher.features"),
        ("teacher.tower=package-mpnet", "teacher.tower"),  # unknown key
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


def test_extends_merges_over_the_parent(tmp_path, flickr8k_json):
    base = tmp_path / "base.yaml"
    base.write_text(f"data:\n  datasets: [{flickr8k_json}]\ntrain:\n  lr: 0.002\n  epochs: 3\nmodel:\n  head: mlp\n")
    (tmp_path / "variants").mkdir()
    child = tmp_path / "variants" / "child.yaml"
    child.write_text("extends: ../base.yaml\ntrain:\n  epochs: 5\n")
    cfg = load_config(child, ["train.batch_size=64"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.batch_size, cfg.model.head) == (0.002, 5, 64, "mlp")

    base.write_text("extends: variants/child.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(child)
    child.write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing\.yaml not found \(extended by"):
        load_config(child)


def test_credentials_in_uris_are_masked():
    from hivlp.redact import redact, strip_credentials

    text = "cannot reach http://alice:s3cret@mlflow:5000/api and grpc://tok3n@milvus:19530 (or https://x/y)"
    out = redact(text)
    assert "s3cret" not in out and "tok3n" not in out
    assert "http://alice:***@mlflow:5000/api" in out and "grpc://***@milvus:19530" in out and "https://x/y" in out
    assert strip_credentials("http://alice:s3cret@mlflow:5000/x") == "http://mlflow:5000/x"
    assert strip_credentials("sqlite:///outputs/mlflow.db") == "sqlite:///outputs/mlflow.db"
