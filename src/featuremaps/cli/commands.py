"""The commands of ``featuremaps``: models, layers, show, compare, demo, serve. Each checks its options,
calls the library, and prints; nothing here touches hooks or tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import FeatureMapsError
from .cam import LabelsOpt, TargetOpt, check_cam_options, print_cam
from .common import (
    ChannelsOpt,
    CmapOpt,
    DeviceOpt,
    ForceOpt,
    ImageArg,
    LayersOpt,
    ModelOpt,
    ModeOpt,
    NormOpt,
    QuietOpt,
    ReduceOpt,
    SeedOpt,
    SizeOpt,
    WeightsOpt,
    _check_out,
    _image_source,
    _load,
    _split,
    _stats_table,
    _Steps,
    _user_errors,
    _warn_random,
    app,
    err,
    out,
)  # fmt: skip


# -- commands --------------------------------------------------------------------------------------
@app.command("models")
def models_cmd(
    pattern: Annotated[str | None, typer.Argument(help="Only names containing this text.")] = None,
    source: Annotated[
        str, typer.Option("--source", help="torchvision (its classifiers) or timm (timm's registry; use as timm:NAME).")
    ] = "torchvision",
) -> None:
    """List the models --model takes (torchvision's classifiers, or timm's with --source timm), and
    whether their pretrained weights are cached."""
    with _user_errors():
        if source not in ("torchvision", "timm"):
            raise FeatureMapsError(f"unknown --source {source!r}; use torchvision or timm")
        table = Table(header_style="bold")
        table.add_column("model")
        table.add_column("pretrained weights cached")
        if source == "timm":
            from ..timm_models import cached_file, list_timm_models

            for name in list_timm_models(pattern):
                try:
                    cached = "yes" if cached_file(name) else "no"
                except FeatureMapsError:
                    cached = "-"
                table.add_row(f"timm:{name}", cached)
        else:
            from ..models import is_cached, list_models

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
    layers: Annotated[
        str, typer.Option("--layers", "-l", help="Which capture points to list (default: every leaf module).")
    ] = "all",
    device: DeviceOpt = "cpu",
) -> None:
    """A table of MODEL's capture points: index, module path, kind, output shape for the input size, parameters."""
    from ..capture import list_layers
    from ..models import load_model, skeleton

    with _user_errors():
        # random weights do not change a shape: the architecture alone (meta device) answers at once
        m = skeleton(model, size=size) if weights.lower() == "random" else None
        if m is None:
            m = load_model(model, weights, device=device, size=size, progress=False)
        rows = list_layers(m, layers=layers)
        h, w = m.preprocessing.size
        table = Table(title=f"{m.name}: {len(rows)} capture points for a {h}x{w} input", header_style="bold")
        for col in ("#", "layer", "kind", "type", "output shape", "call", "parameters"):
            table.add_column(col, justify="right" if col in ("#", "parameters") else "left")
        for r in rows:
            if r.output_shape:
                shape = "x".join(map(str, r.output_shape))
            else:
                shape = "not called" if not r.called else "(not a tensor)"
            call = f"{r.call} of {r.calls}" if r.calls > 1 else ""
            table.add_row(str(r.index), r.name, r.kind, r.type, shape, call, f"{r.parameters:,}")
        out.print(table)


