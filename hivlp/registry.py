"""MLflow model registry: a checkpoint as a servable model that carries its code, logged once.

The model is "models from code": MLflow gets `hivlp/pyfunc_model.py` as a file (it calls
`mlflow.models.set_model`), a copy of the `hivlp` package as `code_paths`, the checkpoint folder as
its one artifact, a signature and an input example. Nothing in it is pickled, and loading it needs
the serving packages (`SERVING_PACKAGES`, pinned in its requirements) but not an installed hivlp.

One checkpoint, one copy of its weights in MLflow: the training run logs the model once
(`log_model`, tagged with the weights' sha256); `register` registers that logged model (or logs it
once, into the checkpoint's training run or a "register" run, when training did not), and a
checkpoint whose weights a version of the registered model already holds gets that version back
instead of a new one. Versions logged the old way (a cloudpickled `python_model.pkl`) are never
reused and never loaded (`load_pyfunc` refuses them).

The promotion gate is `hivlp.gate`. Aliases only: MLflow's stages are deprecated.
"""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import yaml

import hivlp
from hivlp.config import TrackingConfig
from hivlp.errors import HivlpError, UsageError
from hivlp.model.checkpoint import (
    checkpoint_sha256,
    copy_checkpoint,
    read_meta,
    verify_checkpoint,
)
from hivlp.redact import redact
from hivlp.tracking import artifact_location, is_local_store, tracking_uri

log = logging.getLogger(__name__)

DEFAULT_NAME = "hivlp"
DEFAULT_ALIAS = "champion"
MODEL_NAME_IN_RUN = "model"  # the logged model's name inside a run
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
FORMAT_TAG, FORMAT = "hivlp.model_format", "models-from-code/1"
WEIGHTS_TAG = "hivlp.weights_sha256"
# Third-party packages the served model imports (hivlp's own code ships with the model).
SERVING_PACKAGES = ("torch", "torchvision", "timm", "transformers", "tokenizers", "safetensors", "numpy", "pandas",
                    "pillow", "pyyaml", "tqdm")
CONNECT_TIMEOUT_S = 5.0


class RegistryError(HivlpError):
    """The registry cannot do what was asked (CLI exit code 1)."""


class TrackingUnavailableError(RegistryError):
    """The MLflow tracking/registry store cannot be reached."""


def _signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([ColSpec("string", "text", required=False), ColSpec("string", "image_path", required=False),
                       ColSpec("string", "image_b64", required=False)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
        params=ParamSchema([ParamSpec("level", "long", 0)]),
    )


INPUT_EXAMPLE = pd.DataFrame({"text": ["a dog runs through the grass", "two children play on a beach"]})


# ---------------------------------------------------------------------------------------------
# Connection


def connect(uri: str | None = None) -> Any:
    """Point MLflow at `uri` (default: $MLFLOW_TRACKING_URI or sqlite under outputs/) and check it answers.

    An http(s) server is probed with a plain TCP connect first: MLflow's own client retries for
    minutes before it reports a server that is down. Messages never show the URI's credentials.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = uri or tracking_uri()
    shown = redact(uri)
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as e:
            raise TrackingUnavailableError(
                f"MLflow tracking server {shown} is unreachable ({e}); start it, or set MLFLOW_TRACKING_URI "
                "(or --tracking-uri) to a reachable server or a sqlite:/// file"
            ) from None
    elif parsed.scheme == "sqlite":
        db = Path(uri[len("sqlite:///"):])
        if not db.parent.is_dir():
            raise TrackingUnavailableError(f"MLflow store {shown}: folder {db.parent} does not exist")
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        client.search_experiments(max_results=1)
    except MlflowException as e:
        raise TrackingUnavailableError(f"MLflow store {shown} does not answer: {redact(e.message)}") from None
    return client


def _get_run(client: Any, run_id: str) -> Any:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise UsageError(
            f"MLflow run {run_id!r} not found at {redact(mlflow.get_tracking_uri())}; check --run-id and "
            "MLFLOW_TRACKING_URI (the store the training run logged to)"
        ) from None


def ensure_experiment(client: Any, experiment: str) -> str:
    """The id of `experiment`, created (artifacts under outputs/ for a local store) when missing."""
    import mlflow

    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    uri = mlflow.get_tracking_uri()
    return client.create_experiment(experiment, artifact_location=artifact_location() if is_local_store(uri) else None)


# ---------------------------------------------------------------------------------------------
# Logging: once per checkpoint


def serving_requirements() -> list[str]:
    reqs = []
    for pkg in (*SERVING_PACKAGES, "mlflow"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def stage_package(dst: str | Path) -> Path:
    """A copy of the hivlp package's source (no caches) at `dst/hivlp`: what ships with the model."""
    src = Path(hivlp.__file__).resolve().parent
    out = Path(dst) / "hivlp"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo"))
    return out


def log_model(checkpoint_dir: str | Path, name: str = MODEL_NAME_IN_RUN) -> Any:
    """Log a checkpoint into the active MLflow run as a models-from-code pyfunc; return its ModelInfo.

    Registers nothing (see `register`). The logged model is tagged with the weights' sha256."""
    import mlflow

    ckpt = Path(checkpoint_dir)
    meta = verify_checkpoint(ckpt)
    sha = str(meta["weights_sha256"])
    with tempfile.TemporaryDirectory(prefix="hivlp-model-") as tmp:
        staged = copy_checkpoint(ckpt, Path(tmp) / "checkpoint")
        code = stage_package(Path(tmp) / "code")
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(PYFUNC_FILE),
            code_paths=[str(code)],
            artifacts={"checkpoint": str(staged)},
            signature=_signature(),
            input_example=INPUT_EXAMPLE,
            pip_requirements=serving_requirements(),
            metadata={"hivlp_weights_sha256": sha, "hivlp_version": hivlp.__version__, "format": FORMAT},
            tags={WEIGHTS_TAG: sha, FORMAT_TAG: FORMAT},
        )
    log.info("logged model %s (weights %s) in run %s", info.model_id, sha[:12], info.run_id)
    return info


