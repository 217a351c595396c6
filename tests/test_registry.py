"""The model registry on a real MLflow (SQLite in tmp) with tiny real checkpoints: a model that carries
its code (loaded where hivlp is not importable; nothing unpickled), served by `mlflow models serve`
over HTTP, and the promotion gate (bound metrics, the champion re-evaluated, ties and worse models
gated out, the same weights never registered twice)."""

from __future__ import annotations

import base64
import json
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from hivlp import registry
from hivlp.gate import MetricsMismatchError, promote
from hivlp.model import load_encoder
from hivlp.net import free_port

from .conftest import REPO
from .faultworld import run_cli
from .registry_world import (
    build_checkpoints,
    evaluate_to,
    mlflow_bin,
    retemper,
    start,
    stop,
    wait_http,
)

CAPTIONS = ["a black dog runs through the grass", "two children play on a beach"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, flickr8k_raw):
    root = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the default artifact location, outputs/mlartifacts, lands in tmp
        uri = f"sqlite:///{root / 'mlflow.db'}"
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        t = time.perf_counter()
        cps = build_checkpoints(root, flickr8k_raw)
        print(f"checkpoints: {time.perf_counter() - t:.1f} s, AR {cps.ar}")
        t = time.perf_counter()
        first = promote(cps.better, cps.metrics["better"], gate_split="val", name="served", tracking_uri=uri,
                        device="cpu")
        print(f"register + gate (no champion): {time.perf_counter() - t:.1f} s")
        assert first.status == "promoted"
        yield {"uri": uri, "root": root, "cps": cps}


@pytest.fixture
def client(world):
    return MlflowClient(tracking_uri=world["uri"])


def _model_dir(client, name, version) -> Path:
    """The model's folder in the local artifact store (where an attacker with store access writes)."""
    from urllib.parse import urlparse

    mv = client.get_model_version(name, version)
    model_id = mv.source.split("models:/", 1)[1]
    return Path(urlparse(client.get_logged_model(model_id).artifact_location).path)


BLOCKER = textwrap.dedent("""
    import importlib.machinery, sys
    BLOCKED = {blocked!r}
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name != "hivlp":
                return None
            allowed = [p for p in sys.path if p and "site-packages" not in p
                       and not any(p.startswith(b) for b in BLOCKED)]
            spec = importlib.machinery.PathFinder.find_spec(name, allowed)
            if spec is None:
                raise ModuleNotFoundError("No module named 'hivlp' (blocked by the test)", name=name)
            return spec
    sys.meta_path.insert(0, _Block())
""")


