"""Capturing feature maps: :func:`capture` (network mode through :mod:`featuremaps.hooks`, the
seed's chains through :mod:`featuremaps.chains`) and :func:`list_layers`, every capture point of a
model with its output shape."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .chains import run_chain
from .errors import LayerError
from .hooks import evaluating, exclusive, grad_pass, learned_about, run_pass
from .images import load_image
from .layers import entry_name, kind_of, select_layers, split_calls
from .maps import FeatureMap, FeatureMaps
from .memory import reuse_freed_memory
from .models import Model, input_channels, module_device, unwrap_model
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
    pre = info.preprocessing if info is not None else Preprocessing.for_channels(input_channels(module))
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
        paths, calls = split_calls(learned.select(module, layers))
        entries, notes = run_pass(module, x, paths, reduction, stop_early=stop_early, learned=learned)
    if calls:
        entries = _only_calls(entries, calls)
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


@dataclass(frozen=True, eq=False)
class GradCapture:
    """What :func:`capture_for_grad` gives: captured outputs still in the autograd graph.

    Attributes:
        outputs: entry name (``path``, ``path#k``) -> the output of that call, ``requires_grad``
            when the model's parameters or the input need gradients.
        output: the model's own output (logits), or None when the pass stopped after the last
            wanted layer.
        input: the input tensor the model saw.
        image: the picture as the model saw it (None for a tensor input).
    """

    outputs: dict[str, torch.Tensor]
    output: Any
    input: torch.Tensor
    image: Any = None


def capture_for_grad(
    model: Model | nn.Module,
    image: Any,
    *,
    layers: str | Sequence[str],
    size: int | tuple[int, int] | None = None,
    stop_early: bool = True,
) -> GradCapture:
    """One forward pass with autograd on, keeping the chosen layers' outputs in the graph, for
    gradients through them: ``torch.autograd.grad(score, g.outputs["layer4"])`` (class evidence),
    or the gradient of a channel's activation with respect to the input (channel portraits).

    The same selection and guarantees as :func:`capture` (every hook removed, flags restored, the
    model computing what it computes without featuremaps, in-place operations unable to change a
    captured output); ``stop_early`` skips the rest of the pass after the last wanted layer (once
    the model has run at this input shape), so a portrait never runs the classifier. Nothing is
    detached, copied to the CPU or reduced. ``image`` may be a preprocessed 4-D tensor (one that
    requires grad gives gradients with respect to it).
    """
    module, info = unwrap_model(model)
    x, picture = prepare_input(model, image, size=size)
    x = x.to(module_device(module))
    with exclusive(module):
        learned = learned_about(module)
        paths, calls = split_calls(learned.select(module, layers))
        outs, result = grad_pass(module, x, paths, stop_early=stop_early, learned=learned)
    kept: dict[str, torch.Tensor] = {}
    for path in paths:
        for k, t in enumerate(outs[path], 1):
            if path not in calls or k in calls[path]:
                kept[entry_name(path, k)] = t
    if not kept:
        raise LayerError(
            f"none of {', '.join(paths)} returned a tensor in this pass; use `featuremaps layers MODEL` to see what "
            "each layer returns"
        )
    return GradCapture(outputs=kept, output=result, input=x, image=picture)


def _only_calls(entries: tuple[FeatureMap, ...], calls: dict[str, frozenset[int]]) -> tuple[FeatureMap, ...]:
    """The entries that ``path#k`` selections ask for, numbered again in execution order."""
    kept = [e for e in entries if e.module not in calls or e.call in calls[e.module]]
    for path, wanted in calls.items():
        made = max((e.call for e in entries if e.module == path), default=0)
        missing = sorted(k for k in wanted if k > made)
        if missing:
            runs = f"is called {made} times per pass" if made else "is not called in a pass"
            raise LayerError(
                f"{entry_name(path, missing[0])} does not exist: {path} {runs}; "
                "use `featuremaps layers MODEL` to see each call"
            )
    return tuple(e if e.index == i else dataclasses.replace(e, index=i) for i, e in enumerate(kept))


# -- listing ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerInfo:
    """One capture point of a model, what ``featuremaps layers`` lists: one module call (a module
    called several times gives one row per call, named ``path#k`` from the second call on, as in
    captures), or a module that the forward pass never calls (``calls == 0``)."""

    index: int
    name: str
    kind: str
    type: str
    output_shape: tuple[int, ...] | None
    parameters: int
    calls: int
    module: str = ""
    call: int = 1

    @property
    def called(self) -> bool:
        return self.calls > 0


def list_layers(
    model: Model | nn.Module, *, size: int | tuple[int, int] | None = None, layers: str | Sequence[str] | None = "all"
) -> list[LayerInfo]:
    """The capture points of a model (leaf modules by default) with their output shapes for an
    input of ``size``: one forward pass of a zero image, no maps kept (a model built on the meta
    device, :func:`featuremaps.models.skeleton`, gives the shapes without computing anything)."""
    module, info = unwrap_model(model)
    pre = (info.preprocessing if info else Preprocessing.for_channels(input_channels(module))).with_size(size)
    paths, only = split_calls(select_layers(module, layers))
    modules = dict(module.named_modules())
    shapes: dict[str, list[tuple[int, ...] | None]] = {p: [] for p in paths}
    x = torch.zeros(1, pre.channels, *pre.size, device=module_device(module))

    def make_hook(path: str) -> Callable:
        def hook(mod: nn.Module, inputs: Any, output: Any) -> None:
            shapes[path].append(tuple(output.shape) if isinstance(output, torch.Tensor) else None)

        return hook

    with exclusive(module):
        handles = [modules[n].register_forward_hook(make_hook(n)) for n in paths]
        try:
            with evaluating(module), torch.no_grad():
                module(x)
        finally:
            for h in handles:
                h.remove()
    rows: list[LayerInfo] = []
    for path in paths:
        mod = modules[path]
        common = {"kind": kind_of(mod), "type": type(mod).__name__, "parameters": sum(p.numel() for p in mod.parameters()),
                  "calls": len(shapes[path]), "module": path}  # fmt: skip
        if not shapes[path]:
            rows.append(LayerInfo(index=len(rows), name=path, output_shape=None, call=0, **common))
        for k, shape in enumerate(shapes[path], 1):
            if path not in only or k in only[path]:
                rows.append(LayerInfo(index=len(rows), name=entry_name(path, k), output_shape=shape, call=k, **common))
    return rows
