"""Pictures of captured feature maps: channel grids, overviews, overlays, comparisons and filters.

Everything is drawn with numpy and Pillow; matplotlib is only asked for its colormap tables (no
figure is ever made), so rendering thousands of channels costs about as much as the forward pass.
Every function returns an RGB :class:`PIL.Image.Image`.

How values become colours (the same rule in every figure):

* A range ``(vmin, vmax)`` is cut into :data:`LEVELS` equal bins, bin ``i`` gets the colormap's
  colour at ``(i + 0.5) / LEVELS`` (``cmap(x, bytes=True)``); values outside the range are clipped
  to the end colours. For a diverging range ``(-m, m)`` the value 0 gets exactly ``cmap(0.5)``.
* ``norm`` says where the range comes from: ``"map"`` (each channel / map its own min..max, the
  default), ``"layer"`` (one range for all channels of the layer), ``"global"`` (one range across
  all layers of the figure, which makes the darkening by a ReLU visible), or a fixed range given as
  ``(vmin, vmax)`` or ``"fixed:VMIN,VMAX"``.
* ``diverging=True`` (automatic when ``cmap`` is a diverging colormap such as ``RdBu_r``) makes the
  range symmetric, ``±max|x|``, so that 0 sits on the colormap's centre colour.
* A constant map (``vmin == vmax``) is drawn in the colormap's low end (no division by zero); with
  a diverging range an all-zero map is drawn in the centre colour. NaN pixels are drawn in
  :data:`NAN_COLOR`, ``+inf``/``-inf`` in the high/low end; ranges are taken over finite values.

Every figure states its scale: a colorbar with the range, or a header line (per-map scales).
"""

from __future__ import annotations

import io
import math
import os
import re
import threading
import zlib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import FeatureMapsError
from .maps import FeatureMap, FeatureMaps
from .reduce import RANKINGS, REDUCTIONS

__all__ = [
    "RenderError",
    "GridGeometry",
    "NORMS",
    "LEVELS",
    "NAN_COLOR",
    "SEPARATOR_COLOR",
    "BACKGROUND_COLOR",
    "TEXT_COLOR",
    "MIN_TILE",
    "MAX_SIDE",
    "parse_norm",
    "is_diverging",
    "value_range",
    "colorize",
    "colorbar",
    "grid_layout",
    "grid_geometry",
    "depth_match",
    "channel_grid",
    "overview",
    "overlay",
    "side_by_side",
    "compare_runs",
    "filters",
    "save_png",
    "to_png_bytes",
    "render_layer_grids",
    "layer_filename",
]


class RenderError(FeatureMapsError, ValueError):
    """A rendering option is not usable (norm, colormap, channel, page, input...)."""


# -- constants --------------------------------------------------------------------------------------
#: The named normalizations (a fixed range is the fourth kind).
NORMS: tuple[str, ...] = ("map", "layer", "global")
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

_NAN = LEVELS  # palette indexes of the frame colours
_SEP = LEVELS + 1
_BG = LEVELS + 2
_TEXT0 = LEVELS + 2  # + anti-aliasing level 1..7 (7 = TEXT_COLOR)
_HEADER_FS = 12
_CAPTION_FS = 11
_RESERVED_H = 150  # room kept for the header and the colorbar when fitting a grid into MAX_SIDE

_DIVERGING_BASE = {
    "RdBu", "RdGy", "RdYlBu", "RdYlGn", "PuOr", "PRGn", "PiYG", "BrBG", "Spectral",
    "coolwarm", "bwr", "seismic", "berlin", "managua", "vanimo", "icefire", "vlag",
}
_DIVERGING = frozenset(_DIVERGING_BASE | {n + "_r" for n in _DIVERGING_BASE})


# -- colormaps and ranges ----------------------------------------------------------------------------
def _cmap_object(cmap: Any):
    import matplotlib

    if isinstance(cmap, str):
        try:
            return matplotlib.colormaps[cmap]
        except KeyError:
            raise RenderError(
                f"unknown colormap {cmap!r}; use a matplotlib colormap name such as viridis, magma, gray, jet or RdBu_r"
            ) from None
    from matplotlib.colors import Colormap

    if isinstance(cmap, Colormap):
        return cmap
    raise RenderError(f"a colormap is a matplotlib name such as 'viridis', not {type(cmap).__name__}")


def _cmap_name(cmap: Any) -> str:
    return cmap if isinstance(cmap, str) else getattr(cmap, "name", "custom")


def is_diverging(cmap: Any) -> bool:
    """True for diverging colormaps (``RdBu_r``, ``coolwarm``, ``bwr``, ``seismic``...)."""
    return _cmap_name(cmap) in _DIVERGING


def _resolve_cmap(cmap: Any, diverging: bool | None) -> tuple[Any, bool]:
    """``cmap=None`` -> viridis, or RdBu_r when diverging; ``diverging=None`` -> from the colormap."""
    if cmap is None:
        cmap = DEFAULT_DIVERGING_CMAP if diverging else DEFAULT_CMAP
    _cmap_object(cmap)  # validates
    return cmap, is_diverging(cmap) if diverging is None else bool(diverging)


def _build_palette(cmap: Any) -> np.ndarray:
    cm = _cmap_object(cmap)
    pal = np.empty((256, 3), np.uint8)
    pos = (np.arange(LEVELS) + 0.5) / LEVELS
    pal[:LEVELS] = np.asarray(cm(pos, bytes=True))[:, :3]
    pal[_NAN] = NAN_COLOR
    pal[_SEP] = SEPARATOR_COLOR
    bg, fg = np.array(BACKGROUND_COLOR, float), np.array(TEXT_COLOR, float)
    for level in range(8):
        pal[_TEXT0 + level] = np.round(bg + (fg - bg) * level / 7)
    pal[_TEXT0 + 8 :] = BACKGROUND_COLOR
    pal.flags.writeable = False
    return pal


@lru_cache(maxsize=64)
def _palette_cached(name: str) -> np.ndarray:
    return _build_palette(name)


def _palette(cmap: Any) -> np.ndarray:
    """``(256, 3)`` uint8: :data:`LEVELS` colormap colours, then NaN, separator, background, text."""
    return _palette_cached(cmap) if isinstance(cmap, str) else _build_palette(cmap)


def parse_norm(norm: Any) -> str | tuple[float, float]:
    """``"map"``, ``"layer"``, ``"global"``, or a fixed ``(vmin, vmax)`` (also written ``"fixed:-1,1"``)."""
    if isinstance(norm, str):
        text = norm.strip().lower()
        if text in NORMS:
            return text
        if text.startswith("fixed"):
            body = text[5:].lstrip(":= ")
            parts = [p for p in re.split(r"[,\s]+", body) if p]
            try:
                lo, hi = (float(p) for p in parts)
            except ValueError:
                raise RenderError(f"cannot read {norm!r}: write a fixed range as 'fixed:VMIN,VMAX', e.g. 'fixed:-1,1'") from None
            return _check_fixed(lo, hi, norm)
        raise RenderError(f"unknown norm {norm!r}; use 'map', 'layer', 'global', a (vmin, vmax) tuple or 'fixed:VMIN,VMAX'")
    if isinstance(norm, (tuple, list)) and len(norm) == 2:
        try:
            lo, hi = float(norm[0]), float(norm[1])
        except (TypeError, ValueError):
            raise RenderError(f"a fixed norm is two numbers (vmin, vmax), not {norm!r}") from None
        return _check_fixed(lo, hi, norm)
    raise RenderError(f"unknown norm {norm!r}; use 'map', 'layer', 'global', a (vmin, vmax) tuple or 'fixed:VMIN,VMAX'")


