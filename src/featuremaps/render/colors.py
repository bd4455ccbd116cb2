"""Colormaps, colour ranges and quantization: how values become colours (the rule is in :mod:`featuremaps.render`)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from ..options import check_cmap, parse_norm

# -- constants --------------------------------------------------------------------------------------
#: Number of colour bins of a colormap (the rest of the 256-entry palette holds the frame colours).
LEVELS = 240
NAN_COLOR = (255, 0, 255)
SEPARATOR_COLOR = (150, 150, 150)
BACKGROUND_COLOR = (255, 255, 255)
TEXT_COLOR = (20, 20, 20)
#: Smallest tile side an automatically sized channel tile gets (small maps are upscaled, NEAREST).
MIN_TILE = 48
#: Largest side of any grid image, in pixels (big maps and many channels are scaled down to fit).
MAX_SIDE = 4096
#: Margin around figures, in pixels.
PAD = 6
#: Smallest width of a grid image, so that its header stays readable with a single small tile.
MIN_WIDTH = 320
DEFAULT_CMAP = "viridis"
DEFAULT_DIVERGING_CMAP = "RdBu_r"

NAN_INDEX = LEVELS  # palette indexes of the frame colours
SEP_INDEX = LEVELS + 1
BG_INDEX = LEVELS + 2
TEXT_INDEX = LEVELS + 2  # + anti-aliasing level 1..7 (7 = TEXT_COLOR)
HEADER_FONT = 12
CAPTION_FONT = 11
RESERVED_H = 150  # room kept for the header and the colorbar when fitting a grid into MAX_SIDE

_DIVERGING_BASE = {
    "RdBu",
    "RdGy",
    "RdYlBu",
    "RdYlGn",
    "PuOr",
    "PRGn",
    "PiYG",
    "BrBG",
    "Spectral",
    "coolwarm",
    "bwr",
    "seismic",
    "berlin",
    "managua",
    "vanimo",
    "icefire",
    "vlag",
}
_DIVERGING = frozenset(_DIVERGING_BASE | {n + "_r" for n in _DIVERGING_BASE})


# -- colormaps and ranges ----------------------------------------------------------------------------
def cmap_name(cmap: Any) -> str:
    return cmap if isinstance(cmap, str) else getattr(cmap, "name", "custom")


def is_diverging(cmap: Any) -> bool:
    """True for diverging colormaps (``RdBu_r``, ``coolwarm``, ``bwr``, ``seismic``...)."""
    return cmap_name(cmap) in _DIVERGING


def resolve_cmap(cmap: Any, diverging: bool | None) -> tuple[Any, bool]:
    """``cmap=None`` -> viridis, or RdBu_r when diverging; ``diverging=None`` -> from the colormap."""
    if cmap is None:
        cmap = DEFAULT_DIVERGING_CMAP if diverging else DEFAULT_CMAP
    check_cmap(cmap)  # validates
    return cmap, is_diverging(cmap) if diverging is None else bool(diverging)


def _build_palette(cmap: Any) -> np.ndarray:
    cm = check_cmap(cmap)
    pal = np.empty((256, 3), np.uint8)
    pos = (np.arange(LEVELS) + 0.5) / LEVELS
    pal[:LEVELS] = np.asarray(cm(pos, bytes=True))[:, :3]
    pal[NAN_INDEX] = NAN_COLOR
    pal[SEP_INDEX] = SEPARATOR_COLOR
    bg, fg = np.array(BACKGROUND_COLOR, float), np.array(TEXT_COLOR, float)
    for level in range(8):
        pal[TEXT_INDEX + level] = np.round(bg + (fg - bg) * level / 7)
    pal[TEXT_INDEX + 8 :] = BACKGROUND_COLOR
    pal.flags.writeable = False
    return pal


@lru_cache(maxsize=64)
def _palette_cached(name: str) -> np.ndarray:
    return _build_palette(name)


def palette(cmap: Any) -> np.ndarray:
    """``(256, 3)`` uint8: :data:`LEVELS` colormap colours, then NaN, separator, background, text."""
    return _palette_cached(cmap) if isinstance(cmap, str) else _build_palette(cmap)


def finite_minmax(x: np.ndarray) -> tuple[float, float]:
    """Min and max of the finite values (NaN, NaN when there are none)."""
    if x.size == 0:
        return (math.nan, math.nan)
    lo, hi = float(np.min(x)), float(np.max(x))
    if math.isfinite(lo) and math.isfinite(hi):
        return lo, hi
    good = x[np.isfinite(x)]
    return (float(good.min()), float(good.max())) if good.size else (math.nan, math.nan)


def channel_minmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Per-channel finite min and max of ``(C, H, W)`` (NaN for a channel without finite values),
    and whether every value is finite."""
    flat = x.reshape(x.shape[0], -1)
    lo, hi = flat.min(axis=1), flat.max(axis=1)
    if np.isfinite(lo).all() and np.isfinite(hi).all():
        return lo.astype(np.float64), hi.astype(np.float64), True
    masked = np.where(np.isfinite(flat), flat, np.nan)
    with np.errstate(all="ignore"), quiet_nan_warnings():
        lo, hi = np.nanmin(masked, axis=1), np.nanmax(masked, axis=1)
    return lo.astype(np.float64), hi.astype(np.float64), False


