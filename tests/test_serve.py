"""`hivlp serve` over a real index of a real Flickr8k slice (24 val images, 120 captions, embedded by the
real model): the JSON API through FastAPI's test client, then the real server (uvicorn, started as
`hivlp serve`) under a small load and in a real browser (Debian's chromium, driven by playwright).

A server or a browser that cannot start fails these tests: nothing here is skipped.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from hivlp.cli import main
from hivlp.config import RunConfig
from hivlp.embeddings.export import export_embeddings
from hivlp.embeddings.format import (
    TEXT_ID_OFFSET,
    batch_embeddings,
    load_embeddings,
    read_manifest,
)
from hivlp.retrieval.export_index import ExportIndex
from hivlp.retrieval.inmemory import l2_normalize
from hivlp.retrieval.milvus import MilvusDualIndex
from hivlp.retrieval.search import search
from hivlp.serve.app import Limits, SearchService, create_app, open_service
from hivlp.serve.thumbnails import THUMB_SIZE, Thumbnails
from tests.conftest import FLICKR8K, write_slice
from tests.test_export import real_model

N_VAL = 24
QUERY = "a dog runs on the grass"
UPLOAD_LIMIT = 512 * 2**10  # small, so an over-limit upload is cheap to send


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from hivlp.model import save_checkpoint

    return save_checkpoint(real_model(), RunConfig(), tmp_path_factory.mktemp("ckpt") / "ckpt")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, flickr8k_raw):
    return write_slice(flickr8k_raw, tmp_path_factory.mktemp("val24"), n_train=0, n_val=N_VAL)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, checkpoint, dataset):
    out = tmp_path_factory.mktemp("emb") / "val24"
    export_embeddings(checkpoint, dataset, "val", out, device="cpu", progress=False)
    return out


@pytest.fixture(scope="module")
def arrays(exported):
    """{kind: (ids, unit vectors)} of the export, for reference rankings computed here with numpy."""
    t = load_embeddings(exported)
    kinds = np.array(t.column("kind").to_pylist())
    ids = np.array(t.column("id").to_pylist(), dtype=np.int64)
    emb = batch_embeddings(t)
    return {k: (ids[kinds == k], emb[kinds == k]) for k in ("image", "text")}


@pytest.fixture(scope="module")
def dbs(tmp_path_factory, exported):
    """Two copies of one Milvus Lite index built from the export, as `hivlp index` builds it: one for this
    process (test client), one for the server process (a .db opens in one process at a time)."""
    root = tmp_path_factory.mktemp("milvus")
    db = root / "serve.db"
    with MilvusDualIndex(str(db), "serve") as idx:
        assert idx.build(exported, coarse_dim=64, index="HNSW", progress=False)["status"] == "built"
    shutil.copytree(db, root / "server.db")
    return str(db), str(root / "server.db")


@pytest.fixture(scope="module")
def service(dbs, exported, checkpoint):
    svc = open_service(uri=dbs[0], name="serve", embeddings=exported, checkpoint=checkpoint, image_root=FLICKR8K,
                       limits=Limits(max_upload_bytes=UPLOAD_LIMIT))
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service))


@pytest.fixture(scope="module")
def query_vec(service):
    return l2_normalize(service.encoder.texts([QUERY]))[0]


def _val_image(dataset, i: int = 0):
    entry = [e for e in json.loads(dataset.read_text())["images"] if e["split"] == "val"][i]
    return entry, FLICKR8K / "images" / entry["filename"]


# ------------------------------------------------------------------------------------------ JSON API


def test_healthz_reports_model_and_index(client, exported):
    h = client.get("/healthz").json()
    manifest = read_manifest(exported)
    assert h["status"] == "ok"
    assert h["model"]["weights_sha256"] == manifest["weights_sha256"] and h["model"]["dim"] == 512
    want = {"name": "serve", "backend": "milvus", "rows": {"image": N_VAL, "text": 5 * N_VAL}, "dim": 512,
            "coarse_dim": 64, "index_type": "HNSW"}
    assert {k: h["index"][k] for k in want} == want
    assert h["thumbnails"]["images"] == N_VAL and h["thumbnails"]["image_root"] == str(FLICKR8K.resolve())


def test_text_query_returns_the_exact_top_images_with_thumbnails_and_stage_times(client, arrays, query_vec):
    r = client.get("/api/search", params={"text": QUERY, "k": 10, "shortlist": N_VAL})
    assert r.status_code == 200
    body = r.json()
    hits = body["hits"]
    assert body["searched"] == "image" and body["level"] == "fine" and body["shortlist"] == N_VAL
    assert len(hits) == 10 and all(h["kind"] == "image" and h["thumbnail"] == f"/thumbs/{h['id']}" for h in hits)
    assert all(h["filename"].endswith(".jpg") and h["caption"] for h in hits)  # an image shows a reference caption
    # A shortlist of every image is exact search: the reference ranking, computed here.
    ids, img = arrays["image"]
    scores = l2_normalize(img) @ query_vec
    top = np.argsort(-scores, kind="stable")[:10]
    assert [h["id"] for h in hits] == ids[top].tolist()
    np.testing.assert_allclose([h["score"] for h in hits], scores[top], atol=1e-4)
    t = body["timings_ms"]
    assert {"encode", "coarse", "rerank", "total"} <= set(t) and all(t[s] > 0 for s in ("encode", "coarse", "rerank"))
    assert t["total"] >= t["encode"] + t["coarse"] + t["rerank"] - 0.01


def test_coarse_level_alone_ranks_by_the_64d_prefix(client, arrays, query_vec):
    body = client.get("/api/search", params={"text": QUERY, "k": 10, "level": "coarse"}).json()
    assert body["level"] == "coarse" and body["shortlist"] is None and body["timings_ms"]["rerank"] == 0.0
    ids, img = arrays["image"]
    scores = l2_normalize(img[:, :64]) @ l2_normalize(query_vec[None, :64])[0]
    top = np.argsort(-scores, kind="stable")[:10]
    assert [h["id"] for h in body["hits"]] == ids[top].tolist()
    np.testing.assert_allclose([h["score"] for h in body["hits"]], scores[top], atol=1e-4)


def test_bad_text_queries_get_a_message_caps_get_a_note(client):
    for params in ({"text": ""}, {"text": "   "}, {}):
        r = client.get("/api/search", params=params)
        assert r.status_code == 422 and "query text is empty" in r.json()["detail"], params
    r = client.get("/api/search", params={"text": "a dog " * 1000})
    assert r.status_code == 200
    assert any("truncated from 5999 to 1000 characters" in n for n in r.json()["notes"])
    body = client.get("/api/search", params={"text": QUERY, "k": 500, "shortlist": 10**6}).json()
    assert len(body["hits"]) == N_VAL and body["k"] == N_VAL and body["shortlist"] == N_VAL
    assert f"k capped at {N_VAL}, the number of items searched (asked for 500)" in body["notes"]
    assert any(n.startswith(f"shortlist capped at {N_VAL}") for n in body["notes"])
    r = client.get("/api/search", params={"text": QUERY, "k": 0})
    assert r.status_code == 422 and "k and shortlist must be >= 1" in r.json()["detail"]
    r = client.get("/api/search", params={"text": QUERY, "level": "medium"})
    assert r.status_code == 422 and "level 'medium'" in r.json()["detail"]
    assert client.get("/api/search", params={"text": QUERY, "k": "ten"}).status_code == 422


def test_server_limits_cap_k_and_shortlist(exported, service):
    svc = SearchService(ExportIndex(exported, name="capped"), service.encoder, service.thumbnails, "in-memory",
                        Limits(max_k=5, max_shortlist=8))
    body = TestClient(create_app(svc)).get("/api/search", params={"text": QUERY, "k": 20, "shortlist": 20}).json()
    assert len(body["hits"]) == 5 and body["shortlist"] == 8
    assert body["notes"] == ["k capped at 5, this server's limit (asked for 20)",
                             "shortlist capped at 8 (this server's limit; asked for 20)"]


def test_image_upload_searches_captions_as_the_library_does(client, service, dataset):
    entry, path = _val_image(dataset, 3)
    r = client.post("/api/search", files={"image": (entry["filename"], path.read_bytes(), "image/jpeg")},
                    data={"k": "10", "shortlist": "50"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["searched"] == "text" and body["query"] == {"text": None, "image": entry["filename"]}
    hits = body["hits"]
    assert len(hits) == 10 and all(h["kind"] == "text" and h["id"] >= TEXT_ID_OFFSET and h["caption"] for h in hits)
    ref = search(service.index, service.encoder, image=path, k=10, shortlist=50)
    assert [h["id"] for h in hits] == [h.id for h in ref.hits]
    # a caption's thumbnail is its image's
    top = hits[0]
    assert client.get(top["thumbnail"]).content == client.get(f"/thumbs/{top['imgid']}").content
    # a caption can also be POSTed as a form field
    r = client.post("/api/search", data={"text": QUERY, "k": "3"})
    assert r.status_code == 200 and r.json()["searched"] == "image" and len(r.json()["hits"]) == 3


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("1", size).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_uploads_are_refused_naming_the_problem(client, dataset):
    _, path = _val_image(dataset)
    jpeg = path.read_bytes()

    def post(data: bytes, name: str = "x.jpg"):
        return client.post("/api/search", files={"image": (name, data, "image/jpeg")})

    r = post(b"this is not an image", "notes.txt")
    assert r.status_code == 415 and "upload 'notes.txt': not an image" in r.json()["detail"]
    r = post(jpeg[: len(jpeg) // 3], "cut.jpg")
    assert r.status_code == 415 and "upload 'cut.jpg': not a readable image" in r.json()["detail"]
    r = post(b"", "empty.jpg")
    assert r.status_code == 415 and "empty" in r.json()["detail"]
    r = post(jpeg + b"\0" * (2 * UPLOAD_LIMIT), "big.jpg")  # refused by its Content-Length, before it is read
    assert r.status_code == 413 and "over the upload limit of 524,288 bytes" in r.json()["detail"]
    r = post(b"\xff" * (UPLOAD_LIMIT + 1000), "big.jpg")  # within the form's slack: refused when read
    assert r.status_code == 413 and "upload 'big.jpg': over the upload limit of 524,288 bytes" in r.json()["detail"]
    # decompression bombs: tiny files that decode to huge images, refused from the header
    small_bomb = _png((12_000, 12_000))  # 144 M pixels: over the server's 40 M limit
    assert len(small_bomb) < 100_000
    r = post(small_bomb, "bomb.png")
    assert r.status_code == 413 and "12000x12000 = 144,000,000 pixels, over the limit of 40,000,000" in r.json()["detail"]
    r = post(_png((20_000, 20_000)), "bigger.png")  # past Pillow's own guard too
    assert r.status_code == 413 and "refused" in r.json()["detail"]
    r = client.post("/api/search", data={"text": QUERY}, files={"image": ("x.jpg", jpeg, "image/jpeg")})
    assert r.status_code == 422 and "exactly one query" in r.json()["detail"]
    assert client.post("/api/search", data={"k": "3"}).status_code == 422


def test_thumbnails_are_small_jpegs_of_the_dataset_images_cached(client, service, dataset):
    entry, path = _val_image(dataset, 5)
    before = service.thumbnails.jpeg.cache_info()
    r = client.get(f"/thumbs/{entry['imgid']}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(r.content))
    full = Image.open(path)
    assert thumb.format == "JPEG" and max(thumb.size) == min(THUMB_SIZE, max(full.size))  # never enlarged
    assert abs(thumb.size[0] / thumb.size[1] - full.size[0] / full.size[1]) < 0.02
    assert client.get(f"/thumbs/{entry['imgid']}").content == r.content
    after = service.thumbnails.jpeg.cache_info()
    assert after.hits >= before.hits + 1 and after.misses == before.misses + 1
    caption_id = TEXT_ID_OFFSET + entry["sentids"][2]
    assert client.get(f"/thumbs/{caption_id}").content == r.content
    r = client.get("/thumbs/999999")
    assert r.status_code == 404 and "no item with id 999999" in r.json()["detail"]


def test_thumbnails_shrink_large_images_keeping_their_shape(tmp_path, dataset):
    """The shipped Flickr8k copies are 224 px already; a full-size photo is cut to THUMB_SIZE."""
    entry, path = _val_image(dataset, 0)
    (tmp_path / "images").mkdir()
    Image.open(path).resize((1000, 640)).save(tmp_path / "images" / entry["filename"], quality=95)
    data = {"images": [dict(entry, filepath="images")]}
    (tmp_path / "d.json").write_text(json.dumps(data))
    thumb = Image.open(io.BytesIO(Thumbnails(tmp_path / "d.json").jpeg(entry["imgid"])))
    assert thumb.size == (THUMB_SIZE, 164) and thumb.format == "JPEG"


@pytest.mark.parametrize("url", [
    "/thumbs/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/thumbs/../../../../etc/passwd",
    "/thumbs/%2e%2e/%2e%2e/etc/passwd",
    "/thumbs/1/../../../etc/passwd",
    "/static/..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/static/../../../../../../etc/passwd",
    "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
])
def test_path_traversal_in_urls_serves_nothing(client, url):
    r = client.get(url)
    assert r.status_code in (404, 422) and b"root:" not in r.content


def test_thumbnails_never_leave_the_image_root(tmp_path, service, exported, dataset):
    """A tampered dataset entry (../ out of the root) or a symlink out of it is refused; others are served."""
    data = json.loads(dataset.read_text())
    val = [e for e in data["images"] if e["split"] == "val"]
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    secret = tmp_path / "secret.jpg"
    shutil.copy(FLICKR8K / "images" / val[2]["filename"], secret)  # a real JPEG, but outside the root
    for e in data["images"]:
        e["filepath"] = "images"
    val[0]["filename"] = "../../secret.jpg"
    (root / "images" / val[1]["filename"]).symlink_to(secret)
    shutil.copy(FLICKR8K / "images" / val[2]["filename"], root / "images" / val[2]["filename"])
    tampered = root / "dataset.json"
    tampered.write_text(json.dumps(data))

    svc = SearchService(ExportIndex(exported), service.encoder, Thumbnails(tampered), "in-memory")
    c = TestClient(create_app(svc))
    for e in val[:2]:
        r = c.get(f"/thumbs/{e['imgid']}")
        assert r.status_code == 403, r.content[:100]
        assert f"image {e['imgid']} resolves outside the image root {root.resolve()}" in r.json()["detail"]
    assert c.get(f"/thumbs/{val[2]['imgid']}").status_code == 200
    r = c.get(f"/thumbs/{val[3]['imgid']}")  # inside the root, but not there
    assert r.status_code == 404 and "not found under the image root" in r.json()["detail"]


def test_in_memory_export_and_milvus_answer_alike(client, exported, service):
    """Both index sources go through the same search(): same hits, same capping."""
    svc = SearchService(ExportIndex(exported, name="mem"), service.encoder, service.thumbnails, "in-memory")
    mem = TestClient(create_app(svc))
    assert mem.get("/healthz").json()["index"]["rows"] == {"image": N_VAL, "text": 5 * N_VAL}
    for level in ("fine", "coarse"):
        params = {"text": QUERY, "k": 10, "shortlist": N_VAL, "level": level}
        a, b = client.get("/api/search", params=params).json(), mem.get("/api/search", params=params).json()
        assert [h["id"] for h in a["hits"]] == [h["id"] for h in b["hits"]], level
        np.testing.assert_allclose([h["score"] for h in a["hits"]], [h["score"] for h in b["hits"]], atol=1e-4)


def test_docs_and_page(client):
    assert "swagger" in client.get("/docs").text.lower()
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/search", "/thumbs/{item_id}", "/healthz"} <= set(paths) and {"get", "post"} <= set(paths["/api/search"])
    page = client.get("/", params={"text": QUERY})
    assert page.status_code == 200 and 'id="results"' in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/style.css").status_code == 200


def test_cli_serve_refuses_a_missing_index_in_one_line(tmp_path, exported, checkpoint, capsys):
    code = main(["serve", "--uri", str(tmp_path / "none.db"), "--name", "nope", "--embeddings", str(exported),
                 "--checkpoint", str(checkpoint)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "no index named 'nope'" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert main(["serve", "--checkpoint", str(checkpoint)]) == 2
    assert "give an index" in capsys.readouterr().err


# ------------------------------------------------------------------------- the real server: load, browser


@pytest.fixture(scope="module")
def server(dbs, exported, checkpoint):
    """`hivlp serve` for real: uvicorn on a free loopback port, over the Milvus Lite index."""
    from hivlp.serve.process import running_server

    args = ["--uri", dbs[1], "--name", "serve", "--embeddings", str(exported), "--checkpoint", str(checkpoint),
            "--image-root", str(FLICKR8K)]
    with running_server(args) as url:
        yield url


def test_load_on_the_real_server_has_no_errors(server, arrays, exported):
    from hivlp.bench.serve import run_load

    captions = [c for c in load_embeddings(exported, kinds=("text",)).column("caption").to_pylist()]
    result = run_load(server, captions, requests=60, concurrency=8)
    assert result["errors"] == 0, result["error_examples"]
    assert result["ok"] == 60
    lat = result["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    assert set(result["server_ms_p50"]) >= {"encode", "coarse", "rerank", "total"}


def test_page_renders_thumbnails_in_real_chromium(server, dataset):
    from playwright.sync_api import sync_playwright

    from hivlp.serve.browser import launch_chromium

    loaded = "n => [...document.querySelectorAll('img.thumb')].filter(i => i.complete && i.naturalWidth > 0).length >= n"
    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{server}/?text=a+dog+runs+on+the+grass")
            page.wait_for_function(loaded, arg=10, timeout=60_000)
            n = page.evaluate("[...document.querySelectorAll('img.thumb')].filter(i => i.naturalWidth > 0).length")
            assert n >= 10
            assert page.input_value("#q") == QUERY
            timings = page.inner_text("#timings")
            assert all(s in timings for s in ("encode", "coarse", "rerank", "server total"))
            assert "Top 10 images" in page.inner_text("#summary")
            # the switch: the same query answered by the coarse level alone
            page.click(".switch button[data-level=coarse]")
            page.wait_for_function("document.body.dataset.level === 'coarse'")
            assert "skipped" in page.inner_text("#timings") and "coarse level alone" in page.inner_text("#summary")
            assert "level=coarse" in page.url
            # an image upload searches captions
            _, path = _val_image(dataset, 7)
            page.set_input_files("#file", str(path))
            page.wait_for_function("document.querySelector('#results').classList.contains('captions')", timeout=60_000)
            page.wait_for_function(loaded, arg=10, timeout=60_000)
            assert page.locator("#results .card").count() == 10
            assert not errors, errors
        finally:
            browser.close()
