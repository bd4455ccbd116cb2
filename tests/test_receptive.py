"""Receptive fields against analytic values, an independent gradient oracle, and the model's state.

The analytic values come from the standard recurrence, computed here along each network's main path
(kernel ``k``, stride ``s``, padding ``p``, dilation ``d``, ``k' = d (k - 1) + 1``)::

    r_out = r_in + (k' - 1) * j_in          receptive field size
    j_out = j_in * s                        stride (jump) in input pixels
    o_out = o_in + ((k' - 1) / 2 - p) * j_in   input coordinate of the centre of output position 0
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import get_model

import featuremaps.receptive as receptive
from featuremaps.errors import FeatureMapsError
from featuremaps.receptive import (
    ReceptiveField,
    ReceptiveFieldError,
    ReceptiveFieldLayerError,
    crop_box,
    receptive_fields,
)


# -- the independent recurrence -------------------------------------------------------------------
def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def step(state: tuple, module: nn.Module) -> tuple:
    """One conv or pool through the recurrence, per axis; state = ((r, j, o) for y, for x)."""
    k, s, p = _pair(module.kernel_size), _pair(module.stride), _pair(module.padding)
    d = _pair(getattr(module, "dilation", 1))
    out = []
    for axis, (r, j, o) in enumerate(state):
        keff = d[axis] * (k[axis] - 1) + 1
        out.append((r + (keff - 1) * j, j * s[axis], o + ((keff - 1) / 2 - p[axis]) * j))
    return tuple(out)


START = ((1, 1, 0.0), (1, 1, 0.0))


def as_rf(state: tuple) -> tuple:
    """(size, stride, offset) as ReceptiveField holds them."""
    (ry, jy, oy), (rx, jx, ox) = state
    return (ry, rx), (float(jy), float(jx)), (float(oy), float(ox))


def got(rf: ReceptiveField) -> tuple:
    return rf.size, rf.stride, rf.offset


def vgg_expected(model: nn.Module) -> dict[str, tuple]:
    """Every conv and pool of ``model.features``: a plain chain."""
    state, expected = START, {}
    for i, m in enumerate(model.features):
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            state = step(state, m)
            expected[f"features.{i}"] = as_rf(state)
    return expected


def resnet_expected(model: nn.Module) -> dict[str, tuple]:
    """torchvision ResNets: the largest field is the main path (conv1, maxpool, then every block's
    3x3 convs; 1x1 convs add nothing). A block's shortcut is its input seen through a 1x1 conv of
    stride 1 or 2, a subset of the main path, so a block's output has its last conv's field."""
    state = step(START, model.conv1)
    expected = {"conv1": as_rf(state)}
    state = step(state, model.maxpool)
    expected["maxpool"] = as_rf(state)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        for b, block in enumerate(getattr(model, name)):
            block_in = state
            convs = [c for c in ("conv1", "conv2", "conv3") if hasattr(block, c)]
            for c in convs:
                state = step(state, getattr(block, c))
                expected[f"{name}.{b}.{c}"] = as_rf(state)
            if block.downsample is not None:
                expected[f"{name}.{b}.downsample.0"] = as_rf(step(block_in, block.downsample[0]))
            expected[f"{name}.{b}"] = as_rf(state)
        expected[name] = as_rf(state)
    return expected


# -- models ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vgg16():
    torch.manual_seed(0)
    return get_model("vgg16", weights=None).eval()


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return get_model("resnet18", weights=None).eval()


class Branchy(nn.Module):
    """Two branches (a dilated (5, 3) conv | a functional 3x3 max pool) concatenated, a strided 1x1
    conv, an in-place skip from a functional 2x2 max pool, a conv and a ceil-mode max pool.

    Per axis (y, x), from the recurrence: stem r 3, left r (3 + 8, 3 + 4) = (11, 7) (dilation 2:
    k' = (9, 5), padding (4, 2): centred), right r 5; merge (1x1, stride 2) takes the larger, (11, 7),
    j 2; the skip (r 4, centre 2i + 0.5) lies inside it; head (3x3) r (15, 11); pool (2x2, stride 2,
    ceil) r (17, 13), j 4, offset 0 + 0.5 * 2 = 1.

    ``linear=True`` is the oracle's network: all weights 1, biases 0, average pools in place of the
    max pools (same geometry), no ReLU.
    """

    def __init__(self, *, linear: bool = False):
        super().__init__()
        self.linear = linear
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.left = nn.Conv2d(4, 4, (5, 3), padding=(4, 2), dilation=2)
        self.merge = nn.Conv2d(8, 6, 1, stride=2)
        self.head = nn.Conv2d(6, 6, 3, padding=1)
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True) if linear else nn.MaxPool2d(2, 2, ceil_mode=True)
        self.act = nn.Identity() if linear else nn.ReLU(inplace=True)
        self.unused = nn.Conv2d(6, 6, 1)

    def forward(self, x):
        pool = F.avg_pool2d if self.linear else F.max_pool2d
        x = self.act(self.stem(x))
        right = pool(x, 3, stride=1, padding=1)
        y = self.merge(torch.cat([self.left(x), right], dim=1))
        y += pool(x, 2, 2)[:, :1]
        y = self.act(self.head(y))
        return self.pool(y)


BRANCHY = {  # layer: (size, stride, offset, output size at 30 x 44)
    "stem": ((3, 3), (1.0, 1.0), (0.0, 0.0), (30, 44)),
    "left": ((11, 7), (1.0, 1.0), (0.0, 0.0), (30, 44)),
    "merge": ((11, 7), (2.0, 2.0), (0.0, 0.0), (15, 22)),
    "head": ((15, 11), (2.0, 2.0), (0.0, 0.0), (15, 22)),
    "pool": ((17, 13), (4.0, 4.0), (1.0, 1.0), (8, 11)),
}


def oracle_box(layer: str, y: int, x: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Bounding box of the input gradient of one output position of the linear Branchy (float64)."""
    net = Branchy(linear=True).double()
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(0.0 if p.dim() == 1 else 1.0)
    outputs = {}
    getattr(net, layer).register_forward_hook(lambda m, i, o: outputs.setdefault("out", o))
    x_in = torch.ones(1, 3, *size, dtype=torch.float64, requires_grad=True)
    net(x_in)
    (grad,) = torch.autograd.grad(outputs["out"][0, :, y, x].sum(), x_in)
    nz = torch.nonzero(grad[0].abs().sum(0))
    (top, left), (bottom, right) = nz.min(0).values.tolist(), nz.max(0).values.tolist()
    return top, left, bottom + 1, right + 1


def count_runs(monkeypatch) -> list[tuple[bool, tuple[int, int]]]:
    """Record every measuring pass: (fast path?, canvas)."""
    runs = []
    real = receptive._run

    def spy(net, names, canvas, in_channels, *, collapse, ignore_global):
        runs.append((collapse, canvas))
        return real(net, names, canvas, in_channels, collapse=collapse, ignore_global=ignore_global)

    monkeypatch.setattr(receptive, "_run", spy)
    return runs


# -- analytic values ------------------------------------------------------------------------------
def test_vgg16_every_conv_and_pool_matches_the_recurrence(vgg16, monkeypatch):
    runs = count_runs(monkeypatch)
    expected = vgg_expected(vgg16)
    assert len(expected) == 18  # 13 convs, 5 pools
    rfs = receptive_fields(vgg16, (224, 224), list(expected))
    assert {name: got(rf) for name, rf in rfs.items()} == expected
    # conv5_3 sees 196 px (the 212 often quoted is pool5's, features.30), with stride 16
    assert rfs["features.28"].size == (196, 196) and rfs["features.28"].stride == (16.0, 16.0)
    assert rfs["features.28"].offset == (7.5, 7.5)
    assert rfs["features.30"].size == (212, 212)
    assert rfs["features.28"].output_size == (14, 14) and rfs["features.0"].output_size == (224, 224)
    assert runs == [(True, (224, 224))]  # one pass on the fast path: every field fits in 224 px


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnets_match_the_main_path(arch, monkeypatch):
    torch.manual_seed(0)
    model = get_model(arch, weights=None).eval()
    expected = resnet_expected(model)
    names = ["conv1", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    names += [
        "layer1.0.conv1",
        "layer2.0.conv1",
        "layer2.0.downsample.0",
        "layer3.0.conv2",
        "layer3.1",
        "layer4.1.conv1",
    ]
    runs = count_runs(monkeypatch)
    rfs = receptive_fields(model, (224, 224), names)
    assert {n: got(rfs[n]) for n in names} == {n: expected[n] for n in names}
    sizes = {"resnet18": (43, 99, 211, 435), "resnet50": (35, 91, 267, 427)}[arch]  # well-known values
    for layer, r, stride in zip(("layer1", "layer2", "layer3", "layer4"), sizes, (4, 8, 16, 32)):
        assert rfs[layer].size == (r, r) and rfs[layer].stride == (stride, stride)
        assert rfs[layer].output_size == (224 // stride, 224 // stride)
    assert all(fast for fast, _ in runs)  # `out += identity` stays on the fast path
    assert len(runs) > 1  # layer4's field is larger than the picture: measured on wider canvases


def test_densenet_concatenations():
    """DenseNet-121: conv0 7x7/2 (r 7), pool0 3x3/2 (r 11, j 4), denseblock1: 6 layers, each a 1x1
    and a 3x3 conv, the longest path through all six 3x3 (r 11 + 6 * 2 * 4 = 59); transition1: 1x1
    conv and 2x2/2 average pool (r 63, j 8, offset 0.5 * 4 = 2); denseblock2.denselayer4.conv1 after
    three more 3x3 (r 63 + 3 * 2 * 8 = 111); denseblock2, 12 layers (r 63 + 12 * 16 = 255)."""
    torch.manual_seed(0)
    model = get_model("densenet121", weights=None).eval()
    names = ["features.denseblock1", "features.transition1", "features.denseblock2.denselayer4.conv1"]
    rfs = receptive_fields(model, (224, 224), [*names, "features.denseblock2"])
    assert got(rfs["features.denseblock1"]) == ((59, 59), (4.0, 4.0), (0.0, 0.0))
    assert got(rfs["features.transition1"]) == ((63, 63), (8.0, 8.0), (2.0, 2.0))
    assert got(rfs["features.denseblock2.denselayer4.conv1"]) == ((111, 111), (8.0, 8.0), (2.0, 2.0))
    assert got(rfs["features.denseblock2"]) == ((255, 255), (8.0, 8.0), (2.0, 2.0))


def test_branches_functional_calls_and_non_square_input():
    torch.manual_seed(0)
    rfs = receptive_fields(Branchy(), (30, 44), list(BRANCHY))
    for name, (size, stride, offset, out) in BRANCHY.items():
        assert (*got(rfs[name]), rfs[name].output_size) == (size, stride, offset, out), name
        assert rfs[name].layer == name and rfs[name].input_size == (30, 44)


def test_non_square_input_on_a_resnet(resnet18):
    rfs = receptive_fields(resnet18, (224, 320), ["layer3", "layer4"])
    assert rfs["layer4"].output_size == (7, 10)
    assert got(rfs["layer4"]) == ((435, 435), (32.0, 32.0), (0.0, 0.0))
    assert got(rfs["layer3"]) == ((211, 211), (16.0, 16.0), (0.0, 0.0))


def test_fast_path_and_full_maps_agree(monkeypatch):
    """The broadcast fast path against the slow path with full (N, C, H, W) maps everywhere."""
    fast = receptive_fields(Branchy(), (30, 44), list(BRANCHY))
    real = receptive._run
    monkeypatch.setattr(receptive, "_run", lambda *a, collapse, **k: real(*a, collapse=False, **k))
    dense = receptive_fields(Branchy(), (30, 44), list(BRANCHY))
    assert dense == fast


class InPlaceMix(nn.Module):
    """``a += b`` where ``b`` is a concatenation of two different maps: the fast path cannot write
    it into a broadcast map and measures again with full maps. a: 3x3; b: 5x5 | 1x1; out: 3x3 on
    their union, r 5 + 2 = 7."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b5 = nn.Conv2d(3, 2, 5, padding=2)
        self.b1 = nn.Conv2d(3, 2, 1)
        self.out = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        a = self.a(x)
        a += torch.cat([self.b5(x), self.b1(x)], 1)
        return self.out(a)


def test_in_place_arithmetic_the_fast_path_cannot_take_falls_back(monkeypatch):
    runs = count_runs(monkeypatch)
    rfs = receptive_fields(InPlaceMix(), (20, 20), ["a", "out"])
    assert got(rfs["a"]) == ((3, 3), (1.0, 1.0), (0.0, 0.0))
    assert got(rfs["out"]) == ((7, 7), (1.0, 1.0), (0.0, 0.0))
    assert runs == [(True, (20, 20)), (False, (20, 20))]


def test_meta_device_skeleton_gives_the_same_fields(resnet18):
    with torch.device("meta"):
        skeleton = get_model("resnet18", weights=None)
    names = ["layer2", "layer4"]
    assert receptive_fields(skeleton, (224, 224), names) == receptive_fields(resnet18, (224, 224), names)


class Squeeze(nn.Module):
    """A squeeze-and-excitation gate: every output depends on every pixel through the global pool."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Conv2d(8, 8, 1)
        self.out = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        return self.out(x * torch.sigmoid(self.fc(F.adaptive_avg_pool2d(x, 1))))


def test_global_context_is_the_whole_image_unless_ignored():
    with pytest.raises(ReceptiveFieldError, match="ignore_global=True"):
        receptive_fields(Squeeze(), (32, 32), ["out"])
    rf = receptive_fields(Squeeze(), (32, 32), ["out"], ignore_global=True)["out"]
    assert got(rf) == ((5, 5), (1.0, 1.0), (0.0, 0.0))


class Upsampled(nn.Module):
    """A stride-2 path upsampled (nearest) and added back: even and odd positions see different pixels."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.side = nn.Conv2d(3, 4, 1)
        self.out = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.out(self.side(x) + F.interpolate(self.down(x), scale_factor=2.0))


def test_uneven_geometry_is_refused():
    with pytest.raises(ReceptiveFieldError, match="not evenly spaced"):
        receptive_fields(Upsampled(), (32, 32), ["out"])


# -- crop boxes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", ["left", "head", "pool"])
def test_crop_box_matches_the_gradient_oracle_everywhere(layer):
    """Every output position, borders included, against the support of an independent linear net."""
    rf = receptive_fields(Branchy(), (30, 44), [layer])[layer]
    h, w = rf.output_size
    for y in sorted({0, 1, h // 2, h - 2, h - 1}):
        for x in sorted({0, 1, w // 2, w - 2, w - 1}):
            assert crop_box(rf, y, x) == oracle_box(layer, y, x, (30, 44)), (layer, y, x)


def test_crop_box_clips_and_maps_through_a_resize(vgg16):
    conv1, conv5 = receptive_fields(vgg16, (224, 224), ["features.0", "features.28"]).values()
    assert crop_box(conv1, 0, 0) == (0, 0, 2, 2)  # 3x3 around pixel (0, 0), clipped
    assert crop_box(conv1, 10, 20) == (9, 19, 12, 22)
    assert crop_box(conv1, 223, 223) == (222, 222, 224, 224)
    # conv5_3 (size 196, stride 16, offset 7.5): position 7 is centred at 119.5 -> [22, 218)
    assert crop_box(conv5, 7, 7) == (22, 22, 218, 218)
    assert crop_box(conv5, 0, 0) == (0, 0, 106, 106)  # [-90, 106) clipped
    assert crop_box(conv5, 13, 0) == (118, 0, 224, 106)  # [118, 314) clipped
    # a 640 x 480 photo resized to 224 x 224: y scaled by 480/224, x by 640/224, outward to pixels
    assert crop_box(conv5, 7, 7, source_size=(480, 640)) == (47, 62, 468, 623)
    assert crop_box(conv5, 0, 0, source_size=(480, 640)) == (0, 0, 228, 303)
    assert crop_box(conv5, 13, 13, source_size=(480, 640)) == (252, 337, 480, 640)


def test_crop_box_with_a_half_pixel_offset():
    rf = ReceptiveField("p", input_size=(10, 12), size=(4, 4), stride=(2.0, 2.0), offset=(0.5, 0.5), output_size=(5, 6))
    assert crop_box(rf, 0, 0) == (0, 0, 3, 3)  # pixels -1..2, clipped
    assert crop_box(rf, 2, 3) == (3, 5, 7, 9)
    assert crop_box(rf, 4, 5) == (7, 9, 10, 12)  # pixels 7..10 / 9..12, clipped
    assert crop_box(rf, 2, 3, source_size=(20, 6)) == (6, 2, 14, 5)  # x: [5, 9) * 0.5 -> [2.5, 4.5)


def test_crop_box_rejects_positions_outside_the_output():
    rf = ReceptiveField(
        "p", input_size=(10, 10), size=(3, 3), stride=(1.0, 1.0), offset=(0.0, 0.0), output_size=(10, 10)
    )
    with pytest.raises(ReceptiveFieldError, match=r"y=10 is outside layer 'p'.*pass 0 <= y < 10"):
        crop_box(rf, 10, 0)
    with pytest.raises(ReceptiveFieldError, match="x=-1 is outside"):
        crop_box(rf, 0, -1)
    with pytest.raises(ReceptiveFieldError, match="source_size must be"):
        crop_box(rf, 0, 0, source_size=(0, 10))


# -- the user's model -----------------------------------------------------------------------------
def test_the_model_leaves_unchanged(resnet18):
    model = copy.deepcopy(resnet18).train()
    model.layer1.eval()
    model.fc.weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: m.training for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    inplace = {n: m.inplace for n, m in model.named_modules() if hasattr(m, "inplace")}
    calls = []
    hook = model.layer2.register_forward_hook(lambda m, i, o: calls.append("hook"))
    pre = model.conv1.register_forward_pre_hook(lambda m, i: calls.append("pre"))
    hooks_before = (dict(model.layer2._forward_hooks), dict(model.conv1._forward_pre_hooks))
    threads = torch.get_num_threads()

    receptive_fields(model, (64, 64), ["layer2", "layer4"])

    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())  # weights and BN running stats
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(p.grad is None for p in model.parameters())
    assert {n: m.inplace for n, m in model.named_modules() if hasattr(m, "inplace")} == inplace
    assert (dict(model.layer2._forward_hooks), dict(model.conv1._forward_pre_hooks)) == hooks_before
    assert calls == []  # the user's hooks were not run on the copy
    assert all(not m._forward_hooks for n, m in model.named_modules() if n not in ("layer2",))
    hook.remove()
    pre.remove()
    assert torch.get_num_threads() == threads  # the measurement runs on one thread, then restores it


def test_results_are_cached_per_model_structure_and_size(monkeypatch):
    model = Branchy()
    runs = count_runs(monkeypatch)
    first = receptive_fields(model, (30, 44), ["head"])["head"]
    assert receptive_fields(model, (30, 44), ["head"])["head"] is first
    assert len(runs) == 1
    other = receptive_fields(model, (32, 44), ["head"])["head"]  # Branchy needs an even height
    assert other.output_size == (16, 22) and len(runs) == 2
    model.head = nn.Conv2d(6, 6, 5, padding=2)  # a changed structure is measured again
    assert receptive_fields(model, (30, 44), ["head"])["head"].size == (19, 15)
    assert len(runs) == 3


# -- errors ---------------------------------------------------------------------------------------
def test_unknown_layer_names_suggest_close_ones(vgg16):
    with pytest.raises(ReceptiveFieldLayerError, match=r"no layer 'features\.299' in VGG; did you mean features\.29"):
        receptive_fields(vgg16, (224, 224), ["features.299"])
    with pytest.raises(FeatureMapsError, match="featuremaps layers MODEL"):
        receptive_fields(vgg16, (224, 224), ["nothing_like_it"])


def test_layers_that_are_not_feature_maps_or_do_not_run(vgg16):
    with pytest.raises(
        ReceptiveFieldLayerError, match=r"'classifier\.0' outputs a tensor of shape \(N, 4096\), not an"
    ):
        receptive_fields(vgg16, (224, 224), ["classifier.0"])
    with pytest.raises(ReceptiveFieldLayerError, match="'unused' did not run in the model's forward pass"):
        receptive_fields(Branchy(), (30, 44), ["unused"])
    assert issubclass(ReceptiveFieldLayerError, FeatureMapsError)


@pytest.mark.parametrize("size", [(0, 224), 224, (224, 224, 3), (224.0, 224)])
def test_bad_input_sizes(size, resnet18):
    with pytest.raises(ReceptiveFieldError, match="input_size must be"):
        receptive_fields(resnet18, size, ["layer1"])


def test_a_model_that_fails_at_the_size_says_so(resnet18):
    with pytest.raises(ReceptiveFieldError, match="the model failed on a .* input"):
        receptive_fields(Branchy(), (1, 1), ["pool"])
