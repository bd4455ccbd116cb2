"""Class evidence: Grad-CAM, Grad-CAM++ and LayerCAM of a classifier, with its top classes and the channels that make
up each map.

:func:`cam` is the whole thing: one pass of featuremaps' own capture with autograd on
(:func:`featuremaps.capture.capture_for_grad`), the gradient of the target's score with respect to the layer's output
alone, the map, its upsampled picture, the top-5 classes and each channel's contribution (:class:`CamResult`). The rest
are pure functions of tensors that it is built from, and the pictures and report section of a CAM in a run folder
(``featuremaps cam``, ``featuremaps show --cam``). The formulas are those of pytorch-grad-cam 1.5 (``GradCAM``,
``GradCAMPlusPlus``, ``LayerCAM``), so that the maps match it:

* ``gradcam``:   ``w_c = mean_xy G_c``; ``cam = relu(sum_c w_c A_c)``.
* ``gradcam++``: ``alpha = G^2 / (2 G^2 + S_c G^3 + 1e-6)`` with ``S_c = sum_xy A_c``, ``alpha = 0`` where ``G = 0``;
  ``w_c = sum_xy relu(G_c) alpha_c``; ``cam = relu(sum_c w_c A_c)``.
* ``layercam``:  ``cam = relu(sum_c relu(G_c) A_c)`` (the weights are per position, there is no ``w_c``).

The oracle then min-max scales each image's map, resizes it to the input with ``cv2.resize`` (bilinear, half-pixel
centres) and min-max scales again; :func:`upsample` and :func:`normalize` do the same with torch.

**Contributions.** The map before its ReLU is a sum over channels, so its sum over space splits exactly into one
term per channel: ``contribution_c = w_c * sum_xy A_c`` (Grad-CAM, Grad-CAM++) and
``contribution_c = sum_xy relu(G_c) A_c`` (LayerCAM). The contributions of all channels add up to the sum of the
map *before the ReLU*; a negative contribution is a channel that speaks against the class.

**Transformers.** A layer whose output is tokens ``(N, L, C)`` (ViT, DeiT) or channels-last ``(N, H, W, C)`` (Swin) is
read as ``(N, C, H, W)`` maps by :func:`featuremaps.tokens.to_spatial`, prefix tokens dropped, for its activations and
its gradients alike; :func:`default_layer` says which layer is explained when none is given.
"""

from __future__ import annotations

import difflib
import html
import io
import operator
import os
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .capture import capture_for_grad, prepare_input
from .errors import FeatureMapsError, LayerError
from .layers import layer_selector
from .models import Model, input_channels, module_device, unwrap_model
from .preprocess import Preprocessing
from .report import Section
from .runs import Picture
from .tokens import SpatialView, TokenLayout, to_spatial, token_layout

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

#: The CAM methods :func:`cam_map` computes.
CAM_METHODS: tuple[str, ...] = ("gradcam", "gradcam++", "layercam")

#: Grad-CAM++'s constant in the denominator of alpha (pytorch-grad-cam's value, absolute, not relative).
GRADCAM_PP_EPS = 1e-6

_ALIASES = {"gradcampp": "gradcam++", "gradcamplusplus": "gradcam++"}

#: How each method is written for people.
METHOD_NAMES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "layercam": "LayerCAM"}


class CamError(FeatureMapsError, ValueError):
    """A CAM method, class target, labels file or tensor shape is not usable."""


@dataclass(frozen=True, eq=False)
class CamParts:
    """The raw result of :func:`cam_map` for a batch, on the device of its inputs.

    Attributes:
        method: one of :data:`CAM_METHODS`.
        map: ``(N, H, W)`` the CAM at the layer's resolution after its ReLU, before any resizing or scaling.
        weights: ``(N, C)`` channel weights (Grad-CAM, Grad-CAM++); ``None`` for LayerCAM, whose weights are per
            position.
        contributions: ``(N, C)`` each channel's term of the map's sum over space before the ReLU (see the module
            docstring); ``contributions.sum(1)`` equals that sum.
    """

    method: str
    map: torch.Tensor
    weights: torch.Tensor | None
    contributions: torch.Tensor


@dataclass(frozen=True)
class ClassScore:
    """One of a classifier's top classes: its label (``"class <index>"`` without labels), index and probability."""

    label: str
    index: int
    probability: float


