"""Evaluate a checkpoint on a split (`hivlp evaluate`): R@K and AR at every level and coarse-to-fine.

Returns the full-level AR (`r_mean`) as the task's output, which the pipeline's promotion floor reads,
and a Markdown summary (the per-level table and the floor's decision) for the run page.
"""

from kfp.dsl import Artifact, Input, Markdown, Metrics, Model, Output

from components.base import hivlp_component


@hivlp_component
def evaluate(
    dataset_json: str,
    data_digest: str,
    model: Input[Model],
    metrics: Output[Metrics],
    report: Output[Artifact],
    summary: Output[Markdown],
    image_root: str = "",
    split: str = "test",
    shortlist: int = 100,
    coarse_dim: int = 64,
    min_r_mean: float = 0.0,
) -> float:
    """Evaluate the checkpoint on one split of the dataset.

    Args:
        dataset_json: Karpathy-format JSON inside the container (on the data volume).
        data_digest: Content digest of the dataset (the cache key: changed data is evaluated again).
        model: The checkpoint to evaluate.
        image_root: Image folder; empty means the JSON's own folder.
        split: The split evaluated (the promotion gate's split).
        shortlist: Coarse-to-fine shortlist size.
        coarse_dim: Dimensions of the coarse level in coarse-to-fine search.
        min_r_mean: The pipeline's floor on AR, stated in the summary with its decision.

    Returns:
        metrics: Headline numbers: the full level's recalls, AR per level, coarse-to-fine AR.
        report: metrics.json as `hivlp evaluate --out` writes it (what the promote step reads).
        summary: Markdown: the per-level R@K table and the floor's decision.
        Output: Full-level AR (percent).
    """
    from hivlp.io import atomic_write_json, atomic_write_text
    from hivlp.retrieval.evaluate import evaluate_checkpoint, format_markdown

    result = evaluate_checkpoint(
        model.path, dataset_json, split=split, image_root=image_root or None, shortlist=shortlist,
        coarse_dim=coarse_dim, progress=False,
    )
    atomic_write_json(report.path, result)
    atomic_write_text(summary.path, format_markdown(result, min_r_mean=min_r_mean))
    report.metadata.update({"split": split, "data_digest": data_digest})
    for key, value in result["full"].items():
        metrics.log_metric(key, value)
    for key, block in result.items():
        if key.startswith("dim_"):
            metrics.log_metric(f"{key}_r_mean", block["r_mean"])
    metrics.log_metric("coarse_to_fine_r_mean", result["coarse_to_fine"]["r_mean"])
    atomic_write_json(metrics.path, metrics.metadata)  # a file too: kfp.local caches only artifacts with files
    return float(result["full"]["r_mean"])
