"""featuremaps: see what a convolutional network sees.

>>> import featuremaps as fm
>>> model = fm.load_model("vgg16", weights="DEFAULT")
>>> maps = fm.capture(model, "castle.jpg", layers="conv")
>>> maps["features.28"].shape, maps.stats()

The public names below are loaded on first use, so that ``import featuremaps`` (and the
command line's ``--help``) does not import torch until something needs it. A public name wins
over a submodule of the same name: ``fm.capture`` is the function, its module is
``featuremaps.capture`` in ``sys.modules`` (``from featuremaps.capture import list_layers``).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from .memory import ask_for_huge_pages as _ask_for_huge_pages
from .version import __version__

_ask_for_huge_pages()  # before torch is imported, or it has no effect (see featuremaps.memory)

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["MODES"], "options"),
    **dict.fromkeys(
        ["GradCapture", "LayerInfo", "capture", "capture_for_grad", "list_layers", "prepare_input"], "capture"
    ),
    **dict.fromkeys(["KINDS", "kind_of", "select_layers"], "layers"),
    **dict.fromkeys(["CHAINS", "find_conv_stack"], "chains"),
    **dict.fromkeys(
        [
            "FeatureMapsError",
            "GradCapture",
            "ImageError",
            "LayerError",
            "ModelError",
            "OptionError",
            "RenderError",
            "RunError",
            "WeightsUnavailableError",
        ],
        "errors",
    ),
    **dict.fromkeys(["edge_image", "list_samples", "load_image"], "images"),
    **dict.fromkeys(["FeatureMap", "FeatureMaps"], "maps"),
    **dict.fromkeys(["LayerStats", "StatsTable"], "stats"),
    **dict.fromkeys(["Model", "is_cached", "list_models", "load_model"], "models"),
    **dict.fromkeys(["Preprocessing"], "preprocess"),
    **dict.fromkeys(["read_state_dict"], "checkpoints"),
    **dict.fromkeys(["REDUCTIONS", "Reduction", "parse_reduction"], "reduce"),
    **dict.fromkeys(["load_run", "save_run"], "runs"),
    **dict.fromkeys(["Portraits", "portrait"], "portrait"),
    **dict.fromkeys(["CamResult", "cam"], "cam"),
    **dict.fromkeys(["Atlas", "AtlasError", "atlas", "open_atlas"], "atlas"),
}

__all__ = [
    "CHAINS",
    "KINDS",
    "MODES",
    "REDUCTIONS",
    "Atlas",
    "AtlasError",
    "CamResult",
    "FeatureMap",
    "FeatureMaps",
    "FeatureMapsError",
    "GradCapture",
    "ImageError",
    "LayerError",
    "LayerInfo",
    "LayerStats",
    "Model",
    "ModelError",
    "OptionError",
    "Portraits",
    "Preprocessing",
    "Reduction",
    "RenderError",
    "RunError",
    "StatsTable",
    "WeightsUnavailableError",
    "__version__",
    "atlas",
    "cam",
    "capture",
    "capture_for_grad",
    "edge_image",
    "find_conv_stack",
    "is_cached",
    "kind_of",
    "list_layers",
    "list_models",
    "list_samples",
    "load_image",
    "load_model",
    "load_run",
    "open_atlas",
    "parse_reduction",
    "portrait",
    "prepare_input",
    "read_state_dict",
    "save_run",
    "select_layers",
]


class _Package(types.ModuleType):
    """This package's module type: public names load on first use, and a submodule that is named
    like a public function (``featuremaps.capture``) never replaces the function."""

    def __getattr__(self, name: str) -> Any:
        where = _EXPORTS.get(name)
        if where is None:  # a submodule not imported yet (featuremaps.render, featuremaps.models...)
            try:
                return importlib.import_module(f".{name}", __name__)
            except ModuleNotFoundError as exc:
                if exc.name != f"{__name__}.{name}":
                    raise
                raise AttributeError(f"module 'featuremaps' has no attribute {name!r}") from None
        value = getattr(importlib.import_module(f".{where}", __name__), name)
        types.ModuleType.__setattr__(self, name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return  # the import system announcing a submodule: the public name keeps its meaning
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted({*globals(), *_EXPORTS})


sys.modules[__name__].__class__ = _Package

if TYPE_CHECKING:  # pragma: no cover
    from .atlas import Atlas, AtlasError, atlas, open_atlas
    from .cam import CamResult, cam
    from .capture import GradCapture, LayerInfo, capture, capture_for_grad, list_layers, prepare_input
    from .chains import CHAINS, find_conv_stack
    from .checkpoints import read_state_dict
    from .errors import (
        FeatureMapsError,
        ImageError,
        LayerError,
        ModelError,
        OptionError,
        RenderError,
        RunError,
        WeightsUnavailableError,
    )
    from .images import edge_image, list_samples, load_image
    from .layers import KINDS, kind_of, select_layers
    from .maps import FeatureMap, FeatureMaps
    from .models import Model, is_cached, list_models, load_model
    from .options import MODES
    from .portrait import Portraits, portrait
    from .preprocess import Preprocessing
    from .reduce import REDUCTIONS, Reduction, parse_reduction
    from .runs import load_run, save_run
    from .stats import LayerStats, StatsTable
