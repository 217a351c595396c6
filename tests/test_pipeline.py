"""The Kubeflow pipelines: the committed YAMLs are what the code compiles to, read as a cluster would
read them (data volume or importer on every data task, secrets from Kubernetes, descriptions, reports,
caching keyed on the data digest), and the compiled YAML itself runs under `kfp.local` on real data.

kfp.local runs the components in this venv (not their image) and ignores the platform spec (volumes,
secrets): the local runs pass local paths, and the platform spec is checked on the YAML.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.base import DATA_MOUNT, IMAGE_CONFIGS, IMAGE_WORKDIR

from .conftest import REPO, write_slice

COMMITTED = {"hivlp": REPO / "pipelines" / "hivlp.yaml", "hivlp-from-uri": REPO / "pipelines" / "hivlp-from-uri.yaml"}
COMPILE_ENV = ("HIVLP_IMAGE", "HIVLP_TRAIN_ACCELERATOR", "HIVLP_DATA_MOUNT", "HIVLP_MLFLOW_SECRET",
               "HIVLP_OBJECT_STORE_SECRET", "HIVLP_MILVUS_SECRET")
# Tasks that read the dataset's files (and so mount the data volume and take the digest).
# promote reads the data too: the gate evaluates the champion again on the gate split.
DATA_TASKS = {"fingerprint-dataset", "validate", "pretrain", "finetune", "evaluate", "promote", "export-shard",
              "sample-queries"}
CACHED_DATA_TASKS = DATA_TASKS - {"fingerprint-dataset", "promote"}


def _compile(tmp: Path, **env) -> dict[str, tuple[dict, dict]]:
    """Compile both YAMLs in a fresh interpreter, so the compile-time environment is exactly `env`."""
    clean = {k: v for k, v in os.environ.items() if k not in COMPILE_ENV}
    out = {"hivlp": tmp / "hivlp.yaml", "hivlp-from-uri": tmp / "hivlp-from-uri.yaml"}
    subprocess.run(
        [sys.executable, "-m", "pipelines.hivlp_pipeline", "--output", str(out["hivlp"]),
         "--from-uri-output", str(out["hivlp-from-uri"])],
        cwd=REPO, env={**clean, **env}, check=True, capture_output=True, text=True,
    )
    return {k: _load(p) for k, p in out.items()}


def _load(path: Path) -> tuple[dict, dict]:
    """(pipeline spec, platform spec): kfp-kubernetes settings make the YAML two documents."""
    pipeline, platform = yaml.safe_load_all(path.read_text())
    return pipeline, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def specs() -> dict[str, tuple[dict, dict]]:
    return {k: _load(p) for k, p in COMMITTED.items()}


@pytest.fixture(scope="module")
def spec(specs):
    return specs["hivlp"][0]


def test_committed_yamls_are_what_the_code_compiles_to(tmp_path):
    _compile(tmp_path)
    for name, path in COMMITTED.items():
        assert (tmp_path / path.name).read_text() == path.read_text(), (
            f"{path.relative_to(REPO)} is stale: run `make pipeline` and commit the result"
        )


def _dag(spec, component):
    return spec["components"][component]["dag"]["tasks"]


def _deps(task):
    return set(task.get("dependentTasks", []))


def _all_tasks(spec) -> dict[str, tuple[str, dict]]:
    """Every task of every DAG: name -> (the DAG's component, task)."""
    out = {}
    for comp, body in [("root", spec["root"]), *spec["components"].items()]:
        for name, task in body.get("dag", {}).get("tasks", {}).items():
            out[name] = (comp, task)
    return out


def _loop(spec, dag="comp-condition-2") -> str:
    return next(k for k in _dag(spec, dag) if k.startswith("for-loop"))


def test_dag_wiring(spec):
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"fingerprint-dataset", "validate", "require-valid", "pretrain", "finetune", "evaluate",
                         "condition-1"}
    assert _deps(root["validate"]) == {"fingerprint-dataset"}
    assert _deps(root["require-valid"]) == {"validate"}
    assert _deps(root["pretrain"]) == {"fingerprint-dataset", "require-valid"}
    assert root["finetune"]["inputs"]["artifacts"]["init"]["taskOutputArtifact"]["producerTask"] == "pretrain"
    assert _deps(root["evaluate"]) >= {"finetune"}
    assert root["evaluate"]["inputs"]["parameters"]["split"]["componentInputParameter"] == "gate_split"
    # Promotion floor: the evaluate task's AR against the min_r_mean parameter.
    gate = root["condition-1"]["triggerPolicy"]["condition"]
    assert "pipelinechannel--evaluate-Output'] >=" in gate and "pipelinechannel--min_r_mean" in gate

    inside_gate = _dag(spec, "comp-condition-1")
    assert set(inside_gate) == {"promote", "condition-2"}
    promote_in = inside_gate["promote"]["inputs"]
    assert set(promote_in["artifacts"]) == {"model", "eval_report"}
    assert promote_in["parameters"]["run_id"]["componentInputParameter"] == "pipelinechannel--finetune-run_id"
    assert "promote-Output'] == true" in inside_gate["condition-2"]["triggerPolicy"]["condition"]

    promoted = _dag(spec, "comp-condition-2")
    loop = _loop(spec)
    assert set(promoted) == {"shard-indices", loop, "index-embeddings", "sample-queries"}
    assert promoted[loop]["parameterIterator"]["items"]["inputParameter"].endswith("shard-indices-Output")
    assert set(_dag(spec, f"comp-{loop}")) == {"export-shard"}
    for fan_in in ("index-embeddings", "sample-queries"):
        assert _deps(promoted[fan_in]) == {loop}
        (collected,) = promoted[fan_in]["inputs"]["artifacts"].values()
        assert collected["taskOutputArtifact"]["producerTask"] == loop
    # kubeflow/pipelines#13239: a named ParallelFor breaks dsl.Collected on the backend.
    assert promoted[loop]["taskInfo"]["name"] == loop


