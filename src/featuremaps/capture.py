"""The hook engine of the faithful ``network`` mode: one forward pass of the real model, with
forward hooks on the chosen modules, recording what each call returned.

Guarantees:
- every hook handle is removed and every ``training`` flag restored in ``finally``, also when the
  forward pass raises; ``inplace`` flags are never touched, the model leaves unchanged;
- in-place operations cannot corrupt a captured output: outputs are kept by reference, and an
  in-place op about to write into one (watched through a ``TorchFunctionMode``) runs out of place
  with the model's tensor re-pointed at the result, or, when other views share that memory, the
  captured output is copied first; a version-counter check after the pass catches anything that
  slipped by and captures again with plain copies;
- with a reduction, the hook keeps only the reduced map (and the layer's numbers), so full maps are
  never held;
- the pass stops right after the last call of the last requested module (known from an earlier
  pass of the same model at the same input shape), so a classifier that is not wanted never runs.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import inspect
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import LayerError
from .maps import FeatureMap, FeatureMaps, compute_stats
from .models import Model, Preprocessing, _module_device
from .reduce import Reduction, parse_reduction

MODES: tuple[str, ...] = ("network", "conv", "conv-relu", "conv-pool")

# -- kinds -----------------------------------------------------------------------------------------
_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Threshold, nn.GLU, nn.LogSigmoid,
)  # fmt: skip
_POOLS = (
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._LPPoolNd,
)  # fmt: skip
_NORMS = (
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.CrossMapLRN2d,
)  # fmt: skip
_LINEAR = (nn.Linear, nn.Bilinear, nn.LazyLinear)

#: Selector words for ``layers=``; ``relu`` and ``activation`` mean every activation.
KIND_ALIASES: dict[str, str] = {
    "conv": "conv", "relu": "act", "act": "act", "activation": "act", "pool": "pool",
    "norm": "norm", "bn": "norm", "linear": "linear", "fc": "linear", "other": "other",
}  # fmt: skip


def kind_of(module: nn.Module) -> str:
    """``conv``, ``act``, ``pool``, ``norm``, ``linear`` or ``other``."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, _ACTIVATIONS):
        return "act"
    if isinstance(module, _POOLS):
        return "pool"
    if isinstance(module, _NORMS):
        return "norm"
    if isinstance(module, _LINEAR):
        return "linear"
    return "other"


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


# -- selecting capture points ----------------------------------------------------------------------
def _unwrap(model: Model | nn.Module) -> tuple[nn.Module, Model | None]:
    if isinstance(model, Model):
        return model.module, model
    if isinstance(model, nn.Module):
        return model, None
    raise TypeError(f"capture needs a featuremaps Model or a torch.nn.Module, not {type(model).__name__}")


def _tokens(layers: str | Sequence[str] | None) -> list[str]:
    if layers is None:
        return ["conv"]
    if isinstance(layers, str):
        return [t.strip() for t in layers.split(",") if t.strip()] or ["conv"]
    return [str(t).strip() for t in layers if str(t).strip()]


