"""CAM math checked against pytorch-grad-cam (the oracle) on seeded random models, plus top classes, labels files
and the choice of target. CPU only, nothing downloaded.

Tolerances. Raw maps (layer resolution, after ReLU): the oracle sums in numpy float32, we sum with torch float32 in
another order, so they agree to float32 rounding of the channel sum: rtol 1e-5, plus atol 1e-6 of the batch's largest
value for maps made small by cancellation (measured: below 6e-7 relative on the largest value). Final maps (input
size, scaled to [0, 1]): the oracle scales, resizes with cv2 (bilinear, half-pixel centres) and scales again, each
scaling dividing by ``span + 1e-7``; we resize with torch and scale once. Scaling is affine and the resize linear, so
on the same raw map the two pipelines agree up to float32 rounding and the 1e-7 constant: atol 1e-5 (measured:
below 6e-7). End to end, our raw map's own rounding d is magnified by the scaling to at most 3 d / span, which is added
(measured end to end: below 4e-6, on a map whose span is 1.8e-5). A resize on another grid (``align_corners=True``)
misses by more than 1e-3, which the tests also check.
"""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from featuremaps.cam import (
    CAM_METHODS,
    GRADCAM_PP_EPS,
    CamError,
    CamResult,
    cam_map,
    cam_result,
    normalize,
    read_labels,
    resolve_target,
    top_classes,
    upsample,
)
from featuremaps.errors import FeatureMapsError

ORACLES = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "layercam": LayerCAM}
FINAL_ATOL = 1e-5


class SmallCNN(nn.Module):
    """A ResNet-shaped toy: ``layer4`` is the last conv block, total stride 8, with in-place ReLUs inside blocks."""

    def __init__(self, classes: int = 10):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.stem = block(3, 8, 2)
        self.layer1, self.layer2 = block(8, 8, 1), block(8, 16, 2)
        self.layer3, self.layer4 = block(16, 16, 2), block(16, 24, 1)
        self.fc = nn.Linear(24, classes)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def vit_tokens_to_grid(tokens: torch.Tensor, height: int = 14, width: int = 14) -> torch.Tensor:
    """(N, 1 + H*W, D) tokens -> (N, D, H, W): drop the class token, lay the patches on their grid, channels first."""
    grid = tokens[:, 1:, :].reshape(tokens.shape[0], height, width, tokens.shape[2])
    return grid.permute(0, 3, 1, 2)


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def capture(model, layer, x, targets, reshape=None):
    """Our own capture for the tests: the layer's output and d(sum of target logits)/d(output), hooks removed after.

    ``torch.autograd.grad`` (not ``backward``) leaves the parameters' ``.grad`` untouched.
    """
    saved: dict[str, torch.Tensor] = {}

    def on_forward(module, inputs, output):
        saved["out"] = output
        saved["a"] = output.detach().clone()
        output.register_hook(lambda grad: saved.__setitem__("g", grad.detach().clone()))

    handle = layer.register_forward_hook(on_forward)
    try:
        logits = model(x)
        score = logits[torch.arange(len(targets)), torch.tensor(targets)].sum()
        torch.autograd.grad(score, saved["out"])
    finally:
        handle.remove()
        saved.pop("out", None)
    a, g = saved["a"], saved["g"]
    if reshape is not None:
        a, g = reshape(a), reshape(g)
    return a, g, logits.detach()


