"""Pre-training and fine-tuning (`hivlp pretrain` / `hivlp finetune`): one engine, two recipes.

`overrides` are `key=value` config fields as on the CLI's `--set` (e.g. `train.lr=1e-4`). The
checkpoint is the Model artifact; the MLflow run id comes back as an output for the promote step.
"""

from typing import List, NamedTuple

from kfp.dsl import Input, Metrics, Model, Output

from components.base import hivlp_component


@hivlp_component
def pretrain(
    dataset_json: str,
    model: Output[Model],
    metrics: Output[Metrics],
    image_root: str = "",
    epochs: int = 1,
    overrides: List[str] = [],
    config: str = "configs/pretrain.yaml",
    mlflow_tracking_uri: str = "",
) -> NamedTuple("TrainOutputs", [("run_id", str), ("best_val_r_mean", float)]):
    """Train the hierarchical heads (and the top of the towers) from the pretrained towers."""
    import os

    from hivlp.train.trainer import run_recipe

    if mlflow_tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_tracking_uri
    result = run_recipe(config, model.path, "pretrain", datasets=[dataset_json], image_root=image_root or None,
                        overrides=[f"train.epochs={epochs}", *overrides], init=None, keep_resume_state=False)
    metrics.log_metric("best_val_r_mean", result.best_metric)
    metrics.log_metric("train_minutes", result.seconds / 60)
    model.metadata.update({"recipe": "pretrain", "best_epoch": result.best_epoch, "mlflow_run_id": result.run_id or ""})
    return (result.run_id or "", result.best_metric)


@hivlp_component
def finetune(
    dataset_json: str,
    init: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
    image_root: str = "",
    epochs: int = 1,
    overrides: List[str] = [],
    config: str = "configs/finetune.yaml",
    mlflow_tracking_uri: str = "",
) -> NamedTuple("TrainOutputs", [("run_id", str), ("best_val_r_mean", float)]):
    """Continue from the pre-trained checkpoint `init` with the fine-tuning recipe."""
    import os

    from hivlp.train.trainer import run_recipe

    if mlflow_tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_tracking_uri
    result = run_recipe(config, model.path, "finetune", datasets=[dataset_json], image_root=image_root or None,
                        overrides=[f"train.epochs={epochs}", *overrides], init=init.path, keep_resume_state=False)
    metrics.log_metric("best_val_r_mean", result.best_metric)
    metrics.log_metric("train_minutes", result.seconds / 60)
    model.metadata.update({"recipe": "finetune", "best_epoch": result.best_epoch, "mlflow_run_id": result.run_id or ""})
    return (result.run_id or "", result.best_metric)
