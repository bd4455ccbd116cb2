"""The ``featuremaps`` command: the typer app, its shared options, progress display and error handling.

Every user mistake ends as one line on stderr and exit code 1 (2 for bad command-line usage);
output folders are written completely or not at all.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from ..errors import FeatureMapsError
from ..version import __version__

app = typer.Typer(
    name="featuremaps",
    help="See what a convolutional network sees: capture, measure and draw the feature maps of any PyTorch CNN.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
out = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 140)

# -- shared options --------------------------------------------------------------------------------
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="torchvision classifier name (vgg16, alexnet, resnet50...), timm:NAME (timm:convnext_tiny), or your own package.module:attr / file.py:attr.",
    ),
]
WeightsOpt = Annotated[
    str,
    typer.Option(
        "--weights",
        "-w",
        help="DEFAULT or a weights name (IMAGENET1K_V1) from torchvision's cache, 'random' (seeded), or a .pth/.safetensors checkpoint.",
    ),
]
ModeOpt = Annotated[
    str,
    typer.Option(
        "--mode", help="network (the real forward pass) or one of the seed's chains: conv, conv-relu, conv-pool."
    ),
]
LayersOpt = Annotated[
    str | None,
    typer.Option(
        "--layers",
        "-l",
        help="What to capture: a kind (conv, relu, pool, norm, linear, all), names or globs (features.*), comma-separated. Default: conv in network mode, every step in a chain.",
    ),
]
ReduceOpt = Annotated[
    str,
    typer.Option(
        "--reduce", help="Channel reduction for overview and overlay: mean (the seed's picture), max, l2, std."
    ),
]
ChannelsOpt = Annotated[
    str,
    typer.Option(
        "--channels", help="Channels in each layer's grid: all, top16 (strongest 16 by mean), 0-63, or 3,7,9."
    ),
]
NormOpt = Annotated[
    str,
    typer.Option(
        "--norm",
        help="Colour scale: map (each map its own range), layer, global (one range for all layers: shows ReLU's darkening), or fixed:VMIN,VMAX.",
    ),
]
CmapOpt = Annotated[
    str | None,
    typer.Option(
        "--cmap", help="matplotlib colormap name (viridis, gray, magma, RdBu_r for signed maps...). Default viridis."
    ),
]
SizeOpt = Annotated[
    int | None,
    typer.Option(
        "--size",
        help="Resize the whole image to SIZExSIZE (no crop). Default: the weights' own size (224 for VGG16).",
        min=1,
    ),
]
#: the bundled samples, as ``featuremaps.images.SAMPLES`` names them (a test keeps the two equal; importing
#: images here would load numpy and Pillow for every ``--help``)
SAMPLE_NAMES = ("edge", "astronaut", "chelsea", "coffee", "rocket")
ImageArg = Annotated[
    str, typer.Argument(help=f"Image path, http(s) URL, or a bundled sample: {', '.join(SAMPLE_NAMES)}.")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Replace the output folder if it exists.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables; only errors.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of random weights.")]


def _version(value: bool) -> None:
    if value:
        out.print(f"featuremaps {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """See what a convolutional network sees."""


@contextmanager
def _user_errors():
    """Turn featuremaps' own errors into one line on stderr and exit code 1."""
    try:
        yield
    except FeatureMapsError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except Terminated:
        err.print("terminated; nothing was written", markup=False)
        raise typer.Exit(143) from None
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written", markup=False)
        raise typer.Exit(130) from None


class Terminated(KeyboardInterrupt):
    """``kill -TERM``: unwinds like Ctrl-C, so that half-written output folders are removed."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


class _Steps:
    """A progress display on stderr (silent with --quiet)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(), console=err, transient=True, disable=quiet,
        )  # fmt: skip

    def __enter__(self) -> "_Steps":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def step(self, text: str, total: int = 1):
        return self.progress.add_task(text, total=total)

    def done(self, task) -> None:
        self.progress.update(task, completed=self.progress.tasks[task].total)

    def callback(self, text: str):
        task = self.progress.add_task(text, total=None)

        def update(done: int, total: int) -> None:
            self.progress.update(task, completed=done, total=total)

        return update


def _image_source(image: str) -> str:
    """A path/URL as given, or ``sample:NAME`` when IMAGE names a bundled sample and no such file exists."""
    from ..images import list_samples

    if not Path(image).exists() and image in list_samples():
        return f"sample:{image}"
    return image


def _load(model: str, weights: str, device: str, size: int | None, seed: int, steps: _Steps):
    from ..models import load_model

    task = steps.step(f"loading {model} ({weights} weights)")
    m = load_model(model, weights, device=device, size=size, seed=seed, progress=not steps.quiet)
    steps.done(task)
    return m


def _stats_table(maps, title: str) -> Table:
    table = Table(title=title, show_lines=False, header_style="bold")
    for col in ("#", "layer", "kind", "shape", "min", "max", "mean", "std", "zeros", "dead ch"):
        table.add_column(col, justify="left" if col in ("layer", "kind") else "right")
    for e in maps.entries:
        s = e.stats
        table.add_row(
            str(e.index),
            e.name,
            e.kind,
            "x".join(map(str, s.shape[1:])),
            f"{s.min:.3g}",
            f"{s.max:.3g}",
            f"{s.mean:.3g}",
            f"{s.std:.3g}",
            f"{s.zero_fraction:.1%}",
            f"{s.dead_fraction:.1%}",
        )
    return table


def _warn_random(maps) -> None:
    if not maps.pretrained:
        err.print(
            f"note: {maps.model} runs with RANDOM weights ({maps.weights}): the maps show an untrained network.",
            markup=False,
        )


def main() -> None:
    """Console-script entry point."""
    import signal

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    app()


def _check_out(folder: Path, force: bool) -> None:
    from ..folders import check_replaceable

    check_replaceable(folder, overwrite=force)


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []
