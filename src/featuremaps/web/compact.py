"""The compact form in which the viewer keeps a run: what the page can show, not every full map.

Right after a capture each output is turned into (:func:`compact_maps`):

- its numbers (the layer's statistics, and min/max/mean/zero fraction per channel), computed on
  the full float32 output;
- its four channel reductions (mean, max, l2, std) as small float32 maps, for the layer strip,
  the overlays and the side-by-side;
- its channel maps as one ``(1, C, H, W)`` array in float16 where that loses nothing that shows
  (finite values between 1e-3 and 6e4 in magnitude), float32 otherwise. These become the run
  folder's raw maps (``maps/NNN_<layer>.npy``, so that ``runs.load_run`` reads the folder back)
  and are read from there on demand: one channel at a time (a seek and a read), or one whole layer
  for a channel grid.

The numbers and reductions are written beside them (``viewer/reduced.npz``,
``viewer/channels.json``); what a finished run costs in memory is then :class:`RunData` (a few
MB), whatever its maps take on disk. Nothing here keeps state: the viewer's caches hold the
results.
"""

from __future__ import annotations

import io
import json
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import RunError
from ..maps import FeatureMap, FeatureMaps
from ..reduce import REDUCTIONS
from ..runs import read_manifest
from ..stats import LayerStats

#: Files the viewer adds to a run folder (listed in its manifest like every other file).
REDUCED_FILE = "viewer/reduced.npz"
CHANNELS_FILE = "viewer/channels.json"
#: float16 keeps 3 significant digits; it is used when every value's magnitude is in this range.
HALF_RANGE = (1e-3, 6.0e4)
CHANNEL_STATS = ("min", "max", "mean", "zero_fraction")


# --------------------------------------------------------------------------------------------------
# What a run keeps
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class RunData:
    """What the viewer keeps in memory of one run to draw every picture of the page.

    Attributes:
        entries: one :class:`FeatureMap` per captured output whose tensor is on the meta device
            (shape and dtype of the stored maps, no data) and whose statistics are those of the
            full output.
        reduced: ``(layer index, reduction) -> (H, W) float32`` for every spatial layer.
        channel_stats: ``layer index -> {"min": [...], "max": [...], "mean": [...], "zero_fraction": [...]}``.
        image: the picture as the model saw it (None for tensor input).
        raw: ``layer index -> path of its stored maps`` inside the run folder.
    """

    entries: tuple[FeatureMap, ...]
    reduced: Mapping[tuple[int, str], np.ndarray] = field(repr=False)
    channel_stats: Mapping[int, Mapping[str, list[float]]] = field(repr=False)
    image: Image.Image | None = field(repr=False)
    raw: Mapping[int, str] = field(default_factory=dict, repr=False)
    model: str = "model"
    weights: str = "unknown"
    pretrained: bool = False
    mode: str = "network"
    input_size: tuple[int, int] = (0, 0)
    notes: tuple[str, ...] = ()
    #: while the run is being made compact: what computes a reduction or the numbers not there yet
    fill: Callable[[int, str], np.ndarray] | None = field(default=None, repr=False, compare=False)
    fill_numbers: Callable[[int], Mapping[str, list[float]]] | None = field(default=None, repr=False, compare=False)

    def reduced_map(self, index: int, method: str) -> np.ndarray | None:
        """Layer ``index``'s channel ``method`` (None for a layer without channel maps)."""
        m = self.reduced.get((index, method))
        if m is None and self.fill is not None and self.entries[index].is_spatial:
            m = self.fill(index, method)
        return m

    def numbers(self, index: int) -> Mapping[str, list[float]] | None:
        """Layer ``index``'s min, max, mean and zero fraction per channel."""
        n = self.channel_stats.get(index)
        if n is None and self.fill_numbers is not None and self.entries[index].is_spatial:
            n = self.fill_numbers(index)
        return n

    @property
    def nbytes(self) -> int:
        """About what this takes in memory."""
        arrays = sum(a.nbytes for a in self.reduced.values())
        numbers = sum(len(v) * 32 for s in self.channel_stats.values() for v in s.values())
        picture = self.image.width * self.image.height * 3 if self.image is not None else 0
        return arrays + numbers + picture + 2048 * len(self.entries)

    def entry(self, index: int) -> FeatureMap:
        return self.entries[index]

    def reduced_maps(self, method: str) -> FeatureMaps:
        """The run with each spatial layer as its channel ``method`` (for :func:`render.compare_runs`)."""
        pairs = [(e, self.reduced_map(i, method)) for i, e in enumerate(self.entries) if e.is_spatial]
        entries = tuple(reduced_entry(e, m, method) for e, m in pairs if m is not None)
        return FeatureMaps(entries=entries, model=self.model, weights=self.weights, pretrained=self.pretrained,
                           mode=self.mode, input_size=self.input_size, image=self.image, reduction=method,
                           notes=self.notes)  # fmt: skip


