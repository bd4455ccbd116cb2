"""Transformer outputs as feature maps: token sequences and channels-last tensors to ``(N, C, H, W)``.

A ViT/DeiT layer outputs tokens ``(N, L, C)``: a few prefix tokens (class, distillation, registers)
followed by one token per patch, row-major over the patch grid. Swin stages and the inside of
ConvNeXt blocks work channels-last, ``(N, H, W, C)``. :func:`token_layout` reads from a model what
the conversion needs; :func:`to_spatial` turns one output into maps featuremaps can draw.

::

    layout = token_layout(model)
    view = to_spatial(output, input_size=(224, 224), layout=layout)
    view.maps      # (N, C, 14, 14), a view of ``output`` (no copy) whenever its memory allows
    view.prefix    # (N, P, C): the class/distillation/register tokens, or None
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import nn

from .errors import FeatureMapsError

__all__ = [
    "COMMON_STRIDES",
    "MAX_GUESSED_PREFIX",
    "SpatialView",
    "TokenLayout",
    "TokenLayoutError",
    "to_spatial",
    "token_layout",
]

#: Strides (patch sizes) tried when a layout does not say which the model uses.
COMMON_STRIDES: tuple[int, ...] = (1, 2, 4, 8, 14, 16, 32, 64)
#: The most prefix tokens guessed for a token output when the layout does not say how many.
MAX_GUESSED_PREFIX = 16

Pair = tuple[int, int]


class TokenLayoutError(FeatureMapsError, ValueError):
    """An input size or token layout that cannot describe a patch grid."""


@dataclass(frozen=True)
class TokenLayout:
    """How a model lays out its spatial outputs; every field is None/empty when the model does not say.

    Attributes:
        num_prefix_tokens: tokens before the patch tokens (class, distillation, registers); 0 for
            models without any (Swin, ConvNeXt).
        patch_size: (height, width) of one patch of the patch embedding.
        grid_size: the patch grid at the image size the model was built for.
        strides: (height, width) strides at which the model produces maps, e.g. ((16, 16),) for a
            ViT-B/16, ((4, 4), (8, 8), (16, 16), (32, 32)) for Swin-T and ConvNeXt.
        channels_last: whether some outputs are (N, H, W, C) (Swin stages, LayerNorm and MLP inside
            ConvNeXt blocks); breaks the tie when a 4-D shape reads both ways.
        family: "vit", "swin", "convnext", or "" for a model this module does not know.
    """

    num_prefix_tokens: int | None = None
    patch_size: Pair | None = None
    grid_size: Pair | None = None
    strides: tuple[Pair, ...] = ()
    channels_last: bool = False
    family: str = ""

    def __post_init__(self) -> None:
        if self.num_prefix_tokens is not None and (
            not isinstance(self.num_prefix_tokens, int) or self.num_prefix_tokens < 0
        ):
            raise TokenLayoutError(f"num_prefix_tokens must be an int >= 0 or None, got {self.num_prefix_tokens!r}")
        for name in ("patch_size", "grid_size"):
            value = getattr(self, name)
            if value is not None and not _is_pair(value):
                raise TokenLayoutError(f"{name} must be a pair of positive ints like (16, 16), got {value!r}")
        if not all(_is_pair(s) for s in self.strides):
            raise TokenLayoutError(f"strides must be pairs of positive ints like ((16, 16),), got {self.strides!r}")

    def candidate_strides(self) -> tuple[Pair, ...]:
        """The strides to try: the model's own, else :data:`COMMON_STRIDES`."""
        strides = list(self.strides)
        if self.patch_size is not None and self.patch_size not in strides:
            strides.insert(0, self.patch_size)
        return tuple(strides) or tuple((s, s) for s in COMMON_STRIDES)


@dataclass(frozen=True)
class SpatialView:
    """One output as feature maps.

    Nothing is copied: ``maps`` and ``prefix`` are views sharing the output's memory (for "tokens"
    and "channels_last" a permuted, non-contiguous view; call ``.contiguous()`` for a compact copy).

    Attributes:
        maps: (N, C, H, W). For "spatial" it is the output itself.
        prefix: (N, P, C) prefix tokens dropped from a token output, or None when there are none.
        kind: "tokens" (N, L, C), "channels_last" (N, H, W, C) or "spatial" (N, C, H, W) as given.
        stride: the (height, width) stride whose patch grid matched; None for "spatial", and for
            a token grid matched by the layout's ``grid_size`` of a model without a patch size.
    """

    maps: torch.Tensor
    prefix: torch.Tensor | None
    kind: str
    stride: Pair | None


def _is_pair(value: object) -> bool:
    return (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    )


