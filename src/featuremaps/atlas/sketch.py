"""Each channel's activation distribution over all images, as a mergeable quantile sketch.

The values (each image's max, or mean, of one channel) fall into logarithmic buckets, as in
DDSketch: bucket ``i`` of positive values holds ``(m·γ^(i-1), m·γ^i]`` with ``γ = (1+α)/(1-α)``,
negative values mirror it, and ``|v| < m`` is the zero bucket. The representative of a bucket is
within a relative error ``α`` of every value in it, so every quantile read from the sketch is within
``α`` (1%) of a true value of that rank. Counts of buckets add up, so a part of the images makes its
own sketch and the atlas's sketch is the sum over parts (``histograms.parquet``), whatever the order
and however many parts: bounded memory, no second pass.

A bucket is stored as one signed integer ``code``: 0 for the zero bucket, ``±(i + 1)`` otherwise;
codes sort in the order of the values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

#: Relative accuracy of every quantile.
ALPHA = 0.01
GAMMA = (1 + ALPHA) / (1 - ALPHA)
_LOG_GAMMA = math.log(GAMMA)
#: Values smaller than this in magnitude count as zero.
MIN_VALUE = 1e-9
_BIG = float(np.finfo(np.float32).max)
_CODE_SHIFT = 1 << 15  # codes stay within +-5,500 (float32's range), so they fit 16 bits


def bucket_codes(values: np.ndarray) -> np.ndarray:
    """The bucket code (int32) of each finite value."""
    v = np.asarray(values, dtype=np.float64)
    a = np.minimum(np.abs(v), _BIG)
    code = np.zeros(v.shape, dtype=np.int32)
    big = a >= MIN_VALUE
    i = np.ceil(np.log(a[big] / MIN_VALUE) / _LOG_GAMMA).astype(np.int32)
    code[big] = np.where(v[big] < 0, -(i + 1), i + 1)
    return code


def representative(codes: np.ndarray) -> np.ndarray:
    """The value each bucket stands for (within ``ALPHA`` of every value in it)."""
    c = np.asarray(codes, dtype=np.float64)
    mag = 2 * MIN_VALUE * GAMMA ** (np.abs(c) - 1) / (GAMMA + 1)
    return np.where(c == 0, 0.0, np.sign(c) * mag)


def bucket_bounds(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(lower, upper)`` of each bucket in value terms (positive buckets hold ``(lower, upper]``)."""
    c = np.asarray(codes, dtype=np.float64)
    outer = MIN_VALUE * GAMMA ** (np.abs(c) - 1)
    inner = MIN_VALUE * GAMMA ** (np.abs(c) - 2)
    lower = np.where(c > 0, inner, np.where(c < 0, -outer, -MIN_VALUE))
    upper = np.where(c > 0, outer, np.where(c < 0, -inner, MIN_VALUE))
    return lower, upper


