"""The fault catalogue: bad inputs thrown at every command, as a hostile or careless user would.

Each case asserts the exit code (2: the input given is wrong; 1: problems found or a runtime failure),
that the one error line names the culprit (file, entry, field or argument), that no traceback reaches
the user, and that what earlier commands wrote (dataset, checkpoint, metrics, export, Milvus Lite
index, MLflow registry; see `faultworld.World.outputs`) is byte-identical afterwards. All cases share
one small world built once with the real commands; each runs in-process through `hivlp.cli.main`.

After the catalogue: behaviours that need more than one command or a real second process (content
keyed caches and exports, a finished run not run again, concurrent exporters, kill -9 mid-save, file
modes, --debug).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from .conftest import REPO
from .faultworld import (
    INDEX_NAME,
    World,
    build_world,
    must,
    png_bomb,
    run_cli,
    tree_hashes,
    write_dataset,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory, flickr8k_raw) -> World:
    return build_world(tmp_path_factory.mktemp("world"), flickr8k_raw)


# ---------------------------------------------------------------------------------------------
# Inputs the cases build in their own folder (`tmp`); copies they damage go under tmp/keep, which is
# hashed before and after like the world's outputs.


def dataset(w: World, tmp: Path, mutate: Callable[[list[dict]], object]) -> Path:
    """The world's dataset with `mutate` applied, written to tmp/d.json (images: --image-root w.data_dir)."""
    entries = copy.deepcopy(w.entries)
    mutate(entries)
    return write_dataset(tmp / "d.json", entries)


def with_bomb(w: World, tmp: Path, split: str) -> Path:
    """tmp/b.json: the world's images copied to tmp/images plus a decompression bomb in `split`."""
    shutil.copytree(w.data_dir / "images", tmp / "images")
    png_bomb(tmp / "images" / "bomb.png")
    entries = copy.deepcopy(w.entries)
    entries.append({"filepath": "images", "filename": "bomb.png", "imgid": 999, "split": split,
                    "sentences": [{"raw": "a black square at night", "sentid": 99_999}]})
    return write_dataset(tmp / "b.json", entries)


def ckpt_copy(w: World, tmp: Path) -> Path:
    dst = tmp / "keep" / "ckpt"
    shutil.copytree(w.ckpt, dst)
    return dst


def forge_meta(ckpt: Path) -> None:
    """Re-record every file hash in meta.json, as someone covering their tracks would."""
    from hivlp.model.checkpoint import _hashed_files

    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files_sha256"] = _hashed_files(ckpt)
    meta["weights_sha256"] = meta["files_sha256"]["model.safetensors"]
    (ckpt / "meta.json").write_text(json.dumps(meta))


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


PICKLE = pickle.dumps({"weight": [0.0, 1.0]})  # a pickle file renamed to .safetensors
NESTED = "[" * 100_000 + "]" * 100_000
# An evaluation of other weights (the gate refuses it, naming both hashes).
OTHER_WEIGHTS = json.dumps({"full": {"r_mean": 99.0}, "source": {"weights_sha256": "0" * 64, "split": "val",
                                                                 "dataset": "d.json", "dataset_json_sha256": "0" * 64}})


def export_copy(w: World, tmp: Path) -> Path:
    dst = tmp / "keep" / "export"
    shutil.copytree(w.export, dst)
    return dst


def with_resume_weights(w: World, tmp: Path, content: bytes | None) -> Path:
    """A copy of the finished training folder whose resume/model.safetensors is replaced."""
    import torch
    from safetensors.torch import save_file

    run = ckpt_copy(w, tmp)
    target = run / "resume" / "model.safetensors"
    if content is None:
        save_file({"head.weight": torch.zeros(3, 3)}, str(target))  # safetensors, but another model's
    else:
        target.write_bytes(content)
    return run


def search_args(w: World, *query: str) -> list:
    return ["search", "--uri", w.uri, "--name", INDEX_NAME, "--checkpoint", w.ckpt, *query]


# ---------------------------------------------------------------------------------------------
# The catalogue


@dataclass(frozen=True)
class Fault:
    id: str
    argv: Callable[[World, Path], list]  # builds the command line (and its bad inputs in the case folder)
    code: int
    culprit: Callable[[World, Path], list[str]]  # what the error line must name
    stream: str = "stderr"  # "stdout": validation problems, reported in the summary (exit 1)


def _first_image(w: World) -> str:
    return w.entries[0]["filename"]


