"""The HTML report (``index.html``) that ``featuremaps show``, ``compare`` and ``demo`` write.

One self-contained file: styles are inline and every picture is embedded as a PNG data URI (the
same bytes that are written beside it), so the report opens offline, alone, in any browser.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .maps import StatsTable
from .runs import Picture

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:18px 28px}
header h1{margin:0 0 4px;font-size:22px} header p{margin:2px 0;color:#c9d1e0;font-size:14px}
.warning{background:#b3261e;color:#fff;padding:10px 28px;font-weight:600}
main{padding:8px 28px 40px;max-width:1400px}
section{background:#fff;border:1px solid #e1e4ea;border-radius:8px;margin:18px 0;padding:14px 18px}
h2{font-size:18px;margin:4px 0 8px} p.text{margin:4px 0 10px;line-height:1.45;max-width:980px}
figure{margin:10px 0 16px} figure img{max-width:100%;height:auto;border:1px solid #e1e4ea;image-rendering:auto}
figcaption{font-size:13px;color:#555;margin-top:4px}
table.featuremaps-stats{border-collapse:collapse;font-size:12.5px;font-variant-numeric:tabular-nums}
table.featuremaps-stats th,table.featuremaps-stats td{padding:3px 8px;border-bottom:1px solid #e6e8ee;text-align:right}
table.featuremaps-stats th:first-child,table.featuremaps-stats td:first-child,
table.featuremaps-stats td:nth-child(2){text-align:left}
dl.meta{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:13px;margin:0}
dl.meta dt{color:#9aa6bd} dl.meta dd{margin:0}
details summary{cursor:pointer;font-weight:600;margin:6px 0}
"""


@dataclass(frozen=True)
class Section:
    """A titled part of the report: text, pictures, stats tables."""

    title: str
    text: str = ""
    pictures: Sequence[Picture] = ()
    tables: Sequence[tuple[str, StatsTable]] = ()
    folded: Sequence[Picture] = field(default=())  # pictures behind a "show" toggle (long lists)


def _img(picture: Picture) -> str:
    data = base64.b64encode(picture.encoded()).decode("ascii")
    caption = html.escape(picture.caption or picture.path)
    return (
        f"<figure><img src='data:image/png;base64,{data}' alt='{caption}' loading='lazy' "
        f"data-file='{html.escape(picture.path)}'><figcaption>{caption}</figcaption></figure>"
    )


def build_report(
    *,
    title: str,
    sections: Sequence[Section],
    meta: Mapping[str, str] | None = None,
    warning: str | None = None,
) -> str:
    """The report as one HTML string."""
    meta_html = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in (meta or {}).items())
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{html.escape(title)}</h1><dl class='meta'>{meta_html}</dl></header>",
    ]
    if warning:
        parts.append(f"<div class='warning' role='alert'>{html.escape(warning)}</div>")
    parts.append("<main>")
    for sec in sections:
        parts.append(f"<section><h2>{html.escape(sec.title)}</h2>")
        if sec.text:
            parts.append(f"<p class='text'>{html.escape(sec.text)}</p>")
        parts.extend(_img(p) for p in sec.pictures)
        for caption, table in sec.tables:
            parts.append(f"<h3 style='font-size:14px'>{html.escape(caption)}</h3>{table._repr_html_()}")
        if sec.folded:
            parts.append(f"<details><summary>{len(sec.folded)} more pictures</summary>")
            parts.extend(_img(p) for p in sec.folded)
            parts.append("</details>")
        parts.append("</section>")
    parts.append("<footer style='padding:0 28px 20px;color:#888;font-size:12px'>made with featuremaps</footer>")
    parts.append("</main></body></html>")
    return "".join(parts)


# --------------------------------------------------------------------------------------------------
# The folder `featuremaps show` writes (the viewer's download is the same folder)
# --------------------------------------------------------------------------------------------------
def parse_channels(spec: str | None) -> dict:
    """``all`` -> every channel (in pages); ``top16``/``topk:16`` -> the 16 strongest;
    ``0-63`` -> a range; ``3,7,9`` -> those channels. Returns :func:`render.channel_grid` options."""
    from .errors import FeatureMapsError

    text = (spec or "all").strip().lower()
    try:
        if text == "all":
            return {}
        if text.startswith("top"):
            k = int(text.replace("topk", "").replace("top", "").lstrip(":"))
            if k < 1:
                raise ValueError
            return {"top_k": k}
        chans: list[int] = []
        for part in text.split(","):
            if "-" in part:
                a, b = (int(v) for v in part.split("-", 1))
                if b < a:
                    raise ValueError
                chans.extend(range(a, b + 1))
            else:
                chans.append(int(part))
        if not chans or min(chans) < 0:
            raise ValueError
        return {"channels": chans}
    except ValueError:
        raise FeatureMapsError(f"cannot read channels {spec!r}; use all, top16, 0-63 or 3,7,9") from None


