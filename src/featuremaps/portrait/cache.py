"""One channel's portrait made once and kept in a cache folder: the data API of the viewer's channel
page and the atlas report.

>>> img = portrait_image(model, "features.28", 7, cache_dir="cache")          # made now, or read back
>>> imgs = portrait_images(model, "features.28", range(16), cache_dir="cache")  # the missing ones in one batch
>>> portrait_image(model, "features.28", 7, cache_dir="cache", compute=False)  # None when not made yet

A portrait depends on its channel, the model's weights, the layer and the options only, never on which
other channels were optimized with it (see :mod:`featuremaps.portrait.optimize`), so each channel is one
file, whichever call made it::

    cache/<model fingerprint>/<layer>/<options key>/0007.png     (+ options.json: what the key stands for)

The model fingerprint is a hash of the architecture (``repr``) and every parameter and buffer, computed
once per model object and again only when a tensor changes (its version counter or memory moved). The
options key covers size, steps, seed, objective, lr, decay, the transforms and the normalization, with
the budget resolved for the model's device (``auto`` on the CPU and ``cpu`` share files). The device is
not in the key: CUDA and CPU portraits agree to float rounding, not bit for bit. Each PNG carries its
record (model, weights, layer, channel, options, final objective) as a text chunk, in ``image.info
["featuremaps-portrait"]`` (JSON). Files are written to a temporary name and renamed into place, so a
reader never sees half a file, and two processes making the same portrait write the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin
from torch import nn

from featuremaps.errors import RunError
from featuremaps.folders import write_atomic
from featuremaps.layers import safe_name
from featuremaps.models import Model, module_device, unwrap_model
from featuremaps.portrait.errors import PortraitError
from featuremaps.portrait.optimize import check_channels
from featuremaps.portrait.portraits import model_preprocessing, normalizer, portrait, resolve_layer
from featuremaps.portrait.settings import DEFAULT_BATCH, budget_settings, check_objective
from featuremaps.portrait.transforms import STANDARD_TRANSFORMS

#: Bump when the optimization changes what a portrait looks like: old cache entries are then not used.
CACHE_VERSION = 1
#: The PNG text chunk (and ``Image.info`` key) holding a cached portrait's record.
INFO_KEY = "featuremaps-portrait"

_FINGERPRINTS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]]" = weakref.WeakKeyDictionary()
_FINGERPRINTS_LOCK = threading.Lock()


def _tensor_bytes(t: torch.Tensor) -> memoryview | bytes:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    try:
        return memoryview(flat.view(torch.uint8).numpy())
    except (RuntimeError, TypeError):  # pragma: no cover - dtypes that cannot be viewed as bytes
        return repr(flat.tolist()).encode()


def model_fingerprint(model: Model | nn.Module) -> str:
    """A hex digest of the model's architecture and every parameter and buffer (see the module docstring)."""
    module, _ = unwrap_model(model)
    tensors = module.state_dict(keep_vars=True)
    if any(t.is_meta for t in tensors.values()):
        raise PortraitError("the model has no weights (it is on the meta device); load it with fm.load_model first")
    token = tuple((k, t.data_ptr(), t._version, tuple(t.shape), str(t.dtype)) for k, t in tensors.items())
    with _FINGERPRINTS_LOCK:
        known = _FINGERPRINTS.get(module)
    if known is not None and known[0] == token:
        return known[1]
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{type(module).__module__}.{type(module).__qualname__}\n{module!r}\n".encode())
    for k, t in tensors.items():
        digest.update(f"{k}:{tuple(t.shape)}:{t.dtype}\n".encode())
        digest.update(_tensor_bytes(t))
    value = digest.hexdigest()
    with _FINGERPRINTS_LOCK:
        _FINGERPRINTS[module] = (token, value)
    return value


def _options(
    model: Model | nn.Module,
    layer: str,
    *,
    size: int | None,
    steps: int | None,
    seed: int,
    objective: str,
    lr: float,
    budget: str,
    decay: float,
) -> dict[str, Any]:
    module, _ = unwrap_model(model)
    check_objective(objective)
    name = resolve_layer(module, layer)
    budget_name, size, steps = budget_settings(budget, module_device(module).type, size, steps)
    pre = model_preprocessing(model)
    normalizer(pre, torch.device("cpu"))  # a model whose input is not RGB or grey fails here
    return {
        "cache_version": CACHE_VERSION,
        "model": model_fingerprint(model),
        "layer": name,
        "size": size,
        "steps": steps,
        "seed": seed,
        "objective": objective,
        "lr": float(lr),
        "decay": float(decay),
        "transforms": [repr(t) for t in STANDARD_TRANSFORMS],
        "normalization": {"mean": [float(v) for v in pre.mean], "std": [float(v) for v in pre.std]},
        "budget": budget_name,
    }


