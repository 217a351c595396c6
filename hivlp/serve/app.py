"""`hivlp serve`: a FastAPI app over one index and one query encoder, both loaded once.

The app is a face: every query goes through `hivlp.retrieval.search.search`, the function behind
`hivlp search`, over a Milvus index (`MilvusDualIndex`: the one `hivlp index` built, Lite or server) or
an export folder searched in memory (`ExportIndex`). Thumbnails come from the dataset images the
export's manifest points to (`hivlp.serve.thumbnails`).

    GET  /api/search?text=...&k=10[&level=fine|coarse][&shortlist=100]   caption -> images
    POST /api/search  (multipart: image=<file> | text=<caption>, k, level, shortlist)   image -> captions
    GET  /thumbs/{id}  a small JPEG of an index item's image (a caption's id shows its image)
    GET  /healthz      the model and the index (name, rows, dims)
    GET  /             the search page;  GET /docs  the OpenAPI docs

Bad input gets one line naming the problem: an empty caption 422, a non-image upload 415, an upload over
the byte or pixel limit (a decompression bomb) 413, an index that cannot answer 503. k and the shortlist
are capped (the response's notes say so); an overlong caption is cut (with a note).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

# FastAPI resolves the endpoints' annotations from this module's globals (postponed annotations).
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from hivlp.data.images import ImageTooLargeError, decode_image_bytes
from hivlp.errors import DatasetError, HivlpError, UsageError
from hivlp.redact import redact
from hivlp.retrieval.search import QueryEncoder, check_level, search
from hivlp.serve.thumbnails import ThumbnailError, Thumbnails

log = logging.getLogger(__name__)

MAX_K = 100
MAX_SHORTLIST = 2000
MAX_UPLOAD_BYTES = 10 * 2**20
MAX_UPLOAD_PIXELS = 40_000_000  # e.g. 8000 x 5000; Pillow's own bomb guard starts at 89 M (warning)
_FORM_SLACK = 64 * 2**10  # multipart headers and the small form fields around an upload


class UploadTooLarge(HivlpError):
    """An upload over the byte or pixel limit (HTTP 413)."""


class NotAnImage(HivlpError):
    """An upload Pillow cannot decode as an image (HTTP 415)."""


def http_status(e: HivlpError) -> int:
    """The HTTP status a library error becomes: the client's mistake (4xx) or the index's (503)."""
    if isinstance(e, UploadTooLarge):
        return 413
    if isinstance(e, NotAnImage):
        return 415
    if isinstance(e, ThumbnailError):
        return e.status
    if isinstance(e, UsageError):
        return 422
    return 503  # the index or model cannot answer (Milvus down, index incomplete, ...)


@dataclass
class Limits:
    """What one request may ask of the server."""

    max_k: int = MAX_K
    max_shortlist: int = MAX_SHORTLIST
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_upload_pixels: int = MAX_UPLOAD_PIXELS


class SearchService:
    """One index, one encoder and the dataset's thumbnails, shared by all requests (thread-safe: the
    encoder serialises its own calls; the indexes only read)."""

    def __init__(self, index: Any, encoder: QueryEncoder, thumbnails: Thumbnails, backend: str,
                 limits: Limits | None = None) -> None:
        self.index = index
        self.encoder = encoder
        self.thumbnails = thumbnails
        self.backend = backend
        self.limits = limits or Limits()
        self.info = index.info()  # fails fast: a missing or incomplete index never starts a server

    def health(self) -> dict[str, Any]:
        info = self.info
        return {
            "status": "ok",
            "model": {"source": redact(self.encoder.source), "weights_sha256": self.encoder.weights_sha256,
                      "dim": getattr(self.encoder, "dim", info.dim)},
            "index": {"name": info.name, "uri": redact(info.uri), "backend": self.backend,
                      "index_type": info.index_type, "rows": dict(info.expected), "dim": info.dim,
                      "coarse_dim": info.coarse_dim, "weights_sha256": info.weights_sha256},
            "thumbnails": {"dataset": str(self.thumbnails.dataset), "image_root": str(self.thumbnails.image_root),
                           "images": len(self.thumbnails), "size": self.thumbnails.size},
            "limits": {"max_k": self.limits.max_k, "max_shortlist": self.limits.max_shortlist,
                       "max_upload_bytes": self.limits.max_upload_bytes,
                       "max_upload_pixels": self.limits.max_upload_pixels},
        }

    def _search(self, **query: Any) -> dict[str, Any]:
        response = search(self.index, self.encoder, max_k=self.limits.max_k,
                          max_shortlist=self.limits.max_shortlist, **query)
        out = response.to_dict()
        for hit in out["hits"]:
            hit["thumbnail"] = f"/thumbs/{hit['id']}"
            if hit["caption"] is None and hit["imgid"] is not None:  # an image hit: its first reference caption
                hit["caption"] = self.thumbnails.caption(hit["imgid"])
        return out

    def search_text(self, text: str, k: int = 10, shortlist: int = 100, level: str = "fine") -> dict[str, Any]:
        return self._search(text=text, k=k, shortlist=shortlist, level=check_level(level))

    def search_image(self, data: bytes, filename: str | None, k: int = 10, shortlist: int = 100,
                     level: str = "fine") -> dict[str, Any]:
        """Search captions with uploaded image bytes, checked before anything is decoded or written."""
        check_level(level)
        what = f"upload {filename!r}" if filename else "upload"
        if len(data) > self.limits.max_upload_bytes:  # `data` may be cut at limit + 1 bytes by the reader
            raise UploadTooLarge(
                f"{what}: over the upload limit of {self.limits.max_upload_bytes:,} bytes; send a smaller image"
            )
        if not data:
            raise NotAnImage(f"{what}: the file is empty; send a JPEG, PNG or WebP image")
        try:
            decode_image_bytes(data, what, self.limits.max_upload_pixels)
        except ImageTooLargeError as e:
            raise UploadTooLarge(str(e)) from None
        except DatasetError as e:
            raise NotAnImage(str(e)) from None
        fd, tmp = tempfile.mkstemp(prefix="hivlp-upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            out = self._search(image=tmp, k=k, shortlist=shortlist, level=level)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        out["query"]["image"] = filename or "upload"  # never the server's temporary path
        return out

    def thumbnail(self, item_id: int) -> bytes:
        """The JPEG of an index item's image (an image id, or a caption id: its image)."""
        meta = self.index.describe([item_id]).get(int(item_id))
        if meta is None or meta.get("imgid") is None:
            raise ThumbnailError(f"no item with id {item_id} in index {self.info.name!r}")
        return self.thumbnails.jpeg(int(meta["imgid"]))

    def close(self) -> None:
        close = getattr(self.index, "close", None)
        if close is not None:
            close()


