"""Evaluate a checkpoint on a split (`hivlp evaluate`): R@K and AR at every level and coarse-to-fine.

Returns the full-level AR (`r_mean`) as the task's output, which the pipeline's promotion gate reads.
"""

from kfp.dsl import Artifact, Input, Metrics, Model, Output

from components.base import hivlp_component


@hivlp_component
def evaluate(
    dataset_json: str,
    model: Input[Model],
    metrics: Output[Metrics],
    report: Output[Artifact],
    image_root: str = "",
    split: str = "val",
    shortlist: int = 100,
    coarse_dim: int = 64,
) -> float:
    """The metrics.json of `hivlp evaluate` as the report artifact; headline numbers as KFP metrics."""
    from hivlp.io import atomic_write_json
    from hivlp.retrieval.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(
        model.path, dataset_json, split=split, image_root=image_root or None, shortlist=shortlist,
        coarse_dim=coarse_dim, progress=False,
    )
    atomic_write_json(report.path, result)
    for key, value in result["full"].items():
        metrics.log_metric(key, value)
    for key, block in result.items():
        if key.startswith("dim_"):
            metrics.log_metric(f"{key}_r_mean", block["r_mean"])
    metrics.log_metric("coarse_to_fine_r_mean", result["coarse_to_fine"]["r_mean"])
    return float(result["full"]["r_mean"])
