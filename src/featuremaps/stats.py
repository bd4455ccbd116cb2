"""The numbers of a captured map: :class:`LayerStats` per layer (computed inside a capture hook
when only a reduction is kept, so without temporaries as large as the map), the
:class:`StatsTable` that prints them, and the one rule for writing numbers into strict JSON."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from .errors import LayerError


def clean_number(value: Any) -> Any:
    """NaN and infinities -> None (strict JSON has no such numbers); anything else as it is."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def clean_stats(stats: Mapping[str, Any]) -> dict[str, Any]:
    """A stats dict with every number cleaned by :func:`clean_number`."""
    return {k: clean_number(v) for k, v in stats.items()}


@dataclass(frozen=True)
class LayerStats:
    """The numbers behind one captured map, computed on the full output.

    ``dead_fraction`` is the fraction of channels that are never positive: all zero after a ReLU,
    or channels that a following ReLU would zero out entirely. For a batch of several images these
    are the numbers of the whole batch (``sample`` is None) and ``samples`` holds each image's own
    (``sample`` 0, 1, ...); for one image ``samples`` is empty.
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
    sample: int | None = None
    samples: tuple[LayerStats, ...] = field(default=(), repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """The numbers as a JSON-able dict (without ``samples``: see :meth:`per_image`)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "samples"}
        d["shape"] = list(self.shape)
        return d

    def per_image(self) -> tuple[LayerStats, ...]:
        """One row per image: ``samples`` for a batch, or this row for one image."""
        return self.samples or (self,)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], samples: Sequence[Mapping[str, Any]] = ()) -> LayerStats:
        known = {f.name for f in fields(cls)} - {"samples"}
        values = {k: v for k, v in d.items() if k in known}
        values["shape"] = tuple(values["shape"])
        return cls(**values, samples=tuple(cls.from_dict(s) for s in samples))


def compute_stats(output: torch.Tensor, name: str, kind: str, *, sample: int | None = None) -> LayerStats:
    """Per-layer numbers of a full output tensor ``(N, C, ...)`` (or ``(N, F)``); for a batch
    (``N > 1``) also each image's own numbers (:attr:`LayerStats.samples`)."""
    whole = _numbers(output, name, kind, sample)
    if sample is None and output.ndim >= 1 and output.shape[0] > 1:
        per = tuple(_numbers(output[i : i + 1], name, kind, i) for i in range(int(output.shape[0])))
        whole = replace(whole, samples=per)
    return whole


def _numbers(output: torch.Tensor, name: str, kind: str, sample: int | None) -> LayerStats:
    x = output.detach()
    if not x.is_floating_point():
        x = x.float()
    if x.numel() == 0:
        nan = float("nan")
        return LayerStats(name, kind, tuple(output.shape), nan, nan, nan, nan, nan, nan, sample)
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
        sample=sample,
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


class StatsTable(Sequence[LayerStats]):
    """Per-layer numbers in execution order (one row per layer and image for a batch); prints as a
    table and shows as HTML in notebooks."""

    COLUMNS = ("name", "kind", "shape", "min", "max", "mean", "std", "zero_fraction", "dead_fraction")
    HEADS = ("layer", "kind", "shape", "min", "max", "mean", "std", "zeros", "dead ch")

    def __init__(self, rows: Sequence[LayerStats]):
        self._rows = tuple(rows)
        self._batch = any(r.sample is not None for r in self._rows)

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

    def _table(self) -> tuple[list[str], list[list[str]]]:
        cols = (("sample",) if self._batch else ()) + self.COLUMNS
        heads = (["image"] if self._batch else []) + list(self.HEADS)
        return heads, [[self._fmt(getattr(r, c)) for c in cols] for r in self._rows]

    def __str__(self) -> str:
        head, body = self._table()
        widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(head)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        import html

        head, body = self._table()
        cells = "".join(f"<th>{h}</th>" for h in head)
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
        return f"<table class='featuremaps-stats'><thead><tr>{cells}</tr></thead><tbody>{rows}</tbody></table>"