FAULTS = [
    # ----------------------------------------------------------------------------- validate
    Fault("validate/json-missing", lambda w, t: ["validate", t / "none.json", "--report", t / "r.json"], 2,
          lambda w, t: [str(t / "none.json"), "not found"]),
    Fault("validate/json-not-json", lambda w, t: ["validate", write(t / "d.json", "{oops"), "--report", t / "r.json"],
          2, lambda w, t: [str(t / "d.json"), "not valid JSON"]),
    Fault("validate/json-nested-100k-deep", lambda w, t: ["validate", write(t / "d.json", NESTED), "--report",
                                                          t / "r.json"], 2,
          lambda w, t: [str(t / "d.json"), "nested too deeply"]),
    Fault("validate/imgid-beyond-int64",
          lambda w, t: ["validate", dataset(w, t, lambda e: e[0].update(imgid=2**70)), "--image-root", w.data_dir,
                        "--report", t / "r.json"], 2,
          lambda w, t: ["images[0]", "'imgid'", str(2**70)]),
    Fault("validate/imgid-in-caption-id-space",
          lambda w, t: ["validate", dataset(w, t, lambda e: e[1].update(imgid=10**9)), "--image-root", w.data_dir,
                        "--report", t / "r.json"], 2,
          lambda w, t: ["images[1]", "'imgid'", "1000000000"]),
    Fault("validate/imgid-negative",
          lambda w, t: ["validate", dataset(w, t, lambda e: e[2].update(imgid=-1)), "--image-root", w.data_dir,
                        "--report", t / "r.json"], 2,
          lambda w, t: ["images[2]", "'imgid'", "-1"]),
    Fault("validate/sentid-negative",
          lambda w, t: ["validate", dataset(w, t, lambda e: e[3]["sentences"][1].update(sentid=-5)), "--image-root",
                        w.data_dir, "--report", t / "r.json"], 2,
          lambda w, t: ["images[3]", "sentences[1]", "'sentid'"]),
    Fault("validate/imgid-duplicate",
          lambda w, t: ["validate", dataset(w, t, lambda e: e[1].update(imgid=e[0]["imgid"])), "--image-root",
                        w.data_dir, "--report", t / "r.json"], 1,
          lambda w, t: ["duplicate_imgid", f"imgid {w.entries[0]['imgid']} is used by 2 entries"], "stdout"),
    Fault("validate/filepath-dotdot",
          lambda w, t: ["validate", dataset(w, t, lambda e: e[0].update(filepath="../../../../../../etc",
                                                                       filename="passwd")),
                        "--image-root", w.data_dir, "--report", t / "r.json"], 2,
          lambda w, t: ["images[0]", "passwd", "outside the image root", "--allow-outside-root"]),
    Fault("validate/filepath-absolute",
          lambda w, t: ["validate", dataset(w, t, lambda e: e[4].update(filepath="/etc", filename="hostname")),
                        "--image-root", w.data_dir, "--report", t / "r.json"], 2,
          lambda w, t: ["images[4]", "hostname", "outside the image root"]),
    Fault("validate/symlink-out-of-the-root",
          lambda w, t: ["validate", _symlinked(w, t), "--report", t / "r.json"], 2,
          lambda w, t: ["images[0]", "outside the image root"]),
    Fault("validate/report-is-a-folder", lambda w, t: ["validate", w.dataset, "--report", t], 2,
          lambda w, t: ["--report", str(t), "is a folder"]),
    Fault("validate/decompression-bomb", lambda w, t: ["validate", with_bomb(w, t, "train"), "--report", t / "r.json"],
          1, lambda w, t: ["corrupt_image", "bomb.png"], "stdout"),
    Fault("validate/workers-zero", lambda w, t: ["validate", w.dataset, "--workers", "0", "--report", t / "r.json"],
          2, lambda w, t: ["--workers"]),
    # ----------------------------------------------------------------------------- pretrain
    Fault("pretrain/config-missing", lambda w, t: ["pretrain", "--config", t / "none.yaml", "--out", t / "o"], 2,
          lambda w, t: [str(t / "none.yaml"), "not found"]),
    Fault("pretrain/config-empty", lambda w, t: ["pretrain", "--config", write(t / "c.yaml", ""), "--out", t / "o"],
          2, lambda w, t: [str(t / "c.yaml"), "is empty"]),
    Fault("pretrain/config-not-yaml",
          lambda w, t: ["pretrain", "--config", write(t / "c.yaml", "train: [1,"), "--out", t / "o"], 2,
          lambda w, t: [str(t / "c.yaml"), "not valid YAML"]),
    Fault("pretrain/config-nested-yaml",
          lambda w, t: ["pretrain", "--config", write(t / "c.yaml", "a: " + NESTED), "--out", t / "o"], 2,
          lambda w, t: [str(t / "c.yaml"), "nested too deeply"]),
    Fault("pretrain/unknown-field", lambda w, t: ["pretrain", "--config", w.recipe, "--set", "train.lrr=1",
                                                  "--out", t / "o"], 2,
          lambda w, t: ["train.lrr"]),
    Fault("pretrain/lr-nan", lambda w, t: ["pretrain", "--config", w.recipe, "--set", "train.lr=.nan",
                                           "--out", t / "o"], 2,
          lambda w, t: ["train.lr", "finite"]),
    Fault("pretrain/lr-inf", lambda w, t: ["pretrain", "--config", w.recipe, "--set", "train.lr=1e999",
                                           "--out", t / "o"], 2,
          lambda w, t: ["train.lr", "finite"]),
    Fault("pretrain/batch-size-zero", lambda w, t: ["pretrain", "--config", w.recipe, "--set",
                                                    "train.batch_size=0", "--out", t / "o"], 2,
          lambda w, t: ["train.batch_size"]),
    Fault("pretrain/out-is-a-file", lambda w, t: ["pretrain", "--config", w.recipe, "--out", write(t / "f", "x")],
          2, lambda w, t: ["--out", str(t / "f"), "is a file"]),
    Fault("pretrain/other-hyper-parameters-into-a-finished-out",
          lambda w, t: ["pretrain", "--config", w.recipe, "--out", w.ckpt, "--set", "train.lr=0.01"], 2,
          lambda w, t: [str(w.ckpt), "train.lr", "--no-resume"]),
    Fault("pretrain/other-data-into-a-finished-out",
          lambda w, t: ["pretrain", "--config", w.recipe, "--out", w.ckpt, "--image-root", w.data_dir, "--dataset",
                        dataset(w, t, lambda e: e[0]["sentences"][0].update(raw="a changed caption here"))], 2,
          lambda w, t: [str(w.ckpt), "data.train_fingerprint", "--no-resume"]),
    Fault("pretrain/resume-state-of-another-model",
          lambda w, t: ["pretrain", "--config", w.recipe, "--out", with_resume_weights(w, t, None)], 2,
          lambda w, t: [str(t / "keep/ckpt/resume/model.safetensors"), "does not fit", "--no-resume"]),
    Fault("pretrain/resume-state-is-a-pickle",
          lambda w, t: ["pretrain", "--config", w.recipe, "--out", with_resume_weights(w, t, PICKLE)], 2,
          lambda w, t: [str(t / "keep/ckpt/resume/model.safetensors"), "--no-resume"]),
    Fault("pretrain/resume-state-json-nested",
          lambda w, t: ["pretrain", "--config", w.recipe, "--out", _nested_state(w, t)], 2,
          lambda w, t: [str(t / "keep/ckpt/resume/state.json"), "--no-resume"]),
    Fault("pretrain/imgid-duplicate-in-train",
          lambda w, t: ["pretrain", "--config", w.recipe, "--out", t / "o", "--image-root", w.data_dir, "--dataset",
                        dataset(w, t, lambda e: e[1].update(imgid=e[0]["imgid"]))], 2,
          lambda w, t: [str(t / "d.json"), f"imgid {w.entries[0]['imgid']} is used by 2 entries", "hivlp validate"]),
    Fault("pretrain/caption-empty",
          lambda w, t: ["pretrain", "--config", w.recipe, "--out", t / "o", "--image-root", w.data_dir, "--dataset",
                        dataset(w, t, lambda e: e[2]["sentences"][4].update(raw="   "))], 2,
          lambda w, t: ["images[2]", "sentences[4]", "caption is empty"]),
    Fault("pretrain/image-outside-the-root",
          lambda w, t: ["pretrain", "--config", w.recipe, "--out", t / "o", "--image-root", w.data_dir, "--dataset",
                        dataset(w, t, lambda e: e[5].update(filepath=str(w.data_dir.parent)))], 2,
          lambda w, t: ["images[5]", "outside the image root", "--allow-outside-root"]),
    Fault("pretrain/decompression-bomb-in-train",
          lambda w, t: ["pretrain", "--config", w.recipe, "--out", t / "o", "--set", "train.num_workers=2",
                        "--dataset", with_bomb(w, t, "train")], 2,
          lambda w, t: [str(t / "images" / "bomb.png"), "too large"]),
    Fault("pretrain/dataset-missing",
          lambda w, t: ["pretrain", "--config", w.recipe, "--out", t / "o", "--dataset", t / "none.json"], 2,
          lambda w, t: [str(t / "none.json"), "not found"]),
    # ----------------------------------------------------------------------------- finetune
    Fault("finetune/init-missing", lambda w, t: ["finetune", "--config", w.ft_recipe, "--init", t / "none",
                                                 "--out", t / "o"], 2,
          lambda w, t: [str(t / "none"), "checkpoint folder not found"]),
    Fault("finetune/init-weights-are-a-pickle",
          lambda w, t: ["finetune", "--config", w.ft_recipe, "--out", t / "o",
                        "--init", _tampered(w, t, "model.safetensors", PICKLE, forge=False)], 2,
          lambda w, t: [str(t / "keep/ckpt/model.safetensors"), "sha256 differs"]),
    Fault("finetune/init-weights-are-a-pickle-meta-forged",
          lambda w, t: ["finetune", "--config", w.ft_recipe, "--out", t / "o",
                        "--init", _tampered(w, t, "model.safetensors", PICKLE, forge=True)], 2,
          lambda w, t: [str(t / "keep/ckpt/model.safetensors"), "not a safetensors file"]),
    Fault("finetune/init-meta-malformed",
          lambda w, t: ["finetune", "--config", w.ft_recipe, "--out", t / "o",
                        "--init", _tampered(w, t, "meta.json", b'{"format": ', forge=False)], 2,
          lambda w, t: [str(t / "keep/ckpt/meta.json"), "not valid JSON"]),
    Fault("finetune/init-meta-nested",
          lambda w, t: ["finetune", "--config", w.ft_recipe, "--out", t / "o",
                        "--init", _tampered(w, t, "meta.json", NESTED.encode(), forge=False)], 2,
          lambda w, t: [str(t / "keep/ckpt/meta.json"), "nested too deeply"]),
    Fault("finetune/init-meta-missing",
          lambda w, t: ["finetune", "--config", w.ft_recipe, "--out", t / "o", "--init", _without(w, t, "meta.json")],
          2, lambda w, t: [str(t / "keep/ckpt/meta.json"), "is missing"]),
    Fault("finetune/init-config-empty-meta-forged",
          lambda w, t: ["finetune", "--config", w.ft_recipe, "--out", t / "o",
                        "--init", _tampered(w, t, "config.yaml", b"", forge=True)], 2,
          lambda w, t: [str(t / "keep/ckpt/config.yaml")]),
    Fault("finetune/into-its-own-init",
          lambda w, t: ["finetune", "--config", w.ft_recipe, "--init", w.ckpt, "--out", w.ckpt], 2,
          lambda w, t: [str(w.ckpt), "recipe", "--no-resume"]),
    # ----------------------------------------------------------------------------- evaluate
    Fault("evaluate/out-is-a-folder", lambda w, t: ["evaluate", "--checkpoint", w.ckpt, "--dataset", w.dataset,
                                                    "--out", t], 2,
          lambda w, t: ["--out", str(t), "is a folder"]),
    Fault("evaluate/imgid-duplicate-in-the-split",
          lambda w, t: ["evaluate", "--checkpoint", w.ckpt, "--image-root", w.data_dir, "--out", t / "m.json",
                        "--dataset", dataset(w, t, lambda e: e[-1].update(imgid=e[-2]["imgid"]))], 2,
          lambda w, t: [str(t / "d.json"), f"imgid {w.entries[-2]['imgid']} is used by 2 entries"]),
    Fault("evaluate/imgid-negative",
          lambda w, t: ["evaluate", "--checkpoint", w.ckpt, "--image-root", w.data_dir, "--out", t / "m.json",
                        "--dataset", dataset(w, t, lambda e: e[-1].update(imgid=-7))], 2,
          lambda w, t: ["images[15]", "'imgid'", "-7"]),
    Fault("evaluate/decompression-bomb",
          lambda w, t: ["evaluate", "--checkpoint", w.ckpt, "--dataset", with_bomb(w, t, "val"), "--out",
                        t / "m.json"], 2,
          lambda w, t: [str(t / "images" / "bomb.png"), "too large"]),
    Fault("evaluate/split-absent", lambda w, t: ["evaluate", "--checkpoint", w.ckpt, "--dataset", w.dataset,
                                                 "--split", "test", "--out", t / "m.json"], 2,
          lambda w, t: [str(w.dataset), "split 'test'"]),
    Fault("evaluate/weights-tampered",
          lambda w, t: ["evaluate", "--checkpoint", _flipped(w, t), "--dataset", w.dataset, "--out", t / "m.json"], 2,
          lambda w, t: [str(t / "keep/ckpt/model.safetensors"), "sha256 differs"]),
    Fault("evaluate/batch-size-zero", lambda w, t: ["evaluate", "--checkpoint", w.ckpt, "--dataset", w.dataset,
                                                    "--batch-size", "0", "--out", t / "m.json"], 2,
          lambda w, t: ["--batch-size"]),
    # ----------------------------------------------------------------------------- export
    Fault("export/batch-size-zero", lambda w, t: ["export", "--checkpoint", w.ckpt, "--dataset", w.dataset,
                                                  "--out", t / "e", "--batch-size", "0"], 2,
          lambda w, t: ["--batch-size", "0"]),
    Fault("export/out-is-a-file", lambda w, t: ["export", "--checkpoint", w.ckpt, "--dataset", w.dataset,
                                                "--out", write(t / "f", "x")], 2,
          lambda w, t: ["--out", str(t / "f"), "is a file"]),
    Fault("export/shard-out-of-range", lambda w, t: ["export", "--checkpoint", w.ckpt, "--dataset", w.dataset,
                                                     "--out", t / "e", "--shard", "3/2"], 2,
          lambda w, t: ["--shard", "3/2"]),
    Fault("export/other-shard-count-into-an-export",
          lambda w, t: ["export", "--checkpoint", w.ckpt, "--dataset", w.dataset, "--out", w.export, "--shard", "0/2"],
          2, lambda w, t: [str(w.export), "shard count differs"]),
    Fault("export/image-outside-the-root",
          lambda w, t: ["export", "--checkpoint", w.ckpt, "--image-root", w.data_dir, "--out", t / "e",
                        "--dataset", dataset(w, t, lambda e: e[-1].update(filepath="../../..", filename="x.jpg"))], 2,
          lambda w, t: ["images[15]", "outside the image root"]),
    Fault("export/checkpoint-incomplete",
          lambda w, t: ["export", "--checkpoint", _without(w, t, "meta.json"), "--dataset", w.dataset,
                        "--out", t / "e"], 2,
          lambda w, t: [str(t / "keep/ckpt/meta.json"), "is missing"]),
    # ----------------------------------------------------------------------------- index
    Fault("index/batch-size-zero", lambda w, t: ["index", "--embeddings", w.export, "--uri", w.uri, "--name",
                                                 INDEX_NAME, "--coarse-dim", "16", "--batch-size", "0"], 2,
          lambda w, t: ["--batch-size", "0"]),
    Fault("index/embeddings-missing", lambda w, t: ["index", "--embeddings", t / "none", "--uri", t / "i.db"], 2,
          lambda w, t: [str(t / "none"), "not found"]),
    Fault("index/export-incomplete",
          lambda w, t: ["index", "--embeddings", _export_without_parquet(w, t), "--uri", t / "i.db"], 2,
          lambda w, t: [str(t / "keep/export"), "incomplete"]),
    Fault("index/shard-tampered",
          lambda w, t: ["index", "--embeddings", _export_flipped(w, t), "--uri", t / "i.db", "--coarse-dim", "16",
                        "--no-progress"], 2,
          lambda w, t: [str(t / "keep/export/shard-00000-of-00001.parquet"), "checksum differs"]),
    Fault("index/manifest-part-nested",
          lambda w, t: ["index", "--embeddings", _export_part(w, t, NESTED), "--uri", t / "i.db"], 2,
          lambda w, t: [str(t / "keep/export/shard-00000-of-00001.json"), "not valid JSON"]),
    Fault("index/coarse-dim-zero", lambda w, t: ["index", "--embeddings", w.export, "--uri", w.uri, "--name",
                                                 INDEX_NAME, "--coarse-dim", "0"], 2,
          lambda w, t: ["--coarse-dim", "0"]),
    Fault("index/uri-is-a-file", lambda w, t: ["index", "--embeddings", w.export, "--uri", write(t / "x.db", "x")],
          2, lambda w, t: [str(t / "x.db"), "is a file"]),
    # ----------------------------------------------------------------------------- search
    Fault("search/text-empty", lambda w, t: search_args(w, "--text", "   "), 2,
          lambda w, t: ["query text is empty"]),
    Fault("search/k-zero", lambda w, t: search_args(w, "--text", "a dog", "--k", "0"), 2,
          lambda w, t: ["--k"]),
    Fault("search/image-decompression-bomb", lambda w, t: search_args(w, "--image", png_bomb(t / "q.png")), 2,
          lambda w, t: [str(t / "q.png"), "too large"]),
    Fault("search/image-missing", lambda w, t: search_args(w, "--image", t / "none.jpg"), 2,
          lambda w, t: [str(t / "none.jpg"), "not found"]),
    Fault("search/index-absent", lambda w, t: ["search", "--uri", w.uri, "--name", "nope", "--checkpoint", w.ckpt,
                                               "--text", "a dog"], 1,
          lambda w, t: ["'nope'", "hivlp index"]),
    Fault("search/checkpoint-tampered",
          lambda w, t: ["search", "--uri", w.uri, "--name", INDEX_NAME, "--checkpoint", _flipped(w, t),
                        "--text", "a dog"], 2,
          lambda w, t: [str(t / "keep/ckpt/model.safetensors"), "sha256 differs"]),
    # ----------------------------------------------------------------------------- bench
    Fault("bench/sizes-zero", lambda w, t: ["bench", "retrieval", "--synthetic", "--sizes", "0"], 2,
          lambda w, t: ["--sizes", "positive"]),
    Fault("bench/embeddings-not-npz", lambda w, t: ["bench", "retrieval", "--embeddings", write(t / "e.npz", "x")],
          2, lambda w, t: [str(t / "e.npz"), "not a readable .npz"]),
    Fault("bench/embeddings-pickled-arrays",
          lambda w, t: ["bench", "retrieval", "--embeddings", _object_npz(t / "e.npz")], 2,
          lambda w, t: [str(t / "e.npz"), "not readable as numbers"]),
    Fault("bench/out-is-a-folder", lambda w, t: ["bench", "retrieval", "--synthetic", "--out", t], 2,
          lambda w, t: ["--out", str(t), "is a folder"]),
    Fault("bench/threads-zero", lambda w, t: ["bench", "retrieval", "--synthetic", "--threads", "0"], 2,
          lambda w, t: ["--threads"]),
    # ----------------------------------------------------------------------------- promote
    Fault("promote/metrics-missing",
          lambda w, t: ["promote", "--checkpoint", w.ckpt, "--metrics", t / "none.json", "--gate-split", "val",
                        "--tracking-uri", w.store],
          2, lambda w, t: [str(t / "none.json"), "not found"]),
    Fault("promote/metrics-nested",
          lambda w, t: ["promote", "--checkpoint", w.ckpt, "--metrics", write(t / "m.json", NESTED),
                        "--gate-split", "val", "--tracking-uri", w.store], 2,
          lambda w, t: [str(t / "m.json"), "nested too deeply"]),
    Fault("promote/metrics-without-r-mean",
          lambda w, t: ["promote", "--checkpoint", w.ckpt, "--metrics", write(t / "m.json", '{"full": [1, 2]}'),
                        "--gate-split", "val", "--tracking-uri", w.store], 2,
          lambda w, t: [str(t / "m.json"), "full.r_mean"]),
    Fault("promote/metrics-nan",
          lambda w, t: ["promote", "--checkpoint", w.ckpt, "--metrics", write(t / "m.json", '{"full": {"r_mean": NaN}}'),
                        "--gate-split", "val", "--tracking-uri", w.store], 2,
          lambda w, t: [str(t / "m.json"), "full.r_mean"]),
    Fault("promote/min-r-mean-nan",
          lambda w, t: ["promote", "--checkpoint", w.ckpt, "--metrics", w.metrics, "--min-r-mean", "nan",
                        "--gate-split", "val", "--tracking-uri", w.store], 2,
          lambda w, t: ["--min-r-mean", "nan"]),
    Fault("promote/out-is-a-folder",
          lambda w, t: ["promote", "--checkpoint", w.ckpt, "--metrics", w.metrics, "--out", t,
                        "--gate-split", "val", "--tracking-uri", w.store], 2,
          lambda w, t: ["--out", str(t), "is a folder"]),
    Fault("promote/checkpoint-tampered",
          lambda w, t: ["promote", "--checkpoint", _flipped(w, t), "--metrics", w.metrics, "--gate-split", "val",
                        "--tracking-uri", w.store],
          2, lambda w, t: [str(t / "keep/ckpt/model.safetensors"), "sha256 differs"]),
    Fault("promote/metrics-of-another-checkpoint",
          lambda w, t: ["promote", "--checkpoint", w.ckpt, "--metrics", write(t / "m.json", OTHER_WEIGHTS),
                        "--gate-split", "val", "--tracking-uri", w.store], 2,
          lambda w, t: [str(t / "m.json"), "measured weights 0000000000000000 but checkpoint", "holds weights"]),
    Fault("promote/metrics-of-another-split",
          lambda w, t: ["promote", "--checkpoint", w.ckpt, "--metrics", w.metrics, "--tracking-uri", w.store], 2,
          lambda w, t: [str(w.metrics), "measured split 'val' but the gate's split is 'test'", "--gate-split val"]),
    Fault("promote/min-delta-negative",
          lambda w, t: ["promote", "--checkpoint", w.ckpt, "--metrics", w.metrics, "--gate-split", "val",
                        "--min-delta", "-1", "--tracking-uri", w.store], 2,
          lambda w, t: ["--min-delta", ">= 0"]),
    # ----------------------------------------------------------------------------- serve (refused before it listens)
    Fault("serve/max-k-zero", lambda w, t: ["serve", "--embeddings", w.export, "--checkpoint", w.ckpt,
                                            "--max-k", "0"], 2, lambda w, t: ["--max-k must be > 0, got 0"]),
    Fault("serve/port-out-of-range", lambda w, t: ["serve", "--embeddings", w.export, "--checkpoint", w.ckpt,
                                                   "--port", "70000"], 2, lambda w, t: ["--port 70000"]),
    Fault("serve/embeddings-missing", lambda w, t: ["serve", "--embeddings", t / "none", "--checkpoint", w.ckpt],
          2, lambda w, t: [str(t / "none")]),
    Fault("serve/checkpoint-missing", lambda w, t: ["serve", "--embeddings", w.export, "--checkpoint", t / "none"],
          2, lambda w, t: [str(t / "none")]),
    Fault("serve/checkpoint-weights-flipped",
          lambda w, t: ["serve", "--embeddings", w.export, "--checkpoint", _flipped(w, t)],
          2, lambda w, t: [str(t / "keep/ckpt/model.safetensors"), "sha256 differs"]),
    # ----------------------------------------------------------------------------- report
    Fault("report/metrics-missing", lambda w, t: ["report", "--metrics", t / "none.json", "--history",
                                                  write(t / "h.json", "[]"), "--metrics-dir", t / "m",
                                                  "--plots-dir", t / "p"], 2,
          lambda w, t: [str(t / "none.json")]),
    Fault("report/history-not-a-list", lambda w, t: ["report", "--metrics", w.metrics, "--history",
                                                     write(t / "h.json", '{"epoch": 1}'), "--metrics-dir", t / "m",
                                                     "--plots-dir", t / "p"], 2,
          lambda w, t: [str(t / "h.json")]),
    # ----------------------------------------------------------------------------- any command
    Fault("cli/unknown-command", lambda w, t: ["serve-all"], 2, lambda w, t: ["serve-all", "invalid choice"]),
]