def test_from_uri_pipeline_imports_then_stages_then_runs_the_same_graph(specs):
    spec, platform = specs["hivlp-from-uri"]
    root = spec["root"]["dag"]["tasks"]
    importer = root["importer"]
    assert importer["inputs"]["parameters"]["uri"]["componentInputParameter"] == "data_uri"
    imp_exec = spec["deploymentSpec"]["executors"][importer["componentRef"]["name"].replace("comp-", "exec-")]
    assert imp_exec["importer"]["artifactUri"] == {"runtimeParameter": "uri"}
    assert imp_exec["importer"]["typeSchema"]["schemaTitle"] == "system.Dataset"
    stage = root["stage-dataset"]
    assert stage["inputs"]["artifacts"]["data"]["taskOutputArtifact"] == {"outputArtifactKey": "artifact",
                                                                          "producerTask": "importer"}
    assert stage["cachingOptions"] == {}
    # Downstream reads the staged copy and is keyed on its digest.
    for name in ("validate", "pretrain", "finetune", "evaluate"):
        params = root[name]["inputs"]["parameters"]
        assert params["dataset_json"]["taskOutputParameter"] == {"outputParameterKey": "dataset_json",
                                                                 "producerTask": "stage-dataset"}
        assert params["data_digest"]["taskOutputParameter"] == {"outputParameterKey": "digest",
                                                                "producerTask": "stage-dataset"}
    assert set(_dag(spec, "comp-condition-2")) == set(_dag(specs["hivlp"][0], "comp-condition-2"))


def _executor_of(spec, task) -> str:
    return spec["components"][task["componentRef"]["name"]]["executorLabel"]


