"""The palette canvas every figure is drawn on (one byte per pixel, colours at the end), its text and colorbars, and the resampling of maps into tiles."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import RenderError
from .colors import (
    BG_INDEX,
    CAPTION_FONT,
    HEADER_FONT,
    LEVELS,
    PAD,
    SEP_INDEX,
    TEXT_INDEX,
    palette,
    quantize,
    resolve_cmap,
)


# -- text --------------------------------------------------------------------------------------------
@lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


@lru_cache(maxsize=32)
def line_height(size: int) -> int:
    f = _font(size)
    if hasattr(f, "getmetrics"):
        asc, desc = f.getmetrics()
        return int(asc + desc)
    return size + 3  # pragma: no cover


_FONT_LOCK = threading.Lock()  # FreeType faces are not safe to share between threads


@lru_cache(maxsize=16384)
def text_width(text: str, size: int) -> int:
    with _FONT_LOCK:
        return int(math.ceil(_font(size).getlength(text))) + 1


@lru_cache(maxsize=16384)
def text_indexes(text: str, size: int) -> np.ndarray:
    """The text as palette indexes (background where there is no ink), anti-aliased in 7 levels."""
    w, h = max(1, text_width(text, size)), line_height(size)
    im = Image.new("L", (w, h), 0)
    with _FONT_LOCK:
        ImageDraw.Draw(im).text((0, 0), text, font=_font(size), fill=255)
    level = (np.asarray(im, dtype=np.uint16) * 7 + 127) // 255
    out = (TEXT_INDEX + level).astype(np.uint8)
    out.flags.writeable = False
    return out


def fit_text(text: str, size: int, max_width: int, keep: str = "end") -> str:
    """``text``, shortened with '…' (keeping its end or its start) to fit ``max_width`` pixels."""
    if text_width(text, size) <= max_width:
        return text
    for k in range(len(text) - 1, 0, -1):
        cand = "…" + text[-k:] if keep == "end" else text[:k] + "…"
        if text_width(cand, size) <= max_width:
            return cand
    return ""


def wrap(items: Sequence[str], size: int, width: int, sep: str = "   ") -> list[str]:
    """Greedy lines that fit ``width`` pixels: ``items`` joined by ``sep``; an item goes whole onto the
    next line when it fits there, else it is broken at spaces (a word too long is shortened with '…')."""
    lines: list[str] = []
    cur = ""
    for item in items:
        item = item.strip()
        if not item:
            continue
        cand = item if not cur else cur + sep + item
        if text_width(cand, size) <= width:
            cur = cand
            continue
        if text_width(item, size) <= width:
            if cur:
                lines.append(cur)
            cur = item
            continue
        for j, word in enumerate(w for w in item.split(" ") if w):
            cand = word if not cur else cur + (" " if j else sep) + word
            if text_width(cand, size) <= width:
                cur = cand
                continue
            if cur:
                lines.append(cur)
            cur = fit_text(word, size, width)
    if cur:
        lines.append(cur)
    return lines


def header_size(width: int) -> int:
    """Header font size for an image ``width`` px wide (bigger on big grids)."""
    return max(HEADER_FONT, min(18, width // 100))


def describe_ids(ids: Sequence[str], limit: int = 12) -> str:
    """'3-17' for a run of consecutive numbers, else the first ``limit`` of them."""
    if len(ids) > 2 and all(i.isdigit() for i in ids):
        nums = [int(i) for i in ids]
        if nums == list(range(nums[0], nums[0] + len(nums))):
            return f"{nums[0]}-{nums[-1]}"
    return ", ".join(ids[:limit]) + (", …" if len(ids) > limit else "")


def fmt_number(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    s = f"{v:.3g}"
    return "0" if s in ("-0", "0") else s


def shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


# -- the palette canvas -------------------------------------------------------------------------------
class Canvas:
    """A figure drawn as palette indexes (one byte per pixel); colours come at the end."""

    def __init__(self, width: int, height: int):
        self.a = np.full((max(1, height), max(1, width)), BG_INDEX, np.uint8)

    @property
    def width(self) -> int:
        return self.a.shape[1]

    @property
    def height(self) -> int:
        return self.a.shape[0]

    def text(
        self,
        x: int,
        y: int,
        text: str,
        size: int = CAPTION_FONT,
        *,
        max_width: int | None = None,
        align: str = "left",
        keep: str = "end",
    ) -> int:
        if max_width is not None:
            text = fit_text(text, size, max_width, keep)
        if not text:
            return 0
        t = text_indexes(text, size)
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
        np.copyto(dst, src, where=src != TEXT_INDEX)
        return w

    def lines(self, x: int, y: int, lines: Sequence[str], size: int = HEADER_FONT, max_width: int | None = None) -> int:
        lh = line_height(size) + 1
        for i, line in enumerate(lines):
            self.text(x, y + i * lh, line, size, max_width=max_width)
        return len(lines) * lh

    def colorbar(
        self,
        x: int,
        y: int,
        width: int,
        vmin: float,
        vmax: float,
        *,
        low: str | None = None,
        high: str | None = None,
        mid: str | None = None,
        bar_height: int = 10,
        size: int = CAPTION_FONT,
    ) -> int:
        """A horizontal colour strip with its range written under it; returns the height used."""
        width = max(8, width)
        self.a[y : y + bar_height + 2, x : x + width] = SEP_INDEX
        ramp = (np.arange(width - 2) * LEVELS // max(1, width - 2)).astype(np.uint8)
        self.a[y + 1 : y + 1 + bar_height, x + 1 : x + width - 1] = ramp
        ty = y + bar_height + 3
        self.text(x, ty, low if low is not None else fmt_number(vmin), size)
        self.text(x + width, ty, high if high is not None else fmt_number(vmax), size, align="right")
        if mid is None and vmin < 0 < vmax:
            frac = (0 - vmin) / (vmax - vmin)
            if 0.2 <= frac <= 0.8:
                mid = "0"
                zx = x + 1 + int(round(frac * (width - 2)))
                self.a[y + bar_height + 2 : y + bar_height + 4, zx] = SEP_INDEX
                self.text(zx, ty, mid, size, align="center")
        elif mid is not None:
            self.text(x + width // 2, ty, mid, size, align="center")
        return bar_height + 3 + line_height(size)

    def palette_image(self, cmap: Any) -> Image.Image:
        h, w = self.a.shape
        im = Image.frombytes("P", (w, h), np.ascontiguousarray(self.a).tobytes())
        im.putpalette(palette(cmap).tobytes(), "RGB")
        return im

    def image(self, cmap: Any) -> Image.Image:
        return self.palette_image(cmap).convert("RGB")


def colorbar_height(size: int = CAPTION_FONT, bar_height: int = 10) -> int:
    return bar_height + 3 + line_height(size)


def colorbar(
    cmap: Any, vmin: float, vmax: float, *, width: int = 256, height: int = 36, label: str | None = None
) -> Image.Image:
    """A horizontal colorbar labelled with its range (and 0 when the range crosses it)."""
    cmap, _ = resolve_cmap(cmap, None)
    if not (math.isfinite(vmin) and math.isfinite(vmax)):
        raise RenderError(f"a colorbar needs a finite range, got ({vmin}, {vmax})")
    width = max(32, int(width))
    top = line_height(CAPTION_FONT) + 2 if label else 0
    bar = max(4, int(height) - top - 3 - line_height(CAPTION_FONT) - 2 * 2)
    c = Canvas(width, top + colorbar_height(bar_height=bar) + 4)
    if label:
        c.text(PAD, 1, label, CAPTION_FONT, max_width=width - 2 * PAD)
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


def nearest(q: np.ndarray, th: int, tw: int) -> np.ndarray:
    """NEAREST resampling of the last two axes to ``(th, tw)`` (pixel centres kept in place)."""
    h, w = q.shape[-2:]
    if (h, w) == (th, tw):
        return q
    ri = ((np.arange(th) + 0.5) * h / th).astype(np.intp)
    ci = ((np.arange(tw) + 0.5) * w / tw).astype(np.intp)
    return q[..., ri[:, None], ci[None, :]]


def frame(a: np.ndarray, x: int, y: int, size: int) -> None:
    """A 1-px separator outline of a ``size`` px square box (seen around non-square maps)."""
    a[y, x : x + size] = a[y + size - 1, x : x + size] = SEP_INDEX
    a[y : y + size, x] = a[y : y + size, x + size - 1] = SEP_INDEX


def fit_box(h: int, w: int, box: int) -> tuple[int, int]:
    s = box / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def map_to_indexes(m: np.ndarray, th: int, tw: int, vmin: float, vmax: float) -> np.ndarray:
    """A 2-D map as colour indexes of size ``(th, tw)``: area-averaged when shrinking, NEAREST when enlarging."""
    d = min(m.shape[0] // th, m.shape[1] // tw)
    if d >= 2:
        m = block_mean(m, d)
    return nearest(quantize(m, vmin, vmax), th, tw)
