"""A run's layers: one layer's numbers, and its pictures drawn on demand from the stored maps
(thumbnail, channel grid and where each channel is in it, one channel, overlay)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from ...errors import ParamError
from ...stats import clean_number
from .. import tiles as T
from ..deps import Cached, get_cached, get_tiles, get_viewer, json_bytes, png
from ..jobs import Viewer

router = APIRouter(prefix="/api/runs/{run_id}/layers/{index}")
ViewerDep = Annotated[Viewer, Depends(get_viewer)]
TilesDep = Annotated[T.Tiles, Depends(get_tiles)]
CachedDep = Annotated[Cached, Depends(get_cached)]


@router.get("")
def layer(run_id: str, index: int, viewer: ViewerDep, tiles: TilesDep, cached: CachedDep) -> Response:
    viewer.job(run_id)
    return cached(
        f"{run_id}|layer|{index}",
        "application/json",
        lambda: json_bytes(tiles.layer_info(run_id, viewer.maps(run_id), index)),
        store=False,
    )


@router.get("/thumb.png")
def thumb(
    run_id: str,
    index: int,
    viewer: ViewerDep,
    tiles: TilesDep,
    cached: CachedDep,
    reduce: str = "mean",
    norm: str = "map",
    cmap: str = "viridis",
) -> Response:
    viewer.job(run_id)
    view = T.parse_view(reduce, norm, cmap)
    return cached(
        f"{run_id}|thumb|{index}|{view.key()}",
        "image/png",
        lambda: png(tiles.thumb(run_id, viewer.maps(run_id), index, view)[0]),
    )


def _grid_args(
    page: int, per_page: int, tile: int | None, top_k: int | None
) -> tuple[int, int, int | None, int | None]:
    if page < 0:
        raise ParamError("page must be 0 or more")
    if not 1 <= per_page <= T.MAX_PER_PAGE:
        raise ParamError(f"per_page must be between 1 and {T.MAX_PER_PAGE}")
    if tile is not None and not 8 <= tile <= 256:
        raise ParamError("tile must be between 8 and 256 pixels")
    if top_k is not None and top_k < 1:
        raise ParamError("top_k must be 1 or more")
    return page, per_page, tile, top_k


def _grid(
    run_id: str,
    index: int,
    viewer: Viewer,
    tiles: T.Tiles,
    cached: Cached,
    norm: str,
    cmap: str,
    page: int,
    per_page: int,
    tile: int | None,
    top_k: int | None,
    *,
    layout: bool,
) -> Response:
    """The grid picture, or (``layout``) where each channel sits in it: drawn together, cached apart."""
    viewer.job(run_id)
    view = T.parse_view(None, norm, cmap)
    args = _grid_args(page, per_page, tile, top_k)
    key = f"{run_id}|grid|{index}|{view.key()}&page={page}&per_page={per_page}&tile={tile}&top_k={top_k}"

    def both() -> tuple[bytes, bytes]:
        data, info = viewer.png_cache.get(key), viewer.png_cache.get(key + "|json")
        if data is None or info is None:
            im, layout_info = tiles.grid(
                run_id, viewer.maps(run_id), index, view, page=args[0], per_page=args[1], tile=args[2], top_k=args[3]
            )
            data, info = png(im), json_bytes(layout_info)
            viewer.png_cache.put(key, data)
            viewer.png_cache.put(key + "|json", info)
        return data, info

    return cached(
        key + ("|json" if layout else ""),
        "application/json" if layout else "image/png",
        lambda: both()[int(layout)],
        store=False,
    )


@router.get("/grid.png")
def grid_png(
    run_id: str,
    index: int,
    viewer: ViewerDep,
    tiles: TilesDep,
    cached: CachedDep,
    norm: str = "map",
    cmap: str = "viridis",
    page: int = 0,
    per_page: int = 128,
    tile: int | None = None,
    top_k: int | None = None,
) -> Response:
    return _grid(run_id, index, viewer, tiles, cached, norm, cmap, page, per_page, tile, top_k, layout=False)


@router.get("/grid.json")
def grid_json(
    run_id: str,
    index: int,
    viewer: ViewerDep,
    tiles: TilesDep,
    cached: CachedDep,
    norm: str = "map",
    cmap: str = "viridis",
    page: int = 0,
    per_page: int = 128,
    tile: int | None = None,
    top_k: int | None = None,
) -> Response:
    return _grid(run_id, index, viewer, tiles, cached, norm, cmap, page, per_page, tile, top_k, layout=True)


@router.get("/channels/{channel}.png")
def channel_png(
    run_id: str,
    index: int,
    channel: int,
    viewer: ViewerDep,
    tiles: TilesDep,
    cached: CachedDep,
    norm: str = "map",
    cmap: str = "viridis",
) -> Response:
    viewer.job(run_id)
    view = T.parse_view(None, norm, cmap)
    return cached(
        f"{run_id}|channel|{index}|{channel}|{view.key()}",
        "image/png",
        lambda: png(tiles.channel(run_id, viewer.maps(run_id), index, channel, view)[0]),
    )


@router.get("/channels/{channel}.json")
def channel_json(
    run_id: str,
    index: int,
    channel: int,
    viewer: ViewerDep,
    tiles: TilesDep,
    cached: CachedDep,
    norm: str = "map",
    cmap: str = "viridis",
) -> Response:
    viewer.job(run_id)
    view = T.parse_view(None, norm, cmap)

    def make() -> bytes:
        maps = viewer.maps(run_id)
        e = tiles.entry(maps, index)
        m = e.maps(0)[tiles.channel_position(e, channel)]
        lo, hi = tiles.channel_range(run_id, maps, e, m, view)
        return json_bytes(
            {
                "layer": index,
                "name": e.name,
                "channel": channel,
                "shape": list(m.shape),
                "min": clean_number(float(m.min())),
                "max": clean_number(float(m.max())),
                "mean": clean_number(float(m.mean())),
                "zero_fraction": float((m == 0).mean()),
                "scale": [clean_number(lo), clean_number(hi)],
            }
        )

    return cached(f"{run_id}|channeljson|{index}|{channel}|{view.key()}", "application/json", make)


@router.get("/overlay.png")
def overlay_png(
    run_id: str,
    index: int,
    viewer: ViewerDep,
    tiles: TilesDep,
    cached: CachedDep,
    channel: str = "",
    alpha: float = 0.5,
    reduce: str = "mean",
    norm: str = "map",
    cmap: str = "jet",
) -> Response:
    viewer.job(run_id)
    view = T.parse_view(reduce, norm, cmap)
    if not 0.0 <= alpha <= 1.0:
        raise ParamError("alpha is the heat map's opacity, between 0 and 1")
    alpha = round(alpha, 2)
    ch: int | None = None
    if channel.strip() not in ("", "none", "reduce"):
        try:
            ch = int(channel)
        except ValueError:
            raise ParamError(
                f"channel must be a channel number (or empty for the channel {view.reduce}), not {channel[:20]!r}"
            ) from None
    return cached(
        f"{run_id}|overlay|{index}|{ch}|{alpha:.2f}|{view.key()}",
        "image/png",
        lambda: png(tiles.overlay(run_id, viewer.maps(run_id), index, view, channel=ch, alpha=alpha)),
    )
