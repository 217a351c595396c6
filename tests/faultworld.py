"""The small world the fault catalogue attacks (tests/test_faults.py): one dataset of real Flickr8k
images, a tiny model (timm's `test_efficientnet` + a 2-layer BERT with MiniLM's tokenizer) trained by
`hivlp pretrain`, its evaluation, an export, a Milvus Lite index and an MLflow SQLite registry holding
it. Every command runs in-process through `hivlp.cli.main`, as a user would call it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import zlib
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path

from .conftest import FLICKR8K

N_TRAIN, N_VAL = 8, 8
INDEX_NAME = "faults"


@dataclass
class World:
    root: Path
    data_dir: Path  # dataset JSON + images/
    dataset: Path
    text_tower: Path
    recipe: Path  # tiny pre-training recipe
    ft_recipe: Path  # tiny fine-tuning recipe
    ckpt: Path  # a finished `hivlp pretrain` --out (checkpoint + resume state + history)
    metrics: Path  # `hivlp evaluate --out`
    export: Path  # `hivlp export --out`
    uri: Path  # Milvus Lite `.db`
    store: str  # MLflow tracking URI (SQLite)
    entries: list[dict] = field(default_factory=list)  # the dataset's image entries

    @property
    def outputs(self) -> list[Path]:
        """What earlier commands wrote; no failing command may change a byte of it."""
        return [self.data_dir, self.ckpt, self.metrics, self.export, self.uri, self.root / "mlflow.db",
                self.root / "outputs"]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """`hivlp <argv>` in this process: (exit code, stdout, stderr)."""
    from hivlp.cli import main

    out, err = StringIO(), StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def must(argv: list[str]) -> str:
    code, out, err = run_cli(argv)
    assert code == 0, f"hivlp {' '.join(map(str, argv))} -> {code}\n{out[-2000:]}\n{err[-3000:]}"
    return out


def tree_hashes(paths: list[Path]) -> dict[str, str]:
    """sha256 of every file under `paths` (files or folders), keyed by path; absent paths too."""
    out = {}
    for p in paths:
        if p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            for f in sorted(q for q in p.rglob("*") if q.is_file()):
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
        else:
            out[str(p)] = "<absent>"
    return out


def png_bomb(path: Path, side: int = 30_000) -> Path:
    """A valid 100-byte PNG header claiming side x side pixels (900 M): Pillow's decompression-bomb
    guard refuses it on open."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def tiny_text_tower(folder: Path) -> Path:
    """A 2-layer, 32-wide BERT with random weights and MiniLM's tokenizer: a real transformers folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from hivlp.model.towers import package_text_tower_path

    tok = AutoTokenizer.from_pretrained(str(package_text_tower_path()), local_files_only=True)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def write_dataset(path: Path, entries: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"dataset": "faults", "images": entries}))
    return path


def build_world(root: Path, raw: dict) -> World:
    data_dir = root / "data"
    (data_dir / "images").mkdir(parents=True)
    entries = []
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        for img in [i for i in raw["images"] if i["split"] == split][:n]:
            shutil.copyfile(FLICKR8K / img.get("filepath", "") / img["filename"], data_dir / "images" / img["filename"])
            entries.append({**img, "filepath": "images"})
    dataset = write_dataset(data_dir / "dataset.json", entries)
    text_tower = tiny_text_tower(root / "tiny-bert")
    cache = root / "cache"
    recipe = root / "tiny.yaml"
    recipe.write_text(
        "recipe: pretrain\n"
        f"data: {{datasets: [{dataset}], max_text_tokens: 16}}\n"
        f"model: {{image_tower: test_efficientnet, image_weights: none, text_tower: {text_tower}, "
        "embed_dim: 64, levels: [16, 32, 64], head: linear}\n"
        "train: {epochs: 1, batch_size: 16, warmup_steps: 1, num_workers: 0, eval_coarse_dim: 16, "
        f"eval_shortlist: 8, cache_dir: {cache}}}\n"
        "tracking: {enabled: false}\n"
    )
    ft_recipe = root / "tiny-finetune.yaml"
    ft_recipe.write_text(
        "extends: tiny.yaml\nrecipe: finetune\nloss: {hard_negative_weight: 0.5}\ntrain: {lr: 1.0e-4}\n"
    )
    w = World(root=root, data_dir=data_dir, dataset=dataset, text_tower=text_tower, recipe=recipe,
              ft_recipe=ft_recipe, ckpt=root / "pretrain", metrics=root / "metrics.json",
              export=root / "export", uri=root / "milvus" / "faults.db", store=f"sqlite:///{root / 'mlflow.db'}",
              entries=entries)
    cwd = os.getcwd()
    os.chdir(root)  # default outputs (outputs/...) land here
    try:
        must(["pretrain", "--config", recipe, "--out", w.ckpt])
        must(["evaluate", "--checkpoint", w.ckpt, "--dataset", dataset, "--out", w.metrics, "--coarse-dim", 16,
              "--shortlist", 8])
        must(["export", "--checkpoint", w.ckpt, "--dataset", dataset, "--split", "val", "--out", w.export,
              "--no-progress"])
        must(["index", "--embeddings", w.export, "--uri", w.uri, "--name", INDEX_NAME, "--coarse-dim", 16,
              "--index", "FLAT", "--no-progress"])
        must(["promote", "--checkpoint", w.ckpt, "--metrics", w.metrics, "--gate-split", "val", "--tracking-uri", w.store])
    finally:
        os.chdir(cwd)
    return w
