"""The featuremaps viewer: a FastAPI app made by :func:`create_app`, a thin shell over the library.

A run is captured once (``load_model`` + ``capture``, in a worker thread, one forward pass at a
time per model) and written as a run folder (``runs.save_run``); every picture is then drawn on
demand from the stored maps (``featuremaps.render``) and cached, so browsing channels never runs the
model again.

Endpoints (JSON errors are ``{"detail": "one line for the user"}``)::

    GET  /                                   the page (static/index.html)
    GET  /static/{file}                      the page's own CSS/JS, nothing else
    GET  /api/options                        models, weights, modes, layer choices, reductions,
                                             norms, colormaps, samples, limits
    GET  /api/status                         forward passes so far, loaded models, runs, caches
    POST /api/runs                           multipart: ``image`` (file) or ``sample`` (name);
                                             ``model``, ``weights`` (an allowed choice or
                                             ``checkpoint:KEY``), ``mode``, ``layers``, ``size``
                                             -> 202 {id, state, ...}; the run is a job to poll
    GET  /api/runs                           recent runs, newest first
    GET  /api/runs/{id}                      job state: queued | loading | running | rendering |
                                             done | failed, message, error, timings; from
                                             ``rendering`` on also the model, weights,
                                             ``pretrained`` and every layer (name, kind, shape,
                                             stats)
    GET  /api/runs/{id}/input.png            the picture as the model saw it
    GET  /api/runs/{id}/layers/{i}           one layer's numbers, with per-channel min/max/mean
    GET  /api/runs/{id}/layers/{i}/thumb.png          channel reduction   ?reduce=&norm=&cmap=
    GET  /api/runs/{id}/layers/{i}/grid.png           channel grid        ?norm=&cmap=&page=&per_page=&tile=&top_k=
    GET  /api/runs/{id}/layers/{i}/grid.json          where each channel is in that grid image
    GET  /api/runs/{id}/layers/{i}/channels/{c}.png   one channel         ?norm=&cmap=
    GET  /api/runs/{id}/layers/{i}/channels/{c}.json  its min/max/mean/zeros and colour range
    GET  /api/runs/{id}/layers/{i}/overlay.png        heat map over the input ?channel=&alpha=&reduce=&norm=&cmap=
    GET  /api/runs/{id}/download             the run folder as a zip (``runs.zip_run``): the folder
                                             ``featuremaps show`` writes (pictures, index.html,
                                             manifest.json, raw maps; ``runs.load_run`` reads it)
    GET  /api/runs/{id}/files/{path}         one file of the run folder (manifest.json, overview.png...)
    GET  /api/compare.png?runs=A,B           two (or more) runs side by side, layers matched by depth
    GET  /api/cmaps/{name}.png               a 256x1 strip of a colormap, for the page's scales
    GET  /api/samples/{name}.png             a small preview of a bundled sample image

``reduce``: mean, max, l2, std; ``norm``: map, layer, global or ``fixed:VMIN,VMAX``; ``cmap``: one
of :data:`~featuremaps.web.tiles.CMAPS`.

Status codes: 400 bad parameter, unknown model/weights/sample, an upload that is not a readable
image or is a decompression bomb; 403 a cross-site POST; 404 unknown run, layer, channel or file
(also every path-traversal attempt); 409 the run has no maps (still queued/running, or failed);
413 upload larger than ``max_upload_bytes``; 422 unknown mode or malformed form; 429 too many
runs waiting. A run that fails *inside* the job (pretrained weights not available offline ->
the library's ``WeightsUnavailableError`` message, a mode that does not fit the model, a broken
checkpoint...) ends in state ``failed`` with ``error`` (the one-line message) and ``error_type``;
the page shows it. Never silently random weights.

Limits: uploads over ``max_upload_bytes`` get a 413 (by Content-Length before reading, or while
reading); uploads are decoded with ``load_image`` (``max_image_pixels``) before a job exists;
model names and weights come only from the allow-lists given to :func:`create_app` (a checkpoint
by its key); at most ``max_pending`` runs wait; ``max_cached_models`` models stay loaded; the
maps of recently viewed runs stay in memory up to ``max_loaded_bytes`` and are read back with
``runs.load_run`` otherwise; finished runs beyond ``max_runs`` are deleted, oldest first.

Caching: pictures and per-layer JSON of a run never change, so their URLs carry everything that
decides the content (run id + parameters): they are sent with an ``ETag`` and
``Cache-Control: public, max-age=31536000, immutable``; ``If-None-Match`` gets a 304 without
drawing. Drawn PNGs are also kept in a bounded in-memory cache shared by all clients.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mimetypes
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__, render
from ..capture import MODES
from ..errors import FeatureMapsError, ImageError, ModelError, RunError
from ..images import list_samples, load_image
from ..models import is_cached, is_user_spec, list_models
from ..reduce import REDUCTIONS
from . import tiles as T
from .jobs import (
    LAYER_CHOICES,
    LAYER_SPEC_RE,
    Busy,
    NotReady,
    RunRequest,
    UnknownRun,
    Viewer,
    one_line,
    weights_label,
)

STATIC_DIR = Path(__file__).with_name("static")
IMMUTABLE = "public, max-age=31536000, immutable"
#: Bumped when pictures change for the same parameters, so that old ETags stop matching.
RENDER_VERSION = f"{__version__}-1"
#: Room for the multipart framing and the small form fields around the uploaded file.
FORM_OVERHEAD = 64 * 1024
#: Largest and smallest input size a request may ask for.
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 16, 1024


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the upload is larger than the limit of {_mb(limit)}; use a smaller image")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.0f} KB"


class _BodyLimit:
    """Refuses request bodies over ``limit`` bytes with a 413, by Content-Length before reading and
    by counting while reading (chunked uploads)."""

    def __init__(self, app: ASGIApp, limit: int, message_limit: int):
        self.app, self.limit, self.message_limit = app, limit, message_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            # Read (and drop) a bounded amount of the body so that the client sees the answer
            # instead of a reset connection, then answer.
            drained, more = 0, True
            while more and drained < self.limit + 256 * 2**20:
                message = await receive()
                if message["type"] != "http.request":
                    break
                drained += len(message.get("body", b""))
                more = message.get("more_body", False)
            response = JSONResponse({"detail": BodyTooLarge(self.message_limit).detail}, status_code=413,
                                    headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.message_limit)
            return message

        await self.app(scope, counting_receive, send)


def _etag(key: str) -> str:
    return '"' + hashlib.sha1(f"{RENDER_VERSION}|{key}".encode()).hexdigest()[:24] + '"'


def _not_modified(request: Request, etag: str) -> bool:
    header = request.headers.get("if-none-match")
    if not header:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return etag in tags or "*" in tags


# --------------------------------------------------------------------------------------------------
# The factory
# --------------------------------------------------------------------------------------------------
def create_app(
    *,
    models: Sequence[str] = ("vgg16", "alexnet", "resnet18"),
    weights: Sequence[str] = ("DEFAULT", "random"),
    checkpoints: Mapping[str, str | Path] | None = None,
    run_dir: str | Path | None = None,
    max_runs: int = 20,
    max_upload_bytes: int = 20 * 2**20,
    max_cached_models: int = 2,
    device: str = "cpu",
    max_image_pixels: int = 40_000_000,
    max_input_size: int = 512,
    workers: int = 2,
    max_pending: int = 16,
    max_loaded_bytes: int = 1536 * 2**20,
    png_cache_bytes: int = 96 * 2**20,
    allowed_hosts: Sequence[str] | None = None,
) -> FastAPI:
    """Make a viewer app. Everything it keeps (models, runs, caches, counters) lives in
    ``app.state.viewer``; two apps share nothing.

    Args:
        models: the models a request may name (torchvision names, or ``package.module:attr``).
        weights: the weights choices offered for every model: ``"DEFAULT"`` (or another
            torchvision weights name) and/or ``"random"``.
        checkpoints: more weights choices, ``{key: path}``; a request names ``checkpoint:KEY``,
            never a path.
        run_dir: where run folders go; default a new temporary folder, removed on shutdown.
            Only folders this viewer wrote (``viewer_run_id`` in the manifest) are listed and
            evicted.
        max_runs: finished runs kept; older ones are deleted, oldest first.
        max_upload_bytes: largest accepted image upload (413 beyond).
        max_cached_models: models kept loaded (least recently used dropped first).
        device: ``cpu``, ``cuda`` or ``auto``.
        max_image_pixels: larger images (decompression bombs) are refused with a 400.
        max_input_size: largest ``size`` a request may ask for.
        workers: runs processed at once (still one forward pass at a time per model).
        max_pending: runs waiting or running at once before new ones get a 429.
        max_loaded_bytes: budget of maps kept in memory for drawing (the newest run always stays).
        png_cache_bytes: budget of drawn PNGs kept in memory.
        allowed_hosts: accepted ``Host`` headers (``serve`` sets the loopback names when it binds
            to loopback, against DNS rebinding); None accepts any.
    """
    model_names = _check_models(models)
    weight_choices = _check_weights(weights)
    ckpts = {str(k): Path(v).expanduser() for k, v in (checkpoints or {}).items()}
    for key in ckpts:
        if not key or "/" in key or "\\" in key:
            raise ModelError(f"checkpoint key {key!r} must be a short name without slashes")
    if not weight_choices and not ckpts:
        raise ModelError("the viewer needs at least one weights choice (DEFAULT, random or a checkpoint)")

    own_dir = run_dir is None
    root = Path(tempfile.mkdtemp(prefix="featuremaps-viewer-")) if own_dir else Path(run_dir).expanduser()
    renderer = T.Tiles()
    holder: dict[str, Viewer] = {}

    def on_evict(run_id: str) -> None:
        renderer.forget(run_id)
        holder["viewer"].png_cache.drop_prefix(run_id + "|")

    viewer = Viewer(
        run_dir=root,
        max_runs=max_runs,
        max_cached_models=max_cached_models,
        device=device,
        checkpoints=ckpts,
        workers=workers,
        max_pending=max_pending,
        max_loaded_bytes=max_loaded_bytes,
        tile_cache_bytes=png_cache_bytes,
        on_evict=on_evict,
    )
    holder["viewer"] = viewer
    if own_dir:
        weakref.finalize(viewer, shutil.rmtree, str(root), True)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        viewer.close()
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)

    app = FastAPI(title="featuremaps viewer", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.viewer = viewer
    app.state.renderer = renderer
    app.state.run_dir = root
    app.state.options = {
        "models": model_names,
        "weights": weight_choices,
        "checkpoints": sorted(ckpts),
        "max_upload_bytes": int(max_upload_bytes),
        "max_image_pixels": int(max_image_pixels),
        "max_input_size": int(max_input_size),
    }
    app.add_middleware(_BodyLimit, limit=int(max_upload_bytes) + FORM_OVERHEAD, message_limit=int(max_upload_bytes))
    hosts = {h.lower().strip("[]") for h in allowed_hosts} if allowed_hosts else None

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable) -> Response:
        if hosts is not None:
            host = (request.headers.get("host") or "").lower()
            name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]", 1)[0]
            if name not in hosts:
                return JSONResponse({"detail": f"host {host!r} is not allowed"}, status_code=400)
        if request.method == "POST":
            origin = request.headers.get("origin")
            if origin and origin != "null" and urlsplit(origin).netloc.lower() != (request.headers.get("host") or "").lower():
                return JSONResponse({"detail": "cross-site requests are not allowed"}, status_code=403)
        response: Response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    _exception_handlers(app)
    _routes(app, viewer, renderer)
    return app


def _check_models(models: Sequence[str]) -> list[str]:
    if isinstance(models, str):
        models = [models]
    known = set(list_models())
    out: list[str] = []
    for name in models:
        name = str(name).strip()
        if not is_user_spec(name):
            key = name.lower().replace("-", "_")
            if key not in known:
                raise ModelError(f"unknown model {name!r} in the viewer's model list; run `featuremaps models` to list them")
            name = key
        if name not in out:
            out.append(name)
    if not out:
        raise ModelError("the viewer needs at least one model")
    return out


def _norm_weights(w: str) -> str:
    w = str(w).strip()
    return "random" if w.lower() == "random" else w.upper()


def _check_weights(weights: Sequence[str]) -> list[str]:
    if isinstance(weights, str):
        weights = [weights]
    out: list[str] = []
    for w in weights:
        w = _norm_weights(w)
        if w.startswith("CHECKPOINT:") or "/" in w or "\\" in w or w.endswith(tuple(s.upper() for s in (".pth", ".pt", ".safetensors"))):
            raise ModelError(f"weights {w!r}: give checkpoint files through checkpoints={{key: path}}, not as weights")
        if w not in out:
            out.append(w)
    return out


def _exception_handlers(app: FastAPI) -> None:
    def handler(status: int) -> Callable:
        async def handle(request: Request, exc: Exception) -> JSONResponse:
            headers = {"Retry-After": "2"} if status == 429 else None
            return JSONResponse({"detail": one_line(exc)}, status_code=status, headers=headers)

        return handle

    app.add_exception_handler(UnknownRun, handler(404))
    app.add_exception_handler(T.NotFound, handler(404))
    app.add_exception_handler(NotReady, handler(409))
    app.add_exception_handler(T.ParamError, handler(400))
    app.add_exception_handler(render.RenderError, handler(400))
    app.add_exception_handler(ImageError, handler(400))
    app.add_exception_handler(RunError, handler(404))
    app.add_exception_handler(Busy, handler(429))
    app.add_exception_handler(FeatureMapsError, handler(400))  # any other one-line user error

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
        return JSONResponse({"detail": "invalid request: " + "; ".join(parts)}, status_code=422)


# --------------------------------------------------------------------------------------------------
# Routes
# --------------------------------------------------------------------------------------------------
def _routes(app: FastAPI, viewer: Viewer, renderer: T.Tiles) -> None:
    opts = app.state.options
    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=True), name="static")

    def cached(request: Request, key: str, media_type: str, make: Callable[[], bytes], *, store: bool = True) -> Response:
        """A response for content that never changes for ``key``: ETag, 304, shared PNG cache."""
        etag = _etag(key)
        headers = {"ETag": etag, "Cache-Control": IMMUTABLE}
        if _not_modified(request, etag):
            return Response(status_code=304, headers=headers)
        data = viewer.png_cache.get(key) if store else None
        if data is None:
            data = make()
            if store:
                viewer.png_cache.put(key, data)
        return Response(data, media_type=media_type, headers=headers)

    def png(image: Any) -> bytes:
        return render.to_png_bytes(image)

    # -- page ----------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={
            "Cache-Control": "no-cache",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
                                       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
        })

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/api/options")
    def options() -> dict[str, Any]:
        weights = [{"id": w, "label": weights_label(w), "pretrained": w != "random"} for w in opts["weights"]]
        weights += [
            {"id": f"checkpoint:{k}", "label": weights_label(f"checkpoint:{k}"), "pretrained": True} for k in opts["checkpoints"]
        ]
        model_info = []
        for name in opts["models"]:
            cached_w = None
            if not is_user_spec(name) and "DEFAULT" in opts["weights"]:
                with contextlib.suppress(Exception):
                    cached_w = is_cached(name, "DEFAULT")
            model_info.append({"name": name, "pretrained_cached": cached_w})
        return {
            "version": __version__,
            "models": model_info,
            "weights": weights,
            "modes": list(MODES),
            "layers": list(LAYER_CHOICES),
            "reductions": list(REDUCTIONS),
            "norms": list(render.NORMS),
            "cmaps": list(T.CMAPS),
            "samples": list_samples(),
            "limits": {
                "max_upload_bytes": opts["max_upload_bytes"],
                "max_image_pixels": opts["max_image_pixels"],
                "max_input_size": opts["max_input_size"],
                "min_input_size": MIN_INPUT_SIZE,
                "max_runs": viewer.max_runs,
            },
        }

    @app.get("/api/status")
    def status() -> JSONResponse:
        jobs = viewer.jobs()
        body = {
            "forward_passes": viewer.forward_passes,
            "model_loads": viewer.models.loads,
            "models_loaded": viewer.models.loaded(),
            "runs": sum(1 for j in jobs if j.state == "done"),
            "pending": sum(1 for j in jobs if not j.is_finished),
            "maps_in_memory_bytes": viewer.maps_cache.nbytes(),
            "png_cache": {"hits": viewer.png_cache.hits, "misses": viewer.png_cache.misses},
        }
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    # -- runs ------------------------------------------------------------------------------------------
    @app.post("/api/runs", status_code=202)
    async def create_run(request: Request) -> JSONResponse:
        try:
            form = await request.form(max_files=2, max_fields=16, max_part_size=64 * 1024)
        except BodyTooLarge:
            raise
        except HTTPException as exc:  # malformed multipart
            raise HTTPException(422, f"cannot read the form: {exc.detail}") from None
        try:
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            upload = form.get("image")
            model = fields.get("model", opts["models"][0]).strip()
            if model.lower().replace("-", "_") in opts["models"] and not is_user_spec(model):
                model = model.lower().replace("-", "_")
            if model not in opts["models"]:
                raise HTTPException(400, f"model {model[:60]!r} is not offered by this viewer; choose one of {', '.join(opts['models'])}")
            wchoice = fields.get("weights", (opts["weights"] or [f"checkpoint:{opts['checkpoints'][0]}"])[0]).strip()
            if wchoice.lower().startswith("checkpoint:"):
                key = wchoice.split(":", 1)[1]
                if key not in opts["checkpoints"]:
                    raise HTTPException(400, f"no checkpoint {key[:60]!r} is offered; choose one of {', '.join(opts['checkpoints']) or '(none)'}")
                wchoice = f"checkpoint:{key}"
            else:
                wchoice = _norm_weights(wchoice)
                if wchoice not in opts["weights"]:
                    offered = opts["weights"] + [f"checkpoint:{k}" for k in opts["checkpoints"]]
                    raise HTTPException(400, f"weights {wchoice[:40]!r} are not offered; choose one of {', '.join(offered)}")
            mode = fields.get("mode", "network").strip().lower()
            if mode not in MODES:
                raise HTTPException(422, f"unknown mode {mode[:40]!r}; use one of {', '.join(MODES)}")
            layers = fields.get("layers", "default").strip() or "default"
            if layers.lower() in LAYER_CHOICES:
                layers = layers.lower()
            elif len(layers) > 300 or not LAYER_SPEC_RE.fullmatch(layers):
                raise HTTPException(422, f"layers must be one of {', '.join(LAYER_CHOICES)} or comma-separated layer names/globs")
            size = None
            if fields.get("size", "").strip():
                try:
                    size = int(fields["size"])
                except ValueError:
                    raise HTTPException(422, f"size must be a whole number of pixels, not {fields['size'][:20]!r}") from None
                if not MIN_INPUT_SIZE <= size <= opts["max_input_size"]:
                    raise HTTPException(422, f"size must be between {MIN_INPUT_SIZE} and {opts['max_input_size']} pixels")
            sample = fields.get("sample", "").strip()
            has_file = isinstance(upload, UploadFile) and (upload.filename or upload.size)
            if has_file and sample:
                raise HTTPException(400, "send either an image file or a sample name, not both")
            if has_file:
                assert isinstance(upload, UploadFile)
                data = await upload.read(opts["max_upload_bytes"] + 1)
                if len(data) > opts["max_upload_bytes"]:
                    raise BodyTooLarge(opts["max_upload_bytes"])
                name = Path(upload.filename or "upload").name[:80] or "upload"
                image = await run_in_threadpool(load_image, data, name=name, max_pixels=opts["max_image_pixels"])
                source = name
            elif sample:
                if sample.removeprefix("sample:") not in list_samples():
                    raise HTTPException(400, f"unknown sample {sample[:40]!r}; choose one of {', '.join(list_samples())}")
                source = "sample:" + sample.removeprefix("sample:")
                image = await run_in_threadpool(load_image, source)
            else:
                raise HTTPException(400, "no image: upload an image file (field 'image') or choose a sample (field 'sample')")
        finally:
            await form.close()
        job = viewer.submit(RunRequest(model=model, weights=wchoice, mode=mode, layers=layers, size=size, image=image, source=source))
        return JSONResponse(job.to_dict(), status_code=202, headers={"Location": f"/api/runs/{job.id}", "Cache-Control": "no-store"})

    @app.get("/api/runs")
    def list_runs() -> JSONResponse:
        items = []
        for job in reversed(viewer.jobs()):
            d = job.to_dict()
            d.pop("layers", None)
            items.append(d)
        return JSONResponse({"runs": items}, headers={"Cache-Control": "no-store"})

    @app.get("/api/runs/{run_id}")
    def get_run(run_id: str) -> JSONResponse:
        return JSONResponse(viewer.job(run_id).to_dict(), headers={"Cache-Control": "no-store"})

    @app.get("/api/runs/{run_id}/input.png")
    def input_png(request: Request, run_id: str) -> Response:
        viewer.job(run_id)

        def make() -> bytes:
            maps = viewer.maps(run_id)
            if maps.image is None:
                raise T.NotFound("this run has no input picture")
            return png(maps.image)

        return cached(request, f"{run_id}|input", "image/png", make)

    @app.get("/api/runs/{run_id}/layers/{index}")
    def layer(request: Request, run_id: str, index: int) -> Response:
        viewer.job(run_id)
        return cached(request, f"{run_id}|layer|{index}", "application/json",
                      lambda: _json_bytes(renderer.layer_info(run_id, viewer.maps(run_id), index)), store=False)

    @app.get("/api/runs/{run_id}/layers/{index}/thumb.png")
    def thumb(request: Request, run_id: str, index: int, reduce: str = "mean", norm: str = "map", cmap: str = "viridis") -> Response:
        viewer.job(run_id)
        view = T.parse_view(reduce, norm, cmap)
        return cached(request, f"{run_id}|thumb|{index}|{view.key()}", "image/png",
                      lambda: png(renderer.thumb(run_id, viewer.maps(run_id), index, view)[0]))

    def grid_args(page: int, per_page: int, tile: int | None, top_k: int | None) -> tuple[int, int, int | None, int | None]:
        if page < 0:
            raise T.ParamError("page must be 0 or more")
        if not 1 <= per_page <= T.MAX_PER_PAGE:
            raise T.ParamError(f"per_page must be between 1 and {T.MAX_PER_PAGE}")
        if tile is not None and not 8 <= tile <= 256:
            raise T.ParamError("tile must be between 8 and 256 pixels")
        if top_k is not None and top_k < 1:
            raise T.ParamError("top_k must be 1 or more")
        return page, per_page, tile, top_k

    def grid_key(run_id: str, index: int, view: T.View, page: int, per_page: int, tile: int | None, top_k: int | None) -> str:
        return f"{run_id}|grid|{index}|{view.key()}&page={page}&per_page={per_page}&tile={tile}&top_k={top_k}"

    def grid_both(run_id: str, index: int, view: T.View, args: tuple) -> tuple[bytes, bytes]:
        """The grid PNG and its layout JSON, drawn once and both cached."""
        key = grid_key(run_id, index, view, *args)
        data, layout = viewer.png_cache.get(key), viewer.png_cache.get(key + "|json")
        if data is None or layout is None:
            page, per_page, tile, top_k = args
            im, info = renderer.grid(run_id, viewer.maps(run_id), index, view, page=page, per_page=per_page, tile=tile, top_k=top_k)
            data, layout = png(im), _json_bytes(info)
            viewer.png_cache.put(key, data)
            viewer.png_cache.put(key + "|json", layout)
        return data, layout

    def grid_response(request: Request, run_id: str, index: int, norm: str, cmap: str, page: int, per_page: int,
                      tile: int | None, top_k: int | None, *, layout: bool) -> Response:
        """The grid picture, or (``layout``) where each channel sits in it: rendered together, cached apart."""
        viewer.job(run_id)
        view = T.parse_view(None, norm, cmap)
        args = grid_args(page, per_page, tile, top_k)
        key = grid_key(run_id, index, view, *args) + ("|json" if layout else "")
        return cached(request, key, "application/json" if layout else "image/png",
                      lambda: grid_both(run_id, index, view, args)[int(layout)], store=False)

    @app.get("/api/runs/{run_id}/layers/{index}/grid.png")
    def grid_png(request: Request, run_id: str, index: int, norm: str = "map", cmap: str = "viridis", page: int = 0,
                 per_page: int = 128, tile: int | None = None, top_k: int | None = None) -> Response:
        return grid_response(request, run_id, index, norm, cmap, page, per_page, tile, top_k, layout=False)

    @app.get("/api/runs/{run_id}/layers/{index}/grid.json")
    def grid_json(request: Request, run_id: str, index: int, norm: str = "map", cmap: str = "viridis", page: int = 0,
                  per_page: int = 128, tile: int | None = None, top_k: int | None = None) -> Response:
        return grid_response(request, run_id, index, norm, cmap, page, per_page, tile, top_k, layout=True)

    @app.get("/api/runs/{run_id}/layers/{index}/channels/{channel}.png")
    def channel_png(request: Request, run_id: str, index: int, channel: int, norm: str = "map", cmap: str = "viridis") -> Response:
        viewer.job(run_id)
        view = T.parse_view(None, norm, cmap)
        return cached(request, f"{run_id}|channel|{index}|{channel}|{view.key()}", "image/png",
                      lambda: png(renderer.channel(run_id, viewer.maps(run_id), index, channel, view)[0]))

    @app.get("/api/runs/{run_id}/layers/{index}/channels/{channel}.json")
    def channel_json(request: Request, run_id: str, index: int, channel: int, norm: str = "map", cmap: str = "viridis") -> Response:
        viewer.job(run_id)
        view = T.parse_view(None, norm, cmap)

        def make() -> bytes:
            maps = viewer.maps(run_id)
            e = renderer.entry(maps, index)
            m = e.maps(0)[renderer.channel_position(e, channel)]
            lo, hi = renderer.channel_range(run_id, maps, e, m, view)
            return _json_bytes({
                "layer": index, "name": e.name, "channel": channel, "shape": list(m.shape),
                "min": T._num(float(m.min())), "max": T._num(float(m.max())), "mean": T._num(float(m.mean())),
                "zero_fraction": float((m == 0).mean()), "scale": [T._num(lo), T._num(hi)],
            })

        return cached(request, f"{run_id}|channeljson|{index}|{channel}|{view.key()}", "application/json", make)

    @app.get("/api/runs/{run_id}/layers/{index}/overlay.png")
    def overlay_png(request: Request, run_id: str, index: int, channel: str = "", alpha: float = 0.5, reduce: str = "mean",
                    norm: str = "map", cmap: str = "jet") -> Response:
        viewer.job(run_id)
        view = T.parse_view(reduce, norm, cmap)
        if not 0.0 <= alpha <= 1.0:
            raise T.ParamError("alpha is the heat map's opacity, between 0 and 1")
        alpha = round(alpha, 2)
        ch: int | None = None
        if channel.strip() not in ("", "none", "reduce"):
            try:
                ch = int(channel)
            except ValueError:
                raise T.ParamError(f"channel must be a channel number (or empty for the channel {view.reduce}), not {channel[:20]!r}") from None
        return cached(request, f"{run_id}|overlay|{index}|{ch}|{alpha:.2f}|{view.key()}", "image/png",
                      lambda: png(renderer.overlay(run_id, viewer.maps(run_id), index, view, channel=ch, alpha=alpha)))

    @app.get("/api/runs/{run_id}/download")
    async def download(run_id: str) -> Response:
        job = viewer.job(run_id)
        if job.state != "done":
            raise NotReady(f"run {run_id} is {job.state}; its folder can be downloaded once it is done")
        folder = viewer.folder(run_id)
        path = await run_in_threadpool(_zip, folder)
        model = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(job.info.get("model") or "run"))[:40]
        mode = str(job.info.get("mode") or "")
        return FileResponse(path, media_type="application/zip", background=BackgroundTask(os.remove, path), headers={
            "Content-Disposition": f'attachment; filename="featuremaps-{model}-{mode}-{run_id}.zip"',
            "Cache-Control": "private, max-age=3600",
        })

    @app.get("/api/runs/{run_id}/files/{path:path}")
    def run_file(run_id: str, path: str) -> FileResponse:
        job = viewer.job(run_id)
        if job.state != "done":
            raise NotReady(f"run {run_id} is {job.state}; its files are there once it is done")
        root = viewer.folder(run_id).resolve()
        parts = Path(path).parts
        if not path or any(p in ("..", ".") or p.startswith(".") for p in parts) or Path(path).is_absolute() or "\\" in path:
            raise T.NotFound("no such file in this run")
        target = (root / path).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            raise T.NotFound("no such file in this run")
        media = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if target.suffix == ".npy":
            media = "application/octet-stream"
        # a run's index.html is shown as a document of its own: no scripts, no access to the viewer
        headers = {"Cache-Control": IMMUTABLE,
                   "Content-Security-Policy": "sandbox; default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'"}
        return FileResponse(target, media_type=media, headers=headers)

    @app.get("/api/compare.png")
    def compare_png(request: Request, runs: str, reduce: str = "mean", norm: str = "global", cmap: str = "viridis") -> Response:
        ids = [r for r in runs.split(",") if r]
        if not 2 <= len(ids) <= 4:
            raise T.ParamError("compare takes 2 to 4 run ids: runs=ID,ID")
        for r in ids:
            viewer.job(r)
        view = T.parse_view(reduce, norm, cmap)

        def make() -> bytes:
            named: dict[str, Any] = {}
            for n, r in enumerate(ids):
                maps = viewer.maps(r)
                label = f"{chr(65 + n)}: {maps.model}"
                named[label] = maps
            return png(render.compare_runs(named, reduce=view.reduce, norm=view.norm, cmap=view.cmap, tile_size=96))

        return cached(request, f"{','.join(ids)}|compare|{view.key()}", "image/png", make)

    @app.get("/api/samples/{name}.png")
    def sample_png(request: Request, name: str) -> Response:
        if name not in list_samples():
            raise T.NotFound(f"no sample {name[:40]!r}; samples: {', '.join(list_samples())}")

        def make() -> bytes:
            im = load_image(f"sample:{name}")
            im.thumbnail((256, 256))
            return png(im)

        return cached(request, f"sample|{name}", "image/png", make)

    @app.get("/api/cmaps/{name}.png")
    def cmap_png(request: Request, name: str) -> Response:
        view = T.parse_view(None, None, name)
        return cached(request, f"cmap|{view.cmap}", "image/png", lambda: png(T.cmap_strip(view.cmap)))


def _zip(folder: Path) -> str:
    """The run folder zipped into a temporary file (streamed from disk, never held in memory)."""
    import tempfile

    from ..runs import zip_run

    fd, path = tempfile.mkstemp(prefix="featuremaps-", suffix=".zip")
    try:
        with os.fdopen(fd, "wb") as f:
            zip_run(folder, f)
    except BaseException:
        os.remove(path)
        raise
    return path


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=False, separators=(",", ":")).encode()


__all__ = ["create_app", "STATIC_DIR"]
