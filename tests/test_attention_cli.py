"""``featuremaps show --attention BLOCK``: the chosen block's attention per head and the rollout drawn into the run
folder and its report (the same pixels as the library's pictures of the same seeded model), the names BLOCK may take,
and one-line errors before the model loads. CPU only, random weights, nothing downloaded."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torchvision
from PIL import Image
from typer.testing import CliRunner

import featuremaps as fm
from featuremaps import render
from featuremaps.attention import AttentionError, attention_rollout
from featuremaps.capture import capture_attention
from featuremaps.cli import app
from featuremaps.models import skeleton
from featuremaps.show import attention_block

runner = CliRunner()
VIT = "timm:vit_tiny_patch16_224"


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def one_line_error(result, pattern: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(pattern, lines[0]), result.stderr


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def test_show_attention_draws_the_heads_and_the_rollout(tmp_path):
    out = tmp_path / "run"
    r = run("show", "chelsea", "--model", VIT, "--weights", "random", "--size", "64", "--channels", "0-3",
            "--attention", "blocks.1", "--out", str(out), "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    a = manifest["attention"]
    assert (a["block"], a["heads"], a["tokens"], a["grid"]) == ("blocks.1.attn", 3, 17, [4, 4])
    assert a["rollout_modules"] == [f"blocks.{i}.attn" for i in range(12)]
    assert a["pictures"] == ["attention/heads.png", "attention/rollout.png"]
    # the same pictures as the library draws for the same seeded model: the chosen block, not another
    model = fm.load_model(VIT, weights="random", size=64, progress=False)
    att = capture_attention(model, "sample:chelsea")
    heads = render.channel_grid(att.heads("blocks.1.attn"), per_page=None, palette=True)
    np.testing.assert_array_equal(pixels(Image.open(out / "attention/heads.png")), pixels(heads))
    other = render.channel_grid(att.heads("blocks.11.attn"), per_page=None, palette=True)
    assert not np.array_equal(pixels(heads), pixels(other))
    rollout = render.overlay(att.rollout(), att.image, reduce="mean", channel=0, legend=True)
    np.testing.assert_array_equal(pixels(Image.open(out / "attention/rollout.png")), pixels(rollout))
    # the rollout is row-stochastic and its picture covers the 4x4 patch grid
    rolled = attention_rollout(list(att.probabilities.values()))
    np.testing.assert_allclose(rolled.sum(-1).numpy(), 1.0, rtol=1e-5)
    assert tuple(att.rollout().shape) == (1, 1, 4, 4)
    html = (out / "index.html").read_text()
    assert re.findall(r"<h2>(.*?)</h2>", html)[:2] == ["Every layer at a glance", "Attention of blocks.1.attn"]
    section = html[html.index("<h2>Attention of") : html.index("<h2>The deepest layer")]
    assert "data-file='attention/heads.png'" in section and "data-file='attention/rollout.png'" in section
    assert "3 heads" in section and "all 12 modules" in section


def test_attention_block_names():
    vit = skeleton(VIT, size=64)
    assert attention_block(vit, "last") == "blocks.11.attn"
    assert attention_block(vit, "-1") == "blocks.11.attn"
    assert attention_block(vit, "0") == "blocks.0.attn"
    assert attention_block(vit, "blocks.3") == "blocks.3.attn"
    assert attention_block(vit, "blocks.3.attn") == "blocks.3.attn"
    tv = torchvision.models.VisionTransformer(
        image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    assert attention_block(tv, "encoder.layers.encoder_layer_1") == "encoder.layers.encoder_layer_1.self_attention"
    with pytest.raises(AttentionError, match=r"^'blocks' holds 12 attention modules; name one, e.g. 'blocks.11.attn'"):
        attention_block(vit, "blocks")
    with pytest.raises(AttentionError, match=r"has 12 attention modules, 0\.\.11 \(or last\)"):
        attention_block(vit, "12")


@pytest.mark.parametrize(
    ("model", "block", "pattern"),
    [
        ("resnet18", "last", r"resnet18 has no attention module featuremaps can read .*vision transformers"),
        (VIT, "blocks.99", r"no attention module at 'blocks.99'; .*an index 0\.\.11, or last"),
        (VIT, "12", r"--attention 12: timm:vit_tiny_patch16_224 has 12 attention modules"),
    ],
)
def test_show_attention_mistakes_before_the_model_loads(tmp_path, monkeypatch, model, block, pattern):
    monkeypatch.chdir(tmp_path)

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before a mistake that needs no model was found")

    monkeypatch.setattr("featuremaps.models.load_model", no_model)
    args = ("show", "edge", "--model", model, "--weights", "random", "--size", "64", "--out", "out")
    one_line_error(run(*args, "--attention", block), pattern)
    assert not (tmp_path / "out").exists()
