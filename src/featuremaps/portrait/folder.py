"""The portraits folder: one PNG per portrait, the grid, an HTML page and ``manifest.json``.

::

    portraits/
      grid.png                 every portrait, its channel number below it
      channels/0007.png        channel 7's portrait (0007_2.png: its second, with diversity)
      index.html               the grid and each portrait with its objective (one self-contained file)
      manifest.json            kind "portraits": model, weights, layer, channels, options, values, files

Written completely or not at all (:func:`featuremaps.folders.atomic_folder`); ``overwrite`` replaces only
a folder featuremaps wrote. The same model, options and seed write the same PNG bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image

from featuremaps.errors import RunError
from featuremaps.folders import atomic_folder, read_manifest, write_manifest
from featuremaps.portrait.errors import PortraitError
from featuremaps.portrait.portraits import Portraits
from featuremaps.report import Section, build_report
from featuremaps.runs import Picture

GRID = "grid.png"
CHANNELS = "channels"


def portrait_file(channel: int, index: int, diversity: int) -> str:
    """The path of one portrait inside the folder: ``channels/0007.png`` (``0007_2.png``: its 2nd, with diversity)."""
    suffix = f"_{index + 1}" if diversity > 1 else ""
    return f"{CHANNELS}/{int(channel):04d}{suffix}.png"


def manifest_of(portraits: Portraits) -> dict[str, Any]:
    """What ``manifest.json`` says about ``portraits`` (without the keys every manifest has)."""
    p = portraits
    entries = []
    for k, channel in enumerate(p.result.image_channels):
        index = k % p.diversity
        entries.append(
            {
                "channel": channel,
                "index": index,
                "file": portrait_file(channel, index, p.diversity),
                "value": p.values[k],
                "start_value": p.start_values[k],
            }
        )
    mean, std = p.normalization
    return {
        "model": p.model,
        "weights": p.weights,
        "pretrained": p.pretrained,
        "layer": p.layer,
        "channels": list(p.channels),
        "objective": p.objective,
        "steps": p.steps,
        "seed": p.seed,
        "size": p.size,
        "diversity": p.diversity,
        "lr": p.lr,
        "budget": p.budget,
        "device": p.device,
        "batch_size": p.batch_size,
        "input_size": list(p.input_size),
        "normalization": {"mean": list(mean), "std": list(std)},
        "selected_by": dict(p.selected_by) if p.selected_by is not None else None,
        "values": list(p.values),
        "objective_by_step": [float(v) for v in p.result.mean_history.tolist()],
        "seconds": round(p.seconds, 3),
        "grid": GRID,
        "portraits": entries,
    }


def _page(portraits: Portraits, grid: Picture, tiles: list[Picture]) -> str:
    p = portraits
    what = "the mean of the channel's map" if p.objective == "channel" else "the channel's value at the centre"
    chosen = ""
    if p.selected_by:
        chosen = (
            f" The channels are the {p.selected_by['k']} that {p.selected_by['image']} excites most, strongest first."
        )
    text = (
        f"Each picture is the input that excites one channel of {p.layer} most: {p.steps} steps of gradient ascent on "
        f"{what}, from a grey start (seed {p.seed}), in a decorrelated Fourier basis, under random pad, jitter, scale "
        f"and rotation.{chosen} The number under each portrait is its channel."
    )
    sections = [Section(title=f"{p.layer}: {len(p.channels)} channels", text=text, pictures=[grid], folded=tiles)]
    meta = {
        "model": p.model,
        "weights": p.weights,
        "layer": p.layer,
        "size": f"{p.size} px ({p.input_size[0]}x{p.input_size[1]} seen by the network)",
        "steps": str(p.steps),
        "seed": str(p.seed),
        "objective": p.objective,
        "time": f"{p.seconds:.1f} s on {p.device}",
    }
    warning = None
    if p.weights.startswith("random"):
        warning = f"{p.model} has RANDOM weights ({p.weights}): these are the portraits of an untrained network."
    return build_report(title=f"Channel portraits: {p.model} {p.layer}", sections=sections, meta=meta, warning=warning)


def save_portraits(portraits: Portraits, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the portraits folder (see the module docstring) and return its path.

    Raises:
        RunError: ``folder`` exists (without ``overwrite``), was not written by featuremaps, or cannot be written.
    """
    if not isinstance(portraits, Portraits):
        raise PortraitError(f"save_portraits takes what fm.portrait returns, not {type(portraits).__name__}")
    p = portraits
    grid = Picture(path=GRID, image=p.grid, kind="portrait grid", layer=p.layer, caption=f"{p.layer}: every portrait")
    tiles = []
    for k, channel in enumerate(p.result.image_channels):
        index = k % p.diversity
        label = f"channel {channel}" + (f" #{index + 1}" if p.diversity > 1 else "")
        tiles.append(
            Picture(
                path=portrait_file(channel, index, p.diversity),
                image=p.images[k],
                kind="portrait",
                layer=p.layer,
                caption=f"{label}: objective {p.values[k]:.4g} (start {p.start_values[k]:.4g})",
            ).with_png()
        )
    grid = grid.with_png()
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        (tmp / CHANNELS).mkdir()
        for picture in (grid, *tiles):
            (tmp / picture.path).write_bytes(picture.encoded())
        (tmp / "index.html").write_text(_page(p, grid, tiles), encoding="utf-8")
        write_manifest(tmp, manifest_of(p), kind="portraits")
    return Path(folder)


def load_portraits(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[tuple[int, int], Image.Image]]:
    """A portraits folder read back: its manifest, and ``(channel, index) -> PIL image`` of every portrait.

    Raises:
        RunError: not a portraits folder featuremaps wrote, or a file is missing.
    """
    manifest = read_manifest(folder, kind="portraits")
    images: dict[tuple[int, int], Image.Image] = {}
    for entry in manifest.get("portraits", []):
        path = Path(folder) / entry["file"]
        try:
            with Image.open(path) as im:
                images[(int(entry["channel"]), int(entry["index"]))] = im.convert("RGB")
        except OSError:
            raise RunError(f"{path} is missing or unreadable; write the portraits again") from None
    return manifest, images