def _plain(e: FeatureMap, tensor: torch.Tensor, shape: tuple[int, ...], **changes: Any) -> FeatureMap:
    """An entry with the stable fields of ``e``, another tensor and shape, and ``e``'s statistics."""
    fields = {"name": e.name, "module": e.module, "kind": e.kind, "type": e.type, "index": e.index, "call": e.call,
              "reduction": e.reduction, "channels": e.channels}  # fmt: skip
    fields.update(changes)
    return FeatureMap(shape=tuple(int(s) for s in shape), tensor=tensor, _stats=e.stats, **fields)


def meta_entry(e: FeatureMap) -> FeatureMap:
    """``e`` without its data: a meta tensor of the shape and dtype of its maps. Outputs read as
    maps (a transformer's tokens, channels-last outputs) are described as the ``(N, C, H, W)``
    maps they give, as they are stored."""
    shape, stored = tuple(e.shape), tuple(e.tensor.shape)
    if e.is_spatial and e.spatial_size is not None:
        shape = (int(e.shape[0]), int(e.num_channels), *e.spatial_size)
        if e.has_channels:
            stored = (int(e.tensor.shape[0]), len(e.channel_ids()), *e.spatial_size)
    return _plain(e, torch.empty(stored, dtype=e.tensor.dtype, device="meta"), shape)


def reduced_entry(e: FeatureMap, reduced: np.ndarray, method: str) -> FeatureMap:
    """``e`` as one reduced map ``(1, H, W)`` (what the renderer draws for a layer's reduction)."""
    return _plain(e, torch.from_numpy(np.ascontiguousarray(reduced))[None], e.shape, reduction=method, channels=None)


def channel_entry(e: FeatureMap, channel: int, m: np.ndarray) -> FeatureMap:
    """``e`` holding only channel ``channel``, ``(1, 1, H, W)``."""
    return _plain(e, torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None], e.shape,
                  reduction="channels", channels=(int(channel),))  # fmt: skip


def full_entry(e: FeatureMap, maps: np.ndarray) -> FeatureMap:
    """``e`` with its channel maps ``(C, H, W)`` (stored dtype) as its tensor."""
    return _plain(e, torch.from_numpy(np.ascontiguousarray(maps))[None], e.shape, reduction=None, channels=None)


# --------------------------------------------------------------------------------------------------
# From a capture
# --------------------------------------------------------------------------------------------------
def storage_dtype(stats: LayerStats) -> np.dtype:
    """float16 when every value's magnitude is within :data:`HALF_RANGE` (or 0), else float32."""
    lo, hi = float(stats.min), float(stats.max)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return np.dtype(np.float32)
    top = max(abs(lo), abs(hi))
    return np.dtype(np.float16) if HALF_RANGE[0] <= top <= HALF_RANGE[1] else np.dtype(np.float32)