@app.command("show")
def show_cmd(
    image: ImageArg,
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
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (PNGs, manifest.json, index.html, raw maps).")
    ] = Path("featuremaps-out"),
    save_maps: Annotated[
        str,
        typer.Option(
            "--save-maps",
            help="Raw maps (.npy) to keep beside the pictures: none (default: the pictures and numbers are the "
            "report; raw maps take 4 bytes a value, 1.6 GB for VGG16's conv-relu chain), shown (the channels the "
            "grids show), or all. load_run needs shown or all.",
        ),
    ] = "none",
    force: ForceOpt = False,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
    cam: Annotated[
        str | None,
        typer.Option(
            "--cam",
            help="Add the class evidence at the last spatial layer: gradcam, gradcam++ or layercam, with the top-5 "
            "classes and the channels behind the map (each linking to its grid).",
        ),
    ] = None,
    target: TargetOpt = None,
    labels: LabelsOpt = None,
    attention: Annotated[
        str | None,
        typer.Option(
            "--attention",
            help="A vision transformer's attention: BLOCK's maps per head (where the class token looks) and the "
            "attention rollout through every block. BLOCK: a block or attention module path (blocks.11, "
            "encoder.layers.encoder_layer_11), an index among the attention modules (0, -1), or last.",
        ),
    ] = None,
) -> None:
    """Capture IMAGE's feature maps and write pictures, numbers and an HTML report to --out."""
    from ..images import describe_source, load_image
    from ..options import check_display, check_mode, check_save_maps, parse_channels

    with _user_errors():
        # everything that needs no model first: a typo answers at once, without importing torch
        check_mode(mode)
        check_display(reduce=reduce, norm=norm, cmap=cmap)
        parse_channels(channels)
        check_save_maps(save_maps)
        _check_out(out_dir, force)
        source = _image_source(image)
        picture = load_image(source)
        if cam is None and (target is not None or labels is not None):
            raise FeatureMapsError("--target and --labels go with --cam, e.g. --cam gradcam --target tabby")
        if cam is not None and mode != "network":
            raise FeatureMapsError(f"--cam explains the real forward pass: use it with --mode network, not {mode}")
        cam_method, names = check_cam_options(cam, labels) if cam is not None else (None, None)
        with _Steps(quiet) as steps:
            from ..capture import capture
            from ..models import skeleton
            from ..show import LARGE_WRITE, attention_block, check_show, save_show

            plan = skeleton(model, size=size)  # the architecture alone, on the meta device: a fraction of a second
            if plan is not None:
                check_show(plan, mode=mode, layers=layers, channels=channels, size=size)
                if attention is not None:
                    attention_block(plan, attention)
            m = _load(model, weights, device, size, seed, steps)
            if plan is None:  # a user's own model: checked once it is built
                check_show(m, mode=mode, layers=layers, channels=channels)
            block = attention_block(m, attention) if attention is not None else None
            evidence = None
            if cam_method is not None:  # first: the CAM's layer is captured too, for its grid
                from ..cam import cam as class_evidence
                from ..capture import default_layers
                from ..layers import layer_selector

                task = steps.step(f"{cam_method} of {target or 'the most probable class'}")
                evidence = class_evidence(m, picture, cam_method, target=target, labels=names)
                steps.done(task)
                layers = f"{layers or default_layers(m)},{layer_selector(evidence.layer)}"
            task = steps.step(f"capturing ({mode} mode)")
            maps = capture(m, picture, mode=mode, layers=layers)
            steps.done(task)
            heads = None
            if block is not None:  # every attention module for the rollout, the chosen one drawn per head
                from ..capture import capture_attention

                task = steps.step(f"attention of {block}")
                heads = capture_attention(m, picture)
                steps.done(task)

            def announce(size_) -> None:
                if size_.total > LARGE_WRITE and not quiet:
                    raw = f", raw maps {_mb(size_.raw_maps)} (--save-maps none skips them)" if size_.raw_maps else ""
                    err.print(
                        f"writing {_mb(size_.total)} to {out_dir}/: pictures {_mb(size_.pictures)}{raw}",
                        markup=False,
                        highlight=False,
                        soft_wrap=True,
                    )

            save_show(
                maps,
                out_dir,
                model=m,
                source=describe_source(source),
                overwrite=force,
                save_maps=save_maps,
                progress=steps.callback("rendering layers"),
                announce=announce,
                reduce=reduce,
                norm=norm,
                cmap=cmap,
                channels=channels,
                cam=evidence,
                attention=heads,
                attention_block=block,
            )
        if not quiet:
            out.print(_stats_table(maps, f"{maps.model} · {maps.weights} · {maps.mode} mode · {len(maps)} maps"))
            if evidence is not None:
                print_cam(evidence)
            _warn_random(maps)
            out.print(f"wrote {out_dir}/ (open {out_dir / 'index.html'})", markup=False, highlight=False)


