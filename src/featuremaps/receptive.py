"""Receptive fields of CNN layers: which input pixels each output position of a layer can see.

:func:`receptive_fields` measures, for any model (plain stacks, ResNets, DenseNets, models with
branches and functional calls in ``forward``), the theoretical receptive field of layers whose
outputs are ``(N, C, H, W)`` maps; :func:`crop_box` turns one output position into the box of
input pixels it sees, optionally mapped onto the original picture the model's input was resized
from. The channel atlas crops its top activations with these boxes.

How it is measured. The model is run on a *linearised* deep copy: every parameter is replaced by a
constant (biases 0, everything else 1), every 2-D convolution and linear layer averages its inputs
with one positive weight, every norm (batch, layer, group, instance...), dropout and ReLU-like
activation (ReLU, ReLU6, GELU, SiLU, clamp...) is the identity, and every max pool is an average
pool of the same kernel, stride, padding, dilation and ceil mode. This is done by intercepting the
functional calls (a :class:`torch.overrides.TorchFunctionMode`), so functional calls inside a
``forward()`` are linearised as well as modules. The result is a network with only positive
weights and no cancellations: an output position depends on an input pixel exactly when a path of
non-zero weights joins them, so the support of the gradient of one output position with respect to
the input *is* its receptive field, with no rounding fuzz (float64, all terms positive).

For each layer the gradients of a few output positions are read (a batch of identical inputs, one
position per batch item, one backward pass per layer). The supports, clipped where they meet the
image borders, give per axis the stride (shift of an unclipped edge between positions), the size and
the offset (input coordinate of the centre of output position 0). When the receptive field is too
large to show an unclipped edge on the given input (ResNet-50's ``layer4`` sees 427 px of a
224 px input), the measurement is repeated on a larger canvas whose margin is a multiple of the
layer's stride, so that the canvas's output grid is the input's grid shifted by whole positions.
Every answer is checked against the clipped supports measured at the real input size; a layer whose
output positions are not evenly spaced in the input raises :class:`ReceptiveFieldError`.

Speed: channels never matter for geometry, so a convolution averages over channels and hands on one
map broadcast (``expand``) over its output channels; whole forward and backward passes then cost
about as much as one channel. A model whose in-place arithmetic cannot run on such broadcast maps
is measured again with full-size maps (same numbers, slower). VGG16's 13 conv layers at 224 x 224
take about 0.2 s on two CPU cores; results are cached per model object, structure and input size.

Global context (squeeze-and-excitation gates, global pooling, attention over all positions) makes a
receptive field the whole image, which is the truth; ``ignore_global=True`` treats global poolings
over both spatial axes as constants, which gives the local (convolutional) receptive field.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import itertools
import math
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .errors import FeatureMapsError

__all__ = [
    "ReceptiveField",
    "ReceptiveFieldError",
    "ReceptiveFieldLayerError",
    "crop_box",
    "receptive_fields",
]


class ReceptiveFieldError(FeatureMapsError, ValueError):
    """A receptive field cannot be measured or used (bad input size, uneven geometry...)."""


class ReceptiveFieldLayerError(ReceptiveFieldError, KeyError):
    """A layer name does not exist, does not run, or does not output an (N, C, H, W) map."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ReceptiveField:
    """The receptive field of one layer's output positions, per axis ``(y, x)``, in input pixels.

    Attributes:
        layer: the ``named_modules()`` path.
        input_size: ``(H, W)`` of the model's input this was measured for.
        size: extent of one position's (theoretical, unclipped) receptive field.
        stride: input pixels between neighbouring output positions.
        offset: input coordinate of the centre of output position 0 (pixel ``i`` has its centre at
            ``i``); fractional or negative with padding and even pooling windows.
        output_size: ``(H, W)`` of the layer's output at this input size.
    """

    layer: str
    input_size: tuple[int, int]
    size: tuple[int, int]
    stride: tuple[float, float]
    offset: tuple[float, float]
    output_size: tuple[int, int]


# -- public API ------------------------------------------------------------------------------------
def receptive_fields(
    model: nn.Module,
    input_size: tuple[int, int],
    layers: Sequence[str],
    *,
    in_channels: int | None = None,
    ignore_global: bool = False,
) -> dict[str, ReceptiveField]:
    """The receptive field of each of ``layers`` when ``model`` sees an ``input_size`` picture.

    Args:
        model: any ``nn.Module`` (or a featuremaps ``Model``); it is not modified (the measurement
            runs on a linearised copy that shares no tensor with it).
        input_size: ``(H, W)`` of the model's input.
        layers: ``named_modules()`` paths whose outputs are ``(N, C, H, W)``; a single name works too.
        in_channels: channels of the input (default: the first convolution's ``in_channels``, or 3).
        ignore_global: treat global poolings (over both spatial axes) as constants, see the module doc.

    Returns:
        ``{layer: ReceptiveField}`` in the order of ``layers``.

    Raises:
        ReceptiveFieldLayerError: a name does not exist, its module does not run, or its output is
            not an (N, C, H, W) tensor.
        ReceptiveFieldError: a bad ``input_size``, a model that fails at that size, or a layer whose
            geometry is not a regular grid.
    """
    module = _unwrap(model)
    size = _check_size(input_size)
    names = _check_layers(module, layers)
    if in_channels is None:
        in_channels = _first_conv_channels(module)
    elif not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ReceptiveFieldError(f"in_channels must be a positive int, not {in_channels!r}")

    key_extra = (size, in_channels, bool(ignore_global))
    signature = _signature(module)
    with _CACHE_LOCK:
        entry = _CACHE.get(module)
        if entry is None or entry[0] != signature:
            entry = (signature, {})
            _CACHE[module] = entry
        known = entry[1]
        missing = [n for n in names if (n, *key_extra) not in known]
    if missing:
        with _one_thread():
            found = _measure(module, missing, size, in_channels, ignore_global=bool(ignore_global))
        with _CACHE_LOCK:
            known.update({(n, *key_extra): rf for n, rf in found.items()})
    return {n: known[(n, *key_extra)] for n in names}