def channel_numbers(maps: np.ndarray) -> dict[str, list[float]]:
    """Min, max, mean and fraction of zeros of each channel of ``(C, H, W)`` maps."""
    flat = maps.reshape(maps.shape[0], -1)
    with np.errstate(all="ignore"):
        return {
            "min": flat.min(axis=1).astype(float).tolist(),
            "max": flat.max(axis=1).astype(float).tolist(),
            "mean": flat.mean(axis=1, dtype=np.float64).tolist(),
            "zero_fraction": (flat == 0).mean(axis=1).tolist(),
        }


def compact_tensor(e: FeatureMap) -> torch.Tensor:
    """The stored form of one output's maps: ``(1, C, H, W)`` float16 (or float32, see
    :func:`storage_dtype`), or the tensor as it is for outputs without channel maps."""
    if not e.is_spatial or not e.has_channels:
        return e.tensor.detach().cpu().contiguous()
    return torch.from_numpy(e.maps(0).astype(storage_dtype(e.stats), copy=True))[None]


class LiveRun:
    """A run from the end of its capture until its folder is written: made compact layer by layer
    (:meth:`finish`) while the page already draws from it. Every number and reduction is computed
    from the float32 output (on request first, by :meth:`finish` otherwise), and pictures are drawn
    from values rounded as they will be stored, so that nothing the page sees changes on the way.

    Given as a one-item list (which is emptied), the capture is held by nothing else, and each
    captured output is let go as soon as its compact copy is made: memory peaks at the capture
    plus one layer.
    """

    def __init__(self, maps: FeatureMaps | list[FeatureMaps]):
        if isinstance(maps, list):
            maps = maps.pop()
        self._captured: list[FeatureMap | None] = list(maps.entries)
        self._stored: list[torch.Tensor | None] = [None] * len(self._captured)
        self._locks = [threading.Lock() for _ in self._captured]
        self._reduced: dict[tuple[int, str], np.ndarray] = {}
        self._numbers: dict[int, dict[str, list[float]]] = {}
        self.info = {"model": maps.model, "weights": maps.weights, "pretrained": maps.pretrained, "mode": maps.mode,
                     "input_size": tuple(maps.input_size), "notes": tuple(maps.notes)}  # fmt: skip
        self.image, self.reduction = maps.image, maps.reduction
        del maps
        for e in self._captured:  # the layer numbers the page lists (computed once, on the full output)
            assert e is not None
            _ = e.stats
        self._dtypes = [storage_dtype(e.stats) if e is not None and e.is_spatial and e.has_channels else None
                        for e in self._captured]  # fmt: skip
        self.data = RunData(entries=tuple(meta_entry(e) for e in self._captured if e is not None),
                            reduced=self._reduced, channel_stats=self._numbers, image=self.image,
                            fill=self._fill, fill_numbers=self._fill_numbers, **self.info)  # fmt: skip
        self.stored: FeatureMaps | None = None

    # -- reading, while it is made compact -----------------------------------------------------------
    def layer(self, index: int) -> np.ndarray:
        """Every channel of a layer, ``(C, H, W)``, as it will be stored."""
        stored = self._stored[index]
        if stored is not None:
            return stored[0].numpy()
        e = self._captured[index]
        if e is None:  # made compact meanwhile
            return self.layer(index)
        maps = e.maps(0)
        dtype = self._dtypes[index]
        return maps.astype(dtype) if dtype is not None and dtype != np.float32 else maps

    def channel(self, index: int, position: int) -> np.ndarray:
        stored = self._stored[index]
        if stored is not None:
            return stored[0, position].float().numpy()
        e = self._captured[index]
        if e is None:
            return self.channel(index, position)
        m = e.maps(0)[position]
        dtype = self._dtypes[index]
        return m.astype(dtype).astype(np.float32) if dtype is not None else m

    def _fill(self, index: int, method: str) -> np.ndarray:
        with self._locks[index]:
            m = self._reduced.get((index, method))
            if m is None:
                e = self._captured[index]
                assert e is not None  # finish() fills every reduction before it lets go of an output
                m = self._reduced[(index, method)] = np.ascontiguousarray(e.reduced(method, 0), dtype=np.float32)
            return m

    def _fill_numbers(self, index: int) -> dict[str, list[float]]:
        with self._locks[index]:
            n = self._numbers.get(index)
            if n is None:
                e = self._captured[index]
                assert e is not None
                n = self._numbers[index] = channel_numbers(e.maps(0))
            return n

    # -- making it compact ---------------------------------------------------------------------------
    def finish(self) -> tuple[FeatureMaps, RunData]:
        """Every reduction and number, then each output's compact form (the float32 output let go
        at once): the maps to write as the run folder, and the complete :class:`RunData`."""
        compact: list[FeatureMap] = []
        for i in range(len(self._captured)):
            e = self._captured[i]
            assert e is not None
            if e.is_spatial and e.has_channels:
                for method in REDUCTIONS:
                    self._fill(i, method)
                self._fill_numbers(i)
            tensor = compact_tensor(e)
            c = _plain(e, tensor, tuple(tensor.shape))
            with self._locks[i]:
                self._stored[i] = tensor
                self._captured[i] = None
            compact.append(c)
            del e
        self.stored = FeatureMaps(entries=tuple(compact), image=self.image, reduction=self.reduction, **self.info)
        self.data = RunData(entries=tuple(meta_entry(e) for e in compact), reduced=dict(self._reduced),
                            channel_stats=dict(self._numbers), image=self.image, **self.info)  # fmt: skip
        return self.stored, self.data


