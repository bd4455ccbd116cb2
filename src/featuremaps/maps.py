"""The results: one :class:`FeatureMap` per captured output, collected in :class:`FeatureMaps`.

Both are frozen dataclasses. Tensors stay on the device they were captured on until a numpy view
is asked for; per-layer numbers are computed once, on first use (or inside the hook when the full
output was not kept).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import LayerError
from .reduce import Reduction, parse_reduction, reduce_channels

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

#: What a captured module is. ``act`` covers every activation (ReLU, ReLU6, GELU, SiLU, Hardswish...).
KINDS: tuple[str, ...] = ("conv", "act", "pool", "norm", "linear", "other")


@dataclass(frozen=True)
class LayerStats:
    """The numbers behind one captured map, computed on the full output (all samples).

    ``dead_fraction`` is the fraction of channels that are never positive: all zero after a ReLU,
    or channels that a following ReLU would zero out entirely.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    min: float
    max: float
    mean: float
    std: float
    zero_fraction: float
    dead_fraction: float

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def compute_stats(output: torch.Tensor, name: str, kind: str) -> LayerStats:
    """Per-layer numbers of a full output tensor ``(N, C, ...)`` (or ``(N, F)``)."""
    x = output.detach()
    if not x.is_floating_point():
        x = x.float()
    if x.numel() == 0:
        nan = float("nan")
        return LayerStats(name, kind, tuple(output.shape), nan, nan, nan, nan, nan, nan)
    # Reductions only, no temporary as large as the output (this runs inside capture hooks), each
    # a fast vectorized pass: per-channel min and max (two passes: torch.aminmax along a dimension
    # is about 4x slower than both), sum, sum of squares, and the count of nonzeros.
    n = x.numel()
    if x.ndim >= 2:
        if x.shape[0] == 1 and x.is_contiguous():
            flat = x.view(x.shape[1], -1)
            cmin, cmax = flat.amin(dim=1), flat.amax(dim=1)
        else:
            dims = (0, *range(2, x.ndim))
            cmin, cmax = x.amin(dim=dims), x.amax(dim=dims)
        lo, hi = cmin.min(), cmax.max()
        dead = (cmax <= 0).float().mean()
    else:
        lo, hi = torch.aminmax(x)
        dead = (x <= 0).all().float()
    if n < 2**16:
        std_t, mean_t = torch.std_mean(x.double(), correction=0)
        mean, std = float(mean_t), float(std_t)
    else:
        mean = float(x.sum()) / n  # float32 cascade sum: no float64 copy of the whole output
        sq = _sum_of_squares(x) / n
        std = math.sqrt(max(sq - mean * mean, 0.0))
    zeros = n - _count_nonzero(x)
    return LayerStats(
        name=name,
        kind=kind,
        shape=tuple(int(s) for s in output.shape),
        min=float(lo),
        max=float(hi),
        mean=mean,
        std=std,
        zero_fraction=float(zeros) / x.numel(),
        dead_fraction=float(dead),
    )


def _flat(x: torch.Tensor) -> torch.Tensor:
    """All of ``x``'s values as one 1-D tensor in memory order: a view for any dense layout
    (contiguous, channels-last...), a copy only for gappy views."""
    order = sorted(range(x.ndim), key=lambda d: -x.stride(d))
    y = x.permute(order)
    return y.view(-1) if y.is_contiguous() else y.reshape(-1)


# Summed in one go, float32 squares drift: on the CPU, one vector_norm over 16.7M values was 0.4%
# off and over 268M values (VGG16's first map at 2048x2048) 9% off. Rows of 16384 values each have
# an exact-enough float32 norm, and the rows' squares are added in float64 (3.9e-6 relative error).
_ROW = 1 << 14


def _sum_of_squares(x: torch.Tensor) -> float:
    """The sum of ``x**2`` over all values, accurate for billions of values, with no temporary
    larger than one float per 16384 values."""
    flat = _flat(x)
    whole = flat.numel() - flat.numel() % _ROW
    total = 0.0
    if whole:
        total += float(torch.linalg.vector_norm(flat[:whole].view(-1, _ROW), dim=1).double().square().sum())
    if whole < flat.numel():
        total += float(torch.linalg.vector_norm(flat[whole:].double())) ** 2
    return total


