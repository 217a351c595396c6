"""Pre-training and fine-tuning (`hivlp pretrain` / `hivlp finetune`): one engine, two recipes.

`train_workers` = 1 trains in the task's own pod; N > 1 launches a PyTorchJob of N pods through the
Kubeflow Training Operator running the same command under torchrun, waits for it and takes its
checkpoint (`hivlp.train.cluster`). Either way the checkpoint is the task's Model artifact and the
MLflow run id comes back as an output for the promote step.
"""

from typing import Dict, List, NamedTuple

from kfp.dsl import Input, Metrics, Model, Output

from components.base import hivlp_component


@hivlp_component
def pretrain(
    dataset_json: str,
    data_digest: str,
    model: Output[Model],
    metrics: Output[Metrics],
    config_dir: str,
    image_root: str = "",
    epochs: int = 1,
    overrides: List[str] = [],
    mlflow_tracking_uri: str = "",
    train_workers: int = 1,
    worker_gpus: int = 0,
    worker_cpu: str = "8",
    worker_memory: str = "32G",
    data_pvc: str = "",
    data_mount: str = "/data",
    secret_env: Dict[str, List[str]] = {},
    job_timeout_hours: float = 12.0,
) -> NamedTuple("TrainOutputs", [("run_id", str), ("best_val_r_mean", float)]):
    """Train the hierarchical heads (and the top of the towers) from the pretrained towers.

    Args:
        dataset_json: Karpathy-format JSON inside the container (on the data volume).
        data_digest: Content digest of the dataset (the cache key: changed data retrains).
        config_dir: Folder of the recipe YAMLs (`pretrain.yaml`) inside the image.
        image_root: Image folder; empty means the JSON's own folder.
        epochs: Training epochs.
        overrides: Config fields as `key=value`, like the CLI's `--set`.
        mlflow_tracking_uri: MLflow tracking server; empty means $MLFLOW_TRACKING_URI.
        train_workers: 1 trains in this pod; N > 1 runs a PyTorchJob of N pods and waits for it.
        worker_gpus: GPUs per PyTorchJob pod (0: CPU, gloo); also the processes per pod.
        worker_cpu: CPU request and limit of each PyTorchJob pod.
        worker_memory: Memory request and limit of each PyTorchJob pod.
        data_pvc: The data PersistentVolumeClaim, mounted by every PyTorchJob pod.
        data_mount: Where the claim is mounted (in this pod and in the job's pods).
        secret_env: Environment of the job's pods from secrets: {ENV_VAR: [secret name, key]}.
        job_timeout_hours: Give up on the PyTorchJob after this long.

    Returns:
        model: The checkpoint folder (best epoch by val AR).
        metrics: Best val AR and training time.
        run_id: The MLflow run of the training.
        best_val_r_mean: Best val AR (percent) during training.
    """
    from hivlp.io import atomic_write_json
    from hivlp.train.cluster import ClusterTraining, train_recipe

    cluster = None if train_workers <= 1 else ClusterTraining(
        workers=train_workers, gpus_per_worker=worker_gpus, cpu=worker_cpu, memory=worker_memory,
        data_pvc=data_pvc, data_mount=data_mount, secret_env={k: tuple(v) for k, v in secret_env.items()},
        labels={"hivlp/recipe": "pretrain", "hivlp/data-digest": data_digest[:16]},
        timeout_s=int(job_timeout_hours * 3600),
    )
    result = train_recipe("pretrain", model.path, config=f"{config_dir}/pretrain.yaml", datasets=[dataset_json],
                          image_root=image_root or None, overrides=[f"train.epochs={epochs}", *overrides],
                          tracking_uri=mlflow_tracking_uri or None, cluster=cluster)
    metrics.log_metric("best_val_r_mean", result.best_metric)
    metrics.log_metric("train_minutes", result.seconds / 60)
    atomic_write_json(metrics.path, metrics.metadata)  # a file too: kfp.local caches only artifacts with files
    model.metadata.update({"recipe": "pretrain", "best_epoch": result.best_epoch, "mlflow_run_id": result.run_id or "",
                           "data_digest": data_digest, "train_workers": max(1, train_workers)})
    return (result.run_id or "", result.best_metric)


