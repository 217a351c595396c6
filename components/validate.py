"""Validate the dataset before anything trains on it (`hivlp validate`); errors fail the run."""

from kfp.dsl import Artifact, Metrics, Output

from components.base import hivlp_component


@hivlp_component
def validate(dataset_json: str, report: Output[Artifact], metrics: Output[Metrics], image_root: str = ""):
    """Schema, caption and image-file checks of a Karpathy JSON; the JSON report is the artifact."""
    from hivlp.data.validate import format_summary, validate_dataset
    from hivlp.errors import DatasetError
    from hivlp.io import atomic_write_json

    result = validate_dataset(dataset_json, image_root=image_root or None, progress=False)
    atomic_write_json(report.path, result.to_dict())
    for key in ("images", "captions"):
        metrics.log_metric(key, result.counts[key])
    metrics.log_metric("errors", len(result.errors))
    metrics.log_metric("warnings", len(result.warnings))
    print(format_summary(result))
    if not result.ok:
        raise DatasetError(f"{dataset_json}: {len(result.errors)} validation errors (see the report artifact)")
