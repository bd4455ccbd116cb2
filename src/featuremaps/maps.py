"""The results: one :class:`FeatureMap` per captured output, collected in :class:`FeatureMaps`.

Both are frozen dataclasses. Tensors stay on the device they were captured on until a numpy view
is asked for; per-layer numbers are computed once, on first use (or inside the hook when the full
output was not kept).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import LayerError
from .reduce import Reduction, parse_reduction, reduce_channels
from .stats import LayerStats, StatsTable, compute_stats

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image


@dataclass(frozen=True, eq=False)
class FeatureMap:
    """One captured output of one module call.

    Attributes:
        name: unique key: the module's ``named_modules()`` path, with ``#k`` for its k-th call (k >= 2).
        module: the module's ``named_modules()`` path.
        kind: one of :data:`featuremaps.layers.KINDS`.
        type: the module's class name (``Conv2d``...).
        index: position in execution order (0-based).
        call: which call of the module this is (1-based).
        shape: the full output's shape, batch first, also when only a reduction was kept.
        tensor: what was kept: the full output, or ``(N, H, W)`` for a reduction, ``(N, k, H, W)`` for top-k.
        reduction: ``None`` when ``tensor`` is the full output, else the reduction's spec.
        channels: for top-k, the original channel index of each kept channel.
        layout: how ``tensor`` holds its maps: ``None`` (``(N, C, H, W)``, or not spatial),
            ``"tokens"`` (a transformer's ``(N, L, C)``: ``prefix`` class/distillation/register
            tokens, then the patch tokens row by row) or ``"nhwc"`` (channels last, as Swin's
            stages and the LayerNorm inside ConvNeXt blocks); :meth:`maps_tensor` reads any of
            them as ``(N, C, H, W)``.
        spatial: ``(C, H, W)`` of the output read as maps, for token and channels-last outputs
            (also when only a reduction of them was kept); None for plain ``(N, C, H, W)`` outputs.
        prefix: how many prefix tokens come before the patch tokens (``layout == "tokens"``).
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
    layout: str | None = None
    spatial: tuple[int, int, int] | None = None
    prefix: int = 0

    # -- what it is ------------------------------------------------------------------------------
    @property
    def map_shape(self) -> tuple[int, int, int, int] | None:
        """``(N, C, H, W)`` of the output read as maps (token and channels-last outputs too), or
        None when it has no maps (a Linear's ``(N, F)``...)."""
        if self.spatial is not None:
            return (int(self.shape[0]), *self.spatial)
        return tuple(int(s) for s in self.shape) if len(self.shape) == 4 else None  # type: ignore[return-value]

    @property
    def is_spatial(self) -> bool:
        """True for outputs that can be drawn as maps: ``(N, C, H, W)``, and transformer token or
        channels-last outputs read as such (:attr:`layout`)."""
        return self.spatial is not None or len(self.shape) == 4

    @property
    def num_channels(self) -> int:
        if self.spatial is not None:
            return int(self.spatial[0])
        return int(self.shape[1]) if len(self.shape) >= 2 else 1

    @property
    def spatial_size(self) -> tuple[int, int] | None:
        shape = self.map_shape
        return (shape[2], shape[3]) if shape is not None else None

    def maps_tensor(self) -> torch.Tensor:
        """The kept channel maps as ``(N, C, H, W)`` (``(N, k, H, W)`` after top-k): :attr:`tensor`
        itself, or a view of it for token (prefix tokens dropped) and channels-last outputs."""
        t = self.tensor
        if self.layout == "tokens":
            _, c, h, w = self.map_shape  # type: ignore[misc]
            return t[:, self.prefix :].reshape(t.shape[0], h, w, t.shape[-1]).permute(0, 3, 1, 2)
        if self.layout == "nhwc":
            return t.permute(0, 3, 1, 2)
        return t

    def prefix_tokens(self) -> torch.Tensor | None:
        """The prefix tokens ``(N, P, C)`` (class, distillation, register tokens) of a token output
        whose full tensor was kept; None otherwise."""
        if self.layout == "tokens" and self.prefix:
            return self.tensor[:, : self.prefix]
        return None

    @property
    def stats(self) -> LayerStats:
        """Numbers of the full output (computed on first use when the full output was kept)."""
        if self._stats is None:
            if self.reduction is not None:
                raise LayerError(
                    f"{self.name}: no statistics were kept with reduce={self.reduction!r}; capture with another "
                    "reduction (or none) for the layer's numbers"
                )
            object.__setattr__(self, "_stats", compute_stats(self.maps_tensor(), self.name, self.kind))
        assert self._stats is not None
        return self._stats

    # -- data ------------------------------------------------------------------------------------
    def numpy(self) -> np.ndarray:
        """The kept tensor as a float32 numpy array on the CPU."""
        return self.tensor.detach().float().cpu().numpy()

    @property
    def has_channels(self) -> bool:
        """True when :attr:`tensor` holds channel maps: the full output, its top-k channels, or a
        chosen subset (``reduction == "channels"``), rather than one reduced map per image."""
        r = self.reduction
        return r is None or r.startswith("topk") or r == "channels"

    def with_channels(self, ids: Sequence[int]) -> FeatureMap:
        """The same entry keeping only the channels ``ids`` (original channel numbers, in that
        order), e.g. the channels a picture shows; its numbers stay those of the full output."""
        if not self.is_spatial or not self.has_channels:
            raise LayerError(f"{self.name} has no channel maps to choose from")
        have = self.channel_ids()
        try:
            pos = [have.index(int(i)) for i in ids]
        except ValueError:
            raise LayerError(f"{self.name} has no channel {next(i for i in ids if int(i) not in have)}") from None
        if pos == list(range(len(have))):
            return self
        maps = self.maps_tensor()
        kept = maps.index_select(1, torch.as_tensor(pos, dtype=torch.long, device=maps.device))
        return FeatureMap(**{**self._fields(), "tensor": kept, "reduction": "channels", "layout": None,
                             "spatial": self.map_shape[1:], "channels": tuple(int(i) for i in ids),
                             "_stats": self.stats})  # fmt: skip

    @property
    def batch_size(self) -> int:
        return int(self.shape[0]) if self.shape else 1

    def _sample(self, sample: int | None) -> int:
        """``sample`` checked; None means the only image (a batch needs an explicit one)."""
        n = self.batch_size
        if sample is None:
            if n > 1:
                raise LayerError(
                    f"{self.name} holds a batch of {n} images; pass sample=0..{n - 1} (or use .numpy() for the whole batch)"
                )
            return 0
        if not isinstance(sample, int) or not 0 <= sample < n:
            raise LayerError(f"sample {sample!r} is out of range: {self.name} holds {n} image(s), pick 0..{n - 1}")
        return sample

    def maps(self, sample: int | None = None) -> np.ndarray:
        """The channel maps of one image, ``(C, H, W)`` (or ``(k, H, W)`` after top-k); ``sample``
        picks the image of a batch (needed when there are several)."""
        sample = self._sample(sample)
        if not self.is_spatial:
            raise LayerError(f"{self.name} has output shape {self.shape}; only (N, C, H, W) outputs have channel maps")
        if not self.has_channels:
            raise LayerError(
                f"{self.name} kept only its {self.reduction!r} reduction; capture with reduce=None "
                "or reduce='topk:K' to keep channel maps"
            )
        return self.maps_tensor()[sample].detach().float().cpu().numpy()

    def channel_ids(self) -> tuple[int, ...]:
        """The original index of each channel that :meth:`maps` returns."""
        return self.channels if self.channels is not None else tuple(range(self.num_channels))

    def reduced(self, method: str = "mean", sample: int | None = None) -> np.ndarray:
        """One 2-D map ``(H, W)``: the channel ``method`` (mean, max, l2, std) of one image.

        A map captured with a reduction gives that reduction (asking for another one is an error);
        top-k maps are reduced over the kept channels.
        """
        sample = self._sample(sample)
        if not self.is_spatial:
            raise LayerError(
                f"{self.name} has output shape {self.shape}; only (N, C, H, W) outputs reduce to a 2-D map"
            )
        if not self.has_channels:
            if method != self.reduction:
                raise LayerError(
                    f"{self.name} kept only its {self.reduction!r} reduction, not {method!r}; capture again with reduce={method!r}"
                )
            return self.tensor[sample].detach().float().cpu().numpy()
        return reduce_channels(self.maps_tensor()[sample : sample + 1], method)[0].detach().float().cpu().numpy()

    def cpu(self) -> "FeatureMap":
        """The same entry with its tensor on the CPU."""
        if self.tensor.device.type == "cpu":
            return self
        return FeatureMap(**{**self._fields(), "tensor": self.tensor.cpu()})

    def _fields(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    @classmethod
    def _fast(
        cls, name, module, kind, type, index, call, shape, tensor, reduction=None, channels=None, stats=None
    ) -> "FeatureMap":
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
            hint = (
                f"; did you mean {', '.join(close)}?" if close else f"; captured: {', '.join(list(self._index)[:8])}..."
            )
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
        """Shape, min, max, mean, std, zero fraction and dead-channel fraction of every entry; for a
        batch of several images, one row per entry and image (:meth:`LayerStats.per_image`)."""
        return StatsTable([row for e in self.entries for row in e.stats.per_image()])

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