class quiet_nan_warnings:
    """Silence numpy's 'All-NaN slice' warnings."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def anchor_zero(lo: Any, hi: Any) -> Any:
    """The low end of a range, moved down to 0 for non-negative data whose values would still
    cover at least half of the colour scale (``0 < lo <= hi - lo``): zero then sits at the dark
    end, so that a map after a ReLU (mostly zeros, or a positive mean) does not look like a signed
    one. Scalars or arrays (per-channel ranges); signed ranges are left as they are."""
    lo_a, hi_a = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        moved = np.where((lo_a > 0) & (lo_a <= hi_a - lo_a), 0.0, lo_a)
    return float(moved) if moved.ndim == 0 else moved


def finish_range(lo: float, hi: float, diverging: bool) -> tuple[float, float]:
    """The one rule that finishes every colour range taken from data: the diverging rule
    (``±max|x|``, ``(-1, 1)`` for all-zero data), else zero at the dark end for non-negative data
    (:func:`anchor_zero`); ``(0, 0)`` without finite values."""
    lo, hi = float(lo), float(hi)
    if diverging:
        m = max(abs(lo) if math.isfinite(lo) else 0.0, abs(hi) if math.isfinite(hi) else 0.0)
        if m == 0.0:
            m = 1.0
        return (-m, m)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return (0.0, 0.0)
    return (anchor_zero(lo, hi), hi)


def value_range(
    arrays: np.ndarray | torch.Tensor | Iterable[Any], norm: Any = "layer", diverging: bool = False
) -> tuple[float, float]:
    """The colour range of ``arrays`` (one array or several) under ``norm``.

    For ``"map"``, ``"layer"`` and ``"global"`` it is the min..max of all finite values of the
    arrays given (which arrays to give is the caller's choice: one map, one layer, or all layers);
    a fixed norm gives its own range. ``diverging`` makes it symmetric, ``(-m, m)`` with
    ``m = max|x|`` (``(-1, 1)`` when everything is zero). Without finite values the range is
    ``(0.0, 0.0)``, which :func:`colorize` draws in the colormap's low end.
    """
    spec = parse_norm(norm)
    if isinstance(spec, tuple):
        lo, hi = spec
    else:
        items = [arrays] if isinstance(arrays, (np.ndarray, torch.Tensor)) else list(arrays)
        lo, hi = math.inf, -math.inf
        for a in items:
            a_lo, a_hi = finite_minmax(to_numpy(a))
            if math.isfinite(a_lo):
                lo, hi = min(lo, a_lo), max(hi, a_hi)
        if not math.isfinite(lo):
            lo = hi = math.nan
    return finish_range(lo, hi, diverging)


def to_numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().float().cpu().numpy()
    return np.asarray(a, dtype=np.float32)


def quantize(x: np.ndarray, vmin: Any, vmax: Any, finite: bool | None = None) -> np.ndarray:
    """Colour-bin indexes (uint8, ``0..LEVELS-1``, NaN -> the NaN entry) of ``x`` under a range.

    ``vmin``/``vmax`` are scalars or arrays that broadcast against ``x`` (per-channel ranges).
    """
    x = np.asarray(x, dtype=np.float32)
    lo = np.asarray(vmin, dtype=np.float64)
    hi = np.asarray(vmax, dtype=np.float64)
    span = hi - lo
    with np.errstate(all="ignore"):
        scale = np.where(np.isfinite(span) & (span > 0), LEVELS / np.where(span > 0, span, 1.0), 0.0)
    lo = np.where(np.isfinite(lo), lo, 0.0).astype(np.float32)
    scale = scale.astype(np.float32)
    if finite is None:
        finite = bool(np.isfinite(np.min(x)) and np.isfinite(np.max(x))) if x.size else True
    nan_mask = None
    if not finite:
        nan_mask = np.isnan(x)
        big = np.finfo(np.float32).max
        x = np.nan_to_num(x, nan=0.0, posinf=big, neginf=-big)
    with np.errstate(all="ignore"):
        t = np.subtract(x, lo, dtype=np.float32)
        t *= scale
    if not finite:
        t[np.isnan(t)] = 0.0
    np.clip(t, 0, LEVELS - 1, out=t)
    q = t.astype(np.uint8)
    if nan_mask is not None and nan_mask.any():
        q[nan_mask] = NAN_INDEX
    return q


def colorize(
    array2d: Any, *, cmap: Any = "viridis", vmin: float | None = None, vmax: float | None = None
) -> np.ndarray:
    """Colour a 2-D array (any shape works): uint8 ``(H, W, 3)``.

    Without ``vmin``/``vmax`` the array's own finite min..max is used (symmetric ``±max|x|`` for a
    diverging colormap). Constant arrays get the low end, NaN gets :data:`NAN_COLOR`.
    """
    a = to_numpy(array2d)
    if vmin is None or vmax is None:
        lo, hi = value_range(a, "map", diverging=is_diverging(cmap))
        vmin = lo if vmin is None else vmin
        vmax = hi if vmax is None else vmax
    return palette(cmap)[quantize(a, vmin, vmax)]
