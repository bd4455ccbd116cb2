"""Runs side by side: rows are runs (chains, models), columns layers matched by depth."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from ..errors import RenderError
from ..maps import FeatureMap, FeatureMaps
from ..options import parse_norm
from .canvas import (
    Canvas,
    colorbar_height,
    fit_box,
    fmt_number,
    frame,
    line_height,
    map_to_indexes,
    text_width,
    wrap,
)
from .colors import CAPTION_FONT, HEADER_FONT, MAX_SIDE, MIN_WIDTH, PAD, resolve_cmap
from .reduced import check_reduce, entries_of, layer_map, ranges_of, scale_footer, scale_line, shape_caption


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


_KIND_WORDS = {
    "conv": "conv",
    "act": "activation",
    "pool": "pool",
    "norm": "norm",
    "linear": "linear",
    "other": "other",
}


def row_entries(run: Any) -> tuple[list[FeatureMap], str | None]:
    """The spatial maps one run shows in its comparison row, all of one kind, so that a row does
    not jump from conv outputs to ReLU outputs half-way (an artefact of the selection, not of the
    network): a conv-relu chain shows its activations (each conv's output after its ReLU), other
    runs their conv outputs, or their most common kind when they have no conv. Returns the
    entries and the kind chosen (None when the run has one kind only)."""
    entries = [e for e in entries_of(run) if e.is_spatial]
    counts = Counter(e.kind for e in entries)
    if len(counts) <= 1:
        return entries, None
    prefer = "act" if getattr(run, "mode", "network") == "conv-relu" else "conv"
    kind = prefer if prefer in counts else counts.most_common(1)[0][0]
    return [e for e in entries if e.kind == kind], kind


def compare_runs(
    runs: Mapping[str, FeatureMaps],
    *,
    reduce: str = "mean",
    norm: Any = "map",
    cmap: Any = None,
    diverging: bool | None = None,
    tile_size: int = 112,
    max_columns: int | None = None,
    sample: int = 0,
    channel: int | Sequence[int] | None = None,
) -> Image.Image:
    """Rows = runs (e.g. the 'conv', 'conv-relu', 'conv-pool' chains, or two models), columns = spatial
    layers matched by depth.

    Each row shows maps of one kind (:func:`row_entries`). The number of columns is the smallest
    number of such maps among the runs (or ``max_columns``); each run picks its layers with
    :func:`depth_match` (column ``j`` -> layer ``round(j * (n - 1) / (columns - 1))`` of a run with
    ``n`` maps), so VGG16's 13 convs against AlexNet's 5 give VGG16 layers 0, 3, 6, 9, 12.
    ``norm="map"`` (default) gives each tile its own range, written under it, with zero at the dark
    end for non-negative maps (:func:`~featuremaps.render.colors.anchor_zero`): every tile shows its
    structure, whatever the layers' magnitudes (random weights grow or shrink them with depth);
    ``"layer"`` one range per column; ``"global"`` one range for every tile; or fixed.
    ``image.info["columns"]`` holds the layer names per run, ``image.info["tiles"]`` their boxes,
    ``image.info["ranges"]`` each tile's range. ``channel`` draws that channel of every layer
    instead of the channel ``reduce``, or with one channel per column (a sequence), that column's.
    """
    if not isinstance(runs, Mapping) or not runs:
        raise RenderError(
            "compare_runs takes a mapping of at least one name -> FeatureMaps, e.g. {'conv': a, 'conv-relu': b}"
        )
    check_reduce(reduce)
    cmap, div = resolve_cmap(cmap, diverging)
    spec = parse_norm(norm)
    spatial = {}
    kinds: dict[str, str | None] = {}
    for key, fm in runs.items():
        entries, kinds[str(key)] = row_entries(fm)
        if not entries:
            raise RenderError(
                f"run {key!r} has no spatial (N, C, H, W) maps to compare; capture conv, activation or pool layers"
            )
        spatial[str(key)] = (fm, entries)
    ncols = min(len(e) for _, e in spatial.values())
    if max_columns is not None:
        if int(max_columns) < 1:
            raise RenderError(f"max_columns must be >= 1, not {max_columns!r}")
        ncols = min(ncols, int(max_columns))
    picked = {k: [entries[i] for i in depth_match(ncols, len(entries))] for k, (_, entries) in spatial.items()}
    if channel is None or isinstance(channel, int):
        per_column: list[int | None] = [channel] * ncols
    else:
        per_column = [int(c) for c in channel]
        if len(per_column) != ncols:
            raise RenderError(
                f"channel lists one channel per column: {ncols} columns, {len(per_column)} channels given"
            )
    maps2d, groups = [], []
    for chosen in picked.values():
        for j, e in enumerate(chosen):
            maps2d.append(layer_map(e, reduce, per_column[j], sample)[0])
            groups.append(j)
    rngs = ranges_of(maps2d, spec, div, groups)
    nrows = len(picked)
    label_w = min(
        220,
        max(max(text_width(k, HEADER_FONT), text_width(f"{_run_desc(spatial[k][0])}", CAPTION_FONT)) for k in picked)
        + 2 * PAD,
    )
    label_w = max(label_w, 60)
    gap = 6
    tile = int(min(tile_size, (MAX_SIDE - label_w - PAD) // ncols - gap))
    tile = max(16, tile)
    cap_lh = line_height(CAPTION_FONT)
    per_tile = not (spec == "global" or isinstance(spec, tuple))
    cell_w, cell_h = tile + gap, tile + (3 if per_tile else 2) * cap_lh + 2 + gap
    width = max(label_w + ncols * cell_w + PAD, MIN_WIDTH)
    lens = ", ".join(
        f"{k}: {len(spatial[k][1])} {_KIND_WORDS.get(kinds[k], kinds[k])} outputs"
        if kinds[k]
        else f"{k}: {len(spatial[k][1])}"
        for k in picked
    )
    per = "each tile its own range, under it" if spec == "map" else "one range per column, under each tile"
    items = [
        f"compare runs · channel {reduce if channel is None else channel if isinstance(channel, int) else 'under each tile'}",
        f"columns matched by relative depth (spatial maps {lens})",
        scale_line(spec, div, rngs, per)
        + ("; zero at the dark end for non-negative maps" if per_tile and not div else ""),
    ]
    lines = wrap(items, HEADER_FONT, width - 2 * PAD)
    header_h = PAD + len(lines) * (line_height(HEADER_FONT) + 1) + 4
    height = header_h + nrows * cell_h + colorbar_height() + 2 * PAD
    c = Canvas(width, height)
    c.lines(PAD, PAD, lines, HEADER_FONT)
    i = 0
    boxes: dict[str, list[str]] = {}
    tiles: dict[str, list[tuple[int, int, int, int]]] = {}
    for r, (k, chosen) in enumerate(picked.items()):
        y = header_h + r * cell_h
        fm = spatial[k][0]
        c.text(PAD, y + tile // 2 - line_height(HEADER_FONT), k, HEADER_FONT, max_width=label_w - PAD)
        c.text(PAD, y + tile // 2 + 1, _run_desc(fm), CAPTION_FONT, max_width=label_w - PAD)
        boxes[k] = [e.name for e in chosen]
        tiles[k] = []
        for j, e in enumerate(chosen):
            x = label_w + j * cell_w
            m = maps2d[i]
            lo, hi = rngs[i]
            th, tw = fit_box(*m.shape, tile)
            frame(c.a, x, y, tile)
            ox, oy = x + (tile - tw) // 2, y + (tile - th) // 2
            c.a[oy : oy + th, ox : ox + tw] = map_to_indexes(m, th, tw, lo, hi)
            tiles[k].append((ox, oy, ox + tw, oy + th))
            c.text(x, y + tile + 1, e.name, CAPTION_FONT, max_width=tile)
            c.text(x, y + tile + 1 + cap_lh, f"{e.kind} {shape_caption(e)}", CAPTION_FONT, max_width=tile)
            if per_tile:
                which = "" if channel is None or isinstance(channel, int) else f"ch {per_column[j]} "
                scale = f"{which}[{fmt_number(lo)}, {fmt_number(hi)}]"
                c.text(x, y + tile + 1 + 2 * cap_lh, scale, CAPTION_FONT, max_width=tile)
            i += 1
    scale_footer(c, header_h + nrows * cell_h + 2, spec, div, rngs)
    im = c.image(cmap)
    im.info["columns"] = boxes
    im.info["tiles"] = tiles
    im.info["ranges"] = {k: rngs[r * ncols : (r + 1) * ncols] for r, k in enumerate(picked)}
    im.info["scale"] = None if per_tile else rngs[0]
    return im
