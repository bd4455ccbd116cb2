"""The hook engine of the faithful ``network`` mode (:func:`run_pass`): one forward pass of the real model, recording
what each call of the chosen modules returned. One forward hook, registered globally for the
duration of the pass (one registration instead of one per module: on ResNet-50 that was a third of
featuremaps' own overhead), looks each calling module up and ignores modules of other models and
other threads; in-place modules get a pre-hook each.

Guarantees:
- every hook handle is removed and every ``training`` and ``inplace`` flag restored in ``finally``,
  also when the forward pass raises: the model leaves unchanged, and computes exactly what it
  computes without featuremaps;
- passes over one model run one at a time (:func:`exclusive`), as they change its flags while
  they run; captures of different models run side by side;
- in-place operations cannot corrupt a captured output: outputs are kept by reference; an in-place
  module handed one runs out of place for that call and the model's tensor is re-pointed at the
  result (or, when other views share that memory, the output is copied first); in-place ops in
  ``forward()`` code are caught by a version check after the pass, which captures again copying
  those outputs, and remembers them for that model and input shape;
- with a reduction, the hook keeps only the reduced map (and the layer's numbers), so full maps are
  never held;
- the pass stops right after the last call of the last requested module (known from an earlier
  pass of the same model at the same input shape), so a classifier that is not wanted never runs;
- when every requested module is a leaf child of one plain ``nn.Sequential`` (VGG's and AlexNet's
  ``features``), and no one else's hooks are on it or its children, a pre-hook on that Sequential
  calls its children itself, as torch's own ``Sequential.forward`` does, with the capture hook
  called directly: no module call then goes through torch's hook machinery, which on VGG16 costs
  about a millisecond per pass. An in-place child handed a captured output runs out of place and
  its result goes to the next child: featuremaps is the Sequential's forward there, so nothing
  else sees it, and none of the guard's aliasing is needed. The results are the same.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from .layers import _tokens, entry_name, kind_of, select_layers
from .maps import FeatureMap
from .reduce import Reduction
from .stats import compute_stats


# -- in-place safety -------------------------------------------------------------------------------
@dataclass(slots=True)
class _Record:
    """One captured call: its output, kept by reference until something is about to write into it."""

    path: str
    call: int
    module: nn.Module
    tensor: torch.Tensor
    version: int
    owned: bool  # True once it is our own memory (a copy, a reduction, or memory the model let go)
    shape: tuple[int, ...] | None = None  # the full output's shape, when only a reduction is kept
    channels: tuple[int, ...] | None = None  # top-k channels
    stats: Any = None  # the full output's numbers, when only a reduction is kept
    view: Any = None  # ((C, H, W), prefix) when a token/channels-last output was read as maps to reduce it


def _storage_key(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # pragma: no cover - tensors without storage
        return id(t)


_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def _storage_users(t: torch.Tensor) -> int:
    """How many tensors share ``t``'s memory (views and our own references included); a huge
    number where this torch cannot tell, so that callers fall back to copying."""
    if _USE_COUNT is None:  # pragma: no cover - older torch
        return 1 << 30
    return _USE_COUNT(t.untyped_storage()._cdata) - 1  # minus this call's wrapper


class _InplaceGuard:
    """Keeps captured outputs intact when an in-place module (``ReLU(inplace=True)``...) is given one.

    For that one call the module runs out of place, and the tensor it was given is re-pointed at
    the result (``set_``): the model sees exactly what an in-place op would have left, the captured
    output keeps the old memory (through an alias made just before), and nothing is copied. When
    other views share that memory, the captured output is copied first instead. In-place ops written
    in ``forward()`` code (ResNet's ``out += identity``) are caught afterwards by the version check
    in :func:`run_pass`.
    """

    def __init__(self) -> None:
        self.watched: dict[int, list[_Record]] = {}
        self.pending: dict[int, tuple[nn.Module, torch.Tensor, list[_Record]]] = {}

    @staticmethod
    def copy(slots: list[_Record]) -> None:
        for slot in slots:
            slot.tensor = slot.tensor.clone()
            slot.owned = True

    def before(self, module: nn.Module, args: tuple) -> None:
        # runs inside the forward pass, once per call: kept short
        if not self.watched or not args:
            return
        t = args[0]
        if not isinstance(t, torch.Tensor):
            return
        watched = self.watched.pop(_storage_key(t), None)
        if not watched:
            return
        # an output that forward() code already changed stays as it is, for the version check to
        # see; captures hold the model's own tensor objects: only other tensor objects add storage
        # users. (One loop, no comprehensions: this runs with caches cold from the layer before.)
        slots = []
        others = set()
        for s in watched:
            if s.tensor._version == s.version:
                slots.append(s)
            if s.tensor is not t:
                others.add(id(s.tensor))
        if not slots:
            return
        if t._base is None and _storage_users(t) == 1 + len(others):
            for s in watched:
                if s.tensor is t:
                    s.tensor = t.detach()  # an alias that keeps the old memory when t is re-pointed
            object.__setattr__(module, "inplace", False)  # for this call only; put back in finish() or restore()
            self.pending[id(module)] = (module, t, slots)
        else:
            self.copy(slots)

    def finish(self, entry: tuple[nn.Module, torch.Tensor, list[_Record]], output: Any) -> torch.Tensor:
        """After an out-of-place call that :meth:`before` arranged (called by the capture hook):
        put ``inplace`` back and hand the model its own tensor, re-pointed at the result."""
        module, t, slots = entry
        object.__setattr__(module, "inplace", True)
        try:
            if type(output) is not type(t) or output.shape != t.shape or output.dtype != t.dtype:
                raise RuntimeError("result does not fit")
            t.set_(output)  # (a different device makes set_ raise)
        except RuntimeError:  # a tensor made by .detach() cannot be re-pointed: copy, then write in place
            self.copy(slots)
            if isinstance(output, torch.Tensor):
                t.copy_(output)
            return t
        for slot in slots:
            slot.owned = True  # the old memory is only reachable through the capture now
        return t

    def restore(self) -> None:
        for module, _, _ in self.pending.values():
            object.__setattr__(module, "inplace", True)
        self.pending.clear()


# -- model state -----------------------------------------------------------------------------------
_PASS_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_PASS_LOCKS_LOCK = threading.Lock()


def exclusive(module: nn.Module) -> "threading.RLock":
    """The lock that lets one featuremaps pass at a time run over ``module``: a pass changes the
    model's ``training`` and ``inplace`` flags and hooks it while it runs, so two at once (threads
    of a notebook or a server) would corrupt each other's maps. Captures of different models run
    side by side."""
    with _PASS_LOCKS_LOCK:
        lock = _PASS_LOCKS.get(module)
        if lock is None:
            lock = _PASS_LOCKS[module] = threading.RLock()
    return lock


@contextlib.contextmanager
def evaluating(module: nn.Module, modules: "Sequence[nn.Module] | None" = None) -> Iterator[nn.Module]:
    """Eval mode for the duration, each module's own ``training`` flag restored afterwards.
    ``modules``: ``module.modules()`` when the caller already has them."""
    training = [m for m in (module.modules() if modules is None else modules) if m.training]
    try:
        if training:
            module.eval()
        yield module
    finally:
        for m in training:
            m.training = True


# -- what a capture learns about a model ------------------------------------------------------
@dataclass(slots=True)
class _Learned:
    """What captures learned about one model, valid while its module tree stays the same.

    It refers to the model's modules only weakly: it lives in :data:`_LEARNED`, whose entry goes
    when the model does, and a strong reference from here to the model would keep both forever
    (every model a notebook or the viewer ever captured, with all its weights)."""

    tree: list  # see _tree(); anything else learned is dropped when it changes
    modules: "weakref.WeakValueDictionary[str, nn.Module]"  # named_modules(), held weakly
    # the modules with an ``inplace`` attribute (their flag is read on every pass)
    inplace_capable: "list[weakref.ref[nn.Module]]"
    # ``layers=`` tokens -> the module paths they select
    selections: dict[tuple[str, ...], list[str]] = field(default_factory=dict)
    # input (shape, dtype, device) -> calls per module path in one full pass: where a pass may stop
    schedules: dict[tuple, Counter] = field(default_factory=dict)
    # input -> modules whose outputs the model's forward() code changes in place (ResNet's
    # ``out += identity``), found by the version check: their outputs are copied in the hook
    dirty: dict[tuple, frozenset[str]] = field(default_factory=dict)
    # (input, selected paths) -> the paths of the plain nn.Sequential whose first children a pass
    # may call itself, and of those children (see _sequential_plan)
    plans: "dict[tuple, tuple[str, tuple[str, ...]] | None]" = field(default_factory=dict)
    # what callers learn once per model (capture keeps the model's token layout here)
    extras: dict[str, Any] = field(default_factory=dict)

    def select(self, module: nn.Module, layers: str | Sequence[str] | None) -> list[str]:
        """:func:`select_layers`, remembered."""
        key = tuple(_tokens(layers))
        names = self.selections.get(key)
        if names is None:
            names = select_layers(module, layers, modules=self.modules)
            if len(self.selections) >= 64:  # a long session trying many selections
                self.selections.clear()
            self.selections[key] = names
        return names

    def inplace_modules(self) -> list[nn.Module]:
        return [m for r in self.inplace_capable if (m := r()) is not None]


_LEARNED: "weakref.WeakKeyDictionary[nn.Module, _Learned]" = weakref.WeakKeyDictionary()


def _tree(module: nn.Module) -> list:
    """The module tree as a comparable value: a module added, removed, renamed or replaced
    anywhere changes it. Read straight from each module's ``_modules``: several times cheaper than
    ``named_modules()``, which a capture would otherwise walk on every call."""
    out: list = [type(module)]

    def walk(m: nn.Module) -> None:
        for name, child in m._modules.items():
            out.append(name)
            if child is not None:
                out.append(id(child))
                out.append(type(child))
                walk(child)

    walk(module)
    return out


def learned_about(module: nn.Module) -> _Learned:
    """What earlier captures learned about ``module`` (a fresh record when its tree changed)."""
    tree = _tree(module)
    state = _LEARNED.get(module)
    if state is None or state.tree != tree:
        modules = dict(module.named_modules())
        capable = [
            weakref.ref(m) for m in modules.values() if "inplace" in vars(m)
        ]  # (getattr would go through nn.Module.__getattr__)
        state = _LEARNED[module] = _Learned(tree, weakref.WeakValueDictionary(modules), capable)
    return state


def _sequential_plan(
    learned: _Learned, names: list[str], key: tuple
) -> "tuple[nn.Sequential, tuple[nn.Module, ...]] | None":
    """When every selected module is a leaf child of one plain ``nn.Sequential`` (its forward is
    torch's own: each child called in turn on the last output), called once per pass like every
    child up to the last selected one: that Sequential and those children. A pass can then call
    them itself (see :func:`run_pass`). Remembered per input and selection."""
    memo = (key, tuple(names))
    if memo in learned.plans:
        known = learned.plans[memo]
        if known is None:
            return None
        modules = learned.modules
        return modules[known[0]], tuple(modules[p] for p in known[1])
    plan = found = None
    schedule = learned.schedules[key]
    parents = {n.rpartition(".")[0] for n in names}
    parent = parents.pop() if len(parents) == 1 else None
    seq = learned.modules.get(parent) if parent is not None else None
    if seq is not None and type(seq).forward is nn.Sequential.forward:
        paths = [f"{parent}.{n}" if parent else n for n in seq._modules]
        last = max(i for i, p in enumerate(paths) if p in names)
        head = list(seq._modules.values())[: last + 1]
        called_once = parent == "" or schedule.get(parent) == 1  # (the model itself runs once)
        if called_once and all(c is not None and not c._modules and schedule.get(p) == 1 for c, p in zip(head, paths)):
            plan = (seq, tuple(head))
            found = (parent, tuple(paths[: last + 1]))
    if len(learned.plans) >= 64:
        learned.plans.clear()
    learned.plans[memo] = found
    return plan


def _hookless(modules: Sequence[nn.Module]) -> bool:
    """True when no hook of anyone else would run for these modules (global hooks included)."""
    if (
        torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
        or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks
    ):  # fmt: skip
        return False
    return not any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in modules
    )


def input_key(x: Any) -> tuple:
    """What a learned schedule depends on: the input's shape, dtype and device (every tensor of a
    dict or tuple input, for models whose forward takes one)."""
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.dtype, x.device.type)
    items = sorted(x.items()) if isinstance(x, dict) else enumerate(x)
    return tuple((k, tuple(v.shape), v.dtype, v.device.type) for k, v in items if isinstance(v, torch.Tensor))


def _needed_calls(
    names: Sequence[str], schedule: Counter, calls: Mapping[str, frozenset[int]] | None
) -> dict[str, int]:
    """How many calls of each selected path a pass must see: all of them, or up to the highest one
    that a ``path#k`` selection wants (never more than the model makes)."""
    calls = calls or {}
    return {n: min(schedule[n], max(calls[n])) if n in calls else schedule[n] for n in names}


