"""Retrieval benchmark: latency, bytes and recall of exact vs coarse-to-fine search as the gallery grows.

Queries are real captions (Flickr8k val) whose true images sit in the gallery; the rest of the
gallery are distractors drawn from a Gaussian with the mean and full covariance of the real image
embeddings (train + val images), so every size N measures the same queries against more clutter.
Every method runs on the same gallery and queries in one process, one after the other.

Rows: {"method", "n", "ms_single_p50", "ms_batch_p50", "bytes_per_item", "r1", "r10", "agree10", ...}
- ms_single_p50 / ms_single_p90: median / 90th percentile ms of `repeats` one-query searches;
- ms_batch_p50: median over batches of `batch` queries of the per-query ms;
- bytes_per_item: bytes a query reads per gallery item in the pass over all N items;
- r1, r10: percent of queries whose true image is first / in the top 10;
- agree10: mean overlap (0..1) of the top 10 with exact full-dim search (when `exact` runs too; the
  `exact` row is that reference and carries none).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import platform
import resource
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hivlp import DEFAULT_LEVELS
from hivlp.bench.measure import TOP_K, quality, time_batches, time_single
from hivlp.errors import UsageError
from hivlp.io import atomic_write_bytes, atomic_write_json
from hivlp.retrieval.inmemory import (
    CoarseToFineEngine,
    ExactEngine,
    InMemoryEngine,
    l2_normalize,
    set_threads,
)

log = logging.getLogger(__name__)

METHODS = ("exact", "faiss_flat", "c2f_fp32", "c2f_int8", "c2f_binary")
DEFAULT_SIZES = (1_000, 10_000, 100_000, 1_000_000)
MILVUS_SIZE = 100_000
DISTRACTORS = (
    "Gaussian: mean and full covariance of the real (unnormalised) image embeddings used to fit "
    "it (Flickr8k train + val images when encoded from a checkpoint), ridge 1e-6 x mean variance; "
    "sampled in chunks, then L2-normalised like every gallery row. The real val images sit at "
    "random rows of the gallery."
)


# ------------------------------------------------------------------------------------------ inputs


@dataclass
class BenchEmbeddings:
    """Full-dim embeddings the bench starts from (unnormalised, float32).

    `image`/`text`/`text_to_image`: the query split (its images are the true targets);
    `extra_image`: more real images, used only to fit the distractor distribution.
    """

    image: np.ndarray
    text: np.ndarray
    text_to_image: np.ndarray
    extra_image: np.ndarray
    levels: list[int]
    source: str

    def save(self, path: str | Path) -> None:
        buf = io.BytesIO()
        np.savez(
            buf, image=self.image, text=self.text, text_to_image=self.text_to_image,
            extra_image=self.extra_image, levels=np.asarray(self.levels), source=np.asarray(self.source),
        )
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> BenchEmbeddings:
        """Read an .npz with `image`, `text`, `text_to_image` and optional `extra_image`, `levels`."""
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"{p}: embeddings file not found")
        try:
            z = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UsageError(f"{p}: not a readable .npz file ({e})") from None
        missing = [key for key in ("image", "text", "text_to_image") if key not in z.files]
        if missing:
            raise UsageError(
                f"{p}: missing arrays {missing}; the file needs image [N, D], text [M, D] and "
                "text_to_image [M] (optional: extra_image [E, D], levels)"
            )
        try:
            image = z["image"].astype(np.float32)
            extra = z["extra_image"].astype(np.float32) if "extra_image" in z.files else image[:0]
            emb = cls(
                image=image,
                text=z["text"].astype(np.float32),
                text_to_image=z["text_to_image"].astype(np.int64),
                extra_image=extra,
                levels=[int(d) for d in z["levels"]] if "levels" in z.files else _default_levels(image.shape[-1]),
                source=str(z["source"]) if "source" in z.files else f"embeddings file {p}",
            )
        except (ValueError, TypeError, OSError) as e:  # object (pickled) or non-numeric arrays, damaged members
            raise UsageError(f"{p}: arrays not readable as numbers ({' '.join(str(e).split())})") from None
        emb.check(str(p))
        return emb

    def check(self, where: str) -> None:
        dims = {a.shape[1] for a in (self.image, self.text) if a.ndim == 2}
        if self.image.ndim != 2 or self.text.ndim != 2 or len(dims) != 1:
            raise UsageError(f"{where}: image {self.image.shape} and text {self.text.shape} must be [n, D], same D")
        if len(self.extra_image) and self.extra_image.shape[1] != self.image.shape[1]:
            raise UsageError(f"{where}: extra_image is {self.extra_image.shape[1]}-d, image {self.image.shape[1]}-d")
        if self.text_to_image.shape != (len(self.text),):
            raise UsageError(
                f"{where}: text_to_image has shape {self.text_to_image.shape}, expected ({len(self.text)},)"
            )
        if len(self.text) and (self.text_to_image.min() < 0 or self.text_to_image.max() >= len(self.image)):
            raise UsageError(f"{where}: text_to_image holds indices outside [0, {len(self.image)})")


def _default_levels(dim: int) -> list[int]:
    return [d for d in DEFAULT_LEVELS if d < dim] + [dim]


def synthetic_embeddings(
    n_images: int = 1000,
    captions_per_image: int = 5,
    dim: int = 512,
    n_extra_images: int = 2000,
    caption_noise: float = 2.2,
    seed: int = 0,
) -> BenchEmbeddings:
    """A structured stand-in for model embeddings, for development and tests (never for results).

    Images: one of 50 topic centres plus an own component; captions: their image plus caption noise
    plus a modality offset. The image signal decays over dimensions as (1 + j)^-0.6 and the noise as
    (1 + j)^-0.4, so early dimensions carry the most signal, as in nested training, and recall
    grows with the level as it does for the model.
    """
    rng = np.random.default_rng(seed)
    rank = 1.0 + np.arange(dim)
    scale, noise_scale = rank**-0.6, caption_noise * rank**-0.4
    topics = rng.standard_normal((50, dim)) * scale
    offset_img, offset_txt = (0.5 * rng.standard_normal((2, dim))) * scale

    def images(n: int) -> np.ndarray:
        return topics[rng.integers(0, len(topics), n)] + rng.standard_normal((n, dim)) * scale + offset_img

    image = images(n_images)
    t2i = np.repeat(np.arange(n_images), captions_per_image)
    text = image[t2i] - offset_img + offset_txt + rng.standard_normal((len(t2i), dim)) * noise_scale
    return BenchEmbeddings(
        image=image.astype(np.float32),
        text=text.astype(np.float32),
        text_to_image=t2i,
        extra_image=images(n_extra_images).astype(np.float32),
        levels=_default_levels(dim),
        source=f"synthetic (seed {seed}; development only)",
    )


def encode_embeddings(
    checkpoint: str | Path,
    dataset: str | Path,
    image_root: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    fit_train: bool = True,
    cache_dir: str | Path = "outputs/cache/bench",
    progress: bool = True,
    allow_outside_root: bool = False,
) -> BenchEmbeddings:
    """Encode val images + captions (and train images, to fit the distractors) with a checkpoint.

    The result is cached under `cache_dir`, keyed by the weights' sha256, the dataset file, every
    image file it encodes (path, size, mtime: an image replaced in place is encoded again) and
    `fit_train`, so re-running the bench does not re-encode.
    """
    from hivlp.data.images import files_fingerprint
    from hivlp.data.karpathy import load_split
    from hivlp.model.checkpoint import checkpoint_sha256

    ckpt, data = Path(checkpoint), Path(dataset)
    weights_sha = checkpoint_sha256(ckpt)
    if not data.is_file():
        raise UsageError(f"{data}: dataset file not found (pass --dataset PATH to a Karpathy-format JSON)")
    val = load_split(data, "val", image_root, allow_outside_root=allow_outside_root)
    train = load_split(data, "train", image_root, allow_outside_root=allow_outside_root) if fit_train else None
    stat = data.stat()
    images = files_fingerprint(val.image_paths + (train.image_paths if train else []))
    key_text = f"{weights_sha}|{data.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{image_root}|{fit_train}|{images}"
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"embeddings-{key}.npz"
    if cache.is_file():
        log.info("using cached embeddings %s", cache)
        return BenchEmbeddings.load(cache)

    from hivlp.model.encode import load_encoder

    encoder = load_encoder(ckpt, device=device)
    image, text = encoder.split(val, batch_size=batch_size, progress=progress)
    extra = image[:0]
    if train is not None:
        extra = encoder.images(train.image_paths, batch_size=batch_size, progress=progress)
    emb = BenchEmbeddings(
        image=image, text=text, text_to_image=val.text_to_image, extra_image=extra,
        levels=encoder.levels,
        source=f"checkpoint {ckpt} (weights sha256 {weights_sha[:12]}), {data.name} val captions",
    )
    emb.save(cache)
    return emb


# ------------------------------------------------------------------------------------ the gallery


class GaussianDistractors:
    """Samples from N(mean, cov) of real image embeddings (see DISTRACTORS)."""

    def __init__(self, images: np.ndarray) -> None:
        x = np.asarray(images, dtype=np.float64)
        if len(x) < 2:
            raise UsageError("fitting distractors needs at least 2 real image embeddings")
        self.mean = x.mean(axis=0)
        cov = np.cov(x, rowvar=False)
        ridge = 1e-6 * float(np.trace(cov)) / len(cov)
        self.chol = np.linalg.cholesky(cov + ridge * np.eye(len(cov))).astype(np.float32)
        self.n_fit = len(x)

    def sample_into(self, out: np.ndarray, rng: np.random.Generator, chunk: int = 1 << 16) -> None:
        """Fill `out` [n, D] in chunks (so a 1M x 512 gallery never needs a second 2 GB buffer)."""
        mean = self.mean.astype(np.float32)
        for a in range(0, len(out), chunk):
            z = rng.standard_normal((min(chunk, len(out) - a), out.shape[1]), dtype=np.float32)
            np.matmul(z, self.chol.T, out=out[a : a + len(z)])
            out[a : a + len(z)] += mean


def build_gallery(
    real: np.ndarray, n: int, distractors: GaussianDistractors, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(normalised gallery [n, D] float32, gallery row of each real image [len(real)])."""
    if n < len(real):
        raise UsageError(f"gallery size {n} is smaller than the {len(real)} real images it must hold")
    rng = np.random.default_rng(seed)
    gallery = np.empty((n, real.shape[1]), dtype=np.float32)
    distractors.sample_into(gallery, rng)
    rows = np.sort(rng.choice(n, size=len(real), replace=False))
    gallery[rows] = real
    l2_normalize(gallery, out=gallery)
    return gallery, rows


