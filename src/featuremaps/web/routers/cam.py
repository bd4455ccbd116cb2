"""The CAM panel of a run: class evidence (:func:`featuremaps.cam.cam`) on the run's picture, with the
run's model, shown beside its layer strip::

    GET /api/cam/methods                          the methods (gradcam, gradcam++, layercam) and their names
    GET /api/runs/{id}/cam.json   ?method=&target=&layer=&channels=
                                  the target, its probability, the top-5 classes, the map's layer and the
                                  channels that add most to it (each with the index of the run's layer that
                                  holds it, for a link to its tile in the grid)
    GET /api/runs/{id}/cam.png    ?method=&target=&layer=&alpha=&cmap=&legend=
                                  the CAM over the picture (``CamResult.overlay``)

``target``: a class index or a label (``tabby`` finds ``tabby cat``); empty: the most probable class.
``layer``: a layer of the model (default: the last spatial one, :func:`featuremaps.cam.default_layer`).
The CAM is computed once per (run, method, layer, target) and kept; its pictures are cached like the
run's other pictures.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from ...cam import CAM_METHODS, METHOD_NAMES
from ...errors import ParamError
from .. import tiles as T
from ..deps import Cached, get_cached, get_viewer, json_bytes, png
from ..insight import Insight, cam_json, check_alpha, parse_method
from ..jobs import Viewer
from .channels import get_insight

router = APIRouter(prefix="/api")
ViewerDep = Annotated[Viewer, Depends(get_viewer)]
CachedDep = Annotated[Cached, Depends(get_cached)]
InsightDep = Annotated[Insight, Depends(get_insight)]
MAX_LAYER_NAME = 200


def _args(method: str, target: str, layer: str) -> tuple[str, str, str]:
    if len(layer) > MAX_LAYER_NAME:
        raise ParamError(f"layer is a layer name of at most {MAX_LAYER_NAME} characters")
    return parse_method(method), target.strip(), layer.strip()


@router.get("/cam/methods")
def methods() -> JSONResponse:
    return JSONResponse({"methods": [{"id": m, "label": METHOD_NAMES[m]} for m in CAM_METHODS]})


@router.get("/runs/{run_id}/cam.json")
def cam_numbers(
    run_id: str, viewer: ViewerDep, insight: InsightDep, cached: CachedDep,
    method: str = "gradcam", target: str = "", layer: str = "", channels: int = 8,
) -> Response:  # fmt: skip
    viewer.job(run_id)
    method, target, layer = _args(method, target, layer)
    if not 1 <= channels <= 64:
        raise ParamError("channels is how many contributing channels to list, between 1 and 64")

    def make() -> bytes:
        result = insight.cams.result(run_id, method, layer, target)
        return json_bytes(cam_json(result, viewer.job(run_id).layers, channels=channels))

    return cached(f"{run_id}|cam|{method}|{layer}|{target}|{channels}", "application/json", make)


@router.get("/runs/{run_id}/cam.png")
def cam_picture(
    run_id: str, viewer: ViewerDep, insight: InsightDep, cached: CachedDep,
    method: str = "gradcam", target: str = "", layer: str = "", alpha: float = 0.5, cmap: str = "jet",
    legend: int = 1,
) -> Response:  # fmt: skip
    viewer.job(run_id)
    method, target, layer = _args(method, target, layer)
    alpha = check_alpha(alpha)
    cmap = T.parse_view(None, None, cmap).cmap
    if legend not in (0, 1):
        raise ParamError("legend is 1 (a colour bar and the title under the picture) or 0")

    def make() -> bytes:
        result = insight.cams.result(run_id, method, layer, target)
        return png(result.overlay(alpha=alpha, cmap=cmap, legend=bool(legend)))

    return cached(f"{run_id}|campng|{method}|{layer}|{target}|{alpha:.2f}|{cmap}|{legend}", "image/png", make)