@pytest.mark.parametrize("name", list(COMMITTED))
def test_every_data_task_mounts_the_data_volume(specs, name):
    spec, platform = specs[name]
    tasks = _all_tasks(spec)
    data_tasks = (DATA_TASKS - {"fingerprint-dataset"} | {"stage-dataset"}) if name == "hivlp-from-uri" else DATA_TASKS
    assert data_tasks <= set(tasks)
    for task_name in data_tasks:
        dag, task = tasks[task_name]
        (mount,) = platform[_executor_of(spec, task)]["pvcMount"]
        assert mount["mountPath"] == DATA_MOUNT
        # The claim's name is the data_pvc run parameter (inside a sub-DAG: its channel).
        expected = "data_pvc" if dag == "root" else "pipelinechannel--data_pvc"
        assert mount["pvcNameParameter"] == {"componentInputParameter": expected}, task_name
        if dag != "root":
            assert expected in spec["components"][dag]["inputDefinitions"]["parameters"]
    # The tasks that only take artifacts or talk to services mount nothing.
    for task_name in ("require-valid", "index-embeddings", "shard-indices"):
        assert "pvcMount" not in platform.get(_executor_of(spec, tasks[task_name][1]), {})
    root_params = spec["root"]["inputDefinitions"]["parameters"]
    assert root_params["data_pvc"]["defaultValue"] == "hivlp-data"


def _secret_envs(platform: dict, executor: str) -> dict[str, tuple[str, str, bool]]:
    return {k["envVar"]: (s["secretName"], k["secretKey"], s["optional"])
            for s in platform.get(executor, {}).get("secretAsEnv", []) for k in s["keyToEnv"]}


def test_credentials_come_from_kubernetes_secrets(specs):
    spec, platform = specs["hivlp"]
    tasks = _all_tasks(spec)
    index_env = _secret_envs(platform, _executor_of(spec, tasks["index-embeddings"][1]))
    assert index_env == {"MILVUS_TOKEN": ("hivlp-milvus", "token", True)}
    for name in ("pretrain", "finetune", "promote"):
        env = _secret_envs(platform, _executor_of(spec, tasks[name][1]))
        assert env["MLFLOW_TRACKING_PASSWORD"] == ("hivlp-mlflow", "password", True)
        assert env["MLFLOW_TRACKING_TOKEN"] == ("hivlp-mlflow", "token", True)
        assert env["AWS_SECRET_ACCESS_KEY"] == ("hivlp-object-store", "AWS_SECRET_ACCESS_KEY", True)
    # The PyTorchJob pods get the same secrets, by name (secretKeyRef), through the launcher's input.
    job_secrets = spec["root"]["dag"]["tasks"]["pretrain"]["inputs"]["parameters"]["secret_env"]["runtimeValue"]
    assert job_secrets["constant"]["MLFLOW_TRACKING_PASSWORD"] == ["hivlp-mlflow", "password"]
    for executor in spec["deploymentSpec"]["executors"].values():
        names = {e["name"] for e in executor.get("container", {}).get("env", [])}
        assert names <= {"HIVLP_IMAGE"}  # no credential as a plain env value


def test_no_credential_reaches_the_yaml(tmp_path):
    """Credentials in the compiling shell's environment stay out of both YAMLs; secret names are settings."""
    values = {"MILVUS_TOKEN": "milvus-s3cr3t-token", "MLFLOW_TRACKING_PASSWORD": "mlflow-s3cr3t-pw",
              "AWS_SECRET_ACCESS_KEY": "aws-s3cr3t-key", "MLFLOW_TRACKING_URI": "http://bob:hunter2@mlflow:5000"}
    compiled = _compile(tmp_path, **values, HIVLP_MILVUS_SECRET="team-milvus")
    for name in COMMITTED:
        text = (tmp_path / COMMITTED[name].name).read_text()
        for v in (*values.values(), "hunter2"):
            assert v not in text
    spec, platform = compiled["hivlp"]
    index = _all_tasks(spec)["index-embeddings"][1]
    assert _secret_envs(platform, _executor_of(spec, index))["MILVUS_TOKEN"][0] == "team-milvus"


