"""``featuremaps cam``: the class evidence of one image (Grad-CAM, Grad-CAM++, LayerCAM) in a run folder, and the
printout that ``featuremaps show --cam`` shares. Torch is imported only once a command runs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from .common import (
    DeviceOpt,
    ForceOpt,
    ImageArg,
    ModelOpt,
    QuietOpt,
    SeedOpt,
    SizeOpt,
    WeightsOpt,
    _check_out,
    _image_source,
    _load,
    _Steps,
    _user_errors,
    app,
    err,
    out,
)  # fmt: skip

if TYPE_CHECKING:  # pragma: no cover
    from ..cam import CamResult

MethodOpt = Annotated[str, typer.Option("--method", help="gradcam, gradcam++ or layercam.")]
TargetOpt = Annotated[
    str | None,
    typer.Option(
        "--target",
        help="The class to explain: an index (281) or a label, whole or a unique part of it (tabby). "
        "Default: the most probable class.",
    ),
]
LabelsOpt = Annotated[
    Path | None,
    typer.Option(
        "--labels",
        help="A text file with one class name per line, in class-index order. Default: the weights' own labels "
        "(none for random weights: classes are then 'class i').",
    ),
]


def check_cam_options(method: str, labels: Path | None) -> tuple[str, tuple[str, ...] | None]:
    """The method's canonical name and the labels file's labels, checked before any model loads."""
    from ..cam import check_method, read_labels

    return check_method(method), read_labels(labels) if labels is not None else None


def print_cam(result: CamResult, *, channels: int = 8) -> None:
    """The top classes, what the map shows, and the channels that add most to it."""
    out.print(result.title, markup=False, highlight=False, soft_wrap=True)
    table = Table(header_style="bold")
    for col in ("", "class", "index", "probability"):
        table.add_column(col, justify="right" if col in ("", "index", "probability") else "left")
    for i, s in enumerate(result.classes, 1):
        style = "bold" if s.index == result.target else None
        table.add_row(str(i), s.label, str(s.index), f"{s.probability:.4f}", style=style)
    out.print(table)
    top = ", ".join(f"{c} ({v:.3g})" for c, v in result.top_channels(channels))
    out.print(f"channels that add most to the map: {top}", markup=False, highlight=False, soft_wrap=True)


@app.command("cam")
def cam_cmd(
    image: ImageArg,
    model: ModelOpt = "resnet50",
    weights: WeightsOpt = "DEFAULT",
    method: MethodOpt = "gradcam",
    layer: Annotated[
        str | None,
        typer.Option(
            "--layer",
            "-l",
            help="The layer to explain (a name from `featuremaps layers MODEL`; path#k for a module's k-th call). "
            "Default: the last spatial layer the class score reaches (layer4 of a ResNet, the last block's "
            "attention input of a ViT).",
        ),
    ] = None,
    target: TargetOpt = None,
    labels: LabelsOpt = None,
    size: SizeOpt = None,
    device: DeviceOpt = "cpu",
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (cam.png, the layer's grid, manifest.json, index.html).")
    ] = Path("featuremaps-cam"),
    force: ForceOpt = False,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Which parts of IMAGE make the model see a class: the CAM over the picture, the top-5 classes and the
    channels behind the map, written to --out with an HTML report."""
    from ..images import describe_source, load_image

    with _user_errors():
        _check_out(out_dir, force)
        source = _image_source(image)
        picture = load_image(source)
        method, names = check_cam_options(method, labels)
        with _Steps(quiet) as steps:
            from ..cam import cam, check_layer
            from ..capture import capture
            from ..layers import layer_selector
            from ..models import skeleton
            from ..show import save_show

            plan = skeleton(
                model, size=size
            )  # the module tree and input size alone, no weights: a fraction of a second
            if plan is not None and layer is not None:
                check_layer(plan, layer)
            m = _load(model, weights, device, size, seed, steps)
            task = steps.step(f"{method} of {target or 'the most probable class'}")
            result = cam(m, picture, method, layer=layer, target=target, labels=names)
            steps.done(task)
            maps = capture(m, picture, layers=[layer_selector(result.layer)])
            save_show(
                maps,
                out_dir,
                model=m,
                source=describe_source(source),
                overwrite=force,
                progress=steps.callback("rendering"),
                cam=result,
            )
        if not quiet:
            print_cam(result)
            if not m.pretrained:
                err.print(
                    f"note: {m.name} runs with RANDOM weights ({m.weights}): the classes and the map mean nothing.",
                    markup=False,
                )
            out.print(f"wrote {out_dir}/ (open {out_dir / 'index.html'})", markup=False, highlight=False)