def _symlinked(w: World, t: Path) -> Path:
    """A dataset under t whose images/ entry for the first image is a symlink to the world's copy."""
    (t / "images").mkdir()
    os.symlink(w.data_dir / "images" / _first_image(w), t / "images" / _first_image(w))
    return write_dataset(t / "d.json", copy.deepcopy(w.entries[:1]))


def _nested_state(w: World, t: Path) -> Path:
    run = ckpt_copy(w, t)
    (run / "resume" / "state.json").write_text(NESTED)
    return run


def _tampered(w: World, t: Path, name: str, content: bytes, forge: bool) -> Path:
    ckpt = ckpt_copy(w, t)
    (ckpt / name).write_bytes(content)
    if forge:
        forge_meta(ckpt)
    return ckpt


def _without(w: World, t: Path, name: str) -> Path:
    ckpt = ckpt_copy(w, t)
    (ckpt / name).unlink()
    return ckpt


def _flipped(w: World, t: Path) -> Path:
    """A checkpoint copy with one byte of its weights changed (meta.json left as it was)."""
    ckpt = ckpt_copy(w, t)
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    return ckpt


def _export_without_parquet(w: World, t: Path) -> Path:
    e = export_copy(w, t)
    (e / "shard-00000-of-00001.parquet").unlink()
    return e


