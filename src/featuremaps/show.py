"""The ``show`` pipeline: every picture of one run (overview, overlay, channel grids, filters), its
HTML report, and the run folder ``featuremaps show`` writes (the viewer's download is the same
folder)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from . import render
from .options import parse_channels
from .report import Section, build_report
from .runs import Picture, encode_pictures, layer_stem, save_run


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
    spatial = [e for e in maps.entries if e.is_spatial]
    pics: list[Picture] = []
    if spatial:
        pics.append(
            Picture(
                "overview.png",
                render.overview(maps, reduce=reduce, cmap=cmap, norm=norm),
                kind="overview",
                caption=f"channel {reduce} of every layer ({_norm_text(norm)})",
            )
        )
        deepest = spatial[-1]
        if maps.image is not None and (
            deepest.reduction is None or deepest.reduction == reduce or deepest.reduction.startswith("topk")
        ):
            pics.append(
                Picture(
                    "overlay.png",
                    render.overlay(deepest, maps.image, reduce=reduce, legend=True),
                    kind="overlay",
                    layer=deepest.name,
                    caption=f"{deepest.name}: channel {reduce} over the input",
                )
            )
            pics.append(
                Picture(
                    "side_by_side.png",
                    render.side_by_side(maps.image, deepest, reduce=reduce, cmap=cmap),
                    kind="comparison",
                    layer=deepest.name,
                    caption=f"the input next to {deepest.name}",
                )
            )
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
                im = render.channel_grid(
                    e,
                    cmap=cmap,
                    norm=norm,
                    page=page,
                    per_page=per_page,
                    global_range=global_range,
                    palette=True,
                    **options,
                )
                suffix = f"_p{page + 1}" if pages > 1 else ""
                pics.append(
                    Picture(
                        f"grids/{layer_stem(e)}{suffix}.png",
                        im,
                        kind="grid",
                        layer=e.name,
                        caption=f"{e.name} ({e.type}, {'x'.join(map(str, e.shape[1:]))})"
                        + (f", page {page + 1}/{pages}" if pages > 1 else ""),
                    )
                )
        if progress:
            progress(i + 1, total)
    module = getattr(model, "module", model)
    if isinstance(module, nn.Module):
        first = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
        if first is not None:
            pics.append(
                Picture("filters.png", render.filters(first), kind="filters", caption="the first conv layer's filters")
            )
    return pics


def _norm_text(norm) -> str:
    return {
        "map": "each map scaled to its own range",
        "layer": "one range per layer",
        "global": "one range across all layers",
    }.get(str(norm), f"range {norm}")


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
        Section(
            "The deepest layer and the input", pictures=[*by_kind.get("overlay", []), *by_kind.get("comparison", [])]
        ),
        Section(
            "The numbers",
            text="Per captured output: shape, range, mean, spread, the fraction of zeros and of channels that are never positive.",
            tables=[("per-layer statistics", maps.stats())],
        ),
        Section("Channels of each layer", pictures=by_kind.get("grid", [])[:4], folded=by_kind.get("grid", [])[4:]),
        Section("Filters", pictures=by_kind.get("filters", [])),
    ]
    meta = {
        "model": maps.model,
        "weights": maps.weights,
        "mode": maps.mode,
        "input": source or "tensor",
        "input size": "x".join(map(str, maps.input_size)),
        "maps": str(len(maps)),
    }
    if maps.notes:
        meta["notes"] = " · ".join(maps.notes)
    return build_report(
        title=title, sections=[s for s in sections if s.pictures or s.tables or s.folded], meta=meta, warning=warning
    )


def save_show(
    maps, folder, *, model=None, source: str = "", overwrite: bool = False, raw: bool = True, progress=None, **options
):
    """Write the whole ``show`` folder: pictures, ``index.html``, ``manifest.json``, raw maps."""
    pictures = encode_pictures(show_pictures(maps, model=model, progress=progress, **options))
    html_text = show_report(maps, pictures, source=source)
    extra = {"source": source, "render": {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()}}
    return save_run(
        maps, folder, pictures=pictures, files={"index.html": html_text}, extra=extra, raw=raw, overwrite=overwrite
    )
