"""``fm.cam`` end to end: the same maps as pytorch-grad-cam (the oracle) on seeded ResNet-18 and ViTs (tokens reshaped
to the patch grid), the default layer of each family, the model left as it came (no hooks, flags, gradients), memory
flat over 1,000 calls, one-line errors, and the run folders of ``featuremaps cam`` and ``featuremaps show --cam``.
CPU only, random weights, nothing downloaded.

Tolerances are those of ``test_cam_math.py`` (which checks the formulas alone): raw maps to float32 rounding of the
channel sum (rtol 1e-5 plus 1e-6 of the largest value), final maps to 1e-5 plus the raw rounding magnified by the
min-max scaling (3 d / span).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import re
import sys

import numpy as np
import psutil
import pytest
import timm
import torch
import torchvision
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from torch.nn.modules import module as torch_module
from typer.testing import CliRunner

import featuremaps as fm
from featuremaps.cam import CAM_METHODS, CamError, CamResult, default_layer
from featuremaps.cli import app
from featuremaps.errors import FeatureMapsError, LayerError
from featuremaps.models import weights_file
from featuremaps.render import grid_layout

ORACLES = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "layercam": LayerCAM}


def all_hooks(model: nn.Module) -> int:
    per_module = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )
    global_hooks = (
        torch_module._global_forward_hooks, torch_module._global_forward_pre_hooks,
        torch_module._global_backward_hooks, torch_module._global_backward_pre_hooks,
    )  # fmt: skip
    return per_module + sum(len(h) for h in global_hooks)


def tokens_to_grid(prefix: int, height: int, width: int):
    """The oracle's reshape for a ViT: drop ``prefix`` tokens, lay the patches on their grid, channels first."""

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        grid = tokens[:, prefix:, :].reshape(tokens.shape[0], height, width, tokens.shape[2])
        return grid.permute(0, 3, 1, 2)

    return reshape


def oracle(method: str, model: nn.Module, layer: nn.Module, x: torch.Tensor, target: int, reshape=None):
    """pytorch-grad-cam's final map and its raw map (``get_cam_image`` + ReLU, before any scaling) for one image."""
    with ORACLES[method](model=model, target_layers=[layer], reshape_transform=reshape) as o:
        final = o(input_tensor=x, targets=[ClassifierOutputTarget(target)])
        a = o.activations_and_grads.activations[0].numpy().copy()
        g = o.activations_and_grads.gradients[0].numpy().copy()
        raw = np.maximum(o.get_cam_image(x, layer, None, a, g, False), 0)
    model.zero_grad(set_to_none=True)  # the oracle's backward() fills the parameters' .grad
    return final[0], raw[0]


def assert_same_as_oracle(res: CamResult, final: np.ndarray, raw: np.ndarray) -> None:
    assert res.map.shape == raw.shape and res.upsampled.shape == final.shape
    np.testing.assert_allclose(res.map, raw, rtol=1e-5, atol=1e-6 * float(raw.max()))
    span = float(raw.max() - raw.min())
    slack = 3 * float(np.abs(res.map - raw).max()) / span if span > 0 else 0.0
    assert np.abs(res.upsampled - final).max() < 1e-5 + slack
    assert res.map.max() > 0 and res.upsampled.max() == pytest.approx(1.0)  # a map with something in it


# --- the same maps as the oracle ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet18", weights=None).eval()
    return model, torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", CAM_METHODS)
def test_resnet18_matches_the_oracle(resnet, method):
    model, x = resnet
    res = fm.cam(model, x, method, layer="layer4", target=281)
    final, raw = oracle(method, model, model.layer4, x, 281)
    assert_same_as_oracle(res, final, raw)
    assert (res.method, res.layer, res.target, res.label, res.kind) == (method, "layer4", 281, "class 281", "spatial")
    logits = model(x).detach()
    assert res.probability == pytest.approx(float(torch.softmax(logits[0].double(), 0)[281]), rel=1e-6)
    assert [s.index for s in res.classes] == torch.argsort(logits[0], descending=True)[:5].tolist()
    assert len(res.contributions) == 512 and (res.weights is None) == (method == "layercam")
    assert all_hooks(model) == 0 and all(p.grad is None for p in model.parameters())


def test_resnet18_default_layer_is_layer4_and_the_module_itself_works(resnet):
    model, x = resnet
    by_default = fm.cam(model, x, target=3)
    assert by_default.layer == "layer4"
    np.testing.assert_array_equal(by_default.map, fm.cam(model, x, layer=model.layer4, target=3).map)
    np.testing.assert_array_equal(by_default.map, fm.cam(model, x, layer="layer4#1", target=3).map)
    best = fm.cam(model, x)  # no target: the most probable class
    assert best.target == int(model(x).argmax()) and best.classes[0].index == best.target


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(4)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=20, img_size=112, depth=4).eval()
    return model, torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("method", CAM_METHODS)