def _export_flipped(w: World, t: Path) -> Path:
    e = export_copy(w, t)
    f = e / "shard-00000-of-00001.parquet"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return e


def _export_part(w: World, t: Path, content: str) -> Path:
    e = export_copy(w, t)
    (e / "shard-00000-of-00001.json").write_text(content)
    return e


def _object_npz(path: Path) -> Path:
    np.savez(path, image=np.array([{"a": 1}], dtype=object), text=np.zeros((1, 4)), text_to_image=np.zeros(1))
    return path


def test_the_catalogue_covers_every_command():
    commands = {f.id.split("/")[0] for f in FAULTS}
    assert {"validate", "pretrain", "finetune", "evaluate", "export", "index", "search", "bench",
            "promote", "serve", "report"} <= commands
    assert len(FAULTS) >= 40 and len({f.id for f in FAULTS}) == len(FAULTS)


@pytest.mark.parametrize("fault", FAULTS, ids=[f.id for f in FAULTS])
def test_fault(fault: Fault, world: World, tmp_path, monkeypatch):
    case = tmp_path / "case"
    case.mkdir()
    monkeypatch.chdir(case)  # anything written to a default path lands here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world.store)
    argv = fault.argv(world, case)
    watched = [*world.outputs, case / "keep"]
    before = tree_hashes(watched)

    code, out, err = run_cli(argv)

    assert "Traceback" not in out + err, err[-3000:]
    assert code == fault.code, f"exit {code}, expected {fault.code}\n{out[-1500:]}\n{err[-1500:]}"
    if fault.stream == "stderr":
        lines = [line for line in err.splitlines() if "error:" in line]
        assert len(lines) == 1, err[-3000:]
        message = lines[0]
    else:
        message = out
    for name in fault.culprit(world, case):
        assert name in message, f"{name!r} not named in: {message[-2000:]}"
    assert tree_hashes(watched) == before, "a failing command changed an earlier output"