@dataclass(frozen=True, eq=False)
class CamResult:
    """The class evidence of one image at one layer, ready to draw.

    Attributes:
        method: one of :data:`CAM_METHODS`.
        layer: the layer's capture key: its ``named_modules()`` path, ``path#k`` for the k-th call of a module
            called several times (``""`` until the caller names it).
        target: the class index explained.
        label: its label (``"class <index>"`` without labels).
        probability: its softmax probability.
        map: ``(h, w)`` float32, the raw CAM at the layer's resolution (after ReLU, not scaled).
        upsampled: ``(H, W)`` float32 at the input's size, min-max scaled to ``[0, 1]`` (all zeros for a constant map).
        contributions: ``(channel, value)`` pairs, highest value first (channels that speak against the class last).
        classes: the most probable classes (5 by :func:`cam`), most probable first.
        weights: ``(C,)`` float32 channel weights ``w_c`` (Grad-CAM, Grad-CAM++); None for LayerCAM.
        image: the picture as the model saw it (PIL, at the input's size); None for a tensor input.
        kind: how the layer's output was read as maps: ``"spatial"`` ``(N, C, H, W)``, ``"tokens"`` (a ViT's
            ``(N, L, C)``, prefix tokens dropped) or ``"channels_last"`` ``(N, H, W, C)``.
    """

    method: str
    layer: str
    target: int
    label: str
    probability: float
    map: np.ndarray
    upsampled: np.ndarray
    contributions: tuple[tuple[int, float], ...]
    classes: tuple[ClassScore, ...] = ()
    weights: np.ndarray | None = field(default=None, repr=False)
    image: Any = field(default=None, repr=False)
    kind: str = "spatial"

    def top_channels(self, k: int = 8) -> tuple[tuple[int, float], ...]:
        """The ``k`` channels that add most to the map, strongest first."""
        return self.contributions[: max(int(k), 0)]

    @property
    def title(self) -> str:
        """One line saying what the map shows: ``Grad-CAM of 'tabby' (class 281, p = 0.431) at layer4``."""
        named = self.label != f"class {self.target}"
        what = f"{self.label!r} (class {self.target}, " if named else f"class {self.target} ("
        return f"{METHOD_NAMES[self.method]} of {what}p = {self.probability:.3g}) at {self.layer or 'its layer'}"

    def overlay(self, *, alpha: float = 0.5, cmap: str = "jet", legend: bool = True) -> Image.Image:
        """The upsampled map coloured with ``cmap`` (0 to 1) and blended over the picture the model saw:
        ``(1 - alpha) * picture + alpha * colours``; ``legend`` adds a colorbar with :attr:`title` under it.

        Raises:
            CamError: no picture (the CAM was computed from a tensor), ``alpha`` outside ``[0, 1]``.
            RenderError: an unknown colormap.
        """
        from PIL import Image

        from . import render

        if self.image is None:
            raise CamError(
                "this CAM was computed from a tensor, so there is no picture to draw it over; pass a picture "
                "(a path or a PIL image) to cam(), or draw .upsampled yourself"
            )
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise CamError(f"alpha is the map's opacity between 0 and 1, not {alpha!r}")
        h, w = self.upsampled.shape
        picture = self.image.convert("RGB")
        if picture.size != (w, h):
            picture = picture.resize((w, h), Image.Resampling.BILINEAR)
        heat = render.colorize(self.upsampled, cmap=cmap, vmin=0.0, vmax=1.0).astype(np.float32)
        mixed = np.asarray(picture, dtype=np.float32) * (1.0 - alpha) + heat * alpha
        im = Image.fromarray(np.clip(mixed + 0.5, 0, 255).astype(np.uint8))
        if legend:  # at least MIN_WIDTH wide, so that the title stays readable under a small picture
            width = max(w, render.MIN_WIDTH)
            bar = render.colorbar(cmap, 0.0, 1.0, width=width, label=self.title)
            full = Image.new("RGB", (width, h + bar.height), render.BACKGROUND_COLOR)
            full.paste(im, ((width - w) // 2, 0))
            full.paste(bar, (0, h))
            im = full
        return im

    def _repr_png_(self) -> bytes | None:
        """Notebooks show the overlay (nothing for a CAM of a tensor input)."""
        if self.image is None:
            return None
        from .render import to_png_bytes

        return to_png_bytes(self.overlay())

    def to_dict(self, *, channels: int = 16) -> dict[str, Any]:
        """The numbers as JSON-ready values (what a run folder's manifest keeps under ``"cam"``): method, layer,
        target, label, probability, the map's shape and range, the top classes and the ``channels`` strongest
        contributions with their weights."""
        weights = self.weights
        return {
            "method": self.method,
            "layer": self.layer,
            "kind": self.kind,
            "target": self.target,
            "label": self.label,
            "probability": self.probability,
            "map_shape": list(self.map.shape),
            "map_max": float(self.map.max()) if self.map.size else 0.0,
            "input_size": list(self.upsampled.shape),
            "top_classes": [{"label": s.label, "index": s.index, "probability": s.probability} for s in self.classes],
            "channels": [
                {"channel": c, "contribution": v, "weight": None if weights is None else float(weights[c])}
                for c, v in self.top_channels(channels)
            ],
            "contributions_total": float(sum(v for _, v in self.contributions)),
        }


def _method(method: str) -> str:
    if not isinstance(method, str):
        raise CamError(f"the CAM method must be a string, one of {', '.join(CAM_METHODS)}; got {method!r}")
    key = method.strip().lower().replace("-", "").replace("_", "")
    key = _ALIASES.get(key, key)
    if key not in CAM_METHODS:
        close = difflib.get_close_matches(key, CAM_METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise CamError(f"unknown CAM method {method!r}{hint}; use one of {', '.join(CAM_METHODS)}")
    return key


def _check_pair(activations: torch.Tensor, gradients: torch.Tensor) -> None:
    for name, t in (("activations", activations), ("gradients", gradients)):
        if not isinstance(t, torch.Tensor):
            raise CamError(f"{name} must be a torch tensor (N, C, H, W), got {type(t).__name__}")
        if t.ndim != 4:
            raise CamError(
                f"{name} must be (N, C, H, W), got shape {tuple(t.shape)}; add the batch axis with [None] or "
                "reshape a transformer's tokens to a grid first"
            )
        if not (t.is_floating_point() and bool(torch.isfinite(t).all())):
            raise CamError(f"{name} must be finite floating-point values; check the model's output for NaN/inf")
    if activations.shape != gradients.shape:
        raise CamError(
            f"activations {tuple(activations.shape)} and gradients {tuple(gradients.shape)} differ in shape; "
            "give the gradient of the score with respect to that same output"
        )


def cam_map(activations: torch.Tensor, gradients: torch.Tensor, method: str = "gradcam") -> CamParts:
    """The CAM of each image from a layer's output and the gradient of the target score with respect to it.

    Args:
        activations: ``(N, C, H, W)`` the layer's output.
        gradients: ``(N, C, H, W)`` d(score) / d(output), same shape.
        method: one of :data:`CAM_METHODS` (case, ``-`` and ``_`` are ignored; ``gradcampp`` means ``gradcam++``).

    Returns:
        A :class:`CamParts`, computed in float32 (float64 stays float64) on the inputs' device, detached.

    Raises:
        CamError: an unknown method, shapes that are not ``(N, C, H, W)`` or differ, non-finite values.
    """
    key = _method(method)
    _check_pair(activations, gradients)
    dtype = torch.promote_types(activations.dtype, torch.float32)
    a = activations.detach().to(dtype)
    g = gradients.detach().to(dtype)
    if key == "layercam":
        weighted = g.clamp(min=0) * a  # per-position weights
        pre = weighted.sum(dim=1)
        return CamParts(key, pre.clamp(min=0), None, weighted.sum(dim=(2, 3)))
    if key == "gradcam":
        weights = g.mean(dim=(2, 3))
    else:
        g2 = g * g
        a_sum = a.sum(dim=(2, 3), keepdim=True)
        alpha = g2 / (2 * g2 + a_sum * g2 * g + GRADCAM_PP_EPS)
        # Only positive gradients count (relu(G) * alpha); torch.where also keeps an inf alpha at a
        # non-positive gradient from turning the weight into NaN (the oracle would give 0 * inf there).
        weights = torch.where(g > 0, g * alpha, torch.zeros_like(g)).sum(dim=(2, 3))
    pre = torch.einsum("nc,nchw->nhw", weights, a)
    return CamParts(key, pre.clamp(min=0), weights, weights * a.sum(dim=(2, 3)))


def _as_batch(map_: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if not isinstance(map_, torch.Tensor) or map_.ndim not in (2, 3):
        shape = tuple(map_.shape) if isinstance(map_, torch.Tensor) else type(map_).__name__
        raise CamError(f"a CAM must be a tensor (H, W) or (N, H, W), got {shape}")
    return (map_[None], True) if map_.ndim == 2 else (map_, False)


def upsample(map_: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize CAMs ``(N, h, w)`` or ``(h, w)`` to ``size = (height, width)``, bilinear with half-pixel centres.

    This is ``cv2.resize(..., INTER_LINEAR)`` (the oracle's resize) written with torch: same sampling grid, same
    edge clamping, no antialiasing; the two differ by float32 rounding only (measured below 1e-6 when enlarging maps
    scaled to [0, 1]; shrinking is not compared).
    Note the order: ``size`` is (height, width), where cv2 takes (width, height).
    """
    batch, single = _as_batch(map_)
    if len(size) != 2 or any(int(s) < 1 for s in size):
        raise CamError(f"size must be (height, width) with both >= 1, got {tuple(size)!r}")
    src = batch if batch.is_floating_point() else batch.float()
    out = F.interpolate(src[:, None], size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False)[:, 0]
    return out[0] if single else out


def normalize(map_: torch.Tensor) -> torch.Tensor:
    """Min-max scale each image's CAM to ``[0, 1]``; a constant map becomes all zeros (never NaN).

    The oracle divides by ``max - min + 1e-7`` instead (a relative difference of 1e-7 / span); it scales twice, before
    and after its resize, so on its final output the constant cancels to below 1e-6.
    """
    batch, single = _as_batch(map_)
    src = batch if batch.is_floating_point() else batch.float()
    flat = src.flatten(1)
    lo = flat.min(dim=1).values[:, None, None]
    span = flat.max(dim=1).values[:, None, None] - lo
    out = torch.where(span > 0, (src - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(src))
    return out[0] if single else out


def _logits_2d(logits: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.ndim not in (1, 2) or logits.shape[-1] < 1:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise CamError(f"logits must be a tensor (K,) or (N, K) of class scores, got {shape}")
    return logits.detach()[None] if logits.ndim == 1 else logits.detach()


def _check_labels(labels: Sequence[str] | None, classes: int) -> None:
    if labels is not None and len(labels) != classes:
        raise CamError(
            f"{len(labels)} labels for a model with {classes} classes; give one label per class, in class-index order"
        )


def _label(labels: Sequence[str] | None, index: int) -> str:
    return str(labels[index]) if labels is not None else f"class {index}"


def top_classes(logits: torch.Tensor, k: int = 5, *, labels: Sequence[str] | None = None) -> list[list[ClassScore]]:
    """The ``k`` most probable classes of each image (softmax of the logits, in float64), most probable first.

    Args:
        logits: ``(N, K)`` or ``(K,)`` (one image).
        k: how many classes per image; more than ``K`` gives ``K``.
        labels: one label per class, or ``None`` (labels are then ``"class <index>"``).

    Returns:
        One list per image; ties are ordered by class index.

    Raises:
        CamError: bad logits shape, ``k < 1``, a label count that is not ``K``.
    """
    batch = _logits_2d(logits)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise CamError(f"k must be an integer >= 1, got {k!r}")
    _check_labels(labels, batch.shape[1])
    probs = torch.softmax(batch.double(), dim=1).cpu()
    values, indices = torch.sort(probs, dim=1, descending=True, stable=True)
    k = min(k, batch.shape[1])
    return [
        [ClassScore(_label(labels, int(i)), int(i), float(p)) for p, i in zip(row_p[:k].tolist(), row_i[:k].tolist())]
        for row_p, row_i in zip(values, indices)
    ]


def read_labels(path: str | Path, *, expected: int | None = None) -> tuple[str, ...]:
    """Read a labels file: one class name per line, in class-index order.

    A UTF-8 byte-order mark, Windows line ends, spaces around a label and blank lines (anywhere) are ignored.

    Args:
        path: the text file.
        expected: the model's class count; a different number of labels is an error.

    Raises:
        CamError: the file is missing, unreadable, not UTF-8, has no labels, or not ``expected`` of them.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CamError(f"labels file {str(path)!r} not found; give a text file with one class name per line") from None
    except UnicodeDecodeError:
        raise CamError(f"labels file {str(path)!r} is not UTF-8 text; save it as UTF-8, one class per line") from None
    except OSError as exc:
        raise CamError(f"cannot read labels file {str(path)!r} ({exc.strerror or exc}); check the path") from None
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not labels:
        raise CamError(f"labels file {str(path)!r} has no labels; write one class name per line")
    if expected is not None and len(labels) != expected:
        raise CamError(
            f"labels file {str(path)!r} has {len(labels)} labels but the model has {expected} classes; "
            "give one label per class, in class-index order"
        )
    return labels


def _index(target: object) -> int | None:
    if isinstance(target, bool):
        return None
    try:
        return operator.index(target)  # int, numpy integers, 0-d integer tensors
    except TypeError:
        return None


def resolve_target(target: int | str | None, logits: torch.Tensor, labels: Sequence[str] | None = None) -> int:
    """The class index to explain for one image.

    Args:
        target: ``None`` for the most probable class; a class index ``0..K-1``; or a label, matched exactly, then as a
            decimal index (``"281"``), then case-insensitively, then as a unique case-insensitive substring
            (``"tabby"`` finds ``"tabby cat"``).
        logits: ``(K,)`` or ``(1, K)``, one image's class scores.
        labels: one label per class, or ``None``.

    Raises:
        CamError: an index out of range, a label that matches no class (the message lists the closest) or several,
            several images' logits, or a label count that is not ``K``.
    """
    batch = _logits_2d(logits)
    if batch.shape[0] != 1:
        raise CamError(f"resolve_target takes one image's logits, got {batch.shape[0]} images; pass logits[i]")
    classes = batch.shape[1]
    _check_labels(labels, classes)
    if target is None:
        return int(batch[0].argmax())
    index = _index(target)
    if index is not None:
        if not 0 <= index < classes:
            raise CamError(f"class index {index} is out of range; this model has classes 0..{classes - 1}")
        return index
    if not isinstance(target, str):
        raise CamError(f"a target is a class index, a label or None, got {type(target).__name__}")
    text = target.strip()
    if labels is not None:
        exact = [i for i, lab in enumerate(labels) if lab == text]
        if len(exact) == 1:
            return exact[0]
        if len(exact) > 1:
            raise CamError(f"label {text!r} names classes {exact}; pass one of these indices instead")
    if text.isascii() and text.isdigit():
        return resolve_target(int(text), batch, labels)
    if labels is None:
        raise CamError(
            f"no labels are known for this model, so {text!r} cannot be found; pass a class index "
            f"0..{classes - 1} or a labels file"
        )
    low = text.casefold()
    for rule in (lambda lab: lab.casefold() == low, lambda lab: low in lab.casefold()):
        found = [i for i, lab in enumerate(labels) if rule(lab)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            shown = ", ".join(f"{labels[i]!r} ({i})" for i in found[:5]) + (", ..." if len(found) > 5 else "")
            raise CamError(f"{text!r} matches {len(found)} classes: {shown}; be more specific or pass an index")
    by_low = {}
    for lab in labels:
        by_low.setdefault(lab.casefold(), lab)
    close = [by_low[m] for m in difflib.get_close_matches(low, list(by_low), n=3, cutoff=0.6)]
    hint = f"closest: {', '.join(repr(c) for c in close)}" if close else "no label is close"
    raise CamError(f"unknown class {text!r} ({hint}); pass a label of this model or an index 0..{classes - 1}")


def cam_result(
    parts: CamParts,
    logits: torch.Tensor,
    *,
    target: int,
    size: tuple[int, int],
    image: int = 0,
    labels: Sequence[str] | None = None,
    layer: str = "",
    top: int | None = None,
    classes: int = 5,
    picture: Any = None,
    kind: str = "spatial",
) -> CamResult:
    """Finish one image of a :class:`CamParts` into a :class:`CamResult`.

    Args:
        parts: what :func:`cam_map` returned for the batch.
        logits: ``(N, K)`` or ``(K,)`` the model's output for that batch (for the target's probability).
        target: the class index the gradients were taken for (see :func:`resolve_target`).
        size: the input's ``(height, width)``; ``upsampled`` is ``normalize(upsample(map, size))``.
        image: which image of the batch.
        labels: one label per class, or ``None``.
        layer: the layer's path, for the record.
        top: keep only the ``top`` strongest contributions (all channels by default).
        classes: how many of the most probable classes to keep.
        picture: the picture as the model saw it, for :meth:`CamResult.overlay`.
        kind: how the layer's output was read as maps (see :class:`CamResult`).

    Raises:
        CamError: an image or target index out of range, a label count that is not ``K``.
    """
    batch = _logits_2d(logits)
    n = parts.map.shape[0]
    if not 0 <= image < n or batch.shape[0] != n:
        raise CamError(f"image {image} of a batch of {n} CAMs and {batch.shape[0]} logits rows; pass matching ones")
    target = resolve_target(target, batch[image], labels)
    probs = torch.softmax(batch[image].double(), dim=0)
    raw = parts.map[image].detach()
    up = normalize(upsample(raw, size))
    contrib = parts.contributions[image].detach().double().cpu()
    order = torch.sort(contrib, descending=True, stable=True).indices.tolist()
    if top is not None:
        order = order[: max(int(top), 0)]
    values = contrib.tolist()
    return CamResult(
        method=parts.method,
        layer=layer,
        target=target,
        label=_label(labels, target),
        probability=float(probs[target]),
        map=_frozen(raw),
        upsampled=_frozen(up),
        contributions=tuple((int(c), float(values[c])) for c in order),
        classes=tuple(top_classes(batch[image], max(int(classes), 1), labels=labels)[0]) if classes else (),
        weights=_frozen(parts.weights[image]) if parts.weights is not None else None,
        image=picture,
        kind=kind,
    )


def _frozen(t: torch.Tensor) -> np.ndarray:
    arr = np.array(t.detach().float().cpu().numpy(), dtype=np.float32, copy=True)
    arr.setflags(write=False)
    return arr


# -- class evidence of a model: cam() ------------------------------------------------------------------------------
#: How many outputs of the last spatial layer's width :func:`cam` tries, last first, for its default layer.
PROBED_LAYERS = 32
#: A plain ``(N, C, H, W)`` output reads as a map of the picture when the strides of its two axes (input size over
#: map size) agree within this factor: padding and rounding make them differ a little, an attention matrix or a
#: ``(N, heads, L, head_dim)`` tensor a lot.
STRIDE_AGREEMENT = 1.5

_ADAPTIVE_POOLS = (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
_DEFAULT_LAYERS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, str]] = weakref.WeakKeyDictionary()
_DEFAULTS_LOCK = threading.Lock()


def check_method(method: str) -> str:
    """The canonical name of a CAM method (``"GradCAM++"`` -> ``"gradcam++"``); a :class:`CamError` for others."""
    return _method(method)


def cam(
    model: Model | nn.Module,
    image: Any,
    method: str = "gradcam",
    *,
    layer: str | nn.Module | None = None,
    target: int | str | None = None,
    labels: Sequence[str] | str | os.PathLike | None = None,
    size: int | tuple[int, int] | None = None,
) -> CamResult:
    """Which parts of ``image`` make ``model`` find class ``target``: Grad-CAM, Grad-CAM++ or LayerCAM at ``layer``.

    One forward pass with autograd on (:func:`featuremaps.capture.capture_for_grad`: every hook removed, flags
    restored, in-place operations unable to change the captured output), then the gradient of the target's logit
    with respect to the layer's output alone (``torch.autograd.grad``: the parameters' ``.grad`` are untouched and
    the backward pass stops at the layer). Nothing is kept after the call but the result.

    Args:
        model: a :class:`~featuremaps.models.Model` or an ``nn.Module`` classifier whose output is logits
            ``(1, classes)`` (a dict with ``"logits"`` or an object with a ``.logits`` tensor also works).
        image: anything :func:`~featuremaps.images.load_image` takes, or a preprocessed ``(1, C, H, W)`` tensor.
        method: ``gradcam``, ``gradcam++`` or ``layercam``.
        layer: a ``named_modules()`` path (``"layer4"``, ``"blocks.11.norm1"``; ``path#k`` for the k-th call of a
            module called several times) or the module itself. Default: the last spatial layer (see
            :func:`default_layer`). Token outputs ``(N, L, C)`` and channels-last outputs are read as maps with
            :func:`featuremaps.tokens.to_spatial` (prefix tokens dropped).
        target: the class to explain: an index, a label (``"tabby"`` finds ``"tabby cat"``, see
            :func:`resolve_target`), or None for the most probable class.
        labels: one label per class (a sequence, or a text file with one per line); default the weights' own
            (``model.categories``), else ``"class <index>"``.
        size: input size; default the model's.

    Returns:
        A :class:`CamResult`: the raw map at the layer's resolution, the upsampled one, the target with its
        probability, the top-5 classes, and every channel's contribution.

    Raises:
        CamError: an unknown method, target or labels; a layer that is not spatial or that the score does not reach;
            a model whose output is not logits; a batch of several images.
        LayerError: a layer name the model does not have.
    """
    key = _method(method)
    module, info = unwrap_model(model)
    names = _labels_for(labels, info)
    x, picture = prepare_input(model, image, size=size)
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[0] != 1:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise CamError(f"cam() explains one image, got an input of shape {shape}; pass one picture or x[i : i + 1]")
    if not x.is_floating_point():
        raise CamError(f"the input must be a floating-point tensor, got {x.dtype}; preprocess the picture first")
    x = x.detach().requires_grad_(True)  # gradients reach the layer even when the parameters before it are frozen
    input_size = (int(x.shape[-2]), int(x.shape[-1]))
    layout = token_layout(module)
    memo = None
    if layer is not None:
        candidates = [_layer_key(module, layer)]
    else:
        memo = _memo_key(module, x)
        known = _DEFAULT_LAYERS.get(module, {}).get(memo)
        candidates = [known] if known is not None else _spatial_candidates(model, module, x, layout)
    g = capture_for_grad(model, x, layers=[layer_selector(c) for c in candidates], stop_early=False)
    logits = _logits(g.output)
    index = resolve_target(target, logits[0], names)
    outputs = []
    for c in candidates:
        out = g.outputs.get(c)
        view = _as_maps(out, input_size, layout) if isinstance(out, torch.Tensor) else None
        if view is not None and out.requires_grad:
            outputs.append((c, out, view))
        elif layer is not None:
            _not_usable(c, out, view)
    if not outputs:
        raise CamError(
            "no spatial output near the end of this model is connected to the class scores by gradients; pass "
            "layer= (see `featuremaps layers MODEL`)"
        )
    grads = torch.autograd.grad(logits[0, index], [out for _, out, _ in outputs], allow_unused=True)
    name, view_a, view_g = _choose(outputs, grads, input_size, layout, index, explicit=layer is not None)
    if memo is not None:
        _remember(module, memo, name)
    parts = cam_map(view_a.maps, view_g.maps, key)
    return cam_result(
        parts, logits.detach(), target=index, size=input_size, labels=names, layer=name, picture=picture,
        kind=view_a.kind,
    )  # fmt: skip


def default_layer(model: Model | nn.Module, image: Any = None, *, size: int | tuple[int, int] | None = None) -> str:
    """The layer :func:`cam` explains when none is given: the last spatial layer that the class score reaches.

    The rule, the same for CNNs and transformers: among the outputs of one forward pass, in the order the calls
    finish, those that read as maps of the picture (``(N, C, H, W)`` whose two strides agree, patch tokens, or
    channels-last maps; adaptive pools, whose grid is their own, are left out); of those with the width (channels)
    of the last one, the last whose gradient of the class score is not zero everywhere. For a CNN that is the
    output of its last stage (``layer4`` of a ResNet, ``features`` of a VGG); for a ViT, whose head reads the
    class token only, the patch tokens after the last block are out of the score's reach, and the rule finds the
    input of the last block's attention (``blocks.11.norm1`` in timm, ``encoder.layers.encoder_layer_11.ln_1``
    in torchvision), the layer pytorch-grad-cam's documentation recommends. Remembered per model and input shape.

    Args:
        model: the classifier.
        image: an example input (its shape matters, not its content); default a zero image of the model's size.
        size: input size; default the model's.
    """
    module, info = unwrap_model(model)
    if image is None:
        pre = info.preprocessing if info is not None else Preprocessing.for_channels(input_channels(module))
        image = torch.zeros(1, pre.channels, *pre.with_size(size).size, device=module_device(module))
    return cam(model, image, layer=None, size=size).layer


def _labels_for(labels: Any, info: Model | None) -> tuple[str, ...] | None:
    if labels is None:
        return info.categories if info is not None else None
    if isinstance(labels, (str, os.PathLike)):
        return read_labels(labels)
    if isinstance(labels, (bytes, Mapping)) or not isinstance(labels, Iterable):
        raise CamError(f"labels are a sequence of class names or a labels file, not a {type(labels).__name__}")
    names = tuple(str(lab) for lab in labels)
    if not names:
        raise CamError("labels is empty; give one class name per class, in class-index order")
    return names


def _layer_key(module: nn.Module, layer: Any) -> str:
    """``layer`` (a path, ``path#k`` or a module of ``module``) as a capture key: ``path`` or ``path#k`` (k >= 2)."""
    if isinstance(layer, nn.Module):
        for path, m in module.named_modules():
            if m is layer:
                if not path:
                    break
                return path
        what = "the model itself" if layer is module else f"that {type(layer).__name__}"
        raise CamError(f"{what} is not a layer of this model; pass one of its modules or its name, e.g. 'layer4'")
    if not isinstance(layer, str) or not layer.strip():
        raise CamError(f"a layer is a module path such as 'layer4' (or the module itself), not {layer!r}")
    text = layer.strip()
    base, hash_, k = text.rpartition("#")
    path, call = (base, int(k)) if hash_ and k.isdigit() and int(k) >= 1 else (text, 1)
    paths = [p for p, _ in module.named_modules() if p]
    if path not in set(paths):
        close = difflib.get_close_matches(path, paths, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise LayerError(f"no layer named {path!r}; {hint}use `featuremaps layers MODEL` to see the names")
    return path if call == 1 else f"{path}#{call}"


def check_layer(model: Model | nn.Module, layer: str | nn.Module) -> str:
    """``layer`` as :func:`cam` reads it (a capture key: ``path`` or ``path#k``), checked against the model's module
    tree alone; ``model`` may be a skeleton on the meta device (:func:`featuremaps.models.skeleton`), so that a typo
    answers before any weights load.

    Raises:
        LayerError: no module of that name (the message lists the closest).
        CamError: a module that is not part of the model, or not a name.
    """
    return _layer_key(unwrap_model(model)[0], layer)


def _memo_key(module: nn.Module, x: torch.Tensor) -> tuple:
    return (tuple(map(id, module.modules())), tuple(x.shape), x.dtype, x.device.type)


def _remember(module: nn.Module, memo: tuple, name: str) -> None:
    with _DEFAULTS_LOCK:
        known = _DEFAULT_LAYERS.get(module)
        if known is None:
            known = _DEFAULT_LAYERS[module] = {}
        if len(known) >= 16:  # many input shapes: forget the old ones
            known.clear()
        known[memo] = name


def _as_maps(t: torch.Tensor, input_size: tuple[int, int], layout: TokenLayout) -> SpatialView | None:
    """``t`` read as maps of the picture ``(N, C, H, W)`` with more than one position, or None."""
    view = to_spatial(t, input_size=input_size, layout=layout)
    if view is None or view.maps.ndim != 4:
        return None
    h, w = int(view.maps.shape[-2]), int(view.maps.shape[-1])
    if h * w < 2:
        return None
    if view.kind == "spatial":
        if h > input_size[0] or w > input_size[1]:
            return None
        sh, sw = input_size[0] / h, input_size[1] / w
        if max(sh, sw) / min(sh, sw) > STRIDE_AGREEMENT:
            return None
    return view


def _spatial_candidates(model: Model | nn.Module, module: nn.Module, x: torch.Tensor, layout: TokenLayout) -> list[str]:
    """The outputs of the last spatial layer's width, last :data:`PROBED_LAYERS` in execution order (see
    :func:`default_layer`), from one pass without gradients that keeps only each output's shape and 3 numbers per
    channel."""
    from .capture import capture

    input_size = (int(x.shape[-2]), int(x.shape[-1]))
    modules = dict(module.named_modules())
    survey = capture(model, x.detach(), layers=[f"name:{p}" for p in modules if p], reduce="channel-stats")
    found: list[tuple[str, int]] = []
    for e in survey.entries:
        if isinstance(modules.get(e.module), _ADAPTIVE_POOLS):
            continue
        view = _as_maps(torch.empty(e.shape, device="meta"), input_size, layout)
        if view is not None:
            found.append((e.name, int(view.maps.shape[1])))
    if not found:
        raise CamError(
            "no layer of this model outputs maps of the picture ((N, C, H, W), patch tokens or channels-last maps), "
            "so a CAM has nothing to show"
        )
    width = found[-1][1]
    return [name for name, channels in found if channels == width][-PROBED_LAYERS:]


def _not_usable(name: str, out: Any, view: SpatialView | None) -> None:
    if not isinstance(out, torch.Tensor):
        raise CamError(f"{name} returned no tensor in this pass; pick a layer from `featuremaps layers MODEL`")
    if view is None:
        raise CamError(
            f"{name} outputs {'x'.join(map(str, out.shape))}, not maps of the picture: a CAM needs (N, C, H, W) maps "
            "with more than one position, patch tokens or channels-last maps; leave the layer out for the last "
            "spatial one"
        )
    raise CamError(f"the output of {name} is not connected to the class scores by gradients; pick another layer")


def _choose(
    outputs: list[tuple[str, torch.Tensor, SpatialView]],
    grads: Sequence[torch.Tensor | None],
    input_size: tuple[int, int],
    layout: TokenLayout,
    index: int,
    *,
    explicit: bool,
) -> tuple[str, SpatialView, SpatialView]:
    """The layer to explain and its activations and gradients as maps: the one given, or the last whose gradient
    is not zero everywhere."""
    for (name, _, view_a), grad in zip(reversed(outputs), reversed(grads)):
        view_g = _as_maps(grad, input_size, layout) if grad is not None else None
        if view_g is not None and bool(view_g.maps.ne(0).any()):
            return name, view_a, view_g
        if explicit:
            raise CamError(
                f"the score of class {index} does not change with any position of {name} (its gradient is zero "
                "there), so every CAM of it is empty; a ViT's head reads only the class token after the last "
                "attention: pick an earlier layer, or leave it out for the last one the score reaches"
            )
    raise CamError(
        f"the score of class {index} does not change with any of the last {len(outputs)} spatial outputs "
        f"({outputs[-1][0]} and before; a head of zeros, as in a torchvision ViT's random init, makes every score "
        "constant); load trained weights or pass layer="
    )


def _logits(output: Any) -> torch.Tensor:
    """The class scores ``(1, K)`` of a model's output (a tensor, a dict with ``"logits"``, or ``.logits``)."""
    out = output
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        out = out["logits"]
    elif not isinstance(out, torch.Tensor) and isinstance(getattr(out, "logits", None), torch.Tensor):
        out = out.logits
    if isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[0] == 1 and out.is_floating_point():
        if not bool(torch.isfinite(out).all()):
            raise CamError("the model's logits are not finite (NaN or inf); check the model's weights and its input")
        return out
    what = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(output).__name__}"
    raise CamError(
        f"the model returns {what}, not class scores (1, classes): a CAM explains a classifier's logits; give a "
        "classifier, or wrap the model so that forward() returns its logits"
    )


# -- class evidence in a run folder and its report ------------------------------------------------------------------
#: Channels drawn and listed in a report's breakdown.
BREAKDOWN_CHANNELS = 8
#: The file of a run folder that holds the raw CAM (``(h, w)`` float32 at the layer's resolution).
CAM_FILE = "cam.npy"


def cam_pictures(result: CamResult, maps: Any = None, *, channels: int = BREAKDOWN_CHANNELS) -> list[Picture]:
    """The pictures of a CAM in a run folder: ``cam.png`` (the overlay with its legend) and, when ``maps`` holds the
    layer's channel maps, ``cam_channels.png`` (the ``channels`` that add most to the map, strongest first)."""
    from . import render

    pics = []
    if result.image is not None:
        pics.append(Picture("cam.png", result.overlay(), kind="cam", layer=result.layer, caption=result.title))
    entry = maps.get(result.layer) if maps is not None else None
    ids = [c for c, v in result.top_channels(channels) if v > 0]
    if entry is not None and entry.is_spatial and entry.has_channels and ids:
        have = set(entry.channel_ids())
        ids = [c for c in ids if c in have]
        if ids:
            im = render.channel_grid(entry, channels=ids, per_page=None, palette=True)
            pics.append(
                Picture(
                    "cam_channels.png",
                    im,
                    kind="cam-channels",
                    layer=result.layer,
                    caption=f"the {len(ids)} channels of {result.layer} that add most to the "
                    f"{METHOD_NAMES[result.method]} map, strongest first (each in its own range)",
                    channels=tuple(im.info["channels"]),
                )
            )
    return pics


def cam_files(result: CamResult) -> dict[str, bytes]:
    """Files of a CAM in a run folder: :data:`CAM_FILE`, the raw map (numpy, never pickled)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(result.map), allow_pickle=False)
    return {CAM_FILE: buf.getvalue()}


def cam_manifest(result: CamResult) -> dict[str, Any]:
    """The ``"cam"`` key of a run folder's manifest: :meth:`CamResult.to_dict` and where its files are."""
    return {**result.to_dict(), "map_file": CAM_FILE, "picture": "cam.png" if result.image is not None else None}


class _Table:
    """A small HTML table for a report section (``build_report`` draws any object with ``_repr_html_``)."""

    def __init__(self, head: Sequence[str], rows: Sequence[Sequence[tuple[str, str | None]]], marked: int = -1):
        self.head, self.rows, self.marked = head, rows, marked

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.head)
        body = []
        for i, row in enumerate(self.rows):
            cells = "".join(
                f"<td><a href='{html.escape(href)}'>{html.escape(text)}</a></td>"
                if href
                else f"<td>{html.escape(text)}</td>"
                for text, href in row
            )
            style = " style='font-weight:600'" if i == self.marked else ""
            body.append(f"<tr{style}>{cells}</tr>")
        return f"<table class='featuremaps-stats'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _grid_links(result: CamResult, pictures: Sequence[Picture]) -> dict[int, tuple[str, str]]:
    """Channel -> the path of the grid picture of the CAM's layer that shows it, and where its tile is in that
    picture (``row 2, column 5``, counted from 1, from the grid's layout in ``image.info["grid"]``)."""
    links: dict[int, tuple[str, str]] = {}
    for p in pictures:
        if p.kind == "grid" and p.layer == result.layer and p.channels:
            geom = p.image.info.get("grid") if p.image is not None else None
            cols = getattr(geom, "cols", 0)
            for i, c in enumerate(p.channels):
                if isinstance(c, int) and c not in links:
                    where = f"row {i // cols + 1}, column {i % cols + 1}" if cols else f"tile {i + 1}"
                    links[c] = (p.path, f"{p.path}: {where}")
    return links


def cam_section(result: CamResult, pictures: Sequence[Picture] = (), *, channels: int = BREAKDOWN_CHANNELS) -> Section:
    """The report's "class evidence" section: the CAM pictures among ``pictures``, the top classes, and the channels
    that add most to the map, each linking to the grid picture that shows it."""
    name = METHOD_NAMES[result.method]
    total = sum(v for _, v in result.contributions)
    positive = sum(v for _, v in result.contributions if v > 0)
    against = [v for _, v in result.contributions if v < 0]
    text = (
        f"{result.title}. The map is a weighted sum of the layer's channels, the weights from the gradient of the "
        f"class's score, cut at zero; each channel's contribution is its term of the map's sum before the cut, so "
        f"all {len(result.contributions)} add up to {total:.4g}"
        + (f" ({len(against)} channels speak against the class, together {sum(against):.4g})" if against else "")
        + ". The channels link to their maps in the layer's grid."
    )
    classes = _Table(
        ("", "class", "index", "probability"),
        [
            [(str(i + 1), None), (s.label, None), (str(s.index), None), (f"{s.probability:.4f}", None)]
            for i, s in enumerate(result.classes)
        ],
        marked=next((i for i, s in enumerate(result.classes) if s.index == result.target), -1),
    )
    links = _grid_links(result, pictures)
    rows = []
    for c, v in result.top_channels(channels):
        weight = "per position" if result.weights is None else f"{float(result.weights[c]):.4g}"
        share = f"{v / positive:.1%}" if positive > 0 and v > 0 else "–"
        href, where = links.get(c, (None, "not in the grids drawn"))
        rows.append([(f"channel {c}", href), (f"{v:.4g}", None), (share, None), (weight, None), (where, href)])
    breakdown = _Table(("channel", "contribution", "share of the positive sum", "weight", "its tile"), rows)
    shown = [p for p in pictures if p.kind in ("cam", "cam-channels")]
    return Section(
        f"Class evidence: {name} at {result.layer}",
        text=text,
        pictures=shown,
        tables=[("most probable classes", classes), (f"the {len(rows)} channels that add most to the map", breakdown)],
    )
