"""Register the fine-tuned checkpoint in MLflow and gate it onto the champion alias (`hivlp promote`,
`hivlp.gate`: metrics bound to the checkpoint, the champion re-evaluated on the same split)."""

from kfp.dsl import Artifact, Input, Markdown, Model, Output

from components.base import hivlp_component


@hivlp_component
def promote(
    model: Input[Model],
    eval_report: Input[Artifact],
    dataset_json: str,
    mlflow_tracking_uri: str,
    decision: Output[Artifact],
    decision_page: Output[Markdown],
    image_root: str = "",
    run_id: str = "",
    name: str = "hivlp",
    min_r_mean: float = 0.0,
    min_delta: float = 0.1,
    alias: str = "champion",
    gate_split: str = "test",
) -> bool:
    """Register the model (the one its training run logged; a version holding the same weights is
    reused), re-evaluate the current champion on the same split, apply the gate, return whether the
    model holds the alias (promoted now, or already the champion).

    Gated out is not a failure: the version stays registered, without the alias, its decision in its
    `hivlp.*` tags and in the `decision` artifacts. (One plain output rather than a NamedTuple: the
    pipeline branches on it, and kfp.local resolves conditions only on single outputs.)

    Args:
        model: The fine-tuned checkpoint.
        eval_report: Its evaluation on the gate's split (metrics.json of the evaluate task: weights hash,
            split and dataset recorded, checked against the model).
        dataset_json: The dataset the champion is re-evaluated on (the one eval_report measured).
        mlflow_tracking_uri: MLflow tracking and registry server; empty means $MLFLOW_TRACKING_URI.
        image_root: Image folder; empty means the JSON's own folder.
        run_id: The MLflow training run the model is logged into if training did not log it.
        name: Registered model name.
        min_r_mean: Floor on AR (percent) for promotion.
        min_delta: Gain in AR over the re-evaluated champion needed to promote (a tie never promotes).
        alias: The alias a winning version takes.
        gate_split: The split the gate's numbers are measured on (stated in the decision).

    Returns:
        decision: The gate's decision as JSON (version, values compared, reason).
        decision_page: The same as Markdown for the run page.
        Output: Whether the model holds the alias now (promoted, or already the champion).
    """
    from hivlp.gate import promote
    from hivlp.io import atomic_write_json, atomic_write_text
    from hivlp.pages import markdown_record

    result = promote(
        model.path, eval_report.path, gate_split=gate_split, dataset=dataset_json, image_root=image_root or None,
        name=name, alias=alias, min_delta=min_delta, min_value=min_r_mean, run_id=run_id or None,
        tracking_uri=mlflow_tracking_uri or None,
    )
    record = result.to_dict()
    atomic_write_json(decision.path, record)
    verdict = result.status.replace("-", " ")
    atomic_write_text(decision_page.path, markdown_record(f"Registry gate: {name} v{result.version} {verdict}",
                                                          result.reason, record))
    decision.metadata.update({"version": result.version, "model_uri": result.model_uri, "promoted": result.promoted})
    print(result.reason)
    return result.promoted