class _StopForward(Exception):
    """Raised by the last wanted hook to skip the rest of the forward pass."""


def run_pass(
    module: nn.Module,
    x: torch.Tensor,
    names: list[str],
    reduction: Reduction | None,
    *,
    stop_early: bool = True,
    copy_all: bool = False,
    learned: _Learned,
    as_maps: Callable[[torch.Tensor], Any] | None = None,
    calls: Mapping[str, frozenset[int]] | None = None,
) -> tuple[tuple[FeatureMap, ...], list[str]]:
    """One hooked forward pass of ``module`` (``learned``: what :func:`learned_about` gives for it):
    the captured entries in execution order, and notes for the user. ``as_maps`` reads an output
    as ``(N, C, H, W)`` maps (a view with ``.maps`` and ``.prefix``, or None) before it is reduced:
    a transformer's token outputs are reduced over their channels, not over their tokens.
    ``calls``: for paths selected by ``path#k`` only, the calls wanted: the pass may stop after the
    highest of them (the caller keeps only those calls)."""
    modules = learned.modules
    wanted = {n: modules[n] for n in names}
    key = input_key(x)
    schedule = learned.schedules.get(key)
    dirty = learned.dirty.get(key, frozenset())
    needed = _needed_calls(names, schedule, calls) if (stop_early and schedule is not None) else None
    stop_after = sum(needed.values()) if needed is not None else None
    counting = schedule is None
    counts: dict[str, int] = {}
    records: list[_Record] = []  # as little work as possible per call: entries are made after the pass
    notes: list[str] = []
    guard = _InplaceGuard()
    with_stats = reduction is not None and reduction.with_stats
    watched = guard.watched
    pending = guard.pending
    finish = guard.finish
    fired = 0
    Tensor = torch.Tensor

    hooked = modules.items() if counting else wanted.items()
    paths = {id(mod): path for path, mod in hooked if path}
    copying = set(wanted) if copy_all else dirty

    # One global forward hook for the pass (registering one per module costs more than the pass's
    # own Python work); it finds the path from the module and ignores modules of other models.
    def hook(mod: nn.Module, inputs: Any, output: Any) -> torch.Tensor | None:
        nonlocal fired
        mid = id(mod)
        result = None
        if pending:  # the guard ran this call of an in-place module out of place: finish that first
            entry = pending.pop(mid, None)
            if entry is not None:
                output = result = finish(entry, output)
        path = paths.get(mid)
        if path is None:
            return result
        call = counts[path] = counts.get(path, 0) + 1
        if path not in wanted:
            return result
        if not isinstance(output, Tensor):
            name = entry_name(path, call)
            notes.append(f"{name} ({type(mod).__name__}) returned a {type(output).__name__}, not a tensor: skipped")
        else:
            if reduction is not None and output.ndim >= 3:
                src, view = output, None
                if as_maps is not None:
                    read = as_maps(output)
                    if read is not None:
                        src = read.maps
                        view = (
                            tuple(int(v) for v in src.shape[1:]),
                            0 if read.prefix is None else read.prefix.shape[1],
                        )
                stats = compute_stats(src, entry_name(path, call), kind_of(mod)) if with_stats else None
                kept, chans = reduction.apply(src)
                records.append(_Record(path, call, mod, kept, 0, True, tuple(output.shape), chans, stats, view))
            elif path in copying:
                records.append(_Record(path, call, mod, output.clone(), 0, True))
            else:  # kept by reference: the guard makes an alias before it re-points it (set_)
                slot = _Record(path, call, mod, output, output._version, False)
                storage = _storage_key(output)
                if storage in watched:
                    watched[storage].append(slot)
                else:
                    watched[storage] = [slot]
                records.append(slot)
        if stop_after is not None and call <= needed[path]:
            fired += 1
            if fired >= stop_after:
                raise _StopForward
        return result

    plan = _sequential_plan(learned, names, key) if stop_after is not None else None
    if plan is not None and not _hookless((plan[0], *plan[1])):
        plan = None

    ran = False

    def run_children(seq: nn.Module, args: tuple) -> None:
        # What nn.Sequential.forward does, up to the last wanted child, with the capture hook
        # called here instead of through torch's hook machinery: every module call then stays on
        # torch's fast path, which on VGG16 saves about a millisecond per pass.
        nonlocal ran
        if len(args) != 1:
            return  # torch's forward will say what is wrong
        ran = True
        y = args[0]
        for child in plan[1]:
            if watched and vars(child).get("inplace") is True and watched.pop(_storage_key(y), None):
                # Here featuremaps is the Sequential's forward, so only the next child sees what this
                # in-place module returns: it runs out of place and the captured output keeps its
                # values, with none of the guard's aliasing (whose Python, run with caches cold from
                # the layer before, cost about 70 us per call on VGG16 at 224x224).
                object.__setattr__(child, "inplace", False)
                try:
                    out = child(y)
                finally:
                    object.__setattr__(child, "inplace", True)
            else:
                out = child(y)
            hook(child, (y,), out)  # raises _StopForward after the last wanted call
            y = out
        raise _StopForward

    handles = []
    try:
        if plan is not None:
            handles.append(plan[0].register_forward_pre_hook(run_children))
        else:
            if not copy_all and reduction is None:  # in-place modules: the guard
                for mod in learned.inplace_modules():
                    if vars(mod).get("inplace") is True:
                        handles.append(mod.register_forward_pre_hook(guard.before))
            handles.append(torch_module.register_module_forward_hook(hook))
        with evaluating(module, modules.values()), torch.no_grad():
            try:
                module(x)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
        guard.restore()
    if plan is not None and not ran:
        # the Sequential was not called the usual way (forward() code called its .forward): hooks, from now on
        learned.plans[(key, tuple(names))] = None
        return run_pass(
            module, x, names, reduction, stop_early=stop_early, copy_all=copy_all, learned=learned, as_maps=as_maps,
            calls=calls,
        )  # fmt: skip
    if counting:
        learned.schedules[key] = Counter(counts)
    changed = {r.path for r in records if not r.owned and r.tensor._version != r.version}
    if changed:
        # forward() code wrote into captured outputs: capture again, copying those (all, if that was not enough)
        learned.dirty[key] = dirty | changed
        records.clear()  # let this pass's outputs go before the next one
        watched.clear()
        return run_pass(
            module, x, names, reduction, stop_early=stop_early, copy_all=bool(dirty), learned=learned, as_maps=as_maps,
            calls=calls,
        )  # fmt: skip
    spec = reduction.spec if reduction is not None else None
    new = FeatureMap._fast
    entries = []
    for i, r in enumerate(records):
        tensor, mod = r.tensor, r.module
        entries.append(
            new(
                entry_name(r.path, r.call),
                r.path,
                kind_of(mod),
                type(mod).__name__,
                i,
                r.call,
                tuple(tensor.shape) if r.shape is None else r.shape,
                tensor,
                None if r.shape is None else spec,
                r.channels,
                r.stats,
            )
        )
        if r.view is not None:  # a token/channels-last output reduced as maps: say what its maps were
            entries[-1].__dict__.update(spatial=r.view[0], prefix=r.view[1])
    if reduction is not None:
        flat = [e.name for e in entries if e.reduction is None]
        if flat:
            notes.append(f"{len(flat)} outputs without spatial channels (e.g. {flat[0]}) were kept whole, not reduced")
    return tuple(entries), notes