def run_oracle(method, model, layer, x, targets, reshape=None):
    """The oracle's final maps, its raw map (``get_cam_image`` + ReLU, before any scaling) and what it captured."""
    with ORACLES[method](model=model, target_layers=[layer], reshape_transform=reshape) as oracle:
        assert len(layer._forward_hooks) == 2  # activation + gradient hooks, live while the oracle exists
        final = oracle(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
        a = oracle.activations_and_grads.activations[0].numpy().copy()
        g = oracle.activations_and_grads.gradients[0].numpy().copy()
        raw = np.maximum(oracle.get_cam_image(x, layer, None, a, g, False), 0)
    assert len(layer._forward_hooks) == 0  # released by __exit__
    model.zero_grad(set_to_none=True)  # the oracle's loss.backward() fills the parameters' .grad
    return final, raw, a, g


def check_against_oracle(method, model, layer, x, targets, reshape=None):
    final, raw, oa, og = run_oracle(method, model, layer, x, targets, reshape)
    a, g, _ = capture(model, layer, x, targets, reshape)
    assert all_hooks(model) == 0
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(a, torch.from_numpy(oa), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g, torch.from_numpy(og), rtol=1e-6, atol=1e-12)

    parts = cam_map(a, g, method)
    assert parts.method == method
    assert parts.map.shape == (x.shape[0], *a.shape[2:]) and parts.map.dtype == torch.float32
    mine_raw = parts.map.numpy()
    assert raw.max() > 0 and (mine_raw > 0).mean() > 0.05  # not a trivially empty map
    np.testing.assert_allclose(mine_raw, raw, rtol=1e-5, atol=1e-6 * float(raw.max()))

    size = tuple(x.shape[-2:])
    # like with like: the oracle's own raw map through our resize + scaling, against its final maps
    ours_on_theirs = normalize(upsample(torch.from_numpy(raw), size)).numpy()
    assert ours_on_theirs.shape == final.shape == (x.shape[0], *size)
    assert np.abs(ours_on_theirs - final).max() < FINAL_ATOL
    # end to end: our map's rounding (at most d) is magnified by the scaling, at most 3 d / span
    mine_final = normalize(upsample(parts.map, size)).numpy()
    for mine_i, final_i, mine_raw_i, raw_i in zip(mine_final, final, mine_raw, raw):
        span = float(raw_i.max() - raw_i.min())
        slack = 3 * float(np.abs(mine_raw_i - raw_i).max()) / span if span > 0 else 0.0
        assert np.abs(mine_i - final_i).max() < FINAL_ATOL + slack
    # the tolerance tells grids apart: align_corners=True is off by far more
    wrong = F.interpolate(parts.map[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
    assert np.abs(normalize(wrong).numpy() - final).max() > 1e-3
    return parts, final


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet18", weights=None).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return model, x


@pytest.mark.parametrize("method", CAM_METHODS)
def test_resnet18_layer4_matches_oracle(resnet, method):
    model, x = resnet
    targets = [3, 917]
    parts, final = check_against_oracle(method, model, model.layer4, x, targets)
    assert parts.map.shape == (2, 7, 7)
    assert not np.allclose(final[0], final[1])  # per-image targets and scaling
    assert not model.training


@pytest.mark.parametrize("method", CAM_METHODS)
def test_small_cnn_non_square_matches_oracle(method):
    torch.manual_seed(2)
    model = SmallCNN().eval()
    x = torch.randn(3, 3, 48, 80, generator=torch.Generator().manual_seed(3))
    parts, _ = check_against_oracle(method, model, model.layer4, x, [0, 4, 9])
    assert parts.map.shape == (3, 6, 10)  # height 6, width 10: a swapped resize would fail the comparison


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(4)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=20).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    return model, x


@pytest.mark.parametrize("method", CAM_METHODS)
def test_vit_tokens_reshaped_match_oracle(vit, method):
    model, x = vit
    parts, _ = check_against_oracle(method, model, model.blocks[-1].norm1, x, [7], reshape=vit_tokens_to_grid)
    assert parts.map.shape == (1, 14, 14)
    assert parts.contributions.shape == (1, model.embed_dim)


def test_oracle_keeps_hooks_until_released():
    """Note on the oracle: without ``with``, its hooks stay on the model until ``release()`` or garbage collection."""
    torch.manual_seed(0)
    model = SmallCNN().eval()
    oracle = GradCAM(model=model, target_layers=[model.layer4])
    try:
        oracle(input_tensor=torch.randn(1, 3, 32, 32), targets=[ClassifierOutputTarget(1)])
        assert len(model.layer4._forward_hooks) == 2
        assert model.fc.weight.grad is not None  # and it leaves the parameters' gradients filled
    finally:
        oracle.activations_and_grads.release()
    assert all_hooks(model) == 0


# --- contributions and the formulas on planted tensors -------------------------------------------------------


def test_contributions_sum_to_the_oracles_map_before_relu():
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(2, 5, 4, 3, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 5, 4, 3, generator=gen, dtype=torch.float64) * 0.1
    layer = nn.Conv2d(1, 1, 1)
    for method in CAM_METHODS:
        parts = cam_map(a, g, method)
        assert parts.map.dtype == torch.float64
        with ORACLES[method](model=layer, target_layers=[layer]) as oracle:
            pre_relu = oracle.get_cam_image(None, layer, None, a.numpy(), g.numpy(), False)
        assert pre_relu.min() < 0  # the ReLU cuts something here, so "before the ReLU" matters
        np.testing.assert_allclose(parts.contributions.sum(1).numpy(), pre_relu.sum(axis=(1, 2)), rtol=1e-12)
        np.testing.assert_allclose(parts.map.numpy(), np.maximum(pre_relu, 0), rtol=1e-12, atol=1e-15)
        assert (parts.weights is None) == (method == "layercam")


def test_planted_gradcam_and_layercam():
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 1.0]]]])  # (1, 2, 2, 2)
    g = torch.tensor([[[[0.5, 0.5], [-0.5, 1.5]], [[-1.0, -1.0], [-1.0, -1.0]]]])
    gc = cam_map(a, g, "GradCAM")
    torch.testing.assert_close(gc.weights, torch.tensor([[0.5, -1.0]]))
    torch.testing.assert_close(gc.map, torch.tensor([[[0.5, 0.0], [1.5, 1.0]]]))  # [.5, 0, 1.5, 1] after ReLU
    torch.testing.assert_close(gc.contributions, torch.tensor([[5.0, -2.0]]))  # 0.5 * 10, -1 * 2
    lc = cam_map(a, g, "layer-cam")
    torch.testing.assert_close(lc.map, torch.tensor([[[0.5, 1.0], [0.0, 6.0]]]))
    torch.testing.assert_close(lc.contributions, torch.tensor([[7.5, 0.0]]))