def _mb(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.1f} GB"
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


@app.command("compare")
def compare_cmd(
    image: ImageArg,
    models: Annotated[
        str | None, typer.Option("--models", help="Two or more models to compare layer by layer, e.g. vgg16,alexnet.")
    ] = None,
    modes: Annotated[
        str | None, typer.Option("--modes", help="Several modes of one --model, e.g. conv,conv-relu,conv-pool.")
    ] = None,
    model: ModelOpt = "vgg16",
    weights: WeightsOpt = "DEFAULT",
    layers: LayersOpt = None,
    reduce: ReduceOpt = "mean",
    norm: Annotated[
        str,
        typer.Option(
            "--norm",
            help="map (default: each tile its own range, written under it, zero at the dark end for non-negative "
            "maps), layer (one range per column), global (one range for all) or fixed:VMIN,VMAX.",
        ),
    ] = "map",
    cmap: CmapOpt = None,
    size: SizeOpt = None,
    device: DeviceOpt = "cpu",
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("featuremaps-compare"),
    force: ForceOpt = False,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Compare two models (--models vgg16,alexnet) or several modes (--modes conv,conv-relu,conv-pool) on one image."""
    from ..comparison import run_comparison, save_comparison

    with _user_errors():
        if bool(models) == bool(modes):
            raise FeatureMapsError("give either --models A,B or --modes M1,M2 (not both, not neither)")
        _check_out(out_dir, force)
        source = _image_source(image)
        with _Steps(quiet) as steps:
            runs = run_comparison(
                source,
                models=_split(models),
                modes=_split(modes),
                model=model,
                weights=weights,
                layers=layers,
                size=size,
                device=device,
                seed=seed,
                reduce=reduce,
                on_step=lambda text: steps.done(steps.step(text)),
            )
            save_comparison(runs, out_dir, source=source, reduce=reduce, norm=norm, cmap=cmap, overwrite=force)
        if not quiet:
            for label, maps in runs.items():
                out.print(_stats_table(maps, f"{label} · {maps.weights}"))
                _warn_random(maps)
            out.print(f"wrote {out_dir}/ (open {out_dir / 'index.html'})", markup=False, highlight=False)


@app.command("demo")
def demo_cmd(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder of the demo report.")] = Path(
        "featuremaps-demo"
    ),
    weights: Annotated[
        str,
        typer.Option(
            "--weights",
            "-w",
            help="auto (pretrained when cached or downloadable, else random with a loud warning), DEFAULT, or random.",
        ),
    ] = "auto",
    size: SizeOpt = 224,
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The seed's whole story in one report: VGG16's three chains on the drawn edge image, network mode, VGG16 vs AlexNet, the numbers."""
    from ..demo import run_demo

    with _user_errors():
        _check_out(out_dir, force)
        with _Steps(quiet) as steps:
            result = run_demo(
                out_dir,
                weights=weights,
                size=size,
                device=device,
                overwrite=force,
                on_step=lambda text: steps.done(steps.step(text)),
                warn=lambda text: err.print(text, markup=False, style="bold red"),
            )
        if not quiet:
            for label, maps in result.chains.items():
                out.print(_stats_table(maps, f"VGG16 {label} chain on the edge image"))
            out.print(f"wrote {out_dir}/ (open {out_dir / 'index.html'})", markup=False, highlight=False)
        if not result.pretrained:
            err.print(
                "WARNING: pretrained weights were not available; the demo ran with RANDOM weights (see the report's title).",
                markup=False,
                style="bold red",
            )


@app.command("serve")
def serve_cmd(
    host: Annotated[
        str, typer.Option("--host", help="Address to bind; 127.0.0.1 keeps the viewer on this machine.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port; 0 picks a free one.", min=0, max=65535)] = 0,
    models: Annotated[
        str, typer.Option("--models", help="Comma-separated allow-list of models the page may load.")
    ] = "vgg16,alexnet,resnet18",
    weights: Annotated[
        str, typer.Option("--weights", help="Comma-separated allow-list of weights choices (DEFAULT, random).")
    ] = "DEFAULT,random",
    checkpoint: Annotated[
        list[str] | None, typer.Option("--checkpoint", help="NAME=PATH of a checkpoint the page may use (repeatable).")
    ] = None,
    device: DeviceOpt = "cpu",
    max_runs: Annotated[
        int, typer.Option("--max-runs", help="Runs kept on disk before the oldest is evicted.", min=1)
    ] = 20,
    max_memory: Annotated[
        str | None,
        typer.Option(
            "--max-memory",
            help="Memory the viewer may use in all, e.g. 4G or 1500M (default: half of this machine's, at most 4G). "
            "Runs that could not fit are refused, the others wait for their turn.",
        ),
    ] = None,
    max_disk: Annotated[
        str | None,
        typer.Option(
            "--max-disk",
            help="Disk its runs may take, e.g. 4G (default: half the free space, at most 4G); the oldest go first.",
        ),
    ] = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(
            "--run-dir",
            help="Where runs are kept; a restart serves them again (default ~/.cache/featuremaps/viewer).",
        ),
    ] = None,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-host",
            help="Another Host name the viewer answers (a proxy's or this machine's DNS name; repeatable).",
        ),
    ] = None,
    max_connections: Annotated[
        int | None,
        typer.Option(
            "--max-connections", help="Connections at once (default 256, less under a low file limit).", min=8
        ),
    ] = None,
    atlas: Annotated[
        list[Path] | None,
        typer.Option(
            "--atlas",
            help="An atlas folder (`featuremaps atlas --out`) whose channels get a channel page: top images, "
            "distribution, portrait (repeatable).",
        ),
    ] = None,
) -> None:
    """Start the interactive viewer in the browser (prints its local address)."""
    with _user_errors():
        ckpts = {}
        for item in checkpoint or []:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise FeatureMapsError(f"--checkpoint takes NAME=PATH, got {item!r}")
            if not Path(path).is_file():
                raise FeatureMapsError(f"checkpoint {path!r} not found")
            ckpts[name] = Path(path)
        limits = {}
        if max_memory is not None:
            limits["max_memory"] = _size_option("--max-memory", max_memory)
        if max_disk is not None:
            limits["max_disk"] = _size_option("--max-disk", max_disk)
        if run_dir is not None:
            limits["run_dir"] = run_dir
        if atlas:
            limits["atlases"] = list(atlas)
        for name in allow_host or []:
            if not name.strip() or any(c in name for c in "/ @"):
                raise FeatureMapsError(f"--allow-host takes a host name such as viewer.example.org, not {name!r}")
        from ..web import serve

        serve(
            host=host,
            port=port,
            models=_split(models),
            weights=_split(weights),
            checkpoints=ckpts,
            device=device,
            max_runs=max_runs,
            allow_hosts=list(allow_host or []),
            max_connections=max_connections,
            **limits,
        )


def _size_option(option: str, text: str) -> int:
    """``4G``, ``1.5GB``, ``800M``, ``800MB``, ``2048K`` or bytes -> bytes (powers of 1024)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(t[-1:], 1)
    number = t[:-1] if t[-1:] in "KMGT" and t else t
    try:
        value = float(number) * scale
    except ValueError:
        raise FeatureMapsError(f"{option} takes a size such as 4G or 800M, not {text!r}") from None
    if not value > 0:
        raise FeatureMapsError(f"{option} must be more than 0, not {text!r}")
    return int(value)
