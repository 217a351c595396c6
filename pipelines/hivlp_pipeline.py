"""The hivlp training pipeline for Kubeflow Pipelines, compiled to two YAMLs that share one graph:

    pipelines/hivlp.yaml           the dataset is on the data volume (a PersistentVolumeClaim)
    pipelines/hivlp-from-uri.yaml  the dataset is a folder at a URI (s3://, gs://, minio://), imported
                                   and staged onto the data volume first

    fingerprint (or import + stage) -> validate -> require valid -> pretrain -> finetune -> evaluate
        -> [AR >= min_r_mean] promote -> [promoted] export x N shards -> index in Milvus
                                                                      -> sample queries page

Export and index run only for a model that took the champion alias, so the Milvus collections
always hold the embeddings of the model that `models:/<name>@champion` serves.

Caching: the first task computes the dataset's content digest (never cached), and every cached task
that reads the dataset takes it as an input, so a changed dataset reruns them and an unchanged one
comes from the cache. Promote, index, the fingerprint and staging act outside the pipeline or must
see today's files: they are never cached.

Two YAMLs rather than one with a branch: joining the branches needs `dsl.OneOf`, whose artifact form
fails under kfp.local 2.17 and needs a 2.17 backend; each YAML here needs only what it uses.

    python -m pipelines.hivlp_pipeline                      # compile both (what `make pipeline` runs)
    python -m pipelines.hivlp_pipeline schedule --host URL  # enabled nightly recurring run (pipelines/README.md)

(run from the repository root, which holds the `components` package). Compile-time environment: see
components/base.py (image, data mount path, secret names) and HIVLP_TRAIN_ACCELERATOR (e.g.
`nvidia.com/gpu`: one accelerator for in-pod pretrain and finetune; unset: CPU only).
"""

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any, List

from kfp import compiler, dsl, kubernetes

from components import (
    evaluate,
    export_shard,
    finetune,
    fingerprint_dataset,
    index_embeddings,
    pretrain,
    promote,
    require_valid,
    sample_queries,
    shard_indices,
    stage_dataset,
    validate,
)
from components.base import DATA_MOUNT, HIVLP_IMAGE, IMAGE_CONFIGS, SECRETS, secret_env

REPO = Path(__file__).resolve().parents[1]
PIPELINE_YAML = REPO / "pipelines" / "hivlp.yaml"
FROM_URI_YAML = REPO / "pipelines" / "hivlp-from-uri.yaml"
TRAIN_ACCELERATOR = os.environ.get("HIVLP_TRAIN_ACCELERATOR", "")
NIGHTLY = "0 0 3 * * *"  # KFP cron: seconds first; 03:00 every day
DESCRIPTION = ("Hierarchical image-text embeddings: validate, pre-train, fine-tune, evaluate, gate into the "
               "MLflow registry, export sharded embeddings and index them in Milvus.")


def _resources(task: dsl.PipelineTask, cpu: str, memory: str) -> dsl.PipelineTask:
    return task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)


def _data(task: dsl.PipelineTask, data_pvc: Any) -> dsl.PipelineTask:
    """The task reads the dataset: mount the data claim where every path parameter points."""
    return kubernetes.mount_pvc(task, pvc_name=data_pvc, mount_path=DATA_MOUNT)


def _secrets(task: dsl.PipelineTask, kind: str) -> dsl.PipelineTask:
    """Credentials of `kind` ("mlflow": tracking + artifact store; "milvus") as env vars from secrets."""
    for name, keys in SECRETS[kind].items():
        kubernetes.use_secret_as_env(task, secret_name=name, secret_key_to_env=keys, optional=True)
    return task