def match_layers(candidates: Sequence[tuple[str, nn.Module]], layers: str | Sequence[str] | None) -> list[str]:
    """Names among ``candidates`` that ``layers`` asks for, in the candidates' order.

    ``layers`` is a kind (``conv``, ``relu``/``act``, ``pool``, ``norm``, ``linear``, ``other``),
    ``all`` (every leaf module), an exact ``named_modules()`` path, or a glob pattern over the paths
    (``features.*``); several may be given as a list or comma-separated. Kind words win over a
    module of the same name; ``name:pool`` selects the module called ``pool``.
    """
    leaves = [(n, m) for n, m in candidates if _is_leaf(m)]
    all_names = [n for n, _ in candidates]
    wanted: set[str] = set()
    for token in _tokens(layers):
        low = token.lower()
        if token.startswith("name:"):  # a module literally called like a kind ("pool")
            token = low = token[len("name:") :]
            if token not in all_names:
                raise LayerError(f"no layer named {token!r}; use `featuremaps layers MODEL` to see the names")
            wanted.add(token)
        elif low in ("all", "leaf", "leaves"):
            wanted.update(n for n, _ in leaves)
        elif low in KIND_ALIASES:
            kind = KIND_ALIASES[low]
            hits = [n for n, m in leaves if kind_of(m) == kind]
            if not hits:
                raise LayerError(f"this model has no {token} layers; use `featuremaps layers MODEL` to see its layers and kinds")
            wanted.update(hits)
        elif token in all_names:
            wanted.add(token)
        elif any(c in token for c in "*?["):
            hits = [n for n in all_names if fnmatch.fnmatchcase(n, token)]
            if not hits:
                raise LayerError(f"pattern {token!r} matches no layer; use `featuremaps layers MODEL` to see the names")
            wanted.update(hits)
        else:
            close = difflib.get_close_matches(token, all_names, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise LayerError(
                f"no layer named {token!r}; {hint}use a kind (conv, relu, pool, norm, linear, all), a glob "
                "such as 'features.*', or a name from `featuremaps layers MODEL`"
            )
    return [n for n, _ in candidates if n in wanted]


def select_layers(model: Model | nn.Module, layers: str | Sequence[str] | None = "conv") -> list[str]:
    """The ``named_modules()`` paths that ``layers`` selects (see :func:`match_layers`)."""
    module, _ = _unwrap(model)
    return match_layers([(n, m) for n, m in module.named_modules() if n], layers)


# -- in-place safety -------------------------------------------------------------------------------
_INPLACE_DUNDERS = frozenset(
    f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift", "rshift", "matmul")
) | {"__setitem__"}
_INPLACE_POSITION: dict[Any, int] = {}


def _inplace_position(func: Callable) -> int:
    """Index of a positional ``inplace`` parameter of a ``torch.nn.functional`` function, or -1."""
    pos = _INPLACE_POSITION.get(func)
    if pos is None:
        pos = -1
        try:
            params = list(inspect.signature(func).parameters)
            pos = params.index("inplace") if "inplace" in params else -1
        except (TypeError, ValueError):
            pass
        _INPLACE_POSITION[func] = pos
    return pos


def _written_tensors(func: Callable, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors an op is about to write into (empty for out-of-place ops)."""
    out = kwargs.get("out")
    if out is not None:
        return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]
    if not args or not isinstance(args[0], torch.Tensor):
        return []
    name = getattr(func, "__name__", "")
    if (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_DUNDERS or kwargs.get("inplace") is True:
        return [args[0]]
    if getattr(func, "__module__", "") == "torch.nn.functional":
        pos = _inplace_position(func)
        if 0 < pos < len(args) and args[pos] is True:
            return [args[0]]
    return []


@dataclass
class _Slot:
    """A captured output kept by reference until something is about to write into it."""

    tensor: torch.Tensor
    version: int
    owned: bool  # True once it is our own copy (or a reduction), safe from the model


# In-place ops that have an out-of-place twin with the same result: ``relu_`` -> ``relu`` ...
_SWAPPABLE = frozenset({"relu_", "add_", "sub_", "mul_", "div_", "clamp_", "clamp_min_", "hardtanh_", "sigmoid_", "tanh_",
                        "__iadd__", "__isub__", "__imul__", "__itruediv__"})  # fmt: skip
_DUNDER_TWIN = {"__iadd__": "__add__", "__isub__": "__sub__", "__imul__": "__mul__", "__itruediv__": "__truediv__"}


def _out_of_place(func: Callable, args: tuple, kwargs: dict) -> Callable[[], Any] | None:
    """The same op without writing into ``args[0]``, or None when there is no safe twin."""
    if kwargs.get("inplace") is True:
        return lambda: func(*args, **{**kwargs, "inplace": False})
    name = getattr(func, "__name__", "")
    if getattr(func, "__module__", "") == "torch.nn.functional":
        pos = _inplace_position(func)
        if 0 < pos < len(args) and args[pos] is True:
            return lambda: func(*args[:pos], False, *args[pos + 1 :], **kwargs)
        return None
    if name in _SWAPPABLE and "out" not in kwargs:
        twin = getattr(torch.Tensor, _DUNDER_TWIN.get(name, name.rstrip("_")), None)
        if twin is not None:
            return lambda: twin(*args, **kwargs)
    return None


class _CopyOnWrite(TorchFunctionMode):
    """Keeps captured outputs intact when an in-place op is about to write into them.

    Cheapest first: when the written tensor has no other views, the op runs out of place and the
    tensor is re-pointed at the result (``set_``), so the captured output keeps the old memory and
    nothing is copied; otherwise the captured output is copied first.
    """

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, list[_Slot]] = {}

    def watch(self, slot: _Slot) -> None:
        self.watched.setdefault(_storage_key(slot.tensor), []).append(slot)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.watched:
            written = _written_tensors(func, args, kwargs)
            for t in written:
                slots = self.watched.pop(_storage_key(t), None)
                if not slots:
                    continue
                if len(written) == 1 and t is args[0]:
                    result = self._swap(func, args, kwargs, t, slots)
                    if result is not None:
                        return result
                for slot in slots:
                    slot.tensor = slot.tensor.clone()
                    slot.owned = True
        return func(*args, **kwargs)

    @staticmethod
    def _swap(func: Callable, args: tuple, kwargs: dict, t: torch.Tensor, slots: list[_Slot]) -> torch.Tensor | None:
        """Run the op out of place and re-point ``t`` at the result, if that is safe."""
        if t._base is not None:  # a view: writing through it is what the model means
            return None
        # Only ``t`` and our own slot tensors may share this memory (plus the wrapper of this call).
        if torch._C._storage_Use_Count(t.untyped_storage()._cdata) != 2 + len(slots):
            return None
        make = _out_of_place(func, args, kwargs)
        if make is None:
            return None
        result = make()
        if not isinstance(result, torch.Tensor) or result.shape != t.shape or result.dtype != t.dtype or result.device != t.device:
            for slot in slots:  # no twin after all: copy, then write the result in place
                slot.tensor = slot.tensor.clone()
                slot.owned = True
            return t.copy_(result) if isinstance(result, torch.Tensor) else None
        try:
            t.set_(result)
        except RuntimeError:  # e.g. a tensor made by .detach() cannot be re-pointed
            for slot in slots:
                slot.tensor = slot.tensor.clone()
                slot.owned = True
            return t.copy_(result)
        for slot in slots:
            slot.owned = True  # the slot holds the old memory, which nothing else can reach now
        return t


def _storage_key(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # pragma: no cover - tensors without storage
        return id(t)


# -- model state -----------------------------------------------------------------------------------
@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration, each module's own ``training`` flag restored afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


# -- the schedule: how often each module runs, learned from a full pass ---------------------------
_SCHEDULES: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, Counter]]" = weakref.WeakKeyDictionary()


def _schedule_key(module: nn.Module, x: torch.Tensor) -> tuple:
    return (tuple(x.shape), x.dtype, x.device.type, tuple((n, id(m)) for n, m in module.named_modules()))


class _StopForward(Exception):
    """Raised by the last wanted hook to skip the rest of the forward pass."""


# -- input -----------------------------------------------------------------------------------------
def prepare_input(model: Model | nn.Module, image: Any, *, size: int | tuple[int, int] | None = None):
    """``image`` -> (input tensor ``(N, 3, H, W)``, the RGB picture as the model sees it or None).

    A 4-D tensor is taken as an already preprocessed batch; anything else goes through
    :func:`featuremaps.images.load_image` and the model's preprocessing.
    """
    module, info = _unwrap(model)
    if isinstance(image, torch.Tensor) and image.ndim == 4:
        return image, None
    from .images import load_image

    pre = info.preprocessing if info is not None else Preprocessing()
    pre = pre.with_size(size)
    picture = load_image(image)
    x, resized = pre(picture)
    return x, resized


# -- capture ---------------------------------------------------------------------------------------
def capture(
    model: Model | nn.Module,
    image: Any,
    *,
    mode: str = "network",
    layers: str | Sequence[str] | None = None,
    reduce: str | Reduction | None = None,
    size: int | tuple[int, int] | None = None,
    stop_early: bool = True,
) -> FeatureMaps:
    """Capture feature maps of ``model`` for ``image``.

    Args:
        model: a :class:`~featuremaps.models.Model` from :func:`load_model`, or any ``nn.Module``
            (fed with ImageNet normalization at 224x224).
        image: anything :func:`~featuremaps.images.load_image` takes, or a preprocessed 4-D tensor.
        mode: ``network`` (the real forward pass, with hooks) or one of the seed's chains
            ``conv``, ``conv-relu``, ``conv-pool`` (see :mod:`featuremaps.chains`).
        layers: what to capture (see :func:`match_layers`); default ``conv`` in network mode and
            every step in chain modes.
        reduce: keep only a reduction of each map: ``mean``, ``max``, ``l2``, ``std`` or ``topk:K``.
        size: input size; default the model's (224 for VGG16).
        stop_early: skip the rest of the forward pass after the last wanted layer (network mode).

    Returns:
        FeatureMaps in execution order.
    """
    if mode not in MODES:
        raise LayerError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    module, info = _unwrap(model)
    reduction = parse_reduction(reduce)
    x, picture = prepare_input(model, image, size=size)
    x = x.to(_module_device(module))
    if mode != "network":
        from .chains import run_chain

        return run_chain(model, x, chain=mode, layers=layers, reduce=reduction, image=picture)
    names = select_layers(module, layers)
    entries, notes = _run_hooks(module, x, names, reduction, stop_early=stop_early)
    return FeatureMaps(
        entries=entries,
        model=info.name if info else type(module).__name__,
        weights=info.weights if info else "as given",
        pretrained=info.pretrained if info else False,
        mode="network",
        input_size=(int(x.shape[-2]), int(x.shape[-1])),
        image=picture,
        reduction=reduction.spec if reduction else None,
        notes=tuple(notes),
    )


def _run_hooks(
    module: nn.Module,
    x: torch.Tensor,
    names: list[str],
    reduction: Reduction | None,
    *,
    stop_early: bool = True,
    copy_all: bool = False,
) -> tuple[tuple[FeatureMap, ...], list[str]]:
    modules = dict(module.named_modules())
    wanted = {n: modules[n] for n in names}
    key = _schedule_key(module, x)
    schedule = _SCHEDULES.get(module, {}).get(key)
    stop_after = sum(schedule[n] for n in names) if (stop_early and schedule is not None) else None
    counting = schedule is None
    counts: Counter = Counter()
    records: list[tuple[str, nn.Module, int, _Slot, tuple[int, ...], tuple[int, ...] | None, Any]] = []
    notes: list[str] = []
    guard = _CopyOnWrite()
    fired = 0

    def make_hook(path: str) -> Callable:
        target = wanted.get(path)

        def hook(mod: nn.Module, inputs: Any, output: Any) -> None:
            nonlocal fired
            counts[path] += 1
            if target is None:
                return
            call = counts[path]
            name = path if call == 1 else f"{path}#{call}"
            if not isinstance(output, torch.Tensor):
                notes.append(f"{name} ({type(mod).__name__}) returned a {type(output).__name__}, not a tensor: skipped")
            else:
                out = output.detach()
                stats = chans = None
                if reduction is not None and out.ndim >= 3:
                    stats = compute_stats(out, name, kind_of(mod))
                    kept, chans = reduction.apply(out)
                    slot = _Slot(kept, 0, owned=True)
                elif copy_all:
                    slot = _Slot(out.clone(), 0, owned=True)
                else:
                    slot = _Slot(out, out._version, owned=False)
                    guard.watch(slot)
                records.append((name, mod, call, slot, tuple(out.shape), chans, stats))
            fired += 1
            if stop_after is not None and fired >= stop_after:
                raise _StopForward

        return hook

    hooked = modules.items() if counting else wanted.items()
    handles = []
    try:
        for path, mod in hooked:
            if path:
                handles.append(mod.register_forward_hook(make_hook(path)))
        with evaluating(module), torch.no_grad(), guard:
            try:
                module(x)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    if counting:
        _SCHEDULES.setdefault(module, {})[key] = counts
    if not copy_all and any(not s.owned and s.tensor._version != s.version for *_, s, _, _, _ in records):
        # Something wrote into a captured output without passing through torch functions: do it again, copying.
        return _run_hooks(module, x, names, reduction, stop_early=stop_early, copy_all=True)
    entries = []
    for i, (name, mod, call, slot, shape, chans, stats) in enumerate(records):
        red = None if stats is None else reduction.spec  # type: ignore[union-attr]
        entries.append(
            FeatureMap(
                name=name,
                module=name.split("#")[0],
                kind=kind_of(mod),
                type=type(mod).__name__,
                index=i,
                call=call,
                shape=shape,
                tensor=slot.tensor,
                reduction=red,
                channels=chans,
                _stats=stats,
            )
        )
    if reduction is not None:
        flat = [e.name for e in entries if e.reduction is None]
        if flat:
            notes.append(f"{len(flat)} outputs without spatial channels (e.g. {flat[0]}) were kept whole, not reduced")
    return tuple(entries), notes


# -- listing ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerInfo:
    """One capture point of a model: what ``featuremaps layers`` lists."""

    index: int
    name: str
    kind: str
    type: str
    output_shape: tuple[int, ...] | None
    parameters: int
    calls: int


def list_layers(model: Model | nn.Module, *, size: int | tuple[int, int] | None = None, layers: str | Sequence[str] | None = "all") -> list[LayerInfo]:
    """The capture points of a model (leaf modules by default) with their output shapes for an
    input of ``size`` (one forward pass of a zero image; no maps are kept)."""
    module, info = _unwrap(model)
    pre = (info.preprocessing if info else Preprocessing()).with_size(size)
    names = select_layers(module, layers)
    modules = dict(module.named_modules())
    shapes: dict[str, tuple[int, ...] | None] = {}
    calls: Counter = Counter()
    x = torch.zeros(1, 3, *pre.size, device=_module_device(module))

    def make_hook(path: str) -> Callable:
        def hook(mod: nn.Module, inputs: Any, output: Any) -> None:
            calls[path] += 1
            if path not in shapes:
                shapes[path] = tuple(output.shape) if isinstance(output, torch.Tensor) else None

        return hook

    handles = [modules[n].register_forward_hook(make_hook(n)) for n in names]
    try:
        with evaluating(module), torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return [
        LayerInfo(
            index=i,
            name=n,
            kind=kind_of(modules[n]),
            type=type(modules[n]).__name__,
            output_shape=shapes.get(n),
            parameters=sum(p.numel() for p in modules[n].parameters()),
            calls=calls[n],
        )
        for i, n in enumerate(names)
    ]
