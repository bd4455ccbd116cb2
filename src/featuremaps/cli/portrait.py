"""``featuremaps portrait``: the picture each channel of a layer looks for, written to a folder.

A thin shell over :func:`featuremaps.portrait.portrait`: every check that needs no weights runs
first (options without torch; the layer and channel numbers on the model's skeleton, on the meta
device), then the model loads, the portraits are optimized with a progress bar, and the folder is
written completely or not at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    DeviceOpt,
    ForceOpt,
    ModelOpt,
    QuietOpt,
    WeightsOpt,
    _check_out,
    _image_source,
    _load,
    _Steps,
    _user_errors,
    _warn_random,
    app,
    out,
)  # fmt: skip


@app.command("portrait")
def portrait_cmd(
    layer: Annotated[
        str,
        typer.Option("--layer", "-l", help="One layer: its path from `featuremaps layers MODEL`, e.g. features.28."),
    ],
    model: ModelOpt = "vgg16",
    weights: WeightsOpt = "DEFAULT",
    channels: Annotated[
        str,
        typer.Option(
            "--channels",
            help="Which channels: 0-63, 3,7,9, all, or top16 (the 16 that --image excites most, strongest first).",
        ),
    ] = "0-15",
    image: Annotated[
        str | None,
        typer.Option("--image", help="For --channels topK: the image that ranks the channels (path, URL or sample)."),
    ] = None,
    size: Annotated[
        int | None, typer.Option("--size", help="Portrait side in pixels. Default: the budget's (64 cpu, 128 full).")
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="Optimization steps. Default: the budget's (64 cpu, 256 full).")
    ] = None,
    budget: Annotated[
        str,
        typer.Option(
            "--budget",
            help="cpu (64 px, 64 steps: 16 VGG16 channels in a few minutes on 2 cores), full (128 px, 256 steps), "
            "or auto: cpu on the CPU, full on a GPU.",
        ),
    ] = "auto",
    objective: Annotated[
        str, typer.Option("--objective", help="channel (the mean of its map) or neuron (its centre value).")
    ] = "channel",
    diversity: Annotated[
        int, typer.Option("--diversity", help="Portraits per channel, pushed to differ from each other.", min=1)
    ] = 1,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the portraits' start and transforms (and of random weights).")
    ] = 0,
    device: DeviceOpt = "auto",
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (PNGs, grid.png, manifest.json, index.html).")
    ] = Path("portraits"),
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Synthesize the image that excites each chosen channel of --layer most, and write them to --out."""
    from ..options import parse_channels
    from ..portrait.errors import PortraitError
    from ..portrait.settings import check_budget, check_objective

    with _user_errors():
        # everything that needs no model first: a typo answers at once, without importing torch
        spec = parse_channels(channels)
        check_budget(budget)
        check_objective(objective)
        if "top_k" in spec and image is None:
            raise PortraitError(f"--channels {channels} ranks the channels on an image: add --image (e.g. chelsea)")
        if image is not None and "top_k" not in spec:
            raise PortraitError("--image only chooses the channels, with --channels top16; drop --image or use topK")
        for name, value, least in (("--size", size, 8), ("--steps", steps, 1)):
            if value is not None and value < least:
                raise PortraitError(f"{name} must be at least {least}, got {value}")
        _check_out(out_dir, force)
        source = None
        if image is not None:
            from ..images import load_image

            source = _image_source(image)
            load_image(source)  # a missing or broken image answers before the model loads
        with _Steps(quiet) as steps_bar:
            from ..models import resolve_device, skeleton
            from ..portrait import budget_settings, check_portrait, portrait

            dev = resolve_device(device)
            _, side, count = budget_settings(budget, dev.type, size, steps)
            plan = skeleton(model)  # the architecture alone, on the meta device: a fraction of a second
            if plan is not None:
                check_portrait(plan, layer, channels=channels, image=source, size=side)
            m = _load(model, weights, str(dev), None, seed, steps_bar)
            if plan is None:  # a user's own model: checked once it is built
                check_portrait(m, layer, channels=channels, image=source, size=side)
            result = portrait(
                m, layer, channels, image=source, size=side, steps=count, seed=seed, objective=objective,
                diversity=diversity, budget=budget,
                progress=steps_bar.callback(f"optimizing {layer} ({side} px, {count} steps)"),
            )  # fmt: skip
            result.save(out_dir, overwrite=force)
        if not quiet:
            rows = ", ".join(f"{c}: {v:.3g}" for c, v in zip(result.result.image_channels, result.values))
            out.print(f"{result.model} {result.layer}, objective per channel: {rows}", markup=False, highlight=False)
            _warn_random(result)
            out.print(
                f"wrote {out_dir}/ in {result.seconds:.0f} s (open {out_dir / 'index.html'})",
                markup=False,
                highlight=False,
            )
