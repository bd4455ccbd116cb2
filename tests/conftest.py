"""Shared fixtures: tiny seeded models and images made on the spot; nothing is downloaded."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

# Never reach for the network from a test: a pretrained request must fail fast, not hang.
os.environ.setdefault("FEATUREMAPS_TEST", "1")


class TinyNet(nn.Module):
    """A small VGG-like classifier: a plain sequential conv stack with in-place ReLUs."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(6, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def tiny_net() -> TinyNet:
    """Factory used by the ``module:attr`` tests."""
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torch hub cache and a network that refuses every download."""
    import urllib.error

    import torch.hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)  # the one step that needs the network
    return tmp_path / "torch-home"
