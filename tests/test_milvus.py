"""Milvus dual-collection index over real embeddings of 32 Flickr8k val images, on both backends:
real Milvus Lite and a real Milvus 2.3 standalone server (the session fixture `milvus_server`).

Tests taking `db` run once per backend ("lite": one .db per module, as Milvus Lite opens a file in one
process at a time; "server": the session's server). The locked-file test uses its own .db held by a
child process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from hivlp.cli import main
from hivlp.config import RunConfig
from hivlp.embeddings.export import export_embeddings
from hivlp.embeddings.format import (
    TEXT_ID_OFFSET,
    batch_embeddings,
    load_embeddings,
    read_manifest,
)
from hivlp.retrieval.evaluate import evaluate_milvus
from hivlp.retrieval.inmemory import CoarseToFineEngine, ExactEngine, l2_normalize
from hivlp.retrieval.milvus import (
    DimensionMismatchError,
    IndexNotReadyError,
    MilvusDualIndex,
    MilvusLockedError,
    MilvusUnavailableError,
    _lite_lock_holder,
)
from tests.conftest import write_slice
from tests.test_export import real_model

SHORTLIST = 16  # half the 32 images: the coarse pass really prunes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from hivlp.model import save_checkpoint

    return save_checkpoint(real_model(), RunConfig(), tmp_path_factory.mktemp("ckpt") / "ckpt")


def _export_val(tmp_path_factory, raw, checkpoint, n_val: int) -> Path:
    """Export of the first `n_val` val images (5 captions each) with the real model."""
    data = write_slice(raw, tmp_path_factory.mktemp(f"val{n_val}"), n_train=0, n_val=n_val)
    out = tmp_path_factory.mktemp(f"emb{n_val}") / "val"
    export_embeddings(checkpoint, data, "val", out, device="cpu", progress=False)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, flickr8k_raw, checkpoint):
    """Export of 32 val images + 160 captions with the real model (pretrained towers, untrained head)."""
    return _export_val(tmp_path_factory, flickr8k_raw, checkpoint, 32)


@pytest.fixture(scope="module")
def arrays(exported):
    """(image ids, image vectors, text ids, text vectors, text_to_image row index) from the export."""
    t = load_embeddings(exported)
    kinds = np.array(t.column("kind").to_pylist())
    ids = np.array(t.column("id").to_pylist(), dtype=np.int64)
    imgid = np.array(t.column("imgid").to_pylist(), dtype=np.int64)
    emb = batch_embeddings(t)
    img, txt = kinds == "image", kinds == "text"
    row_of = {g: r for r, g in enumerate(ids[img])}
    return ids[img], emb[img], ids[txt], emb[txt], np.array([row_of[g] for g in imgid[txt]])


@pytest.fixture(scope="module", params=["lite", "server"])
def db(request, tmp_path_factory):
    """The URI of each backend: a Lite .db path (its parent is created on open) or the server's URI."""
    if request.param == "server":
        return request.getfixturevalue("milvus_server")
    return str(tmp_path_factory.mktemp("milvus") / "nested" / "hivlp.db")


@pytest.fixture(scope="module")
def index(db, exported):
    idx = MilvusDualIndex(db, "val")
    summary = idx.build(exported, coarse_dim=64, index="HNSW", batch_size=50, progress=False)
    assert summary["status"] == "built"
    yield idx
    idx.close()


def overlap10(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x[:10]) & set(y[:10])) / 10 for x, y in zip(a, b)]))


def test_build_counts_match_manifest_and_reindex_changes_nothing(index, exported):
    m = read_manifest(exported)
    want = {"image": 32, "text": 160}
    assert m["counts"] == want
    assert index.counts() == {"coarse": want, "fine": want}
    info = index.read_info()
    assert info.complete and (info.dim, info.coarse_dim) == (512, 64)
    assert info.weights_sha256 == m["weights_sha256"]
    again = MilvusDualIndex(index.uri, "val").build(exported, coarse_dim=64, index="HNSW", progress=False)
    assert again["status"] == "unchanged" and again["upserted"] == 0
    assert index.counts() == {"coarse": want, "fine": want}