def grad_pass(
    module: nn.Module,
    x: torch.Tensor,
    names: Sequence[str],
    *,
    stop_early: bool,
    learned: _Learned,
    calls: Mapping[str, frozenset[int]] | None = None,
) -> tuple[dict[str, list[torch.Tensor]], Any]:
    """One forward pass with autograd on, for gradients through captured outputs (class evidence,
    channel portraits): the outputs of every call of the modules ``names``, still in the graph,
    and the model's own output (None when the pass stopped after the last wanted call).

    In-place safety works differently from :func:`run_pass`: the hook hands the model a clone of
    each captured output, so later in-place operations (a ``ReLU(inplace=True)``, ``out +=
    identity``) write into the clone while the captured tensor keeps its values, and gradients
    reach it through the clone (an identity). The model computes exactly what it computes without
    featuremaps; its flags and hooks are left as they were (``learned``: :func:`learned_about`;
    ``calls``: as for :func:`run_pass`).
    """
    modules = learned.modules
    wanted = {n: modules[n] for n in names}
    paths = {id(mod): path for path, mod in modules.items() if path}
    key = input_key(x)
    schedule = learned.schedules.get(key)
    needed = _needed_calls(names, schedule, calls) if (stop_early and schedule is not None) else None
    stop_after = sum(needed.values()) if needed is not None else None
    counts: Counter = Counter()
    outputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    fired = 0

    def hook(mod: nn.Module, inputs: Any, output: Any) -> Any:
        nonlocal fired
        path = paths.get(id(mod))
        if path is None:
            return None
        counts[path] += 1
        if path not in wanted:
            return None
        last = False
        if stop_after is not None and counts[path] <= needed[path]:
            fired += 1
            last = fired >= stop_after
        if not isinstance(output, torch.Tensor):
            if last:
                raise _StopForward
            return None
        outputs[path].append(output)
        if last:
            raise _StopForward
        return output.clone()  # the model goes on with a copy: in-place ops cannot touch the capture

    result = None
    handle = torch_module.register_module_forward_hook(hook)
    try:
        with evaluating(module, modules.values()), torch.enable_grad():
            try:
                result = module(x)
            except _StopForward:
                result = None
    finally:
        handle.remove()
    if schedule is None and result is not None:
        learned.schedules[key] = counts
    return outputs, result
