"""Where a model comes from: torchvision's registry by name, a user's own ``module:attr``, or an
``nn.Module`` object; with pretrained, random (seeded) or checkpoint weights, and the input
preprocessing that belongs to those weights.

Nothing here keeps a model table of its own: names, builders, weights and their transforms all
come from torchvision's registry (``list_models``, ``get_model``, ``get_model_weights``).
"""

from __future__ import annotations

import contextlib
import difflib
import http.client
import importlib
import importlib.util
import io
import os
import socket
import sys
import urllib.error
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import timm_models
from .checkpoints import CHECKPOINT_SUFFIXES, first_line, load_checkpoint
from .errors import ModelError, WeightsUnavailableError
from .preprocess import Preprocessing, preprocessing_from_weights
from .timm_models import is_timm_name


# --------------------------------------------------------------------------------------------------
# The loaded model
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Model:
    """A model ready for capture, with where its weights came from and how to feed it.

    Attributes:
        module: the ``nn.Module`` (in eval mode when featuremaps built it).
        name: torchvision name, ``module:attr`` spec, or class name.
        weights: ``IMAGENET1K_V1``..., ``random(seed=0)``, ``checkpoint:<path>`` or ``as given``.
        pretrained: True only for real trained weights (registry or checkpoint).
        preprocessing: resize + normalization for this model's input.
        categories: class labels from the weights' metadata, when known.
    """

    module: nn.Module = field(repr=False)
    name: str
    weights: str
    pretrained: bool
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    categories: tuple[str, ...] | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return module_device(self.module)

    def with_size(self, size: int | tuple[int, int] | None) -> "Model":
        """The same model fed at another input size."""
        return replace(self, preprocessing=self.preprocessing.with_size(size))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def unwrap_model(model: "Model | nn.Module") -> tuple[nn.Module, "Model | None"]:
    """``(module, Model or None)`` for a featuremaps :class:`Model` or a plain ``nn.Module``."""
    if isinstance(model, Model):
        return model.module, model
    if isinstance(model, nn.Module):
        return model, None
    raise TypeError(f"featuremaps needs a featuremaps Model or a torch.nn.Module, not {type(model).__name__}")


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available) -> a torch device."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelError(f"unknown device {device!r}; use cpu, cuda or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("CUDA is not available on this machine; use --device cpu (or auto)")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ModelError(f"unsupported device {device!r}; use cpu, cuda or auto")
    return dev


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------
def list_models() -> list[str]:
    """Every image-classification model name in torchvision's registry."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _check_name(name: str) -> str:
    names = list_models()
    key = name.strip().lower().replace("-", "_")
    if key in names:
        return key
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ModelError(
        f"unknown model {name!r}; {hint}run `featuremaps models` to list torchvision's classifiers, "
        "or give your own as package.module:attr"
    )


def _weights_enum(name: str, weights: str) -> Any:
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    text = weights.split(".")[-1].upper() if "." in weights and not _looks_like_path(weights) else weights.upper()
    if text == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[text]
    except KeyError:
        options = ", ".join(["DEFAULT", *(w.name for w in enum)])
        raise ModelError(
            f"{name} has no weights {weights!r}; use one of {options}, 'random', or a checkpoint file"
        ) from None


def weights_file(weights_enum: Any) -> Path:
    """Where torchvision's cache keeps (or would keep) a weights enum's file."""
    hub = Path(torch.hub.get_dir())
    return hub / "checkpoints" / os.path.basename(weights_enum.url)


def is_cached(name: str, weights: str = "DEFAULT") -> bool:
    """True when the pretrained weights of ``name`` are already in torchvision's cache."""
    return weights_file(_weights_enum(_check_name(name), weights)).is_file()


_OFFLINE_ERRORS = (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError, http.client.HTTPException)


def _looks_like_path(text: str) -> bool:
    return text.lower().endswith(CHECKPOINT_SUFFIXES) or os.sep in text or text.startswith(".")


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------------
# User models
# --------------------------------------------------------------------------------------------------
def is_user_spec(spec: str) -> bool:
    """``package.module:attr`` or ``path/to/file.py:attr`` (not ``timm:NAME``, timm's registry)."""
    return isinstance(spec, str) and ":" in spec and not spec.startswith(("http:", "https:")) and not is_timm_name(spec)


