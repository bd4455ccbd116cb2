"""Channel portraits: the input image that excites a channel most, by gradient ascent (as Lucid did).

All requested channels are optimized as one batch: image i maximizes channel ``channels[i]`` of the layer
that ``forward`` returns. The loss is a *sum* over images of terms that each depend on one image only (or,
with diversity, on the images of one channel), and Adam's update is per parameter element, so every image
follows exactly the path it would follow alone: a layer's portraits cost about one channel's on a GPU.
Random state is per image too (initial spectrum and transforms, each from a generator seeded by
``(seed, channel, diversity index)``), so for a fixed seed the portrait of channel 7 is the same whether it
was made alone or together with channel 3 (up to the float rounding of a batched convolution; on this
CPU build it is bit for bit). On CUDA, ``grid_sample``'s backward adds with atomics, so two runs agree to
float tolerance rather than bit for bit.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from featuremaps.portrait.errors import PortraitError
from featuremaps.portrait.param import FourierImage
from featuremaps.portrait.transforms import STANDARD_TRANSFORMS, Transform, apply_transforms

Objective = Literal["channel", "neuron"]

#: Lucid's weight (``channel - 1e2 * diversity``); see :func:`optimize` for why it carries over as is.
DEFAULT_DIVERSITY_WEIGHT = 100.0


@dataclass(frozen=True, eq=False)
class PortraitResult:
    """The portraits of some channels of one layer.

    Attributes:
        images: ``(B, 3, size, size)`` float32 on the CPU, in [0, 1]; ``B = len(channels) * diversity``,
            channel-major: images ``i * diversity .. (i + 1) * diversity - 1`` belong to ``channels[i]``.
        channels: the requested channels, in order.
        values: ``(B,)`` the objective of each final image, evaluated once more without transforms.
        history: ``(steps, B)`` the objective of each image at the start of each step (under that step's
            random transforms); ``history[0]`` is the initial image's.
        diversity_history: ``(steps,)`` the diversity penalty (summed pairwise Gram cosine similarity over
            all channels) per step, or ``None`` when ``diversity == 1``.
        objective, diversity, seed, steps, size, lr: the options used.
        seconds: wall-clock time of the optimization loop.
    """

    images: Tensor
    channels: tuple[int, ...]
    values: Tensor
    history: Tensor
    diversity_history: Tensor | None
    objective: str
    diversity: int
    seed: int
    steps: int
    size: int
    lr: float
    seconds: float

    @property
    def image_channels(self) -> tuple[int, ...]:
        """The channel of each image (length ``B``)."""
        return tuple(c for c in self.channels for _ in range(self.diversity))

    @property
    def mean_history(self) -> Tensor:
        """``(steps,)`` the objective per step, averaged over the images."""
        return self.history.mean(dim=1)

    def channel_values(self, channel: int) -> Tensor:
        """``(diversity,)`` the final objective of the images of ``channel``."""
        if channel not in self.channels:
            raise PortraitError(f"channel {channel} has no portrait here: choose one of {list(self.channels)}")
        i = self.channels.index(channel)
        return self.values[i * self.diversity : (i + 1) * self.diversity]


def image_seed(seed: int, channel: int, index: int, stream: str) -> int:
    """A 63-bit seed for one image's random ``stream`` ("init" or "transforms"), stable across processes."""
    text = f"featuremaps.portrait:{stream}:{seed}:{channel}:{index}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & (2**63 - 1)


def _generators(seed: int, image_channels: Sequence[int], diversity: int, stream: str) -> list[torch.Generator]:
    gens = []
    for i, channel in enumerate(image_channels):
        gens.append(torch.Generator(device="cpu").manual_seed(image_seed(seed, channel, i % diversity, stream)))
    return gens


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_channels(channels) -> tuple[int, ...]:
    """``channels`` as a tuple of distinct ints >= 0, or a :class:`PortraitError` that says what to give."""
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence) or not channels:
        raise PortraitError(f"channels must be a non-empty list of channel numbers, got {channels!r}")
    if not all(_is_int(c) and c >= 0 for c in channels):
        raise PortraitError(f"channels must be integers >= 0, got {list(channels)!r}")
    chans = tuple(int(c) for c in channels)
    if len(set(chans)) != len(chans):
        raise PortraitError(f"channels {list(chans)} repeat a channel: list each once, use diversity=k for k images")
    return chans


def check_settings(size, steps, lr, objective, diversity, diversity_weight, seed, transforms) -> None:
    """Raise a :class:`PortraitError` for the first invalid option of :func:`optimize` (channels apart)."""
    if not _is_int(size) or size < 8:
        raise PortraitError(f"size must be an integer >= 8 pixels, got {size!r}")
    if not _is_int(steps) or steps < 1:
        raise PortraitError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
        raise PortraitError(f"lr must be a number > 0, got {lr!r}")
    if objective not in ("channel", "neuron"):
        raise PortraitError(f"objective must be 'channel' or 'neuron', got {objective!r}")
    if not _is_int(diversity) or diversity < 1:
        raise PortraitError(f"diversity must be an integer >= 1 (images per channel), got {diversity!r}")
    if not isinstance(diversity_weight, (int, float)) or not math.isfinite(diversity_weight):
        raise PortraitError(f"diversity_weight must be a finite number, got {diversity_weight!r}")
    if not _is_int(seed):
        raise PortraitError(f"seed must be an integer, got {seed!r}")
    if (
        isinstance(transforms, (str, bytes))
        or not isinstance(transforms, Sequence)
        or not all(callable(t) for t in transforms)
    ):
        raise PortraitError("transforms must be a list of transforms (e.g. Pad(12), Jitter(8)); pass () for none")