def test_text_to_image_agrees_with_in_memory_engine(index, arrays):
    img_ids, img, _, txt, _ = arrays
    got = index.search(txt, k=10, shortlist=SHORTLIST, kind="image")
    ref = CoarseToFineEngine(img, img_ids, coarse_dim=64, shortlist=SHORTLIST).search(txt, 10)
    assert got.ids.shape == (160, 10)
    assert overlap10(got.ids, ref.ids) >= 0.99
    same = got.ids == ref.ids
    np.testing.assert_allclose(got.scores[same], ref.scores[same], atol=1e-5)
    # with a shortlist of every image the answer is the exact full-dim search
    exact = ExactEngine(img, img_ids).search(txt, 10)
    assert overlap10(index.search(txt, k=10, shortlist=32).ids, exact.ids) >= 0.99


def test_lean_search_call_equals_milvus_client_search(index, arrays):
    """`ann_search` (pymilvus's request, the client's gRPC stub, hits read as arrays) returns what
    `MilvusClient.search` returns, ids and scores, on both backends; a failed call is a MilvusException."""
    from pymilvus.exceptions import MilvusException

    from hivlp.retrieval.milvus import _client_search, ann_search

    info, coarse, _ = index._serving()
    q = list(l2_normalize(arrays[3][:7, :64]))
    params = {"metric_type": "IP", "params": {"ef": 64}}
    kw = {"partition_names": ["image"]}
    if index._lite:
        kw["output_fields"] = ["id"]
    lean = ann_search(index._client, coarse, q, 20, params, **kw)
    public = _client_search(index._client, coarse, q, 20, params, "Bounded", kw["partition_names"],
                            kw.get("output_fields"))
    np.testing.assert_array_equal(lean[0], public[0])
    np.testing.assert_allclose(lean[1], public[1], rtol=0, atol=1e-6)
    assert (lean[0][:, :16] >= 0).all() and lean[0].shape == (7, 20)
    many = ann_search(index._client, coarse, q, 40, params, **kw)  # more than the 32 images: padded
    assert (many[0][:, 32:] == -1).all() and np.isinf(many[1][:, 32:]).all()
    with pytest.raises(MilvusException):
        ann_search(index._client, "no_such_collection", q, 5, params)


def test_image_to_text_searches_captions_only(index, arrays):
    img_ids, img, txt_ids, txt, _ = arrays
    got = index.search(img, k=10, shortlist=50, kind="text")
    assert (got.ids >= TEXT_ID_OFFSET).all()
    ref = CoarseToFineEngine(txt, txt_ids, coarse_dim=64, shortlist=50).search(img, 10)
    assert overlap10(got.ids, ref.ids) >= 0.99
    one = index.search(txt[0], k=3, kind="image")  # a single [D] query gives [1, k]
    assert one.ids.shape == (1, 3) and (one.ids < TEXT_ID_OFFSET).all()
    assert index.describe(one.ids[0])[int(one.ids[0, 0])]["kind"] == "image"


def test_ivf_index_of_images_only_agrees_too(db, exported, arrays):
    img_ids, img, _, txt, _ = arrays
    idx = MilvusDualIndex(db, "val_ivf")
    idx.build(exported, index="IVF_FLAT", kinds=["image"], progress=False)
    assert idx.read_info().kinds == ("image",)
    ref = CoarseToFineEngine(img, img_ids, coarse_dim=64, shortlist=SHORTLIST).search(txt, 10)
    assert overlap10(idx.search(txt, k=10, shortlist=SHORTLIST).ids, ref.ids) >= 0.99
    with pytest.raises(Exception, match="not 'text'"):
        idx.search(img, kind="text")
    idx.drop()


def test_interrupted_build_is_refused_then_completed(db, exported, arrays):
    idx = MilvusDualIndex(db, "part")
    stopped = idx.build(exported, max_rows=70, batch_size=25, progress=False)
    assert stopped["status"] == "incomplete" and stopped["upserted"] == 70
    assert not idx.read_info().complete
    assert sum(idx.counts()["fine"].values()) == 70
    with pytest.raises(IndexNotReadyError, match="incomplete .* re-run `hivlp index"):
        idx.search(arrays[3][:2])
    rerun = MilvusDualIndex(db, "part").build(exported, batch_size=25, progress=False)
    assert rerun["status"] == "built"
    assert idx.counts()["coarse"] == {"image": 32, "text": 160}
    assert idx.search(arrays[3][:2], k=5).ids.shape == (2, 5)
    idx.drop()


