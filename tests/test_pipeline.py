"""The Kubeflow pipeline: the committed YAML is what the code compiles to, its DAG is the intended one,
and the components really run under `kfp.local` (the current venv; base_image is ignored there).

The whole pipeline run locally (train, gate into MLflow, export fan-out, Milvus Lite index) takes a
few minutes on 2 cores, so it is marked slow (`make test-all`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from .conftest import REPO, write_slice

COMMITTED = REPO / "pipelines" / "hivlp.yaml"
COMPILE_ENV = ("HIVLP_IMAGE", "HIVLP_TRAIN_ACCELERATOR")


def _compile(out, **env):
    """Compile in a fresh interpreter, so the compile-time environment is exactly `env`."""
    clean = {k: v for k, v in os.environ.items() if k not in COMPILE_ENV}
    subprocess.run(
        [sys.executable, "-m", "pipelines.hivlp_pipeline", "--output", str(out)],
        cwd=REPO, env={**clean, **env}, check=True, capture_output=True, text=True,
    )
    return yaml.safe_load(out.read_text())


@pytest.fixture(scope="module")
def spec():
    return yaml.safe_load(COMMITTED.read_text())


def test_committed_yaml_is_what_the_code_compiles_to(tmp_path):
    _compile(tmp_path / "hivlp.yaml")
    assert (tmp_path / "hivlp.yaml").read_text() == COMMITTED.read_text(), (
        "pipelines/hivlp.yaml is stale: run `make pipeline` and commit the result"
    )


def _dag(spec, component):
    return spec["components"][component]["dag"]["tasks"]


def _deps(task):
    return set(task.get("dependentTasks", []))


def test_dag_wiring(spec):
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"validate", "pretrain", "finetune", "evaluate", "condition-1"}
    assert _deps(root["pretrain"]) == {"validate"}
    assert _deps(root["finetune"]) == {"pretrain"}
    assert root["finetune"]["inputs"]["artifacts"]["init"]["taskOutputArtifact"]["producerTask"] == "pretrain"
    assert _deps(root["evaluate"]) == {"finetune"}
    # Promotion gate: the evaluate task's AR against the min_r_mean parameter.
    gate = root["condition-1"]["triggerPolicy"]["condition"]
    assert "pipelinechannel--evaluate-Output'] >=" in gate and "pipelinechannel--min_r_mean" in gate

    inside_gate = _dag(spec, "comp-condition-1")
    assert set(inside_gate) == {"promote", "condition-2"}
    promote_in = inside_gate["promote"]["inputs"]
    assert set(promote_in["artifacts"]) == {"model", "eval_report"}
    assert promote_in["parameters"]["run_id"]["componentInputParameter"] == "pipelinechannel--finetune-run_id"
    assert "promote-Output'] == true" in inside_gate["condition-2"]["triggerPolicy"]["condition"]

    promoted = _dag(spec, "comp-condition-2")
    loop = next(k for k in promoted if k.startswith("for-loop"))
    assert set(promoted) == {"shard-indices", loop, "index-embeddings"}
    assert promoted[loop]["parameterIterator"]["items"]["inputParameter"].endswith("shard-indices-Output")
    assert set(_dag(spec, f"comp-{loop}")) == {"export-shard"}
    assert _deps(promoted["index-embeddings"]) == {loop}


def test_parameters_resources_retries_caching(spec):
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"dataset_json", "image_root", "pretrain_overrides", "finetune_overrides", "pretrain_epochs",
            "finetune_epochs", "num_shards", "milvus_uri", "min_r_mean", "mlflow_tracking_uri"} <= set(params)
    assert params["pretrain_overrides"]["parameterType"] == "LIST"
    assert params["min_r_mean"]["parameterType"] == "NUMBER_DOUBLE"

    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"ghcr.io/hivlp/hivlp:0.1.0"}
    train = executors["exec-pretrain"]["container"]["resources"]
    assert (train["resourceCpuLimit"], train["resourceMemoryLimit"]) == ("8", "32G")
    assert "accelerator" not in train  # CPU unless HIVLP_TRAIN_ACCELERATOR is set at compile time
    for executor in executors.values():
        assert "resourceMemoryLimit" in executor["container"]["resources"]
        # kfp comes with the image: no `pip install kfp` at start-up (works without internet access).
        assert "pip install" not in " ".join(executor["container"]["command"])

    promoted = _dag(spec, "comp-condition-2")
    loop = next(k for k in promoted if k.startswith("for-loop"))
    export = _dag(spec, f"comp-{loop}")["export-shard"]
    assert export["retryPolicy"]["maxRetryCount"] == 2
    assert promoted["index-embeddings"]["retryPolicy"]["maxRetryCount"] == 3
    # Steps with effects outside the pipeline always run; the rest may come from the cache.
    assert promoted["index-embeddings"]["cachingOptions"] == {}
    assert _dag(spec, "comp-condition-1")["promote"]["cachingOptions"] == {}
    assert spec["root"]["dag"]["tasks"]["pretrain"]["cachingOptions"] == {"enableCache": True}


def test_compile_time_image_and_accelerator(tmp_path):
    spec = _compile(tmp_path / "p.yaml", HIVLP_IMAGE="registry.local/hivlp:dev",
                    HIVLP_TRAIN_ACCELERATOR="nvidia.com/gpu")
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"registry.local/hivlp:dev"}
    for name in ("exec-pretrain", "exec-finetune"):
        assert executors[name]["container"]["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert "accelerator" not in executors["exec-evaluate"]["container"]["resources"]


# kfp.local warns that it runs the components in this venv, not their base image: intended here;
# nor do resource limits, retries or display names apply there.
pytestmark = [
    pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Task .* have no effect in the current local runner:UserWarning"),
]


@pytest.fixture
def local_runner(tmp_path, monkeypatch):
    """kfp.local running components as subprocesses of this venv, artifacts under tmp_path."""
    from kfp import local

    monkeypatch.chdir(REPO)  # the components' default config paths are relative (/app in the image)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp-root"))
    return tmp_path


def test_validate_component_runs_locally(local_runner, slice_json):
    from components import validate

    task = validate(dataset_json=str(slice_json))
    report = json.loads(open(task.outputs["report"].path).read())
    assert report["ok"] and report["counts"]["images"] == 96
    metrics = task.outputs["metrics"].metadata
    assert metrics["images"] == 96 and metrics["captions"] == 480 and metrics["errors"] == 0  # floats here


def test_validate_component_fails_the_run_on_errors(local_runner, flickr8k_raw):
    from components import validate

    data = write_slice(flickr8k_raw, local_runner / "broken", n_train=8, n_val=0)
    raw = json.loads(data.read_text())
    raw["images"][3]["filename"] = "no_such_image.jpg"
    data.write_text(json.dumps(raw))
    with pytest.raises(RuntimeError, match="validate"):
        validate(dataset_json=str(data))
    # It failed for the right reason: the report written before failing names the missing file.
    (report_path,) = (local_runner / "kfp-root").glob("validate-*/validate/report")
    report = json.loads(report_path.read_text())
    assert not report["ok"]
    assert [p["filename"] for p in report["problems"] if p["severity"] == "error"] == ["no_such_image.jpg"]


@pytest.mark.slow
def test_whole_pipeline_runs_locally(local_runner, flickr8k_raw):
    """hivlp_pipeline itself on a 16+16 image slice: trains, promotes into a tmp MLflow, exports 2
    shards in parallel and indexes them in Milvus Lite."""
    from mlflow import MlflowClient

    from hivlp.retrieval.milvus import MilvusDualIndex
    from pipelines.hivlp_pipeline import hivlp_pipeline

    tmp = local_runner
    data = write_slice(flickr8k_raw, tmp / "data", n_train=16, n_val=16)
    raw = json.loads(data.read_text())
    for img in raw["images"][-8:]:
        img["split"] = "test"  # the exported split
    data.write_text(json.dumps(raw))
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    tiny = ["train.max_steps=1", "train.batch_size=32", "train.num_workers=0", "model.text_trainable_layers=0",
            f"train.cache_dir={tmp / 'cache'}", f"tracking.artifact_location={(tmp / 'mlartifacts').as_uri()}",
            "tracking.system_metrics=false"]
    hivlp_pipeline(  # raises if any task fails
        dataset_json=str(data), pretrain_overrides=tiny, finetune_overrides=tiny, min_r_mean=0.0,
        mlflow_tracking_uri=store, num_shards=2, milvus_uri=str(tmp / "milvus.db"), index_name="smoke",
    )

    client = MlflowClient(tracking_uri=store)
    champion = client.get_model_version_by_alias("hivlp", "champion")
    assert champion.tags["hivlp.promoted"] == "true"
    finetune_run = client.get_run(champion.run_id)
    assert finetune_run.data.tags["hivlp.recipe"] == "finetune"
    with MilvusDualIndex(str(tmp / "milvus.db"), "smoke") as index:
        counts = index.counts()
    assert counts["fine"] == {"image": 8, "text": 40}
