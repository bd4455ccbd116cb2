"""The planted model and generated pictures the atlas tests share (also loaded by the CLI as
``tests/test_atlas_model.py:planted_net``), and checks that the planted filters respond as designed.

``PlantedNet``: conv1 (3 -> 2, 3x3, padding 1) -> ReLU -> max-pool 2 -> conv2 (2 -> 2, 3x3,
padding 1, centre tap only) -> ReLU. Channel 0 of conv1 is a red detector (``R - (G + B) / 2`` of
the ImageNet-normalized input, averaged over the window, minus 1): only red pixels drive it above
zero, and it is highest where its whole window is red. Channel 1 is a vertical-edge detector (a
Sobel-x kernel on the three channels): dark on the left, bright on the right. conv2 passes each
channel on (centre tap 1) after the pool, so its receptive field is 8 px (3, then +1 by the pool,
then +2x2 by the second 3x3 conv) with stride 2.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

GRAY = (128, 128, 128)
RED = (255, 0, 0)
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


class PlantedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 2, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2, 2, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            w = torch.zeros(2, 3, 3, 3)
            w[0, 0] = 1.0 / 9
            w[0, 1] = w[0, 2] = -0.5 / 9
            sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
            w[1] = sobel / 3
            conv1 = self.features[0]
            conv1.weight.copy_(w)
            conv1.bias.copy_(torch.tensor([-1.0, -0.5]))
            conv2 = self.features[3]
            conv2.weight.zero_()
            conv2.weight[0, 0, 1, 1] = 1.0
            conv2.weight[1, 1, 1, 1] = 1.0
            conv2.bias.zero_()
            self.fc.weight.copy_(torch.arange(6.0).view(3, 2) / 6)
            self.fc.bias.zero_()

    def forward(self, x):
        delay = float(os.environ.get("FEATUREMAPS_TEST_DELAY", "0") or 0)  # the kill tests slow it down
        if delay:
            time.sleep(delay)
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def planted_net() -> PlantedNet:
    """Factory for ``--model tests/test_atlas_model.py:planted_net``."""
    return PlantedNet().eval()


class RandomNet(nn.Module):
    """A small seeded net with in-place ReLUs and a pool, for value checks against fm.capture."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(5, 7, 3, stride=2), nn.ReLU(inplace=True),
        )  # fmt: skip
        self.head = nn.Linear(7, 2)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def random_net() -> RandomNet:
    return RandomNet().eval()


# -- pictures ----------------------------------------------------------------------------------------
def square(size_wh: tuple[int, int], box: tuple[int, int, int, int], colour=RED, background=GRAY) -> Image.Image:
    """A ``(width, height)`` picture of ``background`` with ``colour`` in rows top..bottom-1, cols left..right-1."""
    w, h = size_wh
    a = np.empty((h, w, 3), np.uint8)
    a[:] = background
    t, le, b, r = box
    a[t:b, le:r] = colour
    return Image.fromarray(a)


def vertical_edge(size_wh: tuple[int, int], col: int) -> Image.Image:
    w, h = size_wh
    a = np.zeros((h, w, 3), np.uint8)
    a[:, col:] = 255
    return Image.fromarray(a)


def horizontal_edge(size_wh: tuple[int, int], row: int) -> Image.Image:
    """Dark gray above ``row``, light gray below: mid tones, so that the zero padding (the mean
    colour after normalization) makes no vertical edge at the picture's left and right borders."""
    w, h = size_wh
    a = np.full((h, w, 3), 90, np.uint8)
    a[row:] = 160
    return Image.fromarray(a)


def noise(size_wh: tuple[int, int], seed: int) -> Image.Image:
    w, h = size_wh
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 80 + 80).astype(np.uint8))  # dull: no red, no strong edge


