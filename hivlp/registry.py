"""MLflow model registry: a checkpoint as a servable pyfunc model, and the gate that promotes it.

`log_model` wraps a checkpoint folder in `HivlpEncoder` (an `mlflow.pyfunc.PythonModel`) and registers
it as a new version of a registered model. `promote` is the release gate: the new version takes the
alias (default "champion") only if its validation AR is at least `min_value` and at least the current
champion's. Every decision, promoted or not, is written onto the version as `hivlp.*` tags, so the
registry itself is the audit log. Aliases only: MLflow's stages are deprecated.

The pickled `HivlpEncoder` refers to this module by name, so whatever loads the model needs the
`hivlp` package installed (the serving image built from the root Dockerfile has it).
"""

from __future__ import annotations

import json
import logging
import math
import socket
import tempfile
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from hivlp.config import TrackingConfig
from hivlp.errors import HivlpError, UsageError
from hivlp.model.checkpoint import (
    checkpoint_sha256,
    copy_checkpoint,
    read_meta,
    verify_checkpoint,
)
from hivlp.tracking import artifact_location, is_local_store, tracking_uri

log = logging.getLogger(__name__)

DEFAULT_NAME = "hivlp"
DEFAULT_ALIAS = "champion"
DEFAULT_METRIC = "r_mean"
# Third-party packages the pyfunc imports; pinned to the versions installed here.
SERVING_PACKAGES = ("torch", "torchvision", "timm", "transformers", "safetensors", "numpy", "pandas", "pillow")
CONNECT_TIMEOUT_S = 5.0


class RegistryError(HivlpError):
    """The registry cannot do what was asked (CLI exit code 1)."""


class TrackingUnavailableError(RegistryError):
    """The MLflow tracking/registry store cannot be reached."""


# ---------------------------------------------------------------------------------------------
# The servable model


class HivlpEncoder(mlflow.pyfunc.PythonModel):
    """Embeds captions and/or images with a hivlp checkpoint.

    Input: a DataFrame with a `text` column, an `image_path` column, or both (each row fills exactly
    one). Output: a float32 array, one row per input row: the full D-dim embedding (unnormalised, as
    `hivlp.model.encode.Encoder` returns it), or with `params={"level": d}` its first d
    dims L2-normalised, the level-d embedding that retrieval uses.
    """

    def load_context(self, context: Any) -> None:
        from hivlp.model.encode import load_encoder

        self.encoder = load_encoder(context.artifacts["checkpoint"], device="cpu")

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        from hivlp.model import level_np

        level = int((params or {}).get("level", 0))
        if level and level not in self.encoder.levels:
            raise ValueError(f"level {level} is not a level of this model; use one of {self.encoder.levels} or 0 (full)")
        texts = _column(model_input, "text")
        images = _column(model_input, "image_path")
        both, neither = texts.notna() & images.notna(), texts.isna() & images.isna()
        if both.any() or neither.any():
            row = int(np.flatnonzero((both | neither).to_numpy())[0])
            raise ValueError(f"row {row}: give exactly one of `text` and `image_path`")
        out = np.zeros((len(model_input), self.encoder.dim), dtype=np.float32)
        is_text = texts.notna().to_numpy()
        if is_text.any():
            out[is_text] = self.encoder.texts(texts[is_text].tolist(), progress=False)
        if (~is_text).any():
            out[~is_text] = self.encoder.images(images[~is_text].tolist(), num_workers=0, progress=False)
        return level_np(out, level) if level else out


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    if name in df.columns:
        return df[name].astype(object).where(df[name].notna(), None)
    return pd.Series([None] * len(df), index=df.index, dtype=object)


SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "text", required=False), ColSpec("string", "image_path", required=False)]),
    outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
    params=ParamSchema([ParamSpec("level", "long", 0)]),
)
INPUT_EXAMPLE = pd.DataFrame({"text": ["a dog runs through the grass"]})


# ---------------------------------------------------------------------------------------------
# Connection


def connect(uri: str | None = None) -> MlflowClient:
    """Point MLflow at `uri` (default: $MLFLOW_TRACKING_URI or sqlite under outputs/) and check it answers.

    An http(s) server is probed with a plain TCP connect first: MLflow's own client retries for
    minutes before it reports a server that is down.
    """
    uri = uri or tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as e:
            raise TrackingUnavailableError(
                f"MLflow tracking server {uri} is unreachable ({e}); start it, or set MLFLOW_TRACKING_URI "
                "(or --tracking-uri) to a reachable server or a sqlite:/// file"
            ) from None
    elif parsed.scheme == "sqlite":
        db = Path(uri[len("sqlite:///"):])
        if not db.parent.is_dir():
            raise TrackingUnavailableError(f"MLflow store {uri}: folder {db.parent} does not exist")
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        client.search_experiments(max_results=1)
    except MlflowException as e:
        raise TrackingUnavailableError(f"MLflow store {uri} does not answer: {e.message}") from None
    return client


def _get_run(client: MlflowClient, run_id: str) -> Any:
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise UsageError(
            f"MLflow run {run_id!r} not found at {mlflow.get_tracking_uri()}; check --run-id and "
            "MLFLOW_TRACKING_URI (the store the training run logged to)"
        ) from None


