"""The model registry on a real MLflow (SQLite in tmp) with a real checkpoint: log, gate, load the champion.

Logging + registering a model takes ~10 s, so the module logs one checkpoint once; each test then
makes its own registered model whose versions point at that logged model (a registry-only call), so
tests do not depend on each other's order.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from hivlp import registry
from hivlp.cli import main
from hivlp.config import ModelConfig, RunConfig
from hivlp.errors import UsageError
from hivlp.model import (
    create_model,
    encode_images,
    encode_texts,
    load_checkpoint,
    save_checkpoint,
)

from .conftest import FLICKR8K

CAPTIONS = ["a black dog runs through the grass", "two children play on a beach", "a man rides a bike"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh SQLite store (artifacts under the same tmp folder) and one checkpoint logged once."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the default artifact location, outputs/mlartifacts, lands in tmp
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        ckpt = save_checkpoint(create_model(ModelConfig()), RunConfig(), root / "ckpt")
        (ckpt / "resume").mkdir()  # a training folder's resume state must not be logged with the model
        (ckpt / "resume" / "optimizer.pt").write_bytes(b"x" * 1024)
        t = time.perf_counter()
        info = registry.log_model(ckpt, name="logged")
        seconds = time.perf_counter() - t
        yield {"uri": uri, "root": root, "ckpt": ckpt, "info": info, "log_seconds": seconds}


@pytest.fixture
def client(store):
    return MlflowClient(tracking_uri=store["uri"])


def _metrics_file(path, r_mean):
    path.write_text(json.dumps({"full": {"r_mean": r_mean, "txt_r1": 1.0}}))
    return path


def _new_versions(client, store, name, n):
    """`n` versions of a new registered model, all backed by the module's logged model."""
    client.create_registered_model(name)
    logged = store["info"]
    return [
        str(client.create_model_version(name, logged.model_uri, run_id=logged.run_id, model_id=logged.model_id).version)
        for _ in range(n)
    ]


def _tags(client, name, version):
    return client.get_model_version(name, version).tags


def test_log_model_registers_a_version_with_its_checkpoint(store, client, tmp_path):
    info = store["info"]
    assert info.registered_model_version == 1
    mv = client.get_model_version("logged", "1")
    meta = json.loads((store["ckpt"] / "meta.json").read_text())
    assert mv.tags["hivlp.weights_sha256"] == meta["weights_sha256"]
    assert mv.tags["hivlp.run_id"] == info.run_id
    assert info.signature.inputs.input_names() == ["text", "image_path"]
    local = mlflow.artifacts.download_artifacts("models:/logged/1", dst_path=str(tmp_path), tracking_uri=store["uri"])
    names = {p.name for p in (Path(local) / "artifacts" / "checkpoint").iterdir()}
    assert {"config.yaml", "model.safetensors", "meta.json", "text_tower"} <= names
    assert "resume" not in names
    print(f"log_model: {store['log_seconds']:.1f} s")


def test_gate_first_worse_better(store, client, tmp_path):
    """First version: promoted. Worse: gated out, champion stays. Better: takes the alias."""
    name = "gate"
    v1, v2, v3 = _new_versions(client, store, name, 3)
    uri = store["uri"]

    first = registry.promote(v1, name, _metrics_file(tmp_path / "a.json", 41.0), min_value=40, tracking_uri=uri)
    assert first.promoted and first.previous_champion is None and first.champion_value is None
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1
    assert _tags(client, name, v1)["hivlp.promoted"] == "true"
    assert _tags(client, name, v1)["hivlp.previous_champion"] == "none"

    worse = registry.promote(v2, name, _metrics_file(tmp_path / "b.json", 40.5), min_value=40, tracking_uri=uri)
    assert not worse.promoted
    assert (worse.previous_champion, worse.champion_value) == (v1, 41.0)
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1
    tags = _tags(client, name, v2)
    assert tags["hivlp.promoted"] == "false"
    assert tags["hivlp.previous_champion"] == v1
    assert float(tags["hivlp.r_mean"]) == 40.5 and float(tags["hivlp.champion_r_mean"]) == 41.0
    assert "gated out" in tags["hivlp.gate"] and "champion v1" in tags["hivlp.gate"]

    better = registry.promote(v3, name, _metrics_file(tmp_path / "c.json", 42.25), min_value=40, tracking_uri=uri)
    assert better.promoted and better.previous_champion == v1
    assert str(client.get_model_version_by_alias(name, "champion").version) == v3
    assert _tags(client, name, v3)["hivlp.previous_champion"] == v1
    assert _tags(client, name, v1)["hivlp.superseded_by"] == v3
    assert float(_tags(client, name, v3)["hivlp.min_r_mean"]) == 40.0
    # No deprecated stages anywhere.
    assert {client.get_model_version(name, v).current_stage for v in (v1, v2, v3)} == {"None"}