def _train_task(task: dsl.PipelineTask, data_pvc: Any) -> dsl.PipelineTask:
    """A training task: in-pod resources, the data claim, MLflow credentials, and what launching a
    PyTorchJob needs (its own image and namespace)."""
    _resources(_secrets(_data(task, data_pvc), "mlflow"), "8", "32G")
    if TRAIN_ACCELERATOR:
        task.set_accelerator_type(TRAIN_ACCELERATOR).set_accelerator_limit(1)
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit="2Gi")
    kubernetes.use_field_path_as_env(task, env_name="POD_NAMESPACE", field_path="metadata.namespace")
    return task.set_env_variable("HIVLP_IMAGE", HIVLP_IMAGE)


def _graph(
    dataset_json: Any, data_digest: Any, image_root: Any, data_pvc: Any, config_dir: Any,
    pretrain_epochs: Any, finetune_epochs: Any, pretrain_overrides: Any, finetune_overrides: Any,
    train_workers: Any, worker_gpus: Any, worker_cpu: Any, worker_memory: Any, job_timeout_hours: Any,
    gate_split: Any, min_r_mean: Any, mlflow_tracking_uri: Any, model_name: Any, export_split: Any,
    num_shards: Any, milvus_uri: Any, index_name: Any, coarse_dim: Any, after: dsl.PipelineTask,
) -> None:
    """Everything after the data is on the volume and its digest known (shared by both pipelines)."""
    checked = _resources(_data(validate(dataset_json=dataset_json, data_digest=data_digest, image_root=image_root),
                               data_pvc), "2", "4G").after(after)
    checked.set_display_name("validate dataset")
    valid = _resources(require_valid(report=checked.outputs["report"]), "1", "1G")
    valid.set_display_name("require a valid dataset")

    job = dict(data_pvc=data_pvc, data_mount=DATA_MOUNT, secret_env=secret_env("mlflow"), train_workers=train_workers,
               worker_gpus=worker_gpus, worker_cpu=worker_cpu, worker_memory=worker_memory,
               job_timeout_hours=job_timeout_hours)
    pre = pretrain(
        dataset_json=dataset_json, data_digest=data_digest, image_root=image_root, config_dir=config_dir,
        epochs=pretrain_epochs, overrides=pretrain_overrides, mlflow_tracking_uri=mlflow_tracking_uri, **job,
    ).after(valid)
    _train_task(pre, data_pvc).set_display_name("pre-train")

    fine = finetune(
        dataset_json=dataset_json, data_digest=data_digest, image_root=image_root, config_dir=config_dir,
        init=pre.outputs["model"], epochs=finetune_epochs, overrides=finetune_overrides,
        mlflow_tracking_uri=mlflow_tracking_uri, **job,
    )
    _train_task(fine, data_pvc).set_display_name("fine-tune")

    scored = evaluate(dataset_json=dataset_json, data_digest=data_digest, image_root=image_root,
                      model=fine.outputs["model"], split=gate_split, min_r_mean=min_r_mean)
    _resources(_data(scored, data_pvc), "4", "8G").set_display_name("evaluate")

    with dsl.If(scored.outputs["Output"] >= min_r_mean, name="ar-above-floor"):
        gate = promote(
            model=fine.outputs["model"], eval_report=scored.outputs["report"], dataset_json=dataset_json,
            image_root=image_root, mlflow_tracking_uri=mlflow_tracking_uri, run_id=fine.outputs["run_id"],
            name=model_name, min_r_mean=min_r_mean, gate_split=gate_split,
        )
        # Reads the data too: the champion is evaluated again on the gate split.
        _resources(_data(_secrets(gate, "mlflow"), data_pvc), "4", "8G").set_display_name("promote to champion")
        gate.set_caching_options(False)

        with dsl.If(gate.outputs["Output"] == True, name="promoted"):  # noqa: E712 (a DSL condition)
            shards = shard_indices(num_shards=num_shards)
            _resources(shards, "1", "1G").set_display_name("plan shards")
            # No `name=` on the loop: with kfp 2.17.3 it breaks dsl.Collected on the backend
            # (kubeflow/pipelines#13239, fixed after 2.17.3).
            with dsl.ParallelFor(shards.output) as shard:
                part = export_shard(
                    dataset_json=dataset_json, data_digest=data_digest, image_root=image_root,
                    model=fine.outputs["model"], shard=shard, num_shards=num_shards, split=export_split,
                )
                _resources(_data(part, data_pvc), "4", "8G").set_display_name("export shard")
                part.set_retry(num_retries=2, backoff_duration="30s", backoff_factor=2)
            built = index_embeddings(
                embeddings=dsl.Collected(part.outputs["embeddings"]), milvus_uri=milvus_uri, name=index_name,
                coarse_dim=coarse_dim,
            )
            _resources(_secrets(built, "milvus"), "2", "8G").set_display_name("index in Milvus")
            built.set_caching_options(False).set_retry(num_retries=3, backoff_duration="60s", backoff_factor=2)
            samples = sample_queries(embeddings=dsl.Collected(part.outputs["embeddings"]), dataset_json=dataset_json,
                                     data_digest=data_digest, image_root=image_root)
            _resources(_data(samples, data_pvc), "2", "4G").set_display_name("sample queries")


