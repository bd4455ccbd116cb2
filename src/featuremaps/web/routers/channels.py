"""The channel page: ``/channel`` (static/channel.html) and its data, for a channel of a run and for a
channel of an atlas the viewer serves (``featuremaps serve --atlas FOLDER``).

Atlas channels (``{layer}`` is the layer's name, ``{rank}`` 1 for the strongest image)::

    GET  /api/atlases                                              the served atlases and their layers
    GET  /api/atlases/{aid}/layers/{layer}/channels/{c}.json       ?k=  top-k images (value, max position,
                                                                   crop box), the distribution, links
    GET  .../channels/{c}/crops/{rank}.png      ?k=&alpha=&cmap=&heat=   a top image's crop, with the
                                                                   channel's heatmap over it (heat=0: bare)
    GET  .../channels/{c}/distribution.png      ?mark=             the per-image max histogram
    GET  .../channels/{c}/top/{rank}/maps.png   ?cmap=             every channel of that layer for that image
    POST .../channels/{c}/top/{rank}/run                           a viewer run of that image (its full maps),
                                                                   when the atlas's model is one the viewer serves
    GET  .../channels/{c}/portrait.json | portrait.png             the cached portrait, or its state
    POST .../channels/{c}/portrait                                 make it (a background job)

Run channels (``{i}`` the layer's index in the run)::

    GET  /api/runs/{id}/layers/{i}/channels/{c}/page.json          the channel, its layer, the matching atlases
    GET  /api/runs/{id}/layers/{i}/channels/{c}/portrait.json | portrait.png
    POST /api/runs/{id}/layers/{i}/channels/{c}/portrait

Everything is computed by the library (:meth:`Atlas.channel`, :meth:`Atlas.crops`,
:meth:`Distribution.picture`, :meth:`Atlas.maps`, :func:`featuremaps.portrait.portrait_image`) through
:mod:`featuremaps.web.insight`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from ... import render
from ...errors import FeatureMapsError, NotFound, ParamError
from ...images import load_image
from .. import tiles as T
from ..deps import Cached, get_cached, get_options, get_viewer, json_bytes, png
from ..forms import MIN_INPUT_SIZE, normalize_weights
from ..insight import Insight, ServedAtlas, check_alpha, check_k, model_of_run, run_model
from ..jobs import RunRequest, Viewer, one_line
from .pages import PAGE_POLICY, STATIC_DIR

router = APIRouter()
ViewerDep = Annotated[Viewer, Depends(get_viewer)]
CachedDep = Annotated[Cached, Depends(get_cached)]


def get_insight(request: Request) -> Insight:
    return request.app.state.insight


InsightDep = Annotated[Insight, Depends(get_insight)]
NO_STORE = {"Cache-Control": "no-store"}


@router.get("/channel", include_in_schema=False)
def channel_page() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "channel.html",
        media_type="text/html",
        headers={"Cache-Control": "no-cache", "Content-Security-Policy": PAGE_POLICY},
    )


# --------------------------------------------------------------------------------------------------
# atlases
# --------------------------------------------------------------------------------------------------
def _base(served: ServedAtlas, layer: str, channel: int) -> str:
    return f"/api/atlases/{served.id}/layers/{quote(layer, safe='')}/channels/{channel}"


def page_url(**query: Any) -> str:
    return "/channel?" + urlencode({k: v for k, v in query.items() if v is not None})


def _servable(served: ServedAtlas, opts: dict[str, Any]) -> bool:
    """Whether the viewer may run the atlas's model itself (its name and weights are allowed)."""
    reload = served.reload
    if not reload:
        return False
    return (
        str(reload.get("model")) in opts["models"] and normalize_weights(str(reload.get("weights"))) in opts["weights"]
    )


@router.get("/api/atlases")
def list_atlases(insight: InsightDep) -> JSONResponse:
    return JSONResponse({"atlases": [a.describe() for a in insight.atlases.all()]}, headers=NO_STORE)


@router.get("/api/atlases/{aid}/layers/{layer}/channels/{channel}.json")
def atlas_channel(
    aid: str, layer: str, channel: int, insight: InsightDep, cached: CachedDep, opts: Annotated[dict, Depends(get_options)],
    k: int = 9,
) -> Response:  # fmt: skip
    served = insight.atlases.channel(aid, layer, channel)
    k = check_k(k)
    base = _base(served, layer, channel)

    def make() -> bytes:
        body = served.atlas.channel(layer, channel, k=k).to_dict()
        for hit in body["top"]:
            r = hit["rank"]
            hit["crop"] = f"{base}/crops/{r}.png?k={k}"
            hit["picture"] = f"{base}/crops/{r}.png?k={k}&heat=0"
            hit["maps"] = f"{base}/top/{r}/maps.png"
            hit["name"] = hit["image"].replace("\\", "/").rsplit("/", 1)[-1]
        body["atlas"] = served.describe()
        body["distribution_png"] = f"{base}/distribution.png"
        body["portrait"] = f"{base}/portrait"
        body["can_run"] = _servable(served, opts)
        return json_bytes(body)

    return cached(f"atlas|{served.id}|{served.token}|channel|{layer}|{channel}|{k}", "application/json", make)


