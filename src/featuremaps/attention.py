"""Attention maps of vision transformers: per-head probabilities, attention rollout, maps on the patch grid.

:func:`attention_maps` runs the model once with a forward hook on each requested attention module
and rebuilds ``softmax(q @ k.T / sqrt(d))`` from the module's own input and weights, so it works
whether or not the module computes the probabilities itself (timm's fused
``scaled_dot_product_attention`` path never does; torchvision's ViT asks ``nn.MultiheadAttention``
for ``need_weights=False``). The module and its flags are left as they are.

::

    probs = attention_maps(model, x, "blocks.3")                 # (N, heads, L, L)
    every = attention_maps(model, x, blocks=attention_modules(model))
    roll = attention_rollout(list(every.values()))             # (N, L, L)
    heat = token_attention_map(roll, input_size=(224, 224), layout=token_layout(model))  # (N, 14, 14)
"""

from __future__ import annotations

import difflib
import inspect
import math
import sys
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FeatureMapsError
from .tokens import TokenLayout, to_spatial

__all__ = [
    "HEAD_FUSIONS",
    "AttentionError",
    "attention_maps",
    "attention_modules",
    "attention_rollout",
    "token_attention_map",
]

#: How :func:`attention_rollout` fuses the heads of one layer.
HEAD_FUSIONS: tuple[str, ...] = ("mean", "max", "min")

_SUPPORTED = "torch.nn.MultiheadAttention (torchvision's ViT) and timm's Attention (timm ViT/DeiT)"


class AttentionError(FeatureMapsError, ValueError):
    """A block that is not (or holds no single) supported attention module, or unusable attention maps."""


class _Stop(Exception):
    """Raised by the last hook to skip the rest of the forward pass once every map is captured."""


def _timm_attention_class() -> type | None:
    """timm's ``Attention`` when timm is loaded (a model holding timm modules has loaded it)."""
    if "timm" not in sys.modules:
        return None
    try:
        from timm.layers import Attention
    except ImportError:  # pragma: no cover - a timm without timm.layers.Attention
        return None
    return Attention


def _kind(module: nn.Module) -> str | None:
    """Which rebuild fits ``module``: "mha", "timm", or None when :func:`attention_maps` cannot rebuild it."""
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    timm_attention = _timm_attention_class()
    # A subclass with its own forward may compute something else: refuse rather than guess.
    if (
        timm_attention is not None
        and isinstance(module, timm_attention)
        and type(module).forward is timm_attention.forward
    ):
        return "timm"
    return None


def attention_modules(model: nn.Module) -> tuple[str, ...]:
    """The ``named_modules()`` paths of the attention modules :func:`attention_maps` can read, in order."""
    return tuple(name for name, m in model.named_modules() if name and _kind(m) is not None)