# ------------------------------------------------------------------------------------ the bench


@dataclass
class BenchConfig:
    sizes: Sequence[int] = DEFAULT_SIZES
    methods: Sequence[str] = METHODS
    threads: int = 2
    repeats: int = 20  # single-query searches timed per method and size
    batch: int = 256
    queries: int = 1000  # captions used for recall and batch timing (0 = all)
    shortlist: int = 1000
    coarse_dim: int = 64  # fp32 and int8 codes
    binary_dim: int = 64  # prefix the binary codes are projected from
    binary_bits: int = 256
    binary_shortlist: int = 4000  # Hamming ranks coarsely: a longer list, then ...
    binary_keep: int = 1000  # ... re-scored exactly at binary_dim, keeping this many (0: no funnel)
    level_shortlist: int = 50  # coarse-to-fine shortlist in the per-level evaluation of the val split
    milvus: bool = True
    milvus_queries: int = 200  # Milvus Lite searches are slow (gRPC, fetch by id): a subset of the queries
    seed: int = 0


def make_engine(method: str, gallery: np.ndarray, cfg: BenchConfig) -> InMemoryEngine:
    """The engine behind a method name, over an already normalised gallery (shared, not copied)."""
    if method == "exact":
        return ExactEngine(gallery, normalized=True, kernel="numpy")
    if method == "faiss_flat":
        return ExactEngine(gallery, normalized=True, kernel="faiss")
    if method.startswith("c2f_"):
        codes = method[4:]
        if codes == "binary":
            funnel = [(cfg.binary_dim, cfg.binary_keep)] if cfg.binary_keep else None
            return CoarseToFineEngine(
                gallery, coarse_dim=cfg.binary_dim, codes=codes, bits=cfg.binary_bits,
                shortlist=cfg.binary_shortlist, funnel=funnel, normalized=True,
            )
        return CoarseToFineEngine(
            gallery, coarse_dim=cfg.coarse_dim, codes=codes, shortlist=cfg.shortlist, normalized=True
        )
    raise UsageError(f"unknown method {method!r}; choose from {list(METHODS)}")


