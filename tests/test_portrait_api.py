"""Channel portraits end to end through ``fm.portrait``: the capture engine as the network, on planted and
seeded models (CPU, offline).

Oracles: planted filters whose preferred stimulus is known (a grating of known orientation and period,
found again with a 2-D FFT; a colour), the model's own response recomputed on the returned images
without featuremaps, the core optimizer driven by the plain model (the capture engine must compute what
the model computes), a plain forward hook's channel means (for ``topK``), and counting hooks (early stop).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import featuremaps as fm
from featuremaps.errors import LayerError, OptionError, RunError
from featuremaps.portrait import (
    PortraitError,
    Portraits,
    capture_forward,
    load_portraits,
    optimize,
    portrait_image,
    portrait_images,
)
from featuremaps.portrait.cache import INFO_KEY, cache_path, model_fingerprint


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: faster than two on this shared 2-core machine, and the same numbers every run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def imagenet(x: torch.Tensor) -> torch.Tensor:
    return (x - IMAGENET_MEAN) / IMAGENET_STD


# ---------------------------------------------------------------- planted and seeded models


def grating_filter(degrees: float, period: float, size: int = 21, sigma: float = 6.0) -> torch.Tensor:
    """A zero-mean cosine grating under a Gaussian; wave vector at ``degrees`` (x: column, y: row)."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    t = math.radians(degrees)
    w = torch.cos(2 * math.pi * (x * math.cos(t) + y * math.sin(t)) / period) * torch.exp(-(x**2 + y**2) / 72.0)
    w = w - w.mean()
    return (w / w.abs().sum()).float()


EDGES = ((30.0, 8.0), (120.0, 6.0))  # (wave-vector orientation in degrees, period in pixels)


class Planted(nn.Module):
    """``edge``: channel k filters the luminance with grating ``EDGES[k]``; ``relu`` (in place) rectifies it;
    ``after`` and ``head`` come later: once the model has been seen at a shape they never run."""

    def __init__(self) -> None:
        super().__init__()
        self.edge = nn.Conv2d(3, len(EDGES), 21, padding=10, bias=False)
        with torch.no_grad():
            for k, (degrees, period) in enumerate(EDGES):
                self.edge.weight[k] = grating_filter(degrees, period) / 3
        self.relu = nn.ReLU(inplace=True)
        self.after = nn.Conv2d(len(EDGES), 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.after(self.relu(self.edge(x))).mean(dim=(2, 3)))


class Colours(nn.Module):
    """Channel 0 answers red, 1 green, 2 blue (1x1 weights (1, -0.5, -0.5) and rotations), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.colour = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.colour.weight[:, :, 0, 0] = torch.tensor([[1.0, -0.5, -0.5], [-0.5, 1.0, -0.5], [-0.5, -0.5, 1.0]])
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.colour(x).mean(dim=(2, 3)))


class Seeded(nn.Module):
    """Seeded random weights: conv, BatchNorm, in-place ReLU, conv, in-place ReLU (16 channels), a classifier."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 5, padding=2),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(16, 3)
        with torch.no_grad():  # running statistics that are not the identity: eval mode shows in the numbers
            self.features[1].running_mean.uniform_(-0.2, 0.2)
            self.features[1].running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def seeded() -> Seeded:
    return Seeded().eval()


