"""The one 2-D map drawn for a layer (one channel, or the channel reduction), and the colour ranges of several such maps."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import RenderError
from ..maps import FeatureMap
from ..reduce import REDUCTIONS
from .canvas import Canvas, fmt_number, shape_text
from .colors import PAD, finish_range, finite_minmax


# -- one 2-D map per layer ------------------------------------------------------------------------------------
def check_reduce(reduce: str) -> str:
    if reduce not in REDUCTIONS:
        raise RenderError(f"unknown reduce {reduce!r}; use one of {', '.join(REDUCTIONS)}")
    return reduce


def shape_caption(fmap: FeatureMap) -> str:
    """A map's shape for captions: ``CxHxW``, and for a token or channels-last output what it was
    (``768x14x14 from 197x768 tokens``)."""
    if fmap.spatial is None or fmap.map_shape == tuple(fmap.shape):
        return shape_text(fmap.shape[1:])
    maps = shape_text(fmap.map_shape[1:])
    if len(fmap.shape) == 3:
        return f"{maps} from {shape_text(fmap.shape[1:])} tokens"
    return f"{maps} from {shape_text(fmap.shape[1:])} (channels last)"


def layer_map(fmap: FeatureMap, reduce: str, channel: int | None, sample: int) -> tuple[np.ndarray, str]:
    """One 2-D map of a layer (a channel, or the channel ``reduce``) and what it is."""
    sample = check_sample(fmap, sample)
    if not fmap.is_spatial:
        raise RenderError(
            f"{fmap.name} has shape {tuple(fmap.shape)}, not (N, C, H, W); only spatial maps can be drawn"
        )
    if channel is not None:
        ids = fmap.channel_ids()
        if not fmap.has_channels:
            raise RenderError(
                f"{fmap.name} kept only its {fmap.reduction!r} reduction; capture with reduce=None to draw one channel"
            )
        try:
            pos = ids.index(int(channel))
        except (ValueError, TypeError):
            raise RenderError(
                f"channel {channel!r} is not in {fmap.name} ({len(ids)} channels: {ids[0]}..{ids[-1]})"
            ) from None
        return fmap.maps(sample)[pos], f"channel {channel}"
    check_reduce(reduce)
    method = reduce
    if not fmap.has_channels:
        method = fmap.reduction  # only that reduction was kept
    return fmap.reduced(method, sample), f"channel {method} of {fmap.num_channels}"


def entries_of(maps: Any) -> list[FeatureMap]:
    if isinstance(maps, FeatureMap):
        return [maps]
    if isinstance(maps, Mapping):
        return list(maps.values())
    if isinstance(maps, Iterable):
        out = list(maps)
        if all(isinstance(e, FeatureMap) for e in out):
            return out
    raise RenderError(f"expected FeatureMaps (or a list of FeatureMap), not {type(maps).__name__}")


def ranges_of(
    maps2d: Sequence[np.ndarray], spec: Any, div: bool, groups: Sequence[int] | None = None
) -> list[tuple[float, float]]:
    """One range per map: its own ("map", and "layer" when no groups), per group ("layer" with groups),
    all maps ("global"), or fixed."""
    if isinstance(spec, tuple):
        r = finish_range(*spec, div) if div else spec
        return [r] * len(maps2d)
    own = [finite_minmax(m) for m in maps2d]
    if spec == "global":
        lo = min((a for a, _ in own if math.isfinite(a)), default=math.nan)
        hi = max((b for _, b in own if math.isfinite(b)), default=math.nan)
        return [finish_range(lo, hi, div)] * len(maps2d)
    if spec == "layer" and groups is not None:
        out = []
        for g in groups:
            members = [own[i] for i, gg in enumerate(groups) if gg == g]
            lo = min((a for a, _ in members if math.isfinite(a)), default=math.nan)
            hi = max((b for _, b in members if math.isfinite(b)), default=math.nan)
            out.append(finish_range(lo, hi, div))
        return out
    return [finish_range(a, b, div) for a, b in own]


def scale_line(spec: Any, div: bool, rngs: Sequence[tuple[float, float]], per: str) -> str:
    centred = ", centred on 0" if div else ""
    if isinstance(spec, tuple):
        return f"scale: fixed [{fmt_number(rngs[0][0])}, {fmt_number(rngs[0][1])}]{centred}, values outside are clipped"
    if spec == "global":
        return f"scale: one global range [{fmt_number(rngs[0][0])}, {fmt_number(rngs[0][1])}] for all tiles{centred}"
    return f"scale: {per}{centred}"


def scale_footer(canvas: Canvas, y: int, spec: Any, div: bool, rngs: Sequence[tuple[float, float]]) -> None:
    width = min(canvas.width - 2 * PAD, 360)
    if spec == "global" or isinstance(spec, tuple):
        canvas.colorbar(PAD, y, width, rngs[0][0], rngs[0][1])
    else:
        canvas.colorbar(PAD, y, width, -1.0 if div else 0.0, 1.0, **map_colorbar_labels("map", div, "map"))


def check_fmap(fmap: Any, what: str) -> FeatureMap:
    if not isinstance(fmap, FeatureMap):
        raise RenderError(f"{what} draws one FeatureMap (e.g. maps['features.0']), not {type(fmap).__name__}")
    return fmap


def check_sample(fmap: FeatureMap, sample: int) -> int:
    n = int(fmap.shape[0]) if fmap.shape else 1
    if not isinstance(sample, (int, np.integer)) or not 0 <= sample < n:
        raise RenderError(f"sample {sample!r} is out of range: {fmap.name} has {n} sample(s), pick 0..{n - 1}")
    return int(sample)


def map_colorbar_labels(spec: Any, diverging: bool, unit: str = "tile") -> dict[str, str]:
    """Colorbar labels for per-map scales (no common numbers to write)."""
    if spec != "map":
        return {}
    if diverging:
        return {"low": f"-max|x| of each {unit}", "high": "+max|x|", "mid": "0"}
    return {"low": f"min (or 0) of each {unit}", "high": f"max of each {unit}", "mid": ""}
