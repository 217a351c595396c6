"""DVC with history. A throwaway git + DVC repo runs a small copy of the pipeline on a real Flickr8k slice (32 train, 16 val images)
(pre-training 2 epochs -> fine-tuning 1 epoch -> evaluate, each the real `hivlp` command) followed by
this repo's own `report` stage and `plots:` (copied from dvc.yaml) and its own `.dvc/config`, driven by
the real scripts/main_job.sh. Then: the committed files hold what the run measured; `dvc metrics show`,
`dvc metrics diff`, `dvc plots show` and `dvc exp show` read them; a fresh clone restores everything
from the local remote without running a stage; `dvc exp run -S configs/pretrain.yaml:train.lr=...`
runs a second experiment; bad report inputs are one line."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hivlp.report import write_report

from .conftest import REPO, write_slice

VENV_BIN = Path(sys.executable).parent
SPEC = yaml.safe_load((REPO / "dvc.yaml").read_text())
LEVELS = [32, 64, 128, 256, 512]


def _env(remote: Path | None = None) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(REPO)  # the stage commands run this checkout's hivlp
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    if remote is not None:
        env["HIVLP_DVC_REMOTE"] = str(remote)
    return env


def sh(cmd: list[str] | str, cwd: Path, remote: Path | None = None, check: bool = True) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=_env(remote), capture_output=True, text=True, shell=isinstance(cmd, str))
    if check and r.returncode:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout + r.stderr


def _mini_pipeline(slice_json: Path, cache: Path) -> dict:
    """The main job's stages on the slice (small and quick), then the real report stage and plots."""
    common = (f"--dataset {slice_json} --no-resume --set model.text_trainable_layers=0 --set train.num_workers=0 "
              f"--set train.warmup_steps=2 --set tracking.enabled=false --set train.cache_dir={cache}")
    stages = {
        "pretrain": {
            "cmd": f"hivlp pretrain --config configs/pretrain.yaml --out outputs/pretrain {common} "
                   "--set train.epochs=2 --set train.batch_size=32",
            "deps": [str(slice_json)], "params": [{"configs/pretrain.yaml": None}], "outs": ["outputs/pretrain"],
        },
        "finetune": {
            "cmd": f"hivlp finetune --config configs/finetune.yaml --init outputs/pretrain --out outputs/finetune "
                   f"{common} --set train.batch_size=32",
            "deps": ["outputs/pretrain"], "params": [{"configs/finetune.yaml": None}], "outs": ["outputs/finetune"],
        },
        "evaluate": {
            "cmd": f"hivlp evaluate --checkpoint outputs/finetune --dataset {slice_json} --split val "
                   "--batch-size 16 --out outputs/metrics.json",
            "deps": ["outputs/finetune"], "outs": SPEC["stages"]["evaluate"]["outs"],
        },
        "report": SPEC["stages"]["report"],
    }
    return {"stages": stages, "plots": SPEC["plots"]}


