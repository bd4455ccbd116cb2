"""The ``featuremaps`` command: a thin typer shell over the library API.

Every user mistake ends as one line on stderr and exit code 1 (2 for bad command-line usage);
output folders are written completely or not at all.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

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

from . import __version__
from .errors import FeatureMapsError

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
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="torchvision classifier name (vgg16, alexnet, resnet50...) or your own package.module:attr / file.py:attr.")]
WeightsOpt = Annotated[str, typer.Option("--weights", "-w", help="DEFAULT or a weights name (IMAGENET1K_V1) from torchvision's cache, 'random' (seeded), or a .pth/.safetensors checkpoint.")]
ModeOpt = Annotated[str, typer.Option("--mode", help="network (the real forward pass) or one of the seed's chains: conv, conv-relu, conv-pool.")]
LayersOpt = Annotated[Optional[str], typer.Option("--layers", "-l", help="What to capture: a kind (conv, relu, pool, norm, linear, all), names or globs (features.*), comma-separated. Default: conv in network mode, every step in a chain.")]
ReduceOpt = Annotated[str, typer.Option("--reduce", help="Channel reduction for overview and overlay: mean (the seed's picture), max, l2, std.")]
ChannelsOpt = Annotated[str, typer.Option("--channels", help="Channels in each layer's grid: all, top16 (strongest 16 by mean), 0-63, or 3,7,9.")]
NormOpt = Annotated[str, typer.Option("--norm", help="Colour scale: map (each map its own range), layer, global (one range for all layers: shows ReLU's darkening), or fixed:VMIN,VMAX.")]
CmapOpt = Annotated[Optional[str], typer.Option("--cmap", help="matplotlib colormap name (viridis, gray, magma, RdBu_r for signed maps...). Default viridis.")]
SizeOpt = Annotated[Optional[int], typer.Option("--size", help="Resize the whole image to SIZExSIZE (no crop). Default: the weights' own size (224 for VGG16).", min=1)]
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
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False,
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
    from .images import list_samples

    if not Path(image).exists() and image in list_samples():
        return f"sample:{image}"
    return image


def _load(model: str, weights: str, device: str, size: Optional[int], seed: int, steps: _Steps):
    from .models import load_model

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
        table.add_row(str(e.index), e.name, e.kind, "x".join(map(str, s.shape[1:])), f"{s.min:.3g}", f"{s.max:.3g}",
                      f"{s.mean:.3g}", f"{s.std:.3g}", f"{s.zero_fraction:.1%}", f"{s.dead_fraction:.1%}")
    return table


def _warn_random(maps) -> None:
    if not maps.pretrained:
        err.print(f"note: {maps.model} runs with RANDOM weights ({maps.weights}): the maps show an untrained network.", markup=False)


# -- commands --------------------------------------------------------------------------------------
@app.command("models")
def models_cmd(
    pattern: Annotated[Optional[str], typer.Argument(help="Only names containing this text.")] = None,
) -> None:
    """List torchvision's image classifiers (names for --model), and whether their pretrained weights are cached."""
    from .models import is_cached, list_models

    with _user_errors():
        table = Table(header_style="bold")
        table.add_column("model")
        table.add_column("pretrained weights cached")
        for name in list_models():
            if pattern and pattern.lower() not in name:
                continue
            try:
                cached = "yes" if is_cached(name) else "no"
            except FeatureMapsError:
                cached = "-"
            table.add_row(name, cached)
        out.print(table)


@app.command("layers")
def layers_cmd(
    model: Annotated[str, typer.Argument(help="torchvision name or package.module:attr.")],
    weights: WeightsOpt = "random",
    size: SizeOpt = None,
    layers: Annotated[str, typer.Option("--layers", "-l", help="Which capture points to list (default: every leaf module).")] = "all",
    device: DeviceOpt = "cpu",
) -> None:
    """A table of MODEL's capture points: index, module path, kind, output shape for the input size, parameters."""
    from .capture import list_layers
    from .models import load_model

    with _user_errors():
        m = load_model(model, weights, device=device, size=size, progress=False)
        rows = list_layers(m, layers=layers)
        h, w = m.preprocessing.size
        table = Table(title=f"{m.name}: {len(rows)} capture points for a {h}x{w} input", header_style="bold")
        for col in ("#", "layer", "kind", "type", "output shape", "parameters"):
            table.add_column(col, justify="right" if col in ("#", "parameters") else "left")
        for r in rows:
            shape = "x".join(map(str, r.output_shape)) if r.output_shape else "(not a tensor)"
            if r.calls > 1:
                shape += f" (x{r.calls} calls)"
            table.add_row(str(r.index), r.name, r.kind, r.type, shape, f"{r.parameters:,}")
        out.print(table)