def _pair(value: object) -> Pair | None:
    """(h, w) from an int, a list or a tuple; None when it is not one."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return (value, value)
    if isinstance(value, (tuple, list, torch.Size)) and len(value) == 2:
        if any(isinstance(v, bool) for v in value):
            return None
        try:  # ints, numpy ints, 0-d int tensors; never floats or strings
            pair = (operator.index(value[0]), operator.index(value[1]))
        except TypeError:
            return None
        return pair if pair[0] > 0 and pair[1] > 0 else None
    return None


def _doubling(first: Pair, count: int) -> tuple[Pair, ...]:
    return tuple((first[0] * 2**k, first[1] * 2**k) for k in range(count + 1))


def _timm_strides(model: nn.Module) -> tuple[Pair, ...]:
    """The reductions of a timm model's ``feature_info`` (a list of dicts or a FeatureInfo)."""
    info = getattr(model, "feature_info", None)
    reductions: list[object] = []
    if isinstance(info, list):
        reductions = [d.get("reduction") for d in info if isinstance(d, dict)]
    elif info is not None and callable(getattr(info, "reduction", None)):
        reductions = list(info.reduction())
    strides: list[Pair] = []
    for r in reductions:
        pair = _pair(r)
        if pair is not None and pair not in strides:
            strides.append(pair)
    return tuple(strides)


def _cumulative_conv_strides(module: nn.Module) -> tuple[Pair, ...]:
    """Strides after each strided Conv2d of ``module``, in registration order (a CNN's stages)."""
    h = w = 1
    strides: list[Pair] = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and (m.stride[0] > 1 or m.stride[1] > 1):
            h, w = h * m.stride[0], w * m.stride[1]
            strides.append((h, w))
    return tuple(strides)