def test_planted_gradcam_plus_plus():
    a = torch.tensor([[[[1.0, 1.0]], [[2.0, 0.0]]]], dtype=torch.float64)  # (1, 2, 1, 2); sums 2 and 2
    g = torch.tensor([[[[0.1, 0.0]], [[-0.2, 0.3]]]], dtype=torch.float64)

    def alpha(gv: float, s: float) -> float:
        return gv**2 / (2 * gv**2 + s * gv**3 + GRADCAM_PP_EPS)

    w0 = 0.1 * alpha(0.1, 2.0)  # the zero gradient counts for nothing
    w1 = 0.3 * alpha(0.3, 2.0)  # the negative one neither
    parts = cam_map(a, g, "gradcampp")
    assert parts.method == "gradcam++"
    torch.testing.assert_close(parts.weights, torch.tensor([[w0, w1]], dtype=torch.float64))
    torch.testing.assert_close(parts.map, torch.tensor([[[w0 + 2 * w1, w0]]], dtype=torch.float64))
    torch.testing.assert_close(parts.contributions, torch.tensor([[2 * w0, 2 * w1]], dtype=torch.float64))


def test_cam_map_half_precision_is_computed_in_float32():
    gen = torch.Generator().manual_seed(7)
    a, g = torch.rand(1, 3, 4, 4, generator=gen), torch.randn(1, 3, 4, 4, generator=gen) * 1e-3
    parts = cam_map(a.half(), g.half(), "gradcam++")
    assert parts.map.dtype == torch.float32
    torch.testing.assert_close(parts.map, cam_map(a.half().float(), g.half().float(), "gradcam++").map)


def test_cam_map_errors():
    a = torch.zeros(1, 2, 3, 3)
    with pytest.raises(CamError, match=r"unknown CAM method 'gradcam\+' \(did you mean 'gradcam\+\+'\?\)"):
        cam_map(a, a, "gradcam+")
    with pytest.raises(CamError, match=r"use one of gradcam, gradcam\+\+, layercam"):
        cam_map(a, a, "scorecam")
    with pytest.raises(CamError, match=r"must be \(N, C, H, W\), got shape \(2, 3, 3\); add the batch axis"):
        cam_map(a[0], a[0], "gradcam")
    with pytest.raises(CamError, match=r"differ in shape"):
        cam_map(a, torch.zeros(1, 2, 3, 4), "gradcam")
    with pytest.raises(CamError, match=r"finite floating-point"):
        cam_map(a, torch.full_like(a, float("nan")), "gradcam")
    with pytest.raises(CamError, match=r"must be a torch tensor"):
        cam_map(a.numpy(), a, "gradcam")
    assert issubclass(CamError, FeatureMapsError)


# --- upsample and normalize ------------------------------------------------------------------------------------