def _crops(insight: Insight, served: ServedAtlas, layer: str, channel: int, k: int, alpha: float, cmap: str) -> None:
    """Every crop of the top ``k`` into the PNG cache, drawn by :meth:`Atlas.crops` in one capture."""
    viewer = insight.viewer
    prefix = f"atlas|{served.id}|{served.token}|crop|{layer}|{channel}|{k}|{alpha:.2f}|{cmap}"
    with served.lock:
        if viewer.png_cache.get(f"{prefix}|1|1") is not None:
            return
        try:
            crops = served.atlas.crops(layer, channel, k, alpha=alpha, cmap=cmap)
        except FeatureMapsError as exc:
            raise NotFound(f"the crops cannot be drawn: {one_line(exc)}") from None
        for crop in crops:
            viewer.png_cache.put(f"{prefix}|{crop.hit.rank}|1", png(crop.heatmap))
            viewer.png_cache.put(f"{prefix}|{crop.hit.rank}|0", png(crop.picture))


@router.get("/api/atlases/{aid}/layers/{layer}/channels/{channel}/crops/{rank}.png")
def atlas_crop(
    aid: str, layer: str, channel: int, rank: int, insight: InsightDep, cached: CachedDep,
    k: int = 9, alpha: float = 0.5, cmap: str = "jet", heat: int = 1,
) -> Response:  # fmt: skip
    served = insight.atlases.channel(aid, layer, channel)
    k, alpha = check_k(k), check_alpha(alpha)
    cmap = T.parse_view(None, None, cmap).cmap
    if not 1 <= rank <= k:
        raise NotFound(f"rank is 1..{k} (the top {k} images)")
    if heat not in (0, 1):
        raise ParamError("heat is 1 (the crop with the channel's heatmap) or 0 (the crop alone)")
    key = f"atlas|{served.id}|{served.token}|crop|{layer}|{channel}|{k}|{alpha:.2f}|{cmap}|{rank}|{heat}"

    def make() -> bytes:
        data = insight.viewer.png_cache.get(key)
        if data is None:
            _crops(insight, served, layer, channel, k, alpha, cmap)
            data = insight.viewer.png_cache.get(key)
        if data is None:
            raise NotFound(f"{layer} channel {channel} has fewer than {rank} images in this atlas")
        return data

    return cached(key, "image/png", make, store=False)


@router.get("/api/atlases/{aid}/layers/{layer}/channels/{channel}/distribution.png")
def atlas_distribution(
    aid: str, layer: str, channel: int, insight: InsightDep, cached: CachedDep, mark: float | None = None
) -> Response:
    served = insight.atlases.channel(aid, layer, channel)
    key = f"atlas|{served.id}|{served.token}|dist|{layer}|{channel}|{mark!r}"
    return cached(key, "image/png", lambda: png(served.atlas.distribution(layer, channel).picture(mark=mark)))


def _hit(served: ServedAtlas, layer: str, channel: int, rank: int) -> Any:
    if not 1 <= rank <= 4 * 32:
        raise NotFound("rank is 1 or more (1: the strongest image)")
    hits = served.atlas.top(layer, channel, k=rank)
    if len(hits) < rank:
        raise NotFound(f"{layer} channel {channel} has {len(hits)} images in this atlas, not {rank}")
    return hits[rank - 1]


@router.get("/api/atlases/{aid}/layers/{layer}/channels/{channel}/top/{rank}/maps.png")
def atlas_image_maps(
    aid: str, layer: str, channel: int, rank: int, insight: InsightDep, cached: CachedDep, cmap: str = "viridis"
) -> Response:
    served = insight.atlases.channel(aid, layer, channel)
    cmap = T.parse_view(None, None, cmap).cmap
    hit = _hit(served, layer, channel, rank)

    def make() -> bytes:
        found = served.atlas.layer(layer)
        with served.lock:
            maps = served.atlas.maps(hit.image, layers=[found.select])
        entry = next(e for e in maps.entries if e.name == found.name)
        return png(render.channel_grid(entry, per_page=None, cmap=cmap, palette=True))

    return cached(f"atlas|{served.id}|{served.token}|maps|{layer}|{channel}|{rank}|{cmap}", "image/png", make)


