"""Capturing feature maps: :func:`capture` (network mode through :mod:`featuremaps.hooks`, the
seed's chains through :mod:`featuremaps.chains`) and :func:`list_layers`, every capture point of a
model with its output shape."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .chains import run_chain
from .hooks import evaluating, exclusive, learned_about, run_pass
from .layers import kind_of, select_layers
from .maps import FeatureMaps
from .memory import reuse_freed_memory
from .models import Model, module_device, unwrap_model
from .options import check_mode
from .preprocess import Preprocessing
from .reduce import Reduction, parse_reduction


# -- input -----------------------------------------------------------------------------------------
def prepare_input(model: Model | nn.Module, image: Any, *, size: int | tuple[int, int] | None = None):
    """``image`` -> (input tensor ``(N, 3, H, W)``, the RGB picture as the model sees it or None).

    A 4-D tensor is taken as an already preprocessed batch; anything else goes through
    :func:`featuremaps.images.load_image` and the model's preprocessing.
    """
    module, info = unwrap_model(model)
    if isinstance(image, torch.Tensor) and image.ndim == 4:
        return image, None
    from .images import load_image

    pre = info.preprocessing if info is not None else Preprocessing()
    pre = pre.with_size(size)
    picture = load_image(image)
    x, resized = pre(picture)
    return x, resized


# -- capture ---------------------------------------------------------------------------------------
def capture(
    model: Model | nn.Module,
    image: Any,
    *,
    mode: str = "network",
    layers: str | Sequence[str] | None = None,
    reduce: str | Reduction | None = None,
    size: int | tuple[int, int] | None = None,
    stop_early: bool = True,
) -> FeatureMaps:
    """Capture feature maps of ``model`` for ``image``.

    Args:
        model: a :class:`~featuremaps.models.Model` from :func:`load_model`, or any ``nn.Module``
            (fed with ImageNet normalization at 224x224).
        image: anything :func:`~featuremaps.images.load_image` takes, or a preprocessed 4-D tensor.
        mode: ``network`` (the real forward pass, with hooks) or one of the seed's chains
            ``conv``, ``conv-relu``, ``conv-pool`` (see :mod:`featuremaps.chains`).
        layers: what to capture (see :func:`match_layers`); default ``conv`` in network mode and
            every step in chain modes.
        reduce: keep only a reduction of each map: ``mean``, ``max``, ``l2``, ``std`` or ``topk:K``.
        size: input size; default the model's (224 for VGG16).
        stop_early: skip the rest of the forward pass after the last wanted layer (network mode).

    Returns:
        FeatureMaps in execution order.
    """
    check_mode(mode)
    module, info = unwrap_model(model)
    reduction = parse_reduction(reduce)
    reuse_freed_memory()  # once per process: keep freed memory for the next capture (see featuremaps.memory)
    x, picture = prepare_input(model, image, size=size)
    x = x.to(module_device(module))
    if mode != "network":
        return run_chain(model, x, chain=mode, layers=layers, reduce=reduction, image=picture)
    with exclusive(module):
        learned = learned_about(module)
        names = learned.select(module, layers)
        entries, notes = run_pass(module, x, names, reduction, stop_early=stop_early, learned=learned)
    return FeatureMaps(
        entries=entries,
        model=info.name if info else type(module).__name__,
        weights=info.weights if info else "as given",
        pretrained=info.pretrained if info else False,
        mode="network",
        input_size=(int(x.shape[-2]), int(x.shape[-1])),
        image=picture,
        reduction=reduction.spec if reduction else None,
        notes=tuple(notes),
    )


# -- listing ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerInfo:
    """One capture point of a model: what ``featuremaps layers`` lists."""

    index: int
    name: str
    kind: str
    type: str
    output_shape: tuple[int, ...] | None
    parameters: int
    calls: int


def list_layers(
    model: Model | nn.Module, *, size: int | tuple[int, int] | None = None, layers: str | Sequence[str] | None = "all"
) -> list[LayerInfo]:
    """The capture points of a model (leaf modules by default) with their output shapes for an
    input of ``size`` (one forward pass of a zero image; no maps are kept)."""
    module, info = unwrap_model(model)
    pre = (info.preprocessing if info else Preprocessing()).with_size(size)
    names = select_layers(module, layers)
    modules = dict(module.named_modules())
    shapes: dict[str, tuple[int, ...] | None] = {}
    calls: Counter = Counter()
    x = torch.zeros(1, 3, *pre.size, device=module_device(module))

    def make_hook(path: str) -> Callable:
        def hook(mod: nn.Module, inputs: Any, output: Any) -> None:
            calls[path] += 1
            if path not in shapes:
                shapes[path] = tuple(output.shape) if isinstance(output, torch.Tensor) else None

        return hook

    with exclusive(module):
        handles = [modules[n].register_forward_hook(make_hook(n)) for n in names]
        try:
            with evaluating(module), torch.no_grad():
                module(x)
        finally:
            for h in handles:
                h.remove()
    return [
        LayerInfo(
            index=i,
            name=n,
            kind=kind_of(modules[n]),
            type=type(modules[n]).__name__,
            output_shape=shapes.get(n),
            parameters=sum(p.numel() for p in modules[n].parameters()),
            calls=calls[n],
        )
        for i, n in enumerate(names)
    ]
