"""Transformation robustness for channel portraits: random pad, jitter, scale and rotation, per image.

Each transform is a frozen dataclass called as ``transform(images, generators)``: ``images`` is a batch
``(B, 3, H, W)`` and ``generators`` holds one ``torch.Generator`` (on the CPU) per image. Every random draw
for image i comes from ``generators[i]`` alone, so image i is transformed the same way whether it is
optimized alone or in a batch with others. Only torch ops are used (``F.pad``, indexing,
``F.affine_grid`` + ``F.grid_sample``), so gradients flow back to the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from featuremaps.portrait.errors import PortraitError


class Transform(Protocol):
    """What :func:`featuremaps.portrait.optimize.optimize` accepts as one transform."""

    def __call__(self, images: Tensor, generators: Sequence[torch.Generator]) -> Tensor: ...


def _check(images: Tensor, generators: Sequence[torch.Generator], name: str) -> None:
    if images.dim() != 4:
        raise PortraitError(f"{name} takes a batch (B, C, H, W), got shape {tuple(images.shape)}")
    if len(generators) != images.shape[0]:
        raise PortraitError(f"{name} needs one generator per image: got {len(generators)} for {images.shape[0]}")


def _choose(options: Sequence[float], generators: Sequence[torch.Generator]) -> list[float]:
    """One entry of ``options`` per image, each drawn uniformly from that image's generator."""
    return [options[int(torch.randint(len(options), (1,), generator=g))] for g in generators]


