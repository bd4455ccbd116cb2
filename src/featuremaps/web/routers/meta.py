"""What the page needs to build its menus (``/api/options``), the viewer's status, the previews
of the bundled samples and the colormap strips."""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from ... import render
from ...errors import NotFound
from ...images import list_samples, load_image
from ...models import is_cached, is_user_spec
from ...options import MODES
from ...reduce import REDUCTIONS
from ...version import __version__
from .. import tiles as T
from ..deps import Cached, get_cached, get_options, get_viewer, png
from ..forms import MIN_INPUT_SIZE
from ..jobs import LAYER_CHOICES, Viewer, weights_label

router = APIRouter(prefix="/api")


@router.get("/options")
def options(
    viewer: Annotated[Viewer, Depends(get_viewer)], opts: Annotated[dict, Depends(get_options)]
) -> dict[str, Any]:
    weights = [{"id": w, "label": weights_label(w), "pretrained": w != "random"} for w in opts["weights"]]
    weights += [
        {"id": f"checkpoint:{k}", "label": weights_label(f"checkpoint:{k}"), "pretrained": True}
        for k in opts["checkpoints"]
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
            "max_memory_bytes": viewer.memory.limit,
            "max_disk_bytes": viewer.disk.limit,
            "max_pending": viewer.max_pending,
            "max_pending_per_client": viewer.max_pending_per_client,
        },
    }


@router.get("/status")
def status(viewer: Annotated[Viewer, Depends(get_viewer)]) -> JSONResponse:
    jobs = viewer.jobs()
    body = {
        "forward_passes": viewer.forward_passes,
        "model_loads": viewer.models.loads,
        "models_loaded": viewer.models.loaded(),
        "runs": sum(1 for j in jobs if j.state == "done"),
        "pending": sum(1 for j in jobs if not j.is_finished),
        "maps_in_memory_bytes": viewer.cache.nbytes(),
        "png_cache": {"hits": viewer.png_cache.hits, "misses": viewer.png_cache.misses},
        **viewer.status(),
    }
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


@router.get("/samples/{name}.png")
def sample_png(name: str, cached: Annotated[Cached, Depends(get_cached)]) -> Response:
    if name not in list_samples():
        raise NotFound(f"no sample {name[:40]!r}; samples: {', '.join(list_samples())}")

    def make() -> bytes:
        im = load_image(f"sample:{name}")
        im.thumbnail((256, 256))
        return png(im)

    return cached(f"sample|{name}", "image/png", make)


@router.get("/cmaps/{name}.png")
def cmap_png(name: str, cached: Annotated[Cached, Depends(get_cached)]) -> Response:
    view = T.parse_view(None, None, name)
    return cached(f"cmap|{view.cmap}", "image/png", lambda: png(T.cmap_strip(view.cmap)))