def test_upsample_is_cv2_bilinear_with_height_width_order():
    gen = torch.Generator().manual_seed(8)
    m = torch.rand(2, 5, 7, generator=gen)
    up = upsample(m, (40, 56))
    assert up.shape == (2, 40, 56)
    for i in range(2):
        ref = cv2.resize(m[i].numpy(), (56, 40), interpolation=cv2.INTER_LINEAR)  # cv2 takes (width, height)
        assert np.abs(up[i].numpy() - ref).max() < 1e-6
    assert upsample(m[0], (3, 4)).shape == (3, 4)
    torch.testing.assert_close(upsample(torch.full((4, 4), 2.5), (9, 9)), torch.full((9, 9), 2.5))
    with pytest.raises(CamError, match=r"size must be \(height, width\)"):
        upsample(m, (0, 4))


def test_normalize_per_image_and_constant_maps():
    m = torch.stack([torch.tensor([[1.0, 3.0], [5.0, 2.0]]), torch.full((2, 2), 7.0), torch.zeros(2, 2)])
    out = normalize(m)
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 0.5], [1.0, 0.25]]))
    torch.testing.assert_close(out[1:], torch.zeros(2, 2, 2))  # constant: zeros, not NaN (the oracle gives 0 too)
    torch.testing.assert_close(normalize(torch.tensor([[2.0, 4.0]])), torch.tensor([[0.0, 1.0]]))
    with pytest.raises(CamError, match=r"a CAM must be a tensor \(H, W\) or \(N, H, W\)"):
        normalize(torch.zeros(1, 1, 2, 2))


# --- top classes, labels, targets --------------------------------------------------------------------------------


def test_top_classes_sorted_with_softmax_probabilities():
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 50, generator=gen) * 3
    labels = [f"thing {i}" for i in range(50)]
    tops = top_classes(logits, 5, labels=labels)
    probs = torch.softmax(logits.double(), 1)
    assert len(tops) == 3
    for row, p in zip(tops, probs):
        assert len(row) == 5
        assert [s.index for s in row] == torch.argsort(p, descending=True)[:5].tolist()
        assert all(a.probability >= b.probability for a, b in itertools.pairwise(row))
        assert sum(s.probability for s in row) <= 1.0
        assert row[0].probability == pytest.approx(float(p.max()), rel=1e-12)
        assert row[0].label == f"thing {row[0].index}"
    one = top_classes(torch.tensor([0.0, 2.0, 2.0]), k=10)  # (K,) is one image; k > K gives K; ties by index
    assert [(s.index, s.label) for s in one[0]] == [(1, "class 1"), (2, "class 2"), (0, "class 0")]
    assert sum(s.probability for s in one[0]) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(CamError, match=r"k must be an integer >= 1"):
        top_classes(logits, 0)
    with pytest.raises(CamError, match=r"3 labels for a model with 50 classes"):
        top_classes(logits, labels=["a", "b", "c"])


