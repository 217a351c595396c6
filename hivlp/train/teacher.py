"""Teacher caption features for distillation: a big text tower's pooled caption features, computed once.

An entry is keyed by the teacher (tower name and a digest of its weights), the tokenisation length and
the exact captions, and records the captions' digest in its metadata, so a copied entry (teacher.features)
can be checked against the captions it is used for. Written atomically as safetensors (no pickle).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hivlp.config import TeacherConfig
from hivlp.errors import ConfigError
from hivlp.io import atomic_file

log = logging.getLogger(__name__)


def captions_digest(captions: list[str]) -> str:
    h = hashlib.sha256()
    for c in captions:
        h.update(c.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def _weights_digest(tower) -> str:
    h = hashlib.sha256()
    for name, t in tower.model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def _read(path: Path, digest: str, where: str) -> torch.Tensor:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            feats = f.get_tensor("features")
    except Exception as e:  # safetensors' own error types for a damaged file
        raise ConfigError(f"{where}: cannot read {path} as teacher features ({e})") from None
    if meta.get("captions_sha256") != digest:
        raise ConfigError(
            f"{where}: {path} holds teacher features of other captions (digest "
            f"{meta.get('captions_sha256', 'none')[:12]}, these captions {digest[:12]}); compute them with "
            "teacher.text_tower instead"
        )
    return feats.float()


@torch.no_grad()
def teacher_caption_features(
    cfg: TeacherConfig, captions: list[str], cache_dir: str | Path, device: torch.device, max_tokens: int,
    batch_size: int = 64,
) -> torch.Tensor | None:
    """[N, H] pooled teacher features of `captions` (None when no teacher is configured)."""
    digest = captions_digest(captions)
    if cfg.features:
        return _read(Path(cfg.features), digest, "teacher.features")
    if not cfg.text_tower:
        return None
    from hivlp.model.towers import TextTower

    tower = TextTower(cfg.text_tower).eval().to(device)
    key = hashlib.sha256(f"{cfg.text_tower}:{_weights_digest(tower)}:{max_tokens}:{digest}".encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"tch-{key}.safetensors"
    if path.is_file():
        try:
            feats = _read(path, digest, "teacher cache")
            log.info("teacher feature cache hit: %s (%d captions)", path, len(captions))
            return feats
        except ConfigError as e:
            log.warning("%s; computing it again", e)
    chunks = []
    for i in tqdm(range(0, len(captions), batch_size), desc=f"teacher {cfg.text_tower} captions", unit="batch"):
        tok = tower.tokenize(captions[i : i + batch_size], max_tokens=max_tokens)
        chunks.append(tower(tok["input_ids"].to(device), tok["attention_mask"].to(device)).float().cpu())
    feats = torch.cat(chunks)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file({"features": feats.contiguous()}, str(tmp),
                  metadata={"captions_sha256": digest, "teacher": cfg.text_tower, "max_tokens": str(max_tokens)})
    return feats
