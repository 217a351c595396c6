"""The promotion gate: a checkpoint takes the alias (default "champion") only if it beats the champion,
both measured now, on the same data, on a split the candidate was not selected on.

Rules, in order (each refusal is one line naming both sides and what to do):
  1. The metrics are the checkpoint's: `hivlp evaluate` records the weights' sha256, the split and the
     dataset JSON's sha256 in its output (`source`); another checkpoint's metrics are refused, naming
     both hashes, and so are metrics of another split than the gate's (`gate_split`, default `test`).
     Training selects its best epoch on `data.val_split` (val): gating on that split favours the
     candidate, so it is allowed only when asked for (`--gate-split val`, for datasets without a test
     split such as Flickr8k here) and the decision says so (`selected_on_gate_split`).
  2. The champion's own weights again: no new version, "already champion" (not an error); unless the
     champion is a pickled model of an earlier hivlp, which the same weights as models from code
     replace (no comparison to make).
  3. The current champion is evaluated again, in this run, on the same dataset and split (from its
     recorded checkpoint folder, else the checkpoint inside its model artifacts); a stored number is
     never trusted. A champion whose checkpoint is gone is a refusal, and nothing is registered.
  4. The candidate is registered (a version already holding its weights is reused, see
     `hivlp.registry.register`) and promoted only if its AR clears `min_value` and beats the
     champion's by a strict gain of at least `min_delta` (default 0.1 AR): a tie never moves the alias.
The decision goes onto the candidate version (tags `hivlp.gate.*`), onto its logged model (metrics),
and into a "gate" run (lineage, params, metrics, `gate.json` with both evaluations).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hivlp.errors import UsageError
from hivlp.io import sha256_file
from hivlp.model.checkpoint import CONFIG, verify_checkpoint
from hivlp.redact import scrub
from hivlp.registry import (
    DEFAULT_ALIAS,
    DEFAULT_NAME,
    FORMAT,
    FORMAT_TAG,
    WEIGHTS_TAG,
    connect,
    current_champion,
    ensure_experiment,
    register,
    version_checkpoint,
)

log = logging.getLogger(__name__)

DEFAULT_GATE_SPLIT = "test"
DEFAULT_MIN_DELTA = 0.1
METRIC = "r_mean"


class MetricsMismatchError(UsageError):
    """The metrics file does not describe this checkpoint on the gate's data."""


@dataclass
class GateResult:
    """What the gate decided for one checkpoint, and why."""

    name: str
    version: str
    alias: str
    status: str  # "promoted", "gated-out" or "already-champion"
    metric: str
    value: float
    gate_split: str
    min_value: float
    min_delta: float
    previous_champion: str | None
    champion_value: float | None
    reason: str
    weights_sha256: str
    reused_version: bool = False
    selected_on_gate_split: bool = False
    gate_run_id: str | None = None
    champion_metrics: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def promoted(self) -> bool:
        return self.status in ("promoted", "already-champion")

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("champion_metrics")
        return {**d, "promoted": self.promoted, "model_uri": self.model_uri}


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"metrics file {path} not found; write it with `hivlp evaluate --out {path}`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise UsageError(f"{path}: JSON nested too deeply; is it the output of `hivlp evaluate`?") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: not an evaluation (a JSON object); is it the output of `hivlp evaluate`?")
    return data


