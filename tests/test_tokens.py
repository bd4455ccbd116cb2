"""featuremaps.tokens: transformer outputs (tokens, channels-last) as (N, C, H, W) maps.

Random seeded weights throughout; the oracles are the models' own tensors (the patch-embedding
conv before it is flattened, torchvision Swin's final permute) or index-by-index loops.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

from featuremaps.tokens import (
    COMMON_STRIDES,
    SpatialView,
    TokenLayout,
    TokenLayoutError,
    to_spatial,
    token_layout,
)


def run_with_hooks(model: nn.Module, x: torch.Tensor, names: list[str], *, inputs: tuple[str, ...] = ()) -> dict:
    """Outputs (and, for names in ``inputs``, first inputs under "<name>:in") of the named modules."""
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(lambda m, a, out, n=name: seen.setdefault(n, out)))
        for name in inputs:
            handles.append(
                modules[name].register_forward_pre_hook(lambda m, a, n=name: seen.setdefault(n + ":in", a[0]))
            )
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    seen["logits"] = logits
    return seen


def loop_maps(tokens: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """(N, L, C) -> (N, C, gh, gw) one patch at a time: token prefix + i * gw + j is patch (i, j)."""
    n, _, c = tokens.shape
    gh, gw = grid
    out = torch.empty(n, c, gh, gw, dtype=tokens.dtype)
    for i in range(gh):
        for j in range(gw):
            out[:, :, i, j] = tokens[:, prefix + i * gw + j, :]
    return out


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.fixture(scope="module")
def tv_vit():
    torch.manual_seed(0)
    model = torchvision.models.get_model("vit_b_16", weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    names = ["conv_proj", "encoder.layers.encoder_layer_3", "encoder.ln", "heads"]
    return model, run_with_hooks(model, x, names, inputs=("encoder",))


def test_torchvision_vit_layout_and_encoder_block(tv_vit):
    model, seen = tv_vit
    layout = token_layout(model)
    assert layout == TokenLayout(
        num_prefix_tokens=1, patch_size=(16, 16), grid_size=(14, 14), strides=((16, 16),), family="vit"
    )
    out = seen["encoder.layers.encoder_layer_3"]
    assert out.shape == (1, 197, 768)
    view = to_spatial(out, input_size=(224, 224), layout=layout)
    assert view.kind == "tokens" and view.stride == (16, 16)
    assert view.maps.shape == (1, 768, 14, 14)
    # Independent: drop token 0, reshape to 14x14, permute.
    assert torch.equal(view.maps, out[:, 1:, :].reshape(1, 14, 14, 768).permute(0, 3, 1, 2))
    assert torch.equal(view.maps, loop_maps(out, 1, (14, 14)))
    assert torch.equal(view.prefix, out[:, :1])
    assert shares_memory(view.maps, out) and shares_memory(view.prefix, out)


def test_torchvision_vit_tokens_line_up_with_conv_proj(tv_vit):
    """The encoder's input is [class token, conv_proj flattened]: its patch maps are conv_proj's output."""
    model, seen = tv_vit
    layout = token_layout(model)
    conv = seen["conv_proj"]
    view = to_spatial(conv, input_size=(224, 224), layout=layout)
    assert view.kind == "spatial" and view.maps is conv and view.prefix is None
    tokens = to_spatial(seen["encoder:in"], input_size=(224, 224), layout=layout)
    assert torch.equal(tokens.maps, conv)
    assert torch.equal(tokens.prefix[0, 0], model.class_token[0, 0].detach())
    assert to_spatial(seen["encoder.ln"], input_size=(224, 224), layout=layout).maps.shape == (1, 768, 14, 14)
    assert to_spatial(seen["heads"], input_size=(224, 224), layout=layout) is None  # (N, 1000) logits


def test_timm_deit_distilled_two_prefix_tokens():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=64).eval()
    layout = token_layout(model)
    assert (layout.num_prefix_tokens, layout.patch_size, layout.grid_size, layout.family) == (
        2,
        (16, 16),
        (4, 4),
        "vit",
    )
    x = torch.randn(2, 3, 64, 64)
    seen = run_with_hooks(model, x, ["patch_embed.proj", "patch_embed", "pos_drop", "blocks.5", "norm"])
    out = seen["blocks.5"]
    assert out.shape == (2, 18, 192)
    view = to_spatial(out, input_size=(64, 64), layout=layout)
    assert view.maps.shape == (2, 192, 4, 4)
    assert torch.equal(view.maps, loop_maps(out, 2, (4, 4)))
    assert torch.equal(view.prefix, out[:, :2])  # class and distillation tokens, what was dropped
    # Before the position embedding: prefix = the model's own class and distillation tokens.
    pre = to_spatial(seen["pos_drop"], input_size=(64, 64), layout=layout)
    assert pre.prefix.shape == (2, 2, 192)
    # patch_embed's own output has no prefix yet; its maps are the conv's output before flattening.
    patches = to_spatial(seen["patch_embed"], input_size=(64, 64), layout=layout)
    assert patches.prefix is None and torch.equal(patches.maps, seen["patch_embed.proj"])
    assert to_spatial(seen["logits"], input_size=(64, 64), layout=layout) is None


def test_timm_vit_with_registers_non_square():
    assert "vit_small_patch14_reg4_dinov2" in timm.list_models("*reg*")
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=(56, 84)).eval()
    layout = token_layout(model)
    assert (layout.num_prefix_tokens, layout.patch_size, layout.grid_size) == (5, (14, 14), (4, 6))
    x = torch.randn(2, 3, 56, 84)
    seen = run_with_hooks(model, x, ["patch_embed.proj", "pos_drop", "blocks.11"])
    out = seen["blocks.11"]
    assert out.shape == (2, 5 + 24, 384)
    view = to_spatial(out, input_size=(56, 84), layout=layout)
    assert view.maps.shape == (2, 384, 4, 6)
    assert torch.equal(view.maps, loop_maps(out, 5, (4, 6)))
    assert torch.equal(view.prefix, out[:, :5])
    # no_embed_class: the prefix is [cls, 4 registers] untouched; the patches are conv + position embedding.
    pre = to_spatial(seen["pos_drop"], input_size=(56, 84), layout=layout)
    assert torch.equal(pre.prefix[:, 0], model.cls_token[:, 0].detach().expand(2, -1))
    assert torch.equal(pre.prefix[:, 1:], model.reg_token.detach().expand(2, -1, -1))
    pos = loop_maps(model.pos_embed.detach(), 0, (4, 6))
    assert torch.allclose(pre.maps, seen["patch_embed.proj"] + pos, atol=1e-6, rtol=0)


def test_timm_dynamic_size_vit_224x320():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True, depth=2).eval()
    layout = token_layout(model)
    assert layout.channels_last  # dynamic_img_size: patch_embed hands (N, gh, gw, C) on
    x = torch.randn(1, 3, 224, 320)
    seen = run_with_hooks(model, x, ["patch_embed.proj", "patch_embed", "blocks.1"])
    nhwc = seen["patch_embed"]
    assert nhwc.shape == (1, 14, 20, 192)
    view = to_spatial(nhwc, input_size=(224, 320), layout=layout)
    assert view.kind == "channels_last" and torch.equal(view.maps, seen["patch_embed.proj"])
    out = seen["blocks.1"]
    tokens = to_spatial(out, input_size=(224, 320), layout=layout)
    assert tokens.maps.shape == (1, 192, 14, 20)
    assert torch.equal(tokens.maps, loop_maps(out, 1, (14, 20)))
    # Without the layout the prefix (1) and the stride (16) are guessed from L = 281 alone.
    guessed = to_spatial(out, input_size=(224, 320))
    assert guessed.stride == (16, 16) and torch.equal(guessed.maps, tokens.maps)


def test_torchvision_swin_stages_channels_last_non_square():
    torch.manual_seed(0)
    model = torchvision.models.get_model("swin_t", weights=None).eval()
    layout = token_layout(model)
    assert layout.family == "swin" and layout.channels_last
    assert layout.strides == ((4, 4), (8, 8), (16, 16), (32, 32))
    x = torch.randn(1, 3, 64, 96)
    stages = ["features.0", "features.1", "features.3", "features.5", "features.7"]
    seen = run_with_hooks(model, x, [*stages, "norm", "permute"])
    grids = [(16, 24), (16, 24), (8, 12), (4, 6), (2, 3)]
    for name, grid in zip(stages, grids):
        out = seen[name]
        assert tuple(out.shape[1:3]) == grid
        view = to_spatial(out, input_size=(64, 96), layout=layout)
        assert view.kind == "channels_last", name
        assert torch.equal(view.maps, out.permute(0, 3, 1, 2))
        assert view.maps[0, 5, 1, 2] == out[0, 1, 2, 5]
        assert shares_memory(view.maps, out)
    # The model's own NHWC -> NCHW permute is what to_spatial makes of the final norm's output.
    assert torch.equal(to_spatial(seen["norm"], input_size=(64, 96), layout=layout).maps, seen["permute"])
    # The permuted (N, 768, 2, 3) is NCHW already and must not be transposed again.
    same = to_spatial(seen["permute"], input_size=(64, 96), layout=layout)
    assert same.kind == "spatial" and same.maps is seen["permute"]


def test_timm_swin_layout_and_stage():
    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=4, depths=(1, 1, 1, 1)
    ).eval()
    layout = token_layout(model)
    assert (layout.family, layout.channels_last, layout.num_prefix_tokens) == ("swin", True, 0)
    seen = run_with_hooks(model, torch.randn(1, 3, 64, 64), ["layers.1"])
    view = to_spatial(seen["layers.1"], input_size=(64, 64), layout=layout)
    assert view.kind == "channels_last" and view.stride == (8, 8)
    assert torch.equal(view.maps, seen["layers.1"].permute(0, 3, 1, 2))


def test_torchvision_convnext_block_inside_is_channels_last():
    torch.manual_seed(0)
    model = torchvision.models.get_model("convnext_tiny", weights=None).eval()
    layout = token_layout(model)
    assert layout.family == "convnext" and layout.strides == ((4, 4), (8, 8), (16, 16), (32, 32))
    names = ["features.1.0.block.0", "features.1.0.block.1", "features.1.0.block.2", "features.1.0"]
    seen = run_with_hooks(model, torch.randn(1, 3, 32, 32), names)
    dwconv, permuted, norm = (seen[n] for n in names[:3])
    assert permuted.shape == (1, 8, 8, 96)
    view = to_spatial(permuted, input_size=(32, 32), layout=layout)
    assert view.kind == "channels_last" and torch.equal(view.maps, dwconv)
    assert to_spatial(norm, input_size=(32, 32), layout=layout).kind == "channels_last"
    assert to_spatial(seen["features.1.0"], input_size=(32, 32), layout=layout).kind == "spatial"


def test_unknown_models_give_an_empty_layout_and_shapes_decide():
    assert token_layout(nn.Sequential(nn.Conv2d(3, 4, 3))) == TokenLayout()
    assert token_layout(timm.create_model("resnet10t", pretrained=False)) == TokenLayout()
    torch.manual_seed(0)
    tokens = torch.randn(2, 50, 8)  # 1 + 7x7 at stride 32 of 224
    view = to_spatial(tokens, input_size=(224, 224))
    assert (view.stride, view.prefix.shape, view.maps.shape) == ((32, 32), (2, 1, 8), (2, 8, 7, 7))
    assert torch.equal(view.maps, loop_maps(tokens, 1, (7, 7)))
    nchw = torch.randn(2, 64, 56, 56)
    assert to_spatial(nchw, input_size=(224, 224)).maps is nchw
    nhwc = torch.randn(2, 56, 56, 64)
    assert torch.equal(to_spatial(nhwc, input_size=(224, 224)).maps, nhwc.permute(0, 3, 1, 2))
    # Both readings are grids (C = H = W = 56): NCHW unless the layout says channels-last.
    cube = torch.randn(1, 56, 56, 56)
    assert to_spatial(cube, input_size=(224, 224)).kind == "spatial"
    swinish = TokenLayout(num_prefix_tokens=0, strides=((4, 4),), channels_last=True, family="swin")
    assert to_spatial(cube, input_size=(224, 224), layout=swinish).kind == "channels_last"


@pytest.mark.parametrize(
    "output",
    [
        torch.randn(2, 10),  # logits
        torch.randn(2, 7, 16),  # 7 tokens: no grid of 224x224 leaves 0..16 prefix tokens
        torch.randn(2, 3, 4, 5, 6),
        (torch.randn(1, 197, 8), None),  # nn.MultiheadAttention's (output, weights) tuple
        None,
    ],
)
def test_not_spatial_gives_none(output):
    assert to_spatial(output, input_size=(224, 224)) is None


def test_attention_matrix_of_a_vit_layout_is_not_a_map():
    layout = TokenLayout(num_prefix_tokens=2, patch_size=(16, 16), strides=((16, 16),), family="vit")
    probs = torch.rand(2, 3, 18, 18)
    assert to_spatial(probs, input_size=(64, 64), layout=layout) is None
    assert to_spatial(probs, input_size=(64, 64)).kind == "spatial"  # no layout: taken as NCHW


def test_known_prefix_is_not_guessed():
    layout = TokenLayout(num_prefix_tokens=2, patch_size=(16, 16), strides=((16, 16),), family="vit")
    assert to_spatial(torch.randn(1, 17, 4), input_size=(64, 64), layout=layout) is None  # 1 + 16: wrong prefix
    assert to_spatial(torch.randn(1, 17, 4), input_size=(64, 64)).prefix.shape == (1, 1, 4)


@pytest.mark.parametrize("size", [224, (224,), (0, 224), (224.0, 224), "224"])
def test_bad_input_size(size):
    with pytest.raises(TokenLayoutError, match="input_size must be the model input's"):
        to_spatial(torch.randn(1, 197, 8), input_size=size)


def test_bad_layout():
    with pytest.raises(TokenLayoutError, match="num_prefix_tokens must be an int >= 0"):
        TokenLayout(num_prefix_tokens=-1)
    with pytest.raises(TokenLayoutError, match="patch_size must be a pair"):
        TokenLayout(patch_size=16)


def test_results_are_frozen():
    view = to_spatial(torch.randn(1, 197, 8), input_size=(224, 224))
    assert isinstance(view, SpatialView)
    with pytest.raises(AttributeError):
        view.kind = "spatial"
    assert 16 in COMMON_STRIDES
