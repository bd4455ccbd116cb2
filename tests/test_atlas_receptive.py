"""The receptive fields the atlas crops with, against the analytic values: the textbook recurrence
over each network's longest path (size += (k - 1) * jump, jump *= stride, centre += ((k - 1) / 2 -
padding) * jump), computed here from the modules' own hyper-parameters. VGG16's conv5_3 sees 196 px
and its pool5 212 px (the "212" often quoted for conv5_3 is pool5's); ResNet-18's layer4 435 px,
ResNet-50's 427 px. Models are built on the meta device (no weights)."""

from __future__ import annotations

import pytest
from torch import nn

from featuremaps.models import skeleton
from featuremaps.receptive import crop_box, receptive_fields


def _kps(m: nn.Module) -> tuple[int, int, int]:
    def one(v):
        return v[0] if isinstance(v, tuple) else v

    return one(m.kernel_size), one(m.stride), one(m.padding)


def analytic(steps: list[nn.Module]) -> tuple[int, int, float]:
    """(size, stride, centre of position 0) after the convolutions and poolings ``steps``, in order."""
    size, jump, centre = 1, 1, 0.0
    for m in steps:
        k, s, p = _kps(m)
        size += (k - 1) * jump
        centre += ((k - 1) / 2 - p) * jump
        jump *= s
    return size, jump, centre


def vgg_path(features: nn.Sequential, upto: int) -> list[nn.Module]:
    return [m for m in list(features)[: upto + 1] if isinstance(m, (nn.Conv2d, nn.MaxPool2d))]


def resnet_path(net: nn.Module, stage: str) -> list[nn.Module]:
    """conv1, the max-pool, then each block's main branch (its convs, in order) up to the end of ``stage``."""
    steps: list[nn.Module] = [net.conv1, net.maxpool]
    for name in ("layer1", "layer2", "layer3", "layer4"):
        for block in getattr(net, name):
            steps += [m for n, m in block.named_children() if n.startswith("conv")]
        if name == stage:
            return steps
    raise KeyError(stage)


@pytest.mark.parametrize(
    "model, layer, size",
    [("vgg16", "features.28", 196), ("vgg16", "features.30", 212), ("resnet18", "layer3", 211),
     ("resnet18", "layer4", 435), ("resnet50", "layer3", 267), ("resnet50", "layer4", 427)],
)  # fmt: skip
def test_receptive_fields_are_the_analytic_ones(model, layer, size):
    net = skeleton(model).module
    if model == "vgg16":
        steps = vgg_path(net.features, int(layer.split(".")[1]))
    else:
        steps = resnet_path(net, layer)
    want_size, want_stride, want_centre = analytic(steps)
    assert want_size == size  # the recurrence gives the published numbers
    rf = receptive_fields(net, (224, 224), [layer])[layer]
    assert rf.size == (size, size)
    assert rf.stride == (want_stride, want_stride)
    assert rf.offset == (want_centre, want_centre)


def test_crop_boxes_clip_at_the_borders_and_map_to_the_original_picture():
    net = skeleton("vgg16").module
    rf = receptive_fields(net, (224, 224), ["features.28"])["features.28"]
    # position (0, 0): centre 7.5, 196 px -> pixels -90..105, clipped at the top-left border
    assert crop_box(rf, 0, 0) == (0, 0, 106, 106)
    # the middle of the 14 x 14 map sees a whole 196 px window
    assert crop_box(rf, 7, 7) == (22, 22, 218, 218)  # centre 7.5 + 7 * 16 = 119.5, +-97.5
    # a 448 x 672 original resized (whole, no crop) to 224 x 224: the box scales per axis
    assert crop_box(rf, 0, 0, source_size=(448, 672)) == (0, 0, 212, 318)
    assert crop_box(rf, 13, 13, source_size=(448, 672)) == (2 * 118, 3 * 118, 448, 672)