# ---------------------------------------------------------------------------------------------
# Behaviours beyond one refused command


def _replace_image(path: Path, source: Path) -> None:
    """Replace an image file in place (same name, other pixels; a new inode, like a re-download)."""
    tmp = path.with_name(path.name + ".new")
    shutil.copyfile(source, tmp)
    os.replace(tmp, path)


def test_an_image_replaced_in_place_is_not_served_from_caches_or_the_old_export(world, tmp_path, monkeypatch):
    """Same dataset JSON, one val image replaced by another picture under the same name: the trunk
    feature cache, the bench embeddings cache and the export all see the change."""
    import torch

    from hivlp.bench.retrieval import encode_embeddings
    from hivlp.data.karpathy import load_split
    from hivlp.embeddings.format import load_embeddings
    from hivlp.model import load_checkpoint
    from hivlp.train.cache import image_trunk_features

    data = tmp_path / "data"
    shutil.copytree(world.data_dir, data)
    ds = data / "dataset.json"
    val = load_split(ds, "val")
    model, _ = load_checkpoint(world.ckpt)
    cpu = torch.device("cpu")
    cache = tmp_path / "cache"
    before = image_trunk_features(model, val.image_paths, cache, cpu, num_workers=0)
    export = tmp_path / "export"
    must(["export", "--checkpoint", world.ckpt, "--dataset", ds, "--out", export, "--no-progress"])
    rows_before = load_embeddings(export).to_pydict()
    bench_before = encode_embeddings(world.ckpt, ds, device="cpu", fit_train=False, cache_dir=tmp_path / "bench",
                                     progress=False)

    time.sleep(0.01)  # a distinct mtime even on coarse clocks
    _replace_image(Path(val.image_paths[0]), Path(val.image_paths[1]))

    after = image_trunk_features(model, val.image_paths, cache, cpu, num_workers=0)
    assert len(list(cache.glob("img-*.safetensors"))) == 2, "the changed images need a new cache entry"
    assert torch.allclose(after[0], before[1], atol=1e-4) and not torch.allclose(after[0], before[0], atol=1e-4)
    assert torch.equal(after[2:], before[2:])
    must(["export", "--checkpoint", world.ckpt, "--dataset", ds, "--out", export, "--no-progress"])
    rows_after = load_embeddings(export).to_pydict()
    assert rows_after["embedding"][0] != rows_before["embedding"][0]
    assert rows_after["embedding"][0] == pytest.approx(rows_before["embedding"][1], abs=1e-4)
    bench_after = encode_embeddings(world.ckpt, ds, device="cpu", fit_train=False, cache_dir=tmp_path / "bench",
                                    progress=False)
    assert len(list((tmp_path / "bench").glob("embeddings-*.npz"))) == 2
    np.testing.assert_allclose(bench_after.image[0], bench_before.image[1], atol=1e-4)


