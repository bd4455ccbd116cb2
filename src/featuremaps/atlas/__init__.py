"""The channel atlas: which images, and which regions of them, excite each channel most, over a whole
image folder (the "dataset examples" of OpenAI Microscope), in one streaming pass.

>>> import featuremaps as fm
>>> a = fm.atlas("resnet50", "photos/", layers="layer3,layer4", out="atlas")   # or fm.open_atlas("atlas")
>>> a.top("layer4", 37, k=9)          # the 9 images (path, value, y, x, crop box) that excite it most
>>> a.channels_of("photos/cat.jpg")   # which channels fire most for one image
>>> a.sql("select layer, channel, max(max) from stats group by all")   # the store, with DuckDB

Per image x layer x channel it stores the max, the mean and where the max is, reduced inside the
capture hook (no full map of a batch is kept); Parquet parts written as the run goes (resumable
after any kill); per channel the top-k images merged across parts, with their crops' boxes from
the layer's true receptive field (``topk.parquet``), and an activation sketch (``histograms.parquet``);
``index.html``, a self-contained report. Modules: :mod:`.inputs` (what is read, DataLoader workers),
:mod:`.engine` (layers, the per-batch function, the local engine), :mod:`.ray_engine`,
:mod:`.store` (the folder, parts, atomicity), :mod:`.merge` (DuckDB), :mod:`.sketch`,
:mod:`.reader` (:class:`Atlas`), :mod:`.report`, :mod:`.build` (one run).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import AtlasError
from .reader import Atlas, ChannelActivation, ChannelView, Crop, TopImage
from .sketch import Distribution

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from ..models import Model
    from .engine import Phase, Progress

__all__ = [
    "Atlas",
    "AtlasError",
    "ChannelActivation",
    "ChannelView",
    "Crop",
    "Distribution",
    "TopImage",
    "atlas",
    "open_atlas",
]


def atlas(
    model: "str | Model | nn.Module",
    source: Any,
    *,
    layers: str | Sequence[str] | None = None,
    out: str | os.PathLike = "atlas",
    weights: str | os.PathLike | None = "DEFAULT",
    seed: int = 0,
    device: str | None = "cpu",
    size: int | tuple[int, int] | None = None,
    top_k: int = 16,
    batch_size: int = 32,
    workers: int | None = None,
    part_size: int | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    ray_actors: int | None = None,
    resume: bool = False,
    force: bool = False,
    report: bool = True,
    portraits: "bool | str | os.PathLike" = False,
    portrait_options: "dict[str, Any] | None" = None,
    progress: "Progress | None" = None,
    on_phase: "Phase | None" = None,
) -> Atlas:
    """Make the channel atlas of ``model`` over the images of ``source`` in the folder ``out``.

    Args:
        model: a torchvision name (with ``weights``, ``seed``, ``device``), a featuremaps ``Model``,
            or any ``nn.Module``.
        source: a folder (recursive), a text file of image paths, a list of paths, or a torchvision
            ``ImageFolder``; files that cannot be used are skipped and listed in ``skipped.csv``.
        layers: what :func:`featuremaps.capture` takes (default ``conv``); each must output
            ``(N, C, H, W)`` maps and run once per pass (``path#1`` for a module called more).
        size: input size (the whole image resized, no crop); default the weights' own.
        top_k: images kept per channel in ``topk.parquet`` (``Atlas.top`` ranks more from the store).
        batch_size, workers: the DataLoader's (default workers: the CPUs but one, at most 4).
        part_size: images per Parquet part (default: about 4 million rows a part).
        engine: ``local`` or ``ray`` (Ray Data: ``ray_address`` for a cluster, ``ray_actors`` model actors).
        resume: finish the unfinished atlas in ``out`` (the same settings), or start one.
        force: replace an atlas featuremaps wrote in ``out``.
        report: write ``index.html``.
        portraits: also draw each channel's portrait beside its crops in ``index.html``
            (:mod:`featuremaps.portrait`; made once and cached in ``out/portraits/``, or in the folder
            given, so a second atlas of the same model and layers reads them back). Costly on a CPU:
            about a minute per 16 channels of a VGG16 layer with the CPU budget.
        portrait_options: options of :func:`featuremaps.portrait.portrait_images` (size, steps, seed,
            budget...).
        progress: called as ``progress(images_done, images_total)`` after each batch.
        on_phase: called with a line of text at each phase (merging, drawing the report...).

    Returns:
        The finished :class:`Atlas`.

    Raises:
        AtlasError: no images, bad options; LayerError: bad layers; RunError: ``out`` cannot be
        written (a finished atlas without ``force``, an unfinished one without ``resume``...).
    """
    from .build import build
    from .engine import check_options, default_workers, plan_layers, preprocessing_for, with_receptive_fields
    from .inputs import list_inputs
    from .store import check_folder

    workers = default_workers() if workers is None else workers
    if portraits and not report:
        raise AtlasError("portraits are drawn into index.html: leave report=True")
    check_options(top_k=top_k, batch_size=batch_size, workers=workers, part_size=part_size, engine=engine)
    images = list_inputs(source, exclude=out)
    state = check_folder(out, resume=resume, force=force)
    if state.kind == "finished" and resume and not force:
        if on_phase:
            on_phase("the atlas is already complete: nothing to resume")
        return Atlas(out, model=None if isinstance(model, str) else model)
    from ..models import load_model, skeleton, unwrap_model

    if isinstance(model, str):
        plan = skeleton(model, size=size)
        if plan is not None:
            plan_layers(plan, layers, size)  # a typo answers before any weights load
        model = load_model(model, weights, seed=seed, device=device, size=size, progress=progress is not None)
    chosen = plan_layers(model, layers, size)
    pre = preprocessing_for(model, size)
    module, _ = unwrap_model(model)
    chosen = with_receptive_fields(module, chosen, pre.size)
    return build(
        model,
        images,
        out,
        layers=chosen,
        pre=pre,
        top_k=top_k,
        batch_size=batch_size,
        part_size=part_size,
        workers=workers,
        engine=engine,
        ray_address=ray_address,
        ray_actors=ray_actors,
        resume=resume,
        force=force,
        report=report,
        portraits=portraits,
        portrait_options=portrait_options,
        on_progress=progress,
        on_phase=on_phase,
        state=state,
    )


def open_atlas(folder: str | os.PathLike, *, model: "Model | nn.Module | None" = None) -> Atlas:
    """The finished atlas in ``folder`` (``model``: for :meth:`Atlas.crops` and :meth:`Atlas.maps`
    when the atlas was made with a model object; a named model is built again from the manifest).

    Raises:
        RunError: not an atlas folder, or an unfinished one (finish it with ``--resume``).
    """
    return Atlas(Path(folder), model=model)
