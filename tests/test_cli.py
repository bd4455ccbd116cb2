"""The command line through typer's test runner: exit codes, files written, manifests, errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import featuremaps
from featuremaps.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def one_line_error(result, pattern: str) -> None:
    import re

    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.output


def test_version_and_help():
    r = run("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"featuremaps {featuremaps.__version__}"
    r = run("show", "--help")
    assert r.exit_code == 0
    for option in (
        "--model",
        "--weights",
        "--mode",
        "--layers",
        "--reduce",
        "--channels",
        "--norm",
        "--cmap",
        "--size",
        "--device",
        "--out",
        "--force",
        "--quiet",
    ):
        assert option in r.stdout, option


@pytest.mark.parametrize("command", ["show", "compare", "cam"])
def test_the_image_argument_names_the_library_s_samples(command):
    from featuremaps.cli.common import SAMPLE_NAMES
    from featuremaps.images import list_samples

    assert list(SAMPLE_NAMES) == list_samples()  # the help's copy cannot go stale
    r = run(command, "--help")
    assert r.exit_code == 0 and "bundled sample: edge, astronaut, chelsea, coffee, rocket." in " ".join(
        r.stdout.split()
    )


def test_layers_table():
    r = run("layers", "alexnet", "--size", "64")
    assert r.exit_code == 0, r.output
    assert "alexnet: 21 capture points for a 64x64 input" in r.stdout
    assert "features.0" in r.stdout and "1x64x15x15" in r.stdout and "23,296" in r.stdout  # 64*3*11*11 + 64


def test_show_writes_a_complete_folder(tmp_path):
    out = tmp_path / "run"
    r = run("show", "chelsea", "--model", "alexnet", "--weights", "random", "--size", "64", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert f"wrote {out}/" in r.stdout and "features.10" in r.stdout  # the stats table
    assert "RANDOM weights" in r.stderr
    for name in (
        "manifest.json",
        "index.html",
        "overview.png",
        "overlay.png",
        "side_by_side.png",
        "filters.png",
        "input.png",
    ):
        assert (out / name).is_file(), name
    grids = sorted(p.name for p in (out / "grids").iterdir())
    assert grids == [
        "000_features.0.png",
        "001_features.3.png",
        "002_features.6.png",
        "003_features.8.png",
        "004_features.10.png",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == 1
    assert (manifest["model"], manifest["weights"], manifest["mode"], manifest["pretrained"]) == (
        "alexnet",
        "random(seed=0)",
        "network",
        False,
    )
    assert [layer["name"] for layer in manifest["layers"]] == [
        "features.0",
        "features.3",
        "features.6",
        "features.8",
        "features.10",
    ]
    assert manifest["layers"][0]["shape"] == [1, 64, 15, 15]
    assert set(manifest["layers"][0]["stats"]) >= {"min", "max", "mean", "std", "zero_fraction", "dead_fraction"}
    assert manifest["render"]["norm"] == "map" and manifest["source"] == "sample:chelsea"
    html = (out / "index.html").read_text()
    assert (
        "RANDOM WEIGHTS" in html
        and "data:image/png;base64," in html
        and "http" not in html.split("<body>")[1].split("featuremaps-stats")[0]
    )
    assert not (out / "maps").exists()  # raw maps are opt-in (--save-maps shown|all)
    r = run("show", "chelsea", "--model", "alexnet", "--weights", "random", "--size", "64", "--out", str(out),
            "--force", "--save-maps", "shown", "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert featuremaps.runs.load_run(out).names == [layer["name"] for layer in manifest["layers"]]


def test_show_chain_mode_and_options(tmp_path):
    out = tmp_path / "pool"
    r = run(
        "show",
        "edge",
        "--model",
        "vgg11",
        "--weights",
        "random",
        "--size",
        "32",
        "--mode",
        "conv-pool",
        "--channels",
        "top4",
        "--norm",
        "global",
        "--cmap",
        "magma",
        "--out",
        str(out),
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    assert r.stdout == "" and r.stderr == ""
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mode"] == "conv-pool" and len(manifest["layers"]) == 13  # 8 convs + 5 pools
    assert [layer["shape"][-1] for layer in manifest["layers"] if layer["kind"] == "pool"] == [16, 8, 4, 2, 1]


def test_existing_folder_needs_force(tmp_path):
    out = tmp_path / "run"
    args = ("show", "edge", "--model", "alexnet", "--weights", "random", "--size", "64", "--out", str(out), "-q")
    assert run(*args).exit_code == 0
    first = json.loads((out / "manifest.json").read_text())["created"]
    one_line_error(run(*args), r"already exists; choose another output folder \(--out\) or use --force")
    r = run(*args, "--force")
    assert r.exit_code == 0 and json.loads((out / "manifest.json").read_text())["created"] >= first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize(
    "command",
    [
        ("show", "edge", "--model", "alexnet", "--weights", "random", "--size", "64"),
        ("compare", "edge", "--models", "alexnet,alexnet", "--weights", "random", "--size", "64"),
        ("compare", "edge", "--modes", "conv,conv-relu", "--model", "alexnet", "--weights", "random", "--size", "64"),
        ("demo", "--weights", "random", "--size", "32"),
    ],
)
def test_force_never_replaces_a_folder_featuremaps_did_not_write(tmp_path, command, monkeypatch):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("thesis")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the output folder was checked")

    monkeypatch.setattr("torchvision.models.get_model", no_model)  # refused before any model is built
    r = run(*command, "--out", str(precious), "--force")
    one_line_error(
        r,
        r"precious was not written by featuremaps \(no featuremaps manifest.json in it\), so --force will not replace it",
    )
    assert (precious / "thesis.txt").read_text() == "thesis"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def _launch(args, cwd):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "featuremaps.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_for_part(tmp_path, proc, timeout=120.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        parts = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
        if parts:
            return parts[0]
        time.sleep(0.005)
    raise AssertionError(f"no temporary folder appeared (exit {proc.poll()}): {proc.stderr.read().decode()[-500:]}")


@pytest.mark.slow
def test_sigterm_while_writing_leaves_nothing_and_sigkill_leftovers_are_cleared(tmp_path):
    import signal

    args = [
        "show",
        "edge",
        "--model",
        "vgg11",
        "--weights",
        "random",
        "--mode",
        "conv-relu",
        "--size",
        "96",
        "--save-maps",
        "all",
        "--out",
        "out",
        "-q",
    ]
    proc = _launch(args, tmp_path)
    _wait_for_part(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr.decode()
    assert stderr.decode().strip().splitlines()[-1] == "terminated; nothing was written"
    assert list(tmp_path.iterdir()) == []
    # kill -9 cannot be caught: it leaves a marked temporary folder, which the next run there clears
    proc = _launch(args, tmp_path)
    part = _wait_for_part(tmp_path, proc)
    proc.kill()
    proc.wait(timeout=60)
    assert part.exists()
    proc = _launch(args[:-3] + ["--size", "32", "--out", "out", "-q"], tmp_path)
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["--model", "vgg61"], r"unknown model 'vgg61'; did you mean vgg19, vgg16"),
        (["--model", "resnet18", "--mode", "conv"], r"resnet18 has no plain sequential conv stack.*use mode 'network'"),
        (["--mode", "sideways"], r"unknown mode 'sideways'"),
        (["--norm", "loud"], r"norm"),
        (["--cmap", "no_such_map"], r"no_such_map"),
        (["--channels", "x-y"], r"cannot read channels 'x-y'; use all, top16, 0-63 or 3,7,9"),
        (["--layers", "features.99"], r"no layer named 'features.99'"),
        (["--weights", "nope.pth"], r"checkpoint 'nope.pth' not found"),
        (["--device", "cuda"], r"CUDA is not available|cuda"),
    ],
)
def test_user_mistakes_are_one_line_errors(tmp_path, args, pattern):
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "run"
    base = ["show", "edge", "--model", "alexnet", "--weights", "random", "--size", "64", "--out", str(out)]
    r = run(*base, *args)
    one_line_error(r, pattern)
    assert list(tmp_path.iterdir()) == [], "nothing may be left behind"


@pytest.mark.parametrize(
    "content,pattern",
    [
        (b"", r"empty"),
        (b"hello, I am text", r"not an image"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", r"truncated|corrupt|cannot"),
    ],
)
def test_bad_images(tmp_path, content, pattern):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    r = run("show", str(bad), "--model", "alexnet", "--weights", "random", "--out", str(tmp_path / "run"))
    one_line_error(r, r"bad\.png.*(" + pattern + ")")
    assert not (tmp_path / "run").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.png"]


def test_missing_image_and_usage_errors(tmp_path):
    one_line_error(run("show", str(tmp_path / "nope.jpg"), "--weights", "random"), r"nope.jpg.*not found")
    r = run("show", "edge", "--bogus-option")
    assert r.exit_code == 2


def test_offline_pretrained_is_a_clear_error(offline, tmp_path):
    r = run("show", "edge", "--model", "alexnet", "--out", str(tmp_path / "run"))
    one_line_error(r, r"alexnet/IMAGENET1K_V1 are not cached and cannot be downloaded.*--weights random")


def test_compare_models_and_modes(tmp_path):
    out = tmp_path / "cmp"
    r = run(
        "compare",
        "chelsea",
        "--models",
        "alexnet,vgg11",
        "--weights",
        "random",
        "--size",
        "64",
        "--out",
        str(out),
        "-q",
    )
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "comparison" and [e["label"] for e in manifest["runs"]] == ["alexnet", "vgg11"]
    assert (out / "compare.png").is_file() and (out / "alexnet" / "manifest.json").is_file()
    assert len(featuremaps.runs.load_run(out / "vgg11")) == 8
    out2 = tmp_path / "modes"
    r = run(
        "compare",
        "edge",
        "--modes",
        "conv,conv-relu,conv-pool",
        "--model",
        "vgg11",
        "--weights",
        "random",
        "--size",
        "32",
        "--out",
        str(out2),
        "-q",
    )
    assert r.exit_code == 0, r.output
    assert [e["mode"] for e in json.loads((out2 / "manifest.json").read_text())["runs"]] == [
        "conv",
        "conv-relu",
        "conv-pool",
    ]
    one_line_error(run("compare", "edge", "--out", str(tmp_path / "x")), "give either --models A,B or --modes")


def test_demo_offline_says_random_loudly(offline, tmp_path):
    out = tmp_path / "demo"
    r = run("demo", "--out", str(out), "--size", "64")
    assert r.exit_code == 0, r.output
    assert "RANDOM weights" in r.stderr and "not cached and cannot be downloaded" in r.stderr
    html = (out / "index.html").read_text()
    assert "<title>featuremaps demo: what VGG16 sees — RANDOM WEIGHTS" in html
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pretrained"] is False and manifest["kind"] == "demo"
    assert (
        len(manifest["runs"]["chain conv"]["layers"]) == 13 and len(manifest["runs"]["chain conv-pool"]["layers"]) == 18
    )
    for name in (
        "chains_compare.png",
        "edge_vs_layer13.png",
        "vgg16_vs_alexnet.png",
        "filters_vgg16_conv1.png",
        "network_edge_overview.png",
    ):
        assert (out / name).is_file(), name


def test_serve_is_a_thin_shell(monkeypatch):
    import featuremaps.web as web

    seen = {}
    monkeypatch.setattr(web, "serve", lambda **kw: seen.update(kw))
    r = run("serve", "--port", "8123", "--models", "alexnet,vgg16", "--weights", "random")
    assert r.exit_code == 0, r.output
    assert (
        seen["host"] == "127.0.0.1"
        and seen["port"] == 8123
        and seen["models"] == ["alexnet", "vgg16"]
        and seen["weights"] == ["random"]
    )
    one_line_error(run("serve", "--checkpoint", "broken"), "--checkpoint takes NAME=PATH")


@pytest.mark.parametrize(
    "make,args,pattern",
    [
        (None, ["missing.jpg"], r"image file missing.jpg not found"),
        ("dir", ["adir"], r"adir is a directory, not an image file"),
        ("text", ["notes.jpg"], r"notes.jpg is not an image that can be read"),
        (None, ["edge", "--mode", "conv-max"], r"unknown mode 'conv-max'"),
        (None, ["edge", "--reduce", "median"], r"unknown --reduce 'median'; use one of mean, max, l2, std"),
        (
            None,
            ["edge", "--channels", "999"],
            r"channel 999 is not in any selected layer \(they have 64 to 512 channels\)",
        ),
        (None, ["edge", "--cmap", "nonsense"], r"unknown colormap 'nonsense'"),
        (None, ["edge", "--save-maps", "most"], r"unknown --save-maps 'most'"),
    ],
)
def test_mistakes_are_caught_before_the_model_loads(tmp_path, monkeypatch, make, args, pattern):
    if make == "dir":
        (tmp_path / "adir").mkdir()
    elif make == "text":
        (tmp_path / "notes.jpg").write_text("my notes, not a picture")
    monkeypatch.chdir(tmp_path)

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before a mistake that needs no model was found")

    monkeypatch.setattr("featuremaps.models.load_model", no_model)
    before = sorted(p.name for p in tmp_path.iterdir())
    one_line_error(run("show", *args, "--model", "vgg16", "--weights", "random", "--out", "out"), pattern)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_help_version_and_option_mistakes_do_not_import_torch(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom featuremaps.cli import app\n"
        "for args in (['--help'], ['--version'], ['show', '--help'], ['show', 'edge', '--mode', 'conv-max'],"
        " ['show', 'edge', '--reduce', 'median'], ['show', 'edge', '--channels', 'x'], ['show', 'missing.png']):\n"
        "    r = CliRunner().invoke(app, args)\n"
        "    assert r.exit_code in (0, 1), (args, r.output)\n"
        "print('torch' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_serve_on_a_port_in_use_is_one_line(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run("serve", "--port", str(port))
    one_line_error(r, rf"cannot listen on 127.0.0.1:{port} \(Address already in use\); choose another --port")


def test_a_grayscale_user_model_works_from_the_command_line(tmp_path, monkeypatch):
    (tmp_path / "others.py").write_text(
        "from torch import nn\n"
        "class Gray(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(1, 3, 3, padding=1)\n"
        "    def forward(self, x):\n"
        "        return self.conv(x)\n"
    )
    monkeypatch.chdir(tmp_path)
    r = run("layers", "others.py:Gray", "--size", "32")
    assert r.exit_code == 0, r.output
    assert "1x3x32x32" in r.stdout
    r = run("show", "chelsea", "--model", "others.py:Gray", "--weights", "random", "--size", "32", "--out", "run", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["layers"][0]["shape"] == [1, 3, 32, 32]


def test_a_long_strip_is_resized_like_any_picture(tmp_path):
    from PIL import Image

    Image.new("RGB", (4000, 40), (90, 160, 30)).save(tmp_path / "strip.png")
    r = run(
        "show",
        str(tmp_path / "strip.png"),
        "--model",
        "vgg11",
        "--weights",
        "random",
        "--out",
        str(tmp_path / "run"),
        "-q",
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["input_size"] == [224, 224]


def test_a_whole_pickled_model_is_explained_in_one_line(tmp_path):
    import torch
    from torchvision.models import alexnet

    torch.save(alexnet(), tmp_path / "whole.pth")
    r = run(
        "show", "edge", "--model", "alexnet", "--weights", str(tmp_path / "whole.pth"), "--out", str(tmp_path / "r")
    )
    one_line_error(
        r,
        r"whole.pth is a whole pickled model \(a AlexNet object\), not a state_dict.*torch.save\(model.state_dict\(\)",
    )
    assert "\x1b" not in r.stderr


def test_layers_lists_every_call_and_what_is_never_called():
    r = run("layers", "resnet18", "--layers", "layer1.0.relu,layer1.0.relu#2")
    assert r.exit_code == 0, r.output
    assert "layer1.0.relu#2" in r.stdout and "2 of 2" in r.stdout
    r = run("layers", "vit_b_16", "--layers", "encoder.layers.encoder_layer_0.self_attention.out_proj")
    assert r.exit_code == 0, r.output
    assert "not called" in r.stdout and "not a tensor" not in r.stdout


def test_show_says_what_it_is_about_to_write_when_it_is_large(tmp_path, monkeypatch):
    monkeypatch.setattr("featuremaps.show.LARGE_WRITE", 0)
    out = tmp_path / "run"
    r = run(
        "show",
        "edge",
        "--model",
        "alexnet",
        "--weights",
        "random",
        "--size",
        "64",
        "--save-maps",
        "all",
        "--out",
        str(out),
    )
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("writing "))
    assert f"to {out}/: pictures" in line and "raw maps" in line and "(--save-maps none skips them)" in line
    assert (out / "maps").is_dir()


def test_a_modes_comparison_names_one_untrained_network(tmp_path):
    out = tmp_path / "cmp"
    r = run(
        "compare",
        "edge",
        "--modes",
        "conv,conv-relu",
        "--model",
        "vgg11",
        "--weights",
        "random",
        "--size",
        "32",
        "--out",
        str(out),
        "-q",
    )
    assert r.exit_code == 0, r.output
    html = (out / "index.html").read_text()
    assert "RANDOM WEIGHTS: vgg11 (random(seed=0)) is not pretrained, so these maps show an untrained network." in html
    assert "untrained networks" not in html