# ---------------------------------------------------------------------------------------------
# Logging and registering


def _serving_requirements() -> list[str]:
    reqs = []
    for pkg in (*SERVING_PACKAGES, "mlflow"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def _training_run_id(client: MlflowClient, ckpt: Path) -> str | None:
    """The MLflow run that trained the checkpoint (meta.json), if it lives in this tracking store."""
    rid = read_meta(ckpt).get("mlflow_run_id")
    if not rid:
        return None
    try:
        client.get_run(rid)
    except MlflowException:
        return None
    return rid


def log_model(
    checkpoint_dir: str | Path,
    run_id: str | None = None,
    name: str = DEFAULT_NAME,
    tracking_uri: str | None = None,
    experiment: str = TrackingConfig.experiment,
) -> ModelInfo:
    """Log a checkpoint as a pyfunc model and register it as a new version of `name`.

    With `run_id` (default: the training run recorded in the checkpoint's meta.json, when it is in
    this tracking store) the model joins that run; without one, a run named "register" is started in
    `experiment`. The version is tagged with the checkpoint's weights sha256 and source folder.
    """
    ckpt = Path(checkpoint_dir)
    verify_checkpoint(ckpt)  # before the store is touched: a bad checkpoint leaves no run behind
    client = connect(tracking_uri)
    if run_id is None:
        run_id = _training_run_id(client, ckpt)
    if run_id is not None:
        _get_run(client, run_id)
        run = mlflow.start_run(run_id=run_id)
    else:
        if client.get_experiment_by_name(experiment) is None:
            uri = mlflow.get_tracking_uri()
            client.create_experiment(experiment, artifact_location=artifact_location() if is_local_store(uri) else None)
        mlflow.set_experiment(experiment)
        run = mlflow.start_run(run_name="register")
    with tempfile.TemporaryDirectory(prefix="hivlp-register-") as tmp, run:
        staged = copy_checkpoint(ckpt, Path(tmp) / "checkpoint")
        weights_sha = checkpoint_sha256(staged)
        mlflow.set_tags({"hivlp.checkpoint": str(ckpt.resolve()), "hivlp.weights_sha256": weights_sha})
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=HivlpEncoder(),
            artifacts={"checkpoint": str(staged)},
            signature=SIGNATURE,
            input_example=INPUT_EXAMPLE,
            pip_requirements=_serving_requirements(),
            registered_model_name=name,
            metadata={"hivlp_weights_sha256": weights_sha},
        )
    tags = {"hivlp.weights_sha256": weights_sha, "hivlp.checkpoint": str(ckpt.resolve()), "hivlp.run_id": run.info.run_id}
    for key, value in tags.items():
        client.set_model_version_tag(name, info.registered_model_version, key, value)
    log.info("registered %s version %s (run %s)", name, info.registered_model_version, run.info.run_id)
    return info


# ---------------------------------------------------------------------------------------------
# The gate


@dataclass
class PromotionResult:
    """What the gate decided for one model version, and why."""

    name: str
    version: str
    alias: str
    promoted: bool
    metric: str
    value: float
    min_value: float
    previous_champion: str | None
    champion_value: float | None
    reason: str

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "model_uri": self.model_uri}


def read_metric(metrics_path: str | Path, metric: str = DEFAULT_METRIC) -> float:
    """`full[metric]` of an evaluation metrics.json (`hivlp evaluate --out`)."""
    p = Path(metrics_path)
    if not p.is_file():
        raise UsageError(f"metrics file {p} not found; write it with `hivlp evaluate --out {p}`")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{p}: not valid JSON ({e})") from None
    except RecursionError:
        raise UsageError(f"{p}: JSON nested too deeply; is it the output of `hivlp evaluate`?") from None
    full = data.get("full") if isinstance(data, dict) else None
    value = full.get(metric) if isinstance(full, dict) else None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{p}: no number at full.{metric}; is it the output of `hivlp evaluate`?")
    return float(value)


def _run_metric(client: MlflowClient, run_id: str, metric: str) -> float | None:
    return _get_run(client, run_id).data.metrics.get(f"best_val_{metric}")


def _champion_value(client: MlflowClient, champion: Any, metric: str) -> float:
    """The champion's metric as recorded by its own gate, else its training run's best_val_<metric>."""
    recorded = champion.tags.get(f"hivlp.{metric}")
    if recorded is not None:
        return float(recorded)
    value = _run_metric(client, champion.run_id, metric) if champion.run_id else None
    if value is None:
        raise RegistryError(
            f"the current champion ({champion.name} version {champion.version}) has no recorded {metric} "
            f"(tag hivlp.{metric}, or metric best_val_{metric} on its run), so nothing can be compared "
            f"with it; set the tag on that version, or delete its alias"
        )
    return float(value)


