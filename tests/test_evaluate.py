"""evaluate_embeddings structure and consistency, `hivlp evaluate` on a real checkpoint and real images,
and a small `hivlp bench retrieval` run writing valid JSON with every method."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hivlp.bench.retrieval import (
    ANN_METHODS,
    FLAT_METHODS,
    METHODS,
    BenchConfig,
    run_retrieval_bench,
    synthetic_embeddings,
    write_results,
)
from hivlp.cli import main
from hivlp.errors import UsageError
from hivlp.retrieval.evaluate import evaluate_embeddings, format_table
from hivlp.retrieval.metrics import RECALL_KEYS, recall_metrics

from .conftest import write_slice


@pytest.fixture(scope="module")
def emb():
    return synthetic_embeddings(n_images=200, captions_per_image=5, dim=128, n_extra_images=300, seed=3)


def test_evaluate_embeddings_keys_and_consistency(emb):
    m = evaluate_embeddings(emb.image, emb.text, emb.text_to_image, [16, 32, 64, 128], coarse_dim=32, shortlist=20)
    assert {"full", "dim_16", "dim_32", "dim_64", "dim_128", "coarse_to_fine", "counts", "timings"} <= set(m)
    for key in ("full", "dim_16", "dim_32", "dim_64", "dim_128"):
        assert set(m[key]) == set(RECALL_KEYS)
        assert all(0 <= v <= 100 for v in m[key].values())
    assert set(RECALL_KEYS) | {"shortlist", "coarse_dim", "codes"} == set(m["coarse_to_fine"])
    c2f = m["coarse_to_fine"]
    assert (c2f["shortlist"], c2f["coarse_dim"], c2f["codes"]) == (20, 32, "fp32")
    assert m["counts"] == {"images": 200, "texts": 1000, "dim": 128, "levels": [16, 32, 64, 128]}
    assert all(v >= 0 for v in m["timings"].values())

    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    assert m["full"] == pytest.approx(recall_metrics(unit(emb.image) @ unit(emb.text).T, emb.text_to_image))
    assert m["dim_128"] == m["full"]
    d16 = recall_metrics(unit(emb.image[:, :16]) @ unit(emb.text[:, :16]).T, emb.text_to_image)
    assert m["dim_16"] == pytest.approx(d16)
    assert m["dim_16"]["r_mean"] < m["full"]["r_mean"]  # the structured set behaves like nested levels


@pytest.mark.parametrize("codes", ["fp32", "int8", "binary"])
def test_coarse_to_fine_with_everything_shortlisted_equals_full(emb, codes):
    """R@K only looks at the top 10, so a shortlist covering every item must reproduce `full`."""
    args = (emb.image, emb.text, emb.text_to_image, [32, 128])
    m = evaluate_embeddings(*args, shortlist=1000, codes=codes, coarse_dim=32)
    c2f = {k: m["coarse_to_fine"][k] for k in RECALL_KEYS}
    assert c2f == pytest.approx(m["full"])
    small = evaluate_embeddings(*args, shortlist=10, codes=codes, coarse_dim=32)
    assert small["coarse_to_fine"]["r_mean"] < m["full"]["r_mean"]  # a short list does miss positives


def test_format_table_lists_levels_full_and_c2f(emb):
    m = evaluate_embeddings(emb.image, emb.text, emb.text_to_image, [32, 64, 128], shortlist=20)
    lines = format_table(m).splitlines()
    assert lines[0].split() == ["level", *RECALL_KEYS]
    assert [line.split()[0] for line in lines[1:]] == ["dim_32", "dim_64", "full", "c2f"]
    assert f"{m['full']['r_mean']:.2f}" in lines[3]


def test_evaluate_embeddings_rejects_levels_beyond_the_dim(emb):
    with pytest.raises(UsageError, match=r"levels \[256\]"):
        evaluate_embeddings(emb.image, emb.text, emb.text_to_image, [64, 256])


def test_bench_writes_json_and_plots_with_every_method(emb, tmp_path):
    cfg = BenchConfig(sizes=[2000, 200], threads=1, repeats=3, batch=64, queries=150, shortlist=50,
                      coarse_dim=32, binary_dim=32, binary_bits=128, binary_shortlist=200, binary_keep=50,
                      milvus=False)
    result = run_retrieval_bench(emb, cfg, progress=False, partial_out=tmp_path / "partial.json")
    partial = json.loads((tmp_path / "partial.json").read_text())  # written after N = 200, not after the last
    assert partial["partial"] and partial["sizes_done"] == [200] and {r["n"] for r in partial["rows"]} == {200}
    assert "partial" not in result and set(result["speedups"]) == {"200", "2000"}
    assert result["speedups"]["2000"]["ivf_c2f/ivf_full:single"] > 0
    written = write_results(result, tmp_path / "retrieval.json")
    names = ["retrieval.json", "retrieval_latency.png", "retrieval_tradeoff.png", "retrieval_levels.png"]
    assert [p.name for p in written] == names
    assert all(p.stat().st_size > 1000 for p in written)
    data = json.loads((tmp_path / "retrieval.json").read_text())
    assert {(r["method"], r["n"]) for r in data["rows"]} == {(m, n) for m in METHODS for n in (200, 2000)}
    for r in data["rows"]:
        assert {"method", "n", "ms_single_p50", "ms_batch_p50", "bytes_per_item", "r1", "r10"} <= set(r)
        assert r["ms_single_p50"] > 0 and r["ms_batch_p50"] > 0 and 0 <= r["r1"] <= r["r10"] <= 100
        # exact search is the reference of agree10, not a measurement of it
        assert ("agree10" in r) == (r["method"] != "exact")
        assert 0 <= r.get("agree10", 0) <= 1
    rows = {(r["method"], r["n"]): r for r in data["rows"]}
    # At N = number of real images the shortlists hold everything: every method is exact.
    assert all(rows[(m, 200)]["agree10"] == 1.0 for m in FLAT_METHODS if m != "exact")
    for m in ANN_METHODS:  # tuned on held-out captions to 0.99, measured on the others
        for n in (200, 2000):
            r = rows[(m, n)]
            assert r["tune_reached"] and r["tune_agree10"] >= 0.99 and r["agree10"] >= 0.95, r
            assert r["param"] == ("nprobe" if m.startswith("ivf") else "efSearch") and r["param_value"] >= 1
            assert r["tune_trace"][-1]["value"] == r["param_value"] and r["build_s"] > 0
    assert rows[("exact", 2000)]["r10"] < rows[("exact", 200)]["r10"]  # distractors make it harder
    assert [rows[(m, 2000)]["bytes_per_item"] for m in FLAT_METHODS] == [512, 512, 128, 36, 16]
    assert data["config"]["n_queries"] == 150 and data["config"]["sizes"] == [200, 2000]
    assert {"cpu", "threads", "peak_rss_mb"} <= set(data["machine"]) and "Gaussian" in data["distractors"]
    assert {"real_images", "gaussian"} <= set(data["distractor_check"])
    assert data["levels"]["counts"]["images"] == 200


def test_bench_tunes_the_binary_shortlist_on_held_out_captions(emb, tmp_path):
    cfg = BenchConfig(sizes=[2000], threads=1, repeats=2, batch=64, queries=150, binary_dim=32, binary_bits=64,
                      binary_keep=0, methods=("exact", "c2f_binary"), milvus=False)
    assert cfg.binary_shortlist == 0  # the default: tuned, as nprobe / efSearch are
    result = run_retrieval_bench(emb, cfg, progress=False)
    r = next(r for r in result["rows"] if r["method"] == "c2f_binary")
    assert r["param"] == "shortlist" and r["tune_reached"] and r["tune_agree10"] >= 0.99
    assert r["shortlist"] == r["param_value"] == r["tune_trace"][-1]["value"] > 10
    assert all(t["agree10"] < 0.99 for t in r["tune_trace"][:-1])
    assert r["agree10"] >= 0.95 and result["config"]["tune_queries_held_out"]  # measured on other captions


def test_bench_cli_reads_an_embeddings_file(emb, tmp_path, capsys):
    npz = tmp_path / "emb.npz"
    emb.save(npz)
    out = tmp_path / "res" / "bench.json"
    rc = main(["bench", "retrieval", "--embeddings", str(npz), "--sizes", "200,1000", "--threads", "1",
               "--repeats", "2", "--queries", "100", "--shortlist", "40", "--coarse-dim", "32",
               "--binary-dim", "32", "--binary-shortlist", "100", "--binary-keep", "40", "--no-milvus",
               "--methods", "exact,c2f_int8", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert sorted({r["method"] for r in data["rows"]}) == ["c2f_int8", "exact"]
    assert "c2f_int8" in capsys.readouterr().out
    assert main(["bench", "retrieval", "--embeddings", str(tmp_path / "missing.npz"), "--out", str(out)]) == 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained checkpoint of the default model (pretrained towers, fresh heads)."""
    from hivlp.config import RunConfig
    from hivlp.model import create_model, save_checkpoint

    cfg = RunConfig()
    return save_checkpoint(create_model(cfg.model), cfg, tmp_path_factory.mktemp("ckpt") / "model")