def _folder(cache_dir: str | os.PathLike, options: dict[str, Any]) -> Path:
    keyed = {k: v for k, v in options.items() if k != "budget"}  # size and steps say what the budget meant
    key = hashlib.blake2b(json.dumps(keyed, sort_keys=True).encode(), digest_size=8).hexdigest()
    return Path(cache_dir) / options["model"][:16] / safe_name(options["layer"]) / key


def cache_path(
    model: Model | nn.Module,
    layer: str,
    channel: int,
    *,
    cache_dir: str | os.PathLike,
    size: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    objective: str = "channel",
    lr: float = 0.05,
    budget: str = "auto",
    decay: float = 1.0,
) -> Path:
    """Where the cached portrait of ``channel`` lives (whether it exists or not); options as :func:`portrait_image`."""
    (chan,) = check_channels([channel])
    options = _options(
        model, layer, size=size, steps=steps, seed=seed, objective=objective, lr=lr, budget=budget, decay=decay
    )
    return _folder(cache_dir, options) / f"{chan:04d}.png"


def _read(path: Path) -> Image.Image | None:
    """The cached portrait at ``path``, or None when there is none (or it cannot be read: it is made again)."""
    try:
        with Image.open(path) as im:
            im.load()
            if INFO_KEY not in im.info:
                return None
            return im.convert("RGB") if im.mode != "RGB" else im.copy()
    except (OSError, ValueError, SyntaxError):
        return None


def portrait_images(
    model: Model | nn.Module,
    layer: str,
    channels: Sequence[int],
    *,
    cache_dir: str | os.PathLike,
    size: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    objective: str = "channel",
    lr: float = 0.05,
    budget: str = "auto",
    decay: float = 1.0,
    device: str | torch.device | None = None,
    batch_size: int = DEFAULT_BATCH,
    compute: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> dict[int, Image.Image]:
    """The portraits of ``channels`` of ``layer``: read from ``cache_dir``, the missing ones made in one
    :func:`~featuremaps.portrait.portrait` call (batched) and written there.

    Args:
        model: a loaded :class:`~featuremaps.models.Model` or ``nn.Module`` (left as it was).
        channels: distinct channel numbers.
        compute: False: only read; channels not in the cache are left out of the result.
        Other options: as :func:`featuremaps.portrait.portrait` (one portrait per channel, standard transforms).

    Returns:
        ``channel -> RGB PIL image`` in the order of ``channels``; ``image.info["featuremaps-portrait"]``
        is the portrait's record (JSON: model, weights, layer, channel, options, ``value``).

    Raises:
        LayerError, PortraitError: as :func:`~featuremaps.portrait.portrait`. RunError: the cache folder
        cannot be written.
    """
    chans = check_channels(channels)
    options = _options(
        model, layer, size=size, steps=steps, seed=seed, objective=objective, lr=lr, budget=budget, decay=decay
    )
    folder = _folder(cache_dir, options)
    found = {c: _read(folder / f"{c:04d}.png") for c in chans}
    missing = [c for c in chans if found[c] is None]
    if missing and compute:
        made = portrait(
            model, options["layer"], missing, size=options["size"], steps=options["steps"], seed=seed,
            objective=objective, lr=lr, decay=decay, device=device, batch_size=batch_size, progress=progress,
        )  # fmt: skip
        _store(folder, options, made)
        found.update({c: _read(folder / f"{c:04d}.png") for c in missing})
    return {c: found[c] for c in chans if found[c] is not None}  # type: ignore[misc]


def _store(folder: Path, options: dict[str, Any], made: Any) -> None:
    described = {**options, "model_name": made.model, "weights": made.weights}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "options.json").is_file():
            text = json.dumps(described, indent=2, sort_keys=True)
            write_atomic(folder / "options.json", lambda p: p.write_text(text, encoding="utf-8"))
        for k, channel in enumerate(made.channels):
            record = {**described, "channel": channel, "value": made.values[k], "start_value": made.start_values[k]}
            info = PngImagePlugin.PngInfo()
            info.add_text(INFO_KEY, json.dumps(record, sort_keys=True))
            image = made.images[k]
            write_atomic(folder / f"{channel:04d}.png", lambda p, im=image, i=info: im.save(p, format="PNG", pnginfo=i))
    except OSError as exc:
        raise RunError(f"cannot write the portrait cache {folder}: {exc.strerror or exc}; check the path") from None


def portrait_image(
    model: Model | nn.Module,
    layer: str,
    channel: int,
    *,
    cache_dir: str | os.PathLike,
    compute: bool = True,
    **options: Any,
) -> Image.Image | None:
    """The portrait of one ``channel`` of ``layer``: read from ``cache_dir``, or made and written there.

    ``compute=False`` only reads: None when it is not there yet (a page can say "no portrait yet"
    instead of waiting). Other options as :func:`portrait_images`.
    """
    return portrait_images(model, layer, [channel], cache_dir=cache_dir, compute=compute, **options).get(channel)