def _current_champion(client: MlflowClient, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def promote(
    version: str | int,
    name: str = DEFAULT_NAME,
    metrics_path: str | Path | None = None,
    run_id: str | None = None,
    metric: str = DEFAULT_METRIC,
    min_value: float = 0.0,
    alias: str = DEFAULT_ALIAS,
    tracking_uri: str | None = None,
) -> PromotionResult:
    """Gate version `version` of `name`: give it `alias` if its metric clears `min_value` and the champion.

    The metric is `full.<metric>` of `metrics_path` (an evaluation of the val split) if given, else the
    run's `best_val_<metric>` (`run_id`, default the version's own run). No champion yet: the floor
    alone decides. A tie with the champion promotes the newer version.
    """
    client = connect(tracking_uri)
    version = str(version)
    try:
        mv = client.get_model_version(name, version)
    except MlflowException:
        raise UsageError(f"registered model {name!r} has no version {version} at {mlflow.get_tracking_uri()}") from None
    if metrics_path is not None:
        value, source = read_metric(metrics_path, metric), str(metrics_path)
    else:
        rid = run_id or mv.run_id
        if not rid:
            raise UsageError(f"{name} version {version} has no run; pass a metrics file (--metrics)")
        value = _run_metric(client, rid, metric)
        if value is None:
            raise UsageError(
                f"MLflow run {rid} has no metric best_val_{metric}; pass an evaluation metrics file (--metrics)"
            )
        source = f"run:{rid}"

    champion = _current_champion(client, name, alias)
    previous = str(champion.version) if champion is not None else None
    if previous == version:
        champion_value, promoted = value, True
        reason = f"version {version} already holds @{alias}"
    else:
        champion_value = _champion_value(client, champion, metric) if champion is not None else None
        checks = [f"{metric} {value:.2f} {'>=' if value >= min_value else '<'} floor {min_value:.2f}"]
        if champion_value is not None:
            sign = ">=" if value >= champion_value else "<"
            checks.append(f"{sign} champion v{previous} {champion_value:.2f}")
        else:
            checks.append(f"no @{alias} yet")
        promoted = value >= min_value and (champion_value is None or value >= champion_value)
        reason = ", ".join(checks) + (": promoted" if promoted else ": gated out")

    tags = {
        "hivlp.promoted": str(promoted).lower(),
        "hivlp.gate": reason,
        "hivlp.previous_champion": previous or "none",
        "hivlp.metric": metric,
        f"hivlp.{metric}": repr(value),
        f"hivlp.min_{metric}": repr(float(min_value)),
        f"hivlp.champion_{metric}": repr(champion_value) if champion_value is not None else "none",
        "hivlp.metric_source": source,
    }
    for key, val in tags.items():
        client.set_model_version_tag(name, version, key, val)
    if promoted and previous != version:
        client.set_registered_model_alias(name, alias, version)
        if previous is not None:
            client.set_model_version_tag(name, previous, "hivlp.superseded_by", version)
    result = PromotionResult(
        name=name, version=version, alias=alias, promoted=promoted, metric=metric, value=value,
        min_value=float(min_value), previous_champion=previous,
        champion_value=champion_value, reason=reason,
    )
    log.info("%s v%s: %s", name, version, reason)
    return result


def register_and_promote(
    checkpoint_dir: str | Path,
    metrics_path: str | Path | None = None,
    run_id: str | None = None,
    name: str = DEFAULT_NAME,
    metric: str = DEFAULT_METRIC,
    min_value: float = 0.0,
    alias: str = DEFAULT_ALIAS,
    tracking_uri: str | None = None,
) -> PromotionResult:
    """`log_model` then `promote` the new version: what `hivlp promote` and the pipeline's promote step do.

    The metric is read before anything is registered, so a missing metric leaves the registry as it was.
    """
    if not math.isfinite(min_value):
        raise UsageError(f"--min-r-mean must be a finite number, got {min_value}")
    if metrics_path is not None:
        read_metric(metrics_path, metric)
    elif run_id is None:
        raise UsageError("give a metrics file (--metrics) or the training run (--run-id) to read the metric from")
    info = log_model(checkpoint_dir, run_id=run_id, name=name, tracking_uri=tracking_uri)
    return promote(
        info.registered_model_version, name, metrics_path=metrics_path, run_id=run_id, metric=metric,
        min_value=min_value, alias=alias, tracking_uri=tracking_uri,
    )


def load_pyfunc(model_uri: str, tracking_uri: str | None = None) -> Any:
    """The pyfunc model at `model_uri` (e.g. `models:/hivlp@champion`), with a clear error if it cannot load."""
    connect(tracking_uri)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as e:
        raise UsageError(f"--model-uri {model_uri}: cannot load it ({e.message})") from None


def load_champion(name: str = DEFAULT_NAME, alias: str = DEFAULT_ALIAS, tracking_uri: str | None = None) -> Any:
    """The pyfunc model behind `models:/<name>@<alias>` (see `HivlpEncoder` for its input and output)."""
    client = connect(tracking_uri)
    if _current_champion(client, name, alias) is None:
        raise RegistryError(
            f"no version of registered model {name!r} holds alias @{alias} at {mlflow.get_tracking_uri()}; "
            "promote one with `hivlp promote`"
        )
    return mlflow.pyfunc.load_model(f"models:/{name}@{alias}")
