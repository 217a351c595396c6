"""`hivlp validate` on real Flickr8k slices: clean, with every kind of problem planted once, and broken."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from hivlp.cli import main
from hivlp.data.validate import ValidationLimits, validate_dataset

from .conftest import FLICKR8K, write_slice


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["validate", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def planted(tmp_path_factory, flickr8k_raw) -> tuple[Path, set[tuple]]:
    """12 real images copied beside a JSON, with each kind of problem planted once.

    Returns the JSON and the expected problems as (kind, severity, filename, sentid, entry).
    """
    root = tmp_path_factory.mktemp("planted")
    (root / "images").mkdir()
    entries = [copy.deepcopy(img) for img in flickr8k_raw["images"] if img["split"] == "train"][:12]
    for img in entries:
        img["filepath"] = "images"  # relative: resolved against the JSON's folder
        shutil.copy(FLICKR8K / "images" / img["filename"], root / "images" / img["filename"])

    def fn(i: int) -> str:
        return entries[i]["filename"]

    def sid(i: int, j: int) -> int:
        return entries[i]["sentences"][j]["sentid"]

    expected = set()
    # 0: truncated JPEG
    jpeg = root / "images" / fn(0)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    expected.add(("corrupt_image", "error", fn(0), None, 0))
    # 1: image file deleted
    (root / "images" / fn(1)).unlink()
    expected.add(("missing_image", "error", fn(1), None, 1))
    # 2: whitespace-only caption
    entries[2]["sentences"][2]["raw"] = "   "
    expected.add(("empty_caption", "error", fn(2), sid(2, 2), 2))
    # 3: one-word caption
    entries[3]["sentences"][0]["raw"] = "Dog"
    expected.add(("caption_too_short", "error", fn(3), sid(3, 0), 3))
    # 4: 150-word caption (also over 500 characters: still one problem)
    entries[4]["sentences"][1]["raw"] = " ".join(["dog"] * 150)
    expected.add(("caption_too_long", "error", fn(4), sid(4, 1), 4))
    # 5/6: one sentid used twice, in two images
    entries[5]["sentences"][3]["sentid"] = sid(6, 0)
    expected.add(("duplicate_sentid", "error", fn(5), sid(6, 0), 5))
    expected.add(("duplicate_sentid", "error", fn(6), sid(6, 0), 6))
    # 7/11: two entries naming the same file
    entries[11]["filename"] = fn(7)
    expected.add(("duplicate_filename", "error", fn(7), None, 7))
    expected.add(("duplicate_filename", "error", fn(7), None, 11))
    # 8: image with no captions
    entries[8]["sentences"], entries[8]["sentids"] = [], []
    expected.add(("no_captions", "error", fn(8), None, 8))
    # 9: unknown split
    entries[9]["split"] = "bogus"
    expected.add(("unknown_split", "error", fn(9), None, 9))
    # 10: four captions: a warning only
    entries[10]["sentences"].pop()
    expected.add(("caption_count", "warning", fn(10), None, 10))

    path = root / "dataset_planted.json"
    path.write_text(json.dumps({"dataset": "planted", "images": entries}))
    return path, expected


def test_clean_slice_exits_0(capsys, tmp_path, slice_json):
    raw = json.loads(slice_json.read_text())
    report = tmp_path / "r.json"
    rc, out, _ = run_cli(capsys, slice_json, "--report", report, "--workers", 2)
    assert rc == 0, out
    lines = out.strip().splitlines()
    assert lines[-1] == "OK"
    n_images = len(raw["images"])
    n_captions = sum(len(img["sentences"]) for img in raw["images"])
    n_val = sum(img["split"] == "val" for img in raw["images"])
    assert f"images: {n_images}  captions: {n_captions}" in out
    assert f"val: {n_val} images, {5 * n_val} captions" in out
    assert "no problems found" in out
    data = json.loads(report.read_text())
    assert data["ok"] and data["problems"] == []
    assert data["counts"]["images_per_split"] == {"train": n_images - n_val, "val": n_val}


def test_split_option_limits_the_check(capsys, tmp_path, slice_json):
    raw = json.loads(slice_json.read_text())
    n_val = sum(img["split"] == "val" for img in raw["images"])
    rc, out, _ = run_cli(capsys, slice_json, "--split", "val", "--report", tmp_path / "r.json")
    assert rc == 0
    assert f"images: {n_val}  captions: {5 * n_val}" in out
    assert "train:" not in out


def test_every_planted_problem_is_named(capsys, tmp_path, planted):
    path, expected = planted
    report = tmp_path / "r.json"
    rc, out, _ = run_cli(capsys, path, "--report", report)
    assert rc == 1
    assert out.strip().splitlines()[-1] == "FAILED"
    problems = json.loads(report.read_text())["problems"]
    found = {(p["kind"], p["severity"], p["filename"], p["sentid"], p["entry"]) for p in problems}
    assert found == expected
    raw = json.loads(path.read_text())["images"]
    for p in problems:
        assert p["imgid"] == raw[p["entry"]]["imgid"]
        assert p["hint"] and p["message"]
    # The summary names each problem by kind, filename and (for captions) sentid.
    for kind, severity, filename, sentid, _ in expected:
        assert f"{severity.upper()} {kind}:" in out
        assert filename in out
        if sentid is not None:
            assert f"sentid={sentid}" in out
    assert "fix: " in out


def test_planted_problems_through_the_library(planted):
    path, expected = planted
    report = validate_dataset(path, workers=1, progress=False)
    assert not report.ok
    assert [p.kind for p in report.warnings] == ["caption_count"]
    assert len(report.errors) == len(expected) - 1
    assert report.counts["images"] == 12
    assert report.counts["images_per_split"] == {"train": 11, "bogus": 1}
    json.dumps(report.to_dict())  # serialisable as is


def test_truncation_is_caught_even_when_pil_is_told_to_pad(planted, monkeypatch):
    from PIL import ImageFile

    path, expected = planted
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as lenient image loaders do
    report = validate_dataset(path, progress=False)
    assert [(p.kind, p.entry) for p in report.problems if p.kind == "corrupt_image"] == [("corrupt_image", 0)]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_split_filter_keeps_json_entry_indices(planted):
    path, expected = planted
    report = validate_dataset(path, split="train", progress=False)
    found = {(p.kind, p.entry) for p in report.problems}
    assert found == {(kind, entry) for kind, _, _, _, entry in expected if kind != "unknown_split"}


def test_bounds_are_options(capsys, tmp_path, planted):
    path, _ = planted
    rc, _, _ = run_cli(
        capsys, path, "--report", tmp_path / "r.json", "--min-words", 1, "--max-words", 200,
        "--max-chars", 1000, "--splits", "train,bogus", "--captions-per-image", 4,
    )
    kinds = {p["kind"] for p in json.loads((tmp_path / "r.json").read_text())["problems"]}
    assert rc == 1
    assert not kinds & {"caption_too_short", "caption_too_long", "unknown_split"}
    assert "caption_count" in kinds  # now the 5-caption images are the odd ones out
    assert "missing_image" in kinds


def test_only_warnings_exit_0(capsys, tmp_path, flickr8k_raw):
    path = write_slice(flickr8k_raw, tmp_path, n_train=6, n_val=0)
    data = json.loads(path.read_text())
    data["images"][2]["sentences"].pop()
    path.write_text(json.dumps(data))
    rc, out, _ = run_cli(capsys, path, "--report", tmp_path / "r.json")
    assert rc == 0
    assert "WARNING caption_count: 1" in out
    assert data["images"][2]["filename"] in out
    assert out.strip().splitlines()[-1] == "OK"


def _schema_cases(raw_images: list[dict]) -> dict[str, tuple[str, list[str]]]:
    """name -> (file text, fragments the error message must contain)."""
    good = [copy.deepcopy(img) for img in raw_images[:3]]
    no_split = copy.deepcopy(good)
    del no_split[1]["split"]
    text_sentid = copy.deepcopy(good)
    text_sentid[2]["sentences"][4]["sentid"] = "17"
    bad_filepath = copy.deepcopy(good)
    bad_filepath[0]["filepath"] = 3
    return {
        "not json": ("{broken", ["not valid JSON"]),
        "no images list": (json.dumps({"dataset": "x", "pictures": []}), ["'images' list"]),
        "missing field": (json.dumps({"images": no_split}), ["images[1]", "'split'"]),
        "wrong type": (json.dumps({"images": text_sentid}), ["images[2]", "sentences[4]", "'sentid'", "integer"]),
        "bad filepath": (json.dumps({"images": bad_filepath}), ["images[0]", "'filepath'"]),
        "empty": (json.dumps({"images": []}), ["empty"]),
    }


@pytest.mark.parametrize("case", ["not json", "no images list", "missing field", "wrong type", "bad filepath", "empty"])
def test_unreadable_or_malformed_json_exits_2(capsys, tmp_path, flickr8k_raw, case):
    text, fragments = _schema_cases(flickr8k_raw["images"])[case]
    path = tmp_path / "broken.json"
    path.write_text(text)
    rc, out, err = run_cli(capsys, path, "--report", tmp_path / "r.json")
    assert rc == 2
    assert str(path) in err
    for fragment in fragments:
        assert fragment in err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["missing.json"], "not found"),
        (["{slice}", "--split", "test"], "no images in split 'test'"),
        (["{slice}", "--min-words", "5", "--max-words", "3"], "--max-words"),
        (["{slice}", "--workers", "0"], "--workers"),
        (["{slice}", "--image-root", "/nonexistent/dir"], "--image-root"),
    ],
)
def test_usage_errors_exit_2(capsys, tmp_path, slice_json, args, fragment):
    args = [a.replace("{slice}", str(slice_json)) for a in args]
    rc, _, err = run_cli(capsys, *args, "--report", tmp_path / "r.json")
    assert rc == 2
    assert fragment in err


def test_report_is_complete_and_at_the_default_place(capsys, tmp_path, monkeypatch, planted):
    path, expected = planted
    monkeypatch.chdir(tmp_path)
    rc, out, _ = run_cli(capsys, path)
    report = tmp_path / "outputs" / "validation" / "planted.json"
    assert rc == 1 and f"report: {Path('outputs/validation/planted.json')}" in out
    assert [p.name for p in report.parent.iterdir()] == ["planted.json"]  # no temp file left behind
    data = json.loads(report.read_text())
    assert data["ok"] is False
    assert data["n_errors"] + data["n_warnings"] == len(data["problems"]) == len(expected)
    assert data["counts"]["images"] == 12
    assert data["counts"]["captions"] == sum(len(i["sentences"]) for i in json.loads(path.read_text())["images"])
    assert data["limits"] == {
        "allowed_splits": ["train", "val", "test", "restval"], "min_words": 2, "max_words": 100,
        "max_chars": 500, "captions_per_image": 5,
    }
    for p in data["problems"]:
        assert set(p) == {"kind", "severity", "filename", "imgid", "sentid", "message", "hint", "entry"}
        assert p["severity"] in {"error", "warning"}
    assert {k: v["count"] for k, v in data["problem_counts"].items()} == {
        kind: sum(e[0] == kind for e in expected) for kind in {e[0] for e in expected}
    }
    ge = data["expectations"]
    assert ge["evaluated_expectations"] == len(ge["results"]) > 0
    assert ge["evaluated_expectations"] == ge["successful_expectations"] + ge["unsuccessful_expectations"]
    failed_kinds = {r["kind"] for r in ge["results"] if not r["success"]}
    assert failed_kinds == {e[0] for e in expected}
    for r in ge["results"]:
        assert r["success"] == (r["unexpected_count"] == 0)
    assert "seconds" not in data  # timings change every run; the report must not (DVC hashes it)


def test_report_is_deterministic(capsys, tmp_path, flickr8k_raw):
    """Validating the same dataset twice writes byte-identical reports with no absolute paths."""
    from .conftest import write_slice

    data = write_slice(flickr8k_raw, tmp_path / "d", n_train=4, n_val=2)
    reports = []
    for i in range(2):
        rc, _, _ = run_cli(capsys, data, "--report", tmp_path / f"r{i}.json")
        assert rc == 0
        reports.append((tmp_path / f"r{i}.json").read_bytes())
    assert reports[0] == reports[1]
    assert json.loads(reports[0])["image_root"] == str(data.parent)


def test_limits_reject_nonsense():
    with pytest.raises(Exception, match="min-words"):
        ValidationLimits(min_words=0)


@pytest.mark.slow
def test_full_flickr8k(capsys, tmp_path, flickr8k_json):
    rc, out, _ = run_cli(capsys, flickr8k_json, "--report", tmp_path / "r.json")
    assert rc == 0, out
    counts = json.loads((tmp_path / "r.json").read_text())["counts"]
    assert counts["images"] == 7000 and counts["captions"] == 35000
    assert counts["images_per_split"] == {"train": 6000, "val": 1000}
    assert counts["image_files_checked"] == 7000