@pytest.mark.parametrize("name", list(COMMITTED))
def test_every_parameter_is_described(specs, name):
    spec, _ = specs[name]
    params = spec["root"]["inputDefinitions"]["parameters"]
    undescribed = [p for p, d in params.items() if len(d.get("description", "")) < 15]
    assert not undescribed, f"pipeline parameters without a description: {undescribed}"
    assert spec["pipelineInfo"]["description"].startswith("Hierarchical image-text embeddings")
    # And every input of every component (what the run page shows on a task).
    for comp, body in spec["components"].items():
        if "executorLabel" not in body or comp.startswith("comp-importer"):
            continue
        for kind in ("parameters", "artifacts"):
            for p, d in body.get("inputDefinitions", {}).get(kind, {}).items():
                assert d.get("description"), f"{comp} input {p} has no description"


def test_run_page_reports_are_markdown_and_html(spec):
    comps = spec["components"]

    def output_type(comp, name):
        return comps[comp]["outputDefinitions"]["artifacts"][name]["artifactType"]["schemaTitle"]

    assert output_type("comp-evaluate", "summary") == "system.Markdown"  # per-level R@K + the floor's decision
    assert output_type("comp-promote", "decision_page") == "system.Markdown"  # the registry gate's decision
    assert output_type("comp-validate", "page") == "system.HTML"  # great-expectations results
    assert output_type("comp-sample-queries", "page") == "system.HTML"  # sample queries with thumbnails
    assert "description" in comps["comp-evaluate"]["outputDefinitions"]["artifacts"]["summary"]


def test_caching_is_keyed_on_the_data_digest(specs):
    """Every cached task that reads the data takes the digest computed by the uncached first task; tasks
    with effects outside the pipeline are never cached."""
    for name, (spec, _) in specs.items():
        source = "stage-dataset" if name == "hivlp-from-uri" else "fingerprint-dataset"
        tasks = _all_tasks(spec)
        for task_name in CACHED_DATA_TASKS:
            dag, task = tasks[task_name]
            assert task["cachingOptions"] == {"enableCache": True}, task_name
            digest = task["inputs"]["parameters"]["data_digest"]
            if dag == "root":
                assert digest["taskOutputParameter"] == {"outputParameterKey": "digest", "producerTask": source}
            else:  # passed down into the condition / loop DAGs as a channel of that same output
                assert digest["componentInputParameter"] == f"pipelinechannel--{source}-digest"
        for uncached in (source, "promote", "index-embeddings"):
            assert tasks[uncached][1]["cachingOptions"] == {}, uncached


def test_parameters_resources_retries(spec):
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"dataset_json", "image_root", "data_pvc", "config_dir", "pretrain_overrides", "finetune_overrides",
            "train_workers", "worker_gpus", "gate_split", "num_shards", "milvus_uri", "min_r_mean",
            "mlflow_tracking_uri"} <= set(params)
    assert params["pretrain_overrides"]["parameterType"] == "LIST"
    assert params["min_r_mean"]["parameterType"] == "NUMBER_DOUBLE"
    assert params["train_workers"]["defaultValue"] == 1  # in-pod unless asked
    assert params["gate_split"]["defaultValue"] == "test"
    assert params["dataset_json"]["defaultValue"].startswith(DATA_MOUNT + "/")

    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"ghcr.io/hivlp/hivlp:0.1.0"}
    train = executors["exec-pretrain"]["container"]
    assert (train["resources"]["resourceCpuLimit"], train["resources"]["resourceMemoryLimit"]) == ("8", "32G")
    assert "accelerator" not in train["resources"]  # CPU unless HIVLP_TRAIN_ACCELERATOR is set at compile time
    assert train["env"] == [{"name": "HIVLP_IMAGE", "value": "ghcr.io/hivlp/hivlp:0.1.0"}]  # the job's image
    for executor in executors.values():
        assert "resourceMemoryLimit" in executor["container"]["resources"]
        # kfp comes with the image: no `pip install kfp` at start-up (works without internet access).
        assert "pip install" not in " ".join(executor["container"]["command"])

    loop = _loop(spec)
    assert _dag(spec, f"comp-{loop}")["export-shard"]["retryPolicy"]["maxRetryCount"] == 2
    assert _dag(spec, "comp-condition-2")["index-embeddings"]["retryPolicy"]["maxRetryCount"] == 3


