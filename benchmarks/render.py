"""Rendering speed: all 4,224 conv channels of VGG16 vs one bare forward pass vs the seed's matplotlib way.

Run:  PYTHONPATH=src .venv/bin/python benchmarks/render.py [--runs 3] [--workers N] [--keep DIR]

It captures the 13 conv outputs of a random-weight torchvision vgg16 (seed 0) at 224x224 with
plain forward hooks that ``.clone()`` (the in-place ReLU that follows each conv would otherwise
overwrite them), then times, in this process and after a warm-up:

(a) a bare forward pass (no hooks, ``torch.inference_mode``),
(b) featuremaps: ``render_layer_grids`` of all channels of all 13 conv layers to PNGs in a temp dir,
(c) the seed's approach: per layer one matplotlib figure (Agg) of the first 16 channels as 2x8
    ``imshow`` subplots, ``savefig``, ``close`` (one run: it is slow),
(d) what ``featuremaps show`` does once the model is loaded: capture the conv layers and write the
    whole folder (every channel grid, overview, overlay, filters, raw maps, manifest, index.html),

and prints a markdown table (median of ``--runs`` for (a), (b) and (d)). Targets: (b) <= 2x (a),
(d) <= 3x (a).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import featuremaps  # noqa: F401  # isort: skip  (before torch, as in the CLI: it asks for huge pages)
import numpy as np
import torch
import torchvision
from PIL import Image

from featuremaps.maps import FeatureMap, FeatureMaps
from featuremaps.render import render_layer_grids


def input_tensor(size: int = 224) -> torch.Tensor:
    """The bundled cat photo, resized and normalized like ImageNet."""
    from featuremaps.images import load_image

    img = load_image("sample:chelsea").resize((size, size), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return ((x - mean) / std)[None]


def show_command(model, x: torch.Tensor) -> float:
    """``featuremaps show`` after the model is loaded: capture + the whole output folder."""
    import featuremaps as fm
    from featuremaps.report import save_show

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        maps = fm.capture(model, x, layers="conv")
        save_show(maps, Path(tmp) / "run", model=model, source="sample:chelsea")
        return time.perf_counter() - t


def capture_convs(model: torch.nn.Module, x: torch.Tensor) -> FeatureMaps:
    """All Conv2d outputs of one forward pass, cloned inside the hook."""
    outs: list[tuple[str, torch.nn.Module, torch.Tensor]] = []
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Conv2d):
            hooks.append(mod.register_forward_hook(lambda m, i, o, name=name: outs.append((name, m, o.clone()))))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    entries = tuple(
        FeatureMap(
            name=n, module=n, kind="conv", type=type(m).__name__, index=i, call=1, shape=tuple(o.shape), tensor=o
        )
        for i, (n, m, o) in enumerate(outs)
    )
    return FeatureMaps(entries, model="vgg16", weights="random(seed=0)", mode="conv", input_size=tuple(x.shape[-2:]))


def bare_forward(model: torch.nn.Module, x: torch.Tensor) -> float:
    t = time.perf_counter()
    with torch.inference_mode():
        model(x)
    return time.perf_counter() - t


def featuremaps_render(maps: FeatureMaps, workers: int | None, keep: Path | None) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        out = keep or Path(tmp)
        t = time.perf_counter()
        paths = render_layer_grids(maps, out, workers=workers)
        dt = time.perf_counter() - t
        size = sum(p.stat().st_size for p in paths)
    return dt, size


def seed_render(maps: FeatureMaps) -> tuple[float, int]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        for i, e in enumerate(maps.values()):
            a = e.tensor[0].numpy()
            fig, axes = plt.subplots(2, 8, figsize=(16, 4))
            for c, ax in enumerate(axes.flat):
                ax.imshow(a[c], cmap="viridis")
                ax.axis("off")
            fig.suptitle(e.name)
            fig.savefig(Path(tmp) / f"{i:03d}.png")
            plt.close(fig)
        dt = time.perf_counter() - t
        size = sum(p.stat().st_size for p in Path(tmp).iterdir())
    return dt, size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="timed runs of (a) and (b), the median is reported")
    ap.add_argument("--workers", type=int, default=None, help="threads of render_layer_grids (default: its own)")
    ap.add_argument("--keep", type=Path, default=None, help="write (b)'s PNGs here instead of a temp dir")
    ap.add_argument("--skip-seed", action="store_true", help="do not time the slow matplotlib approach")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = torchvision.models.vgg16().eval()
    x = input_tensor()
    maps = capture_convs(model, x)
    channels = sum(e.num_channels for e in maps.values())
    pixels = sum(e.tensor[0].numel() for e in maps.values())

    bare_forward(model, x)  # warm-up
    featuremaps_render(maps, args.workers, None)
    fwd = statistics.median(bare_forward(model, x) for _ in range(args.runs))
    fm_runs = [featuremaps_render(maps, args.workers, args.keep) for _ in range(args.runs)]
    fm = statistics.median(t for t, _ in fm_runs)
    fm_bytes = fm_runs[0][1]
    seed = None if args.skip_seed else seed_render(maps)
    show_command(model, x)  # warm-up (and the capture schedule)
    show = statistics.median(show_command(model, x) for _ in range(args.runs))

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
        f"{len(maps)} conv layers, {channels} channels, {pixels / 1e6:.1f} M values\n"
    )
    print("| step | seconds | x bare forward | channels rendered | PNG MB |")
    print("|---|---:|---:|---:|---:|")
    print(f"| (a) bare VGG16 forward, 224x224 (median of {args.runs}) | {fwd:.3f} | 1.0 | - | - |")
    print(
        f"| (b) featuremaps render_layer_grids, all channels (median of {args.runs}) | {fm:.3f} | {fm / fwd:.2f} | "
        f"{channels} | {fm_bytes / 1e6:.1f} |"
    )
    if seed is not None:
        print(
            f"| (c) seed: matplotlib 2x8 imshow + savefig per layer (1 run) | {seed[0]:.3f} | {seed[0] / fwd:.1f} | "
            f"{16 * len(maps)} | {seed[1] / 1e6:.1f} |"
        )
    print(
        f"| (d) the whole `show` (capture + every grid, overview, overlay, report, raw maps; median of {args.runs}) "
        f"| {show:.3f} | {show / fwd:.2f} | {channels} | - |"
    )
    verdict = "meets" if fm <= 2 * fwd else "misses"
    print(f"\n(b) {verdict} the target of <= 2x the bare forward pass ({fm / fwd:.2f}x).")
    print(
        f"(d) {'meets' if show <= 3 * fwd else 'misses'} the target of <= 3x the bare forward pass ({show / fwd:.2f}x)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