def crop_box(
    rf: ReceptiveField, y: int, x: int, *, source_size: tuple[int, int] | None = None
) -> tuple[int, int, int, int]:
    """``(top, left, bottom, right)`` (bottom/right exclusive) of what output position ``(y, x)`` sees.

    The box is clipped at the borders of the model's input; with ``source_size=(H0, W0)`` it is
    mapped onto the original picture, which the model saw resized (whole, no crop) to
    ``rf.input_size``, and clipped there.

    Raises:
        ReceptiveFieldError: ``(y, x)`` outside the layer's output, or a bad ``source_size``.
    """
    for name, value, limit in (("y", y, rf.output_size[0]), ("x", x, rf.output_size[1])):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < limit:
            raise ReceptiveFieldError(
                f"{name}={value!r} is outside layer {rf.layer!r}'s output of size {rf.output_size}; "
                f"pass 0 <= {name} < {limit}"
            )
    top, bottom = _span(rf.offset[0] + y * rf.stride[0], rf.size[0], rf.input_size[0])
    left, right = _span(rf.offset[1] + x * rf.stride[1], rf.size[1], rf.input_size[1])
    if source_size is None:
        return top, left, bottom, right
    h0, w0 = _check_size(source_size, what="source_size")
    sy, sx = h0 / rf.input_size[0], w0 / rf.input_size[1]
    top, bottom = _scale(top, bottom, sy, h0)
    left, right = _scale(left, right, sx, w0)
    return top, left, bottom, right


def _span(centre: float, size: int, limit: int) -> tuple[int, int]:
    """Pixels ``[start, stop)`` of a receptive field of ``size`` centred at ``centre``, clipped."""
    lo = _snap(centre - (size - 1) / 2, math.floor)
    hi = _snap(centre + (size - 1) / 2, math.ceil) + 1
    lo, hi = min(max(lo, 0), limit), min(max(hi, 0), limit)
    return lo, max(lo, hi)


def _scale(lo: int, hi: int, factor: float, limit: int) -> tuple[int, int]:
    """Input-pixel edges ``[lo, hi)`` -> the source pixels they cover (resize without crop)."""
    a = min(max(_snap(lo * factor, math.floor), 0), limit)
    b = min(max(_snap(hi * factor, math.ceil), 0), limit)
    return a, max(a, b)


def _snap(value: float, rounding: Callable[[float], int]) -> int:
    near = round(value)
    return int(near) if abs(value - near) < 1e-6 else int(rounding(value))


# -- argument checks -------------------------------------------------------------------------------
def _unwrap(model: Any) -> nn.Module:
    if isinstance(model, nn.Module):
        module = model
    elif isinstance(getattr(model, "module", None), nn.Module):  # a featuremaps Model
        module = model.module
    else:
        raise ReceptiveFieldError(f"receptive_fields needs a torch.nn.Module, not {type(model).__name__}")
    if isinstance(module, torch.jit.ScriptModule):
        raise ReceptiveFieldError(
            "receptive fields cannot be measured on a TorchScript module; pass the Python nn.Module"
        )
    return module


def _check_size(value: Any, *, what: str = "input_size") -> tuple[int, int]:
    ok = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    )
    if not ok:
        raise ReceptiveFieldError(f"{what} must be (height, width) in pixels, two positive ints, not {value!r}")
    return int(value[0]), int(value[1])


def _check_layers(module: nn.Module, layers: Sequence[str] | str) -> list[str]:
    if isinstance(layers, str):
        layers = [layers]
    names: list[str] = []
    all_names = [n for n, _ in module.named_modules()]
    for name in layers:
        if not isinstance(name, str):
            raise ReceptiveFieldLayerError(f"layer names must be strings (named_modules() paths), not {name!r}")
        try:
            module.get_submodule(name)
        except AttributeError:
            close = difflib.get_close_matches(name, all_names, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ReceptiveFieldLayerError(
                f"no layer {name!r} in {type(module).__name__}; {hint}"
                "use a named_modules() path (`featuremaps layers MODEL` lists them)"
            ) from None
        if name not in names:
            names.append(name)
    return names


def _first_conv_channels(module: nn.Module) -> int:
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return int(m.in_channels)
    return 3


# -- cache -----------------------------------------------------------------------------------------
_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict]] = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


_THREADS_LOCK = threading.Lock()
_THREADS_USERS = 0
_THREADS_SAVED = 1