def compact_maps(maps: FeatureMaps | list[FeatureMaps]) -> tuple[FeatureMaps, RunData]:
    """A capture -> (the compact maps to write as the run folder, what the viewer keeps of it);
    see :class:`LiveRun`."""
    return LiveRun(maps).finish()


def viewer_files(data: RunData) -> dict[str, bytes]:
    """The files the viewer adds to the run folder: reductions and per-channel numbers."""
    buf = io.BytesIO()
    np.savez(buf, **{f"{i}_{m}": a for (i, m), a in data.reduced.items()})
    numbers = {str(i): v for i, v in data.channel_stats.items()}
    return {REDUCED_FILE: buf.getvalue(), CHANNELS_FILE: json.dumps(numbers, allow_nan=True).encode()}


# --------------------------------------------------------------------------------------------------
# From a run folder
# --------------------------------------------------------------------------------------------------
def _dtype_of(name: str | None) -> torch.dtype:
    return getattr(torch, str(name or "float32"), torch.float32)


def read_run(folder: Path, *, layer: Callable[[int], np.ndarray] | None = None) -> RunData:
    """What the viewer keeps of a run folder it wrote. Folders without the viewer's files (older
    viewers) get their reductions and numbers computed from the raw maps, one layer at a time
    (``layer(i)`` reads layer ``i``; by default from the folder)."""
    manifest = read_manifest(folder, kind="run")
    entries: list[FeatureMap] = []
    raw: dict[int, str] = {}
    for i, layer_info in enumerate(manifest.get("layers", [])):
        if not layer_info.get("raw"):
            raise RunError(f"{folder} has no raw maps, so the viewer cannot draw it")
        stored = tuple(layer_info.get("stored_shape") or layer_info["shape"])
        e = FeatureMap(
            name=layer_info["name"], module=layer_info.get("module", layer_info["name"]), kind=layer_info["kind"],
            type=layer_info["type"], index=int(layer_info.get("index", i)), call=int(layer_info.get("call", 1)),
            shape=tuple(layer_info["shape"]), tensor=torch.empty(stored, dtype=_dtype_of(layer_info.get("dtype")),
            device="meta"), reduction=layer_info.get("reduction"),
            channels=tuple(layer_info["channels"]) if layer_info.get("channels") is not None else None,
            _stats=LayerStats.from_dict(layer_info["stats"], layer_info.get("sample_stats") or ()),
        )  # fmt: skip
        entries.append(e)
        raw[i] = str(layer_info["raw"])
    reduced: dict[tuple[int, str], np.ndarray] = {}
    numbers: dict[int, dict[str, list[float]]] = {}
    try:
        with np.load(folder / REDUCED_FILE, allow_pickle=False) as npz:
            for key in npz.files:
                i, _, m = key.partition("_")
                reduced[(int(i), m)] = np.asarray(npz[key], dtype=np.float32)
        numbers = {int(k): v for k, v in json.loads((folder / CHANNELS_FILE).read_text(encoding="utf-8")).items()}
    except (OSError, ValueError, KeyError):
        read = layer or (lambda i: read_layer(folder, raw[i]))
        for i, e in enumerate(entries):
            if e.is_spatial and e.has_channels:
                full = full_entry(e, read(i))
                reduced.update({(i, m): np.ascontiguousarray(full.reduced(m, 0), np.float32) for m in REDUCTIONS})
                numbers[i] = channel_numbers(full.maps(0))
    image = None
    if manifest.get("input_image"):
        try:
            with Image.open(folder / manifest["input_image"]) as im:
                image = im.convert("RGB")
        except OSError:
            image = None
    return RunData(
        entries=tuple(entries), reduced=reduced, channel_stats=numbers, image=image, raw=raw,
        model=manifest.get("model", "model"), weights=manifest.get("weights", "unknown"),
        pretrained=bool(manifest.get("pretrained")), mode=manifest.get("mode", "network"),
        input_size=tuple(manifest.get("input_size") or (0, 0)), notes=tuple(manifest.get("notes") or ()),
    )  # fmt: skip