def test_rows_lost_or_added_behind_a_complete_index_are_repaired(db, exported):
    idx = MilvusDualIndex(db, "lossy")
    idx.build(exported, progress=False)
    client = idx._client
    client.delete(idx.fine, ids=[int(i) for i in idx.search(np.ones(512), k=3).ids[0]])
    assert idx.counts()["fine"]["image"] == 29
    again = MilvusDualIndex(db, "lossy").build(exported, progress=False)
    assert again["status"] == "built" and again["upserted"] == 192
    assert idx.counts()["fine"] == {"image": 32, "text": 160}
    # a row the export does not have (e.g. written by hand): the index is rebuilt without it
    row = client.get(idx.coarse, ids=[int(idx.search(np.ones(512), k=1).ids[0, 0])])[0]
    client.insert(idx.coarse, [dict(row, id=123456789)], partition_name="image")
    client.flush(idx.coarse)
    assert idx.counts()["coarse"]["image"] == 33
    assert MilvusDualIndex(db, "lossy").build(exported, progress=False)["status"] == "built"
    assert idx.counts() == {"coarse": {"image": 32, "text": 160}, "fine": {"image": 32, "text": 160}}
    idx.drop()


def test_query_dim_mismatch_names_both_dims(index):
    with pytest.raises(DimensionMismatchError, match="256-d .* holds 512-d"):
        index.search(np.ones((2, 256), dtype=np.float32))


def test_missing_index_says_how_to_build_it(db):
    with pytest.raises(IndexNotReadyError, match="no index named 'nothing'.*hivlp index"):
        MilvusDualIndex(db, "nothing").search(np.ones(512))


def test_unreachable_server_fails_fast_naming_the_uri():
    t = time.perf_counter()
    with pytest.raises(MilvusUnavailableError, match="http://127.0.0.1:1"):
        MilvusDualIndex("http://127.0.0.1:1", "x")
    assert time.perf_counter() - t < 10


