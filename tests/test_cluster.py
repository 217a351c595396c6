"""Training across nodes (`hivlp.train.cluster`, the pipeline's `train_workers` > 1): the PyTorchJob built
for 2 workers, what the Kubeflow Training SDK sends for it, and the launcher's wait / copy / failure path.

No Kubernetes API server or Training Operator runs here, so they are the one fake: `LocalOperator`
takes the job the launcher creates and runs its replicas as local processes with the environment the
operator gives each pod (training-operator release-1.9, pkg/controller.v1/pytorch/envvar.go: MASTER_ADDR,
MASTER_PORT, WORLD_SIZE, RANK and the PET_* variables torchrun reads), its secretKeyRefs resolved from
a dict. What runs is the job's own container command (`torchrun -m hivlp pretrain ...`), on real data.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from hivlp.train.cluster import (
    ClusterJobError,
    ClusterTraining,
    build_pytorchjob,
    job_dict,
    train_on_cluster,
    training_args,
)

from .conftest import REPO, write_slice

VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"
SECRET_ENV = {"MLFLOW_TRACKING_USERNAME": ("hivlp-mlflow", "username"),
              "AWS_SECRET_ACCESS_KEY": ("hivlp-object-store", "AWS_SECRET_ACCESS_KEY")}


def _spec(mount: Path, **kw) -> ClusterTraining:
    return ClusterTraining(**{
        "workers": 2, "cpu": "2", "memory": "6G", "data_pvc": "hivlp-data", "data_mount": str(mount),
        "secret_env": SECRET_ENV, "env": {"MLFLOW_TRACKING_URI": "http://mlflow.mlflow:5000"},
        "labels": {"hivlp/recipe": "pretrain"}, "image": "registry.local/hivlp:dev", "namespace": "team-a",
        "poll_s": 1, **kw})


def test_job_spec_for_two_workers():
    """Image, command, env (plain and secret-backed), resources, volumes, replicas, run policy."""
    args = training_args("pretrain", "/app/configs/pretrain.yaml", "/data/runs/j/pretrain",
                         ["/data/flickr8k/dataset_flickr8k.json"], overrides=["train.epochs=2"])
    job = job_dict(build_pytorchjob("hivlp-pretrain-abc", _spec(Path("/data")), args))

    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert job["metadata"] == {"name": "hivlp-pretrain-abc", "namespace": "team-a",
                               "labels": {"app.kubernetes.io/name": "hivlp", "hivlp/recipe": "pretrain"}}
    spec = job["spec"]
    # One Master (the operator sets MASTER_ADDR/RANK only when there is one) + 1 Worker; 1 process per CPU pod.
    assert {k: v["replicas"] for k, v in spec["pytorchReplicaSpecs"].items()} == {"Master": 1, "Worker": 1}
    assert spec["nprocPerNode"] == "1"
    assert spec["runPolicy"] == {"activeDeadlineSeconds": 12 * 3600, "backoffLimit": 3, "cleanPodPolicy": "None",
                                 "ttlSecondsAfterFinished": 7 * 24 * 3600}
    for replica in spec["pytorchReplicaSpecs"].values():
        assert replica["restartPolicy"] == "OnFailure"
        pod = replica["template"]["spec"]
        (c,) = pod["containers"]
        assert c["name"] == "pytorch" and c["image"] == "registry.local/hivlp:dev"
        assert c["command"] == ["torchrun"]
        assert c["args"] == ["-m", "hivlp", "pretrain", "--config", "/app/configs/pretrain.yaml",
                             "--out", "/data/runs/j/pretrain", "--dataset", "/data/flickr8k/dataset_flickr8k.json",
                             "--set", "train.epochs=2"]
        assert c["resources"] == {"limits": {"cpu": "2", "memory": "6G"}, "requests": {"cpu": "2", "memory": "6G"}}
        env = {e["name"]: e for e in c["env"]}
        assert env["MLFLOW_TRACKING_URI"] == {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow.mlflow:5000"}
        assert env["MLFLOW_TRACKING_USERNAME"]["valueFrom"] == {
            "secretKeyRef": {"name": "hivlp-mlflow", "key": "username", "optional": True}}
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "hivlp-object-store"
        assert "value" not in env["AWS_SECRET_ACCESS_KEY"]
        assert c["volumeMounts"] == [{"mountPath": "/data", "name": "data"}, {"mountPath": "/dev/shm", "name": "dshm"}]
        assert pod["volumes"] == [
            {"name": "data", "persistentVolumeClaim": {"claimName": "hivlp-data"}},
            {"emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}, "name": "dshm"},
        ]

    gpu = job_dict(build_pytorchjob("j", _spec(Path("/data"), workers=4, gpus_per_worker=2), args))["spec"]
    assert gpu["nprocPerNode"] == "2" and gpu["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
    limits = gpu["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "2"


def test_bad_settings_are_one_line_errors():
    from hivlp.errors import UsageError

    with pytest.raises(UsageError, match="at least 2 pods"):
        ClusterTraining(workers=1)
    with pytest.raises(UsageError, match="absolute"):
        ClusterTraining(data_mount="data")
    with pytest.raises(UsageError, match="finetune needs the pre-trained checkpoint"):
        training_args("finetune", "c.yaml", "out", ["d.json"])
    with pytest.raises(UsageError, match="HIVLP_IMAGE"):
        ClusterTraining(image="", namespace="x").resolved()


def test_training_sdk_posts_the_job_to_the_pytorchjob_api():
    """The real TrainingClient.create_job with our job: what reaches the Kubernetes API (its custom-objects
    client is the fake here)."""
    from kubeflow.training import TrainingClient
    from kubernetes import client as k8s

    posted = []

    class FakeCustomObjects:
        def create_namespaced_custom_object(self, group, version, namespace, plural, body):
            posted.append((group, version, namespace, plural, k8s.ApiClient().sanitize_for_serialization(body)))

    tc = TrainingClient(client_configuration=k8s.Configuration(), namespace="team-a")
    tc.custom_api = FakeCustomObjects()
    job = build_pytorchjob("hivlp-pretrain-abc", _spec(Path("/data")), ["pretrain", "--out", "/data/x"])
    tc.create_job(job=job)
    ((group, version, namespace, plural, body),) = posted
    assert (group, version, namespace, plural) == ("kubeflow.org", "v1", "team-a", "pytorchjobs")
    assert body == job_dict(job)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalOperator:
    """The Kubernetes API + Training Operator, for one job at a time: each replica of the created
    PyTorchJob runs as a local process with the operator's environment (see the module docstring)."""

    def __init__(self, secrets: dict[str, dict[str, str]], workdir: Path, fail: bool = False):
        self.secrets, self.workdir, self.fail = secrets, workdir, fail
        self.created: list[dict] = []
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []
        self.envs: list[dict[str, str]] = []

    def create_job(self, job):
        d = job_dict(job)
        self.created.append(d)
        if self.fail:
            return
        spec = d["spec"]
        nproc = int(spec["nprocPerNode"])
        replicas = [(t, i, r) for t in ("Master", "Worker") for r in [spec["pytorchReplicaSpecs"].get(t)] if r
                    for i in range(r["replicas"])]
        port = _free_port()
        for rank, (rtype, i, r) in enumerate(replicas):
            (c,) = r["template"]["spec"]["containers"]
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("PET_", "MASTER_", "WORLD_", "RANK", "MLFLOW_", "AWS_"))}
            env.update(PATH=f"{VENV_BIN}{os.pathsep}{env['PATH']}", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(len(replicas) * nproc),
                       RANK=str(rank), PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(port),
                       PET_NNODES=str(len(replicas)), PET_NODE_RANK=str(rank), PET_NPROC_PER_NODE=str(nproc))
            for e in c["env"]:
                if "value" in e:
                    env[e["name"]] = e["value"]
                else:
                    ref = e["valueFrom"]["secretKeyRef"]
                    value = self.secrets.get(ref["name"], {}).get(ref["key"])
                    assert value is not None or ref.get("optional"), f"secret {ref} missing and not optional"
                    if value is not None:
                        env[e["name"]] = value
            self.envs.append(env)
            log = self.workdir / f"{rtype.lower()}-{i}.log"
            with open(log, "w") as out:
                proc = subprocess.Popen(c["command"] + c["args"], env=env, cwd=REPO, stdout=out,
                                        stderr=subprocess.STDOUT)
            self.procs.append((f"{rtype.lower()}-{i}", proc, log))

    def wait_for_job_conditions(self, name, namespace=None, job_kind=None, expected_conditions=None, **kw):
        assert (job_kind, expected_conditions) == ("PyTorchJob", {"Succeeded"})
        if self.fail:
            raise RuntimeError(f"{job_kind} {namespace}/{name} is Failed.")
        codes = [p.wait(timeout=600) for _, p, _ in self.procs]
        if any(codes):
            raise RuntimeError(f"{job_kind} {namespace}/{name} is Failed. exit codes {codes}")
        return self.created[-1]

    def get_job_logs(self, name, namespace=None, job_kind=None, is_master=True, **kw):
        if self.fail:
            return {f"{name}-master-0": "Traceback ...\nhivlp: error: CUDA out of memory"}, {}
        return {f"{name}-master-0": self.procs[0][2].read_text()}, {}