def show_pictures(
    maps,
    *,
    model=None,
    reduce: str = "mean",
    norm="map",
    cmap: str | None = None,
    channels: str | None = "all",
    per_page: int = 512,
    progress=None,
) -> list[Picture]:
    """Every picture of a run: the overview, an overlay of the deepest spatial layer on the input,
    one channel grid per spatial layer (pages of ``per_page`` channels), and the first conv
    layer's filters when the model is given. ``progress(done, total)`` is called per layer."""
    from torch import nn

    from . import render
    from .runs import layer_stem

    spatial = [e for e in maps.entries if e.is_spatial]
    pics: list[Picture] = []
    if spatial:
        pics.append(Picture("overview.png", render.overview(maps, reduce=reduce, cmap=cmap, norm=norm), kind="overview",
                            caption=f"channel {reduce} of every layer ({_norm_text(norm)})"))
        deepest = spatial[-1]
        if maps.image is not None and (deepest.reduction is None or deepest.reduction == reduce or deepest.reduction.startswith("topk")):
            pics.append(Picture("overlay.png", render.overlay(deepest, maps.image, reduce=reduce, legend=True), kind="overlay",
                                layer=deepest.name, caption=f"{deepest.name}: channel {reduce} over the input"))
            pics.append(Picture("side_by_side.png", render.side_by_side(maps.image, deepest, reduce=reduce, cmap=cmap),
                                kind="comparison", layer=deepest.name, caption=f"the input next to {deepest.name}"))
    options = parse_channels(channels)
    global_range = None
    if render.parse_norm(norm) == "global":
        global_range = render.value_range([e.tensor for e in spatial], "global")
    total = len(spatial)
    for i, e in enumerate(spatial):
        if e.reduction is None or e.reduction.startswith("topk"):
            n = len(options.get("channels", ())) or min(options.get("top_k", e.tensor.shape[1]), e.tensor.shape[1])
            pages = max(1, -(-n // per_page))
            for page in range(pages):
                im = render.channel_grid(e, cmap=cmap, norm=norm, page=page, per_page=per_page, global_range=global_range,
                                         palette=True, **options)
                suffix = f"_p{page + 1}" if pages > 1 else ""
                pics.append(Picture(f"grids/{layer_stem(e)}{suffix}.png", im, kind="grid", layer=e.name,
                                    caption=f"{e.name} ({e.type}, {'x'.join(map(str, e.shape[1:]))})" + (f", page {page + 1}/{pages}" if pages > 1 else "")))
        if progress:
            progress(i + 1, total)
    module = getattr(model, "module", model)
    if isinstance(module, nn.Module):
        first = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
        if first is not None:
            pics.append(Picture("filters.png", render.filters(first), kind="filters", caption="the first conv layer's filters"))
    return pics


def _norm_text(norm) -> str:
    return {"map": "each map scaled to its own range", "layer": "one range per layer", "global": "one range across all layers"}.get(
        str(norm), f"range {norm}"
    )


def run_title(maps) -> tuple[str, str | None]:
    """Report title and the warning shown when the weights are not pretrained."""
    title = f"featuremaps: {maps.model}, {maps.mode} mode"
    warning = None
    if not maps.pretrained:
        warning = f"RANDOM WEIGHTS ({maps.weights}) — not a pretrained network: these maps show an untrained model."
        title += " — RANDOM WEIGHTS"
    return title, warning


def show_report(maps, pictures: Sequence[Picture], *, source: str = "") -> str:
    """The ``index.html`` of a ``show`` run folder."""
    title, warning = run_title(maps)
    by_kind: dict[str, list[Picture]] = {}
    for p in pictures:
        by_kind.setdefault(p.kind, []).append(p)
    sections = [
        Section("Every layer at a glance", pictures=by_kind.get("overview", [])),
        Section("The deepest layer and the input", pictures=[*by_kind.get("overlay", []), *by_kind.get("comparison", [])]),
        Section("The numbers", text="Per captured output: shape, range, mean, spread, the fraction of zeros and of channels that are never positive.",
                tables=[("per-layer statistics", maps.stats())]),
        Section("Channels of each layer", pictures=by_kind.get("grid", [])[:4], folded=by_kind.get("grid", [])[4:]),
        Section("Filters", pictures=by_kind.get("filters", [])),
    ]
    meta = {"model": maps.model, "weights": maps.weights, "mode": maps.mode, "input": source or "tensor",
            "input size": "x".join(map(str, maps.input_size)), "maps": str(len(maps))}
    if maps.notes:
        meta["notes"] = " · ".join(maps.notes)
    return build_report(title=title, sections=[s for s in sections if s.pictures or s.tables or s.folded], meta=meta, warning=warning)


def save_show(maps, folder, *, model=None, source: str = "", overwrite: bool = False, raw: bool = True, progress=None, **options):
    """Write the whole ``show`` folder: pictures, ``index.html``, ``manifest.json``, raw maps."""
    from .runs import encode_pictures, save_run

    pictures = encode_pictures(show_pictures(maps, model=model, progress=progress, **options))
    html_text = show_report(maps, pictures, source=source)
    extra = {"source": source, "render": {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()}}
    return save_run(maps, folder, pictures=pictures, files={"index.html": html_text}, extra=extra, raw=raw, overwrite=overwrite)