# On CUDA, count_nonzero makes a bool copy and an int64 copy of its input (measured on an H200:
# 144 MB of temporaries for a 64 MB map), more than the map itself: count in slices there.
_COUNT_SLICE = 1 << 20


def _count_nonzero(x: torch.Tensor) -> int:
    """``count_nonzero`` without temporaries larger than a few MB on any device."""
    if x.device.type == "cpu" or x.numel() <= _COUNT_SLICE:  # the CPU kernel counts in place
        return int(torch.count_nonzero(x))
    return int(torch.stack([torch.count_nonzero(p) for p in _flat(x).split(_COUNT_SLICE)]).sum())


@dataclass(frozen=True, eq=False)
class FeatureMap:
    """One captured output of one module call.

    Attributes:
        name: unique key: the module's ``named_modules()`` path, with ``#k`` for its k-th call (k >= 2).
        module: the module's ``named_modules()`` path.
        kind: one of :data:`KINDS`.
        type: the module's class name (``Conv2d``...).
        index: position in execution order (0-based).
        call: which call of the module this is (1-based).
        shape: the full output's shape, batch first, also when only a reduction was kept.
        tensor: what was kept: the full output, or ``(N, H, W)`` for a reduction, ``(N, k, H, W)`` for top-k.
        reduction: ``None`` when ``tensor`` is the full output, else the reduction's spec.
        channels: for top-k, the original channel index of each kept channel.
    """

    name: str
    module: str
    kind: str
    type: str
    index: int
    call: int
    shape: tuple[int, ...]
    tensor: torch.Tensor = field(repr=False)
    reduction: str | None = None
    channels: tuple[int, ...] | None = None
    _stats: LayerStats | None = field(default=None, repr=False, compare=False)

    # -- what it is ------------------------------------------------------------------------------
    @property
    def is_spatial(self) -> bool:
        """True for ``(N, C, H, W)`` outputs, the ones that can be drawn as maps."""
        return len(self.shape) == 4

    @property
    def num_channels(self) -> int:
        return int(self.shape[1]) if len(self.shape) >= 2 else 1

    @property
    def spatial_size(self) -> tuple[int, int] | None:
        return (int(self.shape[2]), int(self.shape[3])) if self.is_spatial else None

    @property
    def stats(self) -> LayerStats:
        """Numbers of the full output (computed on first use when the full output was kept)."""
        if self._stats is None:
            if self.reduction is not None:  # pragma: no cover - capture always fills them
                raise LayerError(f"{self.name}: no statistics were kept for this reduced map")
            object.__setattr__(self, "_stats", compute_stats(self.tensor, self.name, self.kind))
        assert self._stats is not None
        return self._stats

    # -- data ------------------------------------------------------------------------------------
    def numpy(self) -> np.ndarray:
        """The kept tensor as a float32 numpy array on the CPU."""
        return self.tensor.detach().float().cpu().numpy()

    def maps(self, sample: int = 0) -> np.ndarray:
        """The channel maps of one sample, ``(C, H, W)`` (or ``(k, H, W)`` after top-k)."""
        if not self.is_spatial:
            raise LayerError(f"{self.name} has output shape {self.shape}; only (N, C, H, W) outputs have channel maps")
        if self.reduction is not None and not self.reduction.startswith("topk"):
            raise LayerError(
                f"{self.name} kept only its {self.reduction!r} reduction; capture with reduce=None "
                "or reduce='topk:K' to keep channel maps"
            )
        return self.tensor[sample].detach().float().cpu().numpy()

    def channel_ids(self) -> tuple[int, ...]:
        """The original index of each channel that :meth:`maps` returns."""
        return self.channels if self.channels is not None else tuple(range(self.num_channels))

    def reduced(self, method: str = "mean", sample: int = 0) -> np.ndarray:
        """One 2-D map ``(H, W)``: the channel ``method`` (mean, max, l2, std) of one sample.

        A map captured with a reduction gives that reduction (asking for another one is an error);
        top-k maps are reduced over the kept channels.
        """
        if not self.is_spatial:
            raise LayerError(f"{self.name} has output shape {self.shape}; only (N, C, H, W) outputs reduce to a 2-D map")
        if self.reduction is not None and not self.reduction.startswith("topk"):
            if method != self.reduction:
                raise LayerError(
                    f"{self.name} kept only its {self.reduction!r} reduction, not {method!r}; capture again with reduce={method!r}"
                )
            return self.tensor[sample].detach().float().cpu().numpy()
        return reduce_channels(self.tensor[sample : sample + 1], method)[0].detach().float().cpu().numpy()

    def cpu(self) -> "FeatureMap":
        """The same entry with its tensor on the CPU."""
        if self.tensor.device.type == "cpu":
            return self
        return FeatureMap(**{**self._fields(), "tensor": self.tensor.cpu()})

    def _fields(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    @classmethod
    def _fast(cls, name, module, kind, type, index, call, shape, tensor, reduction=None, channels=None, stats=None) -> "FeatureMap":  # noqa: A002
        """The same as the constructor, about three times faster: the frozen dataclass's own
        ``__init__`` sets each of the eleven fields through ``object.__setattr__``, and a capture
        makes one entry per module call, inside the time it is measured by."""
        self = object.__new__(cls)
        self.__dict__.update(
            name=name, module=module, kind=kind, type=type, index=index, call=call, shape=shape,
            tensor=tensor, reduction=reduction, channels=channels, _stats=stats,
        )  # fmt: skip
        return self

    # -- notebooks -------------------------------------------------------------------------------
    def picture(self, **options: Any) -> "Image.Image":
        """The channel grid of this layer (see :func:`featuremaps.render.channel_grid`; first 64
        channels unless ``per_page``/``channels``/``top_k`` say otherwise)."""
        from .render import channel_grid

        options.setdefault("per_page", 64)
        return channel_grid(self, **options)

    def show(self, **options: Any):
        """A matplotlib figure of :meth:`picture` (for notebooks and scripts)."""
        return _figure(self.picture(**options), self.name)

    def _repr_png_(self) -> bytes | None:
        if not self.is_spatial:
            return None
        from .render import to_png_bytes

        return to_png_bytes(self.picture())

    def __repr__(self) -> str:
        red = f", reduction={self.reduction!r}" if self.reduction else ""
        return f"FeatureMap({self.name!r}, kind={self.kind!r}, type={self.type!r}, shape={self.shape}{red})"


class StatsTable(Sequence[LayerStats]):
    """Per-layer numbers in execution order; prints as a table and shows as HTML in notebooks."""

    COLUMNS = ("name", "kind", "shape", "min", "max", "mean", "std", "zero_fraction", "dead_fraction")

    def __init__(self, rows: Sequence[LayerStats]):
        self._rows = tuple(rows)

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            for r in self._rows:
                if r.name == key:
                    return r
            raise LayerError(f"no layer named {key!r} in these stats")
        return self._rows[key]

    def __len__(self) -> int:
        return len(self._rows)

    def to_dicts(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self._rows]

    @staticmethod
    def _fmt(v: Any) -> str:
        if isinstance(v, tuple):
            return "x".join(str(s) for s in v)
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    def __str__(self) -> str:
        head = ["layer", "kind", "shape", "min", "max", "mean", "std", "zeros", "dead ch"]
        body = [[self._fmt(getattr(r, c)) for c in self.COLUMNS] for r in self._rows]
        widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(head)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        import html

        head = "".join(f"<th>{h}</th>" for h in ("layer", "kind", "shape", "min", "max", "mean", "std", "zeros", "dead ch"))
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(self._fmt(getattr(r, c)))}</td>" for c in self.COLUMNS) + "</tr>"
            for r in self._rows
        )
        return f"<table class='featuremaps-stats'><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