@pytest.mark.slow
def test_pretrain_component_with_two_workers_trains_on_two_pods(tmp_path, flickr8k_raw, monkeypatch):
    """The pipeline's pretrain component with train_workers=2, in the environment its pod has (image and
    namespace env, the data volume at data_mount): it launches the job, the job's own command runs as
    Master + Worker (gloo), rank 0 publishes the checkpoint on the volume, and the component's Model
    artifact is that checkpoint. The MLflow run records world size 2."""
    import kubeflow.training
    from kfp import dsl
    from mlflow import MlflowClient

    from components.train import pretrain
    from hivlp.model.checkpoint import verify_checkpoint

    volume = tmp_path / "volume"  # the data PVC, mounted at the same path in the launcher and every pod
    data = write_slice(flickr8k_raw, volume / "data", n_train=16, n_val=8)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    operator = LocalOperator({"hivlp-mlflow": {"username": "kfp-bot"}}, tmp_path)
    monkeypatch.setattr(kubeflow.training, "TrainingClient", lambda namespace: operator)
    monkeypatch.setenv("HIVLP_IMAGE", "registry.local/hivlp:dev")  # what the pipeline sets on the task
    monkeypatch.setenv("POD_NAMESPACE", "team-a")
    tiny = ["train.batch_size=32", "train.num_workers=0", "model.text_trainable_layers=0",
            f"tracking.artifact_location={(tmp_path / 'mlartifacts').as_uri()}", "tracking.system_metrics=false"]
    model, metrics = dsl.Model(uri=str(tmp_path / "model")), dsl.Metrics(uri=str(tmp_path / "metrics"))
    run_id, best = pretrain.python_func(
        dataset_json=str(data), data_digest="d" * 64, model=model, metrics=metrics, config_dir=str(REPO / "configs"),
        epochs=1, overrides=tiny, mlflow_tracking_uri=store, train_workers=2, worker_cpu="1", worker_memory="4G",
        data_pvc="hivlp-data", data_mount=str(volume), secret_env={k: list(v) for k, v in SECRET_ENV.items()},
    )

    logs = "\n".join(f"--- {n}\n{log.read_text()[-2000:]}" for n, _, log in operator.procs)
    assert [p.returncode for _, p, _ in operator.procs] == [0, 0], logs
    (job,) = operator.created
    name = job["metadata"]["name"]
    assert name.startswith("hivlp-pretrain-") and job["metadata"]["namespace"] == "team-a"
    assert job["metadata"]["labels"]["hivlp/data-digest"] == "d" * 16
    (c,) = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    assert c["image"] == "registry.local/hivlp:dev"
    assert c["args"][c["args"].index("--out") + 1] == str(volume / "runs" / name / "pretrain")
    assert c["volumeMounts"][0]["mountPath"] == str(volume)

    verify_checkpoint(model.path)
    meta = json.loads((tmp_path / "model" / "meta.json").read_text())
    assert run_id == meta["mlflow_run_id"] and best == meta["metrics"]["full"]["r_mean"]
    assert model.metadata["train_workers"] == 2 and metrics.metadata["best_val_r_mean"] == best
    assert (tmp_path / "model" / "history.json").is_file() and not (tmp_path / "model" / "resume").exists()
    assert not (volume / "runs" / name).exists()  # the job's folder is removed once the model is out
    run = MlflowClient(tracking_uri=store).get_run(run_id)
    assert run.data.tags["hivlp.world_size"] == "2"
    # The secretKeyRef became the pods' environment; the optional secret that does not exist did not.
    assert [e.get("MLFLOW_TRACKING_USERNAME") for e in operator.envs] == ["kfp-bot", "kfp-bot"]
    assert not any("AWS_SECRET_ACCESS_KEY" in e for e in operator.envs)