def _check_rest(forward, normalize, progress, decay, device) -> torch.device:
    if not callable(forward):
        raise PortraitError(f"forward must be a callable (a module or function), got {type(forward).__name__}")
    for name, value in (("normalize", normalize), ("progress", progress)):
        if value is not None and not callable(value):
            raise PortraitError(f"{name} must be a callable or None, got {type(value).__name__}")
    if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not math.isfinite(decay) or decay < 0:
        raise PortraitError(f"decay must be a number >= 0, got {decay!r}")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise PortraitError(f"device {device!r} is not a torch device: use 'cpu', 'cuda' or 'cuda:1'") from None


def _activation(forward: Callable[[Tensor], Tensor], x: Tensor, *, need_grad: bool) -> Tensor:
    acts = forward(x)
    if not isinstance(acts, Tensor):
        raise PortraitError(f"forward must return a tensor (N, C, h, w), got {type(acts).__name__}")
    if acts.dim() != 4 or acts.shape[0] != x.shape[0]:
        raise PortraitError(
            f"forward returned shape {tuple(acts.shape)} for a batch of {x.shape[0]}: it must return the "
            "layer's activation (N, C, h, w)"
        )
    if need_grad and not acts.requires_grad:
        raise PortraitError("forward returned an activation without gradient: do not detach it or use no_grad")
    return acts


