"""Conv kernels as tiles."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import RenderError
from .canvas import Canvas, colorbar_height, fmt_number, line_height, shape_text, wrap
from .colors import (
    BG_INDEX,
    HEADER_FONT,
    MAX_SIDE,
    MIN_TILE,
    PAD,
    RESERVED_H,
    SEP_INDEX,
    quantize,
    resolve_cmap,
    to_numpy,
    value_range,
)
from .grid import GridGeometry, grid_layout, label_size


# -- filters -------------------------------------------------------------------------------------------------
def filters(
    weight: Any, *, cmap: Any = "RdBu_r", max_filters: int = 64, labels: bool = True, tile_size: int | None = None
) -> Image.Image:
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
    w = to_numpy(weight)
    if w.ndim != 4:
        raise RenderError(f"filters needs a conv weight (out, in, kh, kw) or an nn.Conv2d; got shape {tuple(w.shape)}")
    if not isinstance(max_filters, (int, np.integer)) or max_filters < 1:
        raise RenderError(f"max_filters must be an int >= 1, not {max_filters!r}")
    cmap, _ = resolve_cmap(cmap, None)
    out_c, in_c, kh, kw = w.shape
    n = min(out_c, int(max_filters))
    rgb = in_c == 3
    long = max(kh, kw)
    if tile_size is not None and (not isinstance(tile_size, (int, np.integer)) or tile_size < 1):
        raise RenderError(f"tile_size is a tile's longer side in pixels (an int >= 1), not {tile_size!r}")
    k = max(1, int(tile_size) // long) if tile_size else max(1, math.ceil(MIN_TILE / long))
    ids = [str(i) for i in range(n)]
    rows, cols = grid_layout(n)
    k = max(1, min(k, (MAX_SIDE - 2 * PAD) // cols // kw - 1, (MAX_SIDE - RESERVED_H) // rows // kh - 1))
    th, tw = kh * k, kw * k
    sep = 2 if min(th, tw) >= 64 else 1
    lsize = label_size(tw, ids) if labels else 0
    lh = line_height(lsize) + 1 if lsize else 0
    geom = GridGeometry(n, rows, cols, kh, kw, th, tw, lh, lsize, sep, PAD, 0, 0)
    shown = w[:n]
    if rgb:
        mode = "RGB, each filter scaled to its own min..max"
        rng = None
    else:
        mean = shown.mean(axis=1)
        rng = value_range(mean, "layer", diverging=True)
        mode = f"mean over {in_c} input channels, one range [{fmt_number(rng[0])}, {fmt_number(rng[1])}] centred on 0"
    items = [f"filters {n} of {out_c}", f"weight {shape_text(w.shape)}", mode]
    lines = wrap(items, HEADER_FONT, geom.width - 2 * PAD)
    header_h = PAD + len(lines) * (line_height(HEADER_FONT) + 1) + 3
    footer_h = (4 + colorbar_height() + PAD) if not rgb else PAD
    geom = GridGeometry(n, rows, cols, kh, kw, th, tw, lh, lsize, sep, PAD, header_h, footer_h)
    c = Canvas(geom.width, geom.height)
    c.lines(PAD, PAD, lines, HEADER_FONT)
    c.a[header_h : header_h + geom.grid_h, PAD : PAD + geom.grid_w] = SEP_INDEX
    if not rgb:
        q = quantize(mean, rng[0], rng[1])
    for i in range(geom.rows * geom.cols):
        x0, y0, x1, y1 = geom.tile_box(i)
        if i >= n:
            c.a[y0 : y1 + lh, x0:x1] = BG_INDEX
            continue
        c.a[y0:y1, x0:x1] = BG_INDEX if rgb else np.repeat(np.repeat(q[i], k, 0), k, 1)
        c.a[y1 : y1 + lh, x0:x1] = BG_INDEX
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