@dataclass(frozen=True, eq=False)
class FeatureMaps(Mapping[str, FeatureMap]):
    """Every captured output of one run, in execution order, keyed by :attr:`FeatureMap.name`.

    ``maps["features.28"]`` or ``maps[3]`` give one entry; iterating gives the names.

    Attributes:
        entries: the captured outputs, in execution order.
        model: the model's name (torchvision name, ``module:attr`` spec, or class name).
        weights: which weights were used (``IMAGENET1K_V1``, ``random(seed=0)``, a checkpoint path...).
        pretrained: True when the weights are real trained weights (not random).
        mode: ``network`` or one of the chains (``conv``, ``conv-relu``, ``conv-pool``).
        input_size: ``(H, W)`` of the tensor the model saw.
        image: the RGB picture the model saw, resized to ``input_size`` (None for raw tensor input).
        reduction: the reduction kept in every entry, or None for full maps.
        notes: things the user should know (skipped outputs, fallbacks...).
    """

    entries: tuple[FeatureMap, ...]
    model: str = "model"
    weights: str = "unknown"
    pretrained: bool = False
    mode: str = "network"
    input_size: tuple[int, int] = (0, 0)
    image: "Image.Image | None" = field(default=None, repr=False)
    reduction: str | None = None
    notes: tuple[str, ...] = ()
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index.update({e.name: i for i, e in enumerate(self.entries)})

    def __getitem__(self, key: str | int) -> FeatureMap:  # type: ignore[override]
        if isinstance(key, int):
            try:
                return self.entries[key]
            except IndexError:
                raise LayerError(f"layer index {key} is out of range: this run has {len(self.entries)} maps") from None
        try:
            return self.entries[self._index[key]]
        except KeyError:
            import difflib

            close = difflib.get_close_matches(str(key), list(self._index), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; captured: {', '.join(list(self._index)[:8])}..."
            raise LayerError(f"no captured map named {key!r}{hint}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(e.name for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def stats(self) -> StatsTable:
        """Shape, min, max, mean, std, zero fraction and dead-channel fraction of every entry."""
        return StatsTable([e.stats for e in self.entries])

    def select(self, *, kind: str | Sequence[str] | None = None, spatial: bool | None = None) -> "FeatureMaps":
        """A new collection with the entries of the given kind(s) and/or spatial-ness."""
        kinds = {kind} if isinstance(kind, str) else set(kind) if kind is not None else None
        kept = tuple(
            e
            for e in self.entries
            if (kinds is None or e.kind in kinds) and (spatial is None or e.is_spatial == spatial)
        )
        return self.replace(entries=kept)

    def replace(self, **changes: Any) -> "FeatureMaps":
        """A copy with some fields changed (the dataclass is frozen)."""
        fields = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "_index"}
        fields.update(changes)
        return FeatureMaps(**fields)

    def cpu(self) -> "FeatureMaps":
        """The same run with every tensor on the CPU."""
        return self.replace(entries=tuple(e.cpu() for e in self.entries))

    @property
    def reduction_spec(self) -> Reduction | None:
        return parse_reduction(self.reduction)

    # -- notebooks -------------------------------------------------------------------------------
    def picture(self, **options: Any) -> "Image.Image":
        """One reduced map per layer (see :func:`featuremaps.render.overview`)."""
        from .render import overview

        return overview(self, **options)

    def show(self, **options: Any):
        """A matplotlib figure of :meth:`picture` (for notebooks and scripts)."""
        return _figure(self.picture(**options), f"{self.model} · {self.mode}")

    def _repr_png_(self) -> bytes | None:
        if not any(e.is_spatial for e in self.entries):
            return None
        from .render import to_png_bytes

        return to_png_bytes(self.picture())

    def __repr__(self) -> str:
        return (
            f"FeatureMaps(model={self.model!r}, weights={self.weights!r}, mode={self.mode!r}, "
            f"input_size={self.input_size}, {len(self.entries)} maps)"
        )


def _figure(picture: "Image.Image", title: str):
    """A matplotlib figure showing a rendered picture at its own pixel size."""
    import matplotlib.pyplot as plt

    dpi = 100
    fig = plt.figure(figsize=(picture.width / dpi, picture.height / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(picture)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9, loc="left")
    return fig
