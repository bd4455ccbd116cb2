"""Layers: what kind each module is, and which modules a ``layers=`` selection names.

Layer names are ``named_modules()`` paths; a module called several times gives one capture per
call, named ``path#k`` for the k-th call (k >= 2). File names of a layer's pictures and raw maps
come from :func:`file_stem`, the one naming rule.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

from .errors import LayerError

if TYPE_CHECKING:  # pragma: no cover
    from .models import Model

#: What a captured module is. ``act`` covers every activation (ReLU, ReLU6, GELU, SiLU, Hardswish...).
KINDS: tuple[str, ...] = ("conv", "act", "pool", "norm", "linear", "other")

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


_KIND_BY_TYPE: dict[type, str] = {}


def kind_of(module: nn.Module) -> str:
    """``conv``, ``act``, ``pool``, ``norm``, ``linear`` or ``other``."""
    cls = type(module)
    kind = _KIND_BY_TYPE.get(cls)
    if kind is None:
        kind = _KIND_BY_TYPE[cls] = _kind_of_type(cls)
    return kind


def _kind_of_type(cls: type) -> str:
    if issubclass(cls, nn.modules.conv._ConvNd):
        return "conv"
    if issubclass(cls, _ACTIVATIONS):
        return "act"
    if issubclass(cls, _POOLS):
        return "pool"
    if issubclass(cls, _NORMS):
        return "norm"
    if issubclass(cls, _LINEAR):
        return "linear"
    return "other"


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


# -- selecting capture points ----------------------------------------------------------------------
def _tokens(layers: str | Sequence[str] | None) -> list[str]:
    if layers is None:
        return ["conv"]
    if isinstance(layers, str):
        return [t.strip() for t in layers.split(",") if t.strip()] or ["conv"]
    return [str(t).strip() for t in layers if str(t).strip()]


def match_layers(candidates: Sequence[tuple[str, nn.Module]], layers: str | Sequence[str] | None) -> list[str]:
    """Names among ``candidates`` that ``layers`` asks for, in the candidates' order.

    ``layers`` is a kind (``conv``, ``relu``/``act``, ``pool``, ``norm``, ``linear``, ``other``),
    ``all`` (every leaf module), ``blocks`` (the repeated blocks of ResNets and transformers), an exact ``named_modules()`` path, or a glob pattern over the paths
    (``features.*``); several may be given as a list or comma-separated. Kind words win over a
    module of the same name; ``name:pool`` selects the module called ``pool``. ``path#k`` selects
    only the k-th call of a module called several times (``path#1`` its first call, which a capture
    keys ``path``); it is returned as ``path#k``, ``#1`` included (see :func:`split_calls`), so that
    ``path#1`` never widens to ``path``, which selects every call.
    """
    leaves = [(n, m) for n, m in candidates if _is_leaf(m)]
    all_names = [n for n, _ in candidates]
    wanted: set[str] = set()
    calls: dict[str, set[int]] = {}
    for token in _tokens(layers):
        low = token.lower()
        base, hash_, k = token.rpartition("#")
        if hash_ and base in all_names and k.isdigit() and int(k) >= 1:
            calls.setdefault(base, set()).add(int(k))
        elif token.startswith("name:"):  # a module literally called like a kind ("pool")
            token = low = token[len("name:") :]
            if token not in all_names:
                raise LayerError(f"no layer named {token!r}; use `featuremaps layers MODEL` to see the names")
            wanted.add(token)
        elif low in ("all", "leaf", "leaves"):
            wanted.update(n for n, _ in leaves)
        elif low in ("block", "blocks"):
            hits = _blocks(candidates)
            if not hits:
                raise LayerError(
                    "this model has no repeated blocks (ResNet's, a transformer's); use a kind (conv, relu...) or names "
                    "from `featuremaps layers MODEL`"
                )
            wanted.update(hits)
        elif low in KIND_ALIASES:
            kind = KIND_ALIASES[low]
            hits = [n for n, m in leaves if kind_of(m) == kind]
            if not hits:
                raise LayerError(
                    f"this model has no {token} layers; use `featuremaps layers MODEL` to see its layers and kinds"
                )
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
    out: list[str] = []
    for n, _ in candidates:
        if n in wanted:
            out.append(n)
        elif n in calls:
            out.extend(f"{n}#{k}" for k in sorted(calls[n]))
    return out


def _blocks(candidates: Sequence[tuple[str, nn.Module]]) -> list[str]:
    """The repeated blocks of a model: the children of every ``nn.Sequential``/``nn.ModuleList``
    whose children are all composite modules of one type (ResNet's BasicBlocks, a ViT's encoder
    blocks, Swin's and ConvNeXt's stage blocks); a plain stack of layers (VGG's ``features``) has none."""
    out = []
    for name, m in candidates:
        if not isinstance(m, (nn.Sequential, nn.ModuleList)):
            continue
        children = list(m.named_children())
        if children and all(not _is_leaf(c) for _, c in children) and len({type(c) for _, c in children}) == 1:
            prefix = f"{name}." if name else ""
            out.extend(prefix + n for n, _ in children)
    return out


def split_calls(names: Sequence[str]) -> tuple[list[str], dict[str, frozenset[int]]]:
    """Selected names -> the module paths to hook, and for paths selected only by ``path#k``, which
    calls to keep (``path`` alone: every call; ``path#1`` is the first call)."""
    paths: list[str] = []
    calls: dict[str, set[int]] = {}
    whole: set[str] = set()
    for name in names:
        base, hash_, k = name.rpartition("#")
        if hash_ and k.isdigit():
            calls.setdefault(base, set()).add(int(k))
            path = base
        else:
            whole.add(name)
            path = name
        if path not in paths:
            paths.append(path)
    return paths, {p: frozenset(ks) for p, ks in calls.items() if p not in whole}


def select_layers(
    model: Model | nn.Module,
    layers: str | Sequence[str] | None = "conv",
    *,
    modules: dict[str, nn.Module] | None = None,
) -> list[str]:
    """The ``named_modules()`` paths that ``layers`` selects (see :func:`match_layers`);
    ``modules``: ``dict(named_modules())`` when the caller already has it."""
    module = model if isinstance(model, nn.Module) else model.module
    named = modules.items() if modules is not None else module.named_modules()
    return match_layers([(n, m) for n, m in named if n], layers)


# -- names ---------------------------------------------------------------------------------------
def entry_name(path: str, call: int) -> str:
    """A capture's key: the module path, with ``#k`` for its k-th call (k >= 2)."""
    return path if call == 1 else f"{path}#{call}"


def layer_selector(key: str) -> str:
    """The ``layers=`` selection that captures exactly the call an entry name names: ``layer4`` ->
    ``layer4#1`` (its first call; never read as a kind such as ``norm``), ``layer4.1.relu#2`` as it is."""
    base, hash_, k = key.rpartition("#")
    return key if hash_ and k.isdigit() else f"{key}#1"


def entry_of(name: str) -> str:
    """The entry name a capture gives the call that ``name`` selects: ``path#1`` -> ``path``."""
    return name.removesuffix("#1")


def safe_name(text: str) -> str:
    """A layer name as a file-name part: ``features.28`` stays, ``layer1.0.relu#2`` -> ``layer1.0.relu_call2``."""
    text = text.replace("#", "_call")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "layer"


def file_stem(index: int, name: str) -> str:
    """The file stem of one captured map's files (``NNN_<name>``: its grid PNG, its raw ``.npy``)."""
    return f"{int(index):03d}_{safe_name(name)}"
