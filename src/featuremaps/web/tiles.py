"""Pictures for the viewer, drawn on demand from a stored run with :mod:`featuremaps.render`.

Every function takes a finished run's :class:`~featuremaps.maps.FeatureMaps` and already checked
parameters (see :class:`View`) and returns a PIL image or a JSON-able dict; the FastAPI layer adds
caching. Nothing here runs a model.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .. import render
from ..errors import NotFound, ParamError
from ..maps import FeatureMap, FeatureMaps
from ..reduce import REDUCTIONS
from ..stats import clean_number, clean_stats

#: Colormaps the viewer offers (requests naming another one get a 400).
CMAPS: tuple[str, ...] = (
    "viridis",
    "magma",
    "inferno",
    "plasma",
    "cividis",
    "gray",
    "turbo",
    "jet",
    "RdBu_r",
    "coolwarm",
    "seismic",
)
#: Longest side of a layer thumbnail, in pixels (bigger maps are block-averaged down).
THUMB_SIDE = 128
#: Tile side of channel grids in the page when the maps are larger than that.
GRID_TILE = 64
MAX_PER_PAGE = 512


@dataclass(frozen=True)
class View:
    """How maps are drawn: channel reduction, normalization and colormap (all validated)."""

    reduce: str = "mean"
    norm: str | tuple[float, float] = "map"
    cmap: str = "viridis"

    @property
    def diverging(self) -> bool:
        return render.is_diverging(self.cmap)

    def key(self) -> str:
        norm = self.norm if isinstance(self.norm, str) else f"fixed:{self.norm[0]:g},{self.norm[1]:g}"
        return f"reduce={self.reduce}&norm={norm}&cmap={self.cmap}"


def parse_view(reduce: str | None, norm: str | None, cmap: str | None) -> View:
    reduce = (reduce or "mean").strip().lower()
    if reduce not in REDUCTIONS:
        raise ParamError(f"unknown reduction {reduce!r}; use one of {', '.join(REDUCTIONS)}")
    try:
        spec = render.parse_norm(norm or "map")
    except render.RenderError as exc:
        raise ParamError(str(exc)) from None
    cmap = (cmap or "viridis").strip()
    if cmap not in CMAPS:
        raise ParamError(f"unknown colormap {cmap!r}; use one of {', '.join(CMAPS)}")
    return View(reduce, spec, cmap)


def _shrink(m: np.ndarray, side: int) -> np.ndarray:
    """Block-mean a 2-D map by an integer factor so that its longer side is at most about ``side``."""
    return render.block_mean(m, max(m.shape) // side)


class Tiles:
    """Draws a run's pictures; memoizes the per-run numbers that several pictures share."""

    def __init__(self, memo_size: int = 256):
        self._memo: OrderedDict[tuple, Any] = OrderedDict()
        self._memo_size = memo_size
        self._lock = threading.Lock()

    def _memoize(self, key: tuple, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._memo:
                self._memo.move_to_end(key)
                return self._memo[key]
        value = make()
        with self._lock:
            self._memo[key] = value
            while len(self._memo) > self._memo_size:
                self._memo.popitem(last=False)
        return value

    def forget(self, run_id: str) -> None:
        with self._lock:
            for key in [k for k in self._memo if k[0] == run_id]:
                del self._memo[key]

    # -- lookups -----------------------------------------------------------------------------------
    @staticmethod
    def entry(maps: FeatureMaps, index: int, *, spatial: bool = True) -> FeatureMap:
        if not 0 <= index < len(maps.entries):
            raise NotFound(
                f"layer {index} does not exist: this run has {len(maps.entries)} layers (0..{len(maps.entries) - 1})"
            )
        e = maps.entries[index]
        if spatial and not e.is_spatial:
            raise ParamError(f"{e.name} has output shape {tuple(e.shape)}, not (N, C, H, W): it has no maps to draw")
        return e

    @staticmethod
    def channel_position(e: FeatureMap, channel: int) -> int:
        ids = e.channel_ids()
        try:
            return ids.index(int(channel))
        except ValueError:
            raise NotFound(
                f"channel {channel} does not exist in {e.name} ({len(ids)} channels: 0..{len(ids) - 1})"
            ) from None

    def _global_full_range(self, run_id: str, maps: FeatureMaps) -> tuple[float, float]:
        """Min..max over every spatial layer's full output (from the stored per-layer numbers)."""

        def make() -> tuple[float, float]:
            los = [e.stats.min for e in maps.entries if e.is_spatial and math.isfinite(e.stats.min)]
            his = [e.stats.max for e in maps.entries if e.is_spatial and math.isfinite(e.stats.max)]
            return (min(los), max(his)) if los else (math.nan, math.nan)

        return self._memoize((run_id, "global-full"), make)

    def _reduced(self, run_id: str, maps: FeatureMaps, index: int, reduce: str) -> np.ndarray:
        e = maps.entries[index]
        method = e.reduction if (not e.has_channels) else reduce
        return self._memoize((run_id, "reduced", index, method), lambda: e.reduced(method).astype(np.float32))

    def _global_reduced_range(self, run_id: str, maps: FeatureMaps, reduce: str) -> tuple[float, float]:
        def make() -> tuple[float, float]:
            arrays = [self._reduced(run_id, maps, i, reduce) for i, e in enumerate(maps.entries) if e.is_spatial]
            return render.value_range(arrays, "global") if arrays else (math.nan, math.nan)

        return self._memoize((run_id, "global-reduced", reduce), make)

    def _channel_stats(self, run_id: str, e: FeatureMap, index: int) -> dict[str, list[float]]:
        def make() -> dict[str, list[float]]:
            arr = e.maps(0)
            flat = arr.reshape(arr.shape[0], -1)
            with np.errstate(all="ignore"):
                return {
                    "min": flat.min(axis=1).tolist(),
                    "max": flat.max(axis=1).tolist(),
                    "mean": flat.mean(axis=1, dtype=np.float64).tolist(),
                    "zero_fraction": (flat == 0).mean(axis=1).tolist(),
                }

        return self._memoize((run_id, "channels", index), make)

    # -- pictures ----------------------------------------------------------------------------------
    def thumb(self, run_id: str, maps: FeatureMaps, index: int, view: View) -> tuple[Image.Image, tuple[float, float]]:
        """The layer's channel reduction as a small picture (its own range unless global/fixed)."""
        self.entry(maps, index)
        m = self._reduced(run_id, maps, index, view.reduce)
        if isinstance(view.norm, tuple):
            lo, hi = view.norm
        elif view.norm == "global":
            lo, hi = self._global_reduced_range(run_id, maps, view.reduce)
        else:
            lo, hi = render.value_range(m, "map")
        lo, hi = render.finish_range(lo, hi, view.diverging)
        rgb = render.colorize(_shrink(m, THUMB_SIDE), cmap=view.cmap, vmin=lo, vmax=hi)
        return Image.fromarray(rgb), (lo, hi)

    def channel_range(
        self, run_id: str, maps: FeatureMaps, e: FeatureMap, m: np.ndarray, view: View
    ) -> tuple[float, float]:
        if isinstance(view.norm, tuple):
            lo, hi = view.norm
        elif view.norm == "layer":
            lo, hi = e.stats.min, e.stats.max
        elif view.norm == "global":
            lo, hi = self._global_full_range(run_id, maps)
        else:
            lo, hi = render.value_range(m, "map")
        return render.finish_range(lo, hi, view.diverging)

    def channel(
        self, run_id: str, maps: FeatureMaps, index: int, channel: int, view: View
    ) -> tuple[Image.Image, tuple[float, float]]:
        """One channel at its own resolution (the page enlarges it without smoothing)."""
        e = self.entry(maps, index)
        pos = self.channel_position(e, channel)
        m = e.maps(0)[pos]
        lo, hi = self.channel_range(run_id, maps, e, m, view)
        return Image.fromarray(render.colorize(m, cmap=view.cmap, vmin=lo, vmax=hi)), (lo, hi)

    def grid(
        self,
        run_id: str,
        maps: FeatureMaps,
        index: int,
        view: View,
        *,
        page: int,
        per_page: int,
        tile: int | None,
        top_k: int | None,
    ) -> tuple[Image.Image, dict[str, Any]]:
        """A page of the layer's channels with :func:`render.channel_grid`, and where each tile is."""
        e = self.entry(maps, index)
        ids = list(e.channel_ids())
        if top_k is not None:
            top_k = min(top_k, len(ids))
        global_range = self._global_full_range(run_id, maps) if view.norm == "global" else None
        if tile is None and e.spatial_size is not None and max(e.spatial_size) > GRID_TILE:
            tile = GRID_TILE
        try:
            im = render.channel_grid(
                e,
                top_k=top_k,
                page=page,
                per_page=per_page,
                cmap=view.cmap,
                norm=view.norm,
                tile_size=tile,
                global_range=global_range,
                global_layers=sum(1 for x in maps.entries if x.is_spatial),
            )
        except render.RenderError as exc:
            raise ParamError(str(exc)) from None
        geom: render.GridGeometry = im.info["grid"]
        shown = list(im.info["channels"])  # what the renderer drew, in tile order: the one selection rule
        total = top_k if top_k is not None else len(ids)
        layout = {
            "layer": index,
            "name": e.name,
            "n": geom.n,
            "rows": geom.rows,
            "cols": geom.cols,
            "x0": geom.x0,
            "y0": geom.y0,
            "sep": geom.sep,
            "tile_w": geom.tile_w,
            "tile_h": geom.tile_h,
            "label_h": geom.label_h,
            "cell_w": geom.cell_w,
            "cell_h": geom.cell_h,
            "width": im.width,
            "height": im.height,
            "channels": shown,
            "page": page,
            "per_page": per_page,
            "pages": max(1, math.ceil(total / per_page)),
            "total": total,
            "scale": list(im.info["scale"]) if im.info.get("scale") else None,
        }
        return im, layout

    def overlay(
        self, run_id: str, maps: FeatureMaps, index: int, view: View, *, channel: int | None, alpha: float
    ) -> Image.Image:
        e = self.entry(maps, index)
        if maps.image is None:
            raise ParamError("this run has no input picture to draw an overlay on")
        if channel is not None:
            self.channel_position(e, channel)
            m = e.maps(0)[self.channel_position(e, channel)]
            norm: Any = self.channel_range(run_id, maps, e, m, view)
        elif isinstance(view.norm, tuple) or view.norm == "global":
            m = self._reduced(run_id, maps, index, view.reduce)
            norm = view.norm if isinstance(view.norm, tuple) else self._global_reduced_range(run_id, maps, view.reduce)
            norm = render.finish_range(*norm, view.diverging)
        else:
            norm = "map"
        if isinstance(norm, tuple) and not norm[0] < norm[1]:
            norm = "map"
        try:
            return render.overlay(
                e, maps.image, reduce=view.reduce, channel=channel, alpha=alpha, cmap=view.cmap, norm=norm
            )
        except render.RenderError as exc:
            raise ParamError(str(exc)) from None

    def layer_info(self, run_id: str, maps: FeatureMaps, index: int) -> dict[str, Any]:
        e = self.entry(maps, index, spatial=False)
        info = layer_summary(e, index)
        if e.is_spatial and e.has_channels:
            info["channel_ids"] = list(e.channel_ids())
            info["channel_stats"] = {
                k: [clean_number(v) for v in vals] for k, vals in self._channel_stats(run_id, e, index).items()
            }
        return info


def layer_summary(e: FeatureMap, index: int) -> dict[str, Any]:
    """What the page lists of one layer."""
    return {
        "index": index,
        "name": e.name,
        "kind": e.kind,
        "type": e.type,
        "shape": list(e.shape),
        "spatial": e.is_spatial,
        "channels": e.num_channels,
        "stats": clean_stats(e.stats.as_dict()),
    }


def cmap_strip(cmap: str, width: int = 256) -> Image.Image:
    """A ``width x 1`` strip of the colormap, for the page's colour scales."""
    ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    return Image.fromarray(render.colorize(ramp, cmap=cmap, vmin=0.0, vmax=1.0))