#: name -> (picture, the red square's box in original pixels or None)
def planted_pictures() -> dict[str, tuple[Image.Image, tuple[int, int, int, int] | None]]:
    return {
        "a_red.png": (square((32, 32), (8, 16, 16, 24)), (8, 16, 16, 24)),
        "b_red_large.png": (square((64, 64), (32, 8, 48, 24)), (32, 8, 48, 24)),
        "c_red_wide.png": (square((96, 48), (12, 24, 36, 72)), (12, 24, 36, 72)),
        "d_red_corner.png": (square((32, 32), (0, 0, 10, 10)), (0, 0, 10, 10)),
        "e_green.png": (square((32, 32), (8, 8, 20, 20), colour=(0, 200, 0)), None),
        "f_blue.png": (square((40, 40), (4, 4, 30, 30), colour=(0, 0, 255)), None),
        "g_noise.png": (noise((48, 32), 1), None),
        "h_vedge.png": (vertical_edge((32, 32), 10), None),
        "i_vedge_large.png": (vertical_edge((64, 64), 40), None),
        "j_hedge.png": (horizontal_edge((32, 32), 12), None),
        "k_noise.jpg": (noise((40, 56), 2), None),
    }


def write_planted(folder: Path) -> dict[str, tuple[int, int, int, int] | None]:
    folder.mkdir(parents=True, exist_ok=True)
    boxes = {}
    for name, (picture, box) in planted_pictures().items():
        picture.save(folder / name, quality=95) if name.endswith(".jpg") else picture.save(folder / name)
        boxes[name] = box
    return boxes


def normalized(picture: Image.Image, size: int = 32) -> np.ndarray:
    """The model's input as numpy ``(3, H, W)``, computed here without featuremaps: PIL's bilinear
    resize of the whole picture, then ImageNet normalization."""
    if picture.size != (size, size):
        picture = picture.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    a = np.asarray(picture.convert("RGB"), np.float64) / 255.0
    return ((a - MEAN) / STD).transpose(2, 0, 1)


def conv3x3(x: np.ndarray, weight: np.ndarray, bias: float) -> np.ndarray:
    """One output channel of a 3x3 convolution with padding 1, as nine shifted sums."""
    c, h, w = x.shape
    padded = np.zeros((c, h + 2, w + 2))
    padded[:, 1:-1, 1:-1] = x
    out = np.full((h, w), float(bias))
    for dy in range(3):
        for dx in range(3):
            out += np.tensordot(weight[:, dy, dx], padded[:, dy : dy + h, dx : dx + w], axes=1)
    return out


def oracle_conv1(picture: Image.Image, channel: int, size: int = 32) -> np.ndarray:
    """conv1 + ReLU of ``PlantedNet`` on ``picture``, without torch."""
    net = PlantedNet()
    w = net.features[0].weight.detach().double().numpy()[channel]
    b = float(net.features[0].bias.detach()[channel])
    return np.maximum(conv3x3(normalized(picture, size), w, b), 0)


def oracle_conv2(picture: Image.Image, channel: int, size: int = 32) -> np.ndarray:
    """conv2 + ReLU of ``PlantedNet``: the centre tap passes the max-pooled conv1 map on."""
    m = oracle_conv1(picture, channel, size)
    h, w = m.shape
    return m[: h // 2 * 2, : w // 2 * 2].reshape(h // 2, 2, w // 2, 2).max(axis=(1, 3))


# -- the planted filters respond as designed ---------------------------------------------------------
def test_red_channel_fires_only_on_red():
    pics = planted_pictures()
    red = [n for n, (_, box) in pics.items() if box is not None]
    for name, (picture, _) in pics.items():
        peak = oracle_conv1(picture, 0).max()
        if name in red:
            assert peak > 3.0, name
        else:
            assert peak < 0.3, name


def test_edge_channel_fires_on_vertical_edges_only():
    pics = planted_pictures()
    for name, (picture, _) in pics.items():
        peak = oracle_conv1(picture, 1).max()
        if "vedge" in name:
            assert peak > 1.0, name
        else:
            assert peak < 0.25, name


def test_torch_model_matches_the_numpy_oracle():
    picture, _ = planted_pictures()["c_red_wide.png"]
    x = torch.from_numpy(normalized(picture)).float()[None]
    net = planted_net()
    with torch.no_grad():
        conv1 = torch.relu(net.features[0](x))[0].numpy()
        conv2 = net.features[:5](x)[0].numpy()
    for ch in (0, 1):
        np.testing.assert_allclose(conv1[ch], oracle_conv1(picture, ch), atol=2e-5)
        np.testing.assert_allclose(conv2[ch], oracle_conv2(picture, ch), atol=2e-5)