def test_timm_vit_tokens_match_the_oracle(vit, method):
    model, x = vit
    res = fm.cam(model, x, method, target=7)  # the default layer: the last block's attention input
    assert (res.layer, res.kind, res.map.shape) == ("blocks.3.norm1", "tokens", (7, 7))
    final, raw = oracle(method, model, model.blocks[-1].norm1, x, 7, reshape=tokens_to_grid(1, 7, 7))
    assert_same_as_oracle(res, final, raw)
    assert len(res.contributions) == model.embed_dim


def test_deit_drops_both_prefix_tokens():
    torch.manual_seed(6)
    model = timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, num_classes=10, img_size=112, depth=2
    ).eval()
    x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(7))
    res = fm.cam(model, x, target=2)
    assert res.layer == "blocks.1.norm1" and res.map.shape == (7, 7)
    final, raw = oracle("gradcam", model, model.blocks[-1].norm1, x, 2, reshape=tokens_to_grid(2, 7, 7))
    assert_same_as_oracle(res, final, raw)


def small_torchvision_vit() -> nn.Module:
    torch.manual_seed(8)
    model = torchvision.models.VisionTransformer(
        image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    ).eval()
    return model


def test_torchvision_vit_default_layer_and_oracle():
    model = small_torchvision_vit()
    nn.init.normal_(model.heads.head.weight, std=0.2)  # torchvision initialises the head to zeros
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    res = fm.cam(model, x, "gradcam++", target=4)
    assert (res.layer, res.map.shape) == ("encoder.layers.encoder_layer_1.ln_1", (4, 4))
    layer = model.encoder.layers.encoder_layer_1.ln_1
    final, raw = oracle("gradcam++", model, layer, x, 4, reshape=tokens_to_grid(1, 4, 4))
    assert_same_as_oracle(res, final, raw)
    with pytest.raises(CamError, match=r"score of class 4 does not change with any position of encoder\.ln .*earlier"):
        fm.cam(model, x, layer="encoder.ln", target=4)  # the class token only: every patch's gradient is zero


def test_default_layer_of_other_families(tiny):
    assert default_layer(tiny, size=32) == "features"  # the output of the conv stack (its last pool)
    pooled = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=5, global_pool="avg", img_size=64, depth=2
    ).eval()
    assert default_layer(pooled, size=64) == "norm"  # the head averages the patches: the final norm reaches the score
    zero_head = small_torchvision_vit()
    with pytest.raises(CamError, match=r"does not change with any of the last \d+ spatial outputs .*head of zeros"):
        default_layer(zero_head, size=64)


def test_the_default_layer_is_remembered_until_the_model_changes(tiny, monkeypatch):
    capture_module = sys.modules["featuremaps.capture"]  # (featuremaps.capture is the function)
    x = torch.randn(1, 3, 32, 32)
    assert fm.cam(tiny, x).layer == "features"

    def no_survey(*args, **kwargs):
        raise AssertionError("the default layer was looked for again")

    monkeypatch.setattr(capture_module, "capture", no_survey)
    assert fm.cam(tiny, x, target=1).layer == "features"
    monkeypatch.undo()
    tiny.features[5] = nn.Identity()  # a new module tree: looked for again
    assert fm.cam(tiny, x).layer == "features"


# --- the model leaves as it came ----------------------------------------------------------------------------------


def test_model_flags_gradients_and_hooks_are_left_alone(tiny):
    tiny.train()
    tiny.features[3].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    x = torch.randn(1, 3, 32, 32)
    fm.cam(tiny, x, "gradcam++", layer="features.3")
    with pytest.raises(CamError):
        fm.cam(tiny, x, layer="classifier")  # fails after its pass: still nothing left behind
    assert all(m.training for m in tiny.modules())
    assert [p.requires_grad for p in tiny.parameters()] == [True, True, False, True, True, True]
    assert all(p.grad is None for p in tiny.parameters())
    assert all(torch.equal(v, before[k]) for k, v in tiny.state_dict().items())
    assert all_hooks(tiny) == 0
    assert [m.inplace for m in tiny.modules() if isinstance(m, nn.ReLU)] == [True, True]


