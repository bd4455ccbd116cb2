"""The seed's three chains against explicit loops of F.conv2d / F.relu / F.max_pool2d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import get_model

import featuremaps as fm
from featuremaps.errors import LayerError


def explicit_loop(model: nn.Module, x: torch.Tensor, chain: str) -> list[tuple[str, torch.Tensor]]:
    """The seed's loop written out by hand with functional ops and the model's own weights."""
    out = []
    layers = list(model.features.named_children())
    with torch.no_grad():
        for i, (name, layer) in enumerate(layers):
            path = f"features.{name}"
            if isinstance(layer, nn.Conv2d):
                x = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding)
                nxt = layers[i + 1][1] if i + 1 < len(layers) else None
                if isinstance(nxt, nn.BatchNorm2d):
                    x = F.batch_norm(x, nxt.running_mean, nxt.running_var, nxt.weight, nxt.bias, False, 0.0, nxt.eps)
                out.append((path, x))
            elif isinstance(layer, nn.ReLU) and chain == "conv-relu":
                x = F.relu(x)
                out.append((path, x))
            elif isinstance(layer, nn.MaxPool2d) and chain == "conv-pool":
                x = F.max_pool2d(x, layer.kernel_size, layer.stride, layer.padding)
                out.append((path, x))
    return out


@pytest.mark.parametrize("arch", ["vgg11", "vgg11_bn", "alexnet"])
@pytest.mark.parametrize("chain", ["conv", "conv-relu", "conv-pool"])
def test_chain_equals_explicit_loop(arch, chain):
    torch.manual_seed(0)
    model = get_model(arch, weights=None).eval()
    if arch.endswith("_bn"):  # non-trivial running statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 64, 64)
    maps = fm.capture(model, x, mode=chain)
    want = explicit_loop(model, x, chain)
    assert maps.names == [n for n, _ in want]
    assert maps.mode == chain
    for (name, expected), entry in zip(want, maps.entries):
        torch.testing.assert_close(entry.tensor, expected, rtol=1e-5, atol=1e-5, msg=name)


def test_vgg16_chain_shapes_match_the_seed():
    torch.manual_seed(0)
    model = get_model("vgg16", weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    conv = fm.capture(model, x, mode="conv", reduce="mean")
    assert len(conv) == 13 and all(e.shape[-2:] == (224, 224) for e in conv.entries)
    pool = fm.capture(model, x, mode="conv-pool", reduce="mean")
    assert len(pool) == 18
    assert [e.shape[-1] for e in pool.select(kind="pool").entries] == [112, 56, 28, 14, 7]
    relu = fm.capture(model, x, mode="conv-relu", reduce="mean")
    assert len(relu) == 26 and len(relu.select(kind="act")) == 13


def test_the_numbers_show_the_seeds_observations():
    """ReLU darkens (means fall and zeros appear); pooling shrinks but keeps brightness."""
    torch.manual_seed(0)
    model = get_model("vgg11", weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    conv = fm.capture(model, x, mode="conv").stats()
    relu = fm.capture(model, x, mode="conv-relu").select(kind="act").stats()
    assert all(r.zero_fraction > 0.2 for r in relu) and all(c.zero_fraction == 0 for c in conv)
    assert all(r.min == 0 for r in relu) and all(c.min < 0 for c in conv)
    pool = fm.capture(model, x, mode="conv-pool").select(kind="pool").stats()
    assert [p.shape[-1] for p in pool] == [32, 16, 8, 4, 2]


def test_chains_leave_the_model_unchanged():
    torch.manual_seed(0)
    model = get_model("alexnet", weights=None).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fm.capture(model, torch.randn(1, 3, 64, 64), mode="conv-relu")
    assert model.training and all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_chain_reduction_keeps_only_reduced_maps():
    torch.manual_seed(0)
    model = get_model("vgg11", weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    full = fm.capture(model, x, mode="conv")
    red = fm.capture(model, x, mode="conv", reduce="l2")
    for name in full:
        assert red[name].tensor.ndim == 3
        torch.testing.assert_close(red[name].tensor, torch.linalg.vector_norm(full[name].tensor, dim=1))
        assert red[name].stats == full[name].stats


def test_chain_layer_filter_keeps_only_asked_steps():
    torch.manual_seed(0)
    model = get_model("vgg11", weights=None).eval()
    maps = fm.capture(model, torch.randn(1, 3, 32, 32), mode="conv-relu", layers="relu")
    assert len(maps) == 8 and {e.kind for e in maps.entries} == {"act"}


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_models_without_a_sequential_conv_stack_point_to_network_mode(arch):
    model = get_model(arch, weights=None)
    with pytest.raises(LayerError, match=r"has no plain sequential conv stack.*use mode 'network'"):
        fm.capture(model, torch.randn(1, 3, 32, 32), mode="conv")


def test_reduced_chain_gives_memory_back_after_every_step(monkeypatch):
    import featuremaps.chains as chains

    calls = []
    monkeypatch.setattr(chains, "release_freed_memory", lambda: calls.append(1))
    torch.manual_seed(0)
    model = get_model("vgg11", weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    reduced = fm.capture(model, x, mode="conv-relu", reduce="mean")
    assert len(calls) == len(reduced) == 16  # 8 convs + 8 ReLUs: one release per step
    full = fm.capture(model, x, mode="conv-relu")
    assert len(calls) == 16 and len(full) == 16  # full maps are all kept: nothing to give back
    for a, b in zip(reduced.entries, full.entries):  # and the reduction is of the same maps
        torch.testing.assert_close(a.tensor, b.tensor.mean(dim=1), rtol=0, atol=1e-6)


def test_a_chain_stops_after_the_last_wanted_step():
    model = fm.load_model("vgg11", weights="random", size=32)
    ran = []
    handles = [
        m.register_forward_hook(lambda *a, n=n: ran.append(n)) for n, m in model.module.features.named_children()
    ]
    try:
        maps = fm.capture(model, torch.zeros(1, 3, 32, 32), mode="conv", layers="features.0")
    finally:
        for h in handles:
            h.remove()
    assert maps.names == ["features.0"] and ran == ["0"]