def token_layout(model: nn.Module) -> TokenLayout:
    """Read the token layout a model declares.

    Knows timm ViTs and their relatives (anything with ``num_prefix_tokens`` and a
    ``patch_embed.patch_size``: DeiT distilled = 2 prefix tokens, register models = 1 + registers),
    torchvision's ``VisionTransformer``, Swin (torchvision and timm: channels-last stages) and
    ConvNeXt (torchvision and timm: channels-last inside the blocks).

    Returns:
        The layout; an empty ``TokenLayout()`` for a model it does not know.
    """
    import torchvision.models as tvm

    cls = type(model)
    module = cls.__module__ or ""
    if isinstance(model, tvm.VisionTransformer):
        patch = _pair(model.patch_size)
        grid = _pair(model.image_size // model.patch_size)
        prefix = 1 if getattr(model, "class_token", None) is not None else 0
        return TokenLayout(num_prefix_tokens=prefix, patch_size=patch, grid_size=grid, strides=(patch,), family="vit")
    if isinstance(model, tvm.SwinTransformer):
        first = next((m for m in model.features[0].modules() if isinstance(m, nn.Conv2d)), None)
        patch = _pair(tuple(first.stride)) if first is not None else None
        merges = sum(type(m).__name__.startswith("PatchMerging") for m in model.modules())
        strides = _doubling(patch, merges) if patch is not None else ()
        return TokenLayout(num_prefix_tokens=0, patch_size=patch, strides=strides, channels_last=True, family="swin")
    if isinstance(model, tvm.ConvNeXt):
        strides = _cumulative_conv_strides(model.features)
        return TokenLayout(num_prefix_tokens=0, strides=strides, channels_last=True, family="convnext")

    if module.startswith("timm."):
        patch_embed = getattr(model, "patch_embed", None)
        patch = _pair(getattr(patch_embed, "patch_size", None))
        grid = _pair(getattr(patch_embed, "grid_size", None))
        strides = _timm_strides(model)
        if patch is not None and not strides:
            strides = (patch,)
        nhwc = str(getattr(model, "output_fmt", "")).upper().endswith("NHWC")
        if module.startswith("timm.models.swin") or (nhwc and patch is not None and "swin" in cls.__name__.lower()):
            return TokenLayout(
                num_prefix_tokens=0,
                patch_size=patch,
                grid_size=grid,
                strides=strides,
                channels_last=True,
                family="swin",
            )
        if module.startswith("timm.models.convnext"):
            return TokenLayout(num_prefix_tokens=0, strides=strides, channels_last=True, family="convnext")
        prefix = getattr(model, "num_prefix_tokens", None)
        if isinstance(prefix, int) and not isinstance(prefix, bool) and patch is not None:
            # With dynamic_img_size, timm's patch_embed hands (N, gh, gw, C) to the position embedding.
            pe_nhwc = str(getattr(patch_embed, "output_fmt", "")).upper().endswith("NHWC")
            return TokenLayout(
                num_prefix_tokens=prefix,
                patch_size=patch,
                grid_size=grid,
                strides=strides,
                channels_last=pe_nhwc,
                family="vit",
            )
    return TokenLayout()


def _check_size(input_size: object) -> Pair:
    pair = _pair(input_size)
    if pair is None or isinstance(input_size, int):
        raise TokenLayoutError(
            f"input_size must be the model input's (height, width) as two positive ints, got {input_size!r}"
        )
    return pair


def _grids(input_size: Pair, strides: tuple[Pair, ...]) -> list[tuple[Pair, Pair]]:
    """(grid, stride) candidates: floor and ceil of input/stride (padding conventions differ)."""
    h, w = input_size
    found: list[tuple[Pair, Pair]] = []
    seen: set[Pair] = set()
    for sh, sw in strides:
        for gh in dict.fromkeys((h // sh, math.ceil(h / sh))):
            for gw in dict.fromkeys((w // sw, math.ceil(w / sw))):
                if gh > 0 and gw > 0 and (gh, gw) not in seen:
                    seen.add((gh, gw))
                    found.append(((gh, gw), (sh, sw)))
    return found


def _is_attention_matrix(output: torch.Tensor, input_size: Pair, layout: TokenLayout) -> bool:
    """(N, heads, L, L) with L the model's token count: attention probabilities, not maps."""
    if layout.num_prefix_tokens is None or layout.family != "vit" or output.shape[-1] != output.shape[-2]:
        return False
    counts = {layout.num_prefix_tokens + gh * gw for (gh, gw), _ in _grids(input_size, layout.candidate_strides())}
    return output.shape[-1] in counts


def to_spatial(output: object, *, input_size: tuple[int, int], layout: TokenLayout | None = None) -> SpatialView | None:
    """Turn one layer output into (N, C, H, W) maps, or say it is not spatial.

    Rules:
        - 4-D ``(N, A, B, D)``: channels-last when (A, B) is a patch grid of ``input_size`` (floor
          or ceil of H/s, W/s for one of the layout's strides) and (B, D) is not; when both read
          as grids the layout's ``channels_last`` decides. Otherwise it is NCHW, returned as is.
        - 3-D ``(N, L, C)``: the prefix is ``layout.num_prefix_tokens`` when known (or 0: a patch
          embedding's output, before the class token is prepended), else
          ``L - gh * gw`` (0 to :data:`MAX_GUESSED_PREFIX`). The grid (gh, gw) comes from
          ``input_size`` and the patch size; without one, the grids of :data:`COMMON_STRIDES`
          (and the layout's ``grid_size``) are tried, and the one leaving the fewest prefix tokens
          wins. The patch tokens are reshaped row-major to (gh, gw).
        - Anything else, a tuple, a 3-D output whose L fits no grid, or a 4-D (N, heads, L, L)
          attention matrix of a ViT layout: None.

    Args:
        output: a layer's output.
        input_size: (height, width) of the model's input tensor.
        layout: from :func:`token_layout`; None for an unknown model.

    Returns:
        A :class:`SpatialView`, or None when the output has no spatial reading.

    Raises:
        TokenLayoutError: ``input_size`` is not two positive ints.
    """
    size = _check_size(input_size)
    layout = layout if layout is not None else TokenLayout()
    if not isinstance(output, torch.Tensor):
        return None
    strides = layout.candidate_strides()
    if output.ndim == 4:
        if _is_attention_matrix(output, size, layout):
            return None
        by_grid = {grid: stride for grid, stride in _grids(size, strides)}
        nhwc = by_grid.get((output.shape[1], output.shape[2]))
        nchw = (output.shape[2], output.shape[3]) in by_grid
        if nhwc is not None and (not nchw or layout.channels_last):
            maps = output.permute(0, 3, 1, 2)
            return SpatialView(maps=maps, prefix=None, kind="channels_last", stride=nhwc)
        return SpatialView(maps=output, prefix=None, kind="spatial", stride=None)
    if output.ndim != 3:
        return None

    n, length, channels = output.shape
    candidates: list[tuple[Pair, Pair | None]] = list(_grids(size, strides))
    if layout.grid_size is not None and all(layout.grid_size != g for g, _ in candidates):
        candidates.append((layout.grid_size, layout.patch_size))  # the grid the model was built for
    best: tuple[int, int, Pair, Pair | None] | None = None
    for (gh, gw), stride in candidates:
        prefix = length - gh * gw
        if layout.num_prefix_tokens is not None:
            # The model's prefix count, or none at all: a patch embedding's own output.
            rank = 0 if prefix == layout.num_prefix_tokens else 1 if prefix == 0 else None
        else:
            rank = prefix if 0 <= prefix <= MAX_GUESSED_PREFIX else None
        if rank is not None and (best is None or rank < best[0]):
            best = (rank, prefix, (gh, gw), stride)
    if best is None:
        return None
    _, prefix, (gh, gw), stride = best
    # Splitting one axis and permuting never needs a copy, whatever the output's strides.
    maps = output[:, prefix:].view(n, gh, gw, channels).permute(0, 3, 1, 2)
    return SpatialView(maps=maps, prefix=output[:, :prefix] if prefix else None, kind="tokens", stride=stride)