def test_in_place_relu_after_the_layer_does_not_change_its_map(tiny):
    """``features.3`` is a conv whose output a ``ReLU(inplace=True)`` overwrites: the CAM uses the conv's own output
    (pytorch-grad-cam's hook keeps a reference to it, so on the CPU it sees the ReLU's result instead)."""
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    res = fm.cam(tiny, x, layer="features.3", target=2)
    out_of_place = type(tiny)()
    out_of_place.load_state_dict(tiny.state_dict())
    for m in out_of_place.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    final, raw = oracle("gradcam", out_of_place.eval(), out_of_place.features[3], x, 2)
    assert_same_as_oracle(res, final, raw)


def test_a_frozen_model_gets_the_same_map(resnet):
    model, x = resnet
    free = fm.cam(model, x, layer="layer3", target=9)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        frozen = fm.cam(model, x, layer="layer3", target=9)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    np.testing.assert_array_equal(frozen.map, free.map)
    assert frozen.map.shape == (10, 10)


@pytest.fixture
def one_thread():
    """Tiny convolutions on one thread: on a busy shared machine, two threads' hand-offs take most of each call."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_memory_is_flat_over_1000_calls_and_no_hook_is_left(tiny, one_thread):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    for i in range(50):
        fm.cam(tiny, x, target=i % 5)
    gc.collect()
    proc = psutil.Process()
    rss = proc.memory_info().rss
    tensors = sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())
    methods = list(CAM_METHODS)
    for i in range(1000):
        res = fm.cam(tiny, x, methods[i % 3], target=i % 5)
    del res
    gc.collect()
    assert sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects()) == tensors  # no tensor outlives its call
    grown = (proc.memory_info().rss - rss) / 2**20
    assert grown < 8, f"RSS grew by {grown:.1f} MB over 1000 calls"
    assert all_hooks(tiny) == 0


# --- one-line errors ----------------------------------------------------------------------------------------------

LABELS = ["tench", "goldfish", "tabby cat", "tiger cat", "great white shark"]


class Features(nn.Module):
    """No classifier: forward() returns maps."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


class Pair(Features):
    def forward(self, x):
        y = self.conv(x)
        return y, y.mean()


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"target": "tabbby cat", "labels": LABELS}, CamError, r"^unknown class 'tabbby cat' \(closest: 'tabby cat'"),
        ({"target": "cat", "labels": LABELS}, CamError, r"'cat' matches 2 classes: 'tabby cat' \(2\), 'tiger cat'"),
        ({"target": 5}, CamError, r"^class index 5 is out of range; this model has classes 0\.\.4$"),
        ({"target": "tabby"}, CamError, r"no labels are known for this model"),
        ({"labels": LABELS[:3]}, CamError, r"^3 labels for a model with 5 classes; give one label per class"),
        ({"layer": "classifier"}, CamError, r"^classifier outputs 1x5, not maps of the picture: .*leave the layer out"),
        ({"layer": "pool"}, CamError, r"^pool outputs 1x6x1x1, not maps of the picture"),
        ({"layer": "featurs.3"}, LayerError, r"^no layer named 'featurs\.3'; did you mean features\.3"),
        ({"layer": "features.3#2"}, LayerError, r"returned a tensor"),
        ({"layer": nn.Conv2d(3, 3, 1)}, CamError, r"^that Conv2d is not a layer of this model"),
        ({"method": "scorecam"}, CamError, r"^unknown CAM method 'scorecam'; use one of gradcam, gradcam\+\+"),
        ({"labels": 7}, CamError, r"^labels are a sequence of class names or a labels file, not a int"),
    ],
)
def test_user_mistakes_are_one_line_errors(tiny, kwargs, error, pattern):
    x = torch.randn(1, 3, 32, 32)
    kwargs = dict(kwargs)
    method = kwargs.pop("method", "gradcam")
    with pytest.raises(error, match=pattern) as info:
        fm.cam(tiny, x, method, **kwargs)
    assert "\n" not in str(info.value) and isinstance(info.value, FeatureMapsError)
    assert all_hooks(tiny) == 0


def test_models_and_inputs_that_cannot_be_explained(tiny, tmp_path):
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(CamError, match=r"returns a tensor of shape \(1, 4, 32, 32\), not class scores \(1, classes\)"):
        fm.cam(Features(), x, layer="conv")
    with pytest.raises(CamError, match=r"returns a tuple, not class scores"):
        fm.cam(Pair(), x, layer="conv")
    with pytest.raises(CamError, match=r"explains one image, got an input of shape \(2, 3, 32, 32\)"):
        fm.cam(tiny, torch.randn(2, 3, 32, 32))
    with pytest.raises(CamError, match=r"no picture to draw it over"):
        fm.cam(tiny, x).overlay()
    (tmp_path / "labels.txt").write_text("a\nb\n")
    with pytest.raises(CamError, match=r"2 labels for a model with 5 classes"):
        fm.cam(tiny, x, labels=tmp_path / "labels.txt")
    with pytest.raises(CamError, match=r"labels file '.*missing.txt' not found"):
        fm.cam(tiny, x, labels=str(tmp_path / "missing.txt"))


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return {"logits": self.head(self.body(x).mean(dim=(2, 3)))}