def test_cli_index_to_unreachable_uri_is_a_clean_error(exported, capsys):
    assert main(["index", "--embeddings", str(exported), "--uri", "http://127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach Milvus at http://127.0.0.1:1" in err and "Traceback" not in err


def test_lite_file_held_by_another_process(tmp_path):
    held = tmp_path / "held.db"
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from pymilvus import MilvusClient
            MilvusClient({str(held)!r})
            print("ready", flush=True)
            sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(MilvusLockedError,
                           match=f"{held} is locked by another process \\(pid {child.pid}\\).*one process at a time"):
            MilvusDualIndex(str(held), "x")
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    MilvusDualIndex(str(held), "x").close()  # free again once the holder exits


def test_lite_file_opened_twice_in_one_process_is_shared(tmp_path):
    """Milvus Lite serves a file from the process that opened it: a second client here shares it,
    and the lock's holder is this process, which is never reported as 'another process'."""
    db = tmp_path / "twice.db"
    with MilvusDualIndex(str(db), "x"):
        assert _lite_lock_holder(db) == os.getpid()
        with MilvusDualIndex(str(db), "x") as second:
            assert second.versions() == []


def test_cli_search_text_json_and_dim_mismatch(index, checkpoint, db, capsys, tmp_path, monkeypatch):
    code = main(["search", "--uri", db, "--name", "val", "--text", "a dog runs on the beach",
                 "--k", "5", "--checkpoint", str(checkpoint), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    hits = out["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5] and out["searched"] == "image"
    assert all(h["kind"] == "image" and h["filename"].endswith(".jpg") for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)

    small = MilvusDualIndex(db, "small256")
    rng = np.random.default_rng(0)
    small.build_from_arrays(
        rng.standard_normal((8, 256)), np.arange(8), ["image"] * 8, coarse_dim=32, progress=False
    )
    code = main(["search", "--uri", db, "--name", "small256", "--text", "a dog", "--checkpoint", str(checkpoint)])
    err = capsys.readouterr().err
    assert code == 2 and "512-d embeddings" in err and "holds 256-d vectors" in err
    # A registry model that does not exist: a clear error naming the URI.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    code = main(["search", "--uri", db, "--name", "small256", "--text", "x", "--model-uri", "models:/nope@champion"])
    assert code == 2 and "models:/nope@champion" in capsys.readouterr().err
    small.drop()


def test_cli_index_builds_then_is_idempotent(exported, db, capsys):
    args = ["index", "--embeddings", str(exported), "--uri", db, "--name", "cli", "--index", "flat",
            "--no-progress"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["status"] == "built" and first["counts"] == {"image": 32, "text": 160}
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "unchanged"
    MilvusDualIndex(db, "cli").drop()


def test_evaluate_milvus_matches_in_memory_coarse_to_fine(index, db, arrays):
    from hivlp.retrieval.evaluate import coarse_to_fine_ranks
    from hivlp.retrieval.metrics import RECALL_KEYS, recall_from_ranks

    _, img, _, txt, t2i = arrays
    got = evaluate_milvus(img, txt, t2i, uri=db, name="ev", coarse_dim=64, shortlist=SHORTLIST)
    ref = recall_from_ranks(*coarse_to_fine_ranks(img, txt, t2i, 64, SHORTLIST))
    assert set(got) == set(RECALL_KEYS)
    for key in RECALL_KEYS:  # at most one query may differ (float ties at the shortlist edge)
        tol = 100 / (len(img) if key.startswith("txt") else len(txt)) + 1e-9
        assert abs(got[key] - ref[key]) <= tol, key
    assert not any(c.startswith("ev_eval") for c in index._client.list_collections())


def test_bench_rows_full_vs_coarse_to_fine(tmp_path, arrays):
    from hivlp.bench.milvus import milvus_rows

    _, img, _, txt, t2i = arrays
    gallery = l2_normalize(img)
    exact = ExactEngine(gallery).search(txt, 10).ids
    rows = milvus_rows(gallery, txt, t2i, exact, coarse_dim=64, shortlist=32, workdir=tmp_path, repeats=5, batch=64)
    assert [r["method"] for r in rows] == ["milvus_full", "milvus_c2f"]
    r1 = 100.0 * float(np.mean(exact[:, 0] == t2i))  # percent, like recall_metrics
    for r in rows:
        assert r["n"] == 32 and r["ms_single_p50"] > 0 and r["ms_batch_p50"] > 0
        assert r["agree10"] >= 0.99  # 32 items: HNSW is exact, and the shortlist holds every image
        assert abs(r["r1"] - r1) <= 100.0 / len(txt) + 1e-9
    assert rows[0]["bytes_per_item"] == 4 * 512 and rows[1]["bytes_per_item"] == 4 * 64


@pytest.fixture(scope="module")
def exported2(tmp_path_factory, flickr8k_raw, checkpoint):
    """Another export (the first 24 val images): other content to re-index a served name with."""
    return _export_val(tmp_path_factory, flickr8k_raw, checkpoint, 24)


def test_reindex_while_searching_never_fails(db, exported, exported2, arrays):
    """Re-index a served name twice with other exports (keep=0: the version a search process has
    cached is dropped right after the swap) while another client searches in a loop: no search fails,
    and the searcher ends on the new version."""
    import threading

    from hivlp.retrieval.milvus import ALIAS_TTL_S

    MilvusDualIndex(db, "swap").build(exported, progress=False)
    searcher = MilvusDualIndex(db, "swap")
    q = arrays[3][:4]
    assert searcher.search(q, k=5, shortlist=16).ids.shape == (4, 5)
    failures: list[str] = []
    answers = 0
    stop = threading.Event()

    def loop() -> None:
        nonlocal answers
        while not stop.is_set():
            try:
                r = searcher.search(q, k=5, shortlist=16)
                assert (r.ids >= 0).all() and (r.ids < TEXT_ID_OFFSET).all()
                answers += 1
            except Exception as e:  # noqa: BLE001 - every failure counts
                failures.append(repr(e))

    t = threading.Thread(target=loop)
    t.start()
    try:
        builder = MilvusDualIndex(db, "swap")
        for exp in (exported2, exported):
            assert builder.build(exp, keep=0, progress=False)["status"] == "built"
            time.sleep(0.2)
        time.sleep(ALIAS_TTL_S + 0.5)
    finally:
        stop.set()
        t.join(timeout=60)
    assert failures == [] and answers >= 10
    assert builder.versions() == [3]  # keep=0: each swap dropped the version it replaced
    assert searcher.served() == builder.version_names(3)
    builder.drop()
    assert builder.versions() == [] and not builder.exists()


def test_broken_export_reindex_fails_and_old_version_still_answers(db, exported, exported2, arrays, tmp_path):
    import shutil

    from hivlp.errors import UsageError

    idx = MilvusDualIndex(db, "keepup")
    idx.build(exported2, progress=False)
    assert idx.build(exported, keep=1, progress=False)["previous"] == idx.version_names(1)[0]
    served = idx.served(refresh=True)
    assert served == idx.version_names(2) and idx.versions() == [1, 2]  # --keep 1: v1 kept
    q = arrays[3][:3]
    before = idx.search(q, k=5, shortlist=16)
    broken = tmp_path / "broken"
    shutil.copytree(exported2, broken)
    shard = sorted(broken.glob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(data)
    with pytest.raises(UsageError, match="checksum differs"):
        MilvusDualIndex(db, "keepup").build(broken, progress=False)
    assert idx.served(refresh=True) == served and idx.versions() == [1, 2]  # the failed version is gone
    np.testing.assert_array_equal(idx.search(q, k=5, shortlist=16).ids, before.ids)
    # an interrupted re-index (a crash) leaves its version unserved and the old one answering
    assert MilvusDualIndex(db, "keepup").build(exported2, max_rows=20, progress=False)["status"] == "incomplete"
    assert idx.served(refresh=True) == served and idx.versions() == [1, 2, 3]
    np.testing.assert_array_equal(idx.search(q, k=5, shortlist=16).ids, before.ids)
    # the next run completes it and serves it; with keep=0 the two older versions go
    assert MilvusDualIndex(db, "keepup").build(exported2, keep=0, progress=False)["status"] == "built"
    assert idx.versions() == [3] and idx.served(refresh=True) == idx.version_names(3)
    idx.drop()


def test_oversized_k_and_shortlist_are_capped_with_a_message(db, checkpoint, capsys, caplog):
    import tracemalloc

    small = MilvusDualIndex(db, "tiny16")
    rng = np.random.default_rng(1)
    small.build_from_arrays(rng.standard_normal((16, 512)), np.arange(16), ["image"] * 16, progress=False)
    tracemalloc.start()
    got = small.search(rng.standard_normal(512), k=10**9, shortlist=10**9)
    coarse = small.search_coarse(rng.standard_normal(512), k=10**9)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got.ids.shape == (1, 16) and coarse.ids.shape == (1, 16) and peak < 20e6
    assert "k capped at 16" in caplog.text and "shortlist capped at 16" in caplog.text
    code = main(["search", "--uri", db, "--name", "tiny16", "--text", "a dog", "--k", "1000000000",
                 "--shortlist", "1000000000", "--checkpoint", str(checkpoint)])
    out, err = capsys.readouterr()
    assert code == 0 and "k capped at 16" in err and "shortlist capped at 16" in err and "Traceback" not in err
    assert len(out.strip().splitlines()) == 16
    small.drop()


def test_in_memory_engines_cap_k_and_shortlist(arrays, caplog):
    import tracemalloc

    img_ids, img, _, txt, _ = arrays
    tracemalloc.start()
    c2f = CoarseToFineEngine(img, img_ids, shortlist=10**9).search(txt[:2], k=10**9, shortlist=10**9)
    exact = ExactEngine(img, img_ids).search(txt[:2], k=10**9)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert c2f.ids.shape == exact.ids.shape == (2, 32) and peak < 20e6
    assert "k capped at 32" in caplog.text and "shortlist capped at 32" in caplog.text


def test_a_server_that_cannot_start_raises_with_its_log_tail(tmp_path):
    """What the `milvus_server` fixture turns into a test failure: a server binary that dies at start
    (here a stand-in script placed where the package unpacks the real one) gives MilvusServerError
    naming the folder and quoting the end of its log."""
    import hashlib
    from pathlib import Path

    import milvus

    from hivlp.retrieval.milvus_server import MilvusServerError, local_server

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "milvus"
    fake.write_text("#!/bin/sh\necho 'fake milvus: cannot open its data folder' >&2\nexit 3\n")
    fake.chmod(0o755)
    lzma = Path(milvus.__file__).parent / "data" / "bin" / "milvus.lzma"
    (bin_dir / "milvus.lzma.md5").write_text(hashlib.md5(lzma.read_bytes()).hexdigest())
    t = time.perf_counter()
    with pytest.raises(MilvusServerError, match=r"(?s)exited \(code 3\).*fake milvus: cannot open its data folder"):
        with local_server(tmp_path, timeout=60):
            pass
    assert time.perf_counter() - t < 60


def test_index_built_before_versioning_is_served_then_replaced(tmp_path, exported2, arrays):
    """Plain collections named like the aliases (what `hivlp index` built before versions) still
    answer, and the first versioned build of that name replaces them with aliases."""
    from hivlp.embeddings.format import read_manifest

    db = str(tmp_path / "old.db")
    idx = MilvusDualIndex(db, "old")
    legacy = (idx.alias_coarse, idx.alias_fine)
    t = load_embeddings(exported2)
    emb = batch_embeddings(t)
    m = read_manifest(exported2)
    info = idx._wanted_info(dim=512, coarse_dim=64, index="FLAT", kinds=("image", "text"),
                            weights_sha256=m["weights_sha256"], digest="legacy", expected=m["counts"])
    idx._create(legacy, info)
    cols = {c: t.column(c).to_pylist() for c in ("id", "kind", "imgid", "sentid", "filename", "caption")}
    idx._upsert(legacy, cols, l2_normalize(emb), 64)
    for c in legacy:
        idx._client.flush(c)
    idx._ensure_indexes(legacy, info)
    idx._mark(legacy, True)
    assert idx.served(refresh=True) == legacy and idx.versions() == []
    assert idx.search(arrays[3][:2], k=3, shortlist=16).ids.shape == (2, 3)  # no store: fetched by id
    assert idx.build(exported2, progress=False)["status"] == "built"
    assert idx.served(refresh=True) == idx.version_names(1) and idx._alias_target(idx.alias_coarse)
    assert idx.search(arrays[3][:2], k=3, shortlist=16).ids.shape == (2, 3)
    idx.close()


def test_bench_milvus_times_floor_full_and_c2f_side_by_side(milvus_server, tmp_path):
    """`hivlp bench milvus` against the real server and Lite: every config is timed, the call floor
    row carries no quality, the JSON and the plot are written."""
    from hivlp.bench.milvus_server import (
        FLOOR_ROWS,
        milvus_server_bench,
        summary_lines,
        write,
    )

    result = milvus_server_bench(n=2 * FLOOR_ROWS, n_queries=8, shortlists=(50,), efs=(64,), nprobes=(16,),
                                 coarse_types=("HNSW",), workdir=tmp_path / "w", rounds=1,
                                 server_uri=milvus_server)
    rows = {(r["backend"], r["method"]): r for r in result["rows"]}
    assert set(rows) >= {(b, m) for b in ("server", "lite") for m in ("floor", "full_hnsw", "c2f")}
    for (backend, method), r in rows.items():
        assert r["ms_p50"] > 0
        if method == "floor":
            assert r["agree10"] is None
        else:
            assert 0.5 <= r["agree10"] <= 1.0, r  # 2,000 rows: HNSW at ef 64 finds most of the exact top 10
    c2f = rows[("server", "c2f")]["stages_ms_p50"]
    assert c2f["coarse"] > 0 and "rerank" in c2f
    assert any("call floor" in line for line in summary_lines(result))
    out = write(result, tmp_path / "m.json")
    assert [p.suffix for p in out] == [".json", ".png"] and all(p.stat().st_size for p in out)
