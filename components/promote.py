"""Register the fine-tuned checkpoint in MLflow and gate it onto the champion alias (`hivlp promote`)."""

from kfp.dsl import Artifact, Input, Model, Output

from components.base import hivlp_component


@hivlp_component
def promote(
    model: Input[Model],
    eval_report: Input[Artifact],
    mlflow_tracking_uri: str,
    decision: Output[Artifact],
    run_id: str = "",
    name: str = "hivlp",
    min_r_mean: float = 0.0,
    alias: str = "champion",
) -> bool:
    """Log + register the model (into the training run `run_id` if given), apply the gate, return
    whether the version took the alias.

    Gated out is not a failure: the version stays registered, without the alias, its decision in its
    `hivlp.*` tags and in the `decision` artifact. (One plain output rather than a NamedTuple: the
    pipeline branches on it, and kfp.local resolves conditions only on single outputs.)
    """
    from hivlp.io import atomic_write_json
    from hivlp.registry import register_and_promote

    result = register_and_promote(
        model.path, metrics_path=eval_report.path, run_id=run_id or None, name=name, min_value=min_r_mean,
        alias=alias, tracking_uri=mlflow_tracking_uri or None,
    )
    atomic_write_json(decision.path, result.to_dict())
    decision.metadata.update({"version": result.version, "model_uri": result.model_uri, "promoted": result.promoted})
    print(result.reason)
    return result.promoted
