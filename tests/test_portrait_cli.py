"""``featuremaps portrait`` through typer's test runner: the folder it writes, topK on an image, and every
mistake as one line on stderr before the model loads."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from featuremaps.cli import app

runner = CliRunner()

NET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 5, padding=2)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.relu(self.conv(x)).mean(dim=(2, 3)))
"""


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def net_file(tmp_path, monkeypatch):
    (tmp_path / "nets.py").write_text(NET)
    monkeypatch.chdir(tmp_path)
    return "nets.py:Net"


def run(*args: str):
    return runner.invoke(app, ["portrait", *args], catch_exceptions=False)


def one_line_error(result, pattern: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.output


def test_writes_a_complete_reproducible_folder(net_file, tmp_path):
    common = ("--model", net_file, "--weights", "random", "--layer", "relu", "--channels", "0-2", "--size", "16")
    r = run(*common, "--steps", "4", "--seed", "3", "--device", "cpu", "--out", "p")
    assert r.exit_code == 0, r.output
    assert "wrote p/" in r.stdout and "relu, objective per channel: 0: " in r.stdout
    assert "RANDOM weights (random(seed=3))" in r.stderr
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["kind"] == "portraits" and manifest["schema_version"] == 1
    assert manifest["model"] == net_file and manifest["weights"] == "random(seed=3)" and manifest["layer"] == "relu"
    assert manifest["channels"] == [0, 1, 2] and manifest["steps"] == 4 and manifest["seed"] == 3
    assert manifest["size"] == 16 and manifest["budget"] == "cpu" and manifest["device"] == "cpu"
    assert len(manifest["values"]) == 3 and manifest["selected_by"] is None
    assert sorted(manifest["files"]) == [
        "channels/0000.png",
        "channels/0001.png",
        "channels/0002.png",
        "grid.png",
        "index.html",
    ]
    assert Image.open(tmp_path / "p" / "channels" / "0001.png").size == (16, 16)
    # the same command writes the same pictures; --force replaces the folder it wrote
    r = run(*common, "--steps", "4", "--seed", "3", "--out", "p2", "-q")
    assert r.exit_code == 0 and r.stdout == "", r.output
    for name in ("grid.png", "channels/0000.png", "channels/0002.png"):
        assert (tmp_path / "p" / name).read_bytes() == (tmp_path / "p2" / name).read_bytes(), name
    one_line_error(run(*common, "--steps", "2", "--out", "p"), r"p already exists; .* use --force")
    r = run(*common, "--steps", "2", "--out", "p", "--force", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["steps"] == 2


def test_top_channels_of_an_image(net_file, tmp_path):
    r = run("--model", net_file, "--weights", "random", "--layer", "relu", "--channels", "top2", "--image", "chelsea",
            "--size", "16", "--steps", "2", "--out", "top", "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "top" / "manifest.json").read_text())
    chosen = manifest["selected_by"]
    assert chosen["image"] == "sample:chelsea" and chosen["k"] == 2 and len(manifest["channels"]) == 2
    means = [chosen["channel_means"][str(c)] for c in manifest["channels"]]
    assert means == sorted(means, reverse=True)


def test_vgg16_layer_with_the_cpu_budget_defaults(tmp_path):
    """The real VGG16 (random weights): the budget sets size and steps; here both are made small to keep the
    test short. VGG16 takes 32 px and more (its weights' minimum), the portrait and the transformed input alike."""
    r = run("--model", "vgg16", "--weights", "random", "--layer", "features.3", "--channels", "5,1", "--size", "32",
            "--steps", "2", "--budget", "cpu", "--out", str(tmp_path / "v"), "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "v" / "manifest.json").read_text())
    assert manifest["model"] == "vgg16" and manifest["channels"] == [5, 1] and manifest["input_size"] == [44, 44]
    grid = np.asarray(Image.open(tmp_path / "v" / "grid.png"))
    assert grid.shape[1] == 2 * (32 + 4) + 4 and manifest["budget"] == "cpu"


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--channels", "0-x"], r"cannot read channels '0-x'; use all, top16, 0-63 or 3,7,9"),
        (["--channels", "600"], r"channel 600 is out of range: features\.28 has 512 channels \(0\.\.511\)"),
        (["--channels", "top600", "--image", "chelsea"], r"top600 asks for more channels than features\.28 has"),
        (["--channels", "top4"], r"--channels top4 ranks the channels on an image: add --image"),
        (["--image", "chelsea"], r"--image only chooses the channels, with --channels top16"),
        (["--image", "missing.png", "--channels", "top4"], r"missing\.png"),
        (["--layer", "features.99"], r"no layer named 'features\.99'; did you mean"),
        (["--layer", "conv"], r"a portrait is of one layer, and 'conv' selects 13"),
        (["--layer", "classifier.0"], r"classifier\.0 returns shape 1x4096, not channel maps"),
        (["--budget", "gpu"], r"unknown budget 'gpu'; use auto, cpu \(64 px, 64 steps\) or full"),
        (["--objective", "pixel"], r"objective must be 'channel'"),
        (["--size", "4"], r"--size must be at least 8, got 4"),
        (["--size", "16"], r"a 16 px portrait is under this model's minimum input of 32x32 .*; use size 32 or more"),
        (["--model", "vgg61"], r"vgg61"),
    ],
)
def test_mistakes_are_one_line_errors_before_the_model_loads(tmp_path, monkeypatch, args, pattern):
    monkeypatch.chdir(tmp_path)

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before a mistake that needs no model was found")

    monkeypatch.setattr("featuremaps.models.load_model", no_model)
    # an option given twice takes its last value: the case's options win over these
    one_line_error(
        run("--model", "vgg16", "--layer", "features.28", *args, "--weights", "random", "--out", "out"), pattern
    )
    assert not (tmp_path / "out").exists()


def test_a_folder_featuremaps_did_not_write_is_never_replaced(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    r = run("--layer", "features.28", "--weights", "random", "--out", "mine", "--force")
    one_line_error(r, r"mine was not written by featuremaps")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_one_line(tmp_path):
    r = run("--layer", "features.28", "--weights", "random", "--device", "cuda", "--out", str(tmp_path / "o"))
    one_line_error(r, r"CUDA is not available on this machine; use --device cpu")


def test_help_and_option_mistakes_do_not_import_torch(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom featuremaps.cli import app\n"
        "r = CliRunner().invoke(app, ['portrait', '--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "for flag in ('--model', '--weights', '--layer', '--channels', '--image', '--size', '--steps', '--seed',"
        " '--budget', '--objective', '--diversity', '--device', '--out', '--force', '--quiet'):\n"
        "    assert flag in r.output, flag\n"
        "for args in (['--channels', 'x'], ['--budget', 'gpu'], ['--objective', 'pixel'], ['--channels', 'top3']):\n"
        "    r = CliRunner().invoke(app, ['portrait', '--layer', 'features.28', *args])\n"
        "    assert r.exit_code == 1, (args, r.output)\n"
        "print('torch' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
