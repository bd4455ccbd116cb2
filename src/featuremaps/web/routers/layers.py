"""A run's layers: one layer's numbers, and its pictures drawn on demand from what the viewer keeps
(thumbnail, overlay of the channel reduction) or reads from the run folder (one channel, a channel
grid and where each channel is in it)."""

from __future__ import annotations

from dataclasses import dataclass
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
        lambda: json_bytes(tiles.layer_info(run_id, viewer.data(run_id), index)),
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
        lambda: png(tiles.thumb(run_id, viewer.data(run_id), index, view)[0]),
    )


@dataclass(frozen=True)
class GridQuery:
    """A channel grid's query (the view, and which page of channels at what tile size), checked."""

    norm: str = "map"
    cmap: str = "viridis"
    page: int = 0
    per_page: int = 128
    tile: int | None = None
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.page < 0:
            raise ParamError("page must be 0 or more")
        if not 1 <= self.per_page <= T.MAX_PER_PAGE:
            raise ParamError(f"per_page must be between 1 and {T.MAX_PER_PAGE}")
        if self.tile is not None and not 8 <= self.tile <= 256:
            raise ParamError("tile must be between 8 and 256 pixels")
        if self.top_k is not None and self.top_k < 1:
            raise ParamError("top_k must be 1 or more")


GridDep = Annotated[GridQuery, Depends()]


def _grid(
    run_id: str, index: int, viewer: Viewer, tiles: T.Tiles, cached: Cached, q: GridQuery, *, layout: bool
) -> Response:
    """The grid picture, or (``layout``) where each channel sits in it: drawn together, cached apart."""
    viewer.job(run_id)
    view = T.parse_view(None, q.norm, q.cmap)
    key = f"{run_id}|grid|{index}|{view.key()}&page={q.page}&per_page={q.per_page}&tile={q.tile}&top_k={q.top_k}"

    def both() -> tuple[bytes, bytes]:
        data, info = viewer.png_cache.get(key), viewer.png_cache.get(key + "|json")
        if data is None or info is None:
            run = viewer.data(run_id)
            tiles.entry(run, index)
            # a grid reads the whole layer: its memory is reserved first (waiting for others)
            with viewer.reserved(("grid", key), viewer.grid_memory(run_id, index), what="this channel grid"):
                im, layout_info = tiles.grid(
                    run_id, run, viewer.layer_reader(run_id), index, view,
                    page=q.page, per_page=q.per_page, tile=q.tile, top_k=q.top_k,
                )  # fmt: skip
                data, info = png(im), json_bytes(layout_info)
                del im
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
def grid_png(run_id: str, index: int, viewer: ViewerDep, tiles: TilesDep, cached: CachedDep, q: GridDep) -> Response:
    return _grid(run_id, index, viewer, tiles, cached, q, layout=False)


@router.get("/grid.json")
def grid_json(run_id: str, index: int, viewer: ViewerDep, tiles: TilesDep, cached: CachedDep, q: GridDep) -> Response:
    return _grid(run_id, index, viewer, tiles, cached, q, layout=True)


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
        lambda: png(tiles.channel(run_id, viewer.data(run_id), viewer.channel_reader(run_id), index, channel, view)[0]),
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
        data = viewer.data(run_id)
        e, m = tiles.channel_map(data, viewer.channel_reader(run_id), index, channel)
        lo, hi = tiles.channel_range(run_id, data, e, m, view)
        pos = tiles.channel_position(e, channel)
        numbers = data.numbers(index) or {}

        def number(key: str, fallback: float) -> float | None:  # of the full float32 output
            values = numbers.get(key)
            return clean_number(float(values[pos])) if values is not None else clean_number(fallback)

        return json_bytes(
            {
                "layer": index,
                "name": e.name,
                "channel": channel,
                "shape": list(m.shape),
                "min": number("min", float(m.min())),
                "max": number("max", float(m.max())),
                "mean": number("mean", float(m.mean())),
                "zero_fraction": number("zero_fraction", float((m == 0).mean())),
                "scale": [clean_number(lo), clean_number(hi)],
                "norm": view.norm if isinstance(view.norm, str) else "fixed",
                "scale_layers": tiles.spatial_layers(data) if view.norm == "global" else None,
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
        lambda: png(
            tiles.overlay(
                run_id, viewer.data(run_id), viewer.channel_reader(run_id), index, view, channel=ch, alpha=alpha
            )
        ),
    )