@contextlib.contextmanager
def _one_thread():
    """torch's intra-op threads off while measuring: thousands of tiny operations run faster on one
    thread (several times so on a busy machine); the setting is restored when the last caller leaves."""
    global _THREADS_USERS, _THREADS_SAVED
    with _THREADS_LOCK:
        if _THREADS_USERS == 0:
            _THREADS_SAVED = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREADS_USERS += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_USERS -= 1
            if _THREADS_USERS == 0:
                torch.set_num_threads(_THREADS_SAVED)


def _signature(module: nn.Module) -> tuple:
    """The model's structure: a changed submodule (or hyper-parameter) invalidates the cache."""
    return tuple((name, type(m).__module__, type(m).__qualname__, m.extra_repr()) for name, m in module.named_modules())


# -- the linearised copy ---------------------------------------------------------------------------
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _linearised_copy(module: nn.Module) -> nn.Module:
    """A deep copy in eval mode, without the user's hooks, whose parameters are constants.

    The copy shares no tensor with ``module``: parameters become zero-memory constants (``expand``
    of a scalar), buffers float64 CPU copies (placeholders for meta tensors). Nothing of ``module``
    is written.
    """
    memo: dict[int, Any] = {}
    for m in module.modules():
        for attr in _HOOK_DICTS:
            hooks = m.__dict__.get(attr)
            if hooks is not None:
                memo[id(hooks)] = type(hooks)()
    for name, p in module.named_parameters(remove_duplicate=True):
        value = 0.0 if name.rsplit(".", 1)[-1] == "bias" else 1.0
        constant = torch.tensor(value, dtype=torch.float64).expand(p.shape)
        memo[id(p)] = nn.Parameter(constant, requires_grad=False)
    for b in module.buffers():
        dtype = torch.float64 if b.is_floating_point() else b.dtype
        if b.is_meta:
            memo[id(b)] = (
                torch.ones(b.shape, dtype=dtype) if b.is_floating_point() else torch.zeros(b.shape, dtype=dtype)
            )
        else:
            memo[id(b)] = b.detach().to(device="cpu", dtype=dtype, copy=True)
    try:
        clone = copy.deepcopy(module, memo)
    except Exception as e:  # an attribute that cannot be copied (a lock, a file, a generator...)
        raise ReceptiveFieldError(
            f"cannot copy {type(module).__name__} to measure it ({type(e).__name__}: {e}); "
            "pass a model whose attributes can be deep-copied"
        ) from e
    return clone.eval()


class _NeedDense(Exception):
    """The broadcast (one-channel) fast path cannot express an operation: rerun with full maps."""


class _Stop(Exception):
    """Every requested layer has run: the rest of the forward pass is not needed."""


