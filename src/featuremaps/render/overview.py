"""The overview: one reduced map per spatial layer."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from PIL import Image

from ..errors import RenderError
from ..maps import FeatureMap, FeatureMaps
from ..options import parse_norm
from .canvas import Canvas, colorbar_height, fit_box, frame, line_height, map_to_indexes, wrap
from .colors import CAPTION_FONT, HEADER_FONT, MAX_SIDE, MIN_WIDTH, PAD, RESERVED_H, resolve_cmap
from .grid import grid_layout
from .reduced import check_reduce, entries_of, layer_map, ranges_of, scale_footer, scale_line, shape_caption


def overview(
    maps: FeatureMaps | Iterable[FeatureMap],
    *,
    reduce: str = "mean",
    cmap: Any = None,
    norm: Any = "map",
    diverging: bool | None = None,
    tile_size: int = 128,
    columns: int | None = None,
    sample: int = 0,
) -> Image.Image:
    """One reduced 2-D map per spatial layer (channel ``reduce``: mean, max, l2 or std), each with its
    layer name, kind and shape written under it. Non-spatial entries (Linear outputs...) are skipped.

    ``norm``: ``"map"``/``"layer"`` give each tile its own range (one map per layer), ``"global"``
    one range for all tiles, or fixed. Maps are fitted into ``tile_size`` px squares (NEAREST when
    enlarged, block means when shrunk). ``image.info["tiles"]`` lists ``(name, box)`` per tile.
    """
    entries = [e for e in entries_of(maps) if e.is_spatial]
    if not entries:
        raise RenderError("no spatial (N, C, H, W) maps to draw; capture conv, activation or pool layers")
    check_reduce(reduce)
    cmap, div = resolve_cmap(cmap, diverging)
    spec = parse_norm(norm)
    if not isinstance(tile_size, (int, np.integer)) or tile_size < 8:
        raise RenderError(f"tile_size is a tile's side in pixels (an int >= 8), not {tile_size!r}")
    pairs = [layer_map(e, reduce, None, sample) for e in entries]
    maps2d = [m for m, _ in pairs]
    rngs = ranges_of(maps2d, spec, div)
    n = len(entries)
    cols = grid_layout(n)[1] if columns is None else max(1, min(int(columns), n))
    rows = math.ceil(n / cols)
    gap = 8
    tile = int(min(tile_size, (MAX_SIDE - 2 * PAD) // cols - gap, (MAX_SIDE - RESERVED_H) // rows - 40))
    cap_lh = line_height(CAPTION_FONT)
    cell_w, cell_h = tile + gap, tile + 2 * cap_lh + 2 + gap
    width = max(2 * PAD + cols * cell_w - gap, MIN_WIDTH)
    model = maps.model if isinstance(maps, FeatureMaps) else None
    items = [
        f"{model}" if model else "",
        f"{maps.weights}" if isinstance(maps, FeatureMaps) else "",
        f"mode {maps.mode}" if isinstance(maps, FeatureMaps) else "",
        f"channel {reduce} of each spatial layer ({n} layers)",
        scale_line(spec, div, rngs, "per map (each tile its own min..max)"),
    ]
    lines = wrap(items, HEADER_FONT, width - 2 * PAD)
    header_h = PAD + len(lines) * (line_height(HEADER_FONT) + 1) + 4
    height = header_h + rows * cell_h + colorbar_height() + 2 * PAD
    c = Canvas(width, height)
    c.lines(PAD, PAD, lines, HEADER_FONT)
    boxes = []
    for i, (e, m, (lo, hi)) in enumerate(zip(entries, maps2d, rngs)):
        r, col = divmod(i, cols)
        x, y = PAD + col * cell_w, header_h + r * cell_h
        th, tw = fit_box(*m.shape, tile)
        ox, oy = x + (tile - tw) // 2, y + (tile - th) // 2
        frame(c.a, x, y, tile)
        c.a[oy : oy + th, ox : ox + tw] = map_to_indexes(m, th, tw, lo, hi)
        boxes.append((e.name, (ox, oy, ox + tw, oy + th)))
        c.text(x, y + tile + 1, e.name, CAPTION_FONT, max_width=tile)
        method = pairs[i][1]
        extra = "" if method.startswith(f"channel {reduce}") else f" [{method.split()[1]}]"
        c.text(x, y + tile + 1 + cap_lh, f"{e.kind} {shape_caption(e)}{extra}", CAPTION_FONT, max_width=tile)
    scale_footer(c, header_h + rows * cell_h + 2, spec, div, rngs)
    im = c.image(cmap)
    im.info["tiles"] = boxes
    im.info["scale"] = rngs[0] if (spec == "global" or isinstance(spec, tuple)) else None
    return im
