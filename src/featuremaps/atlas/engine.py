"""Making an atlas: the layers and their receptive fields, the per-batch function that both engines
run, the local engine (a DataLoader), and the run itself (parts as they complete, then the merge).

The per-batch function is :func:`batch_stats`: one :func:`featuremaps.capture` of a preprocessed
batch with ``reduce="channel-stats"``, which keeps, inside the capture hook, only each channel's
max, mean and where the max is (``(N, C, 3)`` per layer): a batch's full maps are never all held,
and the numbers are those of :func:`featuremaps.capture` on the same image.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import LayerError
from .errors import AtlasError
from .inputs import ImageList, Plan
from .store import LayerSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from ..models import Model
    from ..preprocess import Preprocessing
    from ..receptive import ReceptiveField

ENGINES: tuple[str, ...] = ("local", "ray")
#: Rows of ``stats.parquet`` a part aims at (images x channels): about 50 MB of numbers in memory.
PART_ROWS = 4_000_000
MAX_PART_IMAGES = 4096


def default_workers() -> int:
    """DataLoader workers by default: the CPUs but one (the model's), at most 4."""
    return min(4, max(0, (os.cpu_count() or 1) - 1))


def check_options(*, top_k: Any, batch_size: Any, workers: Any, part_size: Any = None, engine: str = "local") -> None:
    """Refuse unusable numbers and engines before anything is read or loaded (one-line errors)."""
    for name, value, least in (("top-k", top_k, 1), ("batch size", batch_size, 1), ("workers", workers, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            flag = {"top-k": "--top-k", "batch size": "--batch-size", "workers": "--workers"}[name]
            raise AtlasError(f"{name} must be an integer >= {least}, not {value!r} ({flag})")
    if part_size is not None and (not isinstance(part_size, int) or isinstance(part_size, bool) or part_size < 1):
        raise AtlasError(f"part size must be an integer >= 1 image, not {part_size!r}")
    if engine not in ENGINES:
        raise AtlasError(f"unknown engine {engine!r}; use local (this machine) or ray (Ray Data, local or a cluster)")
    if engine == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.data") is None:
            raise AtlasError("--engine ray needs Ray Data: pip install 'featuremaps[ray]' (or 'ray[data]')")


def default_part_size(channels: int, batch_size: int) -> int:
    """Images per part: about :data:`PART_ROWS` rows, a whole number of batches."""
    images = max(1, min(MAX_PART_IMAGES, PART_ROWS // max(channels, 1)))
    return max(batch_size, -(-images // batch_size) * batch_size)


# -- layers ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AtlasLayer:
    """One layer of an atlas.

    Attributes:
        name: its key in captures and in every table (a ``named_modules()`` path).
        select: what :func:`featuremaps.capture` is asked for (``path#1`` for the first call of a
            module called several times).
        kind: ``conv``, ``act``, ``pool``...
        channels, height, width: its output at the atlas's input size.
        receptive_field: what one output position sees (None: the whole image, see ``note``).
    """

    name: str
    select: str
    kind: str
    channels: int
    height: int
    width: int
    receptive_field: "ReceptiveField | None" = field(default=None, compare=False)
    note: str = ""

    @property
    def spec(self) -> LayerSpec:
        return LayerSpec(self.name, self.channels, self.height, self.width)

    def box(self, y: int, x: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(top, left, bottom, right)`` in the pixels of an original image of ``height x width``
        that output position ``(y, x)`` sees (bottom/right exclusive, clipped at the borders)."""
        if self.receptive_field is None:
            return 0, 0, int(height), int(width)
        from ..receptive import crop_box

        return crop_box(self.receptive_field, int(y), int(x), source_size=(int(height), int(width)))

    def to_json(self) -> dict[str, Any]:
        rf = self.receptive_field
        return {
            "name": self.name,
            "select": self.select,
            "kind": self.kind,
            "channels": self.channels,
            "height": self.height,
            "width": self.width,
            "receptive_field": None
            if rf is None
            else {
                "size": list(rf.size),
                "stride": list(rf.stride),
                "offset": list(rf.offset),
                "input_size": list(rf.input_size),
                "output_size": list(rf.output_size),
            },
            "note": self.note,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "AtlasLayer":
        rf = d.get("receptive_field")
        field_ = None
        if rf is not None:
            from ..receptive import ReceptiveField

            field_ = ReceptiveField(
                layer=d["name"].partition("#")[0],
                input_size=tuple(rf["input_size"]),
                size=tuple(rf["size"]),
                stride=tuple(rf["stride"]),
                offset=tuple(rf["offset"]),
                output_size=tuple(rf["output_size"]),
            )
        return cls(d["name"], d["select"], d["kind"], d["channels"], d["height"], d["width"], field_, d.get("note", ""))


def plan_layers(
    model: "Model | nn.Module", layers: str | Sequence[str] | None, size: Any = None
) -> tuple[AtlasLayer, ...]:
    """The layers ``layers`` selects, with their output shapes at the input size, checked: each must
    output ``(N, C, H, W)`` maps and run once per pass (or be named ``path#1``). Works on a model
    on the meta device (:func:`featuremaps.models.skeleton`), before any weights load.

    Raises:
        LayerError: unknown names (with the closest ones), or a layer that cannot be in an atlas.
    """
    from ..capture import list_layers

    rows = list_layers(model, size=size, layers=layers)
    tokens = [layers] if isinstance(layers, str) else list(layers or [])
    explicit_first = {t.strip()[:-2] for tok in tokens for t in str(tok).split(",") if t.strip().endswith("#1")}
    out: list[AtlasLayer] = []
    for r in rows:
        if r.calls == 0:
            raise LayerError(f"{r.name} is not called in the model's forward pass; pick layers that run")
        if r.output_shape is None:
            raise LayerError(f"{r.name} ({r.type}) does not return a tensor; pick layers that output feature maps")
        if len(r.output_shape) != 4:
            raise LayerError(
                f"{r.name} ({r.type}) outputs shape {tuple(r.output_shape)}, not (N, C, H, W) maps; an atlas needs "
                "layers with spatial channels (conv, relu, pool, blocks)"
            )
        if r.calls > 1 and not (r.call == 1 and r.module in explicit_first):
            raise LayerError(
                f"{r.module} is called {r.calls} times per pass; the atlas measures one receptive field per layer: "
                f"select its first call as {r.module}#1, or another layer"
            )
        select = f"{r.module}#1" if r.calls > 1 else r.name
        out.append(AtlasLayer(r.name, select, r.kind, *map(int, r.output_shape[1:])))
    if not out:
        raise LayerError("no layer selected; use `featuremaps layers MODEL` to see the names")
    return tuple(out)


def with_receptive_fields(
    module: "nn.Module", layers: Sequence[AtlasLayer], input_size: tuple[int, int]
) -> tuple[AtlasLayer, ...]:
    """The layers with their receptive fields (measured once per layer and input size). A layer
    that sees the whole image (global pooling, squeeze-and-excitation) or has no regular geometry
    gets None and a note: its crop is the whole image, which is what it sees."""
    from dataclasses import replace

    from ..receptive import ReceptiveFieldError, receptive_fields

    paths = [layer.name.partition("#")[0] for layer in layers]
    try:
        found = receptive_fields(module, input_size, paths)
        return tuple(replace(layer, receptive_field=found[p]) for layer, p in zip(layers, paths))
    except ReceptiveFieldError:
        pass
    out = []
    for layer, path in zip(layers, paths):  # one at a time: only the layers that fail get no field
        try:
            out.append(replace(layer, receptive_field=receptive_fields(module, input_size, [path])[path]))
        except ReceptiveFieldError as exc:
            out.append(replace(layer, receptive_field=None, note=f"crops are whole images: {exc}"))
    return tuple(out)


# -- the per-batch function ------------------------------------------------------------------------
def batch_stats(model: "Model | nn.Module", layers: Sequence[AtlasLayer], x: "torch.Tensor") -> dict[str, np.ndarray]:
    """Per layer, ``(N, C, 3)`` float32: each image's and channel's max over space, mean, and the
    flat index ``y * W + x`` of the (first) max, reduced inside the capture hook."""
    from ..capture import capture

    maps = capture(model, x, layers=[layer.select for layer in layers], reduce="channel-stats")
    got = {e.name: e for e in maps.entries}
    out = {}
    for layer in layers:
        e = got.get(layer.name)
        if e is None or e.reduction != "channel-stats":
            raise AtlasError(f"{layer.name} gave no feature maps for this batch; check that it runs on every input")
        out[layer.name] = e.tensor.detach().cpu().numpy()
    return out


@dataclass(frozen=True)
class BatchResult:
    """What an engine hands back for one batch of the plan: every image id of the batch, which were
    usable, why not, their sizes ``(width, height)``, and per layer the ``(n_ok, C, 3)`` numbers."""

    ids: tuple[int, ...]
    ok: tuple[bool, ...]
    reasons: tuple[str, ...]
    sizes: tuple[tuple[int, int], ...]
    values: Mapping[str, np.ndarray]


def local_batches(
    model: "Model | nn.Module",
    images: ImageList,
    pre: "Preprocessing",
    plan: Plan,
    parts: Sequence[int],
    layers: Sequence[AtlasLayer],
    *,
    workers: int,
) -> Iterator[BatchResult]:
    """The local engine: a DataLoader decodes in ``workers`` processes, this process runs the model."""
    from ..models import module_device, unwrap_model
    from .inputs import loader

    module, _ = unwrap_model(model)
    pin = module_device(module).type == "cuda"
    for batch in loader(images, pre, plan, parts, workers=workers, pin=pin):
        values = batch_stats(model, layers, batch.x) if batch.x is not None else {}
        yield BatchResult(batch.ids, batch.ok, batch.reasons, batch.sizes, values)


# -- models ----------------------------------------------------------------------------------------
def model_identity(model: "Model | nn.Module") -> dict[str, Any]:
    """Name, weights, whether pretrained, and how to build the same model again (``reload``:
    arguments of :func:`featuremaps.load_model`, or None for a model object given as it is)."""
    from ..models import unwrap_model

    module, info = unwrap_model(model)
    if info is None:
        return {"name": type(module).__name__, "weights": "as given", "pretrained": False, "reload": None}
    w = info.weights
    name = info.name
    target, colon, attr = name.rpartition(":")
    if colon and target.endswith(".py"):  # a user's model file: found from any working directory (Ray's workers)
        name = f"{Path(target).resolve()}:{attr}"
    reload: dict[str, Any] | None = {"model": name, "weights": w, "seed": 0}
    if w.startswith("random(seed=") and w.endswith(")"):
        reload = {"model": name, "weights": "random", "seed": int(w[len("random(seed=") : -1])}
    elif w.startswith("checkpoint:"):
        reload = {"model": name, "weights": str(Path(w[len("checkpoint:") :]).resolve()), "seed": 0}
    elif w in ("as given", "none (meta)"):
        reload = None
    return {"name": info.name, "weights": w, "pretrained": bool(info.pretrained), "reload": reload}


def preprocessing_for(model: "Model | nn.Module", size: Any = None) -> "Preprocessing":
    from ..models import input_channels, unwrap_model
    from ..preprocess import Preprocessing

    module, info = unwrap_model(model)
    pre = info.preprocessing if info is not None else Preprocessing.for_channels(input_channels(module))
    pre = pre.with_size(size)
    if pre.channels not in (1, 3):
        raise AtlasError(
            f"this model's first layer takes {pre.channels} input channels; an atlas feeds pictures (RGB or grayscale)"
        )
    return pre


def preprocessing_json(pre: "Preprocessing") -> dict[str, Any]:
    return {
        "size": list(pre.size),
        "mean": list(pre.mean),
        "std": list(pre.std),
        "min_size": list(pre.min_size),
        "interpolation": pre.interpolation,
        "channels": pre.channels,
    }


def preprocessing_from_json(d: Mapping[str, Any]) -> "Preprocessing":
    from ..preprocess import Preprocessing

    return Preprocessing(
        size=tuple(d["size"]),
        mean=tuple(d["mean"]),
        std=tuple(d["std"]),
        min_size=tuple(d["min_size"]),
        interpolation=d["interpolation"],
        channels=int(d["channels"]),
    )


Progress = Callable[[int, int], None]
Phase = Callable[[str], None]