def test_a_finished_run_is_not_run_again_and_logs_nothing(world, tmp_path):
    """Re-running the finished world run with the same config is a no-op: same checkpoint, no MLflow run.
    (With tracking on, a new run would appear in the store.)"""
    import mlflow

    out = tmp_path / "run"
    shutil.copytree(world.ckpt, out)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = tree_hashes([out])
    text = must(["pretrain", "--config", world.recipe, "--out", out, "--set", "tracking.enabled=true",
                 "--set", f"tracking.tracking_uri={store}", "--set", "tracking.system_metrics=false",
                 "--set", f"tracking.artifact_location={(tmp_path / 'art').as_uri()}"])
    assert "best val AR" in text
    assert tree_hashes([out]) == before
    client = mlflow.MlflowClient(store)
    assert [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])] == []


def test_no_resume_starts_afresh_over_a_different_run(world, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(world.ckpt, out)
    code, _, err = run_cli(["pretrain", "--config", world.recipe, "--out", out, "--set", "train.seed=1"])
    assert code == 2 and "train.seed: 0 -> 1" in err
    must(["pretrain", "--config", world.recipe, "--out", out, "--set", "train.seed=1", "--no-resume"])
    state = json.loads((out / "resume" / "state.json").read_text())
    assert state["identity"]["train.seed"] == 1
    meta = json.loads((out / "meta.json").read_text())
    assert meta["run_identity"]["train.seed"] == 1
    assert meta["weights_sha256"] != json.loads((world.ckpt / "meta.json").read_text())["weights_sha256"]


def test_checkpoint_and_resume_files_follow_the_umask(world, tmp_path):
    """model.safetensors (checkpoint and resume state) used to be written 0600 and their folders 0700."""
    old = os.umask(0o022)
    try:
        must(["pretrain", "--config", world.recipe, "--out", tmp_path / "run", "--set", "train.max_steps=1"])
    finally:
        os.umask(old)
    run = tmp_path / "run"
    for p in [run / "model.safetensors", run / "meta.json", run / "resume" / "model.safetensors",
              run / "resume" / "optimizer.safetensors", run / "resume" / "state.json"]:
        assert p.stat().st_mode & 0o777 == 0o644, (p, oct(p.stat().st_mode))
    for d in [run, run / "resume", run / "text_tower"]:
        assert d.stat().st_mode & 0o777 == 0o755, (d, oct(d.stat().st_mode))


_KILL_MID_SAVE = """
import os, sys, torch
from hivlp.train import state
real = state.save_file
def save_then_die(tensors, path, *a, **k):
    real(tensors, path, *a, **k)
    if path.endswith("optimizer.safetensors"):
        os.kill(os.getpid(), 9)  # kill -9 in the middle of writing the resume state
state.save_file = save_then_die
model = torch.nn.Linear(4, 4)
opt = torch.optim.AdamW(model.parameters())
state.save_state(sys.argv[1], model, opt, state.Position(step=5))
"""


def test_kill_9_while_saving_resume_state_leaves_a_temp_that_the_next_start_removes(world, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(world.ckpt, out)
    proc = subprocess.run([sys.executable, "-c", _KILL_MID_SAVE, str(out / "resume")], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    leftovers = list(out.glob(".resume.*.tmp"))
    assert len(leftovers) == 1 and (leftovers[0] / "model.safetensors").is_file()
    before = tree_hashes([out / "resume"])
    must(["pretrain", "--config", world.recipe, "--out", out])  # finished: nothing to do, but cleaned
    assert list(out.glob(".*.tmp")) == []
    assert tree_hashes([out / "resume"]) == before  # the saved state was never touched


_EXPORT = """
import sys, time
from hivlp.embeddings import format as F
real = F.write_shard
def slow_write(*a, **k):
    time.sleep(float(sys.argv[2]))  # hold the shard a while: the other writer arrives meanwhile
    return real(*a, **k)
F.write_shard = slow_write
import hivlp.embeddings.export as X
X.write_shard = slow_write
from hivlp.cli import main
sys.exit(main(["export", "--checkpoint", sys.argv[1], "--dataset", sys.argv[3], "--out", sys.argv[4],
               "--no-progress", "--device", "cpu"]))
"""


def test_two_processes_exporting_one_shard_leave_one_readable_file(world, tmp_path):
    """Two real processes export the same shard at once: both succeed, the second waits for the first and
    finds the shard done, and the published file matches its manifest part."""
    import pyarrow.parquet as pq

    from hivlp.embeddings.format import read_manifest
    from hivlp.io import sha256_file

    out = tmp_path / "export"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", _EXPORT, str(world.ckpt), "3", str(world.dataset), str(out)]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    second = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = [p.communicate(timeout=300) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], results
    logs = "".join(err for _, err in results)
    assert "waiting for it" in logs and "nothing to do" in logs, logs[-3000:]
    m = read_manifest(out)
    shard = out / m["shards"][0]["file"]
    assert m["complete"] and sha256_file(shard) == m["shards"][0]["sha256"]
    assert pq.read_table(shard).num_rows == m["rows"] == 48
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "manifest.json", "shard-00000-of-00001.json", "shard-00000-of-00001.parquet"]
    assert list(out.glob(".*.tmp")) == []


def test_debug_shows_the_traceback_of_an_internal_error(world, monkeypatch):
    """An exception no check foresaw is one 'internal error' line (exit 1); --debug adds the traceback."""
    import hivlp.retrieval.evaluate as E

    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(E, "evaluate_checkpoint", broken)
    argv = ["evaluate", "--checkpoint", world.ckpt, "--dataset", world.dataset, "--out", "/dev/null"]
    code, _, err = run_cli(argv)
    assert code == 1 and "Traceback" not in err
    assert "internal error: KeyError" in err and "hivlp --debug" in err
    code, _, err = run_cli(["--debug", *argv])
    assert code == 1 and "Traceback (most recent call last)" in err and "raise KeyError" in err
