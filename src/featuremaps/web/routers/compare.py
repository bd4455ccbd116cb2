"""Runs side by side: ``/api/compare.png?runs=A,B`` (one kind of map per row, layers matched by depth,
a range per tile by default: ``render.compare_runs``, as ``featuremaps compare``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from ...errors import ParamError
from .. import tiles as T
from ..deps import Cached, get_cached, get_viewer, png
from ..jobs import Viewer

router = APIRouter(prefix="/api")


@router.get("/compare.png")
def compare_png(
    runs: str,
    viewer: Annotated[Viewer, Depends(get_viewer)],
    cached: Annotated[Cached, Depends(get_cached)],
    reduce: str = "mean",
    norm: str = "map",
    cmap: str = "viridis",
) -> Response:
    ids = [r for r in runs.split(",") if r]
    if not 2 <= len(ids) <= 4:
        raise ParamError("compare takes 2 to 4 run ids: runs=ID,ID")
    for r in ids:
        viewer.job(r)
    view = T.parse_view(reduce, norm, cmap)

    def make() -> bytes:
        named: dict[str, Any] = {}
        for n, r in enumerate(ids):
            data = viewer.data(r)
            named[f"{chr(65 + n)}: {data.model}"] = data
        return png(T.Tiles.compare(named, view))

    return cached(f"{','.join(ids)}|compare|{view.key()}", "image/png", make)