def metric_value(metrics: dict[str, Any], where: str, metric: str = METRIC) -> float:
    full = metrics.get("full")
    value = full.get(metric) if isinstance(full, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{where}: no number at full.{metric}; is it the output of `hivlp evaluate`?")
    return float(value)


def read_bound_metrics(path: str | Path, weights_sha256: str, checkpoint: str | Path, gate_split: str,
                       metric: str = METRIC) -> dict[str, Any]:
    """The evaluation at `path`, refused unless it measured these weights on the gate's split."""
    p = Path(path)
    data = _load_json(p)
    metric_value(data, str(p), metric)
    src = data.get("source") if isinstance(data.get("source"), dict) else {}
    measured = src.get("weights_sha256")
    redo = f"`hivlp evaluate --checkpoint {checkpoint} --split {gate_split} --out {p}`"
    if not isinstance(measured, str):
        raise MetricsMismatchError(f"{p} does not record which weights it measured (source.weights_sha256); "
                                   f"evaluate the checkpoint again: {redo}")
    if measured != weights_sha256:
        raise MetricsMismatchError(
            f"{p} measured weights {measured[:16]} but checkpoint {checkpoint} holds weights {weights_sha256[:16]}; "
            f"the metrics must be this checkpoint's: {redo}")
    if src.get("split") != gate_split:
        raise MetricsMismatchError(
            f"{p} measured split {src.get('split')!r} but the gate's split is {gate_split!r}; evaluate on the gate's "
            f"split ({redo}) or pass --gate-split {src.get('split')}")
    if not isinstance(src.get("dataset_json_sha256"), str) or not isinstance(src.get("dataset"), str):
        raise MetricsMismatchError(f"{p} does not record the dataset it measured (source.dataset_json_sha256); "
                                   f"evaluate the checkpoint again: {redo}")
    return data


def _config(checkpoint: Path) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load((checkpoint / CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _selection_split(checkpoint: Path) -> str:
    """The split training selected the checkpoint on."""
    return str((_config(checkpoint).get("data") or {}).get("val_split", "val"))


def _checkpoint_experiment(checkpoint: Path) -> str:
    return str((_config(checkpoint).get("tracking") or {}).get("experiment") or "hivlp")


def promote(
    checkpoint: str | Path,
    metrics_path: str | Path,
    gate_split: str = DEFAULT_GATE_SPLIT,
    dataset: str | Path | None = None,
    image_root: str | Path | None = None,
    name: str = DEFAULT_NAME,
    alias: str = DEFAULT_ALIAS,
    min_delta: float = DEFAULT_MIN_DELTA,
    min_value: float = 0.0,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    device: str = "auto",
    experiment: str | None = None,
    progress: bool = False,
) -> GateResult:
    """Gate `checkpoint` onto `alias` of registered model `name` (see the module docstring).

    The gate run goes into `experiment`, default the checkpoint's own (`tracking.experiment`)."""
    import mlflow

    from hivlp.lineage import log_lineage
    from hivlp.retrieval.evaluate import evaluate_checkpoint

    for flag, v in (("--min-delta", min_delta), ("--min-r-mean", min_value)):
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UsageError(f"{flag} must be a finite number, got {v}")
    if min_delta < 0:
        raise UsageError(f"--min-delta must be >= 0 (a gain in AR points), got {min_delta}")
    ckpt = Path(checkpoint)
    sha = str(verify_checkpoint(ckpt)["weights_sha256"])
    metrics = read_bound_metrics(metrics_path, sha, ckpt, gate_split)
    value = metric_value(metrics, str(metrics_path))
    src = metrics["source"]
    dataset = Path(dataset) if dataset is not None else Path(src["dataset"])
    if not dataset.is_file():
        raise UsageError(f"dataset {dataset} (from {metrics_path}) not found; pass --dataset, the JSON it evaluated")
    if sha256_file(dataset) != src["dataset_json_sha256"]:
        raise MetricsMismatchError(
            f"{metrics_path} measured a dataset JSON with sha256 {src['dataset_json_sha256'][:16]} but {dataset} has "
            f"{sha256_file(dataset)[:16]}; the champion must be measured on the same data: pass that --dataset "
            "or evaluate again")
    image_root = image_root if image_root is not None else src.get("image_root")
    selected_on = _selection_split(ckpt) == gate_split
    experiment = experiment or _checkpoint_experiment(ckpt)
    if selected_on:
        log.warning("gate split %r is the split the checkpoint was selected on (data.val_split): the comparison "
                    "favours it; use a held-out split when the dataset has one", gate_split)

    client = connect(tracking_uri)
    champion = current_champion(client, name, alias)
    common = dict(name=name, alias=alias, metric=METRIC, value=value, gate_split=gate_split,
                  min_value=float(min_value), min_delta=float(min_delta), weights_sha256=sha,
                  selected_on_gate_split=selected_on)
    same_weights = champion is not None and champion.tags.get(WEIGHTS_TAG) == sha
    if same_weights and champion.tags.get(FORMAT_TAG) != FORMAT:
        # The champion holds these weights as a pickled model (an earlier hivlp): the same weights as
        # models from code replace it, with no comparison to make.
        mv, reused = register(ckpt, name, run_id=run_id, tracking_uri=tracking_uri, experiment=experiment)
        reason = (f"same weights as champion v{champion.version}, a pickled model hivlp does not load: "
                  f"v{mv.version} (models from code) takes @{alias}")
        result = GateResult(version=str(mv.version), status="promoted", previous_champion=str(champion.version),
                            champion_value=None, reason=reason, reused_version=reused, **common)
        result.gate_run_id = _record(client, mlflow, log_lineage, result, mv, metrics, None, dataset, ckpt,
                                     metrics_path, experiment)
        client.set_registered_model_alias(name, alias, str(mv.version))
        client.set_model_version_tag(name, champion.version, "hivlp.superseded_by", str(mv.version))
        log.info("%s v%s: %s", name, mv.version, reason)
        return result
    if same_weights:
        reason = f"version {champion.version} already holds @{alias} with these weights: nothing registered"
        client.set_model_version_tag(name, champion.version, "hivlp.gate.last", reason)
        log.info("%s v%s: %s", name, champion.version, reason)
        return GateResult(version=str(champion.version), status="already-champion", previous_champion=str(champion.version),
                          champion_value=None, reason=reason, reused_version=True, **common)

    champ_metrics = None
    champ_value = None
    with tempfile.TemporaryDirectory(prefix="hivlp-champion-") as tmp:
        if champion is not None:
            champ_ckpt = version_checkpoint(client, champion, tmp)
            c2f = metrics.get("coarse_to_fine") or {}
            champ_metrics = evaluate_checkpoint(
                champ_ckpt, dataset, split=gate_split, image_root=image_root,
                shortlist=int(c2f.get("shortlist", 100)), coarse_dim=c2f.get("coarse_dim", 64), device=device,
                progress=progress)
            champ_value = metric_value(champ_metrics, f"champion v{champion.version}")
            log.info("champion %s v%s re-evaluated on %s: %s %.2f", name, champion.version, gate_split, METRIC, champ_value)

    mv, reused = register(ckpt, name, run_id=run_id, tracking_uri=tracking_uri, experiment=experiment)
    version = str(mv.version)
    previous = str(champion.version) if champion is not None else None
    checks = [f"{METRIC} {value:.2f} on {gate_split} {'>=' if value >= min_value else '<'} floor {min_value:.2f}"]
    passes = value >= min_value
    if champ_value is not None:
        gain = value - champ_value
        beats = gain > 0 and gain >= min_delta
        checks.append(f"gain {gain:+.2f} over champion v{previous} (re-evaluated: {champ_value:.2f}) "
                      f"{'>=' if beats else 'does not reach'} min-delta {min_delta:.2f}"
                      + ("" if gain > 0 or beats else " (a tie or worse never promotes)"))
        passes = passes and beats
    else:
        checks.append(f"no @{alias} yet")
    status = "promoted" if passes else "gated-out"
    reason = ", ".join(checks) + (": promoted" if passes else ": gated out")

    result = GateResult(version=version, status=status, previous_champion=previous, champion_value=champ_value,
                        reason=reason, reused_version=reused, champion_metrics=champ_metrics, **common)
    result.gate_run_id = _record(client, mlflow, log_lineage, result, mv, metrics, champ_metrics, dataset, ckpt,
                                 metrics_path, experiment)
    if passes:
        client.set_registered_model_alias(name, alias, version)
        if previous is not None:
            client.set_model_version_tag(name, previous, "hivlp.superseded_by", version)
    log.info("%s v%s: %s", name, version, reason)
    return result


def _record(client: Any, mlflow: Any, log_lineage: Any, result: GateResult, mv: Any, metrics: dict,
            champ_metrics: dict | None, dataset: Path, ckpt: Path, metrics_path: str | Path, experiment: str) -> str:
    """The decision onto the version (tags), its logged model (metrics) and a "gate" run (gate.json)."""
    split = result.gate_split
    numbers = {f"{split}_{METRIC}": result.value}
    numbers.update({f"{split}_{k}_{METRIC}": float(v[METRIC]) for k, v in metrics.items()
                    if k.startswith("dim_") and isinstance(v, dict) and METRIC in v})
    if result.champion_value is not None:
        numbers[f"champion_{split}_{METRIC}"] = result.champion_value
        numbers["gain"] = result.value - result.champion_value
    with mlflow.start_run(experiment_id=ensure_experiment(client, experiment), run_name="gate") as run:
        log_lineage(mlflow, [dataset], "evaluation", config=_config(ckpt) or None, parent_run_id=mv.run_id or None,
                    parent_weights_sha256=result.weights_sha256)
        mlflow.log_params({"gate_split": split, "min_delta": result.min_delta, "min_r_mean": result.min_value,
                           "model_name": result.name, "version": result.version, "alias": result.alias,
                           "previous_champion": result.previous_champion or "none"})
        mlflow.log_metrics(numbers)
        mlflow.set_tags({"hivlp.gate.status": result.status, "hivlp.gate.reason": result.reason})
        record = {**result.to_dict(), "gate_run_id": run.info.run_id, "metrics_file": str(metrics_path),
                  "candidate_metrics": metrics, "champion_metrics": champ_metrics}
        mlflow.log_dict(scrub(record), "gate.json")
        model_id = getattr(mv, "model_id", None)
        if model_id:
            try:
                mlflow.log_metrics({f"{split}_{METRIC}": result.value}, model_id=model_id)
            except Exception as e:  # an older server without logged-model metrics: the tags still say it
                log.warning("could not log the gate's metric onto model %s (%s)", model_id, e)
        run_id = run.info.run_id
    tags = {
        "hivlp.gate.status": result.status, "hivlp.promoted": str(result.status == "promoted").lower(),
        "hivlp.gate.reason": result.reason, "hivlp.gate.split": split, "hivlp.gate.run_id": run_id,
        f"hivlp.gate.{METRIC}": repr(result.value),
        f"hivlp.gate.champion_{METRIC}": repr(result.champion_value) if result.champion_value is not None else "none",
        "hivlp.gate.previous_champion": result.previous_champion or "none",
        "hivlp.gate.min_delta": repr(result.min_delta), f"hivlp.gate.min_{METRIC}": repr(result.min_value),
        "hivlp.gate.selected_on_split": str(result.selected_on_gate_split).lower(),
        "hivlp.gate.metrics_file": str(metrics_path),
    }
    for key, val in tags.items():
        client.set_model_version_tag(result.name, result.version, key, val)
    if result.previous_champion is not None and result.champion_value is not None:
        client.set_model_version_tag(result.name, result.previous_champion, f"hivlp.gate.reevaluated_{METRIC}",
                                     f"{result.champion_value!r} on {split} (gate run {run_id})")
    return run_id