@app.command("show")
def show_cmd(
    image: Annotated[str, typer.Argument(help="Image path, http(s) URL, or a bundled sample: edge, astronaut, chelsea, coffee, rocket.")],
    model: ModelOpt = "vgg16",
    weights: WeightsOpt = "DEFAULT",
    mode: ModeOpt = "network",
    layers: LayersOpt = None,
    reduce: ReduceOpt = "mean",
    channels: ChannelsOpt = "all",
    norm: NormOpt = "map",
    cmap: CmapOpt = None,
    size: SizeOpt = None,
    device: DeviceOpt = "cpu",
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder (PNGs, manifest.json, index.html, raw maps).")] = Path("featuremaps-out"),
    force: ForceOpt = False,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Capture IMAGE's feature maps and write pictures, numbers and an HTML report to --out."""
    from .capture import capture
    from .images import describe_source
    from .render import parse_norm
    from .report import parse_channels, save_show

    with _user_errors():
        parse_channels(channels), parse_norm(norm)  # fail before any work
        _check_out(out_dir, force)
        source = _image_source(image)
        with _Steps(quiet) as steps:
            m = _load(model, weights, device, size, seed, steps)
            task = steps.step(f"capturing ({mode} mode)")
            maps = capture(m, source, mode=mode, layers=layers)
            steps.done(task)
            save_show(maps, out_dir, model=m, source=describe_source(source), overwrite=force,
                      progress=steps.callback("rendering layers"), reduce=reduce, norm=norm, cmap=cmap, channels=channels)
        if not quiet:
            out.print(_stats_table(maps, f"{maps.model} · {maps.weights} · {maps.mode} mode · {len(maps)} maps"))
            _warn_random(maps)
            out.print(f"wrote {out_dir}/ (open {out_dir / 'index.html'})", markup=False, highlight=False)


def _check_out(folder: Path, force: bool) -> None:
    from .runs import check_replaceable

    check_replaceable(folder, overwrite=force)


@app.command("compare")
def compare_cmd(
    image: Annotated[str, typer.Argument(help="Image path, URL, or a bundled sample name.")],
    models: Annotated[Optional[str], typer.Option("--models", help="Two or more models to compare layer by layer, e.g. vgg16,alexnet.")] = None,
    modes: Annotated[Optional[str], typer.Option("--modes", help="Several modes of one --model, e.g. conv,conv-relu,conv-pool.")] = None,
    model: ModelOpt = "vgg16",
    weights: WeightsOpt = "DEFAULT",
    layers: LayersOpt = None,
    reduce: ReduceOpt = "mean",
    norm: Annotated[str, typer.Option("--norm", help="global (default: one range for all, shows ReLU's darkening), layer, map or fixed:VMIN,VMAX.")] = "global",
    cmap: CmapOpt = None,
    size: SizeOpt = None,
    device: DeviceOpt = "cpu",
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("featuremaps-compare"),
    force: ForceOpt = False,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Compare two models (--models vgg16,alexnet) or several modes (--modes conv,conv-relu,conv-pool) on one image."""
    from .compare import compare_runs_to_folder, run_comparison

    with _user_errors():
        if bool(models) == bool(modes):
            raise FeatureMapsError("give either --models A,B or --modes M1,M2 (not both, not neither)")
        _check_out(out_dir, force)
        source = _image_source(image)
        with _Steps(quiet) as steps:
            runs = run_comparison(
                source, models=_split(models), modes=_split(modes), model=model, weights=weights, layers=layers, size=size,
                device=device, seed=seed, reduce=reduce, on_step=lambda text: steps.done(steps.step(text)),
            )
            compare_runs_to_folder(runs, out_dir, source=source, reduce=reduce, norm=norm, cmap=cmap, overwrite=force)
        if not quiet:
            for label, maps in runs.items():
                out.print(_stats_table(maps, f"{label} · {maps.weights}"))
                _warn_random(maps)
            out.print(f"wrote {out_dir}/ (open {out_dir / 'index.html'})", markup=False, highlight=False)


def _split(text: Optional[str]) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


@app.command("demo")
def demo_cmd(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder of the demo report.")] = Path("featuremaps-demo"),
    weights: Annotated[str, typer.Option("--weights", "-w", help="auto (pretrained when cached or downloadable, else random with a loud warning), DEFAULT, or random.")] = "auto",
    size: SizeOpt = 224,
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The seed's whole story in one report: VGG16's three chains on the drawn edge image, network mode, VGG16 vs AlexNet, the numbers."""
    from .demo import run_demo

    with _user_errors():
        _check_out(out_dir, force)
        with _Steps(quiet) as steps:
            result = run_demo(out_dir, weights=weights, size=size, device=device, overwrite=force,
                              on_step=lambda text: steps.done(steps.step(text)), warn=lambda text: err.print(text, markup=False, style="bold red"))
        if not quiet:
            for label, maps in result.chains.items():
                out.print(_stats_table(maps, f"VGG16 {label} chain on the edge image"))
            out.print(f"wrote {out_dir}/ (open {out_dir / 'index.html'})", markup=False, highlight=False)
        if not result.pretrained:
            err.print("WARNING: pretrained weights were not available; the demo ran with RANDOM weights (see the report's title).",
                      markup=False, style="bold red")


@app.command("serve")
def serve_cmd(
    host: Annotated[str, typer.Option("--host", help="Address to bind; 127.0.0.1 keeps the viewer on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port; 0 picks a free one.", min=0, max=65535)] = 0,
    models: Annotated[str, typer.Option("--models", help="Comma-separated allow-list of models the page may load.")] = "vgg16,alexnet,resnet18",
    weights: Annotated[str, typer.Option("--weights", help="Comma-separated allow-list of weights choices (DEFAULT, random).")] = "DEFAULT,random",
    checkpoint: Annotated[Optional[list[str]], typer.Option("--checkpoint", help="NAME=PATH of a checkpoint the page may use (repeatable).")] = None,
    device: DeviceOpt = "cpu",
    max_runs: Annotated[int, typer.Option("--max-runs", help="Runs kept on disk before the oldest is evicted.", min=1)] = 20,
) -> None:
    """Start the interactive viewer in the browser (prints its local address)."""
    with _user_errors():
        from .web import serve

        ckpts = {}
        for item in checkpoint or []:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise FeatureMapsError(f"--checkpoint takes NAME=PATH, got {item!r}")
            if not Path(path).is_file():
                raise FeatureMapsError(f"checkpoint {path!r} not found")
            ckpts[name] = Path(path)
        serve(host=host, port=port, models=_split(models), weights=_split(weights), checkpoints=ckpts, device=device, max_runs=max_runs)


def main() -> None:
    """Console-script entry point."""
    import signal

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