def open_service(
    *,
    uri: str | None = None,
    name: str = "hivlp",
    embeddings: str | Path | None = None,
    checkpoint: str | Path | None = None,
    model_uri: str | None = None,
    dataset: str | Path | None = None,
    image_root: str | Path | None = None,
    coarse_dim: int = 64,
    device: str = "cpu",
    limits: Limits | None = None,
) -> SearchService:
    """Load the index, then the model (once), then the thumbnails' dataset.

    The index: the Milvus one at `uri`/`name` when `uri` is given, else the export folder `embeddings`
    in memory (`coarse_dim` prefix). Thumbnails: `dataset` if given, else the dataset the export's
    manifest names; images under `image_root` (default: the dataset JSON's folder).
    """
    from hivlp.embeddings.format import manifest_digest, read_manifest
    from hivlp.retrieval.search import query_encoder

    if uri is None and embeddings is None:
        raise UsageError("give an index: --uri (a Milvus index built by `hivlp index`) or --embeddings (an export folder)")
    manifest = read_manifest(embeddings) if embeddings is not None else None
    if dataset is None:
        if manifest is None:
            raise UsageError("thumbnails need the dataset: pass --embeddings (the export the index was built "
                             "from; its manifest names the dataset) or --dataset JSON")
        dataset = manifest["dataset"]
    if uri is not None:
        from hivlp.retrieval.milvus import MilvusDualIndex

        index: Any = MilvusDualIndex(uri, name)
        backend = "milvus"
    else:
        from hivlp.retrieval.export_index import ExportIndex

        index = ExportIndex(embeddings, coarse_dim=coarse_dim, name=name)
        backend = "in-memory"
    try:
        info = index.info()
        if manifest is not None and uri is not None and manifest_digest(manifest) != info.digest:
            log.warning("index %r was not built from the export %s (other rows); thumbnails and captions "
                        "may not match the hits", info.name, embeddings)
        thumbnails = Thumbnails(dataset, image_root)
        encoder = query_encoder(None if model_uri else checkpoint, model_uri, device)
        return SearchService(index, encoder, thumbnails, backend, limits)
    except BaseException:
        close = getattr(index, "close", None)
        if close is not None:
            close()
        raise


