"""``featuremaps atlas``: the channel atlas of a model over an image folder (see :mod:`featuremaps.atlas`).

Everything that needs no model is checked first (numbers, the engine, the output folder, the
layers on the model's architecture without weights, the source), so a mistake is one line at once;
the run shows a progress bar with images/s and the time left on stderr. Interrupted (Ctrl-C,
``kill -TERM``), it keeps the parts already written: the same command with ``--resume`` finishes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from .common import (
    DeviceOpt,
    ForceOpt,
    ModelOpt,
    QuietOpt,
    SeedOpt,
    SizeOpt,
    Terminated,
    WeightsOpt,
    _user_errors,
    app,
    err,
    out,
)


class _Rate(ProgressColumn):
    """Images per second, measured over the last seconds (rich's speed estimate)."""

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text("– img/s" if speed is None else f"{speed:.1f} img/s", style="progress.data.speed")


def _progress(quiet: bool) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=quiet,
    )


@app.command("atlas")
def atlas_cmd(
    source: Annotated[
        str,
        typer.Argument(
            help="A folder of images (searched recursively; an ImageFolder tree gets its class names), or a text file "
            "with one image path per line."
        ),
    ],
    model: ModelOpt = "vgg16",
    weights: WeightsOpt = "DEFAULT",
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers",
            "-l",
            help="Layers whose channels to map: a kind (conv, relu, pool), names (layer3,layer4) or globs; each must "
            "output (N, C, H, W) maps. Default: conv.",
        ),
    ] = None,
    top_k: Annotated[
        int, typer.Option("--top-k", help="Images kept per channel in topk.parquet (rank 1 = strongest).")
    ] = 16,
    size: SizeOpt = None,
    device: DeviceOpt = "cpu",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per forward pass.")] = 32,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", help="DataLoader processes decoding images (0: in this process). Default: CPUs - 1, at most 4."
        ),
    ] = None,
    part_size: Annotated[
        int | None,
        typer.Option(
            "--part-size",
            help="Images per Parquet part: the unit written at once, and done again after a kill. "
            "Default: about 4 million rows (images x channels) a part.",
        ),
    ] = None,
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="The atlas folder (Parquet store, topk.parquet, index.html).")
    ] = Path("atlas"),
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Finish the unfinished atlas in --out (killed or interrupted) with the same settings."
        ),
    ] = False,
    force: ForceOpt = False,
    engine: Annotated[
        str, typer.Option("--engine", help="local (this machine) or ray (Ray Data: local, or a cluster).")
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", help="A Ray cluster to join (auto, or ray://HEAD:10001). Default: a local Ray."),
    ] = None,
    ray_actors: Annotated[
        int | None,
        typer.Option(
            "--ray-actors", help="Model actors on Ray (each loads the model once). Default: one per GPU, else CPUs - 1."
        ),
    ] = None,
    report: Annotated[
        bool, typer.Option("--report/--no-report", help="Write index.html (the crops of every channel).")
    ] = True,
    portraits: Annotated[
        bool,
        typer.Option(
            "--portraits",
            help="Also draw each channel's portrait (the image that excites it most, by optimization) beside its "
            "crops in index.html; cached in OUT/portraits. Slow on a CPU: about a minute per 16 channels.",
        ),
    ] = False,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Map which images, and which regions of them, excite each channel most, over a whole image folder."""
    from ..atlas.engine import check_options, default_workers
    from ..atlas.errors import AtlasError
    from ..atlas.store import check_folder

    with _user_errors():
        workers = default_workers() if workers is None else workers
        check_options(top_k=top_k, batch_size=batch_size, workers=workers, part_size=part_size, engine=engine)
        if ray_actors is not None and (ray_actors < 1 or engine != "ray"):
            raise AtlasError("--ray-actors takes a number >= 1, with --engine ray")
        if portraits and not report:
            raise AtlasError("--portraits draws into index.html: drop --no-report")
        if resume and force:
            raise AtlasError("--resume finishes an atlas and --force replaces it; give one of them")
        if not Path(source).expanduser().exists():
            raise AtlasError(f"{source} not found; pass a folder of images or a text file listing image paths")
        state = check_folder(out_dir, resume=resume, force=force)
        if state.kind == "finished" and resume:
            from ..atlas import open_atlas

            err.print(f"{out_dir} is already a complete atlas: nothing to resume", markup=False, highlight=False)
            if not quiet:
                _summary(open_atlas(out_dir), out_dir)
            return
        try:
            _run(
                source,
                model=model,
                weights=weights,
                layers=layers,
                top_k=top_k,
                size=size,
                device=device,
                batch_size=batch_size,
                workers=workers,
                part_size=part_size,
                out_dir=out_dir,
                resume=resume,
                force=force,
                engine=engine,
                ray_address=ray_address,
                ray_actors=ray_actors,
                report=report,
                portraits=portraits,
                seed=seed,
                quiet=quiet,
                state=state,
            )
        except KeyboardInterrupt as exc:
            from ..atlas.store import done_parts

            kept = len(done_parts(out_dir)) if out_dir.is_dir() else 0
            what = "terminated" if isinstance(exc, Terminated) else "interrupted"
            err.print(
                f"{what}; {kept} finished parts are kept in {out_dir}: run the same command with --resume to finish",
                markup=False,
                highlight=False,
            )
            raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None


def _run(
    source: str,
    *,
    model: str,
    weights: str,
    layers: str | None,
    top_k: int,
    size: int | None,
    device: str,
    batch_size: int,
    workers: int,
    part_size: int | None,
    out_dir: Path,
    resume: bool,
    force: bool,
    engine: str,
    ray_address: str | None,
    ray_actors: int | None,
    report: bool,
    portraits: bool,
    seed: int,
    quiet: bool,
    state: Any,
) -> None:
    with _progress(quiet) as bar:
        task = bar.add_task("checking the layers", total=None)
        from ..atlas.build import build
        from ..atlas.engine import plan_layers, preprocessing_for, with_receptive_fields
        from ..atlas.inputs import list_inputs
        from ..models import load_model, skeleton, unwrap_model

        plan = skeleton(model, size=size)  # the architecture alone: a typo in --layers answers before weights load
        chosen = plan_layers(plan, layers, size) if plan is not None else None
        bar.update(task, description=f"listing {source}")
        images = list_inputs(source, exclude=out_dir)
        bar.update(task, description=f"loading {model} ({weights} weights)")
        m = load_model(model, weights, device=device, size=size, seed=seed, progress=not quiet)
        if chosen is None:  # a user's own model: checked once it is built
            chosen = plan_layers(m, layers, size)
        pre = preprocessing_for(m, size)
        bar.update(task, description="measuring receptive fields")
        module, _ = unwrap_model(m)
        chosen = with_receptive_fields(module, chosen, pre.size)
        bar.remove_task(task)
        images_task = None

        def progress(done: int, total: int) -> None:
            nonlocal images_task
            if images_task is None:
                images_task = bar.add_task(f"{model} over {source}", total=total, completed=done)
            else:
                bar.update(images_task, completed=done)

        phase_task = None

        def phase(text: str) -> None:
            nonlocal phase_task
            if text.startswith(("merging", "drawing", "portraits", "no portraits")):
                if phase_task is None:
                    phase_task = bar.add_task(text, total=None)
                else:
                    bar.update(phase_task, description=text)

        atlas = build(
            m,
            images,
            out_dir,
            layers=chosen,
            pre=pre,
            top_k=top_k,
            batch_size=batch_size,
            workers=workers,
            part_size=part_size,
            engine=engine,
            ray_address=ray_address,
            ray_actors=ray_actors,
            resume=resume,
            force=force,
            report=report,
            portraits=portraits,
            on_progress=progress,
            on_phase=phase,
            state=state,
        )
    if not quiet:
        _summary(atlas, out_dir)
        if str(atlas.weights).startswith("random"):
            err.print(
                f"note: {atlas.model_name} ran with RANDOM weights ({atlas.weights}): the atlas shows an untrained "
                "network's channels.",
                markup=False,
            )


def _summary(atlas: Any, out_dir: Path) -> None:
    m = atlas.manifest
    skipped = f", {m['skipped']} skipped (see {out_dir / 'skipped.csv'})" if m["skipped"] else ""
    ignored = f", {m['ignored_files']} non-image files ignored" if m.get("ignored_files") else ""
    out.print(
        f"atlas of {m['images']} images{skipped}{ignored} · {m['model']} · {m['weights']} · "
        f"{m['input_size'][0]}x{m['input_size'][1]} · top {m['top_k']} per channel",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    for layer in atlas.layers:
        rf = layer.receptive_field
        seen = f"receptive field {rf.size[0]}x{rf.size[1]} px" if rf is not None else "crops: whole images"
        out.print(
            f"  {layer.name}: {layer.channels} channels, {layer.height}x{layer.width}, {seen}",
            markup=False,
            highlight=False,
        )
    per_image = sum(m["bytes"].values()) / max(1, m["images"])
    out.print(
        f"wrote {out_dir}/ ({per_image / 1024:.1f} KB per image; open {out_dir / 'index.html'}, query "
        f"{out_dir / 'topk.parquet'} with DuckDB)",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