def _import_attr(spec: str) -> Any:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ModelError(f"cannot read model spec {spec!r}; write package.module:attr or path/to/file.py:attr")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ModelError(f"model file {target!r} not found")
            mod_name = f"_featuremaps_user_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(mod_name, path)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module
            module_spec.loader.exec_module(module)
        else:
            added = os.getcwd() not in sys.path
            if added:
                sys.path.insert(0, os.getcwd())
            try:
                module = importlib.import_module(target)
            finally:
                if added:
                    sys.path.remove(os.getcwd())
    except ModelError:
        raise
    except ImportError as exc:
        raise ModelError(
            f"cannot import {target!r} for model {spec!r} ({first_line(exc)}); check the module path and PYTHONPATH"
        ) from None
    except Exception as exc:
        raise ModelError(
            f"importing {target!r} for model {spec!r} failed: {type(exc).__name__}: {first_line(exc)}"
        ) from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"{target!r} has no attribute {part!r} (from model spec {spec!r})")
        obj = getattr(obj, part)
    return obj


def _build_user_model(spec: str) -> nn.Module:
    obj = _import_attr(spec)
    if isinstance(obj, nn.Module):
        return obj
    if callable(obj):
        try:
            built = obj()
        except TypeError as exc:
            raise ModelError(
                f"{spec} must be callable without arguments ({first_line(exc)}); wrap it in a factory function"
            ) from None
        if isinstance(built, nn.Module):
            return built
        raise ModelError(f"{spec} returned a {type(built).__name__}, not a torch.nn.Module")
    raise ModelError(f"{spec} is a {type(obj).__name__}; it must be an nn.Module class, factory or instance")


# --------------------------------------------------------------------------------------------------
# The one entry point
# --------------------------------------------------------------------------------------------------
def load_model(
    model: str | nn.Module,
    weights: str | os.PathLike | None = "DEFAULT",
    *,
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    size: int | tuple[int, int] | None = None,
    progress: bool = True,
) -> Model:
    """Build a model and its preprocessing.

    Args:
        model: a torchvision classifier name (``"vgg16"``), a timm model ``"timm:convnext_tiny"``
            (timm's registry; ``pip install featuremaps[timm]``), a user model ``"package.module:attr"``
            or ``"path/file.py:attr"`` (a class, a factory or an instance), or an ``nn.Module``.
        weights: ``"DEFAULT"`` or a weights name (``"IMAGENET1K_V1"``) via torchvision's weights
            API and cache; ``"random"`` (seeded, no download); or a checkpoint path (``.pth``/``.pt``
            state_dict read with ``weights_only=True``, or ``.safetensors``). ``None`` = ``"random"``.
        seed: seed of the random initialisation (``weights="random"`` and user models).
        device: ``cpu``, ``cuda``, ``auto``.
        size: input size (int or (height, width)); default: the weights' own crop size (224 mostly).
        progress: show torchvision's download progress bar.

    Raises:
        ModelError: unknown name (with the closest names), bad weights or checkpoint.
        WeightsUnavailableError: pretrained weights are not cached and cannot be downloaded.
    """
    dev = resolve_device(device)
    wspec = "random" if weights is None else str(weights)
    is_path = isinstance(weights, os.PathLike) or _looks_like_path(wspec)

    if isinstance(model, nn.Module):
        module = model
        label = type(model).__name__
        if is_path:
            raise ModelError(
                "load a checkpoint into your own nn.Module yourself, or pass it as 'package.module:attr' with weights=path"
            )
        return Model(
            module=module,
            name=label,
            weights="as given",
            pretrained=False,
            preprocessing=Preprocessing.for_channels(input_channels(module)).with_size(size),
        )

    if not isinstance(model, str) or not model.strip():
        raise ModelError(f"a model is a torchvision name, 'package.module:attr' or an nn.Module, not {model!r}")

    if is_timm_name(model):
        return _load_timm(model, wspec, is_path=is_path, seed=seed, dev=dev, size=size, progress=progress)

    if is_user_spec(model):
        if not is_path and wspec.lower() != "random":
            raise ModelError(
                f"{model} is your own model: torchvision has no {wspec!r} weights for it; pass a checkpoint path or 'random'"
            )
        with _seeded(seed):
            module = _build_user_model(model)
        pre = Preprocessing.for_channels(input_channels(module)).with_size(size)
        if is_path:
            load_checkpoint(module, wspec, model)
            wname, pretrained = f"checkpoint:{wspec}", True
        else:
            wname, pretrained = f"random(seed={seed})", False
        return Model(module=module.eval().to(dev), name=model, weights=wname, pretrained=pretrained, preprocessing=pre)

    from torchvision.models import get_model_weights

    name = _check_name(model)
    default_enum = get_model_weights(name).DEFAULT if _has_weights(name) else None
    categories = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's init-weights notices are not for our users
        if is_path:
            # built without initialising its weights (they are about to be replaced): a VGG16 whose
            # random init takes 2 s here is ready in the time it takes to map the file
            module = _without_init(name)
            load_checkpoint(module, wspec, name, assign=True)
            if _unfilled(module):
                module = _built(name, seed)
                load_checkpoint(module, wspec, name)
            wname, pretrained, enum = f"checkpoint:{wspec}", True, default_enum
        elif wspec.lower() == "random":
            module = _built(name, seed)
            wname, pretrained, enum = f"random(seed={seed})", False, default_enum
        else:
            enum = _weights_enum(name, wspec)
            module = _pretrained(name, enum, progress)
            wname, pretrained = enum.name, True
            categories = tuple(enum.meta.get("categories") or ()) or None
    pre = preprocessing_from_weights(enum, size)
    return Model(
        module=module.eval().to(dev),
        name=name,
        weights=wname,
        pretrained=pretrained,
        preprocessing=pre,
        categories=categories,
    )


