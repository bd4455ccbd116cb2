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

from typing import TYPE_CHECKING

from .lazy import make_lazy
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


make_lazy(__name__, _EXPORTS, submodules=True)

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
