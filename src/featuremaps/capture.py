"""Capturing feature maps: :func:`capture` (network mode through :mod:`featuremaps.hooks`, the
seed's chains through :mod:`featuremaps.chains`) and :func:`list_layers`, every capture point of a
model with its output shape."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .attention import attention_maps, attention_modules, attention_rollout, token_attention_map
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
from .tokens import to_spatial, token_layout


# -- input -----------------------------------------------------------------------------------------
def prepare_input(model: Model | nn.Module, image: Any, *, size: int | tuple[int, int] | None = None):
    """``image`` -> (the model's input, the picture as the model sees it or None).

    A 4-D tensor is taken as an already preprocessed batch, and a dict of tensors as the input of a
    model whose forward takes one; a list of pictures becomes a batch (the picture returned is the
    first); anything else goes through :func:`featuremaps.images.load_image` and the model's
    preprocessing (``(1, C, H, W)`` with the channel count of the model's first layer).
    """
    module, info = unwrap_model(model)
    if isinstance(image, torch.Tensor) and image.ndim == 4:
        return image, None
    if isinstance(image, Mapping) and image and all(isinstance(v, torch.Tensor) for v in image.values()):
        return dict(image), None
    pre = info.preprocessing if info is not None else Preprocessing.for_channels(input_channels(module))
    pre = pre.with_size(size)
    if isinstance(image, (list, tuple)) and image and not isinstance(image[0], (int, float)):
        pairs = [pre(load_image(one)) for one in image]
        return torch.cat([x for x, _ in pairs]), pairs[0][1]
    picture = load_image(image)
    x, resized = pre(picture)
    return x, resized


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, dict):
        return {k: v.to(device) for k, v in x.items()}
    return x.to(device)


def _hw(x: Any) -> tuple[int, int]:
    """(H, W) of the input: its spatial tensor's last two sizes."""
    tensors = [x] if isinstance(x, torch.Tensor) else [v for v in x.values() if isinstance(v, torch.Tensor)]
    t = next((v for v in tensors if v.ndim == 4), tensors[0])
    return (int(t.shape[-2]), int(t.shape[-1]))


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
        layers: what to capture (see :func:`featuremaps.layers.match_layers`); default ``conv`` in
            network mode (``conv,blocks`` for transformers: ViT, DeiT, Swin, ConvNeXt), every step
            in chain modes.
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
    x = _to_device(x, module_device(module))
    if mode != "network":
        if isinstance(x, dict):
            raise LayerError("the seed's chains take an image tensor, not a dict input; use mode 'network'")
        return run_chain(model, x, chain=mode, layers=layers, reduce=reduction, image=picture)
    input_size = _hw(x)
    with exclusive(module):
        learned = learned_about(module)
        as_maps = _token_reader(module, learned, input_size)
        if layers is None and as_maps is not None:  # a transformer: its blocks are what there is to see
            layers = "conv,blocks"
        paths, calls = split_calls(learned.select(module, layers))
        entries, notes = run_pass(
            module, x, paths, reduction, stop_early=stop_early, learned=learned, as_maps=as_maps, calls=calls
        )
    if calls:
        entries = _only_calls(entries, calls)
    if as_maps is not None:
        entries = tuple(_read_as_maps(e, as_maps) for e in entries)
    return FeatureMaps(
        entries=entries,
        model=info.name if info else type(module).__name__,
        weights=info.weights if info else "as given",
        pretrained=info.pretrained if info else False,
        mode="network",
        input_size=input_size,
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
    x = _to_device(x, module_device(module))
    with exclusive(module):
        learned = learned_about(module)
        paths, calls = split_calls(learned.select(module, layers))
        outs, result = grad_pass(module, x, paths, stop_early=stop_early, learned=learned, calls=calls)
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


def default_layers(model: Model | nn.Module) -> str:
    """What ``layers=None`` captures in network mode: ``conv``, or ``conv,blocks`` for a transformer
    or a channels-last model (their maps are the blocks' token outputs)."""
    module, _ = unwrap_model(model)
    return "conv,blocks" if token_layout(module).family else "conv"


def _token_reader(module: nn.Module, learned: Any, input_size: tuple[int, int]) -> Callable | None:
    """For a transformer or channels-last model (ViT, DeiT, Swin, ConvNeXt: :func:`token_layout`
    knows it), the function that reads one output as ``(N, C, H, W)`` maps (None when it has none:
    logits, attention matrices); None for other models, whose outputs are taken as they are."""
    layout = learned.extras.get("token_layout")
    if layout is None:
        layout = learned.extras["token_layout"] = token_layout(module)
    if not layout.family:
        return None

    def read(output: Any) -> Any:
        view = to_spatial(output, input_size=input_size, layout=layout)
        return view if view is not None and view.kind != "spatial" else None

    return read


def _read_as_maps(entry: FeatureMap, read: Callable) -> FeatureMap:
    """A full token/channels-last output, marked so that it is read as maps (the raw tokens stay in
    ``.tensor``); other entries as they are."""
    if entry.reduction is not None or entry.spatial is not None:
        return entry
    view = read(entry.tensor)
    if view is None:
        return entry
    layout = "tokens" if view.kind == "tokens" else "nhwc"
    prefix = 0 if view.prefix is None else int(view.prefix.shape[1])
    return dataclasses.replace(entry, layout=layout, spatial=tuple(int(v) for v in view.maps.shape[1:]), prefix=prefix)


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


# -- attention -------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class AttentionMaps:
    """The attention probabilities (softmax of q·k per head) of a ViT's attention modules for one
    input, from :func:`capture_attention`, and their pictures as feature maps.

    Attributes:
        probabilities: attention module path -> ``(N, heads, L, L)``, in execution order.
        input_size: ``(H, W)`` of the model's input.
        image: the picture as the model saw it (None for a tensor input).
        model: the model's name.
    """

    probabilities: dict[str, torch.Tensor]
    input_size: tuple[int, int]
    image: Any = None
    model: str = "model"
    layout: Any = field(default=None, repr=False)

    def heads(self, block: str | None = None, *, token: int = 0) -> FeatureMap:
        """Where query ``token`` (0: the class token) looks, per head, as a map over the patch
        grid: an entry of ``heads`` channels that every figure draws (a channel grid: one tile
        per head). ``block``: an attention module path (default: the last)."""
        path = block if block is not None else list(self.probabilities)[-1]
        if path not in self.probabilities:
            raise LayerError(f"no attention maps of {path!r}; captured: {', '.join(self.probabilities)}")
        probs = self.probabilities[path]
        per_head = torch.stack(
            [token_attention_map(probs, input_size=self.input_size, layout=self.layout, token=token, head=h)
             for h in range(probs.shape[1])],
            dim=1,
        )  # fmt: skip
        return FeatureMap(name=f"{path} attention", module=path, kind="other", type="attention heads",
                          index=list(self.probabilities).index(path), call=1, shape=tuple(per_head.shape),
                          tensor=per_head)  # fmt: skip

    def rollout(self, *, discard_ratio: float = 0.0, token: int = 0) -> FeatureMap:
        """Attention rollout over every captured module (Abnar & Zuidema 2020): how much each
        patch flows into query ``token`` through all of them, as a one-channel map."""
        rolled = attention_rollout(list(self.probabilities.values()), discard_ratio=discard_ratio)
        grid = token_attention_map(rolled, input_size=self.input_size, layout=self.layout, token=token)[:, None]
        return FeatureMap(name="attention rollout", module="", kind="other", type="attention rollout",
                          index=len(self.probabilities), call=1, shape=tuple(grid.shape), tensor=grid)  # fmt: skip

    def maps(self) -> FeatureMaps:
        """Every module's per-head maps and the rollout, as a :class:`FeatureMaps` for the figures."""
        entries = [self.heads(p) for p in self.probabilities]
        entries.append(dataclasses.replace(self.rollout(), index=len(entries)))
        return FeatureMaps(entries=tuple(entries), model=self.model, mode="attention", input_size=self.input_size,
                           image=self.image)  # fmt: skip


def capture_attention(
    model: Model | nn.Module,
    image: Any,
    *,
    blocks: str | Sequence[str] = "all",
    size: int | tuple[int, int] | None = None,
) -> AttentionMaps:
    """The attention probabilities of a ViT's attention modules (torchvision's and timm's,
    including timm's fused path: rebuilt from q and k with the module's own weights) for one image.

    Args:
        blocks: ``"all"`` (every attention module the model has), or paths of attention modules or
            of blocks that hold one (``encoder.layers.encoder_layer_11``, ``blocks.11``).
    """
    module, info = unwrap_model(model)
    x, picture = prepare_input(model, image, size=size)
    x = x.to(module_device(module))
    paths = (
        list(attention_modules(module)) if blocks == "all" else ([blocks] if isinstance(blocks, str) else list(blocks))
    )
    if not paths:
        raise LayerError(
            f"{info.name if info else type(module).__name__} has no attention modules featuremaps can read"
        )
    with exclusive(module):
        probs = attention_maps(module, x, blocks=paths)
    return AttentionMaps(probabilities=probs, input_size=(int(x.shape[-2]), int(x.shape[-1])), image=picture,
                         model=info.name if info else type(module).__name__, layout=token_layout(module))  # fmt: skip
