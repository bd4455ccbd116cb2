"""A map over its input picture (overlay) and next to it (side by side)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import RenderError
from ..maps import FeatureMap
from ..options import parse_norm
from .canvas import Canvas, colorbar, colorbar_height, fmt_number, line_height, map_to_indexes, shape_text, wrap
from .colors import (
    BACKGROUND_COLOR,
    CAPTION_FONT,
    HEADER_FONT,
    MAX_SIDE,
    MIN_WIDTH,
    PAD,
    finish_range,
    palette,
    quantize,
    resolve_cmap,
    to_numpy,
    value_range,
)
from .reduced import check_fmap, layer_map


def as_rgb(image: Any, what: str) -> Image.Image:
    if image is None:
        raise RenderError(
            f"{what} needs the input picture; pass maps.image (it is None when the run had a raw tensor input)"
        )
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (np.ndarray, torch.Tensor)):
        a = to_numpy(image) if isinstance(image, torch.Tensor) else np.asarray(image)
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


def _single_range(
    fmap: FeatureMap, m: np.ndarray, channel: int | None, spec: Any, div: bool, sample: int
) -> tuple[float, float]:
    """Range of one drawn map: its own ("map"; also "layer"/"global" for a reduced map), the whole
    layer's ("layer"/"global" for one channel), or fixed."""
    if isinstance(spec, tuple):
        return finish_range(*spec, div) if div else spec
    if spec != "map" and channel is not None:
        return value_range(fmap.maps(sample), "layer", div)
    return value_range(m, "map", div)


def overlay(
    fmap: FeatureMap,
    image: Any,
    *,
    reduce: str = "mean",
    channel: int | None = None,
    alpha: float = 0.5,
    cmap: Any = "jet",
    norm: Any = "map",
    diverging: bool | None = None,
    sample: int = 0,
    legend: bool = False,
) -> Image.Image:
    """The reduced map (or one ``channel``) upsampled (bilinear, pixel centres aligned) to the picture's
    size and blended over it: ``(1 - alpha) * picture + alpha * colours``. The output has the picture's
    size; ``legend=True`` adds a colorbar strip under it. The range is in ``image.info["scale"]``.
    """
    fmap = check_fmap(fmap, "overlay")
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise RenderError(f"alpha is the heat map's opacity between 0 and 1, not {alpha!r}")
    cmap, div = resolve_cmap(cmap, diverging)
    spec = parse_norm(norm)
    pic = as_rgb(image, "overlay")
    m, what = layer_map(fmap, reduce, channel, sample)
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
    return palette(cmap)[quantize(up, vmin, vmax, True)]


def side_by_side(
    image: Any,
    fmap: FeatureMap,
    *,
    reduce: str = "mean",
    channel: int | None = None,
    cmap: Any = None,
    norm: Any = "map",
    diverging: bool | None = None,
    height: int | None = None,
    alpha: float | None = None,
    sample: int = 0,
) -> Image.Image:
    """The input picture next to one map of ``fmap`` (channel ``reduce`` or one ``channel``), both
    ``height`` px tall (default: the picture's height), with captions and the map's colorbar.
    The map is stretched over the picture's frame with NEAREST, so pixels line up. With ``alpha``, a
    third panel shows the :func:`overlay`."""
    fmap = check_fmap(fmap, "side_by_side")
    cmap, div = resolve_cmap(cmap, diverging)
    spec = parse_norm(norm)
    pic = as_rgb(image, "side_by_side")
    m, what = layer_map(fmap, reduce, channel, sample)
    vmin, vmax = _single_range(fmap, m, channel, spec, div, sample)
    ph = int(height) if height is not None else pic.height
    if ph < 16 or ph > MAX_SIDE // 2:
        raise RenderError(f"height must be between 16 and {MAX_SIDE // 2} px, not {ph}")
    pw = max(1, round(pic.width * ph / pic.height))
    pic = pic.resize((pw, ph), Image.Resampling.BILINEAR) if (pw, ph) != pic.size else pic
    panels = 3 if alpha is not None else 2
    gap = 10
    width = max(PAD * 2 + panels * pw + (panels - 1) * gap, MIN_WIDTH)
    cap_lh = line_height(CAPTION_FONT)
    if spec == "map":
        scale = f"scale: this map's range [{fmt_number(vmin)}, {fmt_number(vmax)}]"
    else:
        kind = spec if isinstance(spec, str) else "fixed"
        scale = f"scale: {kind} range [{fmt_number(vmin)}, {fmt_number(vmax)}]"
    scale += ", centred on 0" if div else ""
    header = wrap([f"{fmap.name} ({fmap.kind}, {fmap.type}) next to the input", scale], HEADER_FONT, width - 2 * PAD)
    header_h = PAD + len(header) * (line_height(HEADER_FONT) + 1) + 4
    y_cap = header_h + ph + 2
    height_total = y_cap + 2 * cap_lh + 4 + colorbar_height() + PAD
    c = Canvas(width, height_total)
    c.lines(PAD, PAD, header, HEADER_FONT)
    x_map = PAD + pw + gap
    c.a[header_h : header_h + ph, x_map : x_map + pw] = map_to_indexes(m, ph, pw, vmin, vmax)
    c.text(PAD, y_cap, f"input {pic.width}x{pic.height}" if height is None else "input", CAPTION_FONT, max_width=pw)
    c.text(x_map, y_cap, f"{fmap.name}", CAPTION_FONT, max_width=pw)
    c.text(x_map, y_cap + cap_lh, f"{what} · {shape_text(m.shape)}", CAPTION_FONT, max_width=pw)
    c.colorbar(x_map, y_cap + 2 * cap_lh + 4, pw, vmin, vmax)
    if alpha is not None:
        c.text(x_map + pw + gap, y_cap, f"overlay (alpha {alpha:g})", CAPTION_FONT, max_width=pw)
    im = c.image(cmap)
    im.paste(pic, (PAD, header_h))
    if alpha is not None:
        im.paste(
            overlay(
                fmap,
                pic,
                reduce=reduce,
                channel=channel,
                alpha=alpha,
                cmap=cmap,
                norm=(vmin, vmax) if vmin < vmax else "map",
                diverging=div,
                sample=sample,
            ),
            (x_map + pw + gap, header_h),
        )
    im.info["scale"] = (vmin, vmax)
    return im