def find_logged_model(client: Any, run_id: str, weights_sha256: str) -> Any | None:
    """A models-from-code model logged in run `run_id` with these weights, if any."""
    from mlflow.exceptions import MlflowException

    try:
        outputs = client.get_run(run_id).outputs
    except MlflowException:
        return None
    for out in (outputs.model_outputs if outputs is not None else []):
        try:
            lm = client.get_logged_model(out.model_id)
        except MlflowException:
            continue
        if lm.tags.get(WEIGHTS_TAG) == weights_sha256 and lm.tags.get(FORMAT_TAG) == FORMAT:
            return lm
    return None


def find_any_logged_model(client: Any, weights_sha256: str) -> Any | None:
    """A models-from-code model with these weights logged anywhere in the store, if any."""
    from mlflow.exceptions import MlflowException

    try:
        exps = [e.experiment_id for e in client.search_experiments()]
        found = client.search_logged_models(
            experiment_ids=exps, filter_string=f"tags.`{WEIGHTS_TAG}` = '{weights_sha256}'", max_results=20)
    except MlflowException:
        return None
    for lm in found:
        if lm.tags.get(FORMAT_TAG) == FORMAT and str(getattr(lm, "status", "READY")).endswith("READY"):
            return lm
    return None


def find_version(client: Any, name: str, weights_sha256: str) -> Any | None:
    """The newest models-from-code version of `name` holding these weights, if any."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    same = [v for v in versions if v.tags.get(WEIGHTS_TAG) == weights_sha256 and v.tags.get(FORMAT_TAG) == FORMAT]
    return max(same, key=lambda v: int(v.version)) if same else None


def _training_run_id(client: Any, ckpt: Path) -> str | None:
    """The MLflow run that trained the checkpoint (meta.json), if it lives in this tracking store."""
    from mlflow.exceptions import MlflowException

    rid = read_meta(ckpt).get("mlflow_run_id")
    if not rid:
        return None
    try:
        client.get_run(rid)
    except MlflowException:
        return None
    return rid


def register(
    checkpoint_dir: str | Path,
    name: str = DEFAULT_NAME,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    experiment: str = TrackingConfig.experiment,
) -> tuple[Any, bool]:
    """(model version, reused) for a checkpoint: the version of `name` that already holds its weights
    (reused=True), else a new version registered from the model the training run logged (or from a
    model logged now, once, into `run_id` / the checkpoint's training run / a new "register" run)."""
    import mlflow

    ckpt = Path(checkpoint_dir)
    sha = str(verify_checkpoint(ckpt)["weights_sha256"])  # before the store is touched
    client = connect(tracking_uri)
    existing = find_version(client, name, sha)
    if existing is not None:
        log.info("%s version %s already holds weights %s: reused, nothing registered", name, existing.version, sha[:12])
        return existing, True
    if run_id is not None:
        _get_run(client, run_id)
    else:
        run_id = _training_run_id(client, ckpt)
    logged = find_logged_model(client, run_id, sha) if run_id else find_any_logged_model(client, sha)
    if logged is None:
        if run_id is not None:
            run = mlflow.start_run(run_id=run_id)
        else:
            mlflow.set_experiment(experiment_id=ensure_experiment(client, experiment))
            run = mlflow.start_run(run_name="register")
        with run:
            mlflow.set_tags({"hivlp.checkpoint": str(ckpt.resolve()), WEIGHTS_TAG: sha})
            info = log_model(ckpt)
        model_id, run_id = info.model_id, run.info.run_id
    else:
        model_id = logged.model_id
    mv = mlflow.register_model(f"models:/{model_id}", name)
    tags = {WEIGHTS_TAG: sha, FORMAT_TAG: FORMAT, "hivlp.checkpoint": str(ckpt.resolve()), "hivlp.run_id": run_id or ""}
    for key, value in tags.items():
        client.set_model_version_tag(name, mv.version, key, value)
    log.info("registered %s version %s from logged model %s (run %s)", name, mv.version, model_id, run_id)
    return client.get_model_version(name, mv.version), False


# ---------------------------------------------------------------------------------------------
# Loading: never a pickle


def check_model_dir(local: str | Path, what: str) -> None:
    """Refuse a downloaded model that is not models-from-code (a pickled pyfunc): it is never loaded."""
    mlmodel = Path(local) / "MLmodel"
    try:
        conf = yaml.safe_load(mlmodel.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"{what}: no readable MLmodel in the model ({e}); is it an MLflow model?") from None
    pyfunc = (conf.get("flavors") or {}).get("python_function") or {}
    if not pyfunc.get("model_code_path") or pyfunc.get("python_model"):
        raise RegistryError(
            f"{what}: this version is a pickled pyfunc (python_model {pyfunc.get('python_model')!r}), which hivlp "
            "never unpickles; register the checkpoint again with `hivlp promote` (models from code)"
        )
    stray = sorted(p.relative_to(local).as_posix() for p in Path(local).rglob("*.pkl"))
    if stray:
        log.warning("%s: ignoring %s in the model's files (nothing in a hivlp model is unpickled)", what, stray)


def load_pyfunc(model_uri: str, tracking_uri: str | None = None) -> Any:
    """The pyfunc model at `model_uri` (e.g. `models:/hivlp@champion`), checked to be models-from-code
    before MLflow loads it; a clear error if it cannot load."""
    import mlflow
    from mlflow.exceptions import MlflowException

    connect(tracking_uri)
    tmp = tempfile.TemporaryDirectory(prefix="hivlp-pyfunc-")
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp.name)
        check_model_dir(local, f"--model-uri {model_uri}")
        model = mlflow.pyfunc.load_model(local)
    except MlflowException as e:
        tmp.cleanup()
        raise UsageError(f"--model-uri {model_uri}: cannot load it ({redact(e.message)})") from None
    except BaseException:
        tmp.cleanup()
        raise
    model._hivlp_files = tmp  # the model's code folder stays on sys.path for as long as the model lives
    return model