@router.post("/api/atlases/{aid}/layers/{layer}/channels/{channel}/top/{rank}/run", status_code=202)
def atlas_image_run(
    aid: str, layer: str, channel: int, rank: int, request: Request, insight: InsightDep, viewer: ViewerDep,
    opts: Annotated[dict, Depends(get_options)],
) -> JSONResponse:  # fmt: skip
    """Run the viewer on one of the top images (its full maps, every layer of the atlas), as an upload would."""
    served = insight.atlases.channel(aid, layer, channel)
    hit = _hit(served, layer, channel, rank)
    if not _servable(served, opts):
        raise ParamError(
            f"this viewer does not run {served.atlas.model_name} ({served.atlas.weights}); start it with that model in "
            "--models and --weights, or open the image's maps picture"
        )
    reload = served.reload or {}
    h, w = served.atlas.input_size
    size = h if h == w else None
    if size is not None and not MIN_INPUT_SIZE <= size <= int(opts["max_input_size"]):
        size = None
    req = RunRequest(
        model=str(reload["model"]),
        weights=normalize_weights(str(reload["weights"])),
        mode="network",
        layers=",".join(x.select for x in served.atlas.layers),
        size=size,
        image=None,
        source=hit.image.replace("\\", "/").rsplit("/", 1)[-1],
        client=request.client.host if request.client else "",
    )
    picture = load_image(served.atlas.file_of(hit.image), max_pixels=int(opts["max_image_pixels"]))
    job = viewer.admit(req)
    if not job.is_finished:
        try:
            image = viewer.fit_picture(req, picture)
        except BaseException:
            viewer.discard(job)
            raise
        viewer.enqueue(job, image)
    body = job.to_dict()
    body["page"] = "/?" + urlencode({"run": job.id, "layer": layer, "channel": channel})
    return JSONResponse(body, status_code=202, headers={"Location": f"/api/runs/{job.id}", **NO_STORE})


# --------------------------------------------------------------------------------------------------
# portraits
# --------------------------------------------------------------------------------------------------
def _atlas_use(served: ServedAtlas) -> Any:
    """``use(locked=True)``: the atlas's model (its lock held while it is optimized through)."""

    @contextlib.contextmanager
    def use(locked: bool = True) -> Iterator[Any]:
        with served.lock if locked else contextlib.nullcontext():
            yield served.atlas.model()

    return use


def _run_use(viewer: Viewer, run_id: str) -> Any:
    """``use(locked=True)``: the run's model (its forward-pass lock held while it is optimized through;
    a look-up in the portrait cache reads the weights only and takes no lock)."""

    @contextlib.contextmanager
    def use(locked: bool = True) -> Iterator[Any]:
        with (
            model_of_run(viewer, run_id, what="this portrait") as (model, lock),
            lock if locked else contextlib.nullcontext(),
        ):
            yield model

    return use


def _portrait_state(insight: Insight, key: tuple, use: Any, layer: str, channel: int, url: str) -> dict[str, Any]:
    state = insight.portraits.state(key)
    if state is not None and state["state"] in ("queued", "running", "failed"):
        return {**state, "url": None, "make": url}
    try:
        with use(locked=False) as model:
            image = insight.portraits.cached(model, layer, channel)
    except NotFound:
        raise
    except FeatureMapsError as exc:  # no model to make it with (offline weights, a model object...)
        return {"state": "unavailable", "error": one_line(exc), "progress": None, "url": None, "make": None}
    if image is None:
        return {"state": "none", "error": None, "progress": None, "url": None, "make": url}
    return {"state": "done", "error": None, "progress": None, "url": url + ".png", "make": url}


def _portrait_png(insight: Insight, use: Any, layer: str, channel: int) -> bytes:
    with use(locked=False) as model:
        image = insight.portraits.cached(model, layer, channel)
    if image is None:
        raise NotFound("no portrait of this channel yet; POST to its portrait URL (the page's Make portrait) first")
    return png(image)


def _atlas_portrait(insight: Insight, aid: str, layer: str, channel: int) -> tuple[ServedAtlas, tuple, Any, str]:
    served = insight.atlases.channel(aid, layer, channel)
    return served, ("atlas", served.id, layer, channel), _atlas_use(served), _base(served, layer, channel) + "/portrait"


@router.get("/api/atlases/{aid}/layers/{layer}/channels/{channel}/portrait.json")
def atlas_portrait_json(aid: str, layer: str, channel: int, insight: InsightDep) -> JSONResponse:
    _, key, use, url = _atlas_portrait(insight, aid, layer, channel)
    return JSONResponse(_portrait_state(insight, key, use, layer, channel, url), headers=NO_STORE)


@router.get("/api/atlases/{aid}/layers/{layer}/channels/{channel}/portrait.png")
def atlas_portrait_png(aid: str, layer: str, channel: int, insight: InsightDep) -> Response:
    _, _, use, _ = _atlas_portrait(insight, aid, layer, channel)
    return Response(_portrait_png(insight, use, layer, channel), media_type="image/png", headers=NO_STORE)


