"""The seed's three didactic chains over a model's sequential conv stack.

The seed takes VGG16's layers in order and applies them one after another, each to the previous
output, keeping every output:

- ``conv``: Conv2d only (VGG16: 13 maps of 224x224; not what the classifier computes, but it
  isolates what the filters extract);
- ``conv-relu``: Conv2d and its activation (same sizes, darker maps);
- ``conv-pool``: Conv2d and MaxPool2d (224 -> 7 on VGG16).

A BatchNorm right after a conv (VGG-BN) belongs to that conv's step in every chain. The stack is a
plain ``nn.Sequential`` of conv/norm/activation/pool/dropout layers that holds every conv of the
model: VGG (all depths, with or without batch norm) and AlexNet have one (``features``); models
built of blocks (ResNet, DenseNet...) do not, and are refused with a pointer to ``network`` mode.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import LayerError
from .hooks import evaluating, exclusive
from .layers import kind_of, match_layers
from .maps import FeatureMap, FeatureMaps, compute_stats
from .memory import release_freed_memory
from .models import unwrap_model
from .reduce import Reduction

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from .models import Model

#: chain name -> the step kinds it applies besides conv (and its norm).
CHAINS: dict[str, tuple[str, ...]] = {"conv": (), "conv-relu": ("act",), "conv-pool": ("pool",)}
_STACK_KINDS = {"conv", "norm", "act", "pool"}


def find_conv_stack(model: "Model | nn.Module") -> tuple[str, list[tuple[str, nn.Module]]]:
    """The model's sequential conv stack: its path and its ``(path, layer)`` children in order.

    Raises:
        LayerError: the model has no such stack (say, a ResNet).
    """
    module, info = unwrap_model(model)
    label = info.name if info else type(module).__name__
    n_convs = sum(1 for m in module.modules() if isinstance(m, nn.Conv2d))
    candidates = [("", module)] + [(n, m) for n, m in module.named_modules() if n]
    for path, seq in candidates:
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        convs = sum(1 for _, c in children if isinstance(c, nn.Conv2d))
        plain = all(kind_of(c) in _STACK_KINDS or isinstance(c, nn.Dropout) for _, c in children)
        if plain and convs >= 1 and convs == n_convs:
            prefix = f"{path}." if path else ""
            return path, [(prefix + n, c) for n, c in children]
    raise LayerError(
        f"{label} has no plain sequential conv stack (its convolutions sit inside blocks), so the seed's "
        "chains (conv, conv-relu, conv-pool) cannot be built for it; use mode 'network', which works for every model"
    )


def _out_of_place(layer: nn.Module) -> nn.Module:
    """The layer itself, or a shallow copy with ``inplace=False`` (the model's flag stays as it is)."""
    if getattr(layer, "inplace", False):
        layer = copy.copy(layer)
        layer.inplace = False
    return layer


def chain_steps(model: "Model | nn.Module", chain: str) -> list[tuple[str, list[nn.Module]]]:
    """The steps of a chain: ``(name, layers applied in this step)``; a conv step includes the
    BatchNorm that follows it."""
    if chain not in CHAINS:
        raise LayerError(f"unknown chain {chain!r}; use one of {', '.join(CHAINS)}")
    _, children = find_conv_stack(model)
    extra = CHAINS[chain]
    steps: list[tuple[str, list[nn.Module]]] = []
    for i, (name, layer) in enumerate(children):
        kind = kind_of(layer)
        if isinstance(layer, nn.Conv2d):
            group = [layer]
            nxt = children[i + 1][1] if i + 1 < len(children) else None
            if nxt is not None and kind_of(nxt) == "norm":
                group.append(nxt)
            steps.append((name, group))
        elif kind in extra and (kind != "pool" or isinstance(layer, nn.MaxPool2d)):
            steps.append((name, [_out_of_place(layer)]))
    return steps


def run_chain(
    model: "Model | nn.Module",
    x: torch.Tensor,
    *,
    chain: str = "conv",
    layers: str | Sequence[str] | None = None,
    reduce: Reduction | None = None,
    image: "Image.Image | None" = None,
) -> FeatureMaps:
    """Apply a chain to a preprocessed input ``x`` and keep each step's output (or its reduction).

    ``layers`` filters which steps are kept (by kind, name or glob); the chain stops after the
    last of them.
    With ``reduce``, only the running tensor and the reduced maps are held.
    """
    module, info = unwrap_model(model)
    with exclusive(module):  # one pass at a time per model: the steps read its in-place flags
        steps = chain_steps(model, chain)
        by_name = dict(module.named_modules())
        keep = (
            {n.removesuffix("#1") for n in match_layers([(n, by_name[n]) for n, _ in steps], layers)}
            if layers is not None
            else {n for n, _ in steps}
        )
        entries: list[FeatureMap] = []
        input_size = (int(x.shape[-2]), int(x.shape[-1]))
        last = max((i for i, (name, _) in enumerate(steps) if name in keep), default=-1)
        with evaluating(module), torch.no_grad():
            for name, group in steps[: last + 1]:  # nothing runs after the last wanted step
                for layer in group:
                    x = layer(x)
                if reduce is not None:
                    # lean on memory: hand the step before's output back to the system at once, rather
                    # than keep it for reuse (featuremaps.memory), so the peak stays near two steps' outputs
                    release_freed_memory()
                if name not in keep:
                    continue
                layer0 = by_name[name]
                kind = kind_of(layer0)
                stats = chans = None
                kept: Any = x
                if reduce is not None and x.ndim >= 3:
                    stats = compute_stats(x, name, kind)
                    kept, chans = reduce.apply(x)
                entries.append(
                    FeatureMap(
                        name=name,
                        module=name,
                        kind=kind,
                        type=type(layer0).__name__,
                        index=len(entries),
                        call=1,
                        shape=tuple(x.shape),
                        tensor=kept,
                        reduction=reduce.spec if stats is not None and reduce is not None else None,
                        channels=chans,
                        _stats=stats,
                    )
                )
    return FeatureMaps(
        entries=tuple(entries),
        model=info.name if info else type(module).__name__,
        weights=info.weights if info else "as given",
        pretrained=info.pretrained if info else False,
        mode=chain,
        input_size=input_size,
        image=image,
        reduction=reduce.spec if reduce else None,
    )
