"""A real `mlflow server` (subprocess, free loopback port, SQLite in tmp) reached through a URI that
carries a password: tiny pretrain -> finetune -> evaluate -> promote through the CLI. The password
appears nowhere (output, log records, errors, config.yaml, MLflow params, tags, artifacts); every run
records its lineage; the weights are logged once and registered from the training run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from mlflow import MlflowClient

from hivlp.data.fingerprint import dataset_digest
from hivlp.net import free_port
from hivlp.redact import RedactingStream, redact, scrub

from .conftest import write_slice
from .faultworld import run_cli, tiny_text_tower
from .registry_world import mlflow_bin, start, stop, wait_http

SECRET = "s3cret-pw"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = root / "server.log"
    proc = start([mlflow_bin(), "server", "--backend-store-uri", f"sqlite:///{root / 'srv.db'}",
                  "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                  "--workers", "1"], log, cwd=root)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, 180, log)
        yield {"port": port, "plain": f"http://127.0.0.1:{port}", "secret": f"http://alice:{SECRET}@127.0.0.1:{port}",
               "root": root}
    finally:
        stop(proc)


def _all_text(client: MlflowClient, run, tmp: Path) -> str:
    """Everything MLflow holds for a run: params, tags, inputs and every artifact's bytes."""
    import mlflow

    parts = [json.dumps(run.data.params), json.dumps(run.data.tags), str(run.inputs)]
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp / run.info.run_id)))
    parts += [p.read_bytes().decode("utf-8", "replace") for p in local.rglob("*") if p.is_file()]
    return "\n".join(parts)


def test_pipeline_through_a_password_uri_leaks_nothing_and_records_lineage(server, flickr8k_raw, tmp_path, caplog,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    caplog.set_level(logging.INFO)
    dataset = write_slice(flickr8k_raw, tmp_path / "data", n_train=16, n_val=8)
    tower = tiny_text_tower(tmp_path / "tiny-bert")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "recipe: pretrain\n"
        f"data: {{datasets: [{dataset}], max_text_tokens: 16}}\n"
        f"model: {{image_tower: test_efficientnet, image_weights: none, text_tower: {tower}, embed_dim: 512, "
        "levels: [32, 64, 128, 256, 512], head: linear}\n"
        "train: {epochs: 1, batch_size: 16, warmup_steps: 1, num_workers: 0, eval_coarse_dim: 32, "
        f"eval_shortlist: 8, cache_dir: {tmp_path / 'cache'}}}\n"
        f"tracking: {{tracking_uri: '{server['secret']}', system_metrics: false, experiment: lineage}}\n")
    (tmp_path / "tiny-ft.yaml").write_text("extends: tiny.yaml\nrecipe: finetune\ntrain: {lr: 1.0e-4}\n")

    outputs = []
    for argv in (["pretrain", "--config", recipe, "--out", tmp_path / "pre"],
                 ["finetune", "--config", tmp_path / "tiny-ft.yaml", "--init", tmp_path / "pre", "--out", tmp_path / "ft"],
                 ["evaluate", "--checkpoint", tmp_path / "ft", "--dataset", dataset, "--split", "val",
                  "--out", tmp_path / "m.json", "--coarse-dim", 32, "--shortlist", 8, "--track",
                  "--tracking-uri", server["secret"]],
                 ["promote", "--checkpoint", tmp_path / "ft", "--metrics", tmp_path / "m.json", "--gate-split", "val",
                  "--tracking-uri", server["secret"], "--device", "cpu"]):
        code, out, err = run_cli(argv)
        assert code == 0, f"{argv[0]}: {err[-2000:]}"
        outputs += [out, err]
    # An error names the store, never its password.
    code, _, err = run_cli(["promote", "--checkpoint", tmp_path / "ft", "--metrics", tmp_path / "m.json",
                            "--gate-split", "val", "--tracking-uri", f"http://alice:{SECRET}@127.0.0.1:{free_port()}"])
    assert code == 1 and "alice:***@127.0.0.1" in err and len(err.strip().splitlines()) == 1
    outputs.append(err)

    logs = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "alice:***@" in "\n".join(outputs) + logs  # the URI was shown, masked
    assert SECRET not in "\n".join(outputs) + logs
    for ckpt in ("pre", "ft"):
        config = (tmp_path / ckpt / "config.yaml").read_text()
        assert SECRET not in config and "alice" not in config and f"tracking_uri: {server['plain']}" in config

    client = MlflowClient(tracking_uri=server["plain"])
    exp = client.get_experiment_by_name("lineage")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    pre, ft, ev, gate = runs["pretrain"], runs["finetune"], runs["evaluate"], runs["gate"]
    for run in (pre, ft, ev, gate):
        assert SECRET not in _all_text(client, run, tmp_path / "dl")
        assert len(run.data.tags["hivlp.git_commit"]) == 40 and run.data.tags["hivlp.git_dirty"] in ("true", "false")
        (inp,) = run.inputs.dataset_inputs
        digest = dataset_digest(dataset).digest
        assert inp.dataset.digest == digest[:32]
        assert {t.key: t.value for t in inp.tags}["hivlp.digest"] == digest
    assert ft.data.tags["hivlp.parent_run_id"] == pre.info.run_id
    assert ev.data.tags["hivlp.parent_run_id"] == ft.info.run_id and "val_full_r_mean" in ev.data.metrics
    assert {t.key: t.value for t in gate.inputs.dataset_inputs[0].tags}["mlflow.data.context"] == "evaluation"
    for mv in client.search_model_versions("name='hivlp'"):
        assert SECRET not in json.dumps(mv.tags)

    # Logged once, in the fine-tuning run, and registered from there.
    (mv,) = client.search_model_versions("name='hivlp'")
    assert mv.run_id == ft.info.run_id
    weights = json.loads((tmp_path / "ft" / "meta.json").read_text())["weights_sha256"]
    logged = client.search_logged_models([exp.experiment_id], filter_string=f"tags.`hivlp.weights_sha256` = '{weights}'")
    assert len(logged) == 1


def test_redaction_units(capsys):
    uri = f"http://alice:{SECRET}@host:5000/x"
    assert redact(f"at {uri}") == "at http://alice:***@host:5000/x"
    assert scrub({"a": [uri], "b": 1}, strip=True) == {"a": ["http://host:5000/x"], "b": 1}
    import sys

    stream = RedactingStream(sys.stdout)
    stream.write(f"View run x at: {uri}\n")
    assert SECRET not in capsys.readouterr().out
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "store %s", (uri,), None)
    from hivlp.redact import RedactingFilter

    RedactingFilter().filter(record)
    assert SECRET not in record.getMessage()