# The parameters both pipelines share, described once (the `Args:` of each pipeline's docstring
# compile into the YAML as each parameter's description).
_SHARED_ARGS = """
        data_pvc: Name of the PersistentVolumeClaim that holds the data; every task that reads it mounts it at
            {mount} (ReadWriteMany when train_workers > 1 puts pods on several nodes).
        config_dir: Folder of the recipe YAMLs (pretrain.yaml, finetune.yaml) inside the image.
        pretrain_epochs: Epochs of the pre-training recipe.
        finetune_epochs: Epochs of the fine-tuning recipe.
        pretrain_overrides: Pre-training config fields as key=value, like the CLI's --set, e.g. ["train.lr=3e-4"].
        finetune_overrides: Fine-tuning config fields as key=value, like the CLI's --set.
        train_workers: 1 trains pretrain and finetune in their own pods; N > 1 runs each as a PyTorchJob of N pods
            (Kubeflow Training Operator, torchrun; nccl on GPUs, gloo on CPU) and waits for it.
        worker_gpus: GPUs per PyTorchJob pod when train_workers > 1 (0 = CPU); also the processes per pod.
        worker_cpu: CPU request and limit of each PyTorchJob pod.
        worker_memory: Memory request and limit of each PyTorchJob pod.
        job_timeout_hours: A PyTorchJob that has not succeeded after this long fails the run.
        gate_split: Split the promotion gate is measured on (evaluate's split): one the checkpoint was not
            selected on.
        min_r_mean: Floor on the gate split's AR (percent) for promotion; the second bar is the champion,
            evaluated again in the promote step on the same split (a gain of at least 0.1 AR needed).
        mlflow_tracking_uri: MLflow tracking and registry server (credentials come from the secret
            {mlflow_secret}, never from this URI).
        model_name: Registered model name in MLflow.
        export_split: Split embedded for the Milvus index.
        num_shards: Export shards, embedded in parallel tasks.
        milvus_uri: Milvus server (the token comes from the secret {milvus_secret} as MILVUS_TOKEN).
        index_name: Milvus collection prefix: <name>_coarse and <name>_fine.
        coarse_dim: Dimensions of the coarse level, in evaluation's coarse-to-fine search and the index.
""".format(mount=DATA_MOUNT, mlflow_secret=list(SECRETS["mlflow"])[0], milvus_secret=list(SECRETS["milvus"])[0])


def _doc(summary: str, own_args: str) -> Any:
    def set_doc(fn: Any) -> Any:
        args = re.sub(r"\n {12}", " ", f"{own_args.strip(chr(10))}\n{_SHARED_ARGS.strip(chr(10))}")  # one line each
        fn.__doc__ = f"{summary}\n\n    Args:\n{args}\n    "
        return fn
    return set_doc


