"""The portraits of one layer of a model: :func:`portrait`, through featuremaps' capture engine.

The core (:func:`featuremaps.portrait.optimize.optimize`) is handed :func:`capture_forward` as its network:
every step is one :func:`featuremaps.capture.capture_for_grad` pass, so the gradients flow through the same
capture machinery as every other featuremaps capture (the layer's output kept in the graph while the
model goes on with a clone of it, so an in-place ReLU cannot change it; every hook removed and every
``training`` flag restored in ``finally``; nothing after the layer runs once the model has been seen
at that input shape). The model's parameters get no ``.grad`` and keep their ``requires_grad``.

Before any optimization, one batch-1 pass without gradients (:func:`featuremaps.capture.list_layers`)
gives the layer's output shape, so a channel out of range or a layer without channel maps fails at
once. Channels are optimized in batches of ``batch_size`` images; every image follows its own path
whatever its batch (see the core), so the batching changes the time, never the portraits.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from featuremaps.capture import capture, capture_for_grad, list_layers
from featuremaps.errors import FeatureMapsError
from featuremaps.images import describe_source
from featuremaps.layers import entry_of, layer_selector, select_layers
from featuremaps.models import Model, input_channels, module_device, unwrap_model
from featuremaps.options import parse_channels
from featuremaps.portrait.errors import PortraitError
from featuremaps.portrait.optimize import (
    DEFAULT_DIVERSITY_WEIGHT,
    Objective,
    PortraitResult,
    check_channels,
    check_settings,
    optimize,
    portrait_grid,
    to_pil,
)
from featuremaps.portrait.settings import DEFAULT_BATCH, budget_settings, check_objective
from featuremaps.portrait.transforms import STANDARD_TRANSFORMS, Transform, apply_transforms
from featuremaps.preprocess import Preprocessing


@dataclass(frozen=True, eq=False)
class Portraits:
    """The portraits of some channels of one layer, with what made them.

    Attributes:
        model, weights, pretrained: the model's name and weights identity (as in captures).
        layer: the capture point (a ``named_modules()`` path, ``path#k`` for a module's k-th call).
        channels: the channels, in the order of :attr:`images` (ranked, strongest first, for ``topK``).
        images: one RGB PIL image per portrait, channel-major (``diversity`` images per channel).
        grid: every portrait tiled, its channel number below it.
        values: each portrait's final objective (the channel's mean, or its centre value), without transforms.
        start_values: each portrait's objective at the first step (the grey start, under that step's transforms).
        result: the core's :class:`~featuremaps.portrait.optimize.PortraitResult` (float images, history).
        input_size: ``(H, W)`` of what the network saw each step (the portrait padded, jittered...).
        normalization: ``(mean, std)`` applied to the portraits before the network (the model's own).
        device: where the optimization ran.
        budget: ``cpu`` or ``full`` (see :mod:`featuremaps.portrait.settings`).
        batch_size: images per optimization batch.
        selected_by: for ``channels="topK"``: ``{"image": ..., "k": K, "channel_means": {channel: mean}}``.
    """

    model: str
    weights: str
    pretrained: bool
    layer: str
    channels: tuple[int, ...]
    images: tuple[Image.Image, ...] = field(repr=False)
    grid: Image.Image = field(repr=False)
    values: tuple[float, ...] = field(repr=False)
    start_values: tuple[float, ...] = field(repr=False)
    result: PortraitResult = field(repr=False)
    input_size: tuple[int, int] = (0, 0)
    normalization: tuple[tuple[float, ...], tuple[float, ...]] = ((), ())
    device: str = "cpu"
    budget: str = "full"
    batch_size: int = DEFAULT_BATCH
    selected_by: Mapping[str, Any] | None = None

    # -- the options used, from the core's result ------------------------------------------------
    @property
    def size(self) -> int:
        return self.result.size

    @property
    def steps(self) -> int:
        return self.result.steps

    @property
    def seed(self) -> int:
        return self.result.seed

    @property
    def objective(self) -> str:
        return self.result.objective

    @property
    def diversity(self) -> int:
        return self.result.diversity

    @property
    def lr(self) -> float:
        return self.result.lr

    @property
    def seconds(self) -> float:
        return self.result.seconds

    # -- one channel ----------------------------------------------------------------------------
    def _position(self, channel: int, index: int) -> int:
        if channel not in self.channels:
            raise PortraitError(f"channel {channel!r} has no portrait here: choose one of {list(self.channels)}")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.diversity:
            raise PortraitError(f"index must be 0..{self.diversity - 1} (diversity {self.diversity}), got {index!r}")
        return self.channels.index(channel) * self.diversity + index

    def image(self, channel: int, index: int = 0) -> Image.Image:
        """The portrait of ``channel`` (its ``index``-th with diversity) as a PIL image."""
        return self.images[self._position(channel, index)]

    def value(self, channel: int, index: int = 0) -> float:
        """The final objective of that portrait."""
        return self.values[self._position(channel, index)]

    # -- output -------------------------------------------------------------------------------------
    def save(self, folder, *, overwrite: bool = False):
        """Write the portraits folder (see :func:`featuremaps.portrait.folder.save_portraits`); returns its path."""
        from featuremaps.portrait.folder import save_portraits

        return save_portraits(self, folder, overwrite=overwrite)

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.grid.save(buf, format="PNG")
        return buf.getvalue()

    def __repr__(self) -> str:
        more = f", diversity {self.diversity}" if self.diversity > 1 else ""
        return (
            f"Portraits({self.model} {self.layer}: {len(self.channels)} channels, {self.size} px, {self.steps} steps, "
            f"seed {self.seed}, {self.objective} objective{more})"
        )


# -- the network, through the capture engine -----------------------------------------------------
def capture_forward(model: Model | nn.Module, layer: str) -> Callable[[Tensor], Tensor]:
    """The ``forward`` of :func:`~featuremaps.portrait.optimize.optimize` for one capture point of ``model``:
    one :func:`~featuremaps.capture.capture_for_grad` pass per call (the layer's output in the graph, the
    pass stopped after it), returning that output. ``layer`` is one entry name (``path`` or ``path#k``;
    for a module called several times ``path`` is its first call, as in captures)."""

    selection = layer_selector(layer)  # that call alone: the pass stops right after it

    def forward(x: Tensor) -> Tensor:
        grabbed = capture_for_grad(model, x, layers=selection, stop_early=True)
        out = grabbed.outputs.get(layer)
        if out is None:
            raise PortraitError(
                f"{layer} returned no tensor in this pass; choose a layer from `featuremaps layers MODEL`"
            )
        return out

    return forward


def resolve_layer(module: nn.Module, layer: Any) -> str:
    """The one entry name that ``layer`` selects."""
    if not isinstance(layer, str) or not layer.strip():
        raise PortraitError(f"layer must be the name of one layer, such as 'features.28', got {layer!r}")
    names = select_layers(module, layer.strip())
    if len(names) != 1:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise PortraitError(
            f"a portrait is of one layer, and {layer!r} selects {len(names)} ({shown}); give one name, e.g. {names[-1]}"
        )
    return entry_of(names[0])


def model_preprocessing(model: Model | nn.Module) -> Preprocessing:
    module, info = unwrap_model(model)
    return info.preprocessing if info is not None else Preprocessing.for_channels(input_channels(module))


def normalizer(pre: Preprocessing, device: torch.device) -> Callable[[Tensor], Tensor]:
    """The model's own normalization of an RGB batch in [0, 1] (to grey first for a one-channel model)."""
    mean = torch.tensor(pre.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    if pre.channels == 3 and mean.shape[1] == 3:
        return lambda x: (x - mean) / std
    if pre.channels == 1:
        return lambda x: (x.mean(dim=1, keepdim=True) - mean) / std
    raise PortraitError(
        f"this model's first layer takes {pre.channels} input channels; portraits are RGB (3) or grayscale (1) pictures"
    )


def network_input_size(size: int, transforms: Sequence[Transform]) -> tuple[int, int]:
    """``(H, W)`` of what the network sees for a ``size`` px portrait after ``transforms``."""
    probe = apply_transforms(torch.zeros(1, 3, size, size), transforms, [torch.Generator().manual_seed(0)])
    return int(probe.shape[-2]), int(probe.shape[-1])


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:160] + "...") if len(text) > 160 else (text or type(exc).__name__)


