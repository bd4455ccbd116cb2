"""``atlas/index.html``: per layer, a grid of channels, each shown by its best crops (the way OpenAI
Microscope showed "dataset examples"). One self-contained file: styles inline, every tile a small
JPEG as a data URI, no script, nothing fetched; it opens offline, alone, in any browser.

Each top image is decoded once (whatever the number of its crops), its crops cut at their
receptive-field boxes and shrunk to thumbnails; a channel's tile is its best crops, 2 x 2.
"""

from __future__ import annotations

import base64
import html
import io
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .engine import AtlasLayer
from .store import SKIPPED, TOPK, write_text

#: Crops per channel tile (2 x 2) and the side of each, in pixels.
TILE_CROPS = 4
THUMB = 40
_GAP = 1

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:18px 28px}
header h1{margin:0 0 6px;font-size:22px}
dl.meta{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:13px;margin:0}
dl.meta dt{color:#9aa6bd} dl.meta dd{margin:0}
.warning{background:#b3261e;color:#fff;padding:10px 28px;font-weight:600}
main{padding:8px 28px 40px}
section{background:#fff;border:1px solid #e1e4ea;border-radius:8px;margin:18px 0;padding:14px 18px}
h2{font-size:18px;margin:4px 0 4px} p.text{margin:4px 0 10px;line-height:1.45;max-width:980px;font-size:14px}
nav a{color:#c9d1e0;margin-right:14px;font-size:13px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(88px,1fr));gap:8px}
.grid.portraits{grid-template-columns:repeat(auto-fill,minmax(172px,1fr))}
figure.ch{margin:0;text-align:center}
figure.ch img{width:81px;height:81px;image-rendering:auto;border:1px solid #e1e4ea;background:#eee}
figure.ch figcaption{font-size:11px;color:#444;font-variant-numeric:tabular-nums}
figure.ch figcaption b{font-weight:600;color:#1d2330}
"""


def _thumb(picture: Any, box: tuple[int, int, int, int]) -> np.ndarray:
    """The crop ``box`` of ``picture`` shrunk to fit ``THUMB`` x ``THUMB`` (letterboxed, grey)."""
    from PIL import Image

    t, le, b, r = box
    crop = picture.crop((le, t, max(r, le + 1), max(b, t + 1)))
    w, h = crop.size
    scale = THUMB / max(w, h)
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    small = crop.resize((tw, th), Image.Resampling.BILINEAR, reducing_gap=2.0)
    out = np.full((THUMB, THUMB, 3), 238, np.uint8)
    y0, x0 = (THUMB - th) // 2, (THUMB - tw) // 2
    out[y0 : y0 + th, x0 : x0 + tw] = np.asarray(small)
    return out


def _mosaic(thumbs: Sequence[np.ndarray | None]) -> bytes:
    from PIL import Image

    side = 2 * THUMB + _GAP
    canvas = np.full((side, side, 3), 255, np.uint8)
    for i, t in enumerate(thumbs[:TILE_CROPS]):
        y, x = divmod(i, 2)
        y0, x0 = y * (THUMB + _GAP), x * (THUMB + _GAP)
        canvas[y0 : y0 + THUMB, x0 : x0 + THUMB] = t if t is not None else 238
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def tiles(topk: pa.Table, files: Mapping[str, str], layers: Sequence[AtlasLayer]) -> dict[tuple[str, int], bytes]:
    """(layer, channel) -> its tile (JPEG bytes), from the best ``TILE_CROPS`` hits of each channel."""
    from .inputs import load_picture

    best = topk.filter(pc.less_equal(topk.column("rank"), TILE_CROPS))
    cols = {
        c: best.column(c).to_pylist()
        for c in ("layer", "channel", "rank", "image", "box_top", "box_left", "box_bottom", "box_right")
    }
    wanted: dict[str, list[tuple[str, int, int, tuple[int, int, int, int]]]] = defaultdict(list)
    for i in range(best.num_rows):
        box = (cols["box_top"][i], cols["box_left"][i], cols["box_bottom"][i], cols["box_right"][i])
        wanted[cols["image"][i]].append((cols["layer"][i], cols["channel"][i], cols["rank"][i], box))
    thumbs: dict[tuple[str, int], list[np.ndarray | None]] = defaultdict(lambda: [None] * TILE_CROPS)
    for image, hits in wanted.items():
        try:
            picture = load_picture(files[image])
        except Exception:  # the file changed or went away since the run: a grey square
            continue
        for layer, channel, rank, box in hits:
            thumbs[(layer, channel)][rank - 1] = _thumb(picture, box)
    return {key: _mosaic(t) for key, t in thumbs.items()}


def write_report(
    root: Path,
    *,
    topk: pa.Table,
    files: Mapping[str, str],
    layers: Sequence[AtlasLayer],
    meta: Mapping[str, str],
    warning: str | None = None,
    portraits: Mapping[tuple[str, int], bytes] | None = None,
    portrait_notes: Mapping[str, str] | None = None,
) -> None:
    """Write ``root/index.html``; ``portraits``: (layer, channel) -> PNG of the channel's portrait,
    drawn beside its crops; ``portrait_notes``: layer -> why it has none."""
    portraits = portraits or {}
    portrait_notes = portrait_notes or {}
    made = tiles(topk, files, layers)
    values = {
        (lay, int(ch)): float(v)
        for lay, ch, r, v in zip(*(topk.column(c).to_pylist() for c in ("layer", "channel", "rank", "value")))
        if r == 1
    }
    title = f"Channel atlas · {meta.get('model', '')} · {meta.get('weights', '')}"
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{html.escape(title)}</h1><dl class='meta'>",
        *(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in meta.items()),
        "</dl><nav>",
        *(f"<a href='#{_anchor(layer.name)}'>{html.escape(layer.name)}</a>" for layer in layers),
        f"<a href='{TOPK}'>{TOPK}</a><a href='{SKIPPED}'>{SKIPPED}</a></nav></header>",
    ]
    if warning:
        parts.append(f"<div class='warning' role='alert'>{html.escape(warning)}</div>")
    parts.append(
        "<main><p class='text'>Each tile is one channel: the crops of the images that excite it most (best at the top "
        "left), each the receptive field of the position of the channel's maximum, in the original image. Under it: the "
        "channel's number and its highest value. Query everything with DuckDB: <code>select * from 'topk.parquet'</code>."
        + (
            " Beside the crops: the channel's portrait, the image made by optimization to excite it most "
            "(featuremaps.portrait)."
            if portraits
            else ""
        )
        + "</p>"
    )
    for layer in layers:
        rf = layer.receptive_field
        seen = (
            f"receptive field {rf.size[0]}x{rf.size[1]} px of a {rf.input_size[0]}x{rf.input_size[1]} input"
            if rf
            else layer.note
        )
        parts.append(
            f"<section id='{_anchor(layer.name)}'><h2>{html.escape(layer.name)}</h2><p class='text'>{layer.channels} "
            f"channels · {layer.height}x{layer.width} · {html.escape(seen)}</p>"
        )
        if layer.name in portrait_notes:
            parts.append(f"<p class='text'>No portraits: {html.escape(portrait_notes[layer.name])}</p>")
        parts.append("<div class='grid portraits'>" if portraits else "<div class='grid'>")
        for ch in range(layer.channels):
            data = made.get((layer.name, ch))
            value = values.get((layer.name, ch))
            label = f"{value:.3g}" if value is not None else "–"
            src = f"data:image/jpeg;base64,{base64.b64encode(data).decode('ascii')}" if data else ""
            alt = f"{layer.name} channel {ch}"
            img = f"<img src='{src}' alt='{html.escape(alt)}'>" if src else f"<img alt='{html.escape(alt)}: no image'>"
            art = portraits.get((layer.name, ch))
            if art is not None:
                b64 = base64.b64encode(art).decode("ascii")
                img += f"<img class='portrait' src='data:image/png;base64,{b64}' alt='{html.escape(alt)} portrait'>"
            parts.append(f"<figure class='ch'>{img}<figcaption><b>{ch}</b> · {label}</figcaption></figure>")
        parts.append("</div></section>")
    parts.append(
        "<footer style='padding:0 28px 20px;color:#888;font-size:12px'>made with featuremaps</footer></main></body></html>"
    )
    write_text("".join(parts), root / "index.html")


def _anchor(name: str) -> str:
    return "layer-" + "".join(c if c.isalnum() else "-" for c in name)
