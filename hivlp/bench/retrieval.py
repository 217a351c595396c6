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

ANN peers (`hivlp.retrieval.ann`): FAISS IVF-Flat and HNSW over the full vectors (`ivf_full`,
`hnsw_full`) and over the 64-d prefix with a full-vector re-rank (`ivf_c2f`, `hnsw_c2f`), each tuned
per size on held-out captions (not the measured queries) to the first nprobe / efSearch whose top-10
agreement with exact search reaches `target_agreement`; the hierarchical ones first get the shortest
shortlist whose exact-prefix ceiling reaches the target plus a margin. `c2f_binary`'s Hamming
shortlist is tuned the same way (`binary_shortlist` 0, the default): the shortest K on the ladder whose
agreement reaches the target, since binary codes need a list that grows with N. HNSW is skipped at a size
whose build, extrapolated from the previous size, would exceed `hnsw_build_limit_s`.
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
from hivlp.retrieval.ann import AnnEngine, choose_shortlist, coarse_ceiling, tune
from hivlp.retrieval.inmemory import (
    CoarseToFineEngine,
    ExactEngine,
    InMemoryEngine,
    l2_normalize,
    set_threads,
)

log = logging.getLogger(__name__)

FLAT_METHODS = ("exact", "faiss_flat", "c2f_fp32", "c2f_int8", "c2f_binary")
ANN_METHODS = ("ivf_full", "ivf_c2f", "hnsw_full", "hnsw_c2f")
METHODS = FLAT_METHODS + ANN_METHODS
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
    binary_shortlist: int = 0  # Hamming ranks coarsely: a long list (0 = tuned like nprobe, to target_agreement) ...
    binary_keep: int = 1000  # ... re-scored exactly at binary_dim, keeping this many (0: no funnel)
    level_shortlist: int = 50  # coarse-to-fine shortlist in the per-level evaluation of the val split
    milvus: bool = True
    milvus_queries: int = 200  # Milvus Lite searches are slow (gRPC, fetch by id): a subset of the queries
    seed: int = 0
    # ANN peers
    target_agreement: float = 0.99  # nprobe / efSearch are raised until top-10 agreement reaches this
    tune_queries: int = 500  # held-out captions (not among the measured queries) the tuner uses
    ann_shortlist: int = 0  # re-rank list of the hierarchical indexes; 0 = shortest reaching the target
    nlist: int = 0  # IVF lists; 0 = about 4 sqrt(N)
    hnsw_m: int = 32
    ef_construction: int = 40
    hnsw_build_limit_s: float = 600.0  # skip HNSW at sizes whose extrapolated build exceeds this


def make_engine(method: str, gallery: np.ndarray, cfg: BenchConfig, ann_shortlist: int | None = None) -> InMemoryEngine:
    """The engine behind a method name, over an already normalised gallery (shared, not copied).
    `ann_shortlist`: re-rank list of the hierarchical ANN methods (default: cfg.ann_shortlist or 200)."""
    if method in ANN_METHODS:
        kind, level = method.split("_")
        return AnnEngine(
            gallery, index=kind, coarse_dim=cfg.coarse_dim if level == "c2f" else None,
            shortlist=ann_shortlist or cfg.ann_shortlist or 200, nlist=cfg.nlist or None, m=cfg.hnsw_m,
            ef_construction=cfg.ef_construction, normalized=True, seed=cfg.seed,
        )
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
                shortlist=cfg.binary_shortlist or cfg.binary_keep or cfg.shortlist, funnel=funnel, normalized=True,
            )
        return CoarseToFineEngine(
            gallery, coarse_dim=cfg.coarse_dim, codes=codes, shortlist=cfg.shortlist, normalized=True
        )
    raise UsageError(f"unknown method {method!r}; choose from {list(METHODS)}")


def _is_tuned(method: str, cfg: BenchConfig) -> bool:
    """Whether the method's knob is tuned per size to `cfg.target_agreement`: the ANN indexes' nprobe /
    efSearch, and c2f_binary's Hamming shortlist unless `binary_shortlist` fixes it."""
    return method in ANN_METHODS or (method == "c2f_binary" and not cfg.binary_shortlist)


