"""Query-time text encoding cost: ms per caption through each text tower (tokenise + forward + mean
pool), one caption per call and in batches, towers interleaved so a burst of load from other
processes hits each alike. It bounds search latency: a query is encoded before it is searched."""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class TextBenchConfig:
    towers: tuple[str, ...] = ("package", "package-mpnet")
    threads: int = 2
    repeats: int = 50  # single-caption calls timed per tower
    batch: int = 64
    batches: int = 4  # batches timed per tower
    max_tokens: int = 40


@torch.no_grad()
def run_text_bench(captions: list[str], cfg: TextBenchConfig) -> dict:
    from hivlp.model.towers import TextTower

    torch.set_num_threads(cfg.threads)
    load_before = os.getloadavg()[0]
    towers = {name: TextTower(name).eval() for name in cfg.towers}

    def encode(tower: TextTower, texts: list[str]) -> None:
        tok = tower.tokenize(texts, max_tokens=cfg.max_tokens)
        tower(tok["input_ids"], tok["attention_mask"])

    for tower in towers.values():  # warm up: thread pools, first-touch pages
        encode(tower, captions[:1])
        encode(tower, captions[: cfg.batch])
    single: dict[str, list[float]] = {n: [] for n in towers}
    for caption in tqdm(captions[: cfg.repeats], desc="single captions", unit="caption"):
        for name, tower in towers.items():
            t = time.perf_counter()
            encode(tower, [caption])
            single[name].append(1000 * (time.perf_counter() - t))
    batched: dict[str, list[float]] = {n: [] for n in towers}
    for b in tqdm(range(cfg.batches), desc=f"batches of {cfg.batch}", unit="batch"):
        block = [captions[(b * cfg.batch + i) % len(captions)] for i in range(cfg.batch)]
        for name, tower in towers.items():
            t = time.perf_counter()
            encode(tower, block)
            batched[name].append(1000 * (time.perf_counter() - t) / len(block))
    rows = []
    for name, tower in towers.items():
        rows.append({
            "tower": name,
            "model": type(tower.model).__name__,
            "layers": tower.num_layers,
            "dim": tower.feature_dim,
            "params_m": round(sum(p.numel() for p in tower.model.parameters()) / 1e6, 1),
            "single_ms_median": round(statistics.median(single[name]), 3),
            "single_ms_p90": round(sorted(single[name])[int(0.9 * (len(single[name]) - 1))], 3),
            "batched_ms_per_caption_median": round(statistics.median(batched[name]), 3),
        })
    base = rows[0]
    for r in rows:
        r["single_vs_first"] = round(r["single_ms_median"] / base["single_ms_median"], 2)
        r["batched_vs_first"] = round(r["batched_ms_per_caption_median"] / base["batched_ms_per_caption_median"], 2)
    return {
        "config": cfg.__dict__ | {"towers": list(cfg.towers)},
        "captions": len(captions),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    # Other processes' load inflates every figure; the ratios between towers hold better.
                    "loadavg_1min_before": round(load_before, 2), "loadavg_1min_after": round(os.getloadavg()[0], 2)},
        "rows": rows,
    }


def format_text_rows(result: dict) -> str:
    head = f"{'tower':<16}{'model':<14}{'params M':>9}{'single ms':>11}{'p90':>8}{'batched ms/cap':>16}{'x first':>9}"
    lines = [head]
    for r in result["rows"]:
        lines.append(f"{r['tower']:<16}{r['model']:<14}{r['params_m']:>9}{r['single_ms_median']:>11.2f}"
                     f"{r['single_ms_p90']:>8.2f}{r['batched_ms_per_caption_median']:>16.2f}{r['single_vs_first']:>9.2f}")
    return "\n".join(lines)
