"""Validate the dataset before anything trains on it (`hivlp validate`), then stop the run on errors.

Two tasks: `validate` always succeeds and publishes its report (JSON + HTML page), `require_valid`
fails the run when the report has errors. One task that failed would publish nothing on Kubeflow (a
failed task's output artifacts are not uploaded), and the report is what says what to fix.
"""

from kfp.dsl import HTML, Artifact, Input, Metrics, Output

from components.base import hivlp_component


@hivlp_component
def validate(
    dataset_json: str,
    data_digest: str,
    report: Output[Artifact],
    page: Output[HTML],
    metrics: Output[Metrics],
    image_root: str = "",
) -> bool:
    """Schema, caption and image-file checks of a Karpathy JSON (great-expectations rules).

    Args:
        dataset_json: Karpathy-format JSON inside the container (on the data volume).
        data_digest: Content digest of the dataset (the cache key: a changed dataset is validated again).
        image_root: Image folder; empty means the JSON's own folder.

    Returns:
        report: The validation report as JSON (counts, every expectation's result, every problem).
        page: The same report as a readable HTML page (verdict, counts, expectations, problems and fixes).
        metrics: Images, captions, errors and warnings.
        Output: Whether the dataset has no errors.
    """
    from hivlp.data.validate import format_html, format_summary, validate_dataset
    from hivlp.io import atomic_write_json, atomic_write_text

    result = validate_dataset(dataset_json, image_root=image_root or None, progress=False)
    atomic_write_json(report.path, result.to_dict())
    atomic_write_text(page.path, format_html(result))
    report.metadata.update({"data_digest": data_digest, "ok": result.ok})
    for key in ("images", "captions"):
        metrics.log_metric(key, result.counts[key])
    metrics.log_metric("errors", len(result.errors))
    metrics.log_metric("warnings", len(result.warnings))
    atomic_write_json(metrics.path, metrics.metadata)  # a file too: kfp.local caches only artifacts with files
    print(format_summary(result))
    return result.ok


@hivlp_component
def require_valid(report: Input[Artifact]):
    """Fail the run when the validation report has errors (one line; the report page has the details).

    Args:
        report: The JSON report of the validate task.
    """
    import json

    from hivlp.data.validate import require_valid as check

    with open(report.path) as f:
        check(json.load(f), "dataset validation")