def layer_output_shape(model: Model | nn.Module, layer: str, input_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The ``(N, C, H, W)`` output of ``layer`` for one input of ``input_size``.

    A model on the meta device (:func:`featuremaps.models.skeleton`) answers through
    :func:`~featuremaps.capture.list_layers` without computing; a real one through one batch-1
    :func:`~featuremaps.capture.capture` of a grey input, which keeps per-channel numbers only and, like
    every capture, stops after the layer once the model has been seen at that shape.

    Raises:
        PortraitError: the layer is not called, returns no channel maps, or the model cannot run at that size.
        ModelError: ``input_size`` is under the model's minimum input size.
    """
    module, _ = unwrap_model(model)
    pre = model_preprocessing(model)
    pre.with_size(input_size)  # under the model's minimum size: a ModelError that says so
    shape: tuple[int, ...] | None
    try:
        if module_device(module).type == "meta":
            rows = [r for r in list_layers(model, layers=layer_selector(layer), size=input_size) if r.called]
            called, shape = bool(rows), (rows[0].output_shape if rows else None)
        else:
            probe = torch.zeros(1, pre.channels, *input_size, device=module_device(module))
            maps = capture(model, probe, layers=layer_selector(layer), reduce="channel-stats")
            called = layer in maps
            shape = maps[layer].shape if called else None
            if called and (getattr(maps[layer], "spatial", None) is not None or getattr(maps[layer], "layout", None)):
                raise PortraitError(
                    f"{layer} holds tokens or channels-last maps (a transformer's); portraits take a layer whose "
                    "output is (N, C, H, W): choose a convolutional layer"
                )
    except FeatureMapsError:
        raise
    except (RuntimeError, AssertionError, ValueError, TypeError, IndexError) as exc:
        h, w = input_size
        raise PortraitError(
            f"the model cannot run on a {h}x{w} input ({_first_line(exc)}); choose another portrait size"
        ) from exc
    if not called:
        raise PortraitError(f"{layer} is not called in a forward pass; choose a layer from `featuremaps layers MODEL`")
    if shape is None or len(shape) != 4:
        got = "no tensor" if shape is None else f"shape {'x'.join(map(str, shape))}"
        raise PortraitError(
            f"{layer} returns {got}, not channel maps (N, C, H, W); choose a convolutional layer "
            "(`featuremaps layers MODEL` lists each layer's output shape)"
        )
    return shape  # type: ignore[return-value]


def _spec(channels: Any) -> dict[str, Any]:
    """``channels`` -> ``{}`` (all), ``{"top_k": k}`` or ``{"channels": [...]}``."""
    if channels is None:
        return {}
    if isinstance(channels, str):
        return parse_channels(channels)  # an OptionError for a spec it cannot read
    return {"channels": list(check_channels(channels))}


def check_portrait(
    model: Model | nn.Module,
    layer: str,
    *,
    channels: Sequence[int] | str | None = None,
    image: Any = None,
    size: int = 128,
    transforms: Sequence[Transform] = STANDARD_TRANSFORMS,
) -> tuple[str, int]:
    """Refuse, before any work, a portrait that would fail later; ``model`` may be a
    :func:`featuremaps.models.skeleton` (the CLI checks before it loads weights).

    Returns:
        ``(layer entry name, number of channels of the layer)``.

    Raises:
        LayerError: ``layer`` names no layer (with the closest names).
        PortraitError: the layer selects several or gives no channel maps; channels out of range or
            unreadable; ``image`` given without ``channels="topK"`` or missing with it; a portrait under the
            model's minimum input size, or a size at which the model cannot run.
    """
    module, _ = unwrap_model(model)
    name = resolve_layer(module, layer)
    spec = _spec(channels)
    if "top_k" in spec and image is None:
        raise PortraitError(f"channels={channels!r} ranks the channels on an image: give one (image=, --image chelsea)")
    if "top_k" not in spec and image is not None:
        raise PortraitError("an image only chooses the channels, with channels='top16'; drop the image or use topK")
    normalizer(model_preprocessing(model), torch.device("cpu"))
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise PortraitError(f"size must be an integer >= 8 pixels, got {size!r}")
    # the network sees the transformed portrait each step, and the portrait itself once at the end
    seen = network_input_size(size, transforms)
    (low_h, low_w), (dh, dw) = model_preprocessing(model).min_size, (seen[0] - size, seen[1] - size)
    if min(size, seen[0]) < low_h or min(size, seen[1]) < low_w:
        least = max(low_h, low_w, low_h - dh, low_w - dw)
        raise PortraitError(
            f"a {size} px portrait is under this model's minimum input of {low_h}x{low_w} (the network sees it at "
            f"{size}x{size} and {seen[0]}x{seen[1]}); use size {least} or more (--size {least})"
        )
    shape = layer_output_shape(model, name, seen)
    if seen != (size, size):
        layer_output_shape(model, name, (size, size))
    width = shape[1]
    asked = spec.get("channels")
    if asked and max(asked) >= width:
        raise PortraitError(f"channel {max(asked)} is out of range: {name} has {width} channels (0..{width - 1})")
    if spec.get("top_k", 0) > width:
        raise PortraitError(
            f"top{spec['top_k']} asks for more channels than {name} has ({width}); use top{width} or fewer"
        )
    return name, width


def top_channels(model: Model | nn.Module, layer: str, image: Any, k: int) -> tuple[list[int], list[float]]:
    """The ``k`` channels of ``layer`` that ``image`` excites most (highest mean of the channel's map, the
    portrait's ``channel`` objective), strongest first (ties: the lower channel), and their means.

    One capture of ``image`` at the model's own input size, keeping per-channel numbers only.
    """
    maps = capture(model, image, layers=layer, reduce="channel-stats")
    entry = maps[layer]
    means = entry.tensor[0, :, 1].detach().to("cpu", torch.float64)
    order = sorted(range(means.numel()), key=lambda c: (-float(means[c]), c))[:k]
    return order, [float(means[c]) for c in order]


def _merge(results: list[PortraitResult]) -> PortraitResult:
    """The results of consecutive batches as one (images, values and history side by side)."""
    if len(results) == 1:
        return results[0]
    first = results[0]
    diversity = None
    if first.diversity_history is not None:
        diversity = torch.stack([r.diversity_history for r in results]).sum(dim=0)  # type: ignore[misc]
    return dataclasses.replace(
        first,
        images=torch.cat([r.images for r in results]),
        channels=tuple(c for r in results for c in r.channels),
        values=torch.cat([r.values for r in results]),
        history=torch.cat([r.history for r in results], dim=1),
        diversity_history=diversity,
        seconds=sum(r.seconds for r in results),
    )


def _batch_progress(progress: Callable[[int, int], None] | None, done: int, total: int):
    """The core's ``progress(step, steps)`` of one batch as ``progress(done + step, total)`` over all batches."""
    if progress is None:
        return None
    return lambda step, _steps: progress(done + step, total)


def _device(module: nn.Module, device: str | torch.device | None) -> torch.device:
    here = module_device(module)
    if device is None:
        return here
    try:
        wanted = torch.device(device)
    except (RuntimeError, TypeError):
        raise PortraitError(f"device {device!r} is not a torch device: use 'cpu', 'cuda' or 'cuda:1'") from None
    same = wanted.type == here.type and (wanted.index is None or wanted.index == (here.index or 0))
    if not same:
        raise PortraitError(
            f"the model is on {here}, not {wanted}: load it there (fm.load_model(..., device={str(wanted)!r})) "
            "or leave device=None"
        )
    return here


def portrait(
    model: Model | nn.Module,
    layer: str,
    channels: Sequence[int] | str | None = None,
    *,
    image: Any = None,
    size: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    objective: Objective = "channel",
    diversity: int = 1,
    diversity_weight: float = DEFAULT_DIVERSITY_WEIGHT,
    lr: float = 0.05,
    budget: str = "auto",
    device: str | torch.device | None = None,
    batch_size: int = DEFAULT_BATCH,
    transforms: Sequence[Transform] = STANDARD_TRANSFORMS,
    decay: float = 1.0,
    progress: Callable[[int, int], None] | None = None,
) -> Portraits:
    """The image that excites each channel of ``layer`` most, by gradient ascent through featuremaps' capture.

    Args:
        model: a :class:`~featuremaps.models.Model` (its preprocessing's mean and std normalize the
            portraits) or any ``nn.Module`` (ImageNet normalization). It is left exactly as it was.
        layer: one capture point: a ``named_modules()`` path (``"features.28"``, ``"layer3.2"``) or ``path#k``.
        channels: channel numbers (``range(32)``), a spec (``"0-63"``, ``"3,7,9"``, ``"all"``), ``"top16"``
            (the 16 channels ``image`` excites most, strongest first), or None: every channel of the layer.
        image: for ``"topK"``: anything :func:`~featuremaps.images.load_image` takes (``"sample:chelsea"``).
        size, steps: the portrait's side in pixels and Adam's steps; None: the budget's.
        seed: seeds each image's start and transforms (with its channel): the same seed, the same portraits.
        objective: ``"channel"`` (the mean of the channel's map) or ``"neuron"`` (its centre value).
        diversity: images per channel, pushed apart by a Gram-matrix diversity term of ``diversity_weight``.
        lr: Adam's learning rate on the Fourier spectrum.
        budget: ``"cpu"`` (64 px, 64 steps), ``"full"`` (128 px, 256 steps), or ``"auto"``: cpu on the CPU.
        device: where to optimize: the model's device (None) or the same device named (``"cuda"``).
        batch_size: images optimized together; more costs more memory, never changes a portrait.
        transforms, decay: the robustness transforms and the Fourier scaling exponent (see the core).
        progress: called as ``progress(done, total)`` after each step of each batch.

    Returns:
        :class:`Portraits`.

    Raises:
        LayerError: no such layer. PortraitError: an option, a channel out of range, a layer without
        channel maps, a model on another device. ModelError / ImageError: the image for ``topK``.
    """
    try:
        module, info = unwrap_model(model)
    except TypeError as exc:
        raise PortraitError(str(exc)) from None
    dev = _device(module, device)
    budget_name, size, steps = budget_settings(budget, dev.type, size, steps)
    check_objective(objective)
    check_settings(size, steps, lr, objective, diversity, diversity_weight, seed, transforms)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PortraitError(f"batch_size must be an integer >= 1 (images per optimization batch), got {batch_size!r}")
    name, width = check_portrait(model, layer, channels=channels, image=image, size=size, transforms=transforms)
    spec = _spec(channels)
    selected_by = None
    if "top_k" in spec:
        chans, means = top_channels(model, name, image, spec["top_k"])
        selected_by = {
            "image": describe_source(image),
            "k": spec["top_k"],
            "channel_means": {str(c): m for c, m in zip(chans, means)},
        }
    else:
        chans = spec.get("channels") or list(range(width))
    pre = model_preprocessing(model)
    normalize = normalizer(pre, dev)
    forward = capture_forward(model, name)
    per_batch = max(1, batch_size // diversity)
    batches = [chans[i : i + per_batch] for i in range(0, len(chans), per_batch)]
    options = {
        "size": size, "steps": steps, "lr": lr, "objective": objective, "diversity": diversity,
        "diversity_weight": diversity_weight, "seed": seed, "device": dev, "transforms": transforms,
        "normalize": normalize, "decay": decay,
    }  # fmt: skip
    results = []
    for b, batch in enumerate(batches):
        done = _batch_progress(progress, b * steps, steps * len(batches))
        results.append(optimize(forward, batch, progress=done, **options))
    result = _merge(results)
    return Portraits(
        model=info.name if info else type(module).__name__,
        weights=info.weights if info else "as given",
        pretrained=info.pretrained if info else False,
        layer=name,
        channels=result.channels,
        images=tuple(to_pil(result)),
        grid=portrait_grid(result),
        values=tuple(float(v) for v in result.values.tolist()),
        start_values=tuple(float(v) for v in result.history[0].tolist()),
        result=result,
        input_size=network_input_size(size, transforms),
        normalization=(tuple(float(v) for v in pre.mean), tuple(float(v) for v in pre.std)),
        device=str(dev),
        budget=budget_name,
        batch_size=batch_size,
        selected_by=selected_by,
    )