def _examples(model: nn.Module) -> str:
    paths = attention_modules(model)
    if not paths:
        return f"this {type(model).__name__} has no attention module attention_maps supports ({_SUPPORTED})"
    shown = ", ".join(repr(p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
    return f"pass one of its {len(paths)} attention modules, e.g. {shown} (attention_modules(model) lists them)"


def _resolve(model: nn.Module, path: str, modules: dict[str, nn.Module]) -> nn.Module:
    """The attention module at ``path``, or the single one inside the block at ``path``."""
    if not isinstance(path, str):
        raise AttentionError(f"block must be a named_modules() path (a str), got {type(path).__name__}")
    if path not in modules:
        close = difflib.get_close_matches(path, [n for n in modules if n], n=3)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise AttentionError(f"no module named {path!r} in {type(model).__name__}; {hint}{_examples(model)}")
    module = modules[path]
    if _kind(module) is not None:
        return module
    inner = [(n, m) for n, m in module.named_modules() if n and _kind(m) is not None]
    if len(inner) == 1:
        return inner[0][1]
    label = repr(path) if path else "the model itself"
    if len(inner) > 1:
        names = [f"{path}.{n}" if path else n for n, _ in inner]
        shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
        raise AttentionError(
            f"{label} holds {len(inner)} attention modules; pass one of them ({shown}) or blocks=[...] for several"
        )
    name = type(module).__name__
    if "attention" in name.lower():
        raise AttentionError(
            f"{label} is a {name}, which attention_maps cannot rebuild (it supports {_SUPPORTED}); {_examples(model)}"
        )
    raise AttentionError(f"{label} ({name}) is not an attention module and holds none; {_examples(model)}")


def _bind(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, object]:
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError as exc:  # pragma: no cover - the forward itself would have failed first
        raise AttentionError(f"cannot read the arguments of {type(module).__name__}: {exc}") from None
    bound.apply_defaults()
    return dict(bound.arguments)


def _float_mask(mask: torch.Tensor, dtype: torch.dtype, *, true_blocks: bool) -> torch.Tensor:
    """An additive mask: bool masks give -inf where blocked (``True`` blocks if ``true_blocks``)."""
    if mask.dtype == torch.bool:
        blocked = mask if true_blocks else ~mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(blocked, float("-inf"))
    return mask.to(dtype)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax in at least float32 (a half-precision model gets float32 probabilities)."""
    return torch.promote_types(dtype, torch.float32)


def _mha_probabilities(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) of an ``nn.MultiheadAttention`` call, (N, heads, L, S)."""
    if module.bias_k is not None or module.add_zero_attn:
        raise AttentionError(
            "attention_maps does not rebuild nn.MultiheadAttention with add_bias_kv or add_zero_attn; "
            "call it with need_weights=True, average_attn_weights=False instead"
        )
    a = _bind(module, args, kwargs)
    query, key = a["query"], a["key"]
    unbatched = query.dim() == 2
    if unbatched:
        query, key = query.unsqueeze(0), key.unsqueeze(0)
    elif not module.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    embed, heads = module.embed_dim, module.num_heads
    head_dim = embed // heads
    bias = module.in_proj_bias
    bq, bk = (None, None) if bias is None else (bias[:embed], bias[embed : 2 * embed])
    if module._qkv_same_embed_dim:
        weight = module.in_proj_weight
        if a["query"] is a["key"] and a["key"] is a["value"]:
            # Self-attention: one projection with the packed weight, as the module does it.
            q, k, _ = F.linear(query, weight, bias).unflatten(-1, (3, embed)).unbind(-2)
        else:
            q = F.linear(query, weight[:embed], bq)
            k = F.linear(key, weight[embed : 2 * embed], bk)
    else:
        q = F.linear(query, module.q_proj_weight, bq)
        k = F.linear(key, module.k_proj_weight, bk)
    n, length, source = q.shape[0], q.shape[1], k.shape[1]
    dtype = _compute_dtype(q.dtype)
    q = q.to(dtype).view(n, length, heads, head_dim).transpose(1, 2)
    k = k.to(dtype).view(n, source, heads, head_dim).transpose(1, 2)
    logits = (q * math.sqrt(1.0 / float(head_dim))) @ k.transpose(-2, -1)

    attn_mask, padding = a.get("attn_mask"), a.get("key_padding_mask")
    if attn_mask is None and a.get("is_causal"):
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=q.device).triu(1)
    if attn_mask is not None:
        mask = _float_mask(attn_mask, dtype, true_blocks=True)
        logits = logits + (mask.view(n, heads, length, source) if mask.dim() == 3 else mask)
    if padding is not None:
        if unbatched:
            padding = padding.unsqueeze(0)
        logits = logits + _float_mask(padding, dtype, true_blocks=True).view(n, 1, 1, source)
    return logits.softmax(dim=-1)


def _timm_probabilities(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """softmax(q k^T * scale) of a timm ``Attention`` call, (N, heads, L, L), fused path or not."""
    a = _bind(module, args, kwargs)
    x = a["x"]
    n, length, _ = x.shape
    heads = module.num_heads
    head_dim = getattr(module, "head_dim", module.qkv.out_features // (3 * heads))
    # .forward(...) runs the submodules without their hooks: nobody else's hook sees this extra call.
    qkv = module.qkv.forward(x).reshape(n, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = module.q_norm.forward(q), module.k_norm.forward(k)
    dtype = _compute_dtype(q.dtype)
    q, k = q.to(dtype), k.to(dtype)
    # The fused path leaves the scale to scaled_dot_product_attention's default; the other uses .scale.
    scale = 1.0 / math.sqrt(q.shape[-1]) if getattr(module, "fused_attn", False) else module.scale
    logits = (q * scale) @ k.transpose(-2, -1)
    attn_mask = a.get("attn_mask")
    if a.get("is_causal"):
        logits = logits + torch.full((length, length), float("-inf"), dtype=dtype, device=q.device).triu(1)
    elif attn_mask is not None:
        logits = logits + _float_mask(attn_mask, dtype, true_blocks=False)  # SDPA: True = may attend
    return logits.softmax(dim=-1)


def attention_maps(
    model: nn.Module,
    x: torch.Tensor,
    block: str | None = None,
    *,
    blocks: Sequence[str] | None = None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Attention probabilities of one or several attention modules, from one forward pass.

    The model runs once in eval mode under ``torch.no_grad()`` (each module's training flag is
    restored afterwards) and stops once every requested module has run. The probabilities are
    rebuilt from each module's input with its own weights; the first call of a module counts.

    Args:
        model: the model; ``model(x)`` must run.
        x: its input batch.
        block: ``named_modules()`` path of an attention module, or of a block holding exactly one.
        blocks: several such paths instead of ``block``.

    Returns:
        ``block``: a (N, heads, L, S) tensor (S = L for self-attention), rows summing to 1, in at
        least float32, on the module's device. ``blocks``: a dict path -> tensor, in that order.

    Raises:
        AttentionError: neither or both of block/blocks, an unknown path, a path that is not an
            attention module (the message names what to pass), a module that did not run.
    """
    if (block is None) == (blocks is None):
        raise AttentionError("pass block='path' for one attention module or blocks=['path', ...] for several")
    paths = [block] if blocks is None else list(blocks)
    if blocks is not None and (isinstance(blocks, str) or not paths):
        raise AttentionError("blocks must be a non-empty list of named_modules() paths; for one, pass block='path'")
    named = dict(model.named_modules())
    targets: dict[str, nn.Module] = {p: _resolve(model, p, named) for p in paths}
    wanted = list(dict.fromkeys(targets.values()))
    captured: dict[nn.Module, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if module in captured:
            return
        rebuild = _mha_probabilities if _kind(module) == "mha" else _timm_probabilities
        captured[module] = rebuild(module, args, kwargs)
        if len(captured) == len(wanted):
            raise _Stop

    flags = [(m, m.training) for m in model.modules()]
    handles = []
    try:
        for module in wanted:
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        model.eval()
        with torch.no_grad():
            try:
                model(x)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
        for module, training in flags:
            module.training = training
    missing = [p for p, m in targets.items() if m not in captured]
    if missing:
        raise AttentionError(f"{', '.join(repr(p) for p in missing)} did not run in model(x); pick a block that runs")
    if blocks is None:
        return captured[targets[paths[0]]]
    return {p: captured[m] for p, m in targets.items()}


def _check_maps(maps: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(maps, torch.Tensor):
        raise AttentionError("maps must be a list of (N, heads, L, L) tensors, one per layer; wrap one in [...]")
    layers = list(maps.values()) if isinstance(maps, Mapping) else list(maps)
    if not layers:
        raise AttentionError("attention_rollout needs at least one layer's attention maps")
    first = None
    for i, m in enumerate(layers):
        if not isinstance(m, torch.Tensor) or m.dim() not in (3, 4) or m.shape[-1] != m.shape[-2]:
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise AttentionError(f"layer {i}: expected (N, heads, L, L) or (N, L, L) attention, got {shape}")
        key = (m.shape[0], m.shape[-1])
        if first is not None and key != first:
            raise AttentionError(f"layer {i}: (N, L) = {key} differs from layer 0's {first}; pass one model's maps")
        first = key
    return layers


def attention_rollout(
    maps: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    *,
    discard_ratio: float = 0.0,
    head_fusion: str = "mean",
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) through the layers, first layer first.

    Per layer: fuse the heads (``head_fusion``), zero the ``discard_ratio`` fraction of smallest
    entries of each sample's fused (L, L) matrix, add the identity (the residual connection),
    renormalise every row to sum 1; the rollout is the product A_last @ ... @ A_first.

    Args:
        maps: per layer (N, heads, L, L), or (N, L, L) already fused; a dict from
            :func:`attention_maps` works (its order is the layer order).
        discard_ratio: fraction in [0, 1) of the lowest fused weights dropped per layer.
        head_fusion: "mean", "max" or "min" over the heads.

    Returns:
        (N, L, L), row-stochastic: row i says how much output token i draws from each input token.

    Raises:
        AttentionError: no layers, shapes that disagree, a bad ratio or fusion.
    """
    layers = _check_maps(maps)
    if head_fusion not in HEAD_FUSIONS:
        raise AttentionError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, got {head_fusion!r}")
    if isinstance(discard_ratio, bool) or not isinstance(discard_ratio, (int, float)) or not 0 <= discard_ratio < 1:
        raise AttentionError(f"discard_ratio must be a number in [0, 1), got {discard_ratio!r}")
    n, length = layers[0].shape[0], layers[0].shape[-1]
    dtype = _compute_dtype(layers[0].dtype)
    device = layers[0].device
    eye = torch.eye(length, dtype=dtype, device=device)
    rollout = eye.expand(n, length, length)
    drop = int(discard_ratio * length * length)
    for layer in layers:
        layer = layer.to(device=device, dtype=dtype)
        if layer.dim() == 3:
            fused = layer
        elif head_fusion == "mean":
            fused = layer.mean(dim=1)
        elif head_fusion == "max":
            fused = layer.amax(dim=1)
        else:
            fused = layer.amin(dim=1)
        if drop:
            flat = fused.reshape(n, -1)
            lowest = flat.topk(drop, dim=-1, largest=False).indices
            fused = flat.scatter(1, lowest, 0.0).view(n, length, length)
        step = fused + eye
        step = step / step.sum(dim=-1, keepdim=True)
        rollout = step @ rollout
    return rollout


def token_attention_map(
    attention: torch.Tensor,
    *,
    input_size: tuple[int, int],
    layout: TokenLayout | None = None,
    token: int = 0,
    head: int | None = None,
) -> torch.Tensor:
    """One query token's attention over the patch grid (prefix tokens dropped), as (N, H, W).

    Args:
        attention: a rollout (N, L, L), or :func:`attention_maps` output (N, heads, L, L) with ``head``.
        input_size: (height, width) of the model's input.
        layout: from :func:`featuremaps.tokens.token_layout`; None guesses the prefix from L.
        token: the query row, 0 = the class token.
        head: which head of a (N, heads, L, L) tensor.

    Raises:
        AttentionError: a 4-D tensor without ``head``, an index out of range, or L that fits no patch grid.
    """
    if not isinstance(attention, torch.Tensor) or attention.dim() not in (3, 4):
        raise AttentionError("attention must be a (N, L, L) rollout or (N, heads, L, L) maps with head=i")
    if attention.dim() == 4:
        if head is None:
            raise AttentionError(
                f"attention has {attention.shape[1]} heads: pass head=i, fuse them (.mean(1)), or pass a rollout"
            )
        if not -attention.shape[1] <= head < attention.shape[1]:
            raise AttentionError(f"head {head} out of range for {attention.shape[1]} heads")
        attention = attention[:, head]
    elif head is not None:
        raise AttentionError("head= only applies to (N, heads, L, L) maps; this tensor has no head axis")
    if not -attention.shape[1] <= token < attention.shape[1]:
        raise AttentionError(f"token {token} out of range for {attention.shape[1]} query tokens")
    row = attention[:, token, :].unsqueeze(-1)  # (N, L, 1): tokens with one channel
    view = to_spatial(row, input_size=input_size, layout=layout)
    if view is None:
        raise AttentionError(
            f"{row.shape[1]} tokens fit no patch grid of input_size {tuple(input_size)}; "
            "pass layout=token_layout(model) and the size of the model's input"
        )
    return view.maps[:, 0]