def _static_dir() -> Path:
    return Path(str(resources.files("hivlp.serve") / "static"))


def create_app(service: SearchService) -> Any:
    """The FastAPI app over a loaded service."""
    from hivlp import __version__

    app = FastAPI(
        title="hivlp search",
        version=__version__,
        description="Image-text search with hierarchical embeddings: a caption finds images, an image finds "
                    "captions; coarse-to-fine (a low-dim shortlist re-ranked with the full vectors) or the "
                    "coarse level alone.",
    )
    static = _static_dir()
    app.mount("/static", StaticFiles(directory=static), name="static")
    app.state.service = service

    @app.exception_handler(HivlpError)
    def _hivlp_error(request: Request, e: HivlpError) -> JSONResponse:
        status = http_status(e)
        if status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, redact(e))
        return JSONResponse({"detail": redact(str(e))}, status_code=status)

    @app.middleware("http")
    async def _limit_upload(request: Request, call_next: Any) -> Any:
        """Refuse an upload by its declared length before the body is read."""
        length = request.headers.get("content-length")
        limit = service.limits.max_upload_bytes + _FORM_SLACK
        if request.method == "POST" and length and length.isdigit() and int(length) > limit:
            return JSONResponse(
                {"detail": f"request body of {int(length):,} bytes is over the upload limit of "
                           f"{service.limits.max_upload_bytes:,} bytes; send a smaller image"},
                status_code=413,
            )
        return await call_next(request)

    level_doc = "fine: coarse shortlist re-ranked with the full vectors; coarse: the coarse prefix alone"

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))

    @app.get("/api/search", summary="Search images with a caption")
    def api_search(
        text: str = Query("", description="the caption to search images for"),
        k: int = Query(10, description=f"results (capped at {service.limits.max_k} and at the rows searched)"),
        shortlist: int = Query(100, description="coarse candidates re-ranked (capped)"),
        level: str = Query("fine", description=level_doc),
    ) -> dict[str, Any]:
        return service.search_text(text, k=k, shortlist=shortlist, level=level)

    @app.post("/api/search", summary="Search captions with an uploaded image (or images with a caption)")
    def api_search_post(
        image: UploadFile | None = File(None, description="an image file (JPEG, PNG, WebP)"),
        text: str | None = Form(None, description="a caption, instead of an image"),
        k: int = Form(10),
        shortlist: int = Form(100),
        level: str = Form("fine", description=level_doc),
    ) -> dict[str, Any]:
        if (image is None) == (text is None):
            raise UsageError("send exactly one query: an image file (field 'image') or a caption (field 'text')")
        if text is not None:
            return service.search_text(text, k=k, shortlist=shortlist, level=level)
        data = image.file.read(service.limits.max_upload_bytes + 1)
        return service.search_image(data, image.filename, k=k, shortlist=shortlist, level=level)

    @app.get("/thumbs/{item_id}", summary="A small JPEG of an item's image",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    def thumbs(item_id: int) -> Response:
        return Response(service.thumbnail(item_id), media_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/healthz", summary="The model and the index")
    def healthz() -> dict[str, Any]:
        return service.health()

    return app


def serve(service: SearchService, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app under uvicorn until interrupted (one process: the model is loaded once)."""
    import uvicorn

    config = uvicorn.Config(create_app(service), host=host, port=port, log_level=log_level,
                            access_log=log_level == "debug")
    server = uvicorn.Server(config)
    log.info("serving index %r (%s, %s) on http://%s:%d", service.info.name, service.backend,
             redact(service.info.uri), host, port)
    server.run()
