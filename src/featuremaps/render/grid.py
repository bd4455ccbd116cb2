"""Channel grids: the geometry of a grid, the one rule that chooses which channels a grid shows, and the grid images (also one PNG per layer)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import RenderError
from ..layers import file_stem
from ..maps import FeatureMap, FeatureMaps
from ..options import parse_norm
from ..reduce import RANKINGS
from .canvas import (
    Canvas,
    block_mean,
    colorbar_height,
    describe_ids,
    fit_box,
    fmt_number,
    header_size,
    line_height,
    nearest,
    shape_text,
    text_indexes,
    text_width,
    wrap,
)
from .colors import (
    BG_INDEX,
    MAX_SIDE,
    MIN_TILE,
    MIN_WIDTH,
    PAD,
    RESERVED_H,
    SEP_INDEX,
    anchor_zero,
    channel_minmax,
    finish_range,
    finite_minmax,
    quantize,
    quiet_nan_warnings,
    resolve_cmap,
)
from .png import save_png
from .reduced import check_fmap, check_sample, entries_of, map_colorbar_labels


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


def label_size(tile_w: int, labels: Sequence[str]) -> int:
    """Font size of channel labels for this tile width (0 = no labels: the tiles are too small)."""
    if not labels or tile_w < 24:
        return 0
    size = max(8, min(14, tile_w // 5))
    widest = max(labels, key=len)
    while size >= 8:
        if text_width(widest, size) <= tile_w - 2:
            return size
        size -= 1
    return 0


def _plan_tiles(
    n: int, h: int, w: int, tile_size: int | None, labels: Sequence[str] | None
) -> tuple[int, int, int, int, int, int]:
    """rows, cols, tile_h, tile_w, label_size, sep for ``n`` maps of ``h x w``."""
    rows, cols = grid_layout(n)
    if tile_size is None:
        k = math.ceil(MIN_TILE / max(h, w)) if max(h, w) < MIN_TILE else 1
        th, tw = h * k, w * k
    else:
        if not isinstance(tile_size, (int, np.integer)) or isinstance(tile_size, bool) or tile_size < 1:
            raise RenderError(f"tile_size is a tile's longer side in pixels (an int >= 1), not {tile_size!r}")
        th, tw = fit_box(h, w, int(tile_size))
    sep = 2 if min(th, tw) >= 64 else 1

    def label_h_for(tw_: int) -> tuple[int, int]:
        size = label_size(tw_, labels or [])
        return size, (line_height(size) + 1 if size else 0)

    size, lh = label_h_for(tw)
    max_tw = (MAX_SIDE - 2 * PAD - sep * (cols + 1)) // cols
    max_th = (MAX_SIDE - RESERVED_H - sep * (rows + 1)) // rows - lh
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


def grid_geometry(
    n: int,
    map_size: tuple[int, int],
    *,
    tile_size: int | None = None,
    labels: bool | Sequence[str] = True,
    header_h: int = 0,
    footer_h: int = 0,
) -> GridGeometry:
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
    lh = line_height(size) + 1 if size else 0
    return GridGeometry(n, rows, cols, h, w, th, tw, lh, size, sep, PAD, header_h, footer_h)


# -- channel grids -----------------------------------------------------------------------------------------


def channel_stack(fmap: FeatureMap, sample: int) -> tuple[np.ndarray, list[str], str | None]:
    """The maps of one sample ``(C, H, W)`` float32, their labels, and a note for reduced captures."""
    if not fmap.has_channels:
        arr = fmap.tensor[sample].detach().float().cpu().numpy()[None]
        return arr, [fmap.reduction], f"only the channel {fmap.reduction} was kept"
    arr = fmap.maps(sample)
    if fmap.channels is None:
        note = None
    elif fmap.reduction == "channels":
        note = f"{arr.shape[0]} chosen channels kept"
    else:
        note = f"top {arr.shape[0]} channels kept"
    return arr, [str(i) for i in fmap.channel_ids()], note


def _scale_note(
    spec: str | tuple[float, float], diverging: bool, rng: tuple[float, float] | None, n_global: int | None
) -> str:
    centred = ", centred on 0" if diverging else ""
    if spec == "map":
        return f"scale: per channel (each tile {'±its max |value|' if diverging else 'its own min..max'}{centred})"
    assert rng is not None
    r = f"[{fmt_number(rng[0])}, {fmt_number(rng[1])}]"
    if spec == "layer":
        return f"scale: one range for the layer {r}{centred}"
    if spec == "global":
        if n_global is None:
            return f"scale: global = this layer's own range {r}{centred} (no range of the other layers given)"
        return f"scale: one global range {r} across {n_global or 'all'} layers{centred}"
    return f"scale: fixed {r}{centred}, values outside are clipped"


def _grid_canvas(
    fmap: FeatureMap,
    *,
    channels: Sequence[int] | None,
    top_k: int | None,
    by: str,
    page: int,
    per_page: int | None,
    cmap: Any,
    norm: Any,
    diverging: bool | None,
    labels: bool,
    tile_size: int | None,
    sample: int,
    global_range: tuple[float, float] | None = None,
    global_layers: int | None = None,
) -> tuple[Canvas, GridGeometry, Any, tuple[float, float] | None, list, str]:
    fmap = check_fmap(fmap, "channel_grid")
    if not fmap.is_spatial:
        raise RenderError(
            f"channel_grid needs a spatial (N, C, H, W) map, but {fmap.name} has shape {tuple(fmap.shape)}; "
            "use overview() or the stats table for non-spatial outputs"
        )
    cmap, div = resolve_cmap(cmap, diverging)
    spec = parse_norm(norm)
    sample = check_sample(fmap, sample)
    arr, ids, note = channel_stack(fmap, sample)
    C, H, W = arr.shape
    lo_c, hi_c, finite = channel_minmax(arr)
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
                with np.errstate(all="ignore"), quiet_nan_warnings():
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
        first = describe_ids(shown)
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
            vlo = anchor_zero(vlo, vhi)
        vlo, vhi = vlo[:, None, None], vhi[:, None, None]
    else:
        if isinstance(spec, tuple):
            rng = finish_range(*spec, div) if div else spec
        elif spec == "global" and global_range is not None:
            rng = finish_range(*global_range, div)
        else:
            with quiet_nan_warnings():
                rng = finish_range(
                    float(np.nanmin(lo_c)) if np.isfinite(lo_c).any() else math.nan,
                    float(np.nanmax(hi_c)) if np.isfinite(hi_c).any() else math.nan,
                    div,
                )
        vlo, vhi = rng
    # -- geometry
    label_list = shown if labels else []
    rows, cols, th, tw, lsize, sep = _plan_tiles(n, H, W, tile_size, label_list)
    lh = line_height(lsize) + 1 if lsize else 0
    geom = GridGeometry(n, rows, cols, H, W, th, tw, lh, lsize, sep, PAD, 0, 0)
    width = geom.width
    items = [
        f"{fmap.name}",
        f"{fmap.kind} · {fmap.type}",
        f"output {shape_text(fmap.shape)}"
        + (f" read as {shape_text(fmap.map_shape[1:])} maps" if fmap.map_shape[1:] != tuple(fmap.shape[1:]) else "")
        + (f" (sample {sample})" if fmap.shape[0] > 1 else ""),
        what,
        f"{H}x{W} maps shown at {th}x{tw} px" if (th, tw) != (H, W) else "",
        _scale_note(
            spec if isinstance(spec, str) else "fixed",
            div,
            rng,
            (global_layers or 0) if spec == "global" and global_range is not None else None,
        ),
    ]
    if isinstance(spec, tuple):
        items[-1] = _scale_note(spec, div, rng, None)
    note = items[-1]
    hfs = header_size(width)
    lines = wrap(items, hfs, width - 2 * PAD)
    header_h = PAD + len(lines) * (line_height(hfs) + 1) + 3
    footer_h = 4 + colorbar_height() + PAD
    geom = GridGeometry(n, rows, cols, H, W, th, tw, lh, lsize, sep, PAD, header_h, footer_h)
    canvas = Canvas(geom.width, geom.height)
    canvas.lines(PAD, PAD, lines, hfs)
    # -- tiles: shrink (floats), quantize, enlarge (indexes), place with array views
    src = arr if positions is None else arr[positions]
    d = min(H // th, W // tw)
    if d >= 2:
        src = block_mean(src, d)
    q = quantize(src, vlo, vhi, finite)
    k = 1
    qh, qw = q.shape[1:]
    if (th, tw) != (qh, qw):
        if th % qh == 0 and tw % qw == 0 and th // qh == tw // qw:
            k = th // qh
        else:
            q = nearest(q, th, tw)
            qh, qw = th, tw
    slots = rows * cols
    if slots > n:
        q = np.concatenate([q, np.full((slots - n, qh, qw), BG_INDEX, np.uint8)])
    G = canvas.a
    gx, gy = geom.x0, geom.y0
    G[gy : gy + geom.grid_h, gx : gx + geom.grid_w] = SEP_INDEX
    inner = G[gy + sep : gy + sep + rows * geom.cell_h, gx + sep : gx + sep + cols * geom.cell_w]
    V = np.reshape(inner, (rows, geom.cell_h, cols, geom.cell_w), copy=False)
    tiles = q.reshape(rows, cols, qh, qw).transpose(0, 2, 1, 3)
    if k == 1:
        V[:, :th, :, :tw] = tiles
    else:
        T = np.reshape(V[:, :th, :, :tw], (rows, qh, k, cols, qw, k), copy=False)
        T[...] = tiles[:, :, None, :, :, None]
    if lh:
        strip = np.full((slots, lh, tw), BG_INDEX, np.uint8)
        for i, lab in enumerate(shown):
            t = text_indexes(lab, lsize)
            w_ = min(t.shape[1], tw - 1)
            strip[i, : t.shape[0], 1 : 1 + w_] = t[:lh, :w_]
        V[:, th : th + lh, :, :tw] = strip.reshape(rows, cols, lh, tw).transpose(0, 2, 1, 3)
    if slots > n:  # no frame around the empty slots of the last row
        left = gx + sep + (n % cols) * geom.cell_w
        G[gy + sep + (rows - 1) * geom.cell_h : gy + geom.grid_h, left : gx + geom.grid_w] = BG_INDEX
    # -- footer: the scale
    bar_w = min(geom.width - 2 * PAD, 360)
    canvas.colorbar(
        PAD,
        gy + geom.grid_h + 4,
        bar_w,
        float(np.min(vlo)) if spec == "map" else vlo,
        float(np.max(vhi)) if spec == "map" else vhi,
        **map_colorbar_labels(spec, div),
    )
    return canvas, geom, cmap, rng, [int(i) if i.isdigit() else i for i in shown], note


def channel_grid(
    fmap: FeatureMap,
    *,
    channels: Sequence[int] | None = None,
    top_k: int | None = None,
    by: str = "mean",
    page: int = 0,
    per_page: int | None = 256,
    cmap: Any = None,
    norm: Any = "map",
    diverging: bool | None = None,
    labels: bool = True,
    tile_size: int | None = None,
    sample: int = 0,
    global_range: tuple[float, float] | None = None,
    global_layers: int | None = None,
    palette: bool = False,
) -> Image.Image:
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
      ``norm="global"`` pass ``global_range`` (raw min, max across the layers) and ``global_layers``
      (how many layers it spans, for the header), otherwise the layer's own range is used and the
      header says so.

    The layout is in ``image.info["grid"]`` (a :class:`GridGeometry`), the original channel number
    of each tile in ``image.info["channels"]``, the colour range in ``image.info["scale"]`` (None for
    per-channel scales) and the header's scale line in ``image.info["scale_note"]``.
    """
    canvas, geom, cmap, rng, shown, note = _grid_canvas(
        fmap,
        channels=channels,
        top_k=top_k,
        by=by,
        page=page,
        per_page=per_page,
        cmap=cmap,
        norm=norm,
        diverging=diverging,
        labels=labels,
        tile_size=tile_size,
        sample=sample,
        global_range=global_range,
        global_layers=global_layers,
    )
    im = canvas.palette_image(cmap) if palette else canvas.image(cmap)
    im.info["grid"] = geom
    im.info["channels"] = shown
    im.info["scale"] = rng
    im.info["scale_note"] = note
    return im