@hivlp_component
def finetune(
    dataset_json: str,
    data_digest: str,
    init: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
    config_dir: str,
    image_root: str = "",
    epochs: int = 1,
    overrides: List[str] = [],
    mlflow_tracking_uri: str = "",
    train_workers: int = 1,
    worker_gpus: int = 0,
    worker_cpu: str = "8",
    worker_memory: str = "32G",
    data_pvc: str = "",
    data_mount: str = "/data",
    secret_env: Dict[str, List[str]] = {},
    job_timeout_hours: float = 12.0,
) -> NamedTuple("TrainOutputs", [("run_id", str), ("best_val_r_mean", float)]):
    """Continue from the pre-trained checkpoint `init` with the fine-tuning recipe.

    Args:
        dataset_json: Karpathy-format JSON inside the container (on the data volume).
        data_digest: Content digest of the dataset (the cache key: changed data retrains).
        init: The pre-trained checkpoint.
        config_dir: Folder of the recipe YAMLs (`finetune.yaml`) inside the image.
        image_root: Image folder; empty means the JSON's own folder.
        epochs: Training epochs.
        overrides: Config fields as `key=value`, like the CLI's `--set`.
        mlflow_tracking_uri: MLflow tracking server; empty means $MLFLOW_TRACKING_URI.
        train_workers: 1 trains in this pod; N > 1 runs a PyTorchJob of N pods and waits for it.
        worker_gpus: GPUs per PyTorchJob pod (0: CPU, gloo); also the processes per pod.
        worker_cpu: CPU request and limit of each PyTorchJob pod.
        worker_memory: Memory request and limit of each PyTorchJob pod.
        data_pvc: The data PersistentVolumeClaim, mounted by every PyTorchJob pod.
        data_mount: Where the claim is mounted (in this pod and in the job's pods).
        secret_env: Environment of the job's pods from secrets: {ENV_VAR: [secret name, key]}.
        job_timeout_hours: Give up on the PyTorchJob after this long.

    Returns:
        model: The fine-tuned checkpoint folder (best epoch by val AR).
        metrics: Best val AR and training time.
        run_id: The MLflow run of the training.
        best_val_r_mean: Best val AR (percent) during training.
    """
    from hivlp.io import atomic_write_json
    from hivlp.train.cluster import ClusterTraining, train_recipe

    cluster = None if train_workers <= 1 else ClusterTraining(
        workers=train_workers, gpus_per_worker=worker_gpus, cpu=worker_cpu, memory=worker_memory,
        data_pvc=data_pvc, data_mount=data_mount, secret_env={k: tuple(v) for k, v in secret_env.items()},
        labels={"hivlp/recipe": "finetune", "hivlp/data-digest": data_digest[:16]},
        timeout_s=int(job_timeout_hours * 3600),
    )
    result = train_recipe("finetune", model.path, config=f"{config_dir}/finetune.yaml", datasets=[dataset_json],
                          image_root=image_root or None, overrides=[f"train.epochs={epochs}", *overrides],
                          init=init.path, tracking_uri=mlflow_tracking_uri or None, cluster=cluster)
    metrics.log_metric("best_val_r_mean", result.best_metric)
    metrics.log_metric("train_minutes", result.seconds / 60)
    atomic_write_json(metrics.path, metrics.metadata)  # a file too: kfp.local caches only artifacts with files
    model.metadata.update({"recipe": "finetune", "best_epoch": result.best_epoch, "mlflow_run_id": result.run_id or "",
                           "data_digest": data_digest, "train_workers": max(1, train_workers)})
    return (result.run_id or "", result.best_metric)
