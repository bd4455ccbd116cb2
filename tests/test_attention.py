"""featuremaps.attention: per-head attention probabilities, rollout, and maps on the patch grid.

Oracles: timm's own unfused path (a hook on ``attn_drop``, which receives the softmax) on a deep
copy with ``fused_attn=False``; ``nn.MultiheadAttention(..., need_weights=True,
average_attn_weights=False)`` on the captured block input; a numpy rollout.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
import torchvision
from timm.layers import Attention
from torch import nn

from featuremaps.attention import (
    AttentionError,
    attention_maps,
    attention_modules,
    attention_rollout,
    token_attention_map,
)
from featuremaps.errors import FeatureMapsError
from featuremaps.tokens import token_layout


def unfused_oracle(model: nn.Module, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """Softmax of every block, from a deep copy running timm's explicit (unfused) path."""
    oracle = copy.deepcopy(model).eval()
    seen: dict[int, torch.Tensor] = {}
    for i, block in enumerate(oracle.blocks):
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_pre_hook(lambda m, a, i=i: seen.setdefault(i, a[0]))
    with torch.no_grad():
        oracle(x)
    return seen


def hooks_left(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs) for m in model.modules()
    )


@pytest.fixture(scope="module")
def timm_vit():
    """A 3-layer timm ViT with q/k norms whose weights matter (LayerNorm init is the identity)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48, depth=3, qk_norm=True)
    with torch.no_grad():
        for block in model.blocks:
            for norm in (block.attn.q_norm, block.attn.k_norm):
                norm.weight.copy_(1 + 0.5 * torch.randn_like(norm.weight))
                norm.bias.copy_(0.3 * torch.randn_like(norm.bias))
            block.attn.fused_attn = True
    return model.eval()


def test_timm_fused_path_equals_unfused_softmax(timm_vit):
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    oracle = unfused_oracle(timm_vit, x)
    got = attention_maps(timm_vit, x, blocks=["blocks.0.attn", "blocks.1", "blocks.2.attn"])
    assert list(got) == ["blocks.0.attn", "blocks.1", "blocks.2.attn"]
    for i, probs in enumerate(got.values()):
        assert probs.shape == (2, 3, 10, 10)
        # Block 0 sees the same input as the oracle; later blocks' inputs differ by SDPA's rounding.
        assert torch.allclose(probs, oracle[i], atol=1e-6 if i == 0 else 2e-5, rtol=0), i
        assert torch.allclose(probs.sum(-1), torch.ones(2, 3, 10), atol=1e-6)
    assert torch.equal(attention_maps(timm_vit, x, "blocks.1.attn"), got["blocks.1"])


def test_timm_deit_distilled_and_the_model_left_unchanged():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=64, depth=2)
    model.train()
    model.blocks[1].attn.training = False  # a mixed set of flags must come back as it was
    model.blocks[0].attn.fused_attn = False  # one block fused, one not
    model.blocks[1].attn.fused_attn = True
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = copy.deepcopy(model).eval()(x)
    got = attention_maps(model, x, blocks=["blocks.0", "blocks.1"])
    assert [m.training for m in model.modules()] == flags
    assert (model.blocks[0].attn.fused_attn, model.blocks[1].attn.fused_attn) == (False, True)
    assert hooks_left(model) == 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(model).eval()(x), before)
    oracle = unfused_oracle(model, x)
    assert torch.allclose(got["blocks.0"], oracle[0], atol=1e-6, rtol=0)
    assert torch.allclose(got["blocks.1"], oracle[1], atol=2e-5, rtol=0)
    # 2 prefix tokens: the class token's rollout row over the 4x4 patches.
    roll = attention_rollout(got)
    heat = token_attention_map(roll, input_size=(64, 64), layout=token_layout(model))
    assert heat.shape == (1, 4, 4)
    assert torch.equal(heat, roll[:, 0, 2:].reshape(1, 4, 4))
    head = token_attention_map(got["blocks.1"], input_size=(64, 64), layout=token_layout(model), head=2, token=1)
    assert torch.equal(head, got["blocks.1"][:, 2, 1, 2:].reshape(1, 4, 4))


class MaskedTimm(nn.Module):
    def __init__(self, *, causal: bool):
        super().__init__()
        self.attn = Attention(16, num_heads=4, qkv_bias=True)
        self.causal = causal

    def forward(self, x):
        if self.causal:
            return self.attn(x, is_causal=True)
        keep = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool)
        keep[:, 3] = False  # SDPA convention: True may attend
        return self.attn(x, attn_mask=keep)


@pytest.mark.parametrize("causal", [True, False])
def test_timm_masks(causal):
    torch.manual_seed(0)
    model = MaskedTimm(causal=causal).eval()
    model.attn.fused_attn = True
    x = torch.randn(2, 6, 16)
    probs = attention_maps(model, x, "attn")
    oracle = copy.deepcopy(model)
    oracle.attn.fused_attn = False
    seen = []
    oracle.attn.attn_drop.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        oracle(x)
    assert torch.allclose(probs, seen[0], atol=1e-6, rtol=0)
    if causal:
        assert torch.all(probs.triu(1) == 0)
    else:
        assert torch.all(probs[..., 3] == 0)


def tv_oracle(block: nn.Module, ln_out: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        _, weights = block.self_attention(ln_out, ln_out, ln_out, need_weights=True, average_attn_weights=False)
    return weights


def capture_attention_input(model: nn.Module, x: torch.Tensor, path: str) -> torch.Tensor:
    module = dict(model.named_modules())[path]
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]


def test_torchvision_vit_b_16_block_equals_need_weights():
    torch.manual_seed(0)
    model = torchvision.models.get_model("vit_b_16", weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    probs = attention_maps(model, x, "encoder.layers.encoder_layer_0")
    assert probs.shape == (1, 12, 197, 197)
    block = model.encoder.layers.encoder_layer_0
    oracle = tv_oracle(block, capture_attention_input(model, x, "encoder.layers.encoder_layer_0.self_attention"))
    assert torch.allclose(probs, oracle, atol=1e-6, rtol=0)
    assert torch.allclose(probs.sum(-1), torch.ones(1, 12, 197), atol=1e-5)
    assert hooks_left(model) == 0


def test_torchvision_small_vit_every_block_and_rollout():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=4, hidden_dim=32, mlp_dim=64
    )
    x = torch.randn(2, 3, 32, 32)
    paths = attention_modules(model)
    assert paths == tuple(f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(3))
    got = attention_maps(model, x, blocks=list(paths))
    assert model.training  # a fresh torchvision model is in training mode, and stays so
    for path, probs in got.items():
        block = dict(model.named_modules())[path.rsplit(".", 1)[0]]
        model.eval()
        oracle = tv_oracle(block, capture_attention_input(model, x, path))
        model.train()
        assert torch.allclose(probs, oracle, atol=1e-6, rtol=0), path
    heat = token_attention_map(attention_rollout(got), input_size=(32, 32), layout=token_layout(model))
    assert heat.shape == (2, 4, 4)


class MhaCall(nn.Module):
    """Calls nn.MultiheadAttention the other ways: sequence-first, masks, cross-attention with kdim."""

    def __init__(self, *, kdim: int | None):
        super().__init__()
        self.kdim = kdim
        self.mha = nn.MultiheadAttention(16, 4, batch_first=False, kdim=kdim, vdim=kdim)
        self.context = nn.Parameter(torch.randn(5, 1, kdim or 16))
        # Bool masks (True = blocked) for self-attention, additive float masks for cross-attention.
        padding = torch.zeros(2, 5, dtype=torch.bool)
        padding[1, 4] = True  # sample 1 ignores key 4
        bias = torch.randn(6, 5)
        if kdim is None:
            bias = bias > 1.0
            bias[:, 0] = False  # every query keeps a key
        else:
            padding = torch.zeros(2, 5).masked_fill(padding, float("-inf"))
        self.register_buffer("padding", padding)
        self.register_buffer("bias", bias)

    def arguments(self, x):
        kv = self.context.expand(-1, x.shape[1], -1) if self.kdim else x[:5]
        return (x, kv, kv), {"key_padding_mask": self.padding, "attn_mask": self.bias}

    def forward(self, x):
        args, kwargs = self.arguments(x)
        return self.mha(*args, need_weights=False, **kwargs)[0]


@pytest.mark.parametrize("kdim", [None, 8])
def test_multihead_attention_masks_and_layouts(kdim):
    torch.manual_seed(0)
    model = MhaCall(kdim=kdim).eval()
    x = torch.randn(6, 2, 16)  # (L, N, E): batch_first=False
    probs = attention_maps(model, x, "mha")
    args, kwargs = model.arguments(x)
    with torch.no_grad():
        _, oracle = model.mha(*args, need_weights=True, average_attn_weights=False, **kwargs)
    assert probs.shape == (2, 4, 6, 5)
    assert torch.allclose(probs, oracle, atol=1e-6, rtol=0)
    assert torch.all(probs[1, :, :, 4] == 0)
    if kdim is None:
        assert model.bias.any() and torch.all(probs[:, :, model.bias] == 0)


def numpy_rollout(layers: list[np.ndarray], discard_ratio: float, fusion: str) -> np.ndarray:
    n, _, length, _ = layers[0].shape
    out = np.zeros((n, length, length))
    for s in range(n):
        joint = np.eye(length)
        for a in layers:
            fused = {"mean": a[s].mean(0), "max": a[s].max(0), "min": a[s].min(0)}[fusion].copy()
            drop = int(discard_ratio * length * length)
            if drop:
                order = np.argsort(fused, axis=None)[:drop]
                fused.flat[order] = 0.0
            step = fused + np.eye(length)
            step = step / step.sum(axis=1, keepdims=True)
            joint = step @ joint
        out[s] = joint
    return out


@pytest.mark.parametrize(("discard_ratio", "fusion"), [(0.0, "mean"), (0.0, "max"), (0.4, "mean"), (0.25, "min")])
def test_rollout_against_numpy(discard_ratio, fusion):
    rng = np.random.default_rng(0)
    layers = []
    for _ in range(4):
        raw = rng.random((2, 3, 7, 7))
        layers.append(raw / raw.sum(-1, keepdims=True))
    got = attention_rollout([torch.from_numpy(a) for a in layers], discard_ratio=discard_ratio, head_fusion=fusion)
    assert got.dtype == torch.float64 and got.shape == (2, 7, 7)
    np.testing.assert_allclose(got.numpy(), numpy_rollout(layers, discard_ratio, fusion), rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.sum(-1).numpy(), 1.0, atol=1e-12)


def test_rollout_by_hand():
    """Two 2-token layers: A1 = [[.5,.5],[0,1]] fused -> (A1+I)/2 = [[.75,.25],[0,1]]; identity layer stays."""
    a1 = torch.tensor([[[[0.5, 0.5], [0.0, 1.0]]]])
    eye = torch.eye(2).view(1, 1, 2, 2)
    assert torch.allclose(attention_rollout([a1, eye]), torch.tensor([[[0.75, 0.25], [0.0, 1.0]]]))


@pytest.fixture(scope="module")
def small_tv():
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=8
    ).eval()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"block": "encoder.layers.encoder_layer_0.mlp"},
            r"\(MLPBlock\) is not an attention module and holds none; "
            r"pass one of its 2 attention modules, e\.g\. 'encoder\.layers\.encoder_layer_0\.self_attention'",
        ),
        (
            {"block": "encoder.layers.encoder_layer_9"},
            r"no module named .*did you mean 'encoder\.layers\.encoder_layer_1'",
        ),
        ({"block": "encoder"}, r"'encoder' holds 2 attention modules; pass one of them"),
        ({"block": ""}, r"the model itself holds 2 attention modules"),
        ({}, r"pass block='path' for one"),
        ({"block": "encoder", "blocks": ["encoder"]}, r"pass block='path' for one"),
        ({"blocks": "encoder.layers.encoder_layer_0"}, r"blocks must be a non-empty list"),
    ],
)
def test_errors_name_what_to_pass(small_tv, kwargs, match):
    with pytest.raises(AttentionError, match=match) as info:
        attention_maps(small_tv, torch.randn(1, 3, 16, 16), **kwargs)
    assert isinstance(info.value, FeatureMapsError)
    assert "\n" not in str(info.value)
    assert hooks_left(small_tv) == 0


def test_unsupported_attention_is_refused_by_name():
    torch.manual_seed(0)
    model = torchvision.models.get_model("swin_t", weights=None)
    with pytest.raises(AttentionError, match=r"is a ShiftedWindowAttention, which attention_maps cannot rebuild"):
        attention_maps(model, torch.randn(1, 3, 32, 32), "features.1.0.attn")
    with pytest.raises(AttentionError, match=r"has no attention module attention_maps supports"):
        attention_maps(model, torch.randn(1, 3, 32, 32), "features.1.0")


def test_hooks_removed_when_the_forward_fails(small_tv):
    with pytest.raises(AssertionError):  # torchvision's own check of the image size
        attention_maps(small_tv, torch.randn(1, 3, 24, 24), "encoder.layers.encoder_layer_1")
    assert hooks_left(small_tv) == 0 and not small_tv.training


def test_a_block_that_does_not_run():
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.MultiheadAttention(8, 2, batch_first=True)
            self.unused = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.used(x, x, x)[0]

    with pytest.raises(AttentionError, match=r"'unused' did not run in model\(x\)"):
        attention_maps(TwoBranches(), torch.randn(1, 4, 8), blocks=["used", "unused"])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: attention_rollout([]), "at least one layer"),
        (lambda: attention_rollout(torch.rand(1, 2, 3, 3)), r"wrap one in \[\.\.\.\]"),
        (lambda: attention_rollout([torch.rand(1, 2, 3, 3), torch.rand(1, 2, 4, 4)]), r"layer 1: \(N, L\)"),
        (lambda: attention_rollout([torch.rand(1, 2, 3, 4)]), r"layer 0: expected \(N, heads, L, L\)"),
        (lambda: attention_rollout([torch.rand(1, 2, 3, 3)], head_fusion="sum"), "head_fusion must be one of"),
        (lambda: attention_rollout([torch.rand(1, 2, 3, 3)], discard_ratio=1.0), r"discard_ratio must be .* \[0, 1\)"),
        (lambda: token_attention_map(torch.rand(1, 2, 5, 5), input_size=(16, 16)), "pass head=i"),
        (lambda: token_attention_map(torch.rand(1, 5, 5), input_size=(16, 16), token=5), "token 5 out of range"),
        (lambda: token_attention_map(torch.rand(1, 7, 7), input_size=(224, 224)), "7 tokens fit no patch grid"),
    ],
)
def test_rollout_and_map_errors(call, match):
    with pytest.raises(AttentionError, match=match):
        call()