_IDENTITY = frozenset(
    {
        # activations: identity keeps every path (ReLU6 and clamp would cut large values)
        *("relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "elu", "elu_"),
        *("selu", "selu_", "celu", "celu_", "gelu", "silu", "mish", "hardswish", "prelu", "rrelu", "rrelu_"),
        *("threshold", "threshold_", "softplus", "clamp", "clamp_", "clip", "clip_"),
        *("clamp_min", "clamp_min_", "clamp_max", "clamp_max_"),
        # dropout (the copy is in eval mode; functional calls may still say training=True)
        *("dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"),
        # normalisation: per-position statistics would mix every position (group/layer/instance norm)
        *("batch_norm", "instance_norm", "layer_norm", "group_norm", "local_response_norm", "rms_norm"),
        "normalize",
    }
)
_BINARY = frozenset(
    {"add", "sub", "mul", "div", "true_divide", "rsub"}
    | {"__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__"}
)
_BINARY_INPLACE = frozenset({"add_", "sub_", "mul_", "div_", "true_divide_", "__iadd__", "__isub__", "__imul__"})
_BINARY_INPLACE |= {"__itruediv__"}
_CHANNELWISE = frozenset({"avg_pool2d", "adaptive_avg_pool2d", "interpolate", "pad"})
_GLOBAL_REDUCTIONS = frozenset({"mean", "sum", "amax", "max", "logsumexp", "nanmean"})


def _rep(t: Any) -> Tensor | None:
    """The ``(N, 1, H, W)`` map that ``t`` repeats along its channels, or None.

    Broadcast maps made by the fast path are views ``base.expand(...)``; using their base lets
    gradients meet there (one channel) instead of on full-size tensors.
    """
    if not isinstance(t, Tensor) or t.dim() != 4:
        return None
    if t.shape[1] == 1:
        return t
    if t.stride(1) != 0:
        return None
    base = t._base
    if (
        base is not None
        and base.dim() == 4
        and base.shape[1] == 1
        and base.shape[0] == t.shape[0]
        and base.shape[2:] == t.shape[2:]
        and (t.stride(0), t.stride(2), t.stride(3)) == (base.stride(0), base.stride(2), base.stride(3))
        and t.storage_offset() == base.storage_offset()
    ):
        return base
    if not t.requires_grad:  # a broadcast constant (a parameter of the copy): no gradient to route
        return t.narrow(1, 0, 1)
    return None


def _conv_args(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return input, weight, stride, padding, dilation, groups


def _conv_t_args(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    return input, weight, stride, padding, output_padding, groups, dilation


def _pool_args(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    return input, kernel_size, stride, padding, dilation, ceil_mode, return_indices


def _adaptive_args(input, output_size, return_indices=False):
    return input, output_size, return_indices


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[0])) if len(v) == 1 else (int(v[0]), int(v[1]))
    return int(v), int(v)


class _Lazy:
    """A channel concatenation kept as its pieces: ``placeholder`` stands for it until read."""

    __slots__ = ("counts", "placeholder", "real", "reps")

    def __init__(self, placeholder: Tensor, reps: list[Tensor], counts: list[int]):
        self.placeholder = weakref.ref(placeholder)
        self.reps = reps
        self.counts = counts
        self.real: Tensor | None = None


class _Linearise(TorchFunctionMode):
    """Runs a forward pass as the positive, linear network described in the module doc."""

    def __init__(self, *, collapse: bool, ignore_global: bool):
        super().__init__()
        self.collapse = collapse
        self.ignore_global = ignore_global
        # channel concatenations of broadcast maps (DenseNet, Inception), by id of their placeholder
        self._cats: dict[int, _Lazy] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        first = args[0] if args else None
        if name in _IDENTITY and isinstance(first, Tensor) and first.is_floating_point():
            return first
        if self.ignore_global and self._is_global(name, args, kwargs):
            return func(self._real(first).detach(), *args[1:], **kwargs)
        if name == "conv2d":
            return self._conv(*_conv_args(*args, **kwargs), transposed=False)
        if name == "conv_transpose2d":
            x, w, stride, padding, out_pad, groups, dilation = _conv_t_args(*args, **kwargs)
            return self._conv(x, w, stride, padding, dilation, groups, transposed=True, output_padding=out_pad)
        if name == "linear":
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            return self._linear(self._real(args[0] if args else kwargs["input"]), weight)
        if name in ("max_pool2d", "max_pool2d_with_indices"):
            return self._max_pool(name, args, kwargs)
        if name in ("adaptive_max_pool2d", "adaptive_max_pool2d_with_indices"):
            x, out_size, with_indices = _adaptive_args(*args, **kwargs)
            pooled = self._channelwise(F.adaptive_avg_pool2d, x, out_size)
            if with_indices or name.endswith("_with_indices"):
                return pooled, F.adaptive_max_pool2d(self._real(x).detach(), out_size, return_indices=True)[1]
            return pooled
        if self.collapse:
            if name in ("cat", "concat", "concatenate"):
                out = self._cat(args, kwargs)
                if out is not None:
                    return out
            elif name in _CHANNELWISE and isinstance(first, Tensor) and not (name == "pad" and len(args[1]) > 4):
                return self._channelwise(func, first, *args[1:], **kwargs)
            elif name in _BINARY:
                out = self._binary(func, args, kwargs)
                if out is not None:
                    return out
            elif name in _BINARY_INPLACE:
                out = self._binary_inplace(func, args, kwargs)
                if out is not None:
                    return out
            if self._cats:
                args, kwargs = self._read(func, name, args, kwargs)
        return func(*args, **kwargs)

    # global context
    @staticmethod
    def _is_global(name: str, args: tuple, kwargs: dict) -> bool:
        x = args[0] if args else None
        if not isinstance(x, Tensor) or x.dim() != 4:
            return False
        if name in ("adaptive_avg_pool2d", "adaptive_max_pool2d", "adaptive_max_pool2d_with_indices"):
            out = args[1] if len(args) > 1 else kwargs.get("output_size")
            return out in (1, (1, 1), [1, 1], (1,), [1])
        if name in _GLOBAL_REDUCTIONS:
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if dim is None:
                return True
            dims = {d % 4 for d in (dim if isinstance(dim, (tuple, list)) else [dim]) if isinstance(d, int)}
            return {2, 3} <= dims
        return False

    # lazy concatenations
    def _lazy(self, x: Any) -> _Lazy | None:
        entry = self._cats.get(id(x)) if isinstance(x, Tensor) else None
        return entry if entry is not None and entry.placeholder() is x else None

    def _real(self, x: Any) -> Any:
        """The tensor itself, or the materialised concatenation a placeholder stands for."""
        entry = self._lazy(x)
        if entry is None:
            return x
        if entry.real is None:
            entry.real = _Concat.apply(entry.counts, *entry.reps)
        return entry.real

    def _read(self, func, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Arguments for an operation the fast path does not know: placeholders materialised."""
        if name == "__get__":  # a property: metadata is right on a placeholder, values are not
            attr = getattr(getattr(func, "__self__", None), "__name__", "")
            if attr in _METADATA_PROPERTIES:
                return args, kwargs
        elif name in _METADATA_CALLS:
            return args, kwargs
        target = args[0] if args else None
        writes = name in _BINARY_INPLACE or name == "__setitem__" or (name.endswith("_") and not name.startswith("_"))
        if (writes and self._lazy(target) is not None) or any(self._lazy(v) is not None for v in kwargs.values()):
            raise _NeedDense  # an in-place write to a concatenation, or an out= argument

        def real(v: Any) -> Any:
            if isinstance(v, (list, tuple)):
                return type(v)(real(u) for u in v)
            return self._real(v)

        return tuple(real(a) for a in args), {k: real(v) for k, v in kwargs.items()}

    def _cat(self, args: tuple, kwargs: dict) -> Tensor | None:
        tensors = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if "out" in kwargs or not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int):
            return None
        if any(not isinstance(t, Tensor) or t.dim() != 4 for t in tensors) or dim % 4 != 1:
            return None
        reps, counts = [], []
        for t in tensors:
            entry = self._lazy(t)
            if entry is not None:
                reps += entry.reps
                counts += entry.counts
                continue
            r = self._rep(t)
            if r is None or r.shape[0] != t.shape[0] or r.shape[2:] != t.shape[2:]:
                return None
            reps.append(r)
            counts.append(int(t.shape[1]))
        return self._concat(reps, counts)

    def _concat(self, reps: list[Tensor], counts: list[int]) -> Tensor:
        n, _, h, w = reps[0].shape
        placeholder = _Placeholder.apply((n, sum(counts), h, w), counts, *reps)
        self._cats[id(placeholder)] = _Lazy(placeholder, reps, counts)
        return placeholder

    # one map broadcast over channels, or full maps
    def _rep(self, t: Any) -> Tensor | None:
        return None if self._lazy(t) is not None else _rep(t)

    def _spread(self, y: Tensor, channels: int) -> Tensor:
        """``(N, 1, H, W)`` -> ``(N, channels, H, W)``: a broadcast view, or a full copy."""
        out = y.expand(y.shape[0], channels, *y.shape[2:])
        return out if self.collapse else out.contiguous()

    def _channelwise(self, fn: Callable, x: Tensor, *args, **kwargs):
        """An operation that treats every channel alike, run on one channel when they are equal."""
        entry = self._lazy(x)
        if entry is not None:  # a concatenation: once per piece
            return self._concat([fn(p, *args, **kwargs) for p in entry.reps], entry.counts)
        r = self._rep(x) if self.collapse else None
        if r is not None and x.shape[1] > 1:
            return self._spread(fn(r, *args, **kwargs), x.shape[1])
        return fn(x, *args, **kwargs)

    def _channel_mean(self, x: Tensor, groups: int) -> tuple[Tensor, int]:
        """The mean of each group of channels, ``(N, groups, H, W)``, by the cheapest route."""
        entry = self._lazy(x)
        if entry is not None and groups == 1:
            total = sum(entry.counts)
            return sum(p * (c / total) for p, c in zip(entry.reps, entry.counts)), 1
        x = self._real(x)
        r = _rep(x) if self.collapse else None
        if r is not None:  # all channels equal: every group sees the same map
            return r, 1
        if groups == 1:
            return _ChannelMean.apply(x), 1
        n, c = x.shape[:2]
        return x.reshape(n, groups, c // groups, *x.shape[2:]).mean(2), groups

    def _conv(self, x, weight, stride, padding, dilation, groups, *, transposed, output_padding=0):
        if not isinstance(x, Tensor) or x.dim() not in (3, 4) or weight.dim() != 4:
            raise ReceptiveFieldError("only 2-D convolutions on (N, C, H, W) or (C, H, W) inputs can be measured")
        unbatched = x.dim() == 3
        if unbatched:
            x = self._real(x).unsqueeze(0)
        kh, kw = weight.shape[2:]
        cout = weight.shape[1] * groups if transposed else weight.shape[0]
        inp, g = self._channel_mean(x, groups)
        if not transposed and _pool_like((kh, kw), padding, dilation):  # the same sums, faster
            y = F.avg_pool2d(inp, (kh, kw), stride, padding, count_include_pad=True)
        else:
            kernel = torch.full((g, 1, kh, kw), 1.0 / (kh * kw), dtype=inp.dtype, device=inp.device)
            if transposed:
                y = F.conv_transpose2d(inp, kernel, None, stride, padding, output_padding, g, dilation)
            else:
                y = F.conv2d(inp, kernel, None, stride, padding, dilation, g)
        if g == 1:
            out = self._spread(y, cout)
        else:
            out = y if cout == g else y.repeat_interleave(cout // g, dim=1)
        return out.squeeze(0) if unbatched else out

    def _linear(self, x: Tensor, weight: Tensor) -> Tensor:
        y = x.mean(-1, keepdim=True)
        out = y.expand(*y.shape[:-1], weight.shape[0])
        return out if self.collapse else out.contiguous()

    def _max_pool(self, name: str, args: tuple, kwargs: dict):
        x, kernel, stride, padding, dilation, ceil_mode, with_indices = _pool_args(*args, **kwargs)
        if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0):
            stride = kernel
        geometry = (_pair(kernel), _pair(stride), _pair(padding), _pair(dilation), bool(ceil_mode))
        if x.dim() == 3:
            pooled = self._channelwise(_box_pool, self._real(x).unsqueeze(0), *geometry).squeeze(0)
        else:
            pooled = self._channelwise(_box_pool, x, *geometry)
        if with_indices or name.endswith("_with_indices"):
            real = self._real(x).detach()
            return pooled, F.max_pool2d(real, kernel, stride, padding, dilation, ceil_mode, return_indices=True)[1]
        return pooled

    def _binary(self, func, args: tuple, kwargs: dict) -> Tensor | None:
        """Elementwise arithmetic on maps that repeat along channels, done on one channel."""
        if "out" in kwargs or any(isinstance(v, Tensor) for v in kwargs.values()):
            return None
        shapes, new_args = [], []
        for a in args:
            if isinstance(a, Tensor) and a.dim() > 0:
                r = self._rep(a)
                if r is None:
                    return None
                shapes.append(a.shape)
                new_args.append(r)
            else:
                new_args.append(a)
        if not shapes:
            return None
        full = torch.broadcast_shapes(*shapes)
        if len(full) != 4 or full[1] == 1:
            return None
        return self._spread(func(*new_args, **kwargs), full[1]).expand(full)

    def _binary_inplace(self, func, args: tuple, kwargs: dict) -> Tensor | None:
        """``a += b`` on a broadcast map ``a``: done on the one channel it repeats."""
        target = args[0]
        if not isinstance(target, Tensor) or self._lazy(target) is not None:
            return None  # a placeholder: refused in _read
        if target.dim() != 4 or target.shape[1] == 1 or target.stride(1) != 0:
            return None  # an ordinary in-place op on a full map
        base = _rep(target)
        if base is None or base._base is not None or base.shape[1] != 1:
            raise _NeedDense
        rest = []
        for a in args[1:]:
            if isinstance(a, Tensor) and a.dim() > 0:
                r = self._rep(a)
                if r is None:
                    raise _NeedDense
                rest.append(r)
            else:
                rest.append(a)
        if "out" in kwargs or any(isinstance(v, Tensor) for v in kwargs.values()):
            raise _NeedDense
        func(base, *rest, **kwargs)
        return target


_METADATA_PROPERTIES = frozenset(
    {"shape", "dtype", "device", "requires_grad", "is_leaf", "grad_fn", "ndim", "layout", "is_cuda", "is_cpu"}
    | {"is_meta", "is_sparse", "is_quantized", "is_mkldnn", "is_nested", "names", "_version", "itemsize"}
)
_METADATA_CALLS = frozenset(
    {"size", "dim", "numel", "nelement", "ndimension", "__len__", "is_floating_point", "is_complex", "element_size"}
    | {"get_device", "__hash__"}
)


def _pool_like(kernel: tuple[int, int], padding: Any, dilation: Any) -> bool:
    """Whether ``avg_pool2d`` can stand in for a box-kernel convolution (no dilation, small padding)."""
    if isinstance(padding, str) or _pair(dilation) != (1, 1):
        return False
    pad = _pair(padding)
    return all(0 <= p <= k // 2 for p, k in zip(pad, kernel))


class _Placeholder(torch.autograd.Function):
    """Stands for a channel concatenation without writing it: right shape, zero values, and the
    concatenation's gradient (each piece gets the sum over its channels)."""

    @staticmethod
    def forward(ctx, shape, counts, *reps):
        ctx.counts = counts
        return reps[0].new_zeros((1, 1, 1, 1)).expand(shape)

    @staticmethod
    def backward(ctx, grad):
        return (None, *_Concat.backward(ctx, grad))


class _ChannelMean(torch.autograd.Function):
    """``x.mean(1, keepdim=True)`` whose gradient stays a broadcast view (no full-size tensor)."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.mean(1, keepdim=True)

    @staticmethod
    def backward(ctx, grad):
        return (grad / ctx.shape[1]).expand(ctx.shape)


class _Concat(torch.autograd.Function):
    """Channel concatenation of broadcast maps ``(N, 1, H, W)``, ``counts[i]`` channels each.

    The values are materialised (any operation may read them); the gradient of each piece is the
    sum over its channels, taken on one channel when the incoming gradient is a broadcast view.
    """

    @staticmethod
    def forward(ctx, counts, *reps):
        ctx.counts = counts
        n, _, h, w = reps[0].shape
        out = torch.empty((n, sum(counts), h, w), dtype=reps[0].dtype, device=reps[0].device)
        start = 0
        for r, c in zip(reps, counts):
            out[:, start : start + c] = r
            start += c
        return out

    @staticmethod
    def backward(ctx, grad):
        grads, start = [], 0
        for c in ctx.counts:
            g = grad[:, start : start + c]
            grads.append(g[:, :1] * c if g.stride(1) == 0 or c == 1 else g.sum(1, keepdim=True))
            start += c
        return (None, *grads)


def _box_pool(x: Tensor, kernel, stride, padding, dilation, ceil_mode) -> Tensor:
    """Average pooling with max pooling's exact geometry (dilation and ceil mode included)."""
    if dilation == (1, 1):  # max pooling's output size rule is average pooling's
        return F.avg_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode, count_include_pad=True)
    n, c, h, w = x.shape
    extra = []
    for length, k, s, p, d in zip((w, h), kernel[::-1], stride[::-1], padding[::-1], dilation[::-1]):
        span = d * (k - 1) + 1
        num = length + 2 * p - span
        out = (-(-num // s) if ceil_mode else num // s) + 1
        if ceil_mode and (out - 1) * s >= length + p:
            out -= 1
        extra.append(max(0, (out - 1) * s + span - (length + 2 * p)))
    flat = x.reshape(n * c, 1, h, w)
    if any(extra):
        flat = F.pad(flat, (0, extra[0], 0, extra[1]))
    kernel_t = torch.full((1, 1, *kernel), 1.0 / (kernel[0] * kernel[1]), dtype=x.dtype, device=x.device)
    y = F.conv2d(flat, kernel_t, None, stride, padding, dilation)
    return y.reshape(n, c, *y.shape[2:])


# -- measuring -------------------------------------------------------------------------------------
Extent = tuple[int, int] | None  # first and last pixel of a support along one axis; None: empty
Item = tuple[tuple[int, int], Extent, Extent]  # an output position (y, x), its y extent, its x extent
Observed = dict[str, tuple[tuple[int, int], list[Item]]]  # layer -> (output size, items)


def _observe(
    net: nn.Module, names: list[str], canvas: tuple[int, int], in_channels: int, *, ignore_global: bool
) -> Observed:
    """Output sizes and gradient supports of the probed output positions, fast path first."""
    try:
        return _run(net, names, canvas, in_channels, collapse=True, ignore_global=ignore_global)
    except (_NeedDense, RuntimeError):  # in-place arithmetic the broadcast maps cannot take
        pass
    try:
        return _run(net, names, canvas, in_channels, collapse=False, ignore_global=ignore_global)
    except FeatureMapsError:
        raise
    except Exception as e:
        raise ReceptiveFieldError(
            f"the model failed on a {(1, in_channels, *canvas)} input ({type(e).__name__}: {e}); "
            "check input_size and in_channels"
        ) from e


def _run(net, names, canvas, in_channels, *, collapse, ignore_global) -> Observed:
    modules = {name: net.get_submodule(name) for name in names}
    snaps: dict[str, Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(module, inputs, output):
            if name in snaps:
                return None  # a module called more than once: its first call counts
            if not isinstance(output, Tensor) or output.dim() != 4:
                if isinstance(output, Tensor):  # the first dimension is this module's probe batch
                    what = f"a tensor of shape ({', '.join(['N', *map(str, output.shape[1:])])})"
                else:
                    what = f"a {type(output).__name__}"
                raise ReceptiveFieldLayerError(
                    f"layer {name!r} outputs {what}, not an (N, C, H, W) map; "
                    "pick a conv, pool or block layer whose output is a feature map"
                )
            snaps[name] = output.sum(1)  # channels summed now: later in-place ops cannot reach it
            if len(snaps) == len(modules):
                raise _Stop
            return None

        return hook

    x_leaf = torch.ones((_ITEMS, 1, *canvas), dtype=torch.float64, requires_grad=True)
    try:
        for name, m in modules.items():
            handles.append(m.register_forward_hook(make_hook(name)))
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.autocast("cpu", enabled=False),
            _Linearise(collapse=collapse, ignore_global=ignore_global),
        ):
            x = x_leaf.expand(_ITEMS, in_channels, *canvas)
            try:
                net(x if collapse else x.contiguous())
            except _Stop:
                pass
            missing = [n for n in names if n not in snaps]
            if missing:
                raise ReceptiveFieldLayerError(
                    f"layer {missing[0]!r} did not run in the model's forward pass; "
                    "pick a layer that the forward pass uses"
                )
            result = {}
            for name in names:
                snap = snaps[name]
                out_size = (int(snap.shape[1]), int(snap.shape[2]))
                where = _grid_positions(out_size)
                if not snap.requires_grad:
                    raise ReceptiveFieldError(f"layer {name!r} does not depend on the input; pick another layer")
                loss = sum(snap[k, y, x] for k, (y, x) in enumerate(where))
                (grad,) = torch.autograd.grad(loss, x_leaf, retain_graph=True, allow_unused=True)
                if grad is None:
                    raise ReceptiveFieldError(f"layer {name!r} does not depend on the input; pick another layer")
                support = grad[:, 0] != 0
                rows, cols = support.any(dim=2), support.any(dim=1)
                items = [(pos, _extent(rows[k]), _extent(cols[k])) for k, pos in enumerate(where)]
                result[name] = (out_size, items)
            return result
    finally:
        for h in handles:
            h.remove()


def _extent(mask: Tensor) -> Extent:
    idx = torch.nonzero(mask).flatten()
    return None if idx.numel() == 0 else (int(idx[0]), int(idx[-1]))


_ITEMS = 5


def _grid_positions(out_size: tuple[int, int]) -> list[tuple[int, int]]:
    """The output positions probed, one per batch item: the first, three central ones and the last.

    The first and the last give the range of pixels the layer sees at all (see :func:`_solve`).
    """
    h, w = out_size
    cy, cx = (h - 1) // 2, (w - 1) // 2
    central = [(min(max(cy + d, 0), h - 1), min(max(cx + d, 0), w - 1)) for d in (-1, 0, 1)]
    return [(0, 0), *central, (h - 1, w - 1)]


Geometry = tuple[float, int, float]  # stride, size, offset along one axis


def _solve(obs: list[tuple[int, Extent]], visible: tuple[int, int], layer: str) -> Geometry | None:
    """Stride, size and offset along one axis from clipped supports, or None if not determined.

    ``visible`` is the range of pixels the layer sees at all: the image, or less where unpadded
    strided layers leave the last pixels out (Inception v3 at 160 px sees pixels 0..156). A support
    that reaches an end of that range may be clipped there, so only its other edge counts.
    """
    starts = sorted({(i, e[0]) for i, e in obs if e is not None and e[0] > visible[0]})
    ends = sorted({(i, e[1]) for i, e in obs if e is not None and e[1] < visible[1]})
    strides = [(b - a) / (j - i) for edges in (starts, ends) for (i, a), (j, b) in itertools.pairwise(edges) if j != i]
    if not strides:
        return None
    stride = strides[0]
    if any(abs(s - stride) > 1e-6 for s in strides) or stride <= 0:
        raise _uneven(layer)
    sizes = [b - a + 1 + (j - i) * stride for i, b in ends for j, a in starts]
    if not sizes:
        return None
    size = sizes[0]
    if any(abs(s - size) > 1e-6 for s in sizes):
        raise _uneven(layer)
    half = (size - 1) / 2
    offsets = [a + half - i * stride for i, a in starts] + [b - half - i * stride for i, b in ends]
    if any(abs(o - offsets[0]) > 1e-6 for o in offsets):
        raise _uneven(layer)
    return _tidy(stride), int(round(size)), _tidy(offsets[0])


def _tidy(v: float) -> float:
    near = round(v * 2) / 2
    return float(near) if abs(v - near) < 1e-9 else float(v)


def _uneven(layer: str) -> ReceptiveFieldError:
    return ReceptiveFieldError(
        f"layer {layer!r}'s output positions are not evenly spaced over the input (resizing or adaptive "
        "pooling inside the model?), so one size/stride/offset cannot describe them; pick an earlier layer"
    )


def _predicted(geometry: Geometry, i: int, visible: tuple[int, int]) -> Extent:
    stride, size, offset = geometry
    centre = offset + i * stride
    lo = max(_snap(centre - (size - 1) / 2, math.ceil), visible[0])
    hi = min(_snap(centre + (size - 1) / 2, math.floor), visible[1])
    return (lo, hi) if lo <= hi else None


def _visible(items: list, axis: int) -> tuple[int, int]:
    """The pixels seen by the first to the last output position (the items include both)."""
    extents = [ext[axis] for _, *ext in items if ext[axis] is not None]
    if not extents:
        return 0, -1
    return min(e[0] for e in extents), max(e[1] for e in extents)


_MAX_CANVAS = 4096


def _measure(
    module: nn.Module, names: list[str], size: tuple[int, int], in_channels: int, *, ignore_global: bool
) -> dict[str, ReceptiveField]:
    net = _linearised_copy(module)
    first = _observe(net, names, size, in_channels, ignore_global=ignore_global)
    solved: dict[tuple[str, int], Geometry] = {}
    pending: dict[str, set[int]] = {}
    for name, (_, items) in first.items():
        for axis in (0, 1):
            geometry = _solve([(pos[axis], ext[axis]) for pos, *ext in items], _visible(items, axis), name)
            if geometry is None:
                pending.setdefault(name, set()).add(axis)
            else:
                solved[name, axis] = geometry

    if pending:
        solved.update(_measure_on_canvas(net, first, pending, size, in_channels, ignore_global=ignore_global))

    result = {}
    for name in names:
        out_size, items = first[name]
        for axis in (0, 1):  # every answer must reproduce the clipped supports seen at the real size
            for pos, *ext in items:
                if _predicted(solved[name, axis], pos[axis], _visible(items, axis)) != ext[axis]:
                    raise _uneven(name)
        (sy, ry, oy), (sx, rx, ox) = solved[name, 0], solved[name, 1]
        result[name] = ReceptiveField(
            layer=name, input_size=size, size=(ry, rx), stride=(sy, sx), offset=(oy, ox), output_size=out_size
        )
    return result


def _measure_on_canvas(net, first, pending, size, in_channels, *, ignore_global) -> dict[tuple[str, int], Geometry]:
    """Geometry of the pending axes, each measured on a canvas enlarged along that axis only.

    The margin ``P`` added at both ends is a whole number of strides, so that the canvas's output
    grid is the input's grid shifted by ``P / stride`` positions and the offsets agree. The other
    axis keeps its size: a canvas ``(H + 2P, W)`` costs a fraction of ``(H + 2P, W + 2P)``.
    """
    solved: dict[tuple[str, int], Geometry] = {}
    for axis in (0, 1):
        todo = [name for name, axes in pending.items() if axis in axes]
        if not todo:
            continue
        rough = max(size[axis] / first[name][0][axis] for name in todo)
        base = 2 ** max(0, math.ceil(math.log2(max(rough, 1))))  # a power of two >= every stride
        margin = _round_up(max(size[axis] // 2, 2 * base), base)
        while todo:
            canvas = list(size)
            canvas[axis] += 2 * margin
            if canvas[axis] > _MAX_CANVAS:
                raise ReceptiveFieldError(
                    f"layer {todo[0]!r} sees more than a {_MAX_CANVAS} px canvas (global pooling, squeeze-and-"
                    "excitation or attention make it the whole image); pass ignore_global=True for the local field"
                )
            seen = _observe(net, todo, (canvas[0], canvas[1]), in_channels, ignore_global=ignore_global)
            grow = align = False
            for name in list(todo):
                items = seen[name][1]
                geometry = _solve([(pos[axis], ext[axis]) for pos, *ext in items], _visible(items, axis), name)
                if geometry is None:
                    grow = True
                    continue
                stride = geometry[0]
                steps = margin / stride
                if abs(steps - round(steps)) > 1e-9:  # the canvas grid would not line up with the input's
                    if abs(stride - round(stride)) > 1e-9:
                        raise _uneven(name)
                    base = math.lcm(base, int(round(stride)))
                    align = True
                    continue
                solved[name, axis] = geometry  # lined up: the offset is the input's
                todo.remove(name)
            if grow or align:
                margin = _round_up(2 * margin if grow else margin, base)
    return solved


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step