def test_training_tasks_can_launch_a_pytorchjob(specs):
    spec, platform = specs["hivlp"]
    for name in ("exec-pretrain", "exec-finetune"):
        assert platform[name]["fieldPathAsEnv"] == [{"fieldPath": "metadata.namespace", "name": "POD_NAMESPACE"}]
        assert platform[name]["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
    params = spec["root"]["dag"]["tasks"]["pretrain"]["inputs"]["parameters"]
    for p in ("train_workers", "worker_gpus", "worker_cpu", "worker_memory", "job_timeout_hours", "data_pvc"):
        assert params[p] == {"componentInputParameter": p}
    assert params["data_mount"] == {"runtimeValue": {"constant": DATA_MOUNT}}


def test_compile_time_settings(tmp_path):
    compiled = _compile(tmp_path, HIVLP_IMAGE="registry.local/hivlp:dev", HIVLP_TRAIN_ACCELERATOR="nvidia.com/gpu",
                        HIVLP_DATA_MOUNT="/mnt/hivlp")
    spec, platform = compiled["hivlp"]
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"registry.local/hivlp:dev"}
    for name in ("exec-pretrain", "exec-finetune"):
        assert executors[name]["container"]["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert "accelerator" not in executors["exec-evaluate"]["container"]["resources"]
    assert platform["exec-validate"]["pvcMount"][0]["mountPath"] == "/mnt/hivlp"
    assert spec["root"]["inputDefinitions"]["parameters"]["dataset_json"]["defaultValue"].startswith("/mnt/hivlp/")


def test_paths_the_components_use_exist_in_the_image():
    """The image's layout (root Dockerfile) is what components/base.py says: configs at an absolute path."""
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(rf"^WORKDIR {re.escape(IMAGE_WORKDIR)}$", dockerfile, re.M)
    assert re.search(r"^COPY configs/ configs/$", dockerfile, re.M)
    assert IMAGE_CONFIGS == f"{IMAGE_WORKDIR}/configs" and Path(IMAGE_CONFIGS).is_absolute()
    for recipe in ("pretrain", "finetune"):
        assert (REPO / "configs" / f"{recipe}.yaml").is_file()
    pipeline, _ = _load(COMMITTED["hivlp"])
    assert pipeline["root"]["inputDefinitions"]["parameters"]["config_dir"]["defaultValue"] == IMAGE_CONFIGS


# kfp.local warns that it runs the components in this venv, not their base image: intended here;
# nor do resource limits, retries, platform settings or display names apply there.
pytestmark = [
    pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Task .* have no effect in the current local runner:UserWarning"),
]


def _local_init(root: Path, monkeypatch, caching: bool = False) -> None:
    from kfp import local

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), enable_caching=caching)


@pytest.fixture
def local_runner(tmp_path, monkeypatch):
    """kfp.local running components as subprocesses of this venv, artifacts under tmp_path."""
    _local_init(tmp_path / "kfp-root", monkeypatch)
    return tmp_path


def _with_test_split(data: Path, n: int = 8) -> Path:
    """The last `n` images become the test split (the gate's and the export's split)."""
    raw = json.loads(data.read_text())
    for img in raw["images"][-n:]:
        img["split"] = "test"
    data.write_text(json.dumps(raw))
    return data


def _tiny(tmp: Path) -> list[str]:
    return ["train.max_steps=1", "train.batch_size=32", "train.num_workers=0", "model.text_trainable_layers=0",
            f"train.cache_dir={tmp / 'cache'}", f"tracking.artifact_location={(tmp / 'mlartifacts').as_uri()}",
            "tracking.system_metrics=false"]