# --------------------------------------------------------------------------------------------------
# Building torchvision models
# --------------------------------------------------------------------------------------------------
#: Models whose pretrained builder changes what forward() computes without changing the weights'
#: names or shapes (``transform_input``): always built by torchvision itself, with its own init.
_BUILT_BY_TORCHVISION = frozenset({"googlenet", "inception_v3"})


def _built(name: str, seed: int, **kwargs: Any) -> nn.Module:
    """The model with torchvision's own (seeded) random initialisation."""
    from torchvision.models import get_model

    with _seeded(seed):
        return get_model(name, weights=None, **{**_builder_overrides(name), **kwargs})


def _without_init(name: str, **kwargs: Any) -> nn.Module:
    """The model's architecture on the meta device: no memory, no initialisation, for weights that
    :meth:`~torch.nn.Module.load_state_dict` (``assign=True``) puts in place."""
    from torchvision.models import get_model

    with torch.device("meta"):
        return get_model(name, weights=None, **{**_builder_overrides(name), **kwargs})


def _unfilled(module: nn.Module) -> bool:
    """True when some tensor of a module built by :func:`_without_init` was not in the checkpoint
    (a buffer that is not saved): then the module is built the usual way instead."""
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def _pretrained(name: str, enum: Any, progress: bool) -> nn.Module:
    """The model with torchvision's pretrained weights (its cache, or a download), built without
    a random initialisation first where that gives the same model."""
    from torchvision.models import get_model

    try:
        with _download_messages(shown=progress):
            if name in _BUILT_BY_TORCHVISION:
                return get_model(name, weights=enum, progress=progress)
            state = enum.get_state_dict(progress=progress, check_hash=True)
    except _OFFLINE_ERRORS as exc:
        raise WeightsUnavailableError(_offline_message(name, enum, exc)) from None
    except RuntimeError as exc:
        if "hash" in str(exc).lower() or "zip" in str(exc).lower() or "corrupt" in str(exc).lower():
            raise WeightsUnavailableError(
                f"the cached weights file {weights_file(enum)} is damaged ({first_line(exc, 100)}); delete it and run again"
            ) from None
        raise
    categories = enum.meta.get("categories")
    kwargs = {"num_classes": len(categories)} if categories else {}
    module = _without_init(name, **kwargs)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError:  # the pretrained builder makes another architecture (a 384-pixel ViT...)
        module = None
    if module is None or _unfilled(module):
        with _download_messages(shown=progress):
            module = get_model(name, weights=enum, progress=progress)
    return module