def test_model_from_code_loads_without_hivlp(world, client, tmp_path):
    """A fresh interpreter where hivlp cannot be imported (not the repo, not the editable install, not
    site-packages) loads models:/served@champion with MLflow's own loader: [2, 512] for two captions,
    from the hivlp copy shipped in the model."""
    import hivlp

    blocked = sorted({str(REPO), str(Path(hivlp.__file__).resolve().parents[1]), "/work/main"})
    script = BLOCKER.format(blocked=blocked) + textwrap.dedent(f"""
        try:
            import hivlp
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit("hivlp importable before the model loads: " + hivlp.__file__)
        import json, mlflow, pandas as pd
        model = mlflow.pyfunc.load_model("models:/served@champion")
        out = model.predict(pd.DataFrame({{"text": {CAPTIONS!r}}}))
        import hivlp
        print(json.dumps({{"shape": list(out.shape), "hivlp": hivlp.__file__, "row0": out[0].tolist()}}))
    """)
    work = tmp_path / "clean"
    work.mkdir()
    done = subprocess.run([sys.executable, "-I", "-c", script], cwd=work, capture_output=True, text=True,
                          env={"MLFLOW_TRACKING_URI": world["uri"], "PATH": "/usr/bin:/bin", "HOME": str(work)},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["shape"] == [2, 512]
    assert not any(got["hivlp"].startswith(b) for b in blocked) and "/code/hivlp/" in got["hivlp"]
    expected = load_encoder(world["cps"].better, device="cpu").texts(CAPTIONS, progress=False)
    np.testing.assert_allclose(got["row0"], expected[0], atol=1e-5)

    # What was logged: code, not a pickle; signature, input example and requirements kept.
    mv = client.get_model_version_by_alias("served", "champion")
    files = _model_dir(client, "served", mv.version)
    assert not list(files.rglob("*.pkl"))
    conf = (files / "MLmodel").read_text()
    assert "model_code_path" in conf and "python_model:" not in conf
    assert (files / "code" / "hivlp" / "model" / "encode.py").is_file()
    assert (files / "input_example.json").is_file() and "signature:" in conf
    reqs = (files / "requirements.txt").read_text()
    assert "torch==" in reqs and "hivlp" not in reqs


class _Attack:
    """Unpickling this writes a marker file: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def test_a_planted_pickle_is_never_unpickled(world, client, tmp_path):
    mv = client.get_model_version_by_alias("served", "champion")
    files = _model_dir(client, "served", mv.version)
    marker = tmp_path / "pwned"
    (files / "python_model.pkl").write_bytes(pickle.dumps(_Attack(marker)))
    try:
        model = registry.load_pyfunc("models:/served@champion", world["uri"])
        assert model.predict(pd.DataFrame({"text": CAPTIONS})).shape == (2, 512)
        mlflow.pyfunc.load_model("models:/served@champion")
        assert not marker.exists()

        # A model whose MLmodel points at the pickle (the old format, or an edited MLmodel) is refused.
        tampered = tmp_path / "tampered"
        shutil.copytree(files, tampered)
        conf = (tampered / "MLmodel").read_text()
        conf = "\n".join(line for line in conf.splitlines() if "model_code_path" not in line)
        (tampered / "MLmodel").write_text(conf.replace("    code: code", "    code: code\n    python_model: python_model.pkl"))
        with pytest.raises(registry.RegistryError, match="pickled pyfunc"):
            registry.load_pyfunc(str(tampered), world["uri"])
        assert not marker.exists()
    finally:
        (files / "python_model.pkl").unlink()


def test_mlflow_models_serve_answers_invocations(world, tmp_path):
    """`mlflow models serve -m models:/served@champion --env-manager local` on a free loopback port:
    captions, a base64 image and an image path in, one embedding per row at the requested level out."""
    port = free_port()
    log = tmp_path / "serve.log"
    proc = start([mlflow_bin(), "models", "serve", "-m", "models:/served@champion", "--env-manager", "local",
                  "-h", "127.0.0.1", "-p", str(port)], log, env={"MLFLOW_TRACKING_URI": world["uri"]},
                 cwd=world["root"])
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, 180, log)
        image = sorted((world["cps"].dataset.parent / "images").glob("*.jpg"))[0]
        rows = [{"text": CAPTIONS[0]}, {"image_b64": base64.b64encode(image.read_bytes()).decode()},
                {"image_path": str(image)}]
        body = json.dumps({"dataframe_records": rows, "params": {"level": 64}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            out = np.asarray(json.loads(r.read())["predictions"], dtype=np.float32)
    finally:
        stop(proc)
    assert out.shape == (3, 64)
    enc = load_encoder(world["cps"].better, device="cpu")
    full = np.concatenate([enc.texts(CAPTIONS[:1], progress=False), enc.images([image], num_workers=0, progress=False)])
    want = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(out[:2], want, atol=1e-5)
    np.testing.assert_allclose(out[2], out[1], atol=1e-6)  # the same image, by bytes or by path


def _versions(client, name) -> list[str]:
    return sorted((v.version for v in client.search_model_versions(f"name='{name}'")), key=int)


def test_gate(world, client):
    """Bound metrics; worse and tie gated out after the champion's re-evaluation; same weights reused."""
    cps, uri, name = world["cps"], world["uri"], "gate"
    kw = dict(gate_split="val", name=name, tracking_uri=uri, device="cpu")

    # Another checkpoint's metrics: refused, naming both hashes; nothing registered.
    with pytest.raises(MetricsMismatchError, match="measured weights .* but checkpoint .* holds weights"):
        promote(cps.worse, cps.metrics["better"], **kw)
    with pytest.raises(MetricsMismatchError, match="measured split 'val' but the gate's split is 'test'"):
        promote(cps.better, cps.metrics["better"], **{**kw, "gate_split": "test"})
    assert _versions(client, name) == []

    first = promote(cps.better, cps.metrics["better"], **kw)
    assert first.status == "promoted" and first.previous_champion is None and first.selected_on_gate_split
    champ = first.version
    # The weights were logged once (for "served"): this version is registered from that same logged model.
    assert client.get_model_version(name, champ).source == client.get_model_version_by_alias("served", "champion").source
    # A stored number is never trusted: make the champion's look terrible.
    client.set_model_version_tag(name, champ, "hivlp.gate.r_mean", "0.0")

    worse = promote(cps.worse, cps.metrics["worse"], **kw)
    assert worse.status == "gated-out" and worse.previous_champion == champ
    assert worse.champion_value == pytest.approx(cps.ar["better"], abs=1e-6)  # measured again, now
    assert str(client.get_model_version_by_alias(name, "champion").version) == champ
    tags = client.get_model_version(name, worse.version).tags
    assert tags["hivlp.gate.status"] == "gated-out" and tags["hivlp.gate.split"] == "val"
    assert "re-evaluated" in tags["hivlp.gate.reason"]
    run = client.get_run(worse.gate_run_id)
    assert run.data.metrics["gain"] == pytest.approx(cps.ar["worse"] - cps.ar["better"])
    gate_json = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=worse.gate_run_id, artifact_path="gate.json", tracking_uri=uri)).read_text())
    assert gate_json["champion_metrics"]["source"]["weights_sha256"] != gate_json["weights_sha256"]

    assert cps.ar["tie"] == cps.ar["better"]
    tie = promote(cps.tie, cps.metrics["tie"], **{**kw, "min_delta": 0.0})
    assert tie.status == "gated-out" and "a tie or worse never promotes" in tie.reason

    before = _versions(client, name)
    again = promote(cps.worse, cps.metrics["worse"], **kw)
    assert again.reused_version and again.version == worse.version and again.status == "gated-out"
    same = promote(cps.better, cps.metrics["better"], **kw)
    assert same.status == "already-champion" and same.version == champ
    assert _versions(client, name) == before

    # The CLI: already champion 0, gated out 3, mismatched metrics 2 (one line, nothing registered).
    code, out, _ = run_cli(["promote", "--checkpoint", cps.better, "--metrics", cps.metrics["better"],
                            "--gate-split", "val", "--name", name, "--tracking-uri", uri, "--device", "cpu"])
    assert code == 0 and "already champion" in out
    code, out, _ = run_cli(["promote", "--checkpoint", cps.worse, "--metrics", cps.metrics["worse"],
                            "--gate-split", "val", "--name", name, "--tracking-uri", uri, "--device", "cpu"])
    assert code == 3 and "gated out" in out
    code, _, err = run_cli(["promote", "--checkpoint", cps.worse, "--metrics", cps.metrics["tie"],
                            "--gate-split", "val", "--name", name, "--tracking-uri", uri])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "measured weights" in err
    assert _versions(client, name) == before