def test_floor_gates_out_even_above_the_champion(store, client, tmp_path):
    name = "floor"
    v1, v2, v3 = _new_versions(client, store, name, 3)
    uri = store["uri"]
    below = registry.promote(v1, name, _metrics_file(tmp_path / "a.json", 35.0), min_value=40, tracking_uri=uri)
    assert not below.promoted  # no champion, but under the floor
    assert client.get_registered_model(name).aliases == {}
    registry.promote(v2, name, _metrics_file(tmp_path / "b.json", 41.0), min_value=40, tracking_uri=uri)
    higher_floor = registry.promote(v3, name, _metrics_file(tmp_path / "c.json", 44.0), min_value=45, tracking_uri=uri)
    assert not higher_floor.promoted and "< floor 45.00" in higher_floor.reason
    assert str(client.get_model_version_by_alias(name, "champion").version) == v2


def test_metric_from_the_training_run(store, client):
    """Without a metrics file the gate reads best_val_r_mean of the run."""
    name = "from-run"
    (v1,) = _new_versions(client, store, name, 1)
    run = client.create_run(client.get_experiment_by_name("hivlp").experiment_id)
    client.log_metric(run.info.run_id, "best_val_r_mean", 43.5)
    result = registry.promote(v1, name, run_id=run.info.run_id, min_value=40, tracking_uri=store["uri"])
    assert result.promoted and result.value == 43.5
    assert _tags(client, name, v1)["hivlp.metric_source"] == f"run:{run.info.run_id}"


def test_champion_pyfunc_matches_the_checkpoint(store, client, tmp_path):
    name = "served"
    (v1,) = _new_versions(client, store, name, 1)
    registry.promote(v1, name, _metrics_file(tmp_path / "m.json", 41.0), tracking_uri=store["uri"])
    served = registry.load_champion(name, tracking_uri=store["uri"])
    model, _ = load_checkpoint(store["ckpt"])
    images = sorted((FLICKR8K / "images").glob("*.jpg"))[:2]

    np.testing.assert_allclose(
        served.predict(pd.DataFrame({"text": CAPTIONS})), encode_texts(model, CAPTIONS, progress=False, max_tokens=40), atol=1e-6
    )
    mixed = pd.DataFrame({"text": [CAPTIONS[0], None], "image_path": [None, str(images[0])]})
    out = served.predict(mixed)
    np.testing.assert_allclose(out[0], encode_texts(model, CAPTIONS[:1], progress=False, max_tokens=40)[0], atol=1e-6)
    np.testing.assert_allclose(out[1], encode_images(model, images[:1], num_workers=0, progress=False)[0], atol=1e-5)

    level = served.predict(pd.DataFrame({"text": CAPTIONS}), params={"level": 64})
    full = encode_texts(model, CAPTIONS, progress=False, max_tokens=40)
    assert level.shape == (3, 64)
    np.testing.assert_allclose(level, full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True), atol=1e-6)
    with pytest.raises(Exception, match="level 100"):
        served.predict(pd.DataFrame({"text": CAPTIONS}), params={"level": 100})
    with pytest.raises(Exception, match="exactly one"):
        served.predict(pd.DataFrame({"text": ["x"], "image_path": [str(images[0])]}))