def current_champion(client: Any, name: str, alias: str = DEFAULT_ALIAS) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def load_champion(name: str = DEFAULT_NAME, alias: str = DEFAULT_ALIAS, tracking_uri: str | None = None) -> Any:
    """The pyfunc model behind `models:/<name>@<alias>` (see `hivlp.pyfunc_model` for its input and output)."""
    import mlflow

    client = connect(tracking_uri)
    if current_champion(client, name, alias) is None:
        raise RegistryError(
            f"no version of registered model {name!r} holds alias @{alias} at {redact(mlflow.get_tracking_uri())}; "
            "promote one with `hivlp promote`"
        )
    return load_pyfunc(f"models:/{name}@{alias}", tracking_uri)


def version_checkpoint(client: Any, mv: Any, dst: str | Path) -> Path:
    """A verified checkpoint folder holding version `mv`'s weights: its recorded checkpoint folder when
    that still holds them, else the checkpoint inside the model's artifacts, downloaded into `dst`.
    Raises RegistryError naming both places when neither has it."""
    import mlflow

    sha = mv.tags.get(WEIGHTS_TAG)
    folder = mv.tags.get("hivlp.checkpoint")
    if folder and sha:
        try:
            if checkpoint_sha256(folder) == sha:
                verify_checkpoint(folder)
                return Path(folder)
        except UsageError:
            pass
    try:
        model = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=str(dst))
        local = Path(model) / "artifacts" / "checkpoint"
        verify_checkpoint(local)
        if sha and checkpoint_sha256(local) != sha:
            raise UsageError(f"weights {checkpoint_sha256(local)[:12]} are not the version's {sha[:12]}")
        return Path(local)
    except Exception as e:  # missing artifacts, an unreachable store, a corrupt copy: one line
        raise RegistryError(
            f"the checkpoint of {mv.name} version {mv.version} (@champion) is gone: not in its folder "
            f"{folder or '(none recorded)'} nor in its model artifacts ({redact(' '.join(str(e).split()))[:200]}); "
            "restore it, or move the alias to a version whose checkpoint exists"
        ) from None