def test_a_better_model_takes_the_alias_and_a_champion_without_checkpoint_is_refused(world, client, tmp_path):
    cps, uri, name = world["cps"], world["uri"], "gone"
    kw = dict(gate_split="val", name=name, tracking_uri=uri, device="cpu")
    # Weights of its own (the worse model at another temperature), so its files are this test's alone.
    copy = retemper(cps.worse, tmp_path / "victim", 0.5)
    evaluate_to(copy, cps.dataset, tmp_path / "victim.json")
    first = promote(copy, tmp_path / "victim.json", **kw)
    better = promote(cps.better, cps.metrics["better"], **kw)
    assert better.status == "promoted" and better.previous_champion == first.version
    assert client.get_model_version(name, first.version).tags["hivlp.superseded_by"] == better.version

    # A champion registered the old (pickled) way, same weights: replaced by a models-from-code version
    # registered from the same logged model (no second copy), without a comparison.
    client.delete_model_version_tag(name, better.version, "hivlp.model_format")
    legacy = promote(cps.better, cps.metrics["better"], **kw)
    assert legacy.status == "promoted" and legacy.previous_champion == better.version != legacy.version
    assert client.get_model_version(name, legacy.version).source == client.get_model_version(name, better.version).source

    # Back to the worse one as champion, then its checkpoint disappears: folder and model artifacts.
    client.set_registered_model_alias(name, "champion", first.version)
    shutil.rmtree(copy)
    shutil.rmtree(_model_dir(client, name, first.version))
    before = _versions(client, name)
    with pytest.raises(registry.RegistryError, match=f"checkpoint of {name} version {first.version} .* is gone"):
        promote(cps.tie, cps.metrics["tie"], **kw)
    assert _versions(client, name) == before


def test_search_encodes_the_query_with_the_registered_champion(world, tmp_path, capsys):
    """`hivlp search --model-uri models:/served@champion` ranks exactly as the checkpoint it serves."""
    from hivlp.cli import main
    from hivlp.retrieval.milvus import MilvusDualIndex

    ckpt = world["cps"].better
    enc = load_encoder(ckpt, device="cpu")
    paths = sorted((world["cps"].dataset.parent / "images").glob("*.jpg"))[:6]
    emb = enc.images([str(p) for p in paths], batch_size=6, num_workers=0, progress=False)
    uri = str(tmp_path / "m.db")
    with MilvusDualIndex(uri, "served") as index:
        index.build_from_arrays(emb, np.arange(6), ["image"] * 6, coarse_dim=64, index="FLAT",
                                metadata={"filename": [p.name for p in paths]}, progress=False)
    hits = {}
    for how in (["--model-uri", "models:/served@champion"], ["--checkpoint", str(ckpt)]):
        assert main(["search", "--uri", uri, "--name", "served", "--text", CAPTIONS[0], "--k", "5",
                     "--shortlist", "6", "--json", *how]) == 0
        hits[how[0]] = json.loads(capsys.readouterr().out)["hits"]
    assert [h["id"] for h in hits["--model-uri"]] == [h["id"] for h in hits["--checkpoint"]]
    np.testing.assert_allclose([h["score"] for h in hits["--model-uri"]],
                               [h["score"] for h in hits["--checkpoint"]], atol=1e-5)
