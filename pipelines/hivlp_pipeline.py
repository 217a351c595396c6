"""The hivlp training pipeline for Kubeflow Pipelines, compiled to pipelines/hivlp.yaml.

    validate -> pretrain -> finetune -> evaluate -> [AR >= min_r_mean] promote
                                                       -> [promoted] export x N shards -> index

Export and index run only for a model that took the champion alias, so the Milvus collections
always hold the embeddings of the model that `models:/<name>@champion` serves (indexing a model
that lost the gate would overwrite the served index with a worse one).

    python -m pipelines.hivlp_pipeline                      # compile (what `make pipeline` runs)
    python -m pipelines.hivlp_pipeline schedule --host URL  # nightly recurring run, see pipelines/README.md

(run from the repository root, which holds the `components` package).

Compile-time environment: HIVLP_IMAGE (components' base image), HIVLP_TRAIN_ACCELERATOR (e.g.
`nvidia.com/gpu`: one accelerator for pretrain and finetune; unset: CPU only).
"""

import argparse
import os
import sys
from pathlib import Path
from typing import List

from kfp import compiler, dsl

from components import (
    evaluate,
    export_shard,
    finetune,
    index_embeddings,
    pretrain,
    promote,
    shard_indices,
    validate,
)

REPO = Path(__file__).resolve().parents[1]
PIPELINE_YAML = REPO / "pipelines" / "hivlp.yaml"
TRAIN_ACCELERATOR = os.environ.get("HIVLP_TRAIN_ACCELERATOR", "")
NIGHTLY = "0 0 3 * * *"  # KFP cron: seconds first; 03:00 every day


def _resources(task: dsl.PipelineTask, cpu: str, memory: str) -> dsl.PipelineTask:
    return task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)


def _train_resources(task: dsl.PipelineTask) -> dsl.PipelineTask:
    _resources(task, "8", "32G")
    if TRAIN_ACCELERATOR:
        task.set_accelerator_type(TRAIN_ACCELERATOR).set_accelerator_limit(1)
    return task


@dsl.pipeline(
    name="hivlp",
    description="Hierarchical image-text embeddings: validate, pre-train, fine-tune, evaluate, "
    "gate into the MLflow registry, export sharded embeddings and index them in Milvus.",
)
def hivlp_pipeline(
    dataset_json: str = "/data/flickr8k/dataset_flickr8k.json",
    image_root: str = "",
    pretrain_epochs: int = 1,
    finetune_epochs: int = 1,
    pretrain_overrides: List[str] = [],
    finetune_overrides: List[str] = [],
    eval_split: str = "val",
    min_r_mean: float = 40.0,
    mlflow_tracking_uri: str = "http://mlflow.mlflow.svc.cluster.local:5000",
    model_name: str = "hivlp",
    export_split: str = "test",
    num_shards: int = 4,
    milvus_uri: str = "http://milvus.milvus.svc.cluster.local:19530",
    index_name: str = "hivlp",
    coarse_dim: int = 64,
):
    """`dataset_json`/`image_root` are paths inside the containers (a mounted volume or a FUSE bucket);
    an empty `image_root` means the JSON's own folder. Overrides are `key=value` config fields."""
    checked = _resources(validate(dataset_json=dataset_json, image_root=image_root), "2", "4G")
    checked.set_display_name("validate dataset")

    pre = pretrain(
        dataset_json=dataset_json, image_root=image_root, epochs=pretrain_epochs, overrides=pretrain_overrides,
        mlflow_tracking_uri=mlflow_tracking_uri,
    ).after(checked)
    _train_resources(pre).set_display_name("pre-train")

    fine = finetune(
        dataset_json=dataset_json, image_root=image_root, init=pre.outputs["model"], epochs=finetune_epochs,
        overrides=finetune_overrides, mlflow_tracking_uri=mlflow_tracking_uri,
    )
    _train_resources(fine).set_display_name("fine-tune")

    scored = evaluate(dataset_json=dataset_json, image_root=image_root, model=fine.outputs["model"], split=eval_split)
    _resources(scored, "4", "8G").set_display_name("evaluate")

    with dsl.If(scored.outputs["Output"] >= min_r_mean, name="ar-above-floor"):
        gate = promote(
            model=fine.outputs["model"], eval_report=scored.outputs["report"], mlflow_tracking_uri=mlflow_tracking_uri,
            run_id=fine.outputs["run_id"], name=model_name, min_r_mean=min_r_mean,
        )
        _resources(gate, "2", "8G").set_display_name("promote to champion").set_caching_options(False)

        with dsl.If(gate.outputs["Output"] == True, name="promoted"):  # noqa: E712 (a DSL condition)
            shards = shard_indices(num_shards=num_shards)
            _resources(shards, "1", "1G").set_display_name("plan shards")
            with dsl.ParallelFor(shards.output, name="export-shards") as shard:
                part = export_shard(
                    dataset_json=dataset_json, image_root=image_root, model=fine.outputs["model"], shard=shard,
                    num_shards=num_shards, split=export_split,
                )
                _resources(part, "4", "8G").set_display_name("export shard")
                part.set_retry(num_retries=2, backoff_duration="30s", backoff_factor=2)
            built = index_embeddings(
                embeddings=dsl.Collected(part.outputs["embeddings"]), milvus_uri=milvus_uri, name=index_name,
                coarse_dim=coarse_dim,
            )
            _resources(built, "2", "8G").set_display_name("index in Milvus").set_caching_options(False)
            built.set_retry(num_retries=3, backoff_duration="60s", backoff_factor=2)


def compile_pipeline(path: str | Path = PIPELINE_YAML) -> Path:
    compiler.Compiler().compile(hivlp_pipeline, str(path))
    return Path(path)


def create_schedule(
    host: str,
    experiment: str = "hivlp",
    job_name: str = "hivlp-nightly",
    cron: str = NIGHTLY,
    package: str | Path = PIPELINE_YAML,
    params: dict | None = None,
) -> str:
    """A recurring run of the compiled pipeline on the KFP server at `host`; returns its id.

    Same as `kfp --endpoint HOST recurring-run create --experiment-name EXP --job-name NAME
    --pipeline-package-path pipelines/hivlp.yaml --cron-expression '0 0 3 * * *'`.
    """
    from kfp import Client

    client = Client(host=host)
    exp = client.create_experiment(experiment)  # returns the existing one if the name is taken
    job = client.create_recurring_run(
        experiment_id=exp.experiment_id, job_name=job_name, cron_expression=cron,
        pipeline_package_path=str(package), params=params or {}, max_concurrency=1, no_catchup=True,
    )
    return job.recurring_run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile the hivlp pipeline, or schedule it on a KFP server.")
    parser.add_argument("--output", default=str(PIPELINE_YAML), help="compiled YAML (default: %(default)s)")
    sub = parser.add_subparsers(dest="command")
    sched = sub.add_parser("schedule", help="create a recurring run of the compiled YAML")
    sched.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    sched.add_argument("--experiment", default="hivlp")
    sched.add_argument("--job-name", default="hivlp-nightly")
    sched.add_argument("--cron", default=NIGHTLY, help="6-field cron, seconds first (default: %(default)r)")
    args = parser.parse_args(argv)
    if args.command == "schedule":
        job_id = create_schedule(args.host, args.experiment, args.job_name, args.cron, args.output)
        print(f"recurring run {job_id}: {args.cron} in experiment {args.experiment}")
    else:
        print(f"compiled {compile_pipeline(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
