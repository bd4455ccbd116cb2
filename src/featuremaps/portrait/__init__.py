"""Channel portraits: synthesize the input image that excites a channel most (feature visualization).

- :mod:`~featuremaps.portrait.optimize` (the core): takes the network as a callable ``forward(x) ->
  activation`` and knows nothing of how the activation is captured; :mod:`.param` (the decorrelated
  Fourier image) and :mod:`.transforms` (transformation robustness) are its parts.
- :mod:`~featuremaps.portrait.portraits`: :func:`portrait`, one layer of a model through featuremaps'
  capture engine (``capture_for_grad``), with the model's own normalization; :class:`Portraits`.
- :mod:`~featuremaps.portrait.folder`: the output folder (PNGs, grid, manifest, index.html).
- :mod:`~featuremaps.portrait.cache`: one channel's portrait made once and kept in a cache folder, for
  the viewer and the atlas.
- :mod:`~featuremaps.portrait.settings`: budgets and option words, torch-free.

Names load on first use (``import featuremaps.portrait.settings`` does not import torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import make_lazy

#: public name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["PortraitError"], "errors"),
    **dict.fromkeys(
        [
            "DEFAULT_DIVERSITY_WEIGHT",
            "PortraitResult",
            "check_channels",
            "check_settings",
            "gram_similarity",
            "optimize",
            "portrait_grid",
            "to_pil",
        ],
        "optimize",
    ),
    **dict.fromkeys(["FourierImage", "color_correlation_sqrt", "frequency_scale"], "param"),
    **dict.fromkeys(
        ["STANDARD_TRANSFORMS", "Jitter", "Pad", "RandomRotate", "RandomScale", "Transform", "apply_transforms"],
        "transforms",
    ),
    **dict.fromkeys(["Portraits", "capture_forward", "check_portrait", "portrait", "top_channels"], "portraits"),
    **dict.fromkeys(["load_portraits", "save_portraits"], "folder"),
    **dict.fromkeys(["cache_path", "portrait_image", "portrait_images"], "cache"),
    **dict.fromkeys(["BUDGETS", "BUDGET_NAMES", "OBJECTIVES", "budget_settings"], "settings"),
}

__all__ = [
    "BUDGETS",
    "BUDGET_NAMES",
    "DEFAULT_DIVERSITY_WEIGHT",
    "OBJECTIVES",
    "STANDARD_TRANSFORMS",
    "FourierImage",
    "Jitter",
    "Pad",
    "PortraitError",
    "PortraitResult",
    "Portraits",
    "RandomRotate",
    "RandomScale",
    "Transform",
    "apply_transforms",
    "budget_settings",
    "cache_path",
    "capture_forward",
    "check_channels",
    "check_portrait",
    "check_settings",
    "color_correlation_sqrt",
    "frequency_scale",
    "gram_similarity",
    "load_portraits",
    "optimize",
    "portrait",
    "portrait_grid",
    "portrait_image",
    "portrait_images",
    "save_portraits",
    "to_pil",
    "top_channels",
]


make_lazy(__name__, _EXPORTS)


if TYPE_CHECKING:  # pragma: no cover
    from .cache import cache_path, portrait_image, portrait_images
    from .errors import PortraitError
    from .folder import load_portraits, save_portraits
    from .optimize import (
        DEFAULT_DIVERSITY_WEIGHT,
        PortraitResult,
        check_channels,
        check_settings,
        gram_similarity,
        optimize,
        portrait_grid,
        to_pil,
    )
    from .param import FourierImage, color_correlation_sqrt, frequency_scale
    from .portraits import Portraits, capture_forward, check_portrait, portrait, top_channels
    from .settings import BUDGET_NAMES, BUDGETS, OBJECTIVES, budget_settings
    from .transforms import (
        STANDARD_TRANSFORMS,
        Jitter,
        Pad,
        RandomRotate,
        RandomScale,
        Transform,
        apply_transforms,
    )
