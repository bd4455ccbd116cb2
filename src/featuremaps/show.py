"""The ``show`` pipeline: every picture of one run (overview, overlay, channel grids, filters), its
HTML report, and the run folder ``featuremaps show`` writes (the viewer's download is the same
folder)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from torch import nn

from . import render
from .attention import AttentionError, attention_modules
from .cam import CamResult, cam_files, cam_manifest, cam_pictures, cam_section
from .capture import AttentionMaps, default_layers, list_layers
from .chains import chain_steps
from .errors import OptionError
from .layers import match_layers, select_layers
from .maps import FeatureMap, FeatureMaps
from .models import Model, unwrap_model
from .options import check_mode, check_save_maps, parse_channels
from .report import Section, build_report
from .runs import Picture, encode_pictures, layer_stem, raw_nbytes, save_run


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
    cam: CamResult | None = None,
    attention: AttentionMaps | None = None,
    attention_block: str | None = None,
) -> list[Picture]:
    """Every picture of a run: the overview, an overlay of the deepest spatial layer on the input,
    one channel grid per spatial layer (pages of ``per_page`` channels), and the first conv
    layer's filters when the model is given; with ``cam`` its pictures (:func:`featuremaps.cam.cam_pictures`),
    with ``attention`` those of :func:`attention_pictures`. ``progress(done, total)`` is called per layer."""
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
        if maps.image is not None and (deepest.has_channels or deepest.reduction == reduce):
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
        global_range = render.value_range([e.maps_tensor() if e.has_channels else e.tensor for e in spatial], "global")
    total = len(spatial)

    def grids_of(e: FeatureMap) -> list[Picture]:
        if not e.has_channels:
            return []
        layer_options, note = _channels_of(e, options)
        available = len(e.channel_ids())
        n = (
            len(layer_options["channels"])
            if "channels" in layer_options
            else min(layer_options.get("top_k", available), available)
        )
        pages = max(1, -(-n // per_page)) if n else 0
        out = []
        for page in range(pages):
            im = render.channel_grid(
                e, cmap=cmap, norm=norm, page=page, per_page=per_page, global_range=global_range,
                global_layers=len(spatial), palette=True, **layer_options,
            )  # fmt: skip
            suffix = f"_p{page + 1}" if pages > 1 else ""
            caption = f"{e.name} ({e.type}, {render.reduced.shape_caption(e)})"
            caption += (f", page {page + 1}/{pages}" if pages > 1 else "") + note
            out.append(Picture(f"grids/{layer_stem(e)}{suffix}.png", im, kind="grid", layer=e.name, caption=caption,
                               channels=tuple(im.info["channels"])))  # fmt: skip
        return out

    # layers drawn a few at a time (numpy releases the GIL), in layer order
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for i, made in enumerate(pool.map(grids_of, spatial)):
            pics.extend(made)
            if progress:
                progress(i + 1, total)
    module = getattr(model, "module", model)
    if isinstance(module, nn.Module):
        first = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
        if first is not None:
            pics.append(
                Picture("filters.png", render.filters(first), kind="filters", caption="the first conv layer's filters")
            )
    if cam is not None:  # class evidence (featuremaps.cam): the map over the input, the channels behind it
        pics.extend(cam_pictures(cam, maps))
    if attention is not None:
        pics.extend(attention_pictures(attention, attention_block, cmap=cmap))
    return pics


# -- attention (--attention BLOCK) -----------------------------------------------------------------
def attention_block(model: Model | nn.Module, block: str) -> str:
    """The attention module that ``--attention BLOCK`` names: ``last`` (the model's last attention
    module), an index among them (``0``, ``-1``), an attention module's path (``blocks.11.attn``), or
    the path of a block that holds exactly one (``blocks.11``,
    ``encoder.layers.encoder_layer_11``). ``model`` may be a skeleton (meta device): only its module
    tree is read, so a typo answers before any weights load.

    Raises:
        AttentionError: a model without attention modules featuremaps reads, a path that names none
            (the message lists the closest and the range of indices).
    """
    module, info = unwrap_model(model)
    paths = attention_modules(module)
    what = info.name if info is not None else type(module).__name__
    if not paths:
        raise AttentionError(
            f"{what} has no attention module featuremaps can read (torchvision's and timm's ViT, DeiT); "
            "--attention is for vision transformers"
        )
    text = str(block).strip()
    if text.lower() == "last":
        return paths[-1]
    if text.lstrip("-").isdigit():
        i = int(text)
        if not -len(paths) <= i < len(paths):
            raise AttentionError(
                f"--attention {text}: {what} has {len(paths)} attention modules, 0..{len(paths) - 1} (or last)"
            )
        return paths[i]
    if text in paths:
        return text
    inside = [p for p in paths if p.startswith(f"{text}.")]
    if len(inside) == 1:
        return inside[0]
    if len(inside) > 1:
        raise AttentionError(f"{text!r} holds {len(inside)} attention modules; name one, e.g. {inside[-1]!r}")
    import difflib

    names = [n for n, _ in module.named_modules() if n]
    close = difflib.get_close_matches(text, names, n=2, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    raise AttentionError(
        f"no attention module at {text!r}; {hint}give a block such as {paths[-1].rpartition('.')[0] or paths[-1]!r}, "
        f"an index 0..{len(paths) - 1}, or last"
    )


def attention_pictures(attention: AttentionMaps, block: str | None = None, *, cmap: str | None = None) -> list[Picture]:
    """The pictures of ``--attention``: ``attention/heads.png``, where the class token looks in
    ``block`` (default the last captured), one tile per head, each in its own range; and
    ``attention/rollout.png``, the attention rollout through every captured module (Abnar & Zuidema
    2020) over the input (a one-tile grid for a tensor input)."""
    heads = attention.heads(block)
    path = heads.module
    n = heads.shape[1]
    grid = render.channel_grid(heads, cmap=cmap, per_page=None, palette=True)
    pics = [
        Picture(
            "attention/heads.png",
            grid,
            kind="attention-heads",
            layer=path,
            caption=f"{path}: where the class token looks, one tile per head (tile k: head k, {n} heads, "
            "each in its own range)",
            channels=tuple(grid.info["channels"]),
        )
    ]
    rollout = attention.rollout()
    modules = len(attention.probabilities)
    caption = f"attention rollout of the class token through {modules} attention modules"
    if attention.image is not None:
        im = render.overlay(rollout, attention.image, reduce="mean", channel=0, legend=True)
        pics.append(
            Picture("attention/rollout.png", im, kind="attention-rollout", caption=caption + ", over the input")
        )
    else:
        im = render.channel_grid(rollout, cmap=cmap, per_page=None, palette=True)
        pics.append(Picture("attention/rollout.png", im, kind="attention-rollout", caption=caption))
    return pics


def attention_manifest(attention: AttentionMaps, block: str, pictures: Sequence[Picture]) -> dict:
    """The ``"attention"`` key of a run folder's manifest: the block, its heads, the patch grid and
    the modules the rollout went through."""
    probs = attention.probabilities[block]
    heads = attention.heads(block)
    return {
        "block": block,
        "heads": int(probs.shape[1]),
        "tokens": int(probs.shape[-1]),
        "grid": [int(v) for v in heads.shape[-2:]],
        "rollout_modules": list(attention.probabilities),
        "pictures": [p.path for p in pictures if p.kind.startswith("attention")],
    }


def attention_section(attention: AttentionMaps, block: str, pictures: Sequence[Picture]) -> Section:
    """The report's attention section: the block's heads and the rollout."""
    probs = attention.probabilities[block]
    heads, tokens = int(probs.shape[1]), int(probs.shape[-1])
    text = (
        f"Attention probabilities softmax(q·k / sqrt(d)) of {block}, rebuilt from its input with its own weights: "
        f"for each of its {heads} heads, how much the class token draws from each patch ({tokens} tokens, the prefix "
        f"tokens left out of the picture). The rollout multiplies the head-averaged attention of all "
        f"{len(attention.probabilities)} modules, each plus the identity for the residual path and renormalised: "
        "how much each patch flows into the class token through the whole network."
    )
    return Section(f"Attention of {block}", text=text, pictures=[p for p in pictures if p.kind.startswith("attention")])


def check_show(
    model: Model | nn.Module,
    *,
    mode: str = "network",
    layers: str | None = None,
    channels: str | None = "all",
    size: int | tuple[int, int] | None = None,
) -> None:
    """Refuse, before any work, a ``show`` that would fail later: layers that match nothing, a chain
    mode for a model without a conv stack, channel numbers that no selected layer has. ``model``
    may be a :func:`featuremaps.models.skeleton` (no weights), which answers in a fraction of a
    second."""
    check_mode(mode)
    if mode == "network":
        names = layers or default_layers(model)
    else:
        steps = [n for n, _ in chain_steps(model, mode)]
        modules = dict(unwrap_model(model)[0].named_modules())
        names = match_layers([(n, modules[n]) for n in steps], layers) if layers is not None else steps
    asked = parse_channels(channels).get("channels")
    if not asked:
        select_layers(model, names)  # unknown names fail here
        return
    rows = list_layers(model, layers=names, size=size)
    widths = [r.output_shape[1] for r in rows if r.output_shape and len(r.output_shape) == 4]
    if widths and max(asked) >= max(widths):
        lo, hi = min(widths), max(widths)
        have = f"{lo} channels" if lo == hi else f"{lo} to {hi} channels"
        raise OptionError(
            f"channel {max(asked)} is not in any selected layer (they have {have}); use channels below {hi}, e.g. 0-{min(hi, 64) - 1}"
        )


def _channels_of(e, options: dict) -> tuple[dict, str]:
    """The grid options of one layer: the channels asked for that this layer has (a layer with
    fewer channels shows those it has, and none when it has none of them), and a note for the
    caption that says what it lacks."""
    if "channels" not in options:
        return options, ""
    have = set(e.channel_ids())
    mine = [c for c in options["channels"] if c in have]
    lacking = len(options["channels"]) - len(mine)
    note = f" (without {lacking} of the channels asked for: it has {e.num_channels})" if lacking else ""
    return {**options, "channels": mine}, note


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


def show_report(
    maps,
    pictures: Sequence[Picture],
    *,
    source: str = "",
    cam: CamResult | None = None,
    attention: AttentionMaps | None = None,
    attention_block: str | None = None,
) -> str:
    """The ``index.html`` of a ``show`` run folder (with a CAM or attention, their sections after the
    overview)."""
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
    if attention is not None:
        sections.insert(1, attention_section(attention, attention_block or list(attention.probabilities)[-1], pictures))
    if cam is not None:
        sections.insert(1, cam_section(cam, pictures))
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


@dataclass(frozen=True)
class WriteSize:
    """What a ``show`` folder is about to take on disk, in bytes (told to the user when large)."""

    pictures: int
    raw_maps: int
    report: int

    @property
    def total(self) -> int:
        return self.pictures + self.raw_maps + self.report


#: The CLI says what it is about to write above this many bytes.
LARGE_WRITE = 100 * 2**20


def kept_maps(maps: FeatureMaps, pictures: Sequence[Picture], save_maps: str) -> FeatureMaps | None:
    """The maps a ``show`` folder keeps as raw ``.npy`` files: ``none`` (None), ``all`` (every
    captured map), or ``shown``: of each layer drawn as a channel grid only the channels its
    grids show (in their order), every other entry as it is."""
    save_maps = check_save_maps(save_maps)
    if save_maps == "none":
        return None
    if save_maps == "all":
        return maps
    shown: dict[str, list] = {}
    for p in pictures:
        if p.kind == "grid" and p.layer is not None and p.channels is not None:
            shown.setdefault(p.layer, []).extend(c for c in p.channels if isinstance(c, int))
    entries = []
    for e in maps.entries:
        if e.name in shown and e.has_channels:
            e = e.with_channels(list(dict.fromkeys(shown[e.name])))
        entries.append(e)
    return maps.replace(entries=tuple(entries))


def save_show(
    maps: FeatureMaps,
    folder,
    *,
    model=None,
    source: str = "",
    overwrite: bool = False,
    save_maps: str = "none",
    progress=None,
    announce: Callable[[WriteSize], None] | None = None,
    cam: CamResult | None = None,
    attention: AttentionMaps | None = None,
    attention_block: str | None = None,
    **options,
):
    """Write the whole ``show`` folder: pictures, ``index.html``, ``manifest.json`` and, with
    ``save_maps`` ``shown`` or ``all``, raw maps (see :func:`kept_maps`; needed by
    :func:`~featuremaps.runs.load_run`). The default ``none`` keeps none: the pictures and the
    manifest's numbers are what the report shows, while raw maps cost 4 bytes per value (1.6 GB
    for VGG16's conv-relu chain at 224x224). ``announce`` is told the sizes before anything is
    written. ``cam`` (a :class:`~featuremaps.cam.CamResult`) adds its pictures, report section,
    ``cam.npy`` and the manifest's ``"cam"`` key; ``attention`` (from
    :func:`featuremaps.capture.capture_attention`) the pictures of ``attention_block`` (an
    attention module path, default the last captured) and the rollout, their section and the
    manifest's ``"attention"`` key."""
    if attention is not None:
        attention_block = attention_block or list(attention.probabilities)[-1]
        if attention_block not in attention.probabilities:
            raise AttentionError(
                f"no attention maps of {attention_block!r}; captured: {', '.join(attention.probabilities)}"
            )
    shown = show_pictures(
        maps, model=model, progress=progress, cam=cam, attention=attention, attention_block=attention_block, **options
    )
    pictures = encode_pictures(shown)
    kept = kept_maps(maps, pictures, save_maps)
    html_text = show_report(
        maps, pictures, source=source, cam=cam, attention=attention, attention_block=attention_block
    )
    size = WriteSize(
        sum(len(p.encoded()) for p in pictures), raw_nbytes(kept) if kept is not None else 0, len(html_text)
    )
    if announce is not None:
        announce(size)
    extra = {
        "source": source,
        "save_maps": save_maps,
        "render": {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()},
        **({"cam": cam_manifest(cam)} if cam is not None else {}),
        **({"attention": attention_manifest(attention, attention_block, pictures)} if attention is not None else {}),
    }
    return save_run(
        kept if kept is not None else maps,
        folder,
        pictures=pictures,
        files={"index.html": html_text, **(cam_files(cam) if cam is not None else {})},
        extra=extra,
        raw=kept is not None,
        overwrite=overwrite,
    )
