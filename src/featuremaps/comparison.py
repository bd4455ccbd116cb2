"""Comparisons on one image: two models (VGG16 vs AlexNet) layer by layer at matching depth, or
several modes of one model (the seed's three chains side by side).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import render
from .capture import capture
from .errors import FeatureMapsError
from .images import load_image
from .layers import safe_name
from .maps import FeatureMaps
from .models import load_model
from .options import MODES
from .report import Section, build_report
from .runs import (
    Picture,
    atomic_folder,
    encode_pictures,
    write_manifest,
    write_pictures,
    write_run,
)


def run_comparison(
    image: Any,
    *,
    models: Sequence[str] = (),
    modes: Sequence[str] = (),
    model: str = "vgg16",
    weights: str = "DEFAULT",
    layers: str | None = None,
    size: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    reduce: str | None = "mean",
    on_step: Callable[[str], None] | None = None,
) -> dict[str, FeatureMaps]:
    """Capture the runs to compare, labelled by model (``models``) or by mode (``modes``).

    Models run in ``network`` mode (conv layers unless ``layers``); with ``reduce`` only the reduced
    maps are kept, which is all a comparison draws.
    """
    if bool(models) == bool(modes):
        raise FeatureMapsError("compare either models (e.g. vgg16,alexnet) or modes (e.g. conv,conv-relu,conv-pool)")
    for mode in modes:
        if mode not in MODES:
            raise FeatureMapsError(f"unknown mode {mode!r}; use some of {', '.join(MODES)}")
    if len(models or modes) < 2:
        raise FeatureMapsError("a comparison needs at least two models or two modes")
    picture = load_image(image)
    runs: dict[str, FeatureMaps] = {}
    if models:
        for name in models:
            m = load_model(name, weights, device=device, size=size, seed=seed, progress=on_step is None)
            runs[_unique(runs, m.name)] = capture(m, picture, layers=layers, reduce=reduce)
            if on_step:
                on_step(f"captured {m.name}")
    else:
        m = load_model(model, weights, device=device, size=size, seed=seed, progress=on_step is None)
        for mode in modes:
            runs[_unique(runs, mode)] = capture(m, picture, mode=mode, layers=layers, reduce=reduce)
            if on_step:
                on_step(f"captured {m.name} in {mode} mode")
    return runs


def _unique(runs: Mapping[str, Any], label: str) -> str:
    k, out = 2, label
    while out in runs:
        out, k = f"{label} ({k})", k + 1
    return out


def comparison_pictures(
    runs: Mapping[str, FeatureMaps], *, reduce: str = "mean", norm: Any = "map", cmap: str | None = None
) -> list[Picture]:
    """The side-by-side figure, then one overview per run."""
    pics = [
        Picture(
            "compare.png",
            render.compare_runs(runs, reduce=reduce, norm=norm, cmap=cmap),
            kind="comparison",
            caption=f"rows: {', '.join(runs)}; columns matched by depth; channel {reduce}, norm {norm}",
        )
    ]
    for label, maps in runs.items():
        pics.append(
            Picture(
                f"{safe_name(label)}/overview.png",
                render.overview(maps, reduce=reduce, cmap=cmap),
                kind="overview",
                caption=f"{label}: every layer (channel {reduce}, each map its own range)",
            )
        )
    return pics


def random_weights_warning(runs: Mapping[str, FeatureMaps]) -> str | None:
    """The report's warning when some compared run has random weights, naming the networks (the
    modes of one network are one network)."""
    nets: dict[str, str] = {}
    for maps in runs.values():
        if not maps.pretrained:
            nets.setdefault(maps.model, maps.weights)
    if not nets:
        return None
    names = ", ".join(f"{m} ({w})" for m, w in nets.items())
    if len(nets) == 1 and len({maps.model for maps in runs.values()}) == 1:
        return f"RANDOM WEIGHTS: {names} is not pretrained, so these maps show an untrained network."
    verb = "is" if len(nets) == 1 else "are"
    return f"RANDOM WEIGHTS: {names} {verb} not pretrained, so these maps show untrained networks."


def save_comparison(
    runs: Mapping[str, FeatureMaps],
    folder: str | os.PathLike,
    *,
    source: str = "",
    reduce: str = "mean",
    norm: Any = "map",
    cmap: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a comparison folder: ``compare.png``, ``index.html``, one run folder per label (with
    its own manifest) and a top ``manifest.json`` of kind ``comparison``."""
    pictures = encode_pictures(comparison_pictures(runs, reduce=reduce, norm=norm, cmap=cmap))
    warning = random_weights_warning(runs)
    any_random = warning is not None
    sections = [
        Section(
            "Side by side",
            text="Each row is one run; columns pair layers at the same relative depth.",
            pictures=pictures[:1],
        )
    ]
    for (label, maps), pic in zip(runs.items(), pictures[1:]):
        sections.append(Section(label, pictures=[pic], tables=[(f"{label}: per-layer statistics", maps.stats())]))
    title = "featuremaps comparison: " + " vs ".join(runs) + (" — RANDOM WEIGHTS" if any_random else "")
    html_text = build_report(
        title=title, sections=sections, meta={"input": str(source), "runs": ", ".join(runs)}, warning=warning
    )
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        write_pictures(tmp, pictures)
        entries = []
        for label, maps in runs.items():
            sub = tmp / safe_name(label)
            sub.mkdir(exist_ok=True)
            write_run(maps, sub, raw=True, extra={"label": label, "source": str(source)})
            entries.append(
                {
                    "label": label,
                    "folder": safe_name(label),
                    "model": maps.model,
                    "weights": maps.weights,
                    "pretrained": maps.pretrained,
                    "mode": maps.mode,
                }
            )
        (tmp / "index.html").write_text(html_text, encoding="utf-8")
        write_manifest(
            tmp,
            {
                "source": str(source),
                "reduce": reduce,
                "norm": norm if isinstance(norm, str) else list(norm),
                "runs": entries,
                "pictures": [{"path": p.path, "kind": p.kind, "caption": p.caption} for p in pictures],
            },
            kind="comparison",
        )
    return Path(folder)