def _select_queries(emb: BenchEmbeddings, n: int, seed: int) -> np.ndarray:
    if n <= 0 or n >= len(emb.text):
        return np.arange(len(emb.text))
    return np.sort(np.random.default_rng(seed).choice(len(emb.text), size=n, replace=False))


def run_retrieval_bench(
    emb: BenchEmbeddings,
    cfg: BenchConfig,
    workdir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every method at every size; returns {"rows", "levels", "config", "machine", ...}."""
    from tqdm.auto import tqdm

    from hivlp.retrieval.evaluate import evaluate_embeddings

    emb.check(emb.source)
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad:
        raise UsageError(f"unknown methods {bad}; choose from {list(METHODS)}")
    methods = [m for m in METHODS if m in cfg.methods]  # exact first: agree10 compares with it
    sizes = sorted({int(n) for n in cfg.sizes})
    if sizes[0] < len(emb.image):
        raise UsageError(f"sizes must be >= {len(emb.image)}, the number of real images every gallery holds")
    set_threads(cfg.threads)
    started = time.time()
    machine = machine_info(cfg.threads)
    result: dict[str, Any] = {"rows": [], "notes": []}
    busy = machine["loadavg_start"][0] + cfg.threads - (machine["cpu_count"] or 1)
    if cfg.threads > 1 and busy > 0.5:
        note = (f"load average {machine['loadavg_start'][0]:.1f} on {machine['cpu_count']} cores: "
                f"{cfg.threads}-thread kernels will wait on descheduled threads; latencies are noisy "
                "(try --threads 1)")
        log.warning(note)
        result["notes"].append(note)

    fit = np.concatenate([emb.image, emb.extra_image]) if len(emb.extra_image) else emb.image
    distractors = GaussianDistractors(fit)
    sel = _select_queries(emb, cfg.queries, cfg.seed)
    queries = np.ascontiguousarray(emb.text[sel])

    t = time.perf_counter()
    result["levels"] = evaluate_embeddings(
        emb.image, emb.text, emb.text_to_image, emb.levels,
        coarse_dim=cfg.coarse_dim, shortlist=cfg.level_shortlist,
    )
    log.info("per-level evaluation of the query split: %.1f s", time.perf_counter() - t)
    if len(emb.extra_image) >= len(emb.image):
        result["distractor_check"] = distractor_check(emb, distractors, queries, sel, cfg.seed)

    bar = tqdm(total=len(sizes) * len(methods), desc="bench", unit="run", disable=not progress)
    for n in sizes:
        t = time.perf_counter()
        gallery, real_rows = build_gallery(emb.image, n, distractors, seed=cfg.seed + n)
        gen_s = time.perf_counter() - t
        true_rows = real_rows[emb.text_to_image[sel]]
        engines, build_s = {}, {}
        for method in methods:
            t = time.perf_counter()
            engines[method] = make_engine(method, gallery, cfg)
            build_s[method] = time.perf_counter() - t
        single = time_single(engines, queries, cfg.repeats)
        exact_top = None
        for method, engine in engines.items():
            bar.set_postfix_str(f"n={n} {method}")
            ms_batch, rows = time_batches(engine, queries, cfg.batch)
            if method == "exact":
                exact_top = rows
            row = {
                "method": method, "n": n, "ms_single_p50": float(np.median(single[method])),
                "ms_single_p90": float(np.percentile(single[method], 90)), "ms_batch_p50": ms_batch,
                "bytes_per_item": engine.bytes_per_item,
                **quality(rows, true_rows, None if method == "exact" else exact_top),
                "build_s": build_s[method],
                "gallery_s": gen_s, "n_queries": len(queries), "memory_mb": engine.memory_bytes() / 2**20,
            }
            if isinstance(engine, CoarseToFineEngine):
                row.update(coarse_dim=engine.coarse_dim, shortlist=engine.shortlist)
                if engine.bits is not None:
                    row["bits"] = engine.bits
                if engine.funnel:
                    row["funnel"] = engine.funnel
            result["rows"].append(row)
            log.info("n=%d %s: %.2f ms single, %.3f ms batched, R@10 %.1f",
                     n, method, row["ms_single_p50"], ms_batch, row["r10"])
            bar.update()
        del engines
        if cfg.milvus and n == MILVUS_SIZE:
            m = min(cfg.milvus_queries, len(queries))
            exact_m = exact_top[:m] if exact_top is not None else None
            result["rows"] += _milvus_rows(gallery, queries[:m], true_rows[:m], exact_m, cfg, workdir, result["notes"])
        del gallery
    bar.close()

    machine["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    machine["loadavg_end"] = os.getloadavg()
    result["config"] = {
        **asdict(cfg), "sizes": sizes, "methods": methods, "n_queries": len(sel), "top_k": TOP_K,
        "source": emb.source, "levels_evaluated": emb.levels,
        "distractor_fit_images": distractors.n_fit, "seconds": time.time() - started,
    }
    result["machine"] = machine
    result["distractors"] = DISTRACTORS
    return result


def _milvus_rows(
    gallery: np.ndarray, queries: np.ndarray, true_rows: np.ndarray, exact_top: np.ndarray | None,
    cfg: BenchConfig, workdir: str | Path | None, notes: list[str],
) -> list[dict[str, Any]]:
    """Rows from the Milvus Lite backend (`hivlp.bench.milvus`); a failure is noted, not fatal."""
    from hivlp.bench.milvus import milvus_rows

    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir, prefix="milvus-bench-") as tmp:
        try:
            rows = milvus_rows(gallery, queries, true_rows, exact_top, cfg.coarse_dim, cfg.shortlist, tmp,
                               repeats=cfg.repeats, batch=cfg.batch)
        except Exception as e:  # noqa: BLE001 - minutes of other results must still be written
            log.warning("milvus rows failed: %s", e)
            notes.append(f"milvus rows failed: {type(e).__name__}: {e}")
            return []
    return [{**row, "n_queries": len(queries)} for row in rows]


def distractor_check(
    emb: BenchEmbeddings, distractors: GaussianDistractors, queries: np.ndarray, sel: np.ndarray, seed: int
) -> dict[str, Any]:
    """Exact R@1/R@10 with the real extra images as distractors vs as many Gaussian ones.

    Tells how much harder or easier the synthetic clutter is than real images at the same N.
    """
    real = np.concatenate([emb.image, emb.extra_image])
    fake = np.empty_like(emb.extra_image)
    distractors.sample_into(fake, np.random.default_rng(seed))
    true_rows = emb.text_to_image[sel]
    out: dict[str, Any] = {"n": len(real)}
    for label, gallery in (("real_images", real), ("gaussian", np.concatenate([emb.image, fake]))):
        rows = ExactEngine(gallery).search(queries, TOP_K).ids
        out[label] = quality(rows, true_rows, None)
    return out


def machine_info(threads: int) -> dict[str, Any]:
    import faiss
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "memory_gb": psutil.virtual_memory().total / 2**30,
        "loadavg_start": os.getloadavg(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "platform": platform.platform(),
    }


# ------------------------------------------------------------------------------------ output


def write_results(result: dict[str, Any], out: str | Path) -> list[Path]:
    """The JSON at `out` and PNG plots beside it (`<stem>_latency.png`, `_recall.png`, `_levels.png`)."""
    out = Path(out)
    atomic_write_json(out, result)
    written = [out]
    for suffix, plot in (("latency", plot_latency), ("recall", plot_recall), ("levels", plot_levels)):
        path = out.with_name(f"{out.stem}_{suffix}.png")
        _save_figure(plot(result), path)
        written.append(path)
    return written


def _save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _by_method(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["method"], []).append(r)
    return {m: sorted(rs, key=lambda r: r["n"]) for m, rs in out.items()}


def _figure() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.5))


def plot_latency(result: dict[str, Any]) -> Any:
    """Latency vs gallery size, log-log: solid = one query per call, dashed = batched, per query."""
    fig, ax = _figure()
    for i, (method, rows) in enumerate(_by_method(result["rows"]).items()):
        n = [r["n"] for r in rows]
        color = f"C{i}"
        ax.plot(n, [r["ms_single_p50"] for r in rows], "o-", color=color, label=method)
        ax.plot(n, [r["ms_batch_p50"] for r in rows], "x--", color=color, alpha=0.6)
    ax.set(xscale="log", yscale="log", xlabel="gallery size N", ylabel="ms per query",
           title=f"Search latency ({result['config']['threads']} threads; solid single, dashed batched)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_recall(result: dict[str, Any]) -> Any:
    """True-image R@10 vs gallery size per method."""
    fig, ax = _figure()
    for method, rows in _by_method(result["rows"]).items():
        ax.plot([r["n"] for r in rows], [r["r10"] for r in rows], "o-", label=method)
    ax.set(xscale="log", xlabel="gallery size N", ylabel="R@10 (%)", title="True-image R@10 vs distractors")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_levels(result: dict[str, Any]) -> Any:
    """AR (r_mean) vs level dimension on the query split, with the coarse-to-fine result."""
    levels = result["levels"]
    dims = sorted(int(k[4:]) for k in levels if k.startswith("dim_"))
    fig, ax = _figure()
    ax.plot(dims, [levels[f"dim_{d}"]["r_mean"] for d in dims], "o-", label="single level")
    c2f = levels["coarse_to_fine"]
    ax.axhline(c2f["r_mean"], color="C1", linestyle="--",
               label=f"coarse-to-fine {c2f['coarse_dim']}->{dims[-1]} (K={c2f['shortlist']}, {c2f['codes']})")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="embedding dims (prefix)", ylabel="AR = mean R@1/5/10 both ways (%)",
           title=f"Recall by nested level ({levels['counts']['images']} images)")
    ax.set_xticks(dims, [str(d) for d in dims])
    ax.minorticks_off()
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def format_rows(result: dict[str, Any]) -> str:
    """A plain-text table of the rows, for the terminal."""
    head = (f"{'method':<12} {'n':>9} {'ms_single':>10} {'ms_batch':>9} {'bytes/it':>9} "
            f"{'R@1':>6} {'R@10':>6} {'agree10':>8}")
    lines = [head]
    for r in result["rows"]:
        agree = r.get("agree10")
        lines.append(
            f"{r['method']:<12} {r['n']:>9} {r['ms_single_p50']:>10.3f} {r['ms_batch_p50']:>9.3f} "
            f"{r['bytes_per_item']:>9.1f} {r['r1']:>6.1f} {r['r10']:>6.1f} "
            + (f"{agree:>8.3f}" if agree is not None else f"{'-':>8}")
        )
    return "\n".join(lines)