def layer_filename(index: int, name: str) -> str:
    """``{index:03d}_{name}.png`` with '#' written '_call' and other unsafe characters as '_'
    (:func:`featuremaps.layers.file_stem`)."""
    return file_stem(index, name) + ".png"


def render_layer_grids(
    maps: FeatureMaps | Iterable[FeatureMap],
    out_dir: str | os.PathLike[str],
    *,
    workers: int | None = None,
    rle: bool = True,
    **grid_options: Any,
) -> list[Path]:
    """One :func:`channel_grid` PNG per spatial layer in ``out_dir`` (``{index:03d}_{name}.png``, index =
    the entry's execution index); returns the paths in layer order.

    ``grid_options`` are :func:`channel_grid`'s (``per_page`` defaults to None here: all channels of a
    layer in one file, bounded by :data:`MAX_SIDE`; ``norm="global"`` takes one range across all the
    layers). Files are written as palette PNGs (same pixels, a third of the bytes to compress), with
    zlib's RLE strategy unless ``rle=False`` (see :func:`save_png`); layers are rendered in ``workers`` threads (default: up to 4; numpy and
    zlib release the GIL).
    """
    entries = [e for e in entries_of(maps) if e.is_spatial]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not entries:
        return []
    opts: dict[str, Any] = {
        "channels": None,
        "top_k": None,
        "by": "mean",
        "page": 0,
        "per_page": None,
        "cmap": None,
        "norm": "map",
        "diverging": None,
        "labels": True,
        "tile_size": None,
        "sample": 0,
    }
    unknown = set(grid_options) - set(opts)
    if unknown:
        raise RenderError(f"unknown channel_grid option(s): {', '.join(sorted(unknown))}; use {', '.join(opts)}")
    opts.update(grid_options)
    spec = parse_norm(opts["norm"])
    cmap, _ = resolve_cmap(opts["cmap"], opts["diverging"])
    if spec == "global":
        lo, hi = math.inf, -math.inf
        for e in entries:
            arr, _, _ = channel_stack(e, check_sample(e, opts["sample"]))
            a, b = finite_minmax(arr)
            if math.isfinite(a):
                lo, hi = min(lo, a), max(hi, b)
        opts["global_range"] = (lo, hi) if math.isfinite(lo) else (math.nan, math.nan)
        opts["global_layers"] = len(entries)

    def job(e: FeatureMap) -> Path:
        canvas, _, cm, _, _, _ = _grid_canvas(e, **opts)
        return save_png(canvas.palette_image(cm), out / layer_filename(e.index, e.name), rle=rle)

    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    if workers <= 1 or len(entries) == 1:
        return [job(e) for e in entries]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(job, entries))