def test_a_failed_job_is_one_error_naming_it_and_its_logs(tmp_path):
    operator = LocalOperator({}, tmp_path, fail=True)
    (tmp_path / "d.json").write_text("{}")
    with pytest.raises(ClusterJobError) as e:
        train_on_cluster("pretrain", tmp_path / "model", _spec(tmp_path), "/app/configs/pretrain.yaml",
                         [str(tmp_path / "d.json")], client=operator)
    name = operator.created[0]["metadata"]["name"]
    first, *rest = str(e.value).splitlines()
    assert first == (f"PyTorchJob team-a/{name} failed; its pods are kept: kubectl -n team-a logs {name}-master-0")
    assert "CUDA out of memory" in rest[-1]
    assert not (tmp_path / "model").exists()


def test_finetune_copies_its_init_checkpoint_onto_the_volume(tmp_path):
    """Every pod must read the pre-trained checkpoint: the launcher's local copy is put on the volume and
    the job's --init points there."""
    from hivlp.config import ModelConfig, RunConfig
    from hivlp.model import create_model, save_checkpoint
    from hivlp.model.checkpoint import checkpoint_sha256, verify_checkpoint

    init = save_checkpoint(create_model(ModelConfig()), RunConfig(), tmp_path / "init")
    operator = LocalOperator({}, tmp_path, fail=True)
    with pytest.raises(ClusterJobError):
        train_on_cluster("finetune", tmp_path / "model", _spec(tmp_path), "/app/configs/finetune.yaml",
                         ["/x.json"], init=init, client=operator)
    name = operator.created[0]["metadata"]["name"]
    args = operator.created[0]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
    on_volume = tmp_path / "runs" / name / "init"
    assert args[args.index("--init") + 1] == str(on_volume)
    verify_checkpoint(on_volume)
    assert checkpoint_sha256(on_volume) == checkpoint_sha256(init)