def _load_timm(
    spec: str, wspec: str, *, is_path: bool, seed: int, dev: torch.device, size: Any, progress: bool
) -> Model:
    """A ``timm:NAME`` model: timm's builder and preprocessing; pretrained (its cache, or a
    download), random (seeded) or a checkpoint file loaded without a random init first."""
    name = timm_models.check_name(spec)
    pre = timm_models.preprocessing(name, size)
    categories = None
    if is_path:
        module = timm_models.build(name, meta=True, size=size)
        load_checkpoint(module, wspec, f"timm:{name}", assign=True)
        if _unfilled(module):
            with _seeded(seed):
                module = timm_models.build(name, size=size)
            load_checkpoint(module, wspec, f"timm:{name}")
        wname, trained = f"checkpoint:{wspec}", True
    elif wspec.lower() == "random":
        with _seeded(seed):
            module = timm_models.build(name, size=size)
        wname, trained = f"random(seed={seed})", False
    elif wspec.upper() == "DEFAULT":
        with _download_messages(shown=progress):
            module = timm_models.pretrained(name, size=size, progress=progress)
        wname, trained = f"timm:{timm_models.pretrained_cfg(name).tag or 'default'}", True
        categories = timm_models.categories(name)
    else:
        raise ModelError(
            f"timm:{name} takes weights 'DEFAULT' (timm's pretrained weights; name a tag in the model, "
            f"e.g. timm:{name.split('.')[0]}.TAG), 'random' or a checkpoint file, not {wspec!r}"
        )
    return Model(module=module.eval().to(dev), name=f"timm:{name}", weights=wname, pretrained=trained,
                 preprocessing=pre, categories=categories)  # fmt: skip


def input_channels(module: nn.Module) -> int:
    """How many channels the model's first convolution takes (3 when it has none)."""
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return int(m.in_channels)
    return 3


def skeleton(model: str, *, size: int | tuple[int, int] | None = None) -> Model | None:
    """A torchvision model's architecture on the meta device, with its preprocessing: enough to
    check layer names, modes and channel numbers (and to list output shapes with
    :func:`featuremaps.capture.list_layers`) in a fraction of a second, before any weights are
    read or initialised. None for a user's own model (building it runs the user's code)."""
    if not isinstance(model, str) or is_user_spec(model):
        return None
    if is_timm_name(model):
        name = timm_models.check_name(model)
        module = timm_models.build(name, meta=True, size=size).eval()
        return Model(module=module, name=f"timm:{name}", weights="none (meta)", pretrained=False,
                     preprocessing=timm_models.preprocessing(name, size))  # fmt: skip
    from torchvision.models import get_model_weights

    name = _check_name(model)
    enum = get_model_weights(name).DEFAULT if _has_weights(name) else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = _without_init(name).eval()
    return Model(
        module=module,
        name=name,
        weights="none (meta)",
        pretrained=False,
        preprocessing=preprocessing_from_weights(enum, size),
    )


@contextlib.contextmanager
def _download_messages(shown: bool):
    """torch.hub announces each download with a print, progress bar or not. Keep it off stdout
    (which may carry a command's results) and out of a failed load's one-line error; the progress
    bar (stderr) stays unless ``shown`` is off (``--quiet``)."""
    with (
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.nullcontext() if shown else contextlib.redirect_stderr(io.StringIO()),
    ):
        yield


def _has_weights(name: str) -> bool:
    from torchvision.models import get_model_weights

    try:
        return get_model_weights(name).DEFAULT is not None
    except (ValueError, AttributeError, KeyError):
        return False


def _builder_overrides(name: str) -> dict[str, Any]:
    """Builder options so that a randomly initialised model has the same layers as the pretrained
    one (GoogLeNet and Inception build auxiliary heads only when trained from scratch)."""
    if name in ("googlenet", "inception_v3"):
        return {"aux_logits": False, "init_weights": True}
    return {}


def _offline_message(name: str, enum: Any, exc: BaseException) -> str:
    target = weights_file(enum)
    reason = first_line(exc, 80)
    return (
        f"pretrained weights {name}/{enum.name} are not cached and cannot be downloaded ({reason}): "
        f"put {target.name} into {target.parent} (or set TORCH_HOME), pass a checkpoint file as weights, "
        "or use weights='random' (--weights random) for an untrained model"
    )
