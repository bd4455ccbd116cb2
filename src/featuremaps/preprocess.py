"""How a picture becomes a model's input: the whole picture resized (no crop, like the seed), then
normalized with the weights' own mean and std (from torchvision's weights metadata)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from .errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How a picture becomes the model's input.

    Like the seed, the whole picture is resized to ``size`` (no crop), then normalized with the
    weights' own mean and std. ``channels`` is what the model's first layer takes: 3 (RGB), 1
    (the picture in grayscale, normalized with ImageNet's mean statistics) or 4 (RGB and an opaque
    alpha plane of 1.0, as pictures come in with their transparency composited onto white).
    ``min_size`` applies to the model's input (``size``), not to the picture, which is resized.
    """

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    min_size: tuple[int, int] = (1, 1)
    interpolation: str = "bilinear"
    channels: int = 3

    @classmethod
    def for_channels(cls, channels: int) -> "Preprocessing":
        """ImageNet preprocessing for a model whose first layer takes ``channels`` channels."""
        if channels == 1:
            return cls(mean=(sum(IMAGENET_MEAN) / 3,), std=(sum(IMAGENET_STD) / 3,), channels=1)
        if channels == 4:  # RGB and an opaque alpha plane (1.0), left as it is
            return cls(mean=(*IMAGENET_MEAN, 0.0), std=(*IMAGENET_STD, 1.0), channels=4)
        return cls(channels=int(channels))

    def with_size(self, size: int | tuple[int, int] | None) -> "Preprocessing":
        """The same preprocessing at another input size (``None`` keeps this one)."""
        if size is None:
            return self
        hw = _as_hw(size)
        if hw[0] < self.min_size[0] or hw[1] < self.min_size[1]:
            raise ModelError(
                f"input size {hw[0]}x{hw[1]} is smaller than this model's minimum "
                f"{self.min_size[0]}x{self.min_size[1]}; choose a larger --size"
            )
        return replace(self, size=hw)

    def resize(self, image: "Image.Image") -> "Image.Image":
        """The picture as the model sees it: RGB, resized to :attr:`size` (height, width)."""
        from PIL import Image

        h, w = self.size
        if image.size == (w, h):
            return image
        method = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}.get(
            self.interpolation, Image.Resampling.BILINEAR
        )
        return image.resize((w, h), method, reducing_gap=None)

    def to_tensor(self, resized: "Image.Image") -> torch.Tensor:
        """A resized picture -> normalized ``(1, channels, H, W)`` float tensor."""
        import numpy as np

        if self.channels not in (1, 3, 4):
            raise ModelError(
                f"this model's first layer takes {self.channels} input channels, but a picture gives 3 (RGB), 1 "
                f"(grayscale) or 4 (RGB and alpha); pass a preprocessed (N, {self.channels}, H, W) tensor instead"
            )
        if self.channels == 1:
            arr = torch.from_numpy(np.asarray(resized.convert("L"), dtype=np.uint8).copy())[:, :, None]
        elif self.channels == 4:
            arr = torch.from_numpy(np.asarray(resized.convert("RGBA"), dtype=np.uint8).copy())
        else:
            arr = torch.from_numpy(np.asarray(resized.convert("RGB"), dtype=np.uint8).copy())
        x = arr.permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return ((x - mean) / std).unsqueeze(0)

    def __call__(self, image: "Image.Image") -> tuple[torch.Tensor, "Image.Image"]:
        """Resize and normalize; returns the input tensor and the resized picture."""
        resized = self.resize(image)
        return self.to_tensor(resized), resized


def _as_hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        hw = (size, size)
    elif isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        hw = (int(size[0]), int(size[1]))
    else:
        raise ModelError(f"size must be an int or (height, width), got {size!r}")
    if hw[0] < 1 or hw[1] < 1:
        raise ModelError(f"size must be positive, got {hw[0]}x{hw[1]}")
    return hw


def preprocessing_from_weights(weights: Any | None, size: int | tuple[int, int] | None) -> Preprocessing:
    """Mean, std, default size and minimum size from a torchvision weights enum (no download)."""
    pre = Preprocessing()
    if weights is not None:
        t = weights.transforms()
        crop = getattr(t, "crop_size", [224])
        interp = getattr(getattr(t, "interpolation", None), "value", "bilinear")
        min_size = weights.meta.get("min_size", (1, 1))
        pre = Preprocessing(
            size=_as_hw(int(crop[0])),
            mean=tuple(float(v) for v in getattr(t, "mean", IMAGENET_MEAN)),
            std=tuple(float(v) for v in getattr(t, "std", IMAGENET_STD)),
            min_size=(int(min_size[0]), int(min_size[1])),
            interpolation=str(interp),
        )
    return pre.with_size(size)
