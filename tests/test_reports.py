"""The report pages the Kubeflow run page shows: validation as HTML, evaluation as Markdown, sample
queries with embedded thumbnails (real Flickr8k images), and the pieces they are built from."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from hivlp.data.validate import format_html, require_valid, validate_dataset
from hivlp.embeddings.format import (
    ShardRows,
    embeddings_table,
    gather_shards,
    read_manifest,
    write_shard,
)
from hivlp.errors import DatasetError, UsageError
from hivlp.pages import markdown_record, markdown_table, md_cell, thumbnail_data_uri
from hivlp.retrieval.evaluate import evaluate_embeddings, format_markdown, format_table
from hivlp.retrieval.gallery import sample_queries, sample_queries_page

from .conftest import FLICKR8K, write_slice


def test_markdown_tables_keep_their_shape():
    table = markdown_table(["name", "value"], [("a|b", 1.5), ("line\nbreak", 2)])
    lines = table.splitlines()
    assert lines[1] == "|---|---:|"  # numbers right-aligned
    assert lines[2] == "| a\\|b | 1.50 |" and lines[3] == "| line break | 2 |"
    assert md_cell("x|y") == "x\\|y"
    record = markdown_record("Gate", "promoted", {"version": "3", "value": 41.25, "previous": None})
    assert record.startswith("# Gate\n\n**promoted**\n") and "| value | 41.2500 |" in record


def test_thumbnails_are_small_jpegs_and_bad_files_are_named(tmp_path):
    name = sorted((FLICKR8K / "images").iterdir())[0]
    uri = thumbnail_data_uri(name, size=64)
    assert uri.startswith("data:image/jpeg;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert img.format == "JPEG" and max(img.size) == 64
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="bad.jpg: cannot decode image"):
        thumbnail_data_uri(tmp_path / "bad.jpg")


def test_validation_page_shows_every_expectation_and_problem_escaped(tmp_path, flickr8k_raw):
    data = write_slice(flickr8k_raw, tmp_path, n_train=6, n_val=0)
    raw = json.loads(data.read_text())
    raw["images"][1]["filename"] = "<script>alert(1)</script>.jpg"  # a missing file with a hostile name
    raw["images"][2]["sentences"][0]["raw"] = "Dog"  # too short
    data.write_text(json.dumps(raw))
    report = validate_dataset(data, progress=False)
    page = format_html(report)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;.jpg" in page
    assert "FAILED: 2 error(s)" in page
    # One row per great-expectations result, with its outcome.
    results = report.expectations["results"]
    assert page.count("<td><span class=") == len(results)
    assert page.count(">fail</span>") == sum(not r["success"] for r in results) == 2
    for kind in ("missing_image", "caption_too_short"):
        assert f"{kind}: 1</h3>" in page
    assert "Fix: rewrite the caption as a describing sentence" in page
    with pytest.raises(DatasetError, match=r"2 validation error\(s\) \(missing_image x1, caption_too_short x1\)"):
        require_valid(report.to_dict(), "dataset validation")
    require_valid({"ok": True}, "x")  # a clean report passes


def test_evaluation_markdown_is_the_table_and_the_floor_decision():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(20, 64)).astype(np.float32)
    txt = np.repeat(img, 5, axis=0) + 0.8 * rng.normal(size=(100, 64)).astype(np.float32)
    metrics = evaluate_embeddings(img, txt, np.repeat(np.arange(20), 5), levels=(16, 32, 64), coarse_dim=16,
                                  shortlist=10)
    metrics["source"] = {"split": "test", "weights_sha256": "ab" * 32, "dataset": "/data/x/d.json"}
    md = format_markdown(metrics, min_r_mean=10.0)
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0] == "| level | txt_r1 | txt_r5 | txt_r10 | img_r1 | img_r5 | img_r10 | r_mean |"
    labels = [r.split("|")[1].strip() for r in rows[1:]]
    assert labels == ["dim_16", "dim_32", "full (64)", "c2f 16->64 K=10 fp32"]  # the rows of format_table
    assert [r.split()[0] for r in format_table(metrics).splitlines()[1:]] == ["dim_16", "dim_32", "full", "c2f"]
    full = rows[3].split("|")[2:-1]
    assert [float(v) for v in full] == pytest.approx([metrics["full"][k] for k in
                                                      ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10",
                                                       "r_mean")], abs=0.005)
    ar = metrics["full"]["r_mean"]
    assert f"AR {ar:.2f} >= floor 10.00: passes the floor" in md
    assert f"AR {ar:.2f} < floor 101.00: not promoted" in format_markdown(metrics, min_r_mean=101.0)
    assert md.startswith("# Evaluation: split `test`") and "`abababababababab`" in md


@pytest.fixture
def export(tmp_path, flickr8k_raw):
    """A 2-shard export of 8 real val images in which each caption's vector is its image's plus a little
    noise (so each caption's right answer is known), written with the export format's own writer."""
    data = write_slice(flickr8k_raw, tmp_path / "data", n_train=0, n_val=8)
    images = json.loads(data.read_text())["images"]
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(8, 32)).astype(np.float32)
    dirs = []
    for shard, part in enumerate((images[:4], images[4:])):
        rows = ShardRows(
            imgids=[e["imgid"] for e in part], filenames=[e["filename"] for e in part], image_paths=[""] * 4,
            sentids=[s["sentid"] for e in part for s in e["sentences"]],
            captions=[s["raw"] for e in part for s in e["sentences"]],
            caption_imgids=[e["imgid"] for e in part for _ in e["sentences"]],
            caption_filenames=[e["filename"] for e in part for _ in e["sentences"]],
        )
        img = vecs[shard * 4:(shard + 1) * 4]
        txt = np.repeat(img, 5, axis=0) + 0.05 * rng.normal(size=(20, 32)).astype(np.float32)
        d = tmp_path / f"task-{shard}"
        write_shard(d, (shard, 2), embeddings_table(rows, img, txt),
                    {"checkpoint": "c", "weights_sha256": "f" * 64, "dataset": str(data), "dataset_sha256": "0",
                     "split": "val"}, levels=[8, 16, 32])
        dirs.append(d)
    return data, dirs


def test_gather_shards_makes_one_export(export, tmp_path):
    _, dirs = export
    out = gather_shards(dirs, tmp_path / "gathered")
    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["counts"] == {"image": 8, "text": 40}
    with pytest.raises(UsageError, match="is in both"):
        gather_shards([dirs[0], dirs[0]], tmp_path / "twice")
    with pytest.raises(UsageError, match="no shard files"):
        gather_shards([tmp_path / "data"], tmp_path / "none")


def test_sample_queries_find_the_described_image(export, tmp_path):
    data, dirs = export
    folder = gather_shards(dirs, tmp_path / "gathered")
    queries = sample_queries(folder, n_queries=4, k=3)
    assert len(queries) == 4 and len({q.true_imgid for q in queries}) == 4
    assert all(q.true_rank == 1 and len(q.hits) == 3 for q in queries)
    assert all(q.hits[0][2] > q.hits[1][2] for q in queries)
    assert [q.true_rank for q in sample_queries(folder, n_queries=4, k=3, level=8)] == [1, 1, 1, 1]
    with pytest.raises(UsageError, match="level 64 does not fit 32-d"):
        sample_queries(folder, level=64)

    page = sample_queries_page(folder, data, n_queries=4, k=3)
    assert "Found in the top 3: <b>4 of 4</b>" in page
    assert page.count("<figure") == 12 and page.count('<figure class="hit">') == 4
    thumbs = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert len(thumbs) == 12
    assert Image.open(io.BytesIO(base64.b64decode(thumbs[0]))).size[0] <= 160
    for q in queries:
        assert q.caption.replace('"', "&quot;").replace("'", "&#x27;") in page


def test_sample_queries_page_needs_the_dataset_of_the_export(export, tmp_path, flickr8k_raw):
    _, dirs = export
    folder = gather_shards(dirs, tmp_path / "gathered")
    other = write_slice(flickr8k_raw, tmp_path / "other", n_train=4, n_val=0)
    with pytest.raises(UsageError, match="is it the dataset the export was made from"):
        sample_queries_page(folder, other)
    shutil.rmtree(tmp_path / "other")
