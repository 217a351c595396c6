"""Register the fine-tuned checkpoint in MLflow and gate it onto the champion alias (`hivlp promote`)."""

from kfp.dsl import Artifact, Input, Markdown, Model, Output

from components.base import hivlp_component


@hivlp_component
def promote(
    model: Input[Model],
    eval_report: Input[Artifact],
    mlflow_tracking_uri: str,
    decision: Output[Artifact],
    decision_page: Output[Markdown],
    run_id: str = "",
    name: str = "hivlp",
    min_r_mean: float = 0.0,
    alias: str = "champion",
    gate_split: str = "test",
) -> bool:
    """Log + register the model (into the training run `run_id` if given), apply the gate, return
    whether the version took the alias.

    Gated out is not a failure: the version stays registered, without the alias, its decision in its
    `hivlp.*` tags and in the `decision` artifacts. (One plain output rather than a NamedTuple: the
    pipeline branches on it, and kfp.local resolves conditions only on single outputs.)

    Args:
        model: The fine-tuned checkpoint.
        eval_report: Its evaluation on the gate's split (metrics.json of the evaluate task).
        mlflow_tracking_uri: MLflow tracking and registry server; empty means $MLFLOW_TRACKING_URI.
        run_id: The MLflow training run the model is logged into.
        name: Registered model name.
        min_r_mean: Floor on AR (percent) for promotion; the champion's AR is the second bar.
        alias: The alias a winning version takes.
        gate_split: The split the gate's numbers are measured on (stated in the decision).

    Returns:
        decision: The gate's decision as JSON (version, values compared, reason).
        decision_page: The same as Markdown for the run page.
        Output: Whether the new version took the alias.
    """
    from hivlp.io import atomic_write_json, atomic_write_text
    from hivlp.pages import markdown_record
    from hivlp.registry import register_and_promote

    result = register_and_promote(
        model.path, metrics_path=eval_report.path, run_id=run_id or None, name=name, min_value=min_r_mean,
        alias=alias, tracking_uri=mlflow_tracking_uri or None,
    )
    record = {**result.to_dict(), "gate_split": gate_split}
    atomic_write_json(decision.path, record)
    verdict = "promoted" if result.promoted else "gated out"
    atomic_write_text(decision_page.path, markdown_record(f"Registry gate: {name} v{result.version} {verdict}",
                                                          result.reason, record))
    decision.metadata.update({"version": result.version, "model_uri": result.model_uri, "promoted": result.promoted})
    print(result.reason)
    return result.promoted
