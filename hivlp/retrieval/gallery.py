"""Sample queries over an export: a few captions of the split, their top images, as a page a person
can look at (the Kubeflow run page shows it for the export step).

The queries are captions of the exported split itself, one per image at evenly spaced images (the
same ones every time for the same export), so each has a known right answer: the image it describes,
marked on the page with its rank. Search is exact cosine at the chosen level over the export's image
embeddings, the reference that every engine (in memory or Milvus) is held to; no model is loaded,
because the export already holds the captions' embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hivlp.data.karpathy import image_path, image_root_for, read_json
from hivlp.embeddings.format import batch_embeddings, load_embeddings, read_manifest
from hivlp.errors import UsageError
from hivlp.retrieval.inmemory import ExactEngine


@dataclass(frozen=True)
class SampleQuery:
    caption: str
    sentid: int
    true_imgid: int
    hits: list[tuple[int, str, float]]  # (imgid, filename, cosine score), best first

    @property
    def true_rank(self) -> int | None:
        """1-based rank of the described image among the hits, None if it is not in them."""
        return next((i + 1 for i, (imgid, _, _) in enumerate(self.hits) if imgid == self.true_imgid), None)


def sample_queries(export_dir: str | Path, n_queries: int = 6, k: int = 5, level: int | None = None) -> list[SampleQuery]:
    """Search the export's images with `n_queries` of its own captions; top `k` each, at `level` dims
    (None: full)."""
    if n_queries < 1 or k < 1:
        raise UsageError(f"n_queries and k must be >= 1, got {n_queries} and {k}")
    table = load_embeddings(export_dir)
    kind = np.asarray(table.column("kind").to_pylist())
    emb = batch_embeddings(table)
    imgids = np.asarray(table.column("imgid").to_pylist(), dtype=np.int64)
    filenames = table.column("filename").to_pylist()
    is_img = kind == "image"
    if not is_img.any() or is_img.all():
        raise UsageError(f"{export_dir}: the export needs both image and caption rows for sample queries")
    dim = emb.shape[1]
    d = level or dim
    if not 1 <= d <= dim:
        raise UsageError(f"level {level} does not fit {dim}-d embeddings")
    img_rows = np.flatnonzero(is_img)
    engine = ExactEngine(emb[img_rows, :d], ids=imgids[img_rows])
    name_of = {int(imgids[r]): filenames[r] for r in img_rows}

    # One caption per image, at evenly spaced images (in export order), first caption of each.
    txt_rows = np.flatnonzero(~is_img)
    first_caption: dict[int, int] = {}
    for r in txt_rows:
        first_caption.setdefault(int(imgids[r]), int(r))
    order = [int(imgids[r]) for r in img_rows if int(imgids[r]) in first_caption]
    picks = [order[i] for i in np.linspace(0, len(order) - 1, min(n_queries, len(order))).round().astype(int)]
    rows = [first_caption[i] for i in dict.fromkeys(picks)]
    result = engine.search(emb[rows, :d], k=k)
    captions = table.column("caption").to_pylist()
    sentids = table.column("sentid").to_pylist()
    return [
        SampleQuery(
            caption=str(captions[r]), sentid=int(sentids[r]), true_imgid=int(imgids[r]),
            hits=[(int(i), name_of[int(i)], float(s)) for i, s in zip(result.ids[q], result.scores[q])],
        )
        for q, r in enumerate(rows)
    ]


def sample_queries_page(
    export_dir: str | Path,
    dataset_json: str | Path,
    image_root: str | Path | None = None,
    n_queries: int = 6,
    k: int = 5,
    level: int | None = None,
) -> str:
    """The sample queries as a standalone HTML page, top hits as embedded thumbnails (the images are
    read from the dataset the export was made from)."""
    from hivlp.pages import esc, html_page, thumbnail_data_uri

    manifest = read_manifest(export_dir)
    queries = sample_queries(export_dir, n_queries=n_queries, k=k, level=level)
    data = read_json(dataset_json)
    root = image_root_for(dataset_json, image_root)
    entry_of = {int(e["imgid"]): e for e in data["images"]}
    d = level or manifest["dim"]
    found = sum(q.true_rank is not None for q in queries)
    thumbs: dict[int, str] = {}  # an image in several queries' hits is encoded once
    parts = [
        f"<p>Export of split <b>{esc(manifest['split'])}</b>: {manifest['counts']['image']} images, "
        f"{manifest['counts']['text']} captions, {manifest['dim']}-d; checkpoint weights sha256 "
        f"<code>{esc(manifest['weights_sha256'][:16])}</code>.</p>",
        f"<p>{len(queries)} captions of the split as queries, exact cosine search at {d} dims over its "
        f"images; the image each caption describes is framed in green. Found in the top {k}: "
        f"<b>{found} of {len(queries)}</b>.</p>",
    ]
    for q in queries:
        rank = f"rank {q.true_rank}" if q.true_rank else f'<span class="bad">not in the top {k}</span>'
        parts.append(f"<h2>&ldquo;{esc(q.caption)}&rdquo;</h2><p class=\"muted\">sentid {q.sentid}; "
                     f"described image {esc(entry_of[q.true_imgid]['filename'] if q.true_imgid in entry_of else q.true_imgid)}: "
                     f"{rank}</p><div>")
        for pos, (imgid, filename, score) in enumerate(q.hits, 1):
            if imgid not in entry_of:
                raise UsageError(f"{dataset_json}: no image with imgid {imgid} ({filename}); is it the dataset "
                                 "the export was made from?")
            if imgid not in thumbs:
                thumbs[imgid] = thumbnail_data_uri(image_path(root, entry_of[imgid]))
            uri = thumbs[imgid]
            cls = ' class="hit"' if imgid == q.true_imgid else ""
            parts.append(f'<figure{cls}><img src="{uri}" alt="{esc(filename)}">'
                         f"<figcaption>{pos}. {esc(filename)}<br>cos {score:.3f}</figcaption></figure>")
        parts.append("</div>")
    return html_page("Sample queries", "\n".join(parts))