def _objective_values(acts: Tensor, channel_index: Tensor, objective: str) -> Tensor:
    """``(B,)`` the objective of each image: its channel's mean, or its channel at the centre location."""
    rows = torch.arange(acts.shape[0], device=acts.device)
    maps = acts[rows, channel_index]  # (B, h, w)
    if objective == "channel":
        return maps.mean(dim=(1, 2))
    return maps[:, maps.shape[1] // 2, maps.shape[2] // 2]


def gram_similarity(acts: Tensor, diversity: int) -> Tensor:
    """``(groups,)`` the sum over ordered pairs ``i != j`` of images of one channel of the cosine similarity
    of their Gram matrices ``G = A A^T / (h w)`` (``A``: the activation as channels x positions).

    ``acts`` is ``(groups * diversity, C, h, w)``, channel-major as in :class:`PortraitResult`.
    """
    batch, chans, height, width = acts.shape
    flat = acts.reshape(batch, chans, height * width)
    grams = (flat @ flat.transpose(1, 2)) / (height * width)
    grams = grams.reshape(batch // diversity, diversity, chans * chans)
    grams = grams / grams.norm(dim=2, keepdim=True).clamp_min(1e-10)
    cos = grams @ grams.transpose(1, 2)  # (groups, k, k)
    return cos.sum(dim=(1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(dim=1)


def optimize(
    forward: Callable[[Tensor], Tensor],
    channels: Sequence[int],
    *,
    size: int = 128,
    steps: int = 256,
    lr: float = 0.05,
    objective: Objective = "channel",
    diversity: int = 1,
    diversity_weight: float = DEFAULT_DIVERSITY_WEIGHT,
    seed: int = 0,
    device: str | torch.device = "cpu",
    transforms: Sequence[Transform] = STANDARD_TRANSFORMS,
    normalize: Callable[[Tensor], Tensor] | None = None,
    progress: Callable[[int, int], None] | None = None,
    decay: float = 1.0,
) -> PortraitResult:
    """Synthesizes the images that excite ``channels`` of one layer most, all in one batch.

    Each step: the spectra become RGB images (:class:`~featuremaps.portrait.param.FourierImage`), are
    transformed per image (``transforms``), normalized (``normalize``, e.g. the model's mean/std) and passed
    to ``forward``; Adam then ascends ``sum_i objective_i - diversity_weight * sum_channels S_c``, where
    ``S_c`` is :func:`gram_similarity` of the ``diversity`` images of channel ``c``: minus their summed
    pairwise cosine similarity of Gram matrices pushes them to different styles (Lucid's diversity term;
    Lucid maximizes the batch *mean* of the channel minus ``1e2 * S_c / k``, which is this with weight 100,
    divided by ``k``). Only the spectrum's gradient is computed (``torch.autograd.grad``): the network's
    parameters get no ``.grad``.

    Args:
        forward: maps a normalized batch ``(N, 3, s, s)`` to the target layer's activation ``(N, C, h, w)``,
            differentiably. It must treat samples independently (eval mode) for batches to be reproducible.
        channels: distinct channel numbers; image ``i`` maximizes ``channels[i]``.
        size: the portrait's side in pixels (the network sees it padded and jittered).
        steps, lr: Adam's steps and learning rate on the spectrum.
        objective: ``"channel"``, the mean of the channel's map; ``"neuron"``, its value at the centre location.
        diversity: ``k`` images per channel, made different by the diversity term.
        diversity_weight: the weight of the diversity term (activation units per unit of cosine similarity).
        seed: with ``(channel, diversity index)`` it seeds each image's initial spectrum and transforms.
        device: where the images and the optimization live (the device of ``forward``'s network).
        transforms: robustness transforms applied in order each step; ``()`` for none.
        normalize: applied to the transformed [0, 1] images before ``forward``; ``None`` for none.
        progress: called as ``progress(step, steps)`` after each step (``step`` from 1).
        decay: exponent of the Fourier frequency scaling (1: natural-image statistics).

    Returns:
        A :class:`PortraitResult`.

    Raises:
        PortraitError: an option is invalid, a channel is out of the layer's range, or ``forward`` does not
            return a differentiable ``(N, C, h, w)`` activation.
    """
    chans = check_channels(channels)
    check_settings(size, steps, lr, objective, diversity, diversity_weight, seed, transforms)
    device = _check_rest(forward, normalize, progress, decay, device)
    image_channels = [c for c in chans for _ in range(diversity)]
    init_gens = _generators(seed, image_channels, diversity, "init")
    transform_gens = _generators(seed, image_channels, diversity, "transforms")
    param = FourierImage(size, size, decay=decay, device=device)
    spectrum = param.random_spectrum(init_gens).requires_grad_(True)
    optimizer = torch.optim.Adam([spectrum], lr=lr)
    channel_index = torch.tensor(image_channels, device=device)
    history = torch.empty(steps, len(image_channels), device=device)
    diversity_history = torch.empty(steps, device=device) if diversity > 1 else None

    def prepare(images: Tensor) -> Tensor:
        return images if normalize is None else normalize(images)

    start = time.perf_counter()
    for step in range(steps):
        x = prepare(apply_transforms(param(spectrum), transforms, transform_gens))
        acts = _activation(forward, x, need_grad=True)
        if step == 0 and max(chans) >= acts.shape[1]:
            raise PortraitError(
                f"channel {max(chans)} is out of range: the layer has {acts.shape[1]} channels (0..{acts.shape[1] - 1})"
            )
        values = _objective_values(acts, channel_index, objective)
        loss = -values.sum()
        if diversity_history is not None:
            similarity = gram_similarity(acts, diversity).sum()
            loss = loss + diversity_weight * similarity
            diversity_history[step] = similarity.detach()
        (grad,) = torch.autograd.grad(loss, [spectrum])
        spectrum.grad = grad
        optimizer.step()
        history[step] = values.detach()
        if progress is not None:
            progress(step + 1, steps)
    seconds = time.perf_counter() - start

    with torch.no_grad():
        images = param(spectrum)
        final = _objective_values(_activation(forward, prepare(images), need_grad=False), channel_index, objective)
    return PortraitResult(
        images=images.detach().to("cpu", torch.float32).clamp(0.0, 1.0),
        channels=chans,
        values=final.detach().cpu(),
        history=history.cpu(),
        diversity_history=None if diversity_history is None else diversity_history.cpu(),
        objective=objective,
        diversity=diversity,
        seed=int(seed),
        steps=steps,
        size=size,
        lr=float(lr),
        seconds=seconds,
    )


def _labels(result: PortraitResult) -> list[str]:
    if result.diversity == 1:
        return [str(c) for c in result.channels]
    return [f"{c} #{j + 1}" for c in result.channels for j in range(result.diversity)]


def to_pil(result: PortraitResult) -> list[Image.Image]:
    """The portraits as RGB PIL images, in the order of ``result.images``."""
    pixels = (result.images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]


def portrait_grid(result: PortraitResult, columns: int | None = None) -> Image.Image:
    """The portraits tiled on a white sheet, each with its channel number (``"7 #2"`` with diversity) below.

    Args:
        result: what :func:`optimize` returned.
        columns: tiles per row; default one row per channel with diversity, else a near-square grid.
    """
    tiles, labels = to_pil(result), _labels(result)
    if columns is None:
        columns = result.diversity if result.diversity > 1 else math.ceil(math.sqrt(len(tiles)))
    if not _is_int(columns) or columns < 1:
        raise PortraitError(f"columns must be an integer >= 1, got {columns!r}")
    columns = min(int(columns), len(tiles))
    rows = math.ceil(len(tiles) / columns)
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, top, _, bottom = probe.textbbox((0, 0), "0123456789#", font=font)
    gap, label_h = 4, bottom - top + 6
    side = result.size
    sheet = Image.new("RGB", (columns * (side + gap) + gap, rows * (side + label_h + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (tile, label) in enumerate(zip(tiles, labels)):
        x = gap + (k % columns) * (side + gap)
        y = gap + (k // columns) * (side + label_h + gap)
        sheet.paste(tile, (x, y))
        x0, y0, x1, _ = draw.textbbox((0, 0), label, font=font)
        draw.text((x + (side - (x1 - x0)) // 2 - x0, y + side + 3 - y0), label, fill="black", font=font)
    return sheet