def test_logits_in_a_dict_labels_from_the_model_and_the_picture(tmp_path):
    torch.manual_seed(12)
    res = fm.cam(DictOut().eval(), torch.randn(1, 3, 16, 16), target=1)
    assert res.layer == "body" and res.map.shape == (16, 16)
    model = fm.load_model("resnet18", weights="random", size=64)
    model = dataclasses.replace(model, categories=tuple(f"thing {i}" for i in range(1000)))
    res = fm.cam(model, "sample:chelsea", target="thing 281")
    assert (res.target, res.label, res.layer, res.map.shape, res.upsampled.shape) == (
        281,
        "thing 281",
        "layer4",
        (2, 2),
        (64, 64),
    )
    assert res.image.size == (64, 64) and res.title.startswith("Grad-CAM of 'thing 281' (class 281, p = ")
    im = res.overlay()
    assert im.size[0] == 320 and im.size[1] > 64  # the legend under a small picture is wide enough to read
    assert res.overlay(legend=False).size == (64, 64)
    json.dumps(res.to_dict())  # plain JSON values


# --- the command line ---------------------------------------------------------------------------------------------

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def one_line_error(result, pattern: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(pattern, lines[0]), result.stderr


def test_cam_command_writes_a_run_folder(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join("tabby cat" if i == 281 else f"thing {i}" for i in range(1000)))
    out = tmp_path / "cam"
    r = run("cam", "chelsea", "--model", "resnet18", "--weights", "random", "--size", "64", "--method", "gradcam++",
            "--layer", "layer3", "--target", "tabby", "--labels", str(labels), "--out", str(out))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "Grad-CAM++ of 'tabby cat' (class 281, p = " in r.stdout and "RANDOM weights" in r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "run" and [layer["name"] for layer in manifest["layers"]] == ["layer3"]
    c = manifest["cam"]
    assert (c["method"], c["layer"], c["target"], c["label"], c["map_shape"]) == (
        "gradcam++",
        "layer3",
        281,
        "tabby cat",
        [4, 4],
    )
    assert len(c["top_classes"]) == 5 and len(c["channels"]) == 16 and c["map_file"] == "cam.npy"
    assert np.load(out / "cam.npy", allow_pickle=False).shape == (4, 4)
    for name in ("cam.png", "cam_channels.png", "grids/000_layer3.png", "index.html", "input.png"):
        assert (out / name).is_file(), name
    html = (out / "index.html").read_text()
    first = c["channels"][0]["channel"]
    assert (
        "Class evidence: Grad-CAM++ at layer3" in html and f"<a href='grids/000_layer3.png'>channel {first}</a>" in html
    )
    assert html.index("Class evidence") < html.index("The deepest layer")  # beside the layer strip, not at the end


def test_show_with_cam_adds_the_evidence_and_the_layers_grid(tmp_path):
    out = tmp_path / "show"
    r = run("show", "chelsea", "--model", "resnet18", "--weights", "random", "--size", "64", "--cam", "layercam",
            "--target", "3", "--channels", "top4", "--out", str(out))  # fmt: skip
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cam"]["layer"] == "layer4" and manifest["cam"]["method"] == "layercam"
    names = [layer["name"] for layer in manifest["layers"]]
    assert names[-1] == "layer4" and "conv1" in names  # the conv layers as usual, and the CAM's layer
    grid = next(p for p in manifest["pictures"] if p["kind"] == "grid" and p["layer"] == "layer4")
    html = (out / "index.html").read_text()
    for ch in manifest["cam"]["channels"][:8]:  # linked when the grid (top 4 here) shows it
        linked = f"<a href='{grid['path']}'>channel {ch['channel']}</a>" in html
        assert linked == (ch["channel"] in grid["channels"])
    assert "LayerCAM of class 3 (p = " in r.stdout


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--target", "tabby"], r"--target and --labels go with --cam"),
        (["--cam", "gradcamm"], r"unknown CAM method 'gradcamm' \(did you mean 'gradcam'\?\)"),
        (["--cam", "gradcam", "--mode", "conv"], r"--cam explains the real forward pass: use it with --mode network"),
        (["--cam", "gradcam", "--labels", "missing.txt"], r"labels file 'missing.txt' not found"),
    ],
)
def test_show_cam_mistakes_before_the_model_loads(tmp_path, monkeypatch, args, pattern):
    monkeypatch.chdir(tmp_path)

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before a mistake that needs no model was found")

    monkeypatch.setattr("featuremaps.models.load_model", no_model)
    one_line_error(run("show", "edge", "--model", "resnet18", "--weights", "random", "--out", "out", *args), pattern)
    assert not (tmp_path / "out").exists()


