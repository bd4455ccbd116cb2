"""Pictures for the viewer, drawn on demand with :mod:`featuremaps.render` from what the viewer
keeps of a run (:class:`~featuremaps.web.compact.RunData`: numbers, reduced maps, the picture) and
its channel maps read when needed (``layer(i)``: every channel of layer ``i``; ``channel(i, pos)``:
one of them).

Every method takes already checked parameters (see :class:`View`) and returns a PIL image or a
JSON-able dict; the FastAPI layer adds caching. Nothing here runs a model.
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
from ..maps import FeatureMap
from ..reduce import REDUCTIONS
from ..stats import clean_number, clean_stats
from .compact import RunData, channel_entry, full_entry, reduced_entry

#: ``layer(i)``: every channel of layer ``i``, ``(C, H, W)``; ``channel(i, pos)``: one, ``(H, W)``.
LayerReader = Callable[[int], np.ndarray]
ChannelReader = Callable[[int, int], np.ndarray]

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
    def entry(data: RunData, index: int, *, spatial: bool = True) -> FeatureMap:
        n = len(data.entries)
        if not 0 <= index < n:
            raise NotFound(f"layer {index} does not exist: this run has {n} layers (0..{n - 1})")
        e = data.entries[index]
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

    @staticmethod
    def spatial_layers(data: RunData) -> int:
        return sum(1 for e in data.entries if e.is_spatial)

    def _global_full_range(self, run_id: str, data: RunData) -> tuple[float, float]:
        """Min..max over every spatial layer's full output (from the stored per-layer numbers)."""

        def make() -> tuple[float, float]:
            los = [e.stats.min for e in data.entries if e.is_spatial and math.isfinite(e.stats.min)]
            his = [e.stats.max for e in data.entries if e.is_spatial and math.isfinite(e.stats.max)]
            return (min(los), max(his)) if los else (math.nan, math.nan)

        return self._memoize((run_id, "global-full"), make)

    @staticmethod
    def _reduced(data: RunData, index: int, reduce: str) -> np.ndarray:
        m = data.reduced_map(index, reduce)
        if m is None:
            raise ParamError(f"{data.entries[index].name} has no channel {reduce} to draw")
        return m

    def _global_reduced_range(self, run_id: str, data: RunData, reduce: str) -> tuple[float, float]:
        def make() -> tuple[float, float]:
            arrays = [data.reduced_map(i, reduce) for i, e in enumerate(data.entries) if e.is_spatial]
            arrays = [a for a in arrays if a is not None]
            return render.value_range(arrays, "global") if arrays else (math.nan, math.nan)

        return self._memoize((run_id, "global-reduced", reduce), make)

    # -- pictures ----------------------------------------------------------------------------------
    def thumb(self, run_id: str, data: RunData, index: int, view: View) -> tuple[Image.Image, tuple[float, float]]:
        """The layer's channel reduction as a small picture (its own range unless global/fixed)."""
        self.entry(data, index)
        m = self._reduced(data, index, view.reduce)
        if isinstance(view.norm, tuple):
            lo, hi = view.norm
        elif view.norm == "global":
            lo, hi = self._global_reduced_range(run_id, data, view.reduce)
        else:
            lo, hi = render.value_range(m, "map")
        lo, hi = render.finish_range(lo, hi, view.diverging)
        rgb = render.colorize(_shrink(m, THUMB_SIDE), cmap=view.cmap, vmin=lo, vmax=hi)
        return Image.fromarray(rgb), (lo, hi)

    def channel_range(
        self, run_id: str, data: RunData, e: FeatureMap, m: np.ndarray, view: View
    ) -> tuple[float, float]:
        if isinstance(view.norm, tuple):
            lo, hi = view.norm
        elif view.norm == "layer":
            lo, hi = e.stats.min, e.stats.max
        elif view.norm == "global":
            lo, hi = self._global_full_range(run_id, data)
        else:
            lo, hi = render.value_range(m, "map")
        return render.finish_range(lo, hi, view.diverging)

    def channel_map(
        self, data: RunData, read: ChannelReader, index: int, channel: int
    ) -> tuple[FeatureMap, np.ndarray]:
        """A layer's entry and one of its channels, ``(H, W)`` float32."""
        e = self.entry(data, index)
        return e, read(index, self.channel_position(e, channel))

    def channel(
        self, run_id: str, data: RunData, read: ChannelReader, index: int, channel: int, view: View
    ) -> tuple[Image.Image, tuple[float, float]]:
        """One channel at its own resolution (the page enlarges it without smoothing)."""
        e, m = self.channel_map(data, read, index, channel)
        lo, hi = self.channel_range(run_id, data, e, m, view)
        return Image.fromarray(render.colorize(m, cmap=view.cmap, vmin=lo, vmax=hi)), (lo, hi)

    def grid(
        self,
        run_id: str,
        data: RunData,
        read: LayerReader,
        index: int,
        view: View,
        *,
        page: int,
        per_page: int,
        tile: int | None,
        top_k: int | None,
    ) -> tuple[Image.Image, dict[str, Any]]:
        """A page of the layer's channels with :func:`render.channel_grid`, and where each tile is."""
        e = self.entry(data, index)
        ids = list(e.channel_ids())
        if top_k is not None:
            top_k = min(top_k, len(ids))
        global_range = self._global_full_range(run_id, data) if view.norm == "global" else None
        if tile is None and e.spatial_size is not None and max(e.spatial_size) > GRID_TILE:
            tile = GRID_TILE
        full = full_entry(e, read(index))
        try:
            im = render.channel_grid(
                full,
                top_k=top_k,
                page=page,
                per_page=per_page,
                cmap=view.cmap,
                norm=view.norm,
                tile_size=tile,
                global_range=global_range,
                global_layers=self.spatial_layers(data),
            )
        except render.RenderError as exc:
            raise ParamError(str(exc)) from None
        del full
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
            "scale": [clean_number(float(v)) for v in im.info["scale"]] if im.info.get("scale") else None,
            "scale_note": im.info.get("scale_note"),
        }
        return im, layout

    def overlay(
        self,
        run_id: str,
        data: RunData,
        read: ChannelReader,
        index: int,
        view: View,
        *,
        channel: int | None,
        alpha: float,
    ) -> Image.Image:
        e = self.entry(data, index)
        if data.image is None:
            raise ParamError("this run has no input picture to draw an overlay on")
        if channel is not None:
            _, m = self.channel_map(data, read, index, channel)
            drawn = channel_entry(e, channel, m)
            norm: Any = self.channel_range(run_id, data, e, m, view)
        else:
            m = self._reduced(data, index, view.reduce)
            drawn = reduced_entry(e, m, view.reduce)
            if isinstance(view.norm, tuple) or view.norm == "global":
                norm = (
                    view.norm if isinstance(view.norm, tuple) else self._global_reduced_range(run_id, data, view.reduce)
                )
                norm = render.finish_range(*norm, view.diverging)
            else:
                norm = "map"
        if isinstance(norm, tuple) and not norm[0] < norm[1]:
            norm = "map"
        try:
            return render.overlay(
                drawn, data.image, reduce=view.reduce, channel=channel, alpha=alpha, cmap=view.cmap, norm=norm
            )
        except render.RenderError as exc:
            raise ParamError(str(exc)) from None

    @staticmethod
    def compare(runs: dict[str, RunData], view: View) -> Image.Image:
        """Runs side by side (:func:`render.compare_runs`: one kind of map per row, layers matched by depth)."""
        named = {label: data.reduced_maps(view.reduce) for label, data in runs.items()}
        try:
            return render.compare_runs(named, reduce=view.reduce, norm=view.norm, cmap=view.cmap, tile_size=96)
        except render.RenderError as exc:
            raise ParamError(str(exc)) from None

    def layer_info(self, run_id: str, data: RunData, index: int) -> dict[str, Any]:
        e = self.entry(data, index, spatial=False)
        info = layer_summary(e, index)
        numbers = data.numbers(index) if e.is_spatial and e.has_channels else None
        if numbers is not None:
            info["channel_ids"] = list(e.channel_ids())
            info["channel_stats"] = {
                k: [clean_number(v) for v in numbers[k]] for k in ("min", "max", "mean", "zero_fraction")
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
