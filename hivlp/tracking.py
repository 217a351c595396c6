"""MLflow tracking: runs, params, per-step and per-epoch metrics, checkpoints as artifacts.

Defaults keep everything local and explicit: the tracking store is SQLite at `outputs/mlflow.db` and
artifacts go to `outputs/mlartifacts` (MLflow 3 would otherwise default artifacts to ./mlruns).
`MLFLOW_TRACKING_URI` overrides the store, e.g. a tracking server shared by a team.

Every run records its lineage (`hivlp.lineage`: git commit, dataset inputs with digests, the resolved
config, the parent run) and never a credential (params and config go through `hivlp.redact.scrub`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hivlp.config import RunConfig, TrackingConfig
from hivlp.lineage import log_lineage
from hivlp.redact import redact, scrub

log = logging.getLogger(__name__)

DEFAULT_STORE = Path("outputs/mlflow.db")
DEFAULT_ARTIFACTS = Path("outputs/mlartifacts")


def tracking_uri(cfg: TrackingConfig | None = None) -> str:
    if cfg is not None and cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    DEFAULT_STORE.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{DEFAULT_STORE.resolve()}"


def artifact_location(cfg: TrackingConfig | None = None) -> str:
    if cfg is not None and cfg.artifact_location:
        return cfg.artifact_location
    DEFAULT_ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return DEFAULT_ARTIFACTS.resolve().as_uri()


def is_local_store(uri: str) -> bool:
    """A store on this machine's disk (sqlite, file, or a bare path), which gets an explicit artifact
    folder; any other scheme is a server that chooses its own artifact store."""
    return urlparse(uri).scheme in ("", "sqlite", "file")


def _param_value(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


class RunTracker:
    """One MLflow run. A disabled tracker (tracking off, or a non-zero DDP rank) does nothing."""

    def __init__(self, run_config: RunConfig, enabled: bool = True, parent_run_id: str | None = None,
                 parent_weights_sha256: str | None = None) -> None:
        self.cfg = run_config.tracking
        self.run_config = run_config
        self.enabled = enabled and self.cfg.enabled
        self.parent_run_id = parent_run_id
        self.parent_weights_sha256 = parent_weights_sha256
        self.run_id: str | None = None
        self._mlflow = None

    def __enter__(self) -> RunTracker:
        if not self.enabled:
            return self
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri(self.cfg))
        exp = mlflow.get_experiment_by_name(self.cfg.experiment)
        if exp is None:
            mlflow.create_experiment(
                self.cfg.experiment,
                artifact_location=artifact_location(self.cfg) if is_local_store(tracking_uri(self.cfg)) else None,
            )
        mlflow.set_experiment(self.cfg.experiment)
        run = mlflow.start_run(
            run_name=self.cfg.run_name or self.run_config.recipe,
            log_system_metrics=self.cfg.system_metrics,
        )
        self.run_id = run.info.run_id
        mlflow.set_tag("hivlp.recipe", self.run_config.recipe)
        mlflow.log_params({k: _param_value(scrub(v)) for k, v in self.run_config.flat().items()})
        data = self.run_config.data
        datasets = [*data.datasets, *([data.val_dataset] if data.val_dataset else [])]
        log_lineage(mlflow, datasets, "training", config=self.run_config.to_dict(),
                    parent_run_id=self.parent_run_id, parent_weights_sha256=self.parent_weights_sha256)
        log.info("MLflow run %s in experiment %r at %s", self.run_id, self.cfg.experiment,
                 redact(tracking_uri(self.cfg)))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._mlflow is not None:
            status = "FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED")
            self._mlflow.end_run(status=status)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._mlflow is not None:
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self._mlflow is not None:
            self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        if self._mlflow is not None:
            self._mlflow.log_artifacts(str(local_dir), artifact_path=artifact_path)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        if self._mlflow is not None:
            self._mlflow.log_artifact(str(local_path), artifact_path=artifact_path)


def track_evaluation(metrics: dict[str, Any], checkpoint: str | Path, uri: str | None = None,
                     experiment: str | None = None) -> str:
    """An MLflow run "evaluate" for one evaluation (`hivlp evaluate --track`): lineage (the dataset as an
    evaluation input, the checkpoint's config, its training run as parent), AR per level as metrics,
    metrics.json as an artifact. Returns the run id.

    The store is `uri`, else $MLFLOW_TRACKING_URI, else the local default; the experiment is the
    checkpoint's own (`tracking.experiment`)."""
    import mlflow
    import yaml

    from hivlp.model.checkpoint import CONFIG, read_meta

    ckpt = Path(checkpoint)
    try:
        config = yaml.safe_load((ckpt / CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        config = None
    config = config if isinstance(config, dict) else None
    experiment = experiment or str(((config or {}).get("tracking") or {}).get("experiment") or TrackingConfig.experiment)
    store = uri or tracking_uri()
    mlflow.set_tracking_uri(store)
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=artifact_location() if is_local_store(store) else None)
    mlflow.set_experiment(experiment)
    meta = read_meta(ckpt)
    src = metrics.get("source", {})
    parent = meta.get("mlflow_run_id")
    if parent:
        try:
            mlflow.get_run(parent)
        except Exception:  # trained against another store: no parent here
            parent = None
    split = src.get("split", "eval")
    with mlflow.start_run(run_name="evaluate") as run:
        log_lineage(mlflow, [src["dataset"]] if src.get("dataset") else [], "evaluation", config=config,
                    parent_run_id=parent, parent_weights_sha256=meta["weights_sha256"])
        mlflow.set_tags({"hivlp.weights_sha256": meta["weights_sha256"], "hivlp.split": split,
                         "hivlp.checkpoint": str(ckpt.resolve())})
        flat = {f"{split}_{level}_{k}": float(v) for level, block in metrics.items()
                if level == "full" or level.startswith(("dim_", "coarse_to_fine", "milvus"))
                for k, v in (block.items() if isinstance(block, dict) else [])
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("shortlist", "coarse_dim")}
        mlflow.log_metrics(flat)
        mlflow.log_dict(scrub(metrics), "metrics.json")
        log.info("MLflow run %s (evaluate) in experiment %r at %s", run.info.run_id, experiment, redact(store))
        return run.info.run_id