def test_cam_command_unknown_target_is_one_line(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"thing {i}" for i in range(1000)))
    r = run("cam", "edge", "--model", "resnet18", "--weights", "random", "--size", "32", "--target", "thng 7",
            "--labels", str(labels), "--out", str(tmp_path / "out"))  # fmt: skip
    one_line_error(r, r"unknown class 'thng 7' \(closest: 'thing 7'")
    assert not (tmp_path / "out").exists()


def test_show_cam_target_tabby_from_the_weights_labels(offline, tmp_path):
    """``--target tabby`` found among the labels of the weights' meta (the real loading path, with a checkpoint this
    test plants in the hub cache: seeded random values, not a pretrained network), and a report with the CAM
    overlay and the top-5 right after the layer strip, the breakdown's channels linking to their tiles."""
    enum = torchvision.models.get_model_weights("squeezenet1_1").DEFAULT
    planted = weights_file(enum)
    planted.parent.mkdir(parents=True)
    torch.manual_seed(13)
    torch.save(torchvision.models.get_model("squeezenet1_1", weights=None).state_dict(), planted)
    out = tmp_path / "show"
    r = run("show", "chelsea", "--model", "squeezenet1_1", "--size", "96", "--cam", "gradcam", "--target", "tabby",
            "--channels", "270-290", "--out", str(out))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert enum.meta["categories"][281] == "tabby"
    c = json.loads((out / "manifest.json").read_text())["cam"]
    assert (c["target"], c["label"], c["method"]) == (281, "tabby", "gradcam")
    assert "Grad-CAM of 'tabby' (class 281, p = " in r.stdout
    model = fm.load_model("squeezenet1_1", size=96, progress=False)
    expected = fm.cam(model, "sample:chelsea", target=281)
    np.testing.assert_array_equal(np.load(out / "cam.npy", allow_pickle=False), expected.map)
    assert [t["label"] for t in c["top_classes"]] == [s.label for s in expected.classes]
    html = (out / "index.html").read_text()
    sections = re.findall(r"<h2>(.*?)</h2>", html)
    assert sections[:2] == ["Every layer at a glance", f"Class evidence: Grad-CAM at {c['layer']}"]
    evidence = html[html.index("<h2>Class evidence") : html.index("<h2>The deepest layer")]
    assert "data-file='cam.png'" in evidence and "most probable classes" in evidence
    for t in c["top_classes"]:
        assert f"<td>{t['label']}</td><td>{t['index']}</td><td>{t['probability']:.4f}</td>" in evidence
    manifest = json.loads((out / "manifest.json").read_text())
    grid = next(p for p in manifest["pictures"] if p["kind"] == "grid" and p["layer"] == c["layer"])
    cols = grid_layout(len(grid["channels"]))[1]
    linked = 0
    for ch in c["channels"][:8]:
        if ch["channel"] in grid["channels"]:
            i = grid["channels"].index(ch["channel"])
            where = f"{grid['path']}: row {i // cols + 1}, column {i % cols + 1}"
            assert f"<a href='{grid['path']}'>channel {ch['channel']}</a>" in evidence
            assert f"<a href='{grid['path']}'>{where}</a>" in evidence
            linked += 1
        else:
            assert f"<td>channel {ch['channel']}</td>" in evidence
    assert linked > 0 and c["channels"][0]["channel"] == 281  # its last spatial layer is the class-score conv


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--method", "gradcam+"], r"unknown CAM method 'gradcam\+'"),
        (["--labels", "missing.txt"], r"labels file 'missing.txt' not found"),
        (["--layer", "layr4"], r"no layer named 'layr4'; did you mean layer4"),
    ],
)
def test_cam_command_mistakes_before_the_model_loads(tmp_path, monkeypatch, args, pattern):
    monkeypatch.chdir(tmp_path)

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before a mistake that needs no model was found")

    monkeypatch.setattr("featuremaps.models.load_model", no_model)
    one_line_error(run("cam", "edge", "--model", "resnet18", "--weights", "random", "--out", "out", *args), pattern)
    assert not (tmp_path / "out").exists()