def test_read_labels_edge_cases(tmp_path):
    f = tmp_path / "labels.txt"
    f.write_bytes("\ufefftench  \r\n\r\ngoldfish\r\n  great white shark\n\n\n".encode())
    assert read_labels(f) == ("tench", "goldfish", "great white shark")
    assert read_labels(str(f), expected=3)[0] == "tench"  # the BOM is not part of the first label
    with pytest.raises(CamError, match=r"has 3 labels but the model has 1000 classes; give one label per class"):
        read_labels(f, expected=1000)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CamError, match=r"empty.txt' has no labels; write one class name per line"):
        read_labels(tmp_path / "empty.txt")
    (tmp_path / "blank.txt").write_text("\n  \n\t\n")
    with pytest.raises(CamError, match=r"has no labels"):
        read_labels(tmp_path / "blank.txt")
    with pytest.raises(CamError, match=r"not found; give a text file"):
        read_labels(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(CamError, match=r"is not UTF-8 text"):
        read_labels(tmp_path / "latin1.txt")


LABELS = ("tench", "goldfish", "tabby cat", "tiger cat", "Egyptian cat", "crane", "crane", "great white shark")


def test_resolve_target_rules():
    logits = torch.tensor([0.1, 0.2, 3.0, 0.0, -1.0, 0.5, 0.4, 0.3])
    assert resolve_target(None, logits, LABELS) == 2
    assert resolve_target(None, logits[None]) == 2
    assert resolve_target(7, logits, LABELS) == 7
    assert resolve_target(np.int64(4), logits) == 4
    assert resolve_target("goldfish", logits, LABELS) == 1  # exact
    assert resolve_target("GREAT White Shark ", logits, LABELS) == 7  # case-insensitive, stripped
    assert resolve_target("tabby", logits, LABELS) == 2  # unique substring
    assert resolve_target("egypt", logits, LABELS) == 4
    assert resolve_target("3", logits, LABELS) == 3  # a decimal string is an index
    assert resolve_target("5", logits) == 5


def test_resolve_target_errors():
    logits = torch.zeros(8)
    with pytest.raises(CamError, match=r"class index 8 is out of range; this model has classes 0\.\.7"):
        resolve_target(8, logits, LABELS)
    with pytest.raises(CamError, match=r"class index -1 is out of range"):
        resolve_target(-1, logits)
    with pytest.raises(CamError, match=r"a target is a class index, a label or None, got bool"):
        resolve_target(True, logits)
    with pytest.raises(CamError, match=r"unknown class 'tabbby cat' \(closest: 'tabby cat'"):
        resolve_target("tabbby cat", logits, LABELS)
    with pytest.raises(CamError, match=r"unknown class 'zebra' \(no label is close\); pass a label .* index 0\.\.7"):
        resolve_target("zebra", logits, LABELS)
    with pytest.raises(CamError, match=r"'cat' matches 3 classes: 'tabby cat' \(2\), 'tiger cat' \(3\), "):
        resolve_target("cat", logits, LABELS)
    with pytest.raises(CamError, match=r"label 'crane' names classes \[5, 6\]; pass one of these indices"):
        resolve_target("crane", logits, LABELS)
    with pytest.raises(CamError, match=r"no labels are known for this model.*pass a class index 0\.\.7"):
        resolve_target("tench", logits)
    with pytest.raises(CamError, match=r"takes one image's logits, got 2 images; pass logits\[i\]"):
        resolve_target(None, torch.zeros(2, 8))
    with pytest.raises(CamError, match=r"2 labels for a model with 8 classes"):
        resolve_target(0, logits, LABELS[:2])


# --- the finished product ----------------------------------------------------------------------------------------


def test_cam_result_from_parts():
    gen = torch.Generator().manual_seed(14)
    a = torch.rand(2, 6, 3, 4, generator=gen)
    g = torch.randn(2, 6, 3, 4, generator=gen)
    logits = torch.randn(2, 8, generator=gen)
    parts = cam_map(a, g, "gradcam")
    res = cam_result(parts, logits, target=2, size=(30, 40), image=1, labels=LABELS, layer="layer4")
    assert isinstance(res, CamResult)
    assert (res.method, res.layer, res.target, res.label) == ("gradcam", "layer4", 2, "tabby cat")
    assert res.probability == pytest.approx(float(torch.softmax(logits[1].double(), 0)[2]), rel=1e-12)
    np.testing.assert_array_equal(res.map, parts.map[1].numpy())
    assert res.map.dtype == np.float32 and res.upsampled.shape == (30, 40)
    assert res.upsampled.min() == 0.0 and res.upsampled.max() == pytest.approx(1.0)
    np.testing.assert_allclose(res.upsampled, normalize(upsample(parts.map[1], (30, 40))).numpy())
    values = [v for _, v in res.contributions]
    assert sorted(c for c, _ in res.contributions) == list(range(6))
    assert values == sorted(values, reverse=True) and values[-1] < 0 < values[0]
    assert sum(values) == pytest.approx(float((parts.weights[1, :, None, None] * a[1]).sum()), rel=1e-5)
    assert res.top_channels(2) == res.contributions[:2]
    with pytest.raises(ValueError):
        res.map[0, 0] = 1.0  # read-only
    assert len(cam_result(parts, logits, target=0, size=(3, 4), top=3).contributions) == 3
    empty = cam_map(a, -a, "gradcam")  # negative everywhere: the ReLU leaves nothing, the picture is all zeros
    assert empty.map.max() == 0 and not cam_result(empty, logits, target=0, size=(3, 4)).upsampled.any()
    with pytest.raises(CamError, match=r"image 2 of a batch of 2 CAMs"):
        cam_result(parts, logits, target=0, size=(3, 4), image=2)