@dataclass(frozen=True)
class Pad:
    """Pads every side by ``width`` pixels (no randomness), so jitter and rotation do not reveal the edges.

    ``mode="constant"`` fills with ``value`` (0.5: grey, on images in [0, 1]); ``"reflect"`` and
    ``"replicate"`` mirror or repeat the border.
    """

    width: int
    mode: Literal["constant", "reflect", "replicate"] = "constant"
    value: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 0:
            raise PortraitError(f"Pad width must be an integer >= 0, got {self.width!r}")
        if self.mode not in ("constant", "reflect", "replicate"):
            raise PortraitError(f"Pad mode must be 'constant', 'reflect' or 'replicate', got {self.mode!r}")

    def __call__(self, images: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
        _check(images, generators, "Pad")
        if self.width == 0:
            return images
        pad = (self.width,) * 4
        if self.mode == "constant":
            return F.pad(images, pad, mode="constant", value=self.value)
        if self.mode == "reflect" and self.width >= min(images.shape[-2:]):
            raise PortraitError(f"reflect padding of {self.width} px needs images larger than that: pad less")
        return F.pad(images, pad, mode=self.mode)


@dataclass(frozen=True)
class Jitter:
    """Shifts each image by a random whole number of pixels: a crop of ``(H - shift, W - shift)`` at offsets
    drawn uniformly from ``0..shift`` in each direction, per image. The output is ``shift`` pixels smaller."""

    shift: int

    def __post_init__(self) -> None:
        if isinstance(self.shift, bool) or not isinstance(self.shift, int) or self.shift < 0:
            raise PortraitError(f"Jitter shift must be an integer >= 0, got {self.shift!r}")

    def __call__(self, images: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
        _check(images, generators, "Jitter")
        if self.shift == 0:
            return images
        height, width = images.shape[-2:]
        if self.shift >= min(height, width):
            raise PortraitError(f"Jitter of {self.shift} px leaves nothing of a {height}x{width} image: jitter less")
        offsets = torch.stack([torch.randint(self.shift + 1, (2,), generator=g) for g in generators]).to(images.device)
        h, w = height - self.shift, width - self.shift
        rows = offsets[:, 0:1] + torch.arange(h, device=images.device)  # (B, h)
        cols = offsets[:, 1:2] + torch.arange(w, device=images.device)  # (B, w)
        # one gather over the flattened pixels: each output pixel reads exactly one input pixel
        index = (rows[:, :, None] * width + cols[:, None, :]).reshape(len(offsets), 1, h * w)
        batch, chans = images.shape[:2]
        out = images.flatten(2).gather(2, index.expand(batch, chans, h * w))
        return out.reshape(batch, chans, h, w)


def _resample(images: Tensor, linear: Tensor) -> Tensor:
    """Bilinear resampling about the centre with one 2x2 map per image (output -> input, normalized coords)."""
    theta = torch.cat([linear, torch.zeros(len(linear), 2, 1, dtype=linear.dtype)], dim=2)
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass(frozen=True)
class RandomScale:
    """Zooms each image about its centre by a factor drawn from ``factors`` (>1 enlarges), keeping its size;
    where a zoom-out uncovers the border, the border pixels are repeated."""

    factors: tuple[float, ...]

    def __post_init__(self) -> None:
        factors = tuple(self.factors)
        if not factors or any(not (isinstance(f, (int, float)) and math.isfinite(f) and f > 0) for f in factors):
            raise PortraitError(f"RandomScale factors must be a non-empty list of numbers > 0, got {self.factors!r}")
        object.__setattr__(self, "factors", tuple(float(f) for f in factors))

    def draw_linear(self, height: int, width: int, generators: Sequence[torch.Generator]) -> Tensor:
        """``(B, 2, 2)`` float64: each image's map from output to input normalized coordinates."""
        scales = torch.tensor(_choose(self.factors, generators), dtype=torch.float64)
        return torch.diag_embed(torch.stack([1.0 / scales, 1.0 / scales], dim=1))

    def __call__(self, images: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
        _check(images, generators, "RandomScale")
        return _resample(images, self.draw_linear(*images.shape[-2:], generators))


@dataclass(frozen=True)
class RandomRotate:
    """Rotates each image about its centre by an angle in degrees drawn from ``degrees``, keeping its size
    (in pixel space, so non-square images are not sheared). Positive angles turn the picture counter-clockwise
    as shown on screen."""

    degrees: tuple[float, ...]

    def __post_init__(self) -> None:
        degrees = tuple(self.degrees)
        if not degrees or any(not (isinstance(d, (int, float)) and math.isfinite(d)) for d in degrees):
            raise PortraitError(f"RandomRotate degrees must be a non-empty list of numbers, got {self.degrees!r}")
        object.__setattr__(self, "degrees", tuple(float(d) for d in degrees))

    def draw_linear(self, height: int, width: int, generators: Sequence[torch.Generator]) -> Tensor:
        """``(B, 2, 2)`` float64: each image's map from output to input normalized coordinates."""
        angles = torch.tensor(_choose(self.degrees, generators), dtype=torch.float64) * (math.pi / 180.0)
        cos, sin = torch.cos(angles), torch.sin(angles)
        # normalized coordinates run over width and height separately: correct for the aspect ratio
        row_x = torch.stack([cos, -sin * height / width], dim=1)
        row_y = torch.stack([sin * width / height, cos], dim=1)
        return torch.stack([row_x, row_y], dim=1)

    def __call__(self, images: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
        _check(images, generators, "RandomRotate")
        return _resample(images, self.draw_linear(*images.shape[-2:], generators))


#: Lucid's default robustness: pad 12 px grey, jitter 8, scale 0.9..1.1, rotate -10..10 degrees (0 more
#: likely), jitter 4. A 128 px image reaches the network at 140 px.
STANDARD_TRANSFORMS: tuple[Transform, ...] = (
    Pad(12, mode="constant", value=0.5),
    Jitter(8),
    RandomScale(tuple(1 + (i - 5) / 50 for i in range(11))),
    RandomRotate(tuple(range(-10, 11)) + (0,) * 5),
    Jitter(4),
)


def apply_transforms(images: Tensor, transforms: Sequence[Transform], generators: Sequence[torch.Generator]) -> Tensor:
    """Applies ``transforms`` in order to the batch, image i drawing only from ``generators[i]``.

    Consecutive scales and rotations (transforms with a ``draw_linear`` method) are composed into one map
    and resampled once: the same geometry, one bilinear interpolation instead of several.
    """
    _check(images, generators, "apply_transforms")
    linear: Tensor | None = None
    for transform in transforms:
        draw = getattr(transform, "draw_linear", None)
        if draw is not None:
            step = draw(*images.shape[-2:], generators)
            # output -> input maps compose right to left: the later transform's map is applied first
            linear = step if linear is None else linear @ step
            continue
        if linear is not None:
            images, linear = _resample(images, linear), None
        images = transform(images, generators)
    return images if linear is None else _resample(images, linear)
