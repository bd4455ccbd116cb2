"""featuremaps on a CUDA device: every test is skipped where torch sees no GPU.

Each one compares what the GPU gives with the same seeded model on the CPU (the oracle), and checks
that maps stay on the device until asked for.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import featuremaps as fm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# cuDNN and TF32 may pick other algorithms than the CPU: compare with a tolerance, never bit for bit
TOL = {"rtol": 1e-3, "atol": 1e-3}


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def pair(name: str):
    return fm.load_model(name, weights="random", device="cpu"), fm.load_model(name, weights="random", device="cuda")


def assert_same_maps(gpu: fm.FeatureMaps, cpu: fm.FeatureMaps) -> None:
    assert gpu.names == cpu.names
    for name in cpu:
        assert gpu[name].tensor.device.type == "cuda", name
        torch.testing.assert_close(gpu[name].tensor.cpu(), cpu[name].tensor, **TOL, msg=name)


@pytest.mark.parametrize("arch", ["vgg11", "alexnet", "resnet18", "mobilenet_v3_small"])
def test_network_capture_matches_cpu_and_stays_on_the_device(arch):
    cpu, gpu = pair(arch)
    torch.manual_seed(1)
    x = torch.randn(1, 3, 64, 64)
    for _ in range(2):  # the second capture uses what the first learned (where to stop, what to copy)
        assert_same_maps(fm.capture(gpu, x, layers="all"), fm.capture(cpu, x, layers="all"))


def test_inplace_relu_cannot_overwrite_a_captured_conv_output_on_the_gpu():
    _, gpu = pair("vgg11")
    x = torch.randn(1, 3, 64, 64, device="cuda")
    with torch.no_grad():
        want = gpu.module(x)
    maps = fm.capture(gpu, x, layers="conv", stop_early=False)
    assert all(maps[n].tensor.min() < 0 for n in maps), "a conv output lost its negative values"
    with torch.no_grad():
        torch.testing.assert_close(maps["features.0"].tensor, gpu.module.features[0](x), rtol=0, atol=0)
        torch.testing.assert_close(gpu.module(x), want, rtol=0, atol=0)  # the model computes what it did
    assert all(m.inplace for m in gpu.module.modules() if isinstance(m, nn.ReLU))


@pytest.mark.parametrize("mode", ["conv", "conv-relu", "conv-pool"])
def test_the_seed_chains_match_cpu(mode):
    cpu, gpu = pair("vgg11_bn")
    x = torch.randn(1, 3, 64, 64)
    assert_same_maps(fm.capture(gpu, x, mode=mode), fm.capture(cpu, x, mode=mode))


@pytest.mark.parametrize("reduce", ["mean", "max", "l2", "std", "topk:3"])
def test_reductions_run_on_the_device_and_match_cpu(reduce):
    cpu, gpu = pair("alexnet")
    x = torch.randn(1, 3, 96, 96)
    a, b = fm.capture(cpu, x, layers="conv", reduce=reduce), fm.capture(gpu, x, layers="conv", reduce=reduce)
    assert_same_maps(b, a)
    for name in a:
        assert b[name].shape == a[name].shape and b[name].channel_ids() == a[name].channel_ids()
        sa, sb = a[name].stats, b[name].stats
        for field in ("min", "max", "mean", "std"):
            assert getattr(sb, field) == pytest.approx(getattr(sa, field), rel=1e-3, abs=1e-4), (name, field)


def test_reduced_capture_does_not_hold_full_maps_in_gpu_memory():
    _, gpu = pair("vgg11")
    x = torch.randn(1, 3, 512, 512, device="cuda")
    fm.capture(gpu, x, layers="all", reduce="mean")  # warm-up: cuDNN's choices and what featuremaps learns

    def peak(fn) -> int:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        rise = torch.cuda.max_memory_allocated() - base
        del result
        return rise

    with torch.inference_mode():
        bare = peak(lambda: gpu.module(x))
    reduced = peak(lambda: fm.capture(gpu, x, layers="all", reduce="mean"))
    full = peak(lambda: fm.capture(gpu, x, layers="all"))
    assert reduced <= 1.15 * bare, (reduced, bare)
    assert full > 2 * reduced, (full, reduced)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_layer_numbers_on_the_gpu_are_exact_and_need_no_large_temporaries(layout):
    from featuremaps.maps import compute_stats

    torch.manual_seed(0)
    x = torch.randn(2, 64, 256, 256).relu()  # about half zeros, like a ReLU output
    x[1, 5:9] = 0  # four dead channels in the second sample (not dead in the first)
    x[:, 3] = -1.0  # one channel never positive: dead
    g = x.cuda()
    if layout == "channels_last":
        g = g.contiguous(memory_format=torch.channels_last)
    want = compute_stats(x, "a", "act")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = compute_stats(g, "a", "act")
    rise = torch.cuda.max_memory_allocated() - base
    assert got.zero_fraction == want.zero_fraction  # counted exactly, in slices
    assert got.dead_fraction == want.dead_fraction == 1 / 64
    for field in ("min", "max", "mean", "std"):
        assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-4), field
    # contiguous: a few MB of slices; channels-last: torch's CUDA reductions over the batch and space
    # axes stage partial results in a buffer of their own (16 MB here, 34 MB at most on an H200)
    limit = 10 * 2**20 if layout == "contiguous" else g.numel() * 4
    assert rise <= limit, f"{rise / 2**20:.0f} MB of temporaries for a {g.numel() * 4 / 2**20:.0f} MB map"


def test_pictures_numbers_and_saved_runs_come_back_to_the_cpu(tmp_path):
    cpu, gpu = pair("alexnet")
    x = torch.randn(1, 3, 64, 64)
    a, b = fm.capture(cpu, x), fm.capture(gpu, x)
    name = a.names[0]
    assert isinstance(b[name].numpy(), np.ndarray)
    np.testing.assert_allclose(b[name].maps(), a[name].maps(), **TOL)
    np.testing.assert_allclose(b[name].reduced("max"), a[name].reduced("max"), **TOL)
    assert b.cpu()[name].tensor.device.type == "cpu" and b[name].tensor.device.type == "cuda"
    assert b.picture().size == a.picture().size
    for row_a, row_b in zip(a.stats(), b.stats()):
        assert row_b.dead_fraction == pytest.approx(row_a.dead_fraction, abs=0.02) and row_b.mean == pytest.approx(
            row_a.mean, rel=1e-3, abs=1e-5
        )
    from featuremaps.runs import load_run, save_run

    back = load_run(save_run(b, tmp_path / "run"))
    torch.testing.assert_close(back[name].tensor, a[name].tensor, **TOL)


def test_cuda_and_auto_devices():
    assert fm.load_model("alexnet", weights="random", device="auto").device.type == "cuda"
    assert fm.load_model("alexnet", weights="random", device="cuda:0").device == torch.device("cuda", 0)
    layers = fm.list_layers(fm.load_model("alexnet", weights="random", device="cuda"), size=64)
    assert layers[0].output_shape == (1, 64, 15, 15)


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_cli_show_on_the_gpu(tmp_path, device):
    from typer.testing import CliRunner

    from featuremaps.cli import app

    out = tmp_path / "run"
    args = [
        "show",
        "edge",
        "--model",
        "alexnet",
        "--weights",
        "random",
        "--size",
        "64",
        "--device",
        device,
        "--out",
        str(out),
    ]
    r = CliRunner().invoke(app, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [layer["name"] for layer in manifest["layers"]] == [
        "features.0",
        "features.3",
        "features.6",
        "features.8",
        "features.10",
    ]
    cpu = fm.capture(fm.load_model("alexnet", weights="random", size=64), "sample:edge")
    saved = np.load(out / "maps" / f"000_{manifest['layers'][0]['name']}.npy")
    np.testing.assert_allclose(saved, cpu["features.0"].numpy(), **TOL)


def test_compare_models_on_the_gpu():
    from featuremaps.comparison import run_comparison

    gpu = run_comparison("sample:edge", models=["vgg11", "alexnet"], weights="random", size=64, device="cuda")
    cpu = run_comparison("sample:edge", models=["vgg11", "alexnet"], weights="random", size=64, device="cpu")
    assert list(gpu) == list(cpu) == ["vgg11", "alexnet"]
    for label in cpu:
        assert_same_maps(gpu[label], cpu[label])