def _check_fixed(lo: float, hi: float, spec: Any) -> tuple[float, float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise RenderError(f"fixed norm {spec!r} needs finite vmin < vmax, e.g. (0, 1) or 'fixed:-1,1'")
    return (lo, hi)


def _finite_minmax(x: np.ndarray) -> tuple[float, float]:
    """Min and max of the finite values (NaN, NaN when there are none)."""
    if x.size == 0:
        return (math.nan, math.nan)
    lo, hi = float(np.min(x)), float(np.max(x))
    if math.isfinite(lo) and math.isfinite(hi):
        return lo, hi
    good = x[np.isfinite(x)]
    return (float(good.min()), float(good.max())) if good.size else (math.nan, math.nan)


def _channel_minmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Per-channel finite min and max of ``(C, H, W)`` (NaN for a channel without finite values),
    and whether every value is finite."""
    flat = x.reshape(x.shape[0], -1)
    lo, hi = flat.min(axis=1), flat.max(axis=1)
    if np.isfinite(lo).all() and np.isfinite(hi).all():
        return lo.astype(np.float64), hi.astype(np.float64), True
    masked = np.where(np.isfinite(flat), flat, np.nan)
    with np.errstate(all="ignore"), _quiet():
        lo, hi = np.nanmin(masked, axis=1), np.nanmax(masked, axis=1)
    return lo.astype(np.float64), hi.astype(np.float64), False


class _quiet:
    """Silence numpy's 'All-NaN slice' warnings."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def _finish_range(lo: float, hi: float, diverging: bool) -> tuple[float, float]:
    """Apply the diverging rule (``±max|x|``, ``(-1, 1)`` for all-zero data) and NaN guards."""
    if diverging:
        m = max(abs(lo) if math.isfinite(lo) else 0.0, abs(hi) if math.isfinite(hi) else 0.0)
        if m == 0.0:
            m = 1.0
        return (-m, m)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return (0.0, 0.0)
    return (lo, hi)


def value_range(arrays: np.ndarray | torch.Tensor | Iterable[Any], norm: Any = "layer", diverging: bool = False) -> tuple[float, float]:
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
            a_lo, a_hi = _finite_minmax(_to_numpy(a))
            if math.isfinite(a_lo):
                lo, hi = min(lo, a_lo), max(hi, a_hi)
        if not math.isfinite(lo):
            lo = hi = math.nan
    return _finish_range(lo, hi, diverging)


def _to_numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().float().cpu().numpy()
    return np.asarray(a, dtype=np.float32)


def _quantize(x: np.ndarray, vmin: Any, vmax: Any, finite: bool | None = None) -> np.ndarray:
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
        q[nan_mask] = _NAN
    return q


def colorize(array2d: Any, *, cmap: Any = "viridis", vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Colour a 2-D array (any shape works): uint8 ``(H, W, 3)``.

    Without ``vmin``/``vmax`` the array's own finite min..max is used (symmetric ``±max|x|`` for a
    diverging colormap). Constant arrays get the low end, NaN gets :data:`NAN_COLOR`.
    """
    a = _to_numpy(array2d)
    if vmin is None or vmax is None:
        lo, hi = value_range(a, "map", diverging=is_diverging(cmap))
        vmin = lo if vmin is None else vmin
        vmax = hi if vmax is None else vmax
    return _palette(cmap)[_quantize(a, vmin, vmax)]


# -- text --------------------------------------------------------------------------------------------
@lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


@lru_cache(maxsize=32)
def _line_height(size: int) -> int:
    f = _font(size)
    if hasattr(f, "getmetrics"):
        asc, desc = f.getmetrics()
        return int(asc + desc)
    return size + 3  # pragma: no cover


_FONT_LOCK = threading.Lock()  # FreeType faces are not safe to share between threads


@lru_cache(maxsize=16384)
def _text_width(text: str, size: int) -> int:
    with _FONT_LOCK:
        return int(math.ceil(_font(size).getlength(text))) + 1


@lru_cache(maxsize=16384)
def _text_indexes(text: str, size: int) -> np.ndarray:
    """The text as palette indexes (background where there is no ink), anti-aliased in 7 levels."""
    w, h = max(1, _text_width(text, size)), _line_height(size)
    im = Image.new("L", (w, h), 0)
    with _FONT_LOCK:
        ImageDraw.Draw(im).text((0, 0), text, font=_font(size), fill=255)
    level = (np.asarray(im, dtype=np.uint16) * 7 + 127) // 255
    out = (_TEXT0 + level).astype(np.uint8)
    out.flags.writeable = False
    return out


def _fit_text(text: str, size: int, max_width: int, keep: str = "end") -> str:
    """``text``, shortened with '…' (keeping its end or its start) to fit ``max_width`` pixels."""
    if _text_width(text, size) <= max_width:
        return text
    for k in range(len(text) - 1, 0, -1):
        cand = "…" + text[-k:] if keep == "end" else text[:k] + "…"
        if _text_width(cand, size) <= max_width:
            return cand
    return ""


def _wrap(items: Sequence[str], size: int, width: int, sep: str = "   ") -> list[str]:
    """Greedy lines that fit ``width`` pixels: ``items`` joined by ``sep``; an item goes whole onto the
    next line when it fits there, else it is broken at spaces (a word too long is shortened with '…')."""
    lines: list[str] = []
    cur = ""
    for item in items:
        item = item.strip()
        if not item:
            continue
        cand = item if not cur else cur + sep + item
        if _text_width(cand, size) <= width:
            cur = cand
            continue
        if _text_width(item, size) <= width:
            if cur:
                lines.append(cur)
            cur = item
            continue
        for j, word in enumerate(w for w in item.split(" ") if w):
            cand = word if not cur else cur + (" " if j else sep) + word
            if _text_width(cand, size) <= width:
                cur = cand
                continue
            if cur:
                lines.append(cur)
            cur = _fit_text(word, size, width)
    if cur:
        lines.append(cur)
    return lines


def _header_size(width: int) -> int:
    """Header font size for an image ``width`` px wide (bigger on big grids)."""
    return max(_HEADER_FS, min(18, width // 100))


def _describe_ids(ids: Sequence[str], limit: int = 12) -> str:
    """'3-17' for a run of consecutive numbers, else the first ``limit`` of them."""
    if len(ids) > 2 and all(i.isdigit() for i in ids):
        nums = [int(i) for i in ids]
        if nums == list(range(nums[0], nums[0] + len(nums))):
            return f"{nums[0]}-{nums[-1]}"
    return ", ".join(ids[:limit]) + (", …" if len(ids) > limit else "")


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    s = f"{v:.3g}"
    return "0" if s in ("-0", "0") else s


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


# -- the palette canvas -------------------------------------------------------------------------------
class _Canvas:
    """A figure drawn as palette indexes (one byte per pixel); colours come at the end."""

    def __init__(self, width: int, height: int):
        self.a = np.full((max(1, height), max(1, width)), _BG, np.uint8)

    @property
    def width(self) -> int:
        return self.a.shape[1]

    @property
    def height(self) -> int:
        return self.a.shape[0]

    def text(self, x: int, y: int, text: str, size: int = _CAPTION_FS, *, max_width: int | None = None,
             align: str = "left", keep: str = "end") -> int:
        if max_width is not None:
            text = _fit_text(text, size, max_width, keep)
        if not text:
            return 0
        t = _text_indexes(text, size)
        h, w = t.shape
        if align == "center":
            x -= w // 2
        elif align == "right":
            x -= w
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(self.width, x + w), min(self.height, y + h)
        if x1 <= x0 or y1 <= y0:
            return 0
        src = t[y0 - y : y1 - y, x0 - x : x1 - x]
        dst = self.a[y0:y1, x0:x1]
        np.copyto(dst, src, where=src != _TEXT0)
        return w

    def lines(self, x: int, y: int, lines: Sequence[str], size: int = _HEADER_FS, max_width: int | None = None) -> int:
        lh = _line_height(size) + 1
        for i, line in enumerate(lines):
            self.text(x, y + i * lh, line, size, max_width=max_width)
        return len(lines) * lh

    def colorbar(self, x: int, y: int, width: int, vmin: float, vmax: float, *, low: str | None = None,
                 high: str | None = None, mid: str | None = None, bar_height: int = 10, size: int = _CAPTION_FS) -> int:
        """A horizontal colour strip with its range written under it; returns the height used."""
        width = max(8, width)
        self.a[y : y + bar_height + 2, x : x + width] = _SEP
        ramp = (np.arange(width - 2) * LEVELS // max(1, width - 2)).astype(np.uint8)
        self.a[y + 1 : y + 1 + bar_height, x + 1 : x + width - 1] = ramp
        ty = y + bar_height + 3
        self.text(x, ty, low if low is not None else _fmt(vmin), size)
        self.text(x + width, ty, high if high is not None else _fmt(vmax), size, align="right")
        if mid is None and vmin < 0 < vmax:
            frac = (0 - vmin) / (vmax - vmin)
            if 0.2 <= frac <= 0.8:
                mid = "0"
                zx = x + 1 + int(round(frac * (width - 2)))
                self.a[y + bar_height + 2 : y + bar_height + 4, zx] = _SEP
                self.text(zx, ty, mid, size, align="center")
        elif mid is not None:
            self.text(x + width // 2, ty, mid, size, align="center")
        return bar_height + 3 + _line_height(size)

    def palette_image(self, cmap: Any) -> Image.Image:
        h, w = self.a.shape
        im = Image.frombytes("P", (w, h), np.ascontiguousarray(self.a).tobytes())
        im.putpalette(_palette(cmap).tobytes(), "RGB")
        return im

    def image(self, cmap: Any) -> Image.Image:
        return self.palette_image(cmap).convert("RGB")


def _colorbar_height(size: int = _CAPTION_FS, bar_height: int = 10) -> int:
    return bar_height + 3 + _line_height(size)


def colorbar(cmap: Any, vmin: float, vmax: float, *, width: int = 256, height: int = 36, label: str | None = None) -> Image.Image:
    """A horizontal colorbar labelled with its range (and 0 when the range crosses it)."""
    cmap, _ = _resolve_cmap(cmap, None)
    if not (math.isfinite(vmin) and math.isfinite(vmax)):
        raise RenderError(f"a colorbar needs a finite range, got ({vmin}, {vmax})")
    width = max(32, int(width))
    top = _line_height(_CAPTION_FS) + 2 if label else 0
    bar = max(4, int(height) - top - 3 - _line_height(_CAPTION_FS) - 2 * 2)
    c = _Canvas(width, top + _colorbar_height(bar_height=bar) + 4)
    if label:
        c.text(PAD, 1, label, _CAPTION_FS, max_width=width - 2 * PAD)
    c.colorbar(PAD, top + 2, width - 2 * PAD, vmin, vmax, bar_height=bar)
    im = c.image(cmap)
    im.info["scale"] = (float(vmin), float(vmax))
    return im


# -- resampling ------------------------------------------------------------------------------------------
def block_mean(x: np.ndarray, d: int) -> np.ndarray:
    """Block mean by an integer factor over the last two axes (the remainder is cropped)."""
    if d <= 1:
        return x
    h, w = x.shape[-2] // d * d, x.shape[-1] // d * d
    x = x[..., :h, :w]
    lead = x.shape[:-2]
    return x.reshape(*lead, h // d, d, w // d, d).mean(axis=(-3, -1), dtype=np.float32)


def _nearest(q: np.ndarray, th: int, tw: int) -> np.ndarray:
    """NEAREST resampling of the last two axes to ``(th, tw)`` (pixel centres kept in place)."""
    h, w = q.shape[-2:]
    if (h, w) == (th, tw):
        return q
    ri = ((np.arange(th) + 0.5) * h / th).astype(np.intp)
    ci = ((np.arange(tw) + 0.5) * w / tw).astype(np.intp)
    return q[..., ri[:, None], ci[None, :]]


def _frame(a: np.ndarray, x: int, y: int, size: int) -> None:
    """A 1-px separator outline of a ``size`` px square box (seen around non-square maps)."""
    a[y, x : x + size] = a[y + size - 1, x : x + size] = _SEP
    a[y : y + size, x] = a[y : y + size, x + size - 1] = _SEP


def _fit_box(h: int, w: int, box: int) -> tuple[int, int]:
    s = box / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def _map_to_indexes(m: np.ndarray, th: int, tw: int, vmin: float, vmax: float) -> np.ndarray:
    """A 2-D map as colour indexes of size ``(th, tw)``: area-averaged when shrinking, NEAREST when enlarging."""
    d = min(m.shape[0] // th, m.shape[1] // tw)
    if d >= 2:
        m = block_mean(m, d)
    return _nearest(_quantize(m, vmin, vmax), th, tw)


# -- grid geometry ---------------------------------------------------------------------------------------
def grid_layout(n: int) -> tuple[int, int]:
    """``(rows, cols)`` of a near-square grid of ``n`` tiles: one row for n <= 3, else
    ``cols = ceil(sqrt(n))`` and ``rows = ceil(n / cols)``."""
    n = int(n)
    if n < 1:
        raise RenderError(f"a grid needs at least one tile, got {n}")
    if n <= 3:
        return (1, n)
    cols = math.isqrt(n - 1) + 1
    return (math.ceil(n / cols), cols)


@dataclass(frozen=True)
class GridGeometry:
    """Where things are in a channel grid image (all in pixels; boxes are ``(left, top, right, bottom)``,
    right/bottom exclusive, as Pillow's ``crop`` takes them).

    The grid starts at ``(x0, y0)`` with a separator line; tile ``i`` (row ``i // cols``, column
    ``i % cols``) has its top-left corner at
    ``(x0 + sep + col * (tile_w + sep), y0 + sep + row * (tile_h + label_h + sep))``, with its label strip
    (``label_h`` pixels, 0 without labels) right under it. ``grid_w = cols * (tile_w + sep) + sep``,
    ``grid_h = rows * (tile_h + label_h + sep) + sep``; the image is ``width = max(grid_w + 2 * PAD,
    MIN_WIDTH)`` wide and ``height = y0 + grid_h + footer_h`` tall, with ``y0`` the header's height.
    """

    n: int
    rows: int
    cols: int
    map_h: int
    map_w: int
    tile_h: int
    tile_w: int
    label_h: int
    label_size: int
    sep: int
    x0: int
    y0: int
    footer_h: int

    @property
    def cell_h(self) -> int:
        return self.tile_h + self.label_h + self.sep

    @property
    def cell_w(self) -> int:
        return self.tile_w + self.sep

    @property
    def grid_w(self) -> int:
        return self.cols * self.cell_w + self.sep

    @property
    def grid_h(self) -> int:
        return self.rows * self.cell_h + self.sep

    @property
    def width(self) -> int:
        return max(self.grid_w + 2 * PAD, MIN_WIDTH)

    @property
    def height(self) -> int:
        return self.y0 + self.grid_h + self.footer_h

    @property
    def scale(self) -> float:
        """Tile pixels per map pixel (> 1 upscaled with NEAREST, < 1 area-averaged)."""
        return self.tile_w / self.map_w

    def tile_box(self, i: int) -> tuple[int, int, int, int]:
        if not 0 <= i < self.rows * self.cols:
            raise IndexError(f"tile {i} is outside a {self.rows}x{self.cols} grid")
        r, c = divmod(i, self.cols)
        left = self.x0 + self.sep + c * self.cell_w
        top = self.y0 + self.sep + r * self.cell_h
        return (left, top, left + self.tile_w, top + self.tile_h)

    def label_box(self, i: int) -> tuple[int, int, int, int]:
        left, _, right, bottom = self.tile_box(i)
        return (left, bottom, right, bottom + self.label_h)


def _label_size(tile_w: int, labels: Sequence[str]) -> int:
    """Font size of channel labels for this tile width (0 = no labels: the tiles are too small)."""
    if not labels or tile_w < 24:
        return 0
    size = max(8, min(14, tile_w // 5))
    widest = max(labels, key=len)
    while size >= 8:
        if _text_width(widest, size) <= tile_w - 2:
            return size
        size -= 1
    return 0


def _plan_tiles(n: int, h: int, w: int, tile_size: int | None, labels: Sequence[str] | None) -> tuple[int, int, int, int, int, int]:
    """rows, cols, tile_h, tile_w, label_size, sep for ``n`` maps of ``h x w``."""
    rows, cols = grid_layout(n)
    if tile_size is None:
        k = math.ceil(MIN_TILE / max(h, w)) if max(h, w) < MIN_TILE else 1
        th, tw = h * k, w * k
    else:
        if not isinstance(tile_size, (int, np.integer)) or isinstance(tile_size, bool) or tile_size < 1:
            raise RenderError(f"tile_size is a tile's longer side in pixels (an int >= 1), not {tile_size!r}")
        th, tw = _fit_box(h, w, int(tile_size))
    sep = 2 if min(th, tw) >= 64 else 1

    def label_h_for(tw_: int) -> tuple[int, int]:
        size = _label_size(tw_, labels or [])
        return size, (_line_height(size) + 1 if size else 0)

    size, lh = label_h_for(tw)
    max_tw = (MAX_SIDE - 2 * PAD - sep * (cols + 1)) // cols
    max_th = (MAX_SIDE - _RESERVED_H - sep * (rows + 1)) // rows - lh
    if th > max_th or tw > max_tw:
        if tile_size is None and (h > max_th or w > max_tw):
            d = math.ceil(max(h / max(1, max_th), w / max(1, max_tw)))  # integer shrink: exact block means
            th, tw = max(1, h // d), max(1, w // d)
        elif tile_size is None:
            k = max(1, min(max(1, max_th) // h, max(1, max_tw) // w))
            th, tw = h * k, w * k
        else:
            f = min(max(1, max_th) / th, max(1, max_tw) / tw)
            th, tw = max(1, int(th * f)), max(1, int(tw * f))
        size, lh = label_h_for(tw)
    return rows, cols, th, tw, size, sep


def grid_geometry(n: int, map_size: tuple[int, int], *, tile_size: int | None = None, labels: bool | Sequence[str] = True,
                  header_h: int = 0, footer_h: int = 0) -> GridGeometry:
    """The geometry :func:`channel_grid` uses for ``n`` maps of ``map_size = (H, W)``.

    Tiles are the map size, upscaled by an integer factor (NEAREST) to at least :data:`MIN_TILE`
    pixels, or scaled down (block means) so that the image stays within :data:`MAX_SIDE`; with
    ``tile_size`` the longer tile side is ``tile_size`` (still bounded by :data:`MAX_SIDE`).
    ``labels`` may be the label strings (their width decides the font size). ``header_h`` and
    ``footer_h`` are the heights above and below the grid (channel_grid measures its own).
    """
    h, w = int(map_size[0]), int(map_size[1])
    if h < 1 or w < 1:
        raise RenderError(f"maps of size {h}x{w} have no pixels to draw")
    if labels is True:
        labels = [str(n - 1)]
    elif labels is False:
        labels = []
    rows, cols, th, tw, size, sep = _plan_tiles(n, h, w, tile_size, list(labels))
    lh = _line_height(size) + 1 if size else 0
    return GridGeometry(n, rows, cols, h, w, th, tw, lh, size, sep, PAD, header_h, footer_h)


# -- channel grids -----------------------------------------------------------------------------------------
def _check_fmap(fmap: Any, what: str) -> FeatureMap:
    if not isinstance(fmap, FeatureMap):
        raise RenderError(f"{what} draws one FeatureMap (e.g. maps['features.0']), not {type(fmap).__name__}")
    return fmap


def _check_sample(fmap: FeatureMap, sample: int) -> int:
    n = int(fmap.shape[0]) if fmap.shape else 1
    if not isinstance(sample, (int, np.integer)) or not 0 <= sample < n:
        raise RenderError(f"sample {sample!r} is out of range: {fmap.name} has {n} sample(s), pick 0..{n - 1}")
    return int(sample)


def _channel_stack(fmap: FeatureMap, sample: int) -> tuple[np.ndarray, list[str], str | None]:
    """The maps of one sample ``(C, H, W)`` float32, their labels, and a note for reduced captures."""
    if fmap.reduction is not None and not fmap.reduction.startswith("topk"):
        arr = fmap.tensor[sample].detach().float().cpu().numpy()[None]
        return arr, [fmap.reduction], f"only the channel {fmap.reduction} was kept"
    arr = fmap.maps(sample)
    return arr, [str(i) for i in fmap.channel_ids()], (f"top {arr.shape[0]} channels kept" if fmap.channels else None)


def _scale_note(spec: str | tuple[float, float], diverging: bool, rng: tuple[float, float] | None, n_global: int | None) -> str:
    centred = ", centred on 0" if diverging else ""
    if spec == "map":
        return f"scale: per channel (each tile {'±its max |value|' if diverging else 'its own min..max'}{centred})"
    assert rng is not None
    r = f"[{_fmt(rng[0])}, {_fmt(rng[1])}]"
    if spec == "layer":
        return f"scale: one range for the layer {r}{centred}"
    if spec == "global":
        if n_global is None:
            return f"scale: global = this layer's range {r}{centred} (one layer given)"
        return f"scale: global range {r} across {n_global} layers{centred}"
    return f"scale: fixed {r}{centred}, values outside are clipped"


def _map_colorbar_labels(spec: Any, diverging: bool, unit: str = "tile") -> dict[str, str]:
    """Colorbar labels for per-map scales (no common numbers to write)."""
    if spec != "map":
        return {}
    if diverging:
        return {"low": f"-max|x| of each {unit}", "high": "+max|x|", "mid": "0"}
    return {"low": f"min of each {unit}", "high": f"max of each {unit}", "mid": ""}


def _grid_canvas(fmap: FeatureMap, *, channels: Sequence[int] | None, top_k: int | None, by: str, page: int,
                 per_page: int | None, cmap: Any, norm: Any, diverging: bool | None, labels: bool,
                 tile_size: int | None, sample: int, global_range: tuple[float, float] | None = None,
                 global_layers: int | None = None) -> tuple[_Canvas, GridGeometry, Any, tuple[float, float] | None, list]:
    fmap = _check_fmap(fmap, "channel_grid")
    if not fmap.is_spatial:
        raise RenderError(
            f"channel_grid needs a spatial (N, C, H, W) map, but {fmap.name} has shape {tuple(fmap.shape)}; "
            "use overview() or the stats table for non-spatial outputs"
        )
    cmap, div = _resolve_cmap(cmap, diverging)
    spec = parse_norm(norm)
    sample = _check_sample(fmap, sample)
    arr, ids, note = _channel_stack(fmap, sample)
    C, H, W = arr.shape
    lo_c, hi_c, finite = _channel_minmax(arr)
    positions: np.ndarray | None = None  # None = all channels, in order
    sel_note = ""
    if channels is not None:
        lookup = {lab: p for p, lab in enumerate(ids)}
        try:
            positions = np.array([lookup[str(int(c))] for c in channels], dtype=np.intp)
        except KeyError as e:
            raise RenderError(
                f"channel {e.args[0]} is not in {fmap.name} (it has {C} channels: {ids[0]}..{ids[-1]}); pick from channel_ids()"
            ) from None
        except (TypeError, ValueError):
            raise RenderError(f"channels is a list of channel numbers, not {channels!r}") from None
        if positions.size == 0:
            raise RenderError("channels is empty; give at least one channel number or None for all")
        sel_note = f"{positions.size} chosen channels"
    if top_k is not None:
        if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1:
            raise RenderError(f"top_k is a number of channels >= 1, not {top_k!r}")
        if by not in RANKINGS:
            raise RenderError(f"top-k ranks channels by {' or '.join(RANKINGS)}, not {by!r}")
        pool = positions if positions is not None else np.arange(C)
        if by == "max":
            scores = hi_c[pool]
        else:
            flat = arr.reshape(C, -1)
            if finite:
                scores = (flat if positions is None else flat[pool]).mean(axis=1, dtype=np.float64)
            else:
                sub = flat[pool]
                with np.errstate(all="ignore"), _quiet():
                    scores = np.nanmean(np.where(np.isfinite(sub), sub, np.nan), axis=1)
        scores = np.where(np.isnan(scores), -np.inf, scores)
        order = np.argsort(-scores, kind="stable")[: int(top_k)]
        positions = pool[order]
        sel_note = f"top {positions.size} of {pool.size} channels by {by}"
    total = C if positions is None else positions.size
    if per_page is not None:
        if not isinstance(per_page, (int, np.integer)) or isinstance(per_page, bool) or per_page < 1:
            raise RenderError(f"per_page is a number of channels >= 1 (or None for all), not {per_page!r}")
        pages = max(1, math.ceil(total / per_page))
        if not isinstance(page, (int, np.integer)) or not 0 <= page < pages:
            raise RenderError(
                f"page {page!r} is out of range: {total} channels at {per_page} per page make {pages} page(s), pick 0..{pages - 1}"
            )
        if pages > 1:
            start, stop = int(page) * per_page, min(total, (int(page) + 1) * per_page)
            positions = np.arange(start, stop) if positions is None else positions[start:stop]
            sel_note = (sel_note + ", " if sel_note else "") + f"page {page + 1}/{pages}"
    elif page != 0:
        raise RenderError(f"page {page!r} needs per_page; with per_page=None all channels are on page 0")
    n = C if positions is None else positions.size
    shown = ids if positions is None else [ids[p] for p in positions]
    if positions is None:
        what = note or (f"all {C} channels" if C > 1 else "1 channel")
    else:
        first = _describe_ids(shown)
        what = f"{sel_note}: {first}" if sel_note.startswith("top") else f"{sel_note}: channels {first} of {C}"
    # -- colour ranges
    rng: tuple[float, float] | None = None
    if spec == "map":
        vlo = lo_c if positions is None else lo_c[positions]
        vhi = hi_c if positions is None else hi_c[positions]
        if div:
            m = np.maximum(np.abs(np.nan_to_num(vlo)), np.abs(np.nan_to_num(vhi)))
            m[m == 0] = 1.0
            vlo, vhi = -m, m
        else:
            bad = ~(np.isfinite(vlo) & np.isfinite(vhi))
            vlo, vhi = np.where(bad, 0.0, vlo), np.where(bad, 0.0, vhi)
        vlo, vhi = vlo[:, None, None], vhi[:, None, None]
    else:
        if isinstance(spec, tuple):
            rng = _finish_range(*spec, div) if div else spec
        elif spec == "global" and global_range is not None:
            rng = _finish_range(*global_range, div)
        else:
            with _quiet():
                rng = _finish_range(float(np.nanmin(lo_c)) if np.isfinite(lo_c).any() else math.nan,
                                    float(np.nanmax(hi_c)) if np.isfinite(hi_c).any() else math.nan, div)
        vlo, vhi = rng
    # -- geometry
    label_list = shown if labels else []
    rows, cols, th, tw, lsize, sep = _plan_tiles(n, H, W, tile_size, label_list)
    lh = _line_height(lsize) + 1 if lsize else 0
    geom = GridGeometry(n, rows, cols, H, W, th, tw, lh, lsize, sep, PAD, 0, 0)
    width = geom.width
    items = [
        f"{fmap.name}",
        f"{fmap.kind} · {fmap.type}",
        f"output {_shape_text(fmap.shape)}" + (f" (sample {sample})" if fmap.shape[0] > 1 else ""),
        what,
        f"{H}x{W} maps shown at {th}x{tw} px" if (th, tw) != (H, W) else "",
        _scale_note(spec if isinstance(spec, str) else "fixed", div, rng, global_layers if spec == "global" and global_range is not None else None),
    ]
    if isinstance(spec, tuple):
        items[-1] = _scale_note(spec, div, rng, None)
    hfs = _header_size(width)
    lines = _wrap(items, hfs, width - 2 * PAD)
    header_h = PAD + len(lines) * (_line_height(hfs) + 1) + 3
    footer_h = 4 + _colorbar_height() + PAD
    geom = GridGeometry(n, rows, cols, H, W, th, tw, lh, lsize, sep, PAD, header_h, footer_h)
    canvas = _Canvas(geom.width, geom.height)
    canvas.lines(PAD, PAD, lines, hfs)
    # -- tiles: shrink (floats), quantize, enlarge (indexes), place with array views
    src = arr if positions is None else arr[positions]
    d = min(H // th, W // tw)
    if d >= 2:
        src = block_mean(src, d)
    q = _quantize(src, vlo, vhi, finite)
    k = 1
    qh, qw = q.shape[1:]
    if (th, tw) != (qh, qw):
        if th % qh == 0 and tw % qw == 0 and th // qh == tw // qw:
            k = th // qh
        else:
            q = _nearest(q, th, tw)
            qh, qw = th, tw
    slots = rows * cols
    if slots > n:
        q = np.concatenate([q, np.full((slots - n, qh, qw), _BG, np.uint8)])
    G = canvas.a
    gx, gy = geom.x0, geom.y0
    G[gy : gy + geom.grid_h, gx : gx + geom.grid_w] = _SEP
    inner = G[gy + sep : gy + sep + rows * geom.cell_h, gx + sep : gx + sep + cols * geom.cell_w]
    V = np.reshape(inner, (rows, geom.cell_h, cols, geom.cell_w), copy=False)
    tiles = q.reshape(rows, cols, qh, qw).transpose(0, 2, 1, 3)
    if k == 1:
        V[:, :th, :, :tw] = tiles
    else:
        T = np.reshape(V[:, :th, :, :tw], (rows, qh, k, cols, qw, k), copy=False)
        T[...] = tiles[:, :, None, :, :, None]
    if lh:
        strip = np.full((slots, lh, tw), _BG, np.uint8)
        for i, lab in enumerate(shown):
            t = _text_indexes(lab, lsize)
            w_ = min(t.shape[1], tw - 1)
            strip[i, : t.shape[0], 1 : 1 + w_] = t[:lh, :w_]
        V[:, th : th + lh, :, :tw] = strip.reshape(rows, cols, lh, tw).transpose(0, 2, 1, 3)
    if slots > n:  # no frame around the empty slots of the last row
        left = gx + sep + (n % cols) * geom.cell_w
        G[gy + sep + (rows - 1) * geom.cell_h : gy + geom.grid_h, left : gx + geom.grid_w] = _BG
    # -- footer: the scale
    bar_w = min(geom.width - 2 * PAD, 360)
    canvas.colorbar(PAD, gy + geom.grid_h + 4, bar_w, float(np.min(vlo)) if spec == "map" else vlo,
                    float(np.max(vhi)) if spec == "map" else vhi, **_map_colorbar_labels(spec, div))
    return canvas, geom, cmap, rng, [int(i) if i.isdigit() else i for i in shown]


def channel_grid(fmap: FeatureMap, *, channels: Sequence[int] | None = None, top_k: int | None = None, by: str = "mean",
                 page: int = 0, per_page: int | None = 256, cmap: Any = None, norm: Any = "map",
                 diverging: bool | None = None, labels: bool = True, tile_size: int | None = None, sample: int = 0,
                 global_range: tuple[float, float] | None = None, palette: bool = False) -> Image.Image:
    """All channels of one layer as a grid of tiles, with a header and the scale.

    ``palette=True`` returns the 8-bit palette image (same pixels, much faster to encode as PNG).

    * ``channels``: original channel numbers to show (in that order); ``top_k``: only the k
      strongest by ``by`` (``mean`` or ``max`` over space), strongest first; then paging:
      ``page`` of ``per_page`` channels (``per_page=None`` shows all).
    * Tiles keep the map size, are upscaled by an integer factor (NEAREST) to at least
      :data:`MIN_TILE` px, or shrunk (block means) so the image stays within :data:`MAX_SIDE`;
      ``tile_size`` sets the longer tile side instead. 1-2 px separators in :data:`SEPARATOR_COLOR`.
    * ``labels`` writes each channel number in a strip under its tile (when tiles are >= 24 px).
    * ``cmap=None`` is viridis (RdBu_r when ``diverging``); ``norm`` as in the module doc; with
      ``norm="global"`` pass ``global_range`` (raw min, max across the layers), otherwise the
      layer's own range is used and the header says so.

    The layout is in ``image.info["grid"]`` (a :class:`GridGeometry`), the original channel number
    of each tile in ``image.info["channels"]``, the colour range in ``image.info["scale"]`` (None for
    per-channel scales).
    """
    canvas, geom, cmap, rng, shown = _grid_canvas(
        fmap, channels=channels, top_k=top_k, by=by, page=page, per_page=per_page, cmap=cmap, norm=norm,
        diverging=diverging, labels=labels, tile_size=tile_size, sample=sample, global_range=global_range,
    )
    im = canvas.palette_image(cmap) if palette else canvas.image(cmap)
    im.info["grid"] = geom
    im.info["channels"] = shown
    im.info["scale"] = rng
    return im


# -- one 2-D map per layer ------------------------------------------------------------------------------------
def _check_reduce(reduce: str) -> str:
    if reduce not in REDUCTIONS:
        raise RenderError(f"unknown reduce {reduce!r}; use one of {', '.join(REDUCTIONS)}")
    return reduce


def _layer_map(fmap: FeatureMap, reduce: str, channel: int | None, sample: int) -> tuple[np.ndarray, str]:
    """One 2-D map of a layer (a channel, or the channel ``reduce``) and what it is."""
    sample = _check_sample(fmap, sample)
    if not fmap.is_spatial:
        raise RenderError(f"{fmap.name} has shape {tuple(fmap.shape)}, not (N, C, H, W); only spatial maps can be drawn")
    if channel is not None:
        ids = fmap.channel_ids()
        if fmap.reduction is not None and not fmap.reduction.startswith("topk"):
            raise RenderError(f"{fmap.name} kept only its {fmap.reduction!r} reduction; capture with reduce=None to draw one channel")
        try:
            pos = ids.index(int(channel))
        except (ValueError, TypeError):
            raise RenderError(f"channel {channel!r} is not in {fmap.name} ({len(ids)} channels: {ids[0]}..{ids[-1]})") from None
        return fmap.maps(sample)[pos], f"channel {channel}"
    _check_reduce(reduce)
    method = reduce
    if fmap.reduction is not None and not fmap.reduction.startswith("topk"):
        method = fmap.reduction  # only that reduction was kept
    return fmap.reduced(method, sample), f"channel {method} of {fmap.num_channels}"


def _entries(maps: Any) -> list[FeatureMap]:
    if isinstance(maps, FeatureMap):
        return [maps]
    if isinstance(maps, Mapping):
        return list(maps.values())
    if isinstance(maps, Iterable):
        out = list(maps)
        if all(isinstance(e, FeatureMap) for e in out):
            return out
    raise RenderError(f"expected FeatureMaps (or a list of FeatureMap), not {type(maps).__name__}")


def _ranges(maps2d: Sequence[np.ndarray], spec: Any, div: bool, groups: Sequence[int] | None = None) -> list[tuple[float, float]]:
    """One range per map: its own ("map", and "layer" when no groups), per group ("layer" with groups),
    all maps ("global"), or fixed."""
    if isinstance(spec, tuple):
        r = _finish_range(*spec, div) if div else spec
        return [r] * len(maps2d)
    own = [_finite_minmax(m) for m in maps2d]
    if spec == "global":
        lo = min((a for a, _ in own if math.isfinite(a)), default=math.nan)
        hi = max((b for _, b in own if math.isfinite(b)), default=math.nan)
        return [_finish_range(lo, hi, div)] * len(maps2d)
    if spec == "layer" and groups is not None:
        out = []
        for g in groups:
            members = [own[i] for i, gg in enumerate(groups) if gg == g]
            lo = min((a for a, _ in members if math.isfinite(a)), default=math.nan)
            hi = max((b for _, b in members if math.isfinite(b)), default=math.nan)
            out.append(_finish_range(lo, hi, div))
        return out
    return [_finish_range(a, b, div) for a, b in own]


def _scale_line(spec: Any, div: bool, rngs: Sequence[tuple[float, float]], per: str) -> str:
    centred = ", centred on 0" if div else ""
    if isinstance(spec, tuple):
        return f"scale: fixed [{_fmt(rngs[0][0])}, {_fmt(rngs[0][1])}]{centred}, values outside are clipped"
    if spec == "global":
        return f"scale: one global range [{_fmt(rngs[0][0])}, {_fmt(rngs[0][1])}] for all tiles{centred}"
    return f"scale: {per}{centred}"


def _footer(canvas: _Canvas, y: int, spec: Any, div: bool, rngs: Sequence[tuple[float, float]]) -> None:
    width = min(canvas.width - 2 * PAD, 360)
    if spec == "global" or isinstance(spec, tuple):
        canvas.colorbar(PAD, y, width, rngs[0][0], rngs[0][1])
    else:
        canvas.colorbar(PAD, y, width, -1.0 if div else 0.0, 1.0, **_map_colorbar_labels("map", div, "map"))


def overview(maps: FeatureMaps | Iterable[FeatureMap], *, reduce: str = "mean", cmap: Any = None, norm: Any = "map",
             diverging: bool | None = None, tile_size: int = 128, columns: int | None = None, sample: int = 0) -> Image.Image:
    """One reduced 2-D map per spatial layer (channel ``reduce``: mean, max, l2 or std), each with its
    layer name, kind and shape written under it. Non-spatial entries (Linear outputs...) are skipped.

    ``norm``: ``"map"``/``"layer"`` give each tile its own range (one map per layer), ``"global"``
    one range for all tiles, or fixed. Maps are fitted into ``tile_size`` px squares (NEAREST when
    enlarged, block means when shrunk). ``image.info["tiles"]`` lists ``(name, box)`` per tile.
    """
    entries = [e for e in _entries(maps) if e.is_spatial]
    if not entries:
        raise RenderError("no spatial (N, C, H, W) maps to draw; capture conv, activation or pool layers")
    _check_reduce(reduce)
    cmap, div = _resolve_cmap(cmap, diverging)
    spec = parse_norm(norm)
    if not isinstance(tile_size, (int, np.integer)) or tile_size < 8:
        raise RenderError(f"tile_size is a tile's side in pixels (an int >= 8), not {tile_size!r}")
    pairs = [_layer_map(e, reduce, None, sample) for e in entries]
    maps2d = [m for m, _ in pairs]
    rngs = _ranges(maps2d, spec, div)
    n = len(entries)
    cols = grid_layout(n)[1] if columns is None else max(1, min(int(columns), n))
    rows = math.ceil(n / cols)
    gap = 8
    tile = int(min(tile_size, (MAX_SIDE - 2 * PAD) // cols - gap, (MAX_SIDE - _RESERVED_H) // rows - 40))
    cap_lh = _line_height(_CAPTION_FS)
    cell_w, cell_h = tile + gap, tile + 2 * cap_lh + 2 + gap
    width = max(2 * PAD + cols * cell_w - gap, MIN_WIDTH)
    model = maps.model if isinstance(maps, FeatureMaps) else None
    items = [
        f"{model}" if model else "",
        f"{maps.weights}" if isinstance(maps, FeatureMaps) else "",
        f"mode {maps.mode}" if isinstance(maps, FeatureMaps) else "",
        f"channel {reduce} of each spatial layer ({n} layers)",
        _scale_line(spec, div, rngs, "per map (each tile its own min..max)"),
    ]
    lines = _wrap(items, _HEADER_FS, width - 2 * PAD)
    header_h = PAD + len(lines) * (_line_height(_HEADER_FS) + 1) + 4
    height = header_h + rows * cell_h + _colorbar_height() + 2 * PAD
    c = _Canvas(width, height)
    c.lines(PAD, PAD, lines, _HEADER_FS)
    boxes = []
    for i, (e, m, (lo, hi)) in enumerate(zip(entries, maps2d, rngs)):
        r, col = divmod(i, cols)
        x, y = PAD + col * cell_w, header_h + r * cell_h
        th, tw = _fit_box(*m.shape, tile)
        ox, oy = x + (tile - tw) // 2, y + (tile - th) // 2
        _frame(c.a, x, y, tile)
        c.a[oy : oy + th, ox : ox + tw] = _map_to_indexes(m, th, tw, lo, hi)
        boxes.append((e.name, (ox, oy, ox + tw, oy + th)))
        c.text(x, y + tile + 1, e.name, _CAPTION_FS, max_width=tile)
        method = pairs[i][1]
        extra = "" if method.startswith(f"channel {reduce}") else f" [{method.split()[1]}]"
        c.text(x, y + tile + 1 + cap_lh, f"{e.kind} {_shape_text(e.shape[1:])}{extra}", _CAPTION_FS, max_width=tile)
    _footer(c, header_h + rows * cell_h + 2, spec, div, rngs)
    im = c.image(cmap)
    im.info["tiles"] = boxes
    im.info["scale"] = rngs[0] if (spec == "global" or isinstance(spec, tuple)) else None
    return im


def _as_rgb(image: Any, what: str) -> Image.Image:
    if image is None:
        raise RenderError(f"{what} needs the input picture; pass maps.image (it is None when the run had a raw tensor input)")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (np.ndarray, torch.Tensor)):
        a = _to_numpy(image) if isinstance(image, torch.Tensor) else np.asarray(image)
        if a.ndim == 3 and a.shape[0] == 3 and a.shape[2] != 3:
            a = a.transpose(1, 2, 0)
        if a.ndim == 2:
            a = np.stack([a] * 3, axis=-1)
        if a.ndim != 3 or a.shape[2] != 3:
            raise RenderError(f"{what} needs an RGB picture (H, W, 3), got an array of shape {a.shape}")
        if a.dtype != np.uint8:
            a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(a))
    raise RenderError(f"{what} needs a PIL image or an (H, W, 3) array, not {type(image).__name__}")


def _single_range(fmap: FeatureMap, m: np.ndarray, channel: int | None, spec: Any, div: bool, sample: int) -> tuple[float, float]:
    """Range of one drawn map: its own ("map"; also "layer"/"global" for a reduced map), the whole
    layer's ("layer"/"global" for one channel), or fixed."""
    if isinstance(spec, tuple):
        return _finish_range(*spec, div) if div else spec
    if spec != "map" and channel is not None:
        return value_range(fmap.maps(sample), "layer", div)
    return value_range(m, "map", div)


def overlay(fmap: FeatureMap, image: Any, *, reduce: str = "mean", channel: int | None = None, alpha: float = 0.5,
            cmap: Any = "jet", norm: Any = "map", diverging: bool | None = None, sample: int = 0,
            legend: bool = False) -> Image.Image:
    """The reduced map (or one ``channel``) upsampled (bilinear, pixel centres aligned) to the picture's
    size and blended over it: ``(1 - alpha) * picture + alpha * colours``. The output has the picture's
    size; ``legend=True`` adds a colorbar strip under it. The range is in ``image.info["scale"]``.
    """
    fmap = _check_fmap(fmap, "overlay")
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise RenderError(f"alpha is the heat map's opacity between 0 and 1, not {alpha!r}")
    cmap, div = _resolve_cmap(cmap, diverging)
    spec = parse_norm(norm)
    pic = _as_rgb(image, "overlay")
    m, what = _layer_map(fmap, reduce, channel, sample)
    vmin, vmax = _single_range(fmap, m, channel, spec, div, sample)
    heat = _heat(m, pic.size, vmin, vmax, cmap)
    out = np.asarray(pic, dtype=np.float32) * (1.0 - alpha) + heat.astype(np.float32) * alpha
    im = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
    if legend:
        bar = colorbar(cmap, vmin, vmax, width=pic.width, label=f"{fmap.name} · {what}")
        full = Image.new("RGB", (pic.width, pic.height + bar.height), BACKGROUND_COLOR)
        full.paste(im, (0, 0))
        full.paste(bar, (0, pic.height))
        im = full
    im.info["scale"] = (vmin, vmax)
    return im


def _heat(m: np.ndarray, size: tuple[int, int], vmin: float, vmax: float, cmap: Any) -> np.ndarray:
    """A 2-D map resized (bilinear) to ``size = (W, H)`` and coloured: uint8 ``(H, W, 3)``."""
    filled = np.nan_to_num(m.astype(np.float32), nan=vmin, posinf=vmax, neginf=vmin)
    up = np.asarray(Image.fromarray(np.ascontiguousarray(filled)).resize(size, Image.Resampling.BILINEAR))
    return _palette(cmap)[_quantize(up, vmin, vmax, True)]


def side_by_side(image: Any, fmap: FeatureMap, *, reduce: str = "mean", channel: int | None = None, cmap: Any = None,
                 norm: Any = "map", diverging: bool | None = None, height: int | None = None, alpha: float | None = None,
                 sample: int = 0) -> Image.Image:
    """The input picture next to one map of ``fmap`` (channel ``reduce`` or one ``channel``), both
    ``height`` px tall (default: the picture's height), with captions and the map's colorbar.
    The map is stretched over the picture's frame with NEAREST, so pixels line up. With ``alpha``, a
    third panel shows the :func:`overlay`."""
    fmap = _check_fmap(fmap, "side_by_side")
    cmap, div = _resolve_cmap(cmap, diverging)
    spec = parse_norm(norm)
    pic = _as_rgb(image, "side_by_side")
    m, what = _layer_map(fmap, reduce, channel, sample)
    vmin, vmax = _single_range(fmap, m, channel, spec, div, sample)
    ph = int(height) if height is not None else pic.height
    if ph < 16 or ph > MAX_SIDE // 2:
        raise RenderError(f"height must be between 16 and {MAX_SIDE // 2} px, not {ph}")
    pw = max(1, round(pic.width * ph / pic.height))
    pic = pic.resize((pw, ph), Image.Resampling.BILINEAR) if (pw, ph) != pic.size else pic
    panels = 3 if alpha is not None else 2
    gap = 10
    width = max(PAD * 2 + panels * pw + (panels - 1) * gap, MIN_WIDTH)
    cap_lh = _line_height(_CAPTION_FS)
    if spec == "map":
        scale = f"scale: this map's range [{_fmt(vmin)}, {_fmt(vmax)}]"
    else:
        kind = spec if isinstance(spec, str) else "fixed"
        scale = f"scale: {kind} range [{_fmt(vmin)}, {_fmt(vmax)}]"
    scale += ", centred on 0" if div else ""
    header = _wrap([f"{fmap.name} ({fmap.kind}, {fmap.type}) next to the input", scale], _HEADER_FS, width - 2 * PAD)
    header_h = PAD + len(header) * (_line_height(_HEADER_FS) + 1) + 4
    y_cap = header_h + ph + 2
    height_total = y_cap + 2 * cap_lh + 4 + _colorbar_height() + PAD
    c = _Canvas(width, height_total)
    c.lines(PAD, PAD, header, _HEADER_FS)
    x_map = PAD + pw + gap
    c.a[header_h : header_h + ph, x_map : x_map + pw] = _map_to_indexes(m, ph, pw, vmin, vmax)
    c.text(PAD, y_cap, f"input {pic.width}x{pic.height}" if height is None else "input", _CAPTION_FS, max_width=pw)
    c.text(x_map, y_cap, f"{fmap.name}", _CAPTION_FS, max_width=pw)
    c.text(x_map, y_cap + cap_lh, f"{what} · {_shape_text(m.shape)}", _CAPTION_FS, max_width=pw)
    c.colorbar(x_map, y_cap + 2 * cap_lh + 4, pw, vmin, vmax)
    if alpha is not None:
        c.text(x_map + pw + gap, y_cap, f"overlay (alpha {alpha:g})", _CAPTION_FS, max_width=pw)
    im = c.image(cmap)
    im.paste(pic, (PAD, header_h))
    if alpha is not None:
        im.paste(overlay(fmap, pic, reduce=reduce, channel=channel, alpha=alpha, cmap=cmap, norm=(vmin, vmax) if vmin < vmax else "map",
                         diverging=div, sample=sample), (x_map + pw + gap, header_h))
    im.info["scale"] = (vmin, vmax)
    return im


# -- comparisons ---------------------------------------------------------------------------------------------
def depth_match(n_columns: int, n_layers: int) -> list[int]:
    """Which of ``n_layers`` layers goes in each of ``n_columns`` columns, by relative depth.

    Column ``j`` shows layer ``floor(j * (n_layers - 1) / (n_columns - 1) + 0.5)``: the first column
    the first layer, the last column the last layer, evenly in between (one column: the last layer).
    With ``n_columns <= n_layers`` the picks are distinct and increasing. E.g. 5 columns over
    VGG16's 13 convs: 0, 3, 6, 9, 12.
    """
    if n_columns < 1 or n_layers < 1:
        raise RenderError(f"depth matching needs at least one column and one layer, got {n_columns} and {n_layers}")
    if n_columns == 1:
        return [n_layers - 1]
    return [int(math.floor(j * (n_layers - 1) / (n_columns - 1) + 0.5)) for j in range(n_columns)]


def _run_desc(fm: Any) -> str:
    return f"{fm.model} · {fm.mode}" if isinstance(fm, FeatureMaps) else ""


def compare_runs(runs: Mapping[str, FeatureMaps], *, reduce: str = "mean", norm: Any = "global", cmap: Any = None,
                 diverging: bool | None = None, tile_size: int = 112, max_columns: int | None = None,
                 sample: int = 0) -> Image.Image:
    """Rows = runs (e.g. the 'conv', 'conv-relu', 'conv-pool' chains, or two models), columns = spatial
    layers matched by depth.

    The number of columns is the smallest number of spatial layers among the runs (or
    ``max_columns``); each run picks its layers with :func:`depth_match` (column ``j`` -> layer
    ``round(j * (n - 1) / (columns - 1))`` of a run with ``n`` spatial layers), so VGG16's 13 convs
    against AlexNet's 5 give VGG16 layers 0, 3, 6, 9, 12. ``norm="global"`` (default) uses one range
    for every tile, which shows how a ReLU darkens a chain; ``"layer"`` one range per column;
    ``"map"`` each tile its own; or fixed. ``image.info["columns"]`` holds the layer names per run,
    ``image.info["tiles"]`` their boxes.
    """
    if not isinstance(runs, Mapping) or not runs:
        raise RenderError("compare_runs takes a mapping of at least one name -> FeatureMaps, e.g. {'conv': a, 'conv-relu': b}")
    _check_reduce(reduce)
    cmap, div = _resolve_cmap(cmap, diverging)
    spec = parse_norm(norm)
    spatial = {}
    for key, fm in runs.items():
        entries = [e for e in _entries(fm) if e.is_spatial]
        if not entries:
            raise RenderError(f"run {key!r} has no spatial (N, C, H, W) maps to compare; capture conv, activation or pool layers")
        spatial[str(key)] = (fm, entries)
    ncols = min(len(e) for _, e in spatial.values())
    if max_columns is not None:
        if int(max_columns) < 1:
            raise RenderError(f"max_columns must be >= 1, not {max_columns!r}")
        ncols = min(ncols, int(max_columns))
    picked = {k: [entries[i] for i in depth_match(ncols, len(entries))] for k, (_, entries) in spatial.items()}
    maps2d, groups = [], []
    for k, chosen in picked.items():
        for j, e in enumerate(chosen):
            maps2d.append(_layer_map(e, reduce, None, sample)[0])
            groups.append(j)
    rngs = _ranges(maps2d, spec, div, groups)
    nrows = len(picked)
    label_w = min(220, max(max(_text_width(k, _HEADER_FS), _text_width(f"{_run_desc(spatial[k][0])}", _CAPTION_FS))
                           for k in picked) + 2 * PAD)
    label_w = max(label_w, 60)
    gap = 6
    tile = int(min(tile_size, (MAX_SIDE - label_w - PAD) // ncols - gap))
    tile = max(16, tile)
    cap_lh = _line_height(_CAPTION_FS)
    cell_w, cell_h = tile + gap, tile + 2 * cap_lh + 2 + gap
    width = max(label_w + ncols * cell_w + PAD, MIN_WIDTH)
    lens = ", ".join(f"{k}: {len(spatial[k][1])}" for k in picked)
    items = [f"compare runs · channel {reduce}", f"columns matched by relative depth (spatial layers {lens})",
             _scale_line(spec, div, rngs, "per map" if spec == "map" else "one range per column")]
    lines = _wrap(items, _HEADER_FS, width - 2 * PAD)
    header_h = PAD + len(lines) * (_line_height(_HEADER_FS) + 1) + 4
    height = header_h + nrows * cell_h + _colorbar_height() + 2 * PAD
    c = _Canvas(width, height)
    c.lines(PAD, PAD, lines, _HEADER_FS)
    i = 0
    boxes: dict[str, list[str]] = {}
    tiles: dict[str, list[tuple[int, int, int, int]]] = {}
    for r, (k, chosen) in enumerate(picked.items()):
        y = header_h + r * cell_h
        fm = spatial[k][0]
        c.text(PAD, y + tile // 2 - _line_height(_HEADER_FS), k, _HEADER_FS, max_width=label_w - PAD)
        c.text(PAD, y + tile // 2 + 1, _run_desc(fm), _CAPTION_FS, max_width=label_w - PAD)
        boxes[k] = [e.name for e in chosen]
        tiles[k] = []
        for j, e in enumerate(chosen):
            x = label_w + j * cell_w
            m = maps2d[i]
            lo, hi = rngs[i]
            th, tw = _fit_box(*m.shape, tile)
            _frame(c.a, x, y, tile)
            ox, oy = x + (tile - tw) // 2, y + (tile - th) // 2
            c.a[oy : oy + th, ox : ox + tw] = _map_to_indexes(m, th, tw, lo, hi)
            tiles[k].append((ox, oy, ox + tw, oy + th))
            c.text(x, y + tile + 1, e.name, _CAPTION_FS, max_width=tile)
            c.text(x, y + tile + 1 + cap_lh, f"{e.kind} {_shape_text(e.shape[1:])}", _CAPTION_FS, max_width=tile)
            i += 1
    _footer(c, header_h + nrows * cell_h + 2, spec, div, rngs)
    im = c.image(cmap)
    im.info["columns"] = boxes
    im.info["tiles"] = tiles
    im.info["scale"] = rngs[0] if (spec == "global" or isinstance(spec, tuple)) else None
    return im


# -- filters -------------------------------------------------------------------------------------------------
def filters(weight: Any, *, cmap: Any = "RdBu_r", max_filters: int = 64, labels: bool = True, tile_size: int | None = None) -> Image.Image:
    """Conv kernels as tiles. ``weight`` is ``(out, in, kh, kw)`` (tensor or array) or an ``nn.Conv2d``.

    With 3 input channels (a first layer) each filter is an RGB tile scaled to its own min..max;
    otherwise each tile is the kernel's mean over input channels, in a diverging colormap centred
    on 0 with one symmetric range ``±max|w|`` for all shown filters (colorbar). Small kernels are
    enlarged with NEAREST (integer factor, to at least :data:`MIN_TILE` px or ``tile_size``).
    Only the first ``max_filters`` filters are drawn.
    """
    if isinstance(weight, torch.nn.Module):
        if not isinstance(getattr(weight, "weight", None), torch.Tensor):
            raise RenderError(f"filters needs a conv layer with a weight, not {type(weight).__name__}")
        weight = weight.weight
    w = _to_numpy(weight)
    if w.ndim != 4:
        raise RenderError(f"filters needs a conv weight (out, in, kh, kw) or an nn.Conv2d; got shape {tuple(w.shape)}")
    if not isinstance(max_filters, (int, np.integer)) or max_filters < 1:
        raise RenderError(f"max_filters must be an int >= 1, not {max_filters!r}")
    cmap, _ = _resolve_cmap(cmap, None)
    out_c, in_c, kh, kw = w.shape
    n = min(out_c, int(max_filters))
    rgb = in_c == 3
    long = max(kh, kw)
    if tile_size is not None and (not isinstance(tile_size, (int, np.integer)) or tile_size < 1):
        raise RenderError(f"tile_size is a tile's longer side in pixels (an int >= 1), not {tile_size!r}")
    k = max(1, int(tile_size) // long) if tile_size else max(1, math.ceil(MIN_TILE / long))
    ids = [str(i) for i in range(n)]
    rows, cols = grid_layout(n)
    k = max(1, min(k, (MAX_SIDE - 2 * PAD) // cols // kw - 1, (MAX_SIDE - _RESERVED_H) // rows // kh - 1))
    th, tw = kh * k, kw * k
    sep = 2 if min(th, tw) >= 64 else 1
    lsize = _label_size(tw, ids) if labels else 0
    lh = _line_height(lsize) + 1 if lsize else 0
    geom = GridGeometry(n, rows, cols, kh, kw, th, tw, lh, lsize, sep, PAD, 0, 0)
    shown = w[:n]
    if rgb:
        mode = "RGB, each filter scaled to its own min..max"
        rng = None
    else:
        mean = shown.mean(axis=1)
        rng = value_range(mean, "layer", diverging=True)
        mode = f"mean over {in_c} input channels, one range [{_fmt(rng[0])}, {_fmt(rng[1])}] centred on 0"
    items = [f"filters {n} of {out_c}", f"weight {_shape_text(w.shape)}", mode]
    lines = _wrap(items, _HEADER_FS, geom.width - 2 * PAD)
    header_h = PAD + len(lines) * (_line_height(_HEADER_FS) + 1) + 3
    footer_h = (4 + _colorbar_height() + PAD) if not rgb else PAD
    geom = GridGeometry(n, rows, cols, kh, kw, th, tw, lh, lsize, sep, PAD, header_h, footer_h)
    c = _Canvas(geom.width, geom.height)
    c.lines(PAD, PAD, lines, _HEADER_FS)
    c.a[header_h : header_h + geom.grid_h, PAD : PAD + geom.grid_w] = _SEP
    if not rgb:
        q = _quantize(mean, rng[0], rng[1])
    for i in range(geom.rows * geom.cols):
        x0, y0, x1, y1 = geom.tile_box(i)
        if i >= n:
            c.a[y0 : y1 + lh, x0:x1] = _BG
            continue
        c.a[y0:y1, x0:x1] = _BG if rgb else np.repeat(np.repeat(q[i], k, 0), k, 1)
        c.a[y1 : y1 + lh, x0:x1] = _BG
        if lh:
            c.text(x0 + 1, y1, ids[i], lsize, max_width=tw - 1)
    if not rgb:
        c.colorbar(PAD, header_h + geom.grid_h + 4, min(geom.width - 2 * PAD, 360), rng[0], rng[1])
    im = c.image(cmap)
    if rgb:
        arr = np.asarray(im).copy()
        f = shown.transpose(0, 2, 3, 1)  # (n, kh, kw, 3)
        lo = f.reshape(n, -1).min(axis=1)[:, None, None, None]
        hi = f.reshape(n, -1).max(axis=1)[:, None, None, None]
        span = hi - lo
        with np.errstate(all="ignore"):
            t = np.where(span > 0, (f - lo) / np.where(span > 0, span, 1.0), 0.5)
        tiles = np.clip(np.nan_to_num(t, nan=0.5) * 255 + 0.5, 0, 255).astype(np.uint8)
        for i in range(n):
            x0, y0, x1, y1 = geom.tile_box(i)
            arr[y0:y1, x0:x1] = np.repeat(np.repeat(tiles[i], k, 0), k, 1)
        im = Image.fromarray(arr)
    im.info["grid"] = geom
    im.info["scale"] = rng
    return im


# -- files ----------------------------------------------------------------------------------------------------
def to_png_bytes(image: Image.Image) -> bytes:
    """The image as PNG bytes (fast settings: no optimization, zlib level 1)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def save_png(image: Image.Image, path: str | os.PathLike[str], *, rle: bool = False) -> Path:
    """Write ``image`` as PNG (no optimization, zlib level 1: fast) and return the path.

    ``rle=True`` uses zlib's run-length strategy: about twice as fast to write, files ~1/3 bigger.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    extra = {"compress_type": zlib.Z_RLE} if rle else {}
    image.save(p, format="PNG", optimize=False, compress_level=1, **extra)
    return p




def layer_filename(index: int, name: str) -> str:
    """``{index:03d}_{name}.png`` with '#' written '_call' and other unsafe characters as '_'."""
    from .runs import safe_name

    return f"{int(index):03d}_{safe_name(name)}.png"


def render_layer_grids(maps: FeatureMaps | Iterable[FeatureMap], out_dir: str | os.PathLike[str], *, workers: int | None = None,
                       rle: bool = True, **grid_options: Any) -> list[Path]:
    """One :func:`channel_grid` PNG per spatial layer in ``out_dir`` (``{index:03d}_{name}.png``, index =
    the entry's execution index); returns the paths in layer order.

    ``grid_options`` are :func:`channel_grid`'s (``per_page`` defaults to None here: all channels of a
    layer in one file, bounded by :data:`MAX_SIDE`; ``norm="global"`` takes one range across all the
    layers). Files are written as palette PNGs (same pixels, a third of the bytes to compress), with
    zlib's RLE strategy unless ``rle=False`` (see :func:`save_png`); layers are rendered in ``workers`` threads (default: up to 4; numpy and
    zlib release the GIL).
    """
    entries = [e for e in _entries(maps) if e.is_spatial]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not entries:
        return []
    opts: dict[str, Any] = {
        "channels": None, "top_k": None, "by": "mean", "page": 0, "per_page": None, "cmap": None, "norm": "map",
        "diverging": None, "labels": True, "tile_size": None, "sample": 0,
    }
    unknown = set(grid_options) - set(opts)
    if unknown:
        raise RenderError(f"unknown channel_grid option(s): {', '.join(sorted(unknown))}; use {', '.join(opts)}")
    opts.update(grid_options)
    spec = parse_norm(opts["norm"])
    cmap, _ = _resolve_cmap(opts["cmap"], opts["diverging"])
    if spec == "global":
        lo, hi = math.inf, -math.inf
        for e in entries:
            arr, _, _ = _channel_stack(e, _check_sample(e, opts["sample"]))
            a, b = _finite_minmax(arr)
            if math.isfinite(a):
                lo, hi = min(lo, a), max(hi, b)
        opts["global_range"] = (lo, hi) if math.isfinite(lo) else (math.nan, math.nan)
        opts["global_layers"] = len(entries)

    def job(e: FeatureMap) -> Path:
        canvas, _, cm, _, _ = _grid_canvas(e, **opts)
        return save_png(canvas.palette_image(cm), out / layer_filename(e.index, e.name), rle=rle)

    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    if workers <= 1 or len(entries) == 1:
        return [job(e) for e in entries]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(job, entries))
