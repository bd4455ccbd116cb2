"""Channel reductions: turn a layer's ``(N, C, H, W)`` output into one 2-D map per sample, or keep
only its strongest channels.

They run inside a capture hook (so the full output never has to be kept) and afterwards on a
captured map; both paths call the same functions. Importing this module does not import torch
(the CLI checks ``--reduce`` before torch loads); the functions use the tensors' own methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ReductionError

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: Reductions of the channel axis to one 2-D map.
REDUCTIONS: tuple[str, ...] = ("mean", "max", "l2", "std")
#: How top-k channels are ranked.
RANKINGS: tuple[str, ...] = ("mean", "max")
#: Per-channel numbers kept instead of maps: for each image and channel its max, mean and where the
#: max is (the channel atlas's reduction; no per-layer statistics are computed with it).
CHANNEL_STATS = "channel-stats"


@dataclass(frozen=True)
class Reduction:
    """What to keep of a layer's output.

    ``method`` is one of :data:`REDUCTIONS` (keep one 2-D map per sample), ``"topk"`` (keep the
    ``k`` channels of highest ``by`` score, measured on the first sample), or
    :data:`CHANNEL_STATS` (keep ``(N, C, 3)``: each channel's max, mean, and the flat index
    ``y * W + x`` of its max, see :func:`channel_stats`).
    """

    method: str
    k: int | None = None
    by: str = "mean"

    def __post_init__(self) -> None:
        if self.method == "topk":
            if not isinstance(self.k, int) or self.k < 1:
                raise ReductionError(f"top-k needs k >= 1, got {self.k!r}; write e.g. 'topk:8'")
            if self.by not in RANKINGS:
                raise ReductionError(f"top-k ranks channels by {' or '.join(RANKINGS)}, not {self.by!r}")
        elif self.method not in REDUCTIONS and self.method != CHANNEL_STATS:
            raise ReductionError(
                f"unknown reduction {self.method!r}; use one of {', '.join(REDUCTIONS)} or 'topk:K[:mean|max]'"
            )

    @property
    def with_stats(self) -> bool:
        """Whether a capture computes each layer's numbers (LayerStats) beside this reduction."""
        return self.method != CHANNEL_STATS

    @property
    def spec(self) -> str:
        """The string that :func:`parse_reduction` turns back into this reduction."""
        return f"topk:{self.k}:{self.by}" if self.method == "topk" else self.method

    def apply(self, output: "torch.Tensor") -> "tuple[torch.Tensor, tuple[int, ...] | None]":
        """Reduce a ``(N, C, ...)`` output. Returns the kept tensor and, for top-k, the channel indices."""
        if self.method == "topk":
            return top_channels(output, self.k or 1, by=self.by)
        if self.method == CHANNEL_STATS:
            return channel_stats(output), None
        return reduce_channels(output, self.method), None


def parse_reduction(spec: "str | Reduction | None") -> Reduction | None:
    """``None``/``"none"`` -> keep full maps; ``"mean"``, ``"l2"``...; ``"topk:8"`` or ``"topk:8:max"``."""
    if spec is None or isinstance(spec, Reduction):
        return spec
    if not isinstance(spec, str):
        raise ReductionError(f"a reduction is a string such as 'mean' or 'topk:8', not {type(spec).__name__}")
    text = spec.strip().lower()
    if text in ("", "none", "full"):
        return None
    if text.startswith("top"):
        parts = text.replace("topk", "topk:", 1).split(":") if not text.startswith("topk:") else text.split(":")
        parts = [p for p in parts if p]
        try:
            k = int(parts[1])
        except (IndexError, ValueError):
            raise ReductionError(f"cannot read {spec!r}: write 'topk:K' or 'topk:K:max', e.g. 'topk:8'") from None
        by = parts[2] if len(parts) > 2 else "mean"
        return Reduction("topk", k=k, by=by)
    return Reduction(text)


def reduce_channels(output: "torch.Tensor", method: str) -> "torch.Tensor":
    """Reduce the channel axis (dim 1) of ``output``: ``(N, C, H, W) -> (N, H, W)``."""
    if output.ndim < 3:
        raise ReductionError(
            f"a channel reduction needs a spatial output (N, C, H, W), got shape {tuple(output.shape)}"
        )
    x = output if output.is_floating_point() else output.float()
    if method == "mean":
        return x.mean(dim=1)
    if method == "max":
        return x.amax(dim=1)
    if method == "l2":
        import torch

        return torch.linalg.vector_norm(x, ord=2, dim=1)
    if method == "std":
        return x.std(dim=1, correction=0)
    raise ReductionError(f"unknown reduction {method!r}; use one of {', '.join(REDUCTIONS)}")


def channel_scores(output: "torch.Tensor", by: str = "mean", sample: int = 0) -> "torch.Tensor":
    """Per-channel score (``mean`` or ``max`` over space) of one sample: ``(C,)``."""
    flat = output[sample].reshape(output.shape[1], -1).float()
    if by == "mean":
        return flat.mean(dim=1)
    if by == "max":
        return flat.amax(dim=1)
    raise ReductionError(f"top-k ranks channels by {' or '.join(RANKINGS)}, not {by!r}")


def top_channels(output: "torch.Tensor", k: int, *, by: str = "mean") -> "tuple[torch.Tensor, tuple[int, ...]]":
    """The ``k`` channels of highest score (ranked on the first sample), strongest first."""
    if output.ndim < 3:
        raise ReductionError(f"top-k channels need a spatial output (N, C, H, W), got shape {tuple(output.shape)}")
    k = min(k, output.shape[1])
    idx = channel_scores(output, by).topk(k).indices
    return output.index_select(1, idx), tuple(int(i) for i in idx.tolist())


def channel_stats(output: "torch.Tensor") -> "torch.Tensor":
    """``(N, C, ...)`` -> ``(N, C, 3)`` float32: per image and channel the max over space, the mean,
    and the flat index of the (first) max (``y * W + x`` for a 2-D map; exact as a float32 up to
    16.7 million positions). One pass for max and index, one for the mean."""
    flat = output.flatten(2)
    if not flat.is_floating_point():
        flat = flat.float()
    top, where = flat.max(dim=2)
    return _stack((top, flat.mean(dim=2), where))


def _stack(parts: "tuple[torch.Tensor, ...]") -> "torch.Tensor":
    import torch

    return torch.stack([p.float() for p in parts], dim=-1)
