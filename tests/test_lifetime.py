"""featuremaps lets a model go: once the caller drops it, nothing featuremaps remembered about it
(layer paths, where a pass may stop, receptive fields, CAM layers, portrait fingerprints) keeps
it or its weights alive. A long notebook session or the viewer loads many models in turn: each one
kept would hold all its weights until the process ends."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torchvision
from torch import nn

import featuremaps as fm
from conftest import TinyNet
from featuremaps.receptive import receptive_fields


class Residual(nn.Module):
    """Forward code that is not a plain Sequential, with ``out += x`` written into a captured output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.conv(x)
        out += x
        return self.relu(out)


def _x(side: int = 32) -> torch.Tensor:
    return torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(3))


CALLS = {
    "capture": lambda m: fm.capture(m, _x()),
    "capture all layers twice": lambda m: (fm.capture(m, _x(), layers="all"), fm.capture(m, _x(), layers="all")),
    "capture reduced": lambda m: fm.capture(m, _x(), layers="all", reduce="mean"),
    "capture a chain": lambda m: fm.capture(m, _x(), mode="conv-relu"),
    "capture a batch": lambda m: fm.capture(m, torch.cat([_x(), _x()])),
    "capture for grad": lambda m: fm.capture_for_grad(m, _x(), layers="conv"),
    "list_layers": lambda m: fm.list_layers(m, size=32),
    "cam": lambda m: fm.cam(m, _x(), target=1),
    "receptive fields": lambda m: receptive_fields(m, (32, 32), ["features.3"]),
    "portrait": lambda m: fm.portrait(m, "features.3", [0], size=16, steps=2),
}


def _drop(make, call) -> weakref.ref:
    model = make()
    result = call(model)
    ref = weakref.ref(model)
    del model, result
    return ref


@pytest.mark.parametrize("name", list(CALLS))
def test_a_dropped_model_is_freed(name):
    def make():
        torch.manual_seed(0)
        return TinyNet().eval()

    ref = _drop(make, CALLS[name])
    gc.collect()
    assert ref() is None, f"after {name}, featuremaps still holds the model"


def test_a_dropped_residual_model_is_freed():
    """The path that copies outputs forward() code writes into, and in-place guards."""
    ref = _drop(
        lambda: nn.Sequential(Residual(), nn.Conv2d(3, 2, 1)).eval(), lambda m: fm.capture(m, _x(), layers="all")
    )
    gc.collect()
    assert ref() is None


def test_a_loaded_model_and_its_weights_are_freed():
    """A featuremaps Model from load_model (random weights), captured: its parameters are freed too."""

    def make():
        torch.manual_seed(0)
        return fm.load_model("alexnet", "random")

    model = make()
    maps = fm.capture(model, _x(64), layers="all")
    assert len(maps.entries) > 10
    refs = [weakref.ref(model.module)] + [weakref.ref(p) for p in model.module.parameters()]
    del model, maps
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)


def test_what_was_learned_still_works_while_the_model_lives():
    """Held weakly, the learned record keeps serving: the second capture equals the first."""
    torch.manual_seed(0)
    model = torchvision.models.vgg11().eval()
    x = _x(32)
    first = fm.capture(model, x, layers="features.*")
    second = fm.capture(model, x, layers="features.*")
    assert [e.name for e in first.entries] == [e.name for e in second.entries]
    for a, b in zip(first.entries, second.entries):
        assert torch.equal(a.tensor, b.tensor)