def _npy_header(f: Any, path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except ValueError as exc:
        raise RunError(f"cannot read {path}: {exc}") from None
    if fortran or dtype.hasobject:
        raise RunError(f"cannot read {path}: not a plain C-ordered array")
    return tuple(shape), dtype, f.tell()


def _maps_shape(shape: Sequence[int], path: Path) -> tuple[int, int, int]:
    if len(shape) != 4 or shape[0] != 1:
        raise RunError(f"{path} holds an array of shape {tuple(shape)}, not the (1, C, H, W) maps of one image")
    return int(shape[1]), int(shape[2]), int(shape[3])


def read_layer(folder: Path, rel: str) -> np.ndarray:
    """Every channel of one stored layer, ``(C, H, W)`` in its stored dtype (or the raw array as
    it is for non-spatial outputs)."""
    path = folder / rel
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read {path}: {exc}") from None
    return array[0] if array.ndim == 4 and array.shape[0] == 1 else array


def read_channel(folder: Path, rel: str, position: int) -> np.ndarray:
    """Channel ``position`` of one stored layer as ``(H, W)`` float32, read on its own (the file
    is not mapped or read in full)."""
    path = folder / rel
    try:
        with open(path, "rb") as f:
            shape, dtype, offset = _npy_header(f, path)
            c, h, w = _maps_shape(shape, path)
            if not 0 <= position < c:
                raise RunError(f"{path} has {c} channels, not {position + 1}")
            f.seek(offset + position * h * w * dtype.itemsize, os.SEEK_SET)
            m = np.fromfile(f, dtype=dtype, count=h * w)
    except OSError as exc:
        raise RunError(f"cannot read {path}: {exc}") from None
    if m.size != h * w:
        raise RunError(f"{path} is truncated")
    return m.reshape(h, w).astype(np.float32)


def layer_nbytes(e: FeatureMap) -> int:
    """Bytes of one layer's stored maps."""
    return int(e.tensor.nelement()) * int(e.tensor.element_size())