def test_clear_errors(store, client, tmp_path):
    uri = store["uri"]
    (v1,) = _new_versions(client, store, "errors", 1)
    with pytest.raises(UsageError, match="not found"):
        registry.promote(v1, "errors", tmp_path / "missing.json", tracking_uri=uri)
    (tmp_path / "bad.json").write_text(json.dumps({"dim_64": {"r_mean": 3}}))
    with pytest.raises(UsageError, match="full.r_mean"):
        registry.promote(v1, "errors", tmp_path / "bad.json", tracking_uri=uri)
    with pytest.raises(UsageError, match="run 'nope' not found"):
        registry.promote(v1, "errors", run_id="nope", tracking_uri=uri)
    with pytest.raises(UsageError, match="no version 7"):
        registry.promote(7, "errors", tmp_path / "bad.json", tracking_uri=uri)
    t = time.perf_counter()
    with pytest.raises(registry.TrackingUnavailableError, match="unreachable"):
        registry.promote(v1, "errors", tracking_uri="http://127.0.0.1:9")
    assert time.perf_counter() - t < 10
    with pytest.raises(registry.RegistryError, match="holds alias @champion"):
        registry.load_champion("errors", tracking_uri=uri)
    # Nothing was tagged by the failed attempts.
    assert "hivlp.promoted" not in _tags(client, "errors", v1)


def test_cli_exit_codes(store, client, tmp_path, capsys):
    """Usage error before anything is registered: 2. Gated out: 3, with the decision on the version."""
    uri = store["uri"]
    before = len(client.search_model_versions("name='cli'"))
    code = main(["promote", "--checkpoint", str(store["ckpt"]), "--metrics", str(tmp_path / "none.json"),
                 "--name", "cli", "--tracking-uri", uri])
    assert code == 2 and before == len(client.search_model_versions("name='cli'")) == 0
    capsys.readouterr()

    code = main(["promote", "--checkpoint", str(store["ckpt"]), "--metrics", str(_metrics_file(tmp_path / "m.json", 30.0)),
                 "--name", "cli", "--min-r-mean", "40", "--tracking-uri", uri, "--out", str(tmp_path / "d.json")])
    out = capsys.readouterr().out
    assert code == 3 and "gated out" in out
    decision = json.loads((tmp_path / "d.json").read_text())
    assert decision["promoted"] is False and decision["value"] == 30.0
    assert _tags(client, "cli", decision["version"])["hivlp.promoted"] == "false"


def test_search_encodes_the_query_with_the_registered_champion(store, client, tmp_path, capsys):
    """`hivlp search --model-uri models:/NAME@champion` ranks exactly as the checkpoint it serves."""
    from hivlp.retrieval.milvus import MilvusDualIndex

    (v,) = _new_versions(client, store, "search-champion", 1)
    client.set_registered_model_alias("search-champion", "champion", v)
    model, _ = load_checkpoint(store["ckpt"])
    paths = sorted((FLICKR8K / "images").glob("*.jpg"))[:6]
    emb = encode_images(model, [str(p) for p in paths], batch_size=6, num_workers=0, progress=False)
    uri = str(tmp_path / "m.db")
    with MilvusDualIndex(uri, "served") as index:
        index.build_from_arrays(emb, np.arange(6), ["image"] * 6, coarse_dim=64, index="FLAT",
                                metadata={"filename": [p.name for p in paths]}, progress=False)
    hits = {}
    for how in (["--model-uri", "models:/search-champion@champion"], ["--checkpoint", str(store["ckpt"])]):
        assert main(["search", "--uri", uri, "--name", "served", "--text", CAPTIONS[0], "--k", "5",
                     "--shortlist", "6", "--json", *how]) == 0
        hits[how[0]] = json.loads(capsys.readouterr().out)["hits"]
    assert [h["id"] for h in hits["--model-uri"]] == [h["id"] for h in hits["--checkpoint"]]
    np.testing.assert_allclose([h["score"] for h in hits["--model-uri"]],
                               [h["score"] for h in hits["--checkpoint"]], atol=1e-5)