@dsl.pipeline(name="hivlp", description=DESCRIPTION)
@_doc("Train, gate and serve hivlp from a dataset on the data volume.", """
        dataset_json: Karpathy-format JSON on the data volume (a path under the mount of data_pvc).
        image_root: Image folder on the data volume; empty means the JSON's own folder.
""")
def hivlp_pipeline(
    dataset_json: str = f"{DATA_MOUNT}/flickr8k/dataset_flickr8k.json",
    image_root: str = "",
    data_pvc: str = "hivlp-data",
    config_dir: str = IMAGE_CONFIGS,
    pretrain_epochs: int = 1,
    finetune_epochs: int = 1,
    pretrain_overrides: List[str] = [],
    finetune_overrides: List[str] = [],
    train_workers: int = 1,
    worker_gpus: int = 0,
    worker_cpu: str = "8",
    worker_memory: str = "32G",
    job_timeout_hours: float = 12.0,
    gate_split: str = "test",
    min_r_mean: float = 40.0,
    mlflow_tracking_uri: str = "http://mlflow.mlflow.svc.cluster.local:5000",
    model_name: str = "hivlp",
    export_split: str = "test",
    num_shards: int = 4,
    milvus_uri: str = "http://milvus.milvus.svc.cluster.local:19530",
    index_name: str = "hivlp",
    coarse_dim: int = 64,
):
    fp = _resources(_data(fingerprint_dataset(dataset_json=dataset_json, image_root=image_root), data_pvc), "2", "2G")
    fp.set_display_name("fingerprint dataset").set_caching_options(False)
    _graph(dataset_json, fp.outputs["digest"], image_root, data_pvc, config_dir, pretrain_epochs, finetune_epochs,
           pretrain_overrides, finetune_overrides, train_workers, worker_gpus, worker_cpu, worker_memory,
           job_timeout_hours, gate_split, min_r_mean, mlflow_tracking_uri, model_name, export_split, num_shards,
           milvus_uri, index_name, coarse_dim, after=fp)


@dsl.pipeline(name="hivlp-from-uri", description=DESCRIPTION + " The dataset is imported from a URI.")
@_doc("Train, gate and serve hivlp from a dataset folder at a URI, staged onto the data volume first.", """
        data_uri: Folder holding the Karpathy JSON and its images (s3://bucket/flickr8k, gs://..., minio://...);
            the KFP launcher downloads it (credentials: the kfp-launcher ConfigMap's providers section).
        dataset_file: Name of the Karpathy JSON inside data_uri; its image paths are relative to it.
        staging_root: Folder on the data volume that receives the copy, under the dataset's digest.
""")
def hivlp_from_uri_pipeline(
    data_uri: str,
    dataset_file: str = "dataset_flickr8k.json",
    staging_root: str = f"{DATA_MOUNT}/staged",
    data_pvc: str = "hivlp-data",
    config_dir: str = IMAGE_CONFIGS,
    pretrain_epochs: int = 1,
    finetune_epochs: int = 1,
    pretrain_overrides: List[str] = [],
    finetune_overrides: List[str] = [],
    train_workers: int = 1,
    worker_gpus: int = 0,
    worker_cpu: str = "8",
    worker_memory: str = "32G",
    job_timeout_hours: float = 12.0,
    gate_split: str = "test",
    min_r_mean: float = 40.0,
    mlflow_tracking_uri: str = "http://mlflow.mlflow.svc.cluster.local:5000",
    model_name: str = "hivlp",
    export_split: str = "test",
    num_shards: int = 4,
    milvus_uri: str = "http://milvus.milvus.svc.cluster.local:19530",
    index_name: str = "hivlp",
    coarse_dim: int = 64,
):
    # reimport: a new artifact per run, so the download is of today's content (the digest keys the cache).
    imported = dsl.importer(artifact_uri=data_uri, artifact_class=dsl.Dataset, reimport=True)
    imported.set_display_name("import dataset")
    staged = stage_dataset(data=imported.output, dataset_file=dataset_file, staging_root=staging_root)
    _resources(_data(staged, data_pvc), "2", "4G").set_display_name("stage dataset on the volume")
    staged.set_caching_options(False)
    _graph(staged.outputs["dataset_json"], staged.outputs["digest"], "", data_pvc, config_dir, pretrain_epochs,
           finetune_epochs, pretrain_overrides, finetune_overrides, train_workers, worker_gpus, worker_cpu,
           worker_memory, job_timeout_hours, gate_split, min_r_mean, mlflow_tracking_uri, model_name, export_split,
           num_shards, milvus_uri, index_name, coarse_dim, after=staged)


