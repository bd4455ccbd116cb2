"""The featuremaps viewer: a FastAPI app made by :func:`create_app`, a thin shell over the library.

A run is captured once (``load_model`` + ``capture``, in a worker thread, one forward pass at a
time per model), made compact and written as a run folder (``runs.save_run``); every picture is
then drawn on demand from what the viewer keeps and the folder's maps (``featuremaps.render``) and
cached, so browsing channels never runs the model again.

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
    GET  /api/runs/{id}/download             the run folder as a zip (``runs.zip_run``, streamed): the folder
                                             ``featuremaps show`` writes (pictures, index.html,
                                             manifest.json, raw maps; ``runs.load_run`` reads it)
    GET  /api/runs/{id}/files/{path}         one file of the run folder (manifest.json, overview.png...)
    GET  /api/compare.png?runs=A,B           two (or more) runs side by side: one kind of map per row,
                                             layers matched by depth, a range per tile (?norm=map)
    GET  /api/cmaps/{name}.png               a 256x1 strip of a colormap, for the page's scales
    GET  /api/samples/{name}.png             a small preview of a bundled sample image
    GET  /channel, /api/atlases/..., /api/runs/{id}/layers/{i}/channels/{c}/page.json | portrait...
                                             the channel page (routers/channels.py)
    GET  /api/runs/{id}/cam.json | cam.png   the CAM panel (routers/cam.py)

``reduce``: mean, max, l2, std; ``norm``: map, layer, global or ``fixed:VMIN,VMAX``; ``cmap``: one
of :data:`~featuremaps.web.tiles.CMAPS`.

Status codes: 400 bad parameter, unknown model/weights/sample, an upload that is not a readable
image or is a decompression bomb, a Host header that is not allowed; 403 a cross-site POST (also
``Origin: null``); 404 unknown run, layer, channel or file (also every path-traversal attempt and
every name the file system refuses); 408 a request body that does not arrive in time; 409 the run
has no maps (still queued/running, or failed); 413 an upload larger than ``max_upload_bytes``, or
a run that could never fit ``max_memory`` or ``max_disk`` (with the estimate in the message);
422 unknown mode or malformed form; 429 too many runs waiting (in all, or of one client), too many
downloads at once, or memory that stays taken. A run that fails *inside* the job (pretrained
weights not available offline -> the library's ``WeightsUnavailableError`` message, a broken
checkpoint...) ends in state ``failed`` with ``error`` (the one-line message) and ``error_type``;
the page shows it. Never silently random weights.

Limits: uploads over ``max_upload_bytes`` get a 413 (by Content-Length before reading, or while
reading); a run is admitted (estimated from its output shapes, counted against ``max_pending``
and the client's share) before its upload is decoded, and its picture is then decoded at reduced
size (JPEG ``draft``) and kept resized to the model's input; model names and weights come only from
the allow-lists given to :func:`create_app` (a checkpoint by its key); every run, loaded model,
decode and channel grid reserves its memory from ``max_memory`` first; what the page needs of a run
is kept compact (:mod:`~featuremaps.web.compact`) and channel maps are read from the run folder on
demand; finished runs beyond ``max_runs`` or ``max_disk`` are deleted, oldest first; downloads are
zipped while they are sent, ``max_downloads`` at once.

Caching: pictures and per-layer JSON of a run never change, so their URLs carry everything that
decides the content (run id + parameters): they are sent with an ``ETag`` and
``Cache-Control: public, max-age=31536000, immutable``; ``If-None-Match`` gets a 304 without
drawing. Drawn PNGs are also kept in a bounded in-memory cache shared by all clients.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.staticfiles import StaticFiles

from ..errors import (
    Busy,
    FeatureMapsError,
    FormError,
    ImageError,
    ModelError,
    NotFound,
    NotReady,
    OptionError,
    ParamError,
    RenderError,
    RunError,
    SlowClient,
    TooLarge,
    UnknownRun,
)
from ..models import is_user_spec, list_models
from ..version import __version__
from . import tiles as T
from .caches import process_rss
from .forms import normalize_weights
from .insight import Atlases, make_insight
from .jobs import Viewer, one_line, own_store
from .limits import FORM_OVERHEAD, BodyLimit, request_guard
from .routers import cam, channels, compare, layers, meta, pages, runs
from .routers.pages import STATIC_DIR

#: The one map from featuremaps' errors to HTTP status codes (the most specific class wins); the body
#: is ``{"detail": "<the one-line message>"}``. Any other FeatureMapsError is a 400.
STATUS: dict[type[Exception], int] = {
    FormError: 422, ParamError: 400, RenderError: 400, OptionError: 400, ImageError: 400, NotFound: 404,
    UnknownRun: 404, RunError: 404, NotReady: 409, SlowClient: 408, TooLarge: 413, Busy: 429, FeatureMapsError: 400,
}  # fmt: skip


def status_of(exc: BaseException) -> int:
    """The HTTP status of a featuremaps error (see :data:`STATUS`)."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def _exception_handlers(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        status = status_of(exc)
        headers = {"Retry-After": "2"} if status == 429 else None
        return JSONResponse({"detail": one_line(exc)}, status_code=status, headers=headers)

    app.add_exception_handler(FeatureMapsError, handle)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
        return JSONResponse({"detail": "invalid request: " + "; ".join(parts)}, status_code=422)


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
    max_pending_per_client: int | None = None,
    max_memory: int | None = None,
    max_disk: int | None = None,
    png_cache_bytes: int | None = None,
    array_cache_bytes: int | None = None,
    max_downloads: int = 4,
    allowed_hosts: Sequence[str] | None = None,
    allow_ip_hosts: bool = False,
    body_timeout: float = 120.0,
    atlases: Sequence[str | os.PathLike | Any] = (),
    portrait_dir: str | Path | None = None,
    portrait_options: Mapping[str, Any] | None = None,
) -> FastAPI:
    """Make a viewer app. Everything it keeps (models, runs, caches, budgets, counters) lives in
    ``app.state.viewer``; two apps share nothing.

    Args:
        models: the models a request may name (torchvision names, or ``package.module:attr``).
        weights: the weights choices offered for every model: ``"DEFAULT"`` (or another
            torchvision weights name) and/or ``"random"``.
        checkpoints: more weights choices, ``{key: path}``; a request names ``checkpoint:KEY``,
            never a path.
        run_dir: the run store, reused across restarts (finished runs are served again, temporary
            folders of killed runs cleared); one viewer at a time. Default: a new temporary store,
            removed on shutdown (and, after a ``kill -9``, by the next viewer that makes one).
            Only folders this viewer wrote (``viewer_run_id`` in the manifest) are listed and evicted.
        max_runs: finished runs kept; older ones are deleted, oldest first.
        max_upload_bytes: largest accepted image upload (413 beyond).
        max_cached_models: models kept loaded (least recently used dropped first).
        device: ``cpu``, ``cuda`` or ``auto``.
        max_image_pixels: larger images (decompression bombs) are refused with a 400.
        max_input_size: largest ``size`` a request may ask for.
        workers: runs processed at once (still one forward pass at a time per model, and each
            within the memory budget).
        max_pending: runs admitted and not finished before new ones get a 429.
        max_pending_per_client: of those, how many one client (address) may have (default a
            quarter of ``max_pending``); clients' runs are started in turn.
        max_memory: bytes the process may hold (resident memory; default :func:`default_max_memory`).
            Runs that could not fit are refused with a 413 before anything is decoded; the others
            wait for their memory.
        max_disk: bytes the run store may take (default :func:`default_max_disk`); the oldest runs
            are deleted to make room, a run that could not fit is refused with a 413.
        png_cache_bytes: drawn PNGs kept in memory (default: 1/32 of ``max_memory``, at most 96 MB).
        array_cache_bytes: what is kept of runs in memory, and layers read for grids (default:
            1/16 of ``max_memory``, at most 256 MB).
        max_downloads: run folders zipped and sent at once (429 beyond).
        allowed_hosts: accepted ``Host`` headers (``serve`` always sets them, against DNS
            rebinding); None accepts any.
        allow_ip_hosts: also accept any IP address as ``Host`` (a DNS rebinding needs a name).
        body_timeout: seconds a request body may take to arrive (408 beyond).
        atlases: atlas folders (or ``fm.open_atlas`` objects, with their model) whose channels get
            a channel page (``/channel?atlas=ID&layer=NAME&channel=C``); a run's channel page shows
            the atlases of its model, weights and layer (see :mod:`~featuremaps.web.routers.channels`).
        portrait_dir: where channel portraits are kept (default: ``portraits/`` in the run store).
        portrait_options: ``size``, ``steps``, ``seed``... for the portraits the page makes
            (default: :func:`featuremaps.portrait.portrait_image`'s budget for the device).
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
    root = own_store() if own_dir else Path(run_dir).expanduser()
    memory = int(max_memory) if max_memory is not None else default_max_memory()
    disk = int(max_disk) if max_disk is not None else default_max_disk(root)
    renderer = T.Tiles()
    holder: dict[str, Any] = {}
    served_atlases = Atlases(atlases)  # a folder that is no finished atlas fails here, before the store is taken

    def on_evict(run_id: str) -> None:
        renderer.forget(run_id)
        holder["viewer"].png_cache.drop_prefix(run_id + "|")
        if "insight" in holder:
            holder["insight"].cams.forget(run_id)

    try:
        viewer = Viewer(
            run_dir=root,
            own_dir=own_dir,
            max_runs=max_runs,
            max_cached_models=max_cached_models,
            device=device,
            checkpoints=ckpts,
            workers=workers,
            max_pending=max_pending,
            max_pending_per_client=max_pending_per_client,
            max_memory=memory,
            max_disk=disk,
            png_cache_bytes=png_cache_bytes if png_cache_bytes is not None else min(96 * 2**20, memory // 32),
            array_cache_bytes=array_cache_bytes if array_cache_bytes is not None else min(256 * 2**20, memory // 16),
            max_downloads=max_downloads,
            on_evict=on_evict,
        )
    except BaseException:
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
        raise
    holder["viewer"] = viewer
    insight = holder["insight"] = make_insight(
        viewer, atlases=served_atlases, portrait_dir=portrait_dir, portrait_options=portrait_options
    )
    if own_dir:
        weakref.finalize(viewer, shutil.rmtree, str(root), True)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        insight.close()
        viewer.close()

    app = FastAPI(
        title="featuremaps viewer",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.viewer = viewer
    app.state.insight = insight
    app.state.renderer = renderer
    app.state.run_dir = root
    app.state.allowed_hosts = list(allowed_hosts) if allowed_hosts else []
    app.state.options = {
        "models": model_names,
        "weights": weight_choices,
        "checkpoints": sorted(ckpts),
        "max_upload_bytes": int(max_upload_bytes),
        "max_image_pixels": int(max_image_pixels),
        "max_input_size": int(max_input_size),
    }
    app.add_middleware(
        BodyLimit,
        limit=int(max_upload_bytes) + FORM_OVERHEAD,
        message_limit=int(max_upload_bytes),
        timeout=float(body_timeout),
    )
    app.middleware("http")(request_guard(allowed_hosts, allow_ip_hosts=allow_ip_hosts))
    _exception_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=True), name="static")
    for router in (pages.router, meta.router, runs.router, layers.router, compare.router, channels.router, cam.router):
        app.include_router(router)
    return app


def default_max_memory() -> int:
    """The default ``max_memory``: half of this machine's memory, at most 4 GB, and at least 1.5 GB
    more than the process holds already."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        physical = 8 * 2**30
    return max(min(4 * 2**30, physical // 2), process_rss() + 1536 * 2**20)


def default_max_disk(root: Path) -> int:
    """The default ``max_disk``: half of the free space where the store is, at most 4 GB."""
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = 8 * 2**30
    return max(256 * 2**20, min(4 * 2**30, free // 2))


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
                raise ModelError(
                    f"unknown model {name!r} in the viewer's model list; run `featuremaps models` to list them"
                )
            name = key
        if name not in out:
            out.append(name)
    if not out:
        raise ModelError("the viewer needs at least one model")
    return out


def _check_weights(weights: Sequence[str]) -> list[str]:
    if isinstance(weights, str):
        weights = [weights]
    out: list[str] = []
    for w in weights:
        w = normalize_weights(w)
        if (
            w.startswith("CHECKPOINT:")
            or "/" in w
            or "\\" in w
            or w.endswith(tuple(s.upper() for s in (".pth", ".pt", ".safetensors")))
        ):
            raise ModelError(f"weights {w!r}: give checkpoint files through checkpoints={{key: path}}, not as weights")
        if w not in out:
            out.append(w)
    return out


__all__ = ["STATIC_DIR", "STATUS", "create_app", "status_of"]
