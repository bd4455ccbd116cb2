"""featuremaps: see what a convolutional network sees.

>>> import featuremaps as fm
>>> model = fm.load_model("vgg16", weights="DEFAULT")
>>> maps = fm.capture(model, "castle.jpg", layers="conv")
>>> maps["features.28"].shape, maps.stats()
"""

from __future__ import annotations

__version__ = "0.1.0"

from .memory import ask_for_huge_pages as _ask_for_huge_pages

_ask_for_huge_pages()  # before torch is imported, or it has no effect (see featuremaps.memory)

from .capture import MODES, LayerInfo, capture, kind_of, list_layers, select_layers
from .chains import CHAINS, find_conv_stack
from .errors import (
    FeatureMapsError,
    ImageError,
    LayerError,
    ModelError,
    RunError,
    WeightsUnavailableError,
)
from .images import edge_image, list_samples, load_image
from .maps import KINDS, FeatureMap, FeatureMaps, LayerStats, StatsTable
from .models import (
    Model,
    Preprocessing,
    is_cached,
    list_models,
    load_model,
    read_state_dict,
)
from .reduce import REDUCTIONS, Reduction, parse_reduction

__all__ = [
    "CHAINS", "KINDS", "MODES", "REDUCTIONS", "FeatureMap", "FeatureMaps", "FeatureMapsError", "ImageError",
    "LayerError", "LayerInfo", "LayerStats", "Model", "ModelError", "Preprocessing", "Reduction", "RunError",
    "StatsTable", "WeightsUnavailableError", "__version__", "capture", "edge_image", "find_conv_stack",
    "is_cached", "kind_of", "list_layers", "list_models", "list_samples", "load_image", "load_model",
    "parse_reduction", "read_state_dict", "select_layers",
]  # fmt: skip