@pytest.fixture(scope="module")
def small_dataset(flickr8k_raw, tmp_path_factory):
    return write_slice(flickr8k_raw, tmp_path_factory.mktemp("data"), n_train=4, n_val=12)


def test_evaluate_cli_on_a_real_checkpoint_and_real_images(checkpoint, small_dataset, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    rc = main(["evaluate", "--checkpoint", str(checkpoint), "--dataset", str(small_dataset), "--split", "val",
               "--out", str(out), "--shortlist", "20", "--device", "cpu", "--batch-size", "16"])
    assert rc == 0
    m = json.loads(out.read_text())
    assert m["counts"]["images"] == 12 and m["counts"]["texts"] == 60
    assert {"dim_32", "dim_64", "dim_128", "dim_256", "dim_512", "full"} <= set(m) and m["timings"]["encode_s"] > 0
    assert m["source"]["split"] == "val"
    printed = capsys.readouterr().out
    assert "full (512)" in printed and "c2f 64->512 K=20" in printed
    # A missing checkpoint is a usage error (exit 2), not a traceback.
    missing = ["evaluate", "--checkpoint", str(tmp_path / "nope"), "--dataset", str(small_dataset), "--out", str(out)]
    assert main(missing) == 2


def test_bench_encodes_with_a_checkpoint_once_then_uses_the_cache(checkpoint, small_dataset, tmp_path):
    args = ["bench", "retrieval", "--checkpoint", str(checkpoint), "--dataset", str(small_dataset),
            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--sizes", "12,300", "--threads", "1",
            "--repeats", "2", "--queries", "0", "--shortlist", "20", "--binary-shortlist", "40",
            "--binary-keep", "20", "--no-milvus", "--out", str(tmp_path / "a.json")]
    assert main(args) == 0
    cached = list((tmp_path / "cache").glob("embeddings-*.npz"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    assert main(args[:-1] + [str(tmp_path / "b.json")]) == 0
    assert cached[0].stat().st_mtime_ns == stamp  # read, not re-encoded
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["config"]["n_queries"] == 60 and data["config"]["distractor_fit_images"] == 16
    assert "checkpoint" in data["config"]["source"]
    assert {r["n"] for r in data["rows"]} == {12, 300}