@pytest.fixture(scope="module")
def project(tmp_path_factory, flickr8k_raw):
    """A git + DVC repo that ran `scripts/main_job.sh` once (pushing to a local remote), all committed."""
    root = tmp_path_factory.mktemp("dvc")
    slice_json = write_slice(flickr8k_raw, root / "slice", n_train=32, n_val=16)
    repo, remote = root / "repo", root / "remote"
    repo.mkdir()
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "hivlp", repo / "hivlp", ignore=ignore)
    for name in ("configs", "scripts"):
        shutil.copytree(REPO / name, repo / name, ignore=ignore)
    shutil.copy(REPO / ".gitignore", repo / ".gitignore")
    sh("git init -q && dvc init -q", repo)
    shutil.copy(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    (repo / "dvc.yaml").write_text(yaml.safe_dump(_mini_pipeline(slice_json, root / "feature-cache"), sort_keys=False))
    out = sh("bash scripts/main_job.sh", repo, remote)
    sh("git add -A && git commit -qm run1", repo)
    return {"repo": repo, "remote": remote, "log": out}


def test_report_holds_what_the_run_measured(project, tmp_path):
    repo = project["repo"]
    assert "Running stage 'report'" in project["log"], project["log"]
    metrics = json.loads((repo / "outputs" / "metrics.json").read_text())
    val = json.loads((repo / "metrics" / "val.json").read_text())
    assert list(val)[:6] == ["ar_032", "ar_064", "ar_128", "ar_256", "ar_512", "ar_c2f"]
    for d in LEVELS:
        assert val[f"ar_{d:03d}"] == round(metrics[f"dim_{d}"]["r_mean"], 2)
        assert val["recall"][f"{d:03d}"]["img_r5"] == round(metrics[f"dim_{d}"]["img_r5"], 2)
    assert val["ar_c2f"] == round(metrics["coarse_to_fine"]["r_mean"], 2)
    assert val["counts"] == {"images": 16, "texts": 80}

    history = list(csv.DictReader((repo / "plots" / "history.csv").open()))
    assert [(r["epoch"], r["run"], r["run_epoch"]) for r in history] == [
        ("1", "pretrain", "1"), ("2", "pretrain", "2"), ("3", "finetune", "1")]
    ft = json.loads((repo / "outputs" / "finetune" / "history.json").read_text())[0]["metrics"]
    assert float(history[2]["ar_064"]) == round(ft["dim_64"]["r_mean"], 2)
    assert float(history[2]["img_r1"]) == round(ft["dim_512"]["img_r1"], 2)
    levels = list(csv.DictReader((repo / "plots" / "levels.csv").open()))
    assert [int(r["dim"]) for r in levels] == LEVELS

    # The library function writes the same files elsewhere, and reading is all it does to its inputs.
    before = (repo / "outputs" / "metrics.json").read_bytes()
    written = write_report(repo / "outputs" / "metrics.json",
                           [repo / "outputs" / "pretrain" / "history.json", repo / "outputs" / "finetune" / "history.json"],
                           tmp_path / "m", tmp_path / "p")
    assert written["metrics"].read_text() == (repo / "metrics" / "val.json").read_text()
    assert written["history"].read_text() == (repo / "plots" / "history.csv").read_text()
    assert (repo / "outputs" / "metrics.json").read_bytes() == before


def test_dvc_metrics_and_plots_show_the_run(project):
    repo = project["repo"]
    shown = sh("dvc metrics show", repo)
    val = json.loads((repo / "metrics" / "val.json").read_text())
    header, row = shown.strip().splitlines()[:2]
    assert "outputs/metrics.json" not in shown, "the evaluate output is a cached out, not a second metrics row"
    assert header.split()[:7] == ["Path", "ar_032", "ar_064", "ar_128", "ar_256", "ar_512", "ar_c2f"], shown
    assert [float(x) for x in row.split()[1:7]] == [val[k] for k in list(val)[:6]], shown
    sh("dvc plots show -o plots_html", repo)
    page = (repo / "plots_html" / "index.html").read_text()
    for plot in SPEC["plots"]:
        (name, props), = plot.items()
        assert props["title"] in page, name
    assert '"ar_c2f"' in page and '"txt_r10"' in page  # the data went in, not only the titles
    assert page.count('"title": {"text": "plots/') == 0, "a plots file drawn twice (once without x/y)"


def test_a_fresh_clone_restores_the_run_from_the_remote(project, tmp_path):
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(project["repo"]), str(clone)], tmp_path)
    assert not (clone / "outputs").exists()
    log = sh("bash scripts/main_job.sh", clone, project["remote"])
    assert "Running stage" not in log, log  # restored, nothing recomputed
    assert "is cached - skipping run" in log, log
    for rel in ("outputs/pretrain/model.safetensors", "outputs/finetune/history.json", "outputs/metrics.json"):
        assert (clone / rel).read_bytes() == (project["repo"] / rel).read_bytes(), rel
    assert "Data and pipelines are up to date." in sh("dvc status", clone)
    assert sh("git status --porcelain", clone).strip() == ""


@pytest.mark.slow  # trains the slice pipeline a second time
def test_exp_run_sets_a_recipe_field_and_exp_show_compares(project):
    repo = project["repo"]
    sh(["dvc", "exp", "run", "-n", "lr-high", "-S", "configs/pretrain.yaml:train.lr=0.003"], repo)
    # README's form of the comparison
    shown = sh(["dvc", "exp", "show", "--md", "--drop", ".*", "--keep", "Experiment|ar_|configs/pretrain.yaml:train.lr"],
               repo)
    header = [c.strip() for c in shown.splitlines()[0].strip("|").split("|")]
    assert header == ["Experiment", "ar_032", "ar_064", "ar_128", "ar_256", "ar_512", "ar_c2f",
                      "configs/pretrain.yaml:train.lr"], shown
    row = next(line for line in shown.splitlines() if "lr-high" in line)
    val = json.loads((repo / "metrics" / "val.json").read_text())  # the workspace holds the experiment's results
    assert [c.strip() for c in row.strip("|").split("|")][1:] == [f"{val[k]:g}" for k in header[1:7]] + ["0.003"], shown
    diff = sh(["dvc", "metrics", "diff", "HEAD", "lr-high", "--targets", "metrics/val.json", "--md"], repo)
    assert "ar_512" in diff, diff


@pytest.mark.parametrize("case", ["no_metrics", "history_not_a_list", "metrics_without_levels"])
def test_bad_report_input_is_one_line(tmp_path, case):
    metrics, history = tmp_path / "metrics.json", tmp_path / "pretrain" / "history.json"
    history.parent.mkdir()
    metrics.write_text(json.dumps({"dim_64": dict.fromkeys(("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5",
                                                            "img_r10", "r_mean"), 1.0)}))
    history.write_text("[]")
    culprit = {"no_metrics": tmp_path / "missing.json", "history_not_a_list": history,
               "metrics_without_levels": metrics}[case]
    if case == "history_not_a_list":
        history.write_text('{"epoch": 1}')
    if case == "metrics_without_levels":
        metrics.write_text('{"full": {}}')
    r = subprocess.run([sys.executable, "-m", "hivlp", "report", "--metrics",
                        str(culprit if case == "no_metrics" else metrics), "--history", str(history),
                        "--metrics-dir", str(tmp_path / "m"), "--plots-dir", str(tmp_path / "p")],
                       env=_env(), capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(culprit) in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "p").exists()