def _run_dir(root: Path, pipeline: str) -> Path:
    (run,) = root.glob(f"{pipeline}-*")
    return run


def test_validate_publishes_its_report_and_require_valid_stops_the_run(local_runner, flickr8k_raw):
    from kfp import dsl

    from components import require_valid, validate

    @dsl.pipeline
    def checked(dataset_json: str):
        report = validate(dataset_json=dataset_json, data_digest="d1")
        require_valid(report=report.outputs["report"])

    data = write_slice(flickr8k_raw, local_runner / "broken", n_train=8, n_val=0)
    raw = json.loads(data.read_text())
    raw["images"][3]["filename"] = "no_such_image.jpg"
    data.write_text(json.dumps(raw))
    with pytest.raises(RuntimeError, match="Inner task failed: .*require-valid"):
        checked(dataset_json=str(data))
    run = _run_dir(local_runner / "kfp-root", "checked")
    # validate succeeded (on Kubeflow its artifacts are published only then) and says what is wrong.
    assert json.loads((run / "validate" / "executor_output.json").read_text())["parameterValues"] == {"Output": False}
    report = json.loads((run / "validate" / "report").read_text())
    assert [p["filename"] for p in report["problems"] if p["severity"] == "error"] == ["no_such_image.jpg"]
    page = (run / "validate" / "page").read_text()
    assert "FAILED: 1 error(s)" in page and "no_such_image.jpg" in page and "expect_column_values_to_be_in_set" in page


def test_cache_follows_the_data_digest(tmp_path, monkeypatch, flickr8k_raw):
    """kfp.local's cache (key: component, image, command, inputs) with the real fingerprint and validate
    components: unchanged data reuses validate, changed data (same path) validates again."""
    from kfp import dsl

    from components import fingerprint_dataset, validate

    @dsl.pipeline
    def head(dataset_json: str):
        fp = fingerprint_dataset(dataset_json=dataset_json).set_caching_options(False)
        validate(dataset_json=dataset_json, data_digest=fp.outputs["digest"])

    root = tmp_path / "kfp-root"
    _local_init(root, monkeypatch, caching=True)
    data = write_slice(flickr8k_raw, tmp_path / "data", n_train=6, n_val=2)

    def validate_runs() -> list[Path]:
        return sorted(root.glob("head-*/validate/page"))

    head(dataset_json=str(data))
    assert len(validate_runs()) == 1
    head(dataset_json=str(data))  # same content: validate comes from the cache
    assert len(validate_runs()) == 1 and len(list(root.glob("head-*/fingerprint-dataset"))) == 2
    raw = json.loads(data.read_text())
    raw["images"][0]["sentences"][0]["raw"] = "A caption edited in place of the old one ."
    data.write_text(json.dumps(raw))
    head(dataset_json=str(data))  # same path, new content: validated again
    assert len(validate_runs()) == 2