def dominant_grating(image: Image.Image) -> tuple[float, float]:
    """(period in px, orientation of the wave vector in degrees mod 180) of the strongest luminance component:
    the FFT peak of the Hann-windowed, mean-free luminance, refined by the power-weighted centroid around it."""
    lum = np.asarray(image, dtype=np.float64).mean(axis=2)
    lum -= lum.mean()
    n = lum.shape[0]
    win = np.hanning(n)
    power = np.abs(np.fft.fftshift(np.fft.fft2(lum * np.outer(win, win)))) ** 2
    freqs = np.fft.fftshift(np.fft.fftfreq(n))
    power[n // 2, n // 2] = 0.0
    iy, ix = np.unravel_index(int(power.argmax()), power.shape)
    ys, xs = slice(max(iy - 2, 0), iy + 3), slice(max(ix - 2, 0), ix + 3)
    p = power[ys, xs]
    fy = float((p * freqs[ys][:, None]).sum() / p.sum())
    fx = float((p * freqs[xs][None, :]).sum() / p.sum())
    return 1.0 / math.hypot(fx, fy), math.degrees(math.atan2(fy, fx)) % 180.0


def angle_error(a: float, b: float) -> float:
    d = abs(a - b) % 180.0
    return min(d, 180.0 - d)


def counting(module: nn.Module) -> list[int]:
    """A forward hook on ``module`` that counts its calls (the caller removes nothing: a user's hook)."""
    calls: list[int] = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


# ---------------------------------------------------------------- what the portraits show


def test_planted_edges_give_their_orientation_and_frequency():
    """Both planted channels in one batch, through the capture engine and an in-place ReLU; each portrait's
    dominant grating is its own filter's. Tolerances as in the core's test: one FFT bin at 64 px is 7 degrees
    tangentially and 12.5 % radially at period 8, and the 1/f parameterization biases the period up (seen
    with 80 steps, seeds 0..2: +13 to +15 % at period 8, +1 to +3 % at period 6, orientation within 4.5
    degrees). The two filters differ by 90 degrees and 33 % in period, far outside the tolerances."""
    p = fm.portrait(Planted().eval(), "relu", [0, 1], size=64, steps=80, lr=0.1, seed=0)
    assert isinstance(p, Portraits) and p.channels == (0, 1) and p.layer == "relu"
    for channel, (degrees, period) in enumerate(EDGES):
        found_period, found_degrees = dominant_grating(p.image(channel))
        assert angle_error(found_degrees, degrees) < 8.0, (channel, found_degrees)
        assert abs(found_period - period) / period < 0.2, (channel, found_period)


def test_colour_channels_give_their_colour():
    p = fm.portrait(Colours().eval(), "colour", [0, 1, 2], size=32, steps=128, seed=0)
    for k in range(3):
        mean = np.asarray(p.image(k), dtype=np.float64).mean(axis=(0, 1)) / 255
        assert all(mean[k] > mean[j] + 0.2 for j in range(3) if j != k), (k, mean)


def test_objective_rises_and_values_are_the_models_own_response():
    net = seeded()
    p = fm.portrait(net, "features.4", [0, 4, 13], size=32, steps=48, seed=0)
    assert p.result.history.shape == (48, 3)
    assert all(v > s + 0.02 for v, s in zip(p.values, p.start_values)), (p.start_values, p.values)
    assert p.result.mean_history[-8:].mean() > 1.3 * p.result.mean_history[:8].mean()
    # the plain model, no featuremaps: its response to the returned images is the reported value
    grabbed = {}
    handle = net.features[4].register_forward_hook(lambda m, i, o: grabbed.setdefault("out", o.clone()))
    try:
        with torch.no_grad():
            net(imagenet(p.result.images))
    finally:
        handle.remove()
    expected = grabbed["out"][[0, 1, 2], [0, 4, 13]].mean(dim=(1, 2))
    torch.testing.assert_close(torch.tensor(p.values), expected, rtol=1e-4, atol=1e-6)
    assert p.value(4) == pytest.approx(p.values[1])
    assert [im.size for im in p.images] == [(32, 32)] * 3 and p.image(13).mode == "RGB"
    assert np.array_equal(np.asarray(p.image(13)), (p.result.images[2] * 255).round().byte().permute(1, 2, 0).numpy())


def test_capture_engine_computes_what_the_model_computes_and_batches_do_not_matter():
    """fm.portrait (capture engine, batches of any size) == the core driven by the plain model, image by image."""
    net = seeded()
    kwargs = {"size": 24, "steps": 12, "seed": 3}
    together = fm.portrait(net, "features.4", [3, 7, 11], **kwargs)
    alone = fm.portrait(net, "features.4", [7], **kwargs)
    one_by_one = fm.portrait(net, "features.4", [3, 7, 11], batch_size=1, **kwargs)
    plain = optimize(lambda x: net.features(x), [3, 7, 11], normalize=imagenet, **kwargs)
    torch.testing.assert_close(together.result.images, plain.images, rtol=0, atol=1e-5)
    torch.testing.assert_close(together.result.images, one_by_one.result.images, rtol=0, atol=1e-5)
    torch.testing.assert_close(together.result.images[1], alone.result.images[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(together.result.history, one_by_one.result.history, rtol=1e-4, atol=1e-6)
    assert one_by_one.channels == (3, 7, 11) and one_by_one.result.history.shape == (12, 3)
    again = fm.portrait(net, "features.4", [3, 7, 11], **kwargs)
    assert torch.equal(again.result.images, together.result.images)
    other = fm.portrait(net, "features.4", [7], **{**kwargs, "seed": 4})
    assert (other.result.images[0] - alone.result.images[0]).abs().mean() > 0.05


def test_an_in_place_op_after_the_layer_cannot_change_the_objective():
    """features.3 is a conv whose output the in-place ReLU features.4 rectifies. The first step at each input
    shape runs the whole model (the ReLU included): its objective and gradient must still be the conv's, as
    the plain ``features[:4]`` gives them, negative means included."""
    net = seeded()
    kwargs = {"size": 16, "steps": 4, "seed": 5}
    chans = list(range(16))
    p = fm.portrait(net, "features.3", chans, **kwargs)
    plain = optimize(lambda x: net.features[:4](x), chans, normalize=imagenet, **kwargs)
    assert (plain.history[0] < 0).any()  # a rectified copy would read >= 0 here: the test can tell
    torch.testing.assert_close(p.result.history, plain.history, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(p.result.images, plain.images, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(p.values), plain.values, rtol=1e-4, atol=1e-6)


def test_diversity_and_neuron_objective_pass_through():
    net = seeded()
    p = fm.portrait(net, "features.4", [1, 5], size=24, steps=8, seed=0, diversity=2, objective="neuron")
    assert len(p.images) == 4 and p.result.image_channels == (1, 1, 5, 5)
    assert p.objective == "neuron" and p.diversity == 2 and p.image(5, 1) is p.images[3]
    assert p.grid.size[0] == 2 * (24 + 4) + 4  # one row per channel
    with pytest.raises(PortraitError, match=r"index must be 0\.\.1"):
        p.image(5, 2)


def test_top_channels_are_those_the_image_excites_most():
    net = seeded()
    p = fm.portrait(net, "features.4", "top3", image="sample:chelsea", size=16, steps=2, seed=0)
    # oracle: a plain hook on the model fed the picture as featuremaps prepares it
    x, _ = fm.prepare_input(net, "sample:chelsea")
    grabbed = {}
    handle = net.features[4].register_forward_hook(lambda m, i, o: grabbed.setdefault("out", o.clone()))
    try:
        with torch.no_grad():
            net(x)
    finally:
        handle.remove()
    means = grabbed["out"][0].mean(dim=(1, 2))
    assert list(p.channels) == torch.argsort(means, descending=True)[:3].tolist()
    assert p.selected_by["image"] == "sample:chelsea" and p.selected_by["k"] == 3
    ranked = [p.selected_by["channel_means"][str(c)] for c in p.channels]
    torch.testing.assert_close(torch.tensor(ranked), means[list(p.channels)], rtol=1e-5, atol=1e-6)


def test_every_channel_by_default_and_specs():
    p = fm.portrait(Colours().eval(), "colour", size=16, steps=1)
    assert p.channels == (0, 1, 2)
    assert fm.portrait(Colours().eval(), "colour", "2,0", size=16, steps=1).channels == (2, 0)
    assert fm.portrait(Colours().eval(), "colour", range(1, 3), size=16, steps=1).channels == (1, 2)


# ---------------------------------------------------------------- the model is left as it came


def _state(net: nn.Module) -> dict:
    return {
        "training": [m.training for m in net.modules()],
        "requires_grad": [p.requires_grad for p in net.parameters()],
        "grads": [p.grad for p in net.parameters()],
        "hooks": [(dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks)) for m in net.modules()],
        "inplace": [getattr(m, "inplace", None) for m in net.modules()],
        "tensors": {k: v.clone() for k, v in net.state_dict().items()},
    }


def test_model_is_left_exactly_as_it_came_also_after_an_error():
    from torch.nn.modules import module as torch_module

    net = Seeded()  # in training mode, as a user's model may be
    net.features[0].weight.requires_grad_(False)  # a frozen layer
    net.features[3].eval()  # one flag unlike the others
    user_calls = counting(net.features[3])  # someone else's hook stays, and still runs
    before = _state(net)
    p = fm.portrait(net, "features.2", [0, 5], size=16, steps=3, seed=0)
    after = _state(net)
    for key in ("training", "requires_grad", "grads", "hooks", "inplace"):
        assert after[key] == before[key], key
    assert all(torch.equal(before["tensors"][k], v) for k, v in after["tensors"].items())  # BN statistics too
    assert not torch_module._global_forward_hooks and not torch_module._global_forward_pre_hooks
    assert user_calls  # the model ran as it runs: the user's hook saw the passes that reached it
    # the portraits were made in eval mode (running statistics), whatever the model's own flags
    grabbed = {}
    handle = net.features[2].register_forward_hook(lambda m, i, o: grabbed.setdefault("out", o.clone()))
    try:
        net.eval()
        with torch.no_grad():
            net(imagenet(p.result.images))
    finally:
        handle.remove()
        net.train()
        net.features[3].eval()
    torch.testing.assert_close(
        torch.tensor(p.values), grabbed["out"][[0, 1], [0, 5]].mean(dim=(1, 2)), rtol=1e-4, atol=1e-6
    )

    def interrupt(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fm.portrait(net, "features.2", [0], size=16, steps=5, progress=interrupt)
    again = _state(net)
    for key in ("training", "requires_grad", "grads", "hooks", "inplace"):
        assert again[key] == before[key], key
    assert all(torch.equal(before["tensors"][k], v) for k, v in again["tensors"].items())
    assert not torch_module._global_forward_hooks


class Tripwire(nn.Module):
    """The identity, until its ``fire_at``-th call (from 1) while armed: that call raises KeyboardInterrupt,
    from inside the model's forward pass, while featuremaps' hook is registered and the model is in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.calls, self.fire_at, self.training_seen = 0, None, []

    def forward(self, x):
        self.calls += 1
        self.training_seen.append(self.training)
        if self.fire_at is not None and self.calls == self.fire_at:
            raise KeyboardInterrupt
        return x


def test_an_interrupt_inside_a_pass_leaves_the_model_as_it_came():
    """Ctrl-C in the middle of an optimization step's forward pass (not between steps): the hook is removed,
    every flag restored, and the model then runs and portrays exactly as a fresh copy of it does."""
    from torch.nn.modules import module as torch_module

    net = Seeded()  # training mode, one submodule in eval mode, a frozen parameter, a user's hook
    net.features.insert(1, Tripwire())  # features: conv, tripwire, BN, ReLU, conv, ReLU; the layer is features.5
    net.features[2].eval()
    net.features[0].bias.requires_grad_(False)
    user_calls = counting(net.features[4])
    before = _state(net)
    net.features[1].fire_at = 4  # the two batch-1 probes, the first step, then the second step's pass
    with pytest.raises(KeyboardInterrupt):
        fm.portrait(net, "features.5", [1, 6], size=16, steps=5, seed=2)
    assert net.features[1].calls == 4 and not any(net.features[1].training_seen)  # it ran in eval mode
    assert len(user_calls) == 3  # the interrupted pass stopped before the user's module
    after = _state(net)
    for key in ("training", "requires_grad", "grads", "hooks", "inplace"):
        assert after[key] == before[key], key
    assert all(torch.equal(before["tensors"][k], v) for k, v in after["tensors"].items())
    assert not torch_module._global_forward_hooks and not torch_module._global_forward_pre_hooks
    # the model is usable at once (no lock held, nothing left half-done) and portrays as a fresh copy does
    net.features[1].fire_at = None
    again = fm.portrait(net, "features.5", [1, 6], size=16, steps=5, seed=2)
    fresh = Seeded().eval()
    fresh.features.insert(1, Tripwire())
    expected = fm.portrait(fresh, "features.5", [1, 6], size=16, steps=5, seed=2)
    torch.testing.assert_close(again.result.images, expected.result.images, rtol=0, atol=1e-6)
    assert [m.training for m in net.modules()] == before["training"]


def test_the_pass_stops_after_the_layer():
    """Nothing after the layer runs once the stop point is known: the learned stop is keyed by the input's
    shape (batch size included), so the first portrait runs the later modules exactly once per input shape
    it is the first to use -- the two batch-1 probes of ``check_portrait`` (at the 28 px the network sees
    through the transforms and at the plain 16 px of the final evaluation), the first optimization step
    (batch 2, 28 px) and the final evaluation (batch 2, 16 px) -- and never in the other 5 steps; a second
    portrait never runs them, in 6 steps or 60."""
    net = Planted().eval()
    after, head = [], counting(net.head)
    net.after.register_forward_hook(lambda _m, inputs, _o: after.append(tuple(inputs[0].shape)))
    first = fm.portrait(net, "relu", [0, 1], size=16, steps=6)
    assert after == [(1, 2, 28, 28), (1, 2, 16, 16), (2, 2, 28, 28), (2, 2, 16, 16)] and len(head) == 4
    del after[:], head[:]
    second = fm.portrait(net, "relu", [0, 1], size=16, steps=60)
    assert after == [] and head == []
    assert second.result.history.shape == (60, 2) and first.values != second.values
    # capture_forward is the core's network: one capture_for_grad pass, the layer's output in the graph
    x = torch.rand(2, 3, 28, 28, requires_grad=True)
    out = capture_forward(net, "relu")(x)
    (grad,) = torch.autograd.grad(out[:, 1].mean(), x)
    assert out.shape == (2, 2, 28, 28) and grad.abs().sum() > 0 and after == []


class CalledTwice(nn.Module):
    """``relu`` is called twice per pass (after ``first`` and after ``second``), like torchvision's BasicBlock."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.second = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.relu(self.second(self.relu(self.first(x))))


def test_a_module_called_twice_second_call_stops_there():
    """``relu#2``: the pass ends at the module's second call; the first call's output is not the portrait's."""
    net = CalledTwice().eval()
    p = fm.portrait(net, "relu#2", [0, 3], size=16, steps=4)
    plain = optimize(lambda x: net(x), [0, 3], normalize=imagenet, size=16, steps=4)
    assert p.layer == "relu#2"
    torch.testing.assert_close(p.result.images, plain.images, rtol=0, atol=1e-5)


def test_a_module_called_twice_first_call_stops_there():
    """A portrait of ``relu`` (its first call, as captures name it) should not run ``second``, once the model has
    been seen at the shape."""
    net = CalledTwice().eval()
    p = fm.portrait(net, "relu", [0, 3], size=16, steps=2)
    plain = optimize(lambda x: net.relu(net.first(x)), [0, 3], normalize=imagenet, size=16, steps=2)
    torch.testing.assert_close(p.result.images, plain.images, rtol=0, atol=1e-5)  # the first call's portrait
    seen = counting(net.second)
    fm.portrait(net, "relu", [0, 3], size=16, steps=2)
    assert seen == []


def test_device_and_grayscale_models():
    gray = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    p = fm.portrait(gray, "1", [0, 3], size=16, steps=4)
    assert p.normalization == ((pytest.approx(0.449),), (pytest.approx(0.226),))
    assert p.images[0].mode == "RGB" and p.device == "cpu" and p.budget == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(PortraitError, match=r"the model is on cpu, not cuda: load it there"):
            fm.portrait(gray, "1", [0], device="cuda", size=16, steps=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():  # pragma: no cover - no GPU on this machine
    net = seeded()
    cpu = fm.portrait(net, "features.4", [2, 9], size=32, steps=16)
    gpu = fm.portrait(seeded().cuda(), "features.4", [2, 9], size=32, steps=16, device="cuda")
    assert gpu.device.startswith("cuda") and gpu.budget == "full"
    torch.testing.assert_close(gpu.result.images, cpu.result.images, rtol=0, atol=2e-3)


# ---------------------------------------------------------------- the folder


def test_folder_is_complete_and_reproducible(tmp_path):
    net = seeded()
    p = fm.portrait(net, "features.4", [2, 9], size=16, steps=4, seed=1)
    folder = p.save(tmp_path / "p")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["kind"] == "portraits"
    assert manifest["model"] == "Seeded" and manifest["weights"] == "as given" and manifest["layer"] == "features.4"
    assert manifest["channels"] == [2, 9] and manifest["steps"] == 4 and manifest["seed"] == 1
    assert manifest["size"] == 16 and manifest["input_size"] == [28, 28] and manifest["objective"] == "channel"
    assert manifest["values"] == list(p.values) and len(manifest["objective_by_step"]) == 4
    assert sorted(manifest["files"]) == ["channels/0002.png", "channels/0009.png", "grid.png", "index.html"]
    for entry, image in zip(manifest["portraits"], p.images):
        assert np.array_equal(np.asarray(Image.open(folder / entry["file"])), np.asarray(image))
    assert np.array_equal(np.asarray(Image.open(folder / "grid.png")), np.asarray(p.grid))
    html = (folder / "index.html").read_text()
    assert "RANDOM weights" not in html  # weights "as given" may be trained: no warning
    assert "features.4: 2 channels" in html and "data:image/png;base64," in html
    # the same seed writes the same bytes; another seed, other pictures
    q = fm.portrait(net, "features.4", [2, 9], size=16, steps=4, seed=1).save(tmp_path / "q")
    for name in ("grid.png", "channels/0002.png", "channels/0009.png"):
        assert (folder / name).read_bytes() == (q / name).read_bytes(), name
    assert json.loads((q / "manifest.json").read_text())["values"] == manifest["values"]
    r = fm.portrait(net, "features.4", [2, 9], size=16, steps=4, seed=2).save(tmp_path / "r")
    assert (r / "channels/0002.png").read_bytes() != (folder / "channels/0002.png").read_bytes()
    # read back
    read, images = load_portraits(folder)
    assert read["channels"] == [2, 9] and np.array_equal(np.asarray(images[(9, 0)]), np.asarray(p.image(9)))
    # replaced only when asked, and only a folder featuremaps wrote
    with pytest.raises(RunError, match="already exists; choose another output folder"):
        p.save(folder)
    p.save(folder, overwrite=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(RunError, match="was not written by featuremaps"):
        p.save(tmp_path / "mine", overwrite=True)
    with pytest.raises(RunError, match="is a run folder, not a portraits folder"):
        load_portraits(_run_folder(tmp_path))


def _run_folder(tmp_path):
    from featuremaps.folders import write_manifest

    folder = tmp_path / "a-run"
    folder.mkdir()
    write_manifest(folder, {"layers": []}, kind="run")
    return folder


# ---------------------------------------------------------------- the cache (viewer and atlas)


def test_cache_makes_once_and_reads_back(tmp_path, monkeypatch):
    made = importlib.import_module("featuremaps.portrait.portraits")  # (fm.portrait is the function)

    net = seeded()
    options = {"size": 16, "steps": 3, "seed": 0}
    batches: list[tuple[int, ...]] = []
    real = made.optimize
    monkeypatch.setattr(made, "optimize", lambda f, chans, **kw: batches.append(tuple(chans)) or real(f, chans, **kw))
    assert portrait_image(net, "features.4", 5, cache_dir=tmp_path, compute=False, **options) is None
    image = portrait_image(net, "features.4", 5, cache_dir=tmp_path, **options)
    direct = fm.portrait(net, "features.4", [5], **options)
    assert np.array_equal(np.asarray(image), np.asarray(direct.images[0]))
    record = json.loads(image.info[INFO_KEY])
    assert record["channel"] == 5 and record["layer"] == "features.4" and record["steps"] == 3
    assert record["value"] == pytest.approx(direct.values[0])
    assert cache_path(net, "features.4", 5, cache_dir=tmp_path, **options).is_file()
    # read back without running the model; a batch makes only what is missing, in one call
    del batches[:]
    calls = counting(net.features[0])
    again = portrait_image(net, "features.4", 5, cache_dir=tmp_path, **options)
    assert np.array_equal(np.asarray(again), np.asarray(image)) and calls == [] and batches == []
    several = portrait_images(net, "features.4", [7, 5, 1], cache_dir=tmp_path, **options)
    assert list(several) == [7, 5, 1] and batches == [(7, 1)]
    alone = fm.portrait(net, "features.4", [1], **options)
    assert np.array_equal(np.asarray(several[1]), np.asarray(alone.images[0]))  # batching changes nothing
    assert list(portrait_images(net, "features.4", [2, 7], cache_dir=tmp_path, compute=False, **options)) == [7]
    # other options or other weights: another entry
    assert cache_path(net, "features.4", 5, cache_dir=tmp_path, size=16, steps=4) != cache_path(
        net, "features.4", 5, cache_dir=tmp_path, **options
    )
    key = model_fingerprint(net)
    assert model_fingerprint(seeded()) == key  # the same weights in another object: the same portraits
    with torch.no_grad():
        net.features[3].weight.mul_(1.5)
    assert model_fingerprint(net) != key
    assert portrait_image(net, "features.4", 5, cache_dir=tmp_path, compute=False, **options) is None
    # a damaged file is made again
    path = cache_path(seeded(), "features.4", 5, cache_dir=tmp_path, **options)
    path.write_bytes(b"not a png")
    assert portrait_image(seeded(), "features.4", 5, cache_dir=tmp_path, **options).size == (16, 16)


# ---------------------------------------------------------------- mistakes


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("features.*",), {}, PortraitError, r"a portrait is of one layer, and 'features\.\*' selects 5"),
        (("feature.4",), {}, LayerError, r"no layer named 'feature\.4'; did you mean features\.4"),
        (("classifier",), {}, PortraitError, r"classifier returns shape 1x3, not channel maps \(N, C, H, W\)"),
        (
            ("features.4", [16]),
            {},
            PortraitError,
            r"channel 16 is out of range: features\.4 has 16 channels \(0\.\.15\)",
        ),
        (("features.4", "top4"), {}, PortraitError, r"ranks the channels on an image: give one"),
        (("features.4", [1]), {"image": "sample:chelsea"}, PortraitError, r"an image only chooses the channels"),
        (("features.4", "top17"), {"image": "sample:chelsea"}, PortraitError, r"top17 asks for more channels"),
        (("features.4", "0-x"), {}, OptionError, r"cannot read channels '0-x'"),
        (("features.4", [1, 1]), {}, PortraitError, r"repeat a channel"),
        (("features.4", [0]), {"budget": "gpu"}, PortraitError, r"unknown budget 'gpu'; use auto, cpu"),
        (("features.4", [0]), {"objective": "pixel"}, PortraitError, r"objective must be 'channel'"),
        (("features.4", [0]), {"batch_size": 0}, PortraitError, r"batch_size must be an integer >= 1"),
        (("features.4", [0]), {"size": 4}, PortraitError, r"size must be an integer >= 8"),
        (("features.4", [0]), {"device": "gpu"}, PortraitError, r"device 'gpu' is not a torch device"),
    ],
)
def test_mistakes_are_one_line_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        fm.portrait(seeded(), *args, **{"size": 16, "steps": 1, **kwargs})
    assert isinstance(info.value, fm.FeatureMapsError) and "\n" not in str(info.value)


def test_a_model_that_cannot_run_at_the_size_says_so():
    fixed = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 2)).eval()  # 32 px only
    with pytest.raises(
        PortraitError, match=r"the model cannot run on a 28x28 input \(.*\); choose another portrait size"
    ):
        fm.portrait(fixed, "0", [0], size=16, steps=1)
    model = fm.load_model(nn.Sequential(nn.Conv2d(3, 2, 3)))
    small = dataclasses.replace(model, preprocessing=dataclasses.replace(model.preprocessing, min_size=(64, 64)))
    with pytest.raises(PortraitError, match=r"a 16 px portrait is under this model's minimum input of 64x64 \(the "
                       r"network sees it at 16x16 and 28x28\); use size 64 or more \(--size 64\)"):  # fmt: skip
        fm.portrait(small, "0", [0], size=16, steps=1)
    fm.portrait(dataclasses.replace(small, preprocessing=dataclasses.replace(model.preprocessing, min_size=(16, 16))),
                "0", [0], size=16, steps=1)  # fmt: skip