def compile_pipeline(path: str | Path = PIPELINE_YAML, from_uri_path: str | Path | None = FROM_URI_YAML) -> list[Path]:
    """Compile `hivlp.yaml` (and `hivlp-from-uri.yaml` unless `from_uri_path` is None)."""
    compiler.Compiler().compile(hivlp_pipeline, str(path))
    out = [Path(path)]
    if from_uri_path is not None:
        compiler.Compiler().compile(hivlp_from_uri_pipeline, str(from_uri_path))
        out.append(Path(from_uri_path))
    return out


def create_schedule(
    host: str | None = None,
    experiment: str = "hivlp",
    job_name: str = "hivlp-nightly",
    cron: str = NIGHTLY,
    package: str | Path = PIPELINE_YAML,
    params: dict | None = None,
    client: Any = None,
) -> str:
    """An enabled recurring run of the compiled pipeline on the KFP server at `host`; returns its id.

    Same as `kfp --endpoint HOST recurring-run create --experiment-name EXP --job-name NAME
    --pipeline-package-path pipelines/hivlp.yaml --cron-expression '0 0 3 * * *' --max-concurrency 1
    --enabled`. One run at a time, no catch-up of missed nights. `enable_caching` is left unset: setting
    it would override every root-level task's own caching option (the uncached fingerprint included).
    """
    if client is None:
        from kfp import Client

        client = Client(host=host)
    exp = client.create_experiment(experiment)  # returns the existing one if the name is taken
    job = client.create_recurring_run(
        experiment_id=exp.experiment_id, job_name=job_name, cron_expression=cron,
        pipeline_package_path=str(package), params=params or {}, max_concurrency=1, no_catchup=True,
        enabled=True,
    )
    return job.recurring_run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile the hivlp pipelines, or schedule one on a KFP server.")
    parser.add_argument("--output", default=str(PIPELINE_YAML), help="compiled YAML (default: %(default)s)")
    parser.add_argument("--from-uri-output", default=str(FROM_URI_YAML),
                        help="compiled YAML of the pipeline that imports the data from a URI (default: %(default)s)")
    sub = parser.add_subparsers(dest="command")
    sched = sub.add_parser("schedule", help="create an enabled recurring run of the compiled YAML (--output)")
    sched.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    sched.add_argument("--experiment", default="hivlp")
    sched.add_argument("--job-name", default="hivlp-nightly")
    sched.add_argument("--cron", default=NIGHTLY, help="6-field cron, seconds first (default: %(default)r)")
    sched.add_argument("params", nargs="*", metavar="KEY=VALUE", help="pipeline parameters of every run")
    args = parser.parse_args(argv)
    if args.command == "schedule":
        params = dict(p.split("=", 1) for p in args.params if "=" in p)
        bad = [p for p in args.params if "=" not in p]
        if bad:
            parser.error(f"parameter {bad[0]!r}: write it as KEY=VALUE, e.g. min_r_mean=42")
        job_id = create_schedule(args.host, args.experiment, args.job_name, args.cron, args.output, params)
        print(f"recurring run {job_id} (enabled): {args.cron} in experiment {args.experiment}")
    else:
        for path in compile_pipeline(args.output, args.from_uri_output):
            print(f"compiled {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