def channel_sketch(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(n, C)`` values -> ``(channel, code, count)`` of every non-empty bucket of every channel
    (non-finite values are left out)."""
    n, c = values.shape
    if n == 0:
        empty = np.zeros(0, np.int32)
        return empty, empty, np.zeros(0, np.int64)
    finite = np.isfinite(values)
    codes = bucket_codes(np.where(finite, values, 0.0))
    key = np.broadcast_to(np.arange(c, dtype=np.int64), (n, c)) * (2 * _CODE_SHIFT) + (codes + _CODE_SHIFT)
    uniq, counts = np.unique(key[finite], return_counts=True)
    return (
        (uniq // (2 * _CODE_SHIFT)).astype(np.int32),
        (uniq % (2 * _CODE_SHIFT) - _CODE_SHIFT).astype(np.int32),
        counts.astype(np.int64),
    )


@dataclass(frozen=True, eq=False)
class Distribution:
    """One channel's activation distribution over the atlas's images (``stat``: each image's
    ``max`` over space, or its ``mean``), from the sketch: exact count, min, max and mean;
    quantiles within 1%.

    Attributes:
        layer, channel, stat: what it describes.
        count: images with a finite value.
        minimum, maximum, mean: exact.
        codes, counts: the sketch's non-empty buckets, in value order.
    """

    layer: str
    channel: int
    stat: str
    count: int
    minimum: float
    maximum: float
    mean: float
    codes: np.ndarray = field(repr=False)
    counts: np.ndarray = field(repr=False)

    def quantile(self, q: float | Any) -> float | np.ndarray:
        """The value below which a fraction ``q`` of the images lie (0 -> min, 1 -> max, exact ends)."""
        qs = np.asarray(q, dtype=np.float64)
        if np.any((qs < 0) | (qs > 1)) or np.any(np.isnan(qs)):
            from .errors import AtlasError

            raise AtlasError(f"a quantile is between 0 and 1, not {q!r}")
        if self.count == 0:
            out = np.full(qs.shape, np.nan)
        else:
            cum = np.cumsum(self.counts)
            rank = qs * (self.count - 1)
            where = np.searchsorted(cum, np.floor(rank), side="right")
            vals = representative(self.codes[np.minimum(where, len(self.codes) - 1)])
            out = np.clip(vals, self.minimum, self.maximum)
            out = np.where(qs <= 0, self.minimum, np.where(qs >= 1, self.maximum, out))
        return float(out) if out.ndim == 0 else out

    def rank_of(self, value: float) -> float:
        """The fraction of images whose value is at most ``value`` (within a bucket's width)."""
        if self.count == 0:
            return float("nan")
        below = self.counts[representative(self.codes) <= value].sum()
        return float(below) / self.count

    def histogram(self, bins: int = 40) -> tuple[np.ndarray, np.ndarray]:
        """``(edges, counts)``: ``bins`` equal bins over ``[minimum, maximum]``, each bucket's
        count put in the bin of its representative value."""
        if self.count == 0:
            return np.zeros(bins + 1), np.zeros(bins, np.int64)
        lo, hi = self.minimum, self.maximum
        if hi <= lo:
            hi = lo + 1.0
        edges = np.linspace(lo, hi, bins + 1)
        where = np.clip(((representative(self.codes) - lo) / (hi - lo) * bins).astype(np.int64), 0, bins - 1)
        counts = np.bincount(where, weights=self.counts, minlength=bins).astype(np.int64)
        return edges, counts

    def to_dict(self, bins: int = 40) -> dict[str, Any]:
        """JSON-ready numbers for a viewer: count, min, max, mean, quartiles, and a histogram."""
        edges, counts = self.histogram(bins)
        qs = self.quantile([0.01, 0.25, 0.5, 0.75, 0.99]) if self.count else [None] * 5
        return {
            "layer": self.layer,
            "channel": self.channel,
            "stat": self.stat,
            "count": self.count,
            "min": self.minimum,
            "max": self.maximum,
            "mean": self.mean,
            "quantiles": {
                k: (None if v is None else float(v)) for k, v in zip(("p01", "p25", "p50", "p75", "p99"), qs)
            },
            "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
        }

    def picture(
        self, *, width: int = 360, height: int = 140, bins: int = 40, mark: float | None = None
    ) -> "Image.Image":
        """A histogram as a small RGB picture (with ``mark``: a red line at that value)."""
        from PIL import Image, ImageDraw

        edges, counts = self.histogram(bins)
        im = Image.new("RGB", (width, height), (255, 255, 255))
        draw = ImageDraw.Draw(im)
        left, right, top, bottom = 8, width - 8, 18, height - 18
        peak = max(int(counts.max()), 1) if len(counts) else 1
        step = (right - left) / max(bins, 1)
        for i, c in enumerate(counts):
            if c:
                h = max(1, round((bottom - top) * c / peak))
                draw.rectangle([left + i * step, bottom - h, left + (i + 1) * step - 1, bottom], fill=(68, 92, 160))
        draw.line([left, bottom, right, bottom], fill=(90, 90, 90))
        if mark is not None and self.count and edges[-1] > edges[0]:
            xm = left + (right - left) * (mark - edges[0]) / (edges[-1] - edges[0])
            draw.line([xm, top - 4, xm, bottom], fill=(200, 30, 30), width=2)
        draw.text((left, bottom + 3), f"{edges[0]:.3g}", fill=(40, 40, 40))
        label = f"{edges[-1]:.3g}"
        draw.text((right - draw.textlength(label), bottom + 3), label, fill=(40, 40, 40))
        draw.text(
            (left, 2), f"{self.layer} #{self.channel} · {self.stat} per image · {self.count} images", fill=(40, 40, 40)
        )
        return im