@router.post("/api/atlases/{aid}/layers/{layer}/channels/{channel}/portrait", status_code=202)
def atlas_portrait_make(aid: str, layer: str, channel: int, insight: InsightDep) -> JSONResponse:
    _, key, use, url = _atlas_portrait(insight, aid, layer, channel)
    state = insight.portraits.start(key, layer, channel, use)
    return JSONResponse({**state, "url": None, "make": url}, status_code=202, headers=NO_STORE)


def _run_channel(viewer: Viewer, run_id: str, index: int, channel: int) -> tuple[str, int]:
    """The run's layer ``index`` (its name and channel count), checked to hold ``channel``."""
    data = viewer.data(run_id)  # 409 while the run has no maps
    if not 0 <= index < len(data.entries):
        raise NotFound(f"layer {index} does not exist; this run has layers 0..{len(data.entries) - 1}")
    e = data.entries[index]
    if not e.is_spatial or not e.has_channels:
        raise NotFound(f"{e.name} has no channel maps (output {tuple(e.shape)})")
    if channel not in set(e.channel_ids()):
        raise NotFound(f"{e.name} has channels 0..{e.num_channels - 1}, not {channel}")
    return e.name, e.num_channels


def _run_portrait(insight: Insight, run_id: str, index: int, channel: int) -> tuple[tuple, Any, str, str]:
    viewer = insight.viewer
    name, _ = _run_channel(viewer, run_id, index, channel)
    rm = run_model(viewer, run_id)
    url = f"/api/runs/{run_id}/layers/{index}/channels/{channel}/portrait"
    return ("model", rm.name, rm.weights, name, channel), _run_use(viewer, run_id), name, url


@router.get("/api/runs/{run_id}/layers/{index}/channels/{channel}/page.json")
def run_channel_page(run_id: str, index: int, channel: int, insight: InsightDep, viewer: ViewerDep) -> JSONResponse:
    name, channels = _run_channel(viewer, run_id, index, channel)
    job = viewer.job(run_id)
    rm = run_model(viewer, run_id)
    base = f"/api/runs/{run_id}/layers/{index}"
    atlases = [
        {
            "id": served.id,
            "label": f"{served.atlas.folder.name} · {served.atlas.num_images} images",
            "channel_json": _base(served, name, channel) + ".json",
            "page": page_url(atlas=served.id, layer=name, channel=channel),
        }
        for served in insight.atlases.matching(rm.name, rm.weights, name)
    ]
    body = {
        "run": run_id,
        "model": job.info.get("model", rm.name),
        "weights": job.info.get("weights", rm.weights),
        "pretrained": job.info.get("pretrained"),
        "source": job.info.get("source"),
        "layer": {"index": index, "name": name, "channels": channels},
        "channel": channel,
        "channel_png": f"{base}/channels/{channel}.png",
        "channel_json": f"{base}/channels/{channel}.json",
        "overlay_png": f"{base}/overlay.png?channel={channel}",
        "input_png": f"/api/runs/{run_id}/input.png",
        "run_page": "/?" + urlencode({"run": run_id, "layer": name, "channel": channel}),
        "previous": page_url(run=run_id, layer=index, channel=channel - 1) if channel > 0 else None,
        "next": page_url(run=run_id, layer=index, channel=channel + 1) if channel + 1 < channels else None,
        "atlases": atlases,
        "portrait": f"{base}/channels/{channel}/portrait",
    }
    return JSONResponse(body, headers=NO_STORE)


@router.get("/api/runs/{run_id}/layers/{index}/channels/{channel}/portrait.json")
def run_portrait_json(run_id: str, index: int, channel: int, insight: InsightDep) -> JSONResponse:
    key, use, name, url = _run_portrait(insight, run_id, index, channel)
    return JSONResponse(_portrait_state(insight, key, use, name, channel, url), headers=NO_STORE)


@router.get("/api/runs/{run_id}/layers/{index}/channels/{channel}/portrait.png")
def run_portrait_png(run_id: str, index: int, channel: int, insight: InsightDep) -> Response:
    _, use, name, _ = _run_portrait(insight, run_id, index, channel)
    return Response(_portrait_png(insight, use, name, channel), media_type="image/png", headers=NO_STORE)


@router.post("/api/runs/{run_id}/layers/{index}/channels/{channel}/portrait", status_code=202)
def run_portrait_make(run_id: str, index: int, channel: int, insight: InsightDep) -> JSONResponse:
    key, use, name, url = _run_portrait(insight, run_id, index, channel)
    state = insight.portraits.start(key, name, channel, use)
    return JSONResponse({**state, "url": None, "make": url}, status_code=202, headers=NO_STORE)
