"""Loading models: registry names, weights (random, checkpoint, pretrained via the cache, offline),
user models, preprocessing, devices."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import get_model

import featuremaps as fm
from featuremaps.errors import ModelError, WeightsUnavailableError
from featuremaps.models import weights_file


def test_registry_has_the_seed_models_and_no_hand_written_table():
    names = fm.list_models()
    assert {"vgg16", "vgg16_bn", "alexnet", "resnet50", "convnext_tiny"} <= set(names)
    assert "fasterrcnn_resnet50_fpn" not in names  # classifiers only


def test_unknown_model_suggests_close_names():
    with pytest.raises(ModelError, match=r"unknown model 'vgg61'; did you mean vgg19, vgg16"):
        fm.load_model("vgg61", weights="random")


def test_random_weights_are_seeded_and_labelled():
    a = fm.load_model("alexnet", weights="random", seed=3)
    b = fm.load_model("alexnet", weights="random", seed=3)
    c = fm.load_model("alexnet", weights="random", seed=4)
    wa, wb, wc = (m.module.features[0].weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.weights == "random(seed=3)" and a.pretrained is False
    assert a.module.training is False


def test_preprocessing_comes_from_the_weights_and_resizes_without_crop():
    m = fm.load_model("vgg16", weights="random")
    pre = m.preprocessing
    assert pre.size == (224, 224)
    assert pre.mean == pytest.approx((0.485, 0.456, 0.406)) and pre.std == pytest.approx((0.229, 0.224, 0.225))
    assert fm.load_model("inception_v3", weights="random").preprocessing.size == (299, 299)
    from PIL import Image

    img = Image.new("RGB", (400, 100), (255, 0, 0))
    x, resized = pre(img)
    assert resized.size == (224, 224) and x.shape == (1, 3, 224, 224)
    # a pure red picture, normalised: ((1 - mean) / std, (0 - mean) / std, ...) everywhere: no crop, no padding
    torch.testing.assert_close(
        x[0, :, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0 - 0.406) / 0.225])
    )
    assert torch.all(x[0, 0] == x[0, 0, 0, 0])
    assert m.with_size(96).preprocessing.size == (96, 96)
    assert m.with_size((64, 128)).preprocessing.size == (64, 128)


def test_the_minimum_size_is_the_models_input_not_the_picture():
    m = fm.load_model("vgg16", weights="random")
    with pytest.raises(ModelError, match=r"input size 16x16 is smaller than this model's minimum 32x32"):
        m.with_size(16)
    from PIL import Image

    # the picture is resized to the model's input (224x224) whatever its own size: a 4000x40 strip
    # or a 20x20 icon are fine, as the model sees 224x224
    strip = Image.new("RGB", (4000, 40), (200, 30, 30))
    maps = fm.capture(m, strip, layers="features.0")
    assert maps.input_size == (224, 224) and maps.image.size == (224, 224)
    assert fm.capture(m, Image.new("RGB", (20, 20)), layers="features.0").input_size == (224, 224)


def test_checkpoint_round_trip_pth_and_safetensors(tmp_path):
    src = fm.load_model("alexnet", weights="random", seed=7).module
    pth, st = tmp_path / "alex.pth", tmp_path / "alex.safetensors"
    torch.save({"state_dict": src.state_dict()}, pth)
    save_file(src.state_dict(), str(st))
    for path in (pth, st):
        m = fm.load_model("alexnet", weights=str(path))
        assert m.pretrained is True and m.weights == f"checkpoint:{path}"
        for k, v in src.state_dict().items():
            assert torch.equal(m.module.state_dict()[k], v), k


def test_dataparallel_prefix_is_stripped(tmp_path):
    src = fm.load_model("alexnet", weights="random", seed=1).module
    path = tmp_path / "dp.pt"
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, path)
    m = fm.load_model("alexnet", weights=path)
    assert torch.equal(m.module.features[0].weight, src.features[0].weight)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/featuremaps-pwned",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"weight": Evil()}, f)
    if os.path.exists("/tmp/featuremaps-pwned"):
        os.remove("/tmp/featuremaps-pwned")
    with pytest.raises(ModelError, match="refusing to load evil.pth: it holds Python objects"):
        fm.load_model("alexnet", weights=str(path))
    assert not os.path.exists("/tmp/featuremaps-pwned")


def test_bad_checkpoints_have_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="checkpoint .*missing.pth' not found"):
        fm.load_model("alexnet", weights=str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="junk.pth"):
        fm.load_model("alexnet", weights=str(junk))
    other = tmp_path / "resnet.pth"
    torch.save(get_model("resnet18").state_dict(), other)
    with pytest.raises(ModelError, match=r"resnet.pth does not fit alexnet: \d+ missing"):
        fm.load_model("alexnet", weights=str(other))
    bad_st = tmp_path / "cut.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00")
    with pytest.raises(ModelError, match="cannot read cut.safetensors as safetensors"):
        fm.load_model("alexnet", weights=str(bad_st))


def test_unknown_weights_name_lists_the_options():
    with pytest.raises(ModelError, match=r"vgg16 has no weights 'IMAGENET9K'; use one of DEFAULT, IMAGENET1K_V1"):
        fm.load_model("vgg16", weights="IMAGENET9K")


def test_offline_pretrained_fails_loudly_and_never_falls_back_to_random(offline, capsys):
    with pytest.raises(
        WeightsUnavailableError,
        match=r"vgg16/IMAGENET1K_V1 are not cached and cannot be downloaded .*put vgg16-397923af.pth into .*checkpoints.*random",
    ):
        fm.load_model("vgg16", weights="DEFAULT", progress=False)
    assert fm.is_cached("vgg16") is False
    quiet = capsys.readouterr()
    assert "Downloading" not in quiet.out + quiet.err, "progress=False (--quiet) silences torch.hub's announcement"
    with pytest.raises(WeightsUnavailableError):
        fm.load_model("vgg16", weights="DEFAULT", progress=True)
    shown = capsys.readouterr()
    assert shown.out == "", "stdout is for results, not for torch.hub's announcement"
    assert "Downloading" not in shown.err, "a failed load is one error, not an announcement and an error"


def test_pretrained_weights_load_from_the_torch_hub_cache(offline):
    """The real loading path (weights API + cache) with a file the test writes itself: no download."""
    enum = __import__("torchvision").models.get_model_weights("squeezenet1_1").DEFAULT
    target = weights_file(enum)
    assert str(target).startswith(str(offline))
    target.parent.mkdir(parents=True)
    torch.manual_seed(11)
    reference = get_model("squeezenet1_1", weights=None).state_dict()
    torch.save(reference, target)
    assert fm.is_cached("squeezenet1_1")
    m = fm.load_model("squeezenet1_1", weights="DEFAULT", progress=False)
    assert m.pretrained and m.weights == "IMAGENET1K_V1" and len(m.categories) == 1000
    assert torch.equal(m.module.features[0].weight, reference["features.0.weight"])


def test_user_model_from_module_attr_with_checkpoint(tmp_path, monkeypatch):
    pkg = tmp_path / "mynets.py"
    pkg.write_text(
        "import torch\nfrom torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True))\n"
        "    def forward(self, x):\n        return self.features(x)\n"
        "def make():\n    return Net()\n"
    )
    monkeypatch.chdir(tmp_path)
    m = fm.load_model("mynets:Net", weights="random", seed=2)
    assert m.name == "mynets:Net" and m.weights == "random(seed=2)"
    ckpt = tmp_path / "net.pth"
    torch.save(m.module.state_dict(), ckpt)
    m2 = fm.load_model("mynets:make", weights=str(ckpt))
    assert torch.equal(m2.module.features[0].weight, m.module.features[0].weight)
    m3 = fm.load_model(f"{pkg}:Net", weights=str(ckpt))
    assert torch.equal(m3.module.features[0].weight, m.module.features[0].weight)
    maps = fm.capture(m2, torch.randn(1, 3, 8, 8))
    assert maps.names == ["features.0"] and maps.model == "mynets:make"
    with pytest.raises(ModelError, match="mynets:Net is your own model: torchvision has no 'DEFAULT' weights"):
        fm.load_model("mynets:Net", weights="DEFAULT")
    with pytest.raises(ModelError, match="'mynets' has no attribute 'Nope'"):
        fm.load_model("mynets:Nope", weights="random")
    with pytest.raises(ModelError, match="cannot import 'no_such_pkg.nets'"):
        fm.load_model("no_such_pkg.nets:Net", weights="random")


def test_devices():
    assert fm.load_model("alexnet", weights="random", device="cpu").device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available on this machine; use --device cpu"):
            fm.load_model("alexnet", weights="random", device="cuda")
    with pytest.raises(ModelError, match="unknown device 'gpu9'"):
        fm.load_model("alexnet", weights="random", device="gpu9")


def test_a_user_module_object_is_wrapped_unchanged(tiny):
    tiny.train()
    m = fm.load_model(tiny)
    assert m.module is tiny and tiny.training is True and m.weights == "as given"


def _count_inits(monkeypatch) -> list[str]:
    """Every random initialisation torch.nn.init runs on real memory from now on (the costly part of
    building a big model: VGG16's takes seconds here; on the meta device it costs nothing)."""
    import torch.nn.init as init

    calls: list[str] = []
    for name in ("kaiming_normal_", "kaiming_uniform_", "normal_", "uniform_", "xavier_uniform_", "trunc_normal_"):
        real = getattr(init, name)

        def counted(tensor, *args, _real=real, _name=name, **kwargs):
            if not tensor.is_meta:
                calls.append(_name)
            return _real(tensor, *args, **kwargs)

        monkeypatch.setattr(init, name, counted)
    return calls


def test_a_checkpoint_is_loaded_without_a_random_init_first(tmp_path, monkeypatch):
    torch.manual_seed(3)
    src = get_model("vgg11", weights=None).eval()
    path = tmp_path / "vgg11.pth"
    torch.save(src.state_dict(), path)
    calls = _count_inits(monkeypatch)
    m = fm.load_model("vgg11", weights=str(path))
    assert calls == [], f"the weights were initialised before being replaced: {sorted(set(calls))}"
    assert not any(t.is_meta for t in (*m.module.parameters(), *m.module.buffers()))
    assert all(p.requires_grad and isinstance(p, torch.nn.Parameter) for p in m.module.parameters())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(m.module(x), src(x))
    # a half-precision checkpoint is cast to the model's own dtype, as load_state_dict would
    torch.save({k: v.half() for k, v in src.state_dict().items()}, path)
    assert next(fm.load_model("vgg11", weights=str(path)).module.parameters()).dtype == torch.float32


def test_pretrained_weights_skip_the_random_init_too(offline, monkeypatch):
    enum = __import__("torchvision").models.get_model_weights("squeezenet1_1").DEFAULT
    target = weights_file(enum)
    target.parent.mkdir(parents=True)
    torch.manual_seed(12)
    reference = get_model("squeezenet1_1", weights=None)
    torch.save(reference.state_dict(), target)
    calls = _count_inits(monkeypatch)
    m = fm.load_model("squeezenet1_1", weights="DEFAULT", progress=False)
    assert calls == [] and m.pretrained
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(m.module(x), reference.eval()(x))


def test_a_buffer_missing_from_the_checkpoint_falls_back_to_a_full_build(tmp_path, monkeypatch):
    import featuremaps.models as models

    torch.manual_seed(4)
    src = get_model("alexnet", weights=None)
    path = tmp_path / "alex.pth"
    torch.save(src.state_dict(), path)
    real = models._without_init

    def with_extra_buffer(name, **kwargs):
        module = real(name, **kwargs)
        with torch.device("meta"):
            module.register_buffer("scratch", torch.zeros(3), persistent=False)  # not in any checkpoint
        return module

    monkeypatch.setattr(models, "_without_init", with_extra_buffer)
    m = fm.load_model("alexnet", weights=str(path))  # built the usual way instead: no meta tensor left
    assert not any(t.is_meta for t in (*m.module.parameters(), *m.module.buffers()))
    assert torch.equal(m.module.features[0].weight, src.features[0].weight)


def test_a_whole_pickled_model_gets_our_own_one_line_message(tmp_path):
    path = tmp_path / "whole.pth"
    torch.save(get_model("alexnet", weights=None), path)  # the whole object, not its state_dict
    with pytest.raises(ModelError) as info:
        fm.load_model("alexnet", weights=str(path))
    text = str(info.value)
    assert text.startswith("whole.pth is a whole pickled model (a AlexNet object), not a state_dict")
    assert "torch.save(model.state_dict(), 'weights.pth')" in text
    assert "\x1b" not in text and "\n" not in text and "Weights only load failed" not in text


def test_a_grayscale_model_gets_grayscale_pictures(tmp_path, monkeypatch):
    (tmp_path / "others.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class Gray(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())\n"
        "    def forward(self, x):\n"
        "        return self.features(x).mean((2, 3))\n"
        "class Four(Gray):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.features[0] = nn.Conv2d(4, 4, 3, padding=1)\n"
    )
    gray = fm.load_model(f"{tmp_path / 'others.py'}:Gray", weights="random", size=32)
    assert gray.preprocessing.channels == 1 and len(gray.preprocessing.mean) == 1
    from PIL import Image

    picture = Image.new("RGB", (40, 40), (255, 0, 0))
    maps = fm.capture(gray, picture, layers="conv")
    assert maps["features.0"].shape == (1, 4, 32, 32)
    x, _ = gray.preprocessing(picture)  # red in grayscale: L = 0.299 * 255 = 76
    assert x.shape == (1, 1, 32, 32) and x[0, 0, 0, 0].item() == pytest.approx((76 / 255 - 0.449) / 0.226, abs=1e-4)
    assert [r.output_shape for r in fm.list_layers(gray, layers="conv")] == [(1, 4, 32, 32)]
    four = fm.load_model(f"{tmp_path / 'others.py'}:Four", weights="random", size=32)
    x4, _ = four.preprocessing(picture)  # RGB and an opaque alpha plane
    assert x4.shape == (1, 4, 32, 32) and torch.all(x4[0, 3] == 1.0)
    assert fm.capture(four, picture, layers="conv")["features.0"].shape == (1, 4, 32, 32)
    two = fm.models.Preprocessing.for_channels(2).with_size(32)
    with pytest.raises(
        ModelError, match=r"takes 2 input channels, but a picture gives 3 \(RGB\), 1 .*\(N, 2, H, W\) tensor"
    ):
        two(picture)


def test_a_skeleton_is_the_architecture_alone():
    from featuremaps.models import skeleton

    plan = skeleton("resnet50", size=96)
    assert all(p.is_meta for p in plan.module.parameters())
    rows = fm.list_layers(plan, layers="layer4")
    assert rows[0].output_shape == (1, 2048, 3, 3)
    assert skeleton("my.module:Net") is None
    with pytest.raises(ModelError, match="unknown model 'resnet5O'"):
        skeleton("resnet5O")