def _select_queries(emb: BenchEmbeddings, n: int, seed: int) -> np.ndarray:
    if n <= 0 or n >= len(emb.text):
        return np.arange(len(emb.text))
    return np.sort(np.random.default_rng(seed).choice(len(emb.text), size=n, replace=False))


def _tuning_queries(emb: BenchEmbeddings, sel: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, bool]:
    """(captions the ANN tuner uses, held_out): up to n captions outside the measured ones; when
    every caption is measured, the measured ones themselves (held_out False, noted in the JSON)."""
    rest = np.setdiff1d(np.arange(len(emb.text)), sel)
    if len(rest) == 0:
        return sel[:n], False
    pick = rest if len(rest) <= n else np.random.default_rng(seed + 1).choice(rest, size=n, replace=False)
    return np.sort(pick), True


def run_retrieval_bench(
    emb: BenchEmbeddings,
    cfg: BenchConfig,
    workdir: str | Path | None = None,
    progress: bool = True,
    partial_out: str | Path | None = None,
) -> dict[str, Any]:
    """Run every method at every size; returns {"rows", "levels", "config", "machine", ...}.

    `partial_out`: after each size, the results so far are written there as JSON (`"partial": true`,
    `sizes_done`), so a run stopped at a large N keeps every size it finished."""
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
    ann = [m for m in methods if _is_tuned(m, cfg)]
    if ann:  # methods whose knob is tuned on held-out captions
        tune_sel, held_out = _tuning_queries(emb, sel, cfg.tune_queries, cfg.seed)
        tune_q = l2_normalize(emb.text[tune_sel])
        if not held_out:
            result["notes"].append("every caption is measured: the tuner used the measured queries")
    hnsw_builds: dict[str, tuple[int, float]] = {}  # method -> (n, build seconds) of its last build

    def finish() -> dict[str, Any]:
        machine["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        machine["loadavg_end"] = os.getloadavg()
        result["config"] = {
            **asdict(cfg), "sizes": sizes, "methods": methods, "n_queries": len(sel), "top_k": TOP_K,
            "source": emb.source, "levels_evaluated": emb.levels,
            "distractor_fit_images": distractors.n_fit, "seconds": time.time() - started,
        }
        if ann:
            result["config"]["tune_queries_held_out"] = held_out
        result["machine"] = machine
        result["distractors"] = DISTRACTORS
        result["speedups"] = speedups(result["rows"])
        return result

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
        size_methods = list(methods)
        for method in [m for m in methods if m.startswith("hnsw") and m in hnsw_builds]:
            last_n, last_s = hnsw_builds[method]
            predicted = last_s * n / last_n * np.log(n) / np.log(last_n)  # N log N
            if predicted > cfg.hnsw_build_limit_s:
                size_methods.remove(method)
                note = (f"{method} skipped at N={n}: build extrapolated from {last_s:.0f} s at N={last_n} "
                        f"is {predicted / 60:.0f} min > {cfg.hnsw_build_limit_s / 60:.0f} min")
                log.info(note)
                result["notes"].append(note)
        ann_info: dict[str, Any] = {}
        tuned_methods = [m for m in size_methods if _is_tuned(m, cfg)]
        if tuned_methods:
            t = time.perf_counter()
            tune_exact = ExactEngine(gallery, normalized=True, kernel="faiss").search(tune_q, TOP_K).ids
            ann_info["exact_s"] = time.perf_counter() - t
            if cfg.ann_shortlist:
                ann_info["shortlist"] = cfg.ann_shortlist
            elif any(m.endswith("_c2f") for m in size_methods if m in ANN_METHODS):
                ceiling = coarse_ceiling(gallery, tune_q, tune_exact, cfg.coarse_dim)
                ann_info.update(ceiling=ceiling, shortlist=choose_shortlist(ceiling, cfg.target_agreement))
                log.info("n=%d prefix ceiling %s -> shortlist %d", n, ceiling, ann_info["shortlist"])
        engines, build_s, tuned = {}, {}, {}
        for method in size_methods:
            bar.set_postfix_str(f"n={n} build {method}")
            t = time.perf_counter()
            engines[method] = make_engine(method, gallery, cfg, ann_info.get("shortlist"))
            build_s[method] = time.perf_counter() - t
            if method in tuned_methods:
                if method.startswith("hnsw"):
                    hnsw_builds[method] = (n, build_s[method])
                t = time.perf_counter()
                tuned[method] = tune(engines[method], tune_q, tune_exact, cfg.target_agreement)
                log.info("n=%d %s: build %.1f s, %s=%d reaches agree10 %.4f (tuning %.1f s)", n, method,
                         build_s[method], tuned[method].param, tuned[method].value, tuned[method].agreement,
                         time.perf_counter() - t)
                build_s[method + ":tune"] = time.perf_counter() - t
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
            if method in tuned:
                tu = tuned[method]
                row.update(param=tu.param, param_value=tu.value, tune_agree10=tu.agreement, tune_reached=tu.reached,
                           tune_target=tu.target, tune_s=build_s[method + ":tune"], tune_trace=tu.trace,
                           tune_queries=len(tune_q))
            if isinstance(engine, AnnEngine):
                row.update(index=engine.index_kind, coarse_dim=engine.coarse_dim)
                if engine.hierarchical:
                    row.update(shortlist=engine.shortlist, shortlist_ceiling=ann_info.get("ceiling"))
                if engine.index_kind == "ivf":
                    row["nlist"] = engine.nlist
                else:
                    row.update(hnsw_m=engine.m, ef_construction=engine.ef_construction)
            elif isinstance(engine, CoarseToFineEngine):
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
        if partial_out is not None and n != sizes[-1]:
            done = [s for s in sizes if s <= n]
            atomic_write_json(partial_out, {**finish(), "partial": True, "sizes_done": done})
    bar.close()
    return finish()


def speedups(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per size: how many times faster each method is than its full-dim peer, single and batched:
    every flat coarse-to-fine and hierarchical ANN method vs `faiss_flat`, `ivf_c2f` vs `ivf_full`,
    `hnsw_c2f` vs `hnsw_full` (keys "<method>/<reference>:single|batch"), with both agreements."""
    out: dict[str, dict[str, float]] = {}
    by = {(r["method"], r["n"]): r for r in rows}
    pairs = [(m, "faiss_flat") for m in ("c2f_fp32", "c2f_int8", "c2f_binary", "ivf_c2f", "hnsw_c2f", "ivf_full",
                                         "hnsw_full")]
    pairs += [("ivf_c2f", "ivf_full"), ("hnsw_c2f", "hnsw_full")]
    for n in sorted({r["n"] for r in rows}):
        cell: dict[str, float] = {}
        for fast, ref in pairs:
            a, b = by.get((fast, n)), by.get((ref, n))
            if a is None or b is None:
                continue
            cell[f"{fast}/{ref}:single"] = b["ms_single_p50"] / a["ms_single_p50"]
            cell[f"{fast}/{ref}:batch"] = b["ms_batch_p50"] / a["ms_batch_p50"]
        if cell:
            out[str(n)] = cell
    return out


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
    """The JSON at `out` and PNG plots beside it (`<stem>_latency.png`, `_tradeoff.png`, `_levels.png`)."""
    out = Path(out)
    atomic_write_json(out, result)
    written = [out]
    for suffix, plot in (("latency", plot_latency), ("tradeoff", plot_tradeoff), ("levels", plot_levels)):
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


# One look per method, by family: flat full-dim (greys), flat coarse-to-fine (blues), full-dim ANN
# (reds, dashed), hierarchical ANN (greens), Milvus (purples, dotted). Unknown methods get C0...
_STYLE = {
    "exact": ("0.55", "s", ":"), "faiss_flat": ("black", "s", "-"),
    "c2f_fp32": ("#9ecae1", "o", "-"), "c2f_int8": ("#4292c6", "o", "-"), "c2f_binary": ("#08519c", "o", "-"),
    "ivf_full": ("#ef3b2c", "^", "--"), "hnsw_full": ("#fd8d3c", "v", "--"),
    "ivf_c2f": ("#238b45", "^", "-"), "hnsw_c2f": ("#74c476", "v", "-"),
    "milvus_full": ("#807dba", "D", ":"), "milvus_c2f": ("#54278f", "D", ":"),
}


def _style(method: str, i: int) -> tuple[str, str, str]:
    return _STYLE.get(method, (f"C{i % 10}", "o", "-"))


def _subplots(ncols: int, width: float = 6.0) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, 4.8), squeeze=False)
    return fig, axes[0]


def _figure() -> tuple[Any, Any]:
    fig, axes = _subplots(1, 7)
    return fig, axes[0]


def plot_latency(result: dict[str, Any]) -> Any:
    """ms per query vs gallery size, log-log, one line per method: single queries | batched."""
    fig, axes = _subplots(2)
    groups = _by_method(result["rows"])
    for ax, key, title in ((axes[0], "ms_single_p50", "one query per call"),
                           (axes[1], "ms_batch_p50", f"batches of {result['config'].get('batch', '?')}, per query")):
        for i, (method, rows) in enumerate(groups.items()):
            color, marker, line = _style(method, i)
            ax.plot([r["n"] for r in rows], [r[key] for r in rows], marker=marker, linestyle=line, color=color,
                    label=method, linewidth=1.8, markersize=5)
        ax.set(xscale="log", yscale="log", xlabel="gallery size N", ylabel="ms per query", title=title)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.08))
    fig.suptitle(f"Search latency vs gallery size ({result['config']['threads']} thread(s); ANN tuned to "
                 f"top-10 agreement >= {result['config'].get('target_agreement', 0.99)})")
    return fig


_MISS_FLOOR = 1e-4  # 1 - agreement is drawn on a log axis; exact answers (0 missed) sit on this floor


def plot_tradeoff(result: dict[str, Any]) -> Any:
    """Share of the exact top 10 missed (1 - agreement, log axis, so 0.99 and 0.999 are far apart)
    vs batched ms per query, one panel per large N (the two largest sizes): ANN methods as curves over
    their tuning ladder, the measured rows as big markers (the chosen setting), flat methods as points."""
    sizes = sorted({r["n"] for r in result["rows"]})[-2:]
    fig, axes = _subplots(len(sizes))
    target = result["config"].get("target_agreement", 0.99)

    def miss(agree: float) -> float:
        return max(1.0 - agree, _MISS_FLOOR)

    for ax, n in zip(axes, sizes):
        rows = [r for r in result["rows"] if r["n"] == n]
        for i, r in enumerate(rows):
            color, marker, _ = _style(r["method"], i)
            agree = r.get("agree10", 1.0 if r["method"] == "exact" else None)
            if agree is None:
                continue
            if r.get("tune_trace"):
                trace = r["tune_trace"]
                ax.plot([t["ms"] for t in trace], [miss(t["agree10"]) for t in trace], marker=marker, color=color,
                        linewidth=1.2, markersize=3, alpha=0.8)
            label = f"{r['method']} (R@10 {r['r10']:.1f}"
            label += f", {r['param']} {r['param_value']})" if "param" in r else ")"
            ax.plot([r["ms_batch_p50"]], [miss(agree)], marker=marker, color=color, markersize=10,
                    markeredgecolor="black", linestyle="none", label=label)
        ax.axhline(1 - target, color="0.3", linestyle="--", linewidth=0.8)
        ax.set(xscale="log", yscale="log", xlabel="ms per query (batched)",
               ylabel=f"1 - top-10 agreement with exact (floor {_MISS_FLOOR:g} = exact)", title=f"N = {n:,}",
               ylim=(_MISS_FLOOR / 1.5, 1.0))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    fig.suptitle("Quality vs speed: ANN curves = tuning ladder (nprobe / efSearch), big markers = measured "
                 f"rows, dashed = target agreement {target}")
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
            f"{'R@1':>6} {'R@10':>6} {'agree10':>8}  tuned / build")
    lines = [head]
    for r in result["rows"]:
        agree = r.get("agree10")
        lines.append(
            f"{r['method']:<12} {r['n']:>9} {r['ms_single_p50']:>10.3f} {r['ms_batch_p50']:>9.3f} "
            f"{r['bytes_per_item']:>9.1f} {r['r1']:>6.1f} {r['r10']:>6.1f} "
            + (f"{agree:>8.3f}" if agree is not None else f"{'-':>8}")
            + (f"  {r['param']}={r['param_value']}, K={r.get('shortlist', '-')}, build {r['build_s']:.1f} s"
               if "param" in r else "")
        )
    return "\n".join(lines)
