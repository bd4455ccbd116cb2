"""Models from timm's registry: ``timm:NAME`` (``timm:convnext_tiny``, ``timm:vit_small_patch16_224``,
a tag too: ``timm:resnet18.a1_in1k``), with timm's own builders, preprocessing (``pretrained_cfg``:
mean, std, input size, interpolation) and pretrained weights from its cache, never a table of ours.

timm is an optional extra (``pip install featuremaps[timm]``); without it a ``timm:`` name fails
with a one-line message saying so. Pretrained weights are looked up in the Hugging Face cache (or
torch.hub's, for weights timm downloads from a URL) first, without the network; offline, a missing
file is one message naming what to download and where to put it, never a silent fallback to random
weights.
"""

from __future__ import annotations

import difflib
import os
import socket
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoints import first_line
from .errors import ModelError, WeightsUnavailableError
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

PREFIX = "timm:"
_HF_FILES = ("model.safetensors", "pytorch_model.bin")


def is_timm_name(spec: object) -> bool:
    return isinstance(spec, str) and spec.strip().lower().startswith(PREFIX)


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ModelError(
            "timm models need the timm package: pip install 'featuremaps[timm]' (or pip install timm)"
        ) from None
    return timm


def list_timm_models(pattern: str | None = None) -> list[str]:
    """timm's model names (``timm:`` prefix not included) containing ``pattern``."""
    timm = _timm()
    return list(timm.list_models(f"*{pattern}*" if pattern else ""))


def check_name(spec: str) -> str:
    """``timm:NAME[.TAG]`` -> ``NAME[.TAG]``, checked against timm's registry (closest names if unknown)."""
    timm = _timm()
    name = spec.strip()[len(PREFIX) :].strip()
    base = name.split(".", 1)[0]
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join('timm:' + c for c in close)}? " if close else ""
        raise ModelError(
            f"unknown timm model {name!r}; {hint}run `featuremaps models --source timm PATTERN` to list them"
        )
    return name


def pretrained_cfg(name: str) -> Any:
    """timm's pretrained config of ``name`` (its default tag when no tag is given)."""
    timm = _timm()
    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    if cfg is None:
        raise ModelError(f"timm has no pretrained config for {name!r}; use weights 'random' or a checkpoint file")
    return cfg


def preprocessing(name: str, size: int | tuple[int, int] | None) -> Preprocessing:
    """The picture -> input rule of a timm model: its ``pretrained_cfg`` (mean, std, input size,
    interpolation), the whole picture resized (featuremaps never crops)."""
    try:
        cfg = pretrained_cfg(name)
    except ModelError:
        return Preprocessing().with_size(size)
    _, h, w = cfg.input_size
    interp = cfg.interpolation if cfg.interpolation in ("bilinear", "bicubic") else "bilinear"
    mean = tuple(float(v) for v in (cfg.mean or IMAGENET_MEAN))
    std = tuple(float(v) for v in (cfg.std or IMAGENET_STD))
    return Preprocessing(size=(int(h), int(w)), mean=mean, std=std, interpolation=interp).with_size(size)


def _build_kwargs(name: str, size: int | tuple[int, int] | None) -> dict[str, Any]:
    """Builder options: a ViT built for a fixed input size is built for the size asked for."""
    if size is None:
        return {}
    try:
        fixed = bool(pretrained_cfg(name).fixed_input_size)
    except ModelError:
        fixed = False
    if not fixed:
        return {}
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return {"img_size": hw}


def build(name: str, *, meta: bool = False, size: int | tuple[int, int] | None = None) -> nn.Module:
    """timm's model with its own random initialisation (``meta=True``: the architecture alone)."""
    timm = _timm()
    kwargs = _build_kwargs(name, size)
    if meta:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)
    return timm.create_model(name, pretrained=False, **kwargs)


def cached_file(name: str) -> Path | None:
    """Where the pretrained weights of ``name`` already are on this machine (the Hugging Face
    cache, or torch.hub's for weights timm takes from a URL), without touching the network."""
    cfg = pretrained_cfg(name)
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else list(_HF_FILES):
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if path.is_file():
            return path
    return None


def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _where(cfg: Any) -> str:
    if cfg.hf_hub_id:
        from huggingface_hub import constants

        return (
            f"run `huggingface-cli download {cfg.hf_hub_id}` on a machine with network and copy the Hugging Face "
            f"cache ({constants.HF_HUB_CACHE}) here"
        )
    return f"put {os.path.basename(cfg.url)} into {Path(torch.hub.get_dir()) / 'checkpoints'} (from {cfg.url})"


def pretrained(name: str, *, size: int | tuple[int, int] | None = None, progress: bool = True) -> nn.Module:
    """timm's model with its pretrained weights, from the cache without the network, or downloaded
    by timm; offline and not cached: :class:`WeightsUnavailableError` naming the file."""
    timm = _timm()
    cfg = pretrained_cfg(name)
    kwargs = _build_kwargs(name, size)
    file = cached_file(name)
    try:
        if file is not None:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(file)}, **kwargs)
        host = "huggingface.co" if cfg.hf_hub_id else (cfg.url.split("/")[2] if cfg.url else "")
        if not host or not _reachable(host):
            raise OSError("not cached, and no network")
        return timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        raise WeightsUnavailableError(
            f"pretrained weights of timm:{name} are not cached and cannot be downloaded ({first_line(exc, 80)}): "
            f"{_where(cfg)}, pass a checkpoint file as weights (--weights path.safetensors), or use weights='random' "
            "for an untrained model"
        ) from None


def categories(name: str) -> tuple[str, ...] | None:
    """Class labels of a pretrained timm model, from timm's own dataset info (ImageNet-1k...)."""
    timm = _timm()
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        cfg = pretrained_cfg(name)
        subset = infer_imagenet_subset(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        return tuple(ImageNetInfo(subset).label_descriptions()) if subset else None
    except Exception:  # an unusual config: no labels rather than no model
        del timm
        return None