def test_compiled_yaml_runs_locally_up_to_the_gate(local_runner, flickr8k_raw):
    """pipelines/hivlp.yaml as users submit it, on a 16+8+8 image slice, floor above reach: fingerprint,
    validate, train (one step each), evaluate on the gate split; the floor stops the rest."""
    from kfp import components

    tmp = local_runner
    data = _with_test_split(write_slice(flickr8k_raw, tmp / "data", n_train=16, n_val=16))
    pipeline = components.load_component_from_file(str(COMMITTED["hivlp"]))
    pipeline(dataset_json=str(data), config_dir=str(REPO / "configs"), pretrain_overrides=_tiny(tmp),
             finetune_overrides=_tiny(tmp), min_r_mean=101.0, mlflow_tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")

    run = _run_dir(tmp / "kfp-root", "hivlp")
    assert {p.name for p in run.iterdir()} == {"fingerprint-dataset", "validate", "require-valid", "pretrain",
                                                "finetune", "evaluate"}
    summary = (run / "evaluate" / "summary").read_text()
    assert summary.startswith("# Evaluation: split `test`")
    assert re.search(r"^\| full \(512\) \|( [\d.]+ \|){7}$", summary, re.M)
    assert "< floor 101.00: not promoted" in summary
    assert "OK: no errors" in (run / "validate" / "page").read_text()
    meta = json.loads((run / "finetune" / "model" / "meta.json").read_text())
    assert meta["recipe"] == "finetune"


def test_compiled_from_uri_yaml_stages_the_import_and_stops_on_invalid_data(local_runner, flickr8k_raw):
    """pipelines/hivlp-from-uri.yaml with a local folder as the URI (kfp.local passes local URIs through):
    the import is staged under its digest, validation publishes its page, require-valid stops the run."""
    from kfp import components

    tmp = local_runner
    folder = tmp / "bucket" / "flickr8k"
    data = write_slice(flickr8k_raw, folder, n_train=4, n_val=0)
    raw = json.loads(data.read_text())
    raw["images"][1]["sentences"][0]["raw"] = "  "  # a blank caption: an error
    data.write_text(json.dumps(raw))
    pipeline = components.load_component_from_file(str(COMMITTED["hivlp-from-uri"]))
    with pytest.raises(RuntimeError, match="require-valid"):
        pipeline(data_uri=str(folder), dataset_file=data.name, staging_root=str(tmp / "volume" / "staged"),
                 config_dir=str(REPO / "configs"))

    from hivlp.data.fingerprint import dataset_digest

    digest = dataset_digest(data)
    staged = tmp / "volume" / "staged" / digest.short / data.name
    assert staged.read_bytes() == data.read_bytes()
    run = _run_dir(tmp / "kfp-root", "hivlp-from-uri")
    out = json.loads((run / "stage-dataset" / "executor_output.json").read_text())["parameterValues"]
    assert out == {"dataset_json": str(staged), "digest": digest.digest}
    assert "empty_caption" in (run / "validate" / "page").read_text()
    assert not (run / "pretrain").exists()


@pytest.mark.slow
def test_compiled_yaml_runs_locally_end_to_end(local_runner, flickr8k_raw):
    """pipelines/hivlp.yaml on a 16+8+8 image slice: trains, promotes into a tmp MLflow, exports 2 shards
    in parallel, indexes them in Milvus Lite and renders the sample-queries page."""
    from kfp import components
    from mlflow import MlflowClient

    from hivlp.retrieval.milvus import MilvusDualIndex

    tmp = local_runner
    data = _with_test_split(write_slice(flickr8k_raw, tmp / "data", n_train=16, n_val=16))
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    pipeline = components.load_component_from_file(str(COMMITTED["hivlp"]))
    pipeline(  # raises if any task fails
        dataset_json=str(data), config_dir=str(REPO / "configs"), pretrain_overrides=_tiny(tmp),
        finetune_overrides=_tiny(tmp), min_r_mean=0.0, mlflow_tracking_uri=store, num_shards=2,
        milvus_uri=str(tmp / "milvus.db"), index_name="smoke",
    )

    client = MlflowClient(tracking_uri=store)
    champion = client.get_model_version_by_alias("hivlp", "champion")
    assert champion.tags["hivlp.promoted"] == "true"
    assert client.get_run(champion.run_id).data.tags["hivlp.recipe"] == "finetune"
    with MilvusDualIndex(str(tmp / "milvus.db"), "smoke") as index:
        assert index.counts()["fine"] == {"image": 8, "text": 40}

    run = _run_dir(tmp / "kfp-root", "hivlp")
    decision = (run / "promote" / "decision_page").read_text()
    assert decision.startswith(f"# Registry gate: hivlp v{champion.version} promoted")
    page = (run / "sample-queries" / "page").read_text()
    assert page.count("<figure") == 6 * 5  # 6 queries x top 5, each an embedded thumbnail
    assert page.count('src="data:image/jpeg;base64,') == 30
