"""Modern vision models: token outputs drawn as maps, timm's registry, attention maps, batches and
models with dict inputs — random weights, offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import featuremaps as fm
from featuremaps import render
from featuremaps.capture import capture_attention
from featuremaps.errors import ModelError, WeightsUnavailableError
from featuremaps.runs import load_run, save_run


@pytest.fixture(scope="module")
def vit():
    return fm.load_model("vit_b_16", weights="random")


def test_a_vit_block_is_a_map_exactly_as_the_tokens_say(vit):
    x = torch.randn(1, 3, 224, 224)
    maps = fm.capture(vit, x, layers="encoder.layers.encoder_layer_5")
    e = maps["encoder.layers.encoder_layer_5"]
    assert e.shape == (1, 197, 768) and e.layout == "tokens" and e.prefix == 1 and e.spatial == (768, 14, 14)
    assert e.is_spatial and e.num_channels == 768 and e.spatial_size == (14, 14)
    tokens = e.tensor[0]  # the raw tokens stay in .tensor
    expected = tokens[1:].reshape(14, 14, 768).permute(2, 0, 1)  # drop the class token, rows of patches
    assert np.array_equal(e.maps(), expected.numpy())
    assert torch.equal(e.prefix_tokens()[0, 0], tokens[0])
    assert np.allclose(e.reduced("mean"), expected.mean(0).numpy(), atol=1e-6)


def test_transformers_default_to_their_blocks_and_every_figure_draws_them(vit, tmp_path):
    maps = fm.capture(vit, "sample:chelsea")
    assert maps.names[0] == "conv_proj" and maps.names[1:] == [f"encoder.layers.encoder_layer_{i}" for i in range(12)]
    im = render.overview(maps)
    assert len(im.info["tiles"]) == 13
    grid = render.channel_grid(maps[-1], top_k=16)
    assert grid.info["grid"].n == 16 and grid.info["grid"].map_h == 14
    over = render.overlay(maps[-1], maps.image)
    assert over.size == maps.image.size
    back = load_run(save_run(maps, tmp_path / "run"))
    assert back[-1].layout == "tokens" and np.array_equal(back[-1].maps(), maps[-1].maps())


def test_a_reduced_capture_reduces_tokens_over_their_channels(vit):
    x = torch.randn(1, 3, 224, 224)
    full = fm.capture(vit, x, layers="encoder.layers.encoder_layer_3")
    small = fm.capture(vit, x, layers="encoder.layers.encoder_layer_3", reduce="mean")
    e, s = full[0], small[0]
    assert s.tensor.shape == (1, 14, 14) and s.spatial == (768, 14, 14) and s.prefix == 1
    assert np.allclose(s.reduced("mean"), e.reduced("mean"), atol=1e-6)
    top = fm.capture(vit, x, layers="encoder.layers.encoder_layer_3", reduce="topk:4")[0]
    assert top.tensor.shape == (1, 4, 14, 14) and top.maps().shape == (4, 14, 14)


def test_timm_deit_has_two_prefix_tokens_and_registers_are_dropped_too():
    deit = fm.load_model("timm:deit_tiny_distilled_patch16_224", weights="random")
    e = fm.capture(deit, torch.randn(1, 3, 224, 224), layers="blocks.2")[0]
    assert e.prefix == 2 and e.spatial == (192, 14, 14)
    assert np.array_equal(e.maps(), e.tensor[0, 2:].reshape(14, 14, 192).permute(2, 0, 1).numpy())
    reg = fm.load_model("timm:vit_small_patch14_reg4_dinov2", weights="random", size=(56, 84))
    r = fm.capture(reg, torch.randn(1, 3, 56, 84), layers="blocks.0")[0]
    assert r.prefix == 5 and r.spatial == (384, 4, 6)  # class token + 4 registers; a non-square grid


def test_swin_channels_last_stages_are_transposed():
    swin = fm.load_model("swin_t", weights="random", size=(224, 288))
    x = torch.randn(1, 3, 224, 288)
    e = fm.capture(swin, x, layers="features.1")[0]
    assert e.shape == (1, 56, 72, 96) and e.layout == "nhwc" and e.spatial == (96, 56, 72)
    assert np.array_equal(e.maps(), e.tensor[0].permute(2, 0, 1).numpy())


def test_timm_models_by_name_with_their_own_preprocessing():
    m = fm.load_model("timm:vit_small_patch16_224", weights="random", seed=3)
    assert m.name == "timm:vit_small_patch16_224" and m.weights == "random(seed=3)" and not m.pretrained
    assert m.preprocessing.mean == (0.5, 0.5, 0.5) and m.preprocessing.interpolation == "bicubic"
    again = fm.load_model("timm:vit_small_patch16_224", weights="random", seed=3)
    assert torch.equal(next(m.module.parameters()), next(again.module.parameters()))
    with pytest.raises(ModelError, match=r"unknown timm model 'convnxt_tiny'; did you mean timm:convnext_tiny"):
        fm.load_model("timm:convnxt_tiny", weights="random")
    small = fm.load_model("timm:vit_small_patch16_224", weights="random", size=96)
    assert fm.capture(small, "sample:chelsea", layers="blocks.0")[0].spatial == (384, 6, 6)


def test_timm_pretrained_offline_names_what_to_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import featuremaps.timm_models as tm

    monkeypatch.setattr(tm, "_reachable", lambda host, timeout=3.0: False)  # offline, fast
    monkeypatch.setattr(tm, "cached_file", lambda name: None)
    with pytest.raises(
        WeightsUnavailableError,
        match=r"timm:resnet18 are not cached and cannot be downloaded.*huggingface-cli download timm/resnet18.a1_in1k.*random",
    ):
        fm.load_model("timm:resnet18", weights="DEFAULT")


def test_timm_checkpoint_round_trip(tmp_path):
    src = fm.load_model("timm:resnet18", weights="random", seed=5)
    from safetensors.torch import save_file

    save_file(src.module.state_dict(), tmp_path / "r18.safetensors")
    m = fm.load_model("timm:resnet18", weights=str(tmp_path / "r18.safetensors"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(m.module(x), src.module(x), atol=1e-6) and m.pretrained


def test_attention_maps_per_head_and_rollout(vit):
    a = capture_attention(
        vit, "sample:chelsea", blocks=["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_11"]
    )
    assert list(a.probabilities) == ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_11"]
    probs = a.probabilities["encoder.layers.encoder_layer_11"]
    assert probs.shape == (1, 12, 197, 197) and torch.allclose(probs.sum(-1), torch.ones(1, 12, 197), atol=1e-5)
    heads = a.heads()
    assert heads.shape == (1, 12, 14, 14)
    assert torch.allclose(heads.tensor[0, 3].flatten(), probs[0, 3, 0, 1:])  # the class token's row, patches only
    roll = a.rollout()
    assert roll.shape == (1, 1, 14, 14) and torch.all(roll.tensor >= 0)
    assert render.channel_grid(heads).info["grid"].n == 12
    assert len(a.maps()) == 3
    with pytest.raises(fm.LayerError, match="has no attention modules"):
        capture_attention(fm.load_model("alexnet", weights="random", size=64), "sample:edge")


def test_a_batch_of_pictures_and_a_model_with_dict_input_and_output():
    class DictNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.head = torch.nn.Linear(4, 2)

        def forward(self, batch):
            y = self.conv(batch["pixels"])
            return {"logits": self.head(y.mean((2, 3))), "features": y}

    torch.manual_seed(0)
    net = DictNet()
    pixels = torch.randn(2, 3, 16, 16)
    maps = fm.capture(net, {"pixels": pixels}, layers="conv")
    assert maps["conv"].shape == (2, 4, 16, 16) and maps.input_size == (16, 16)
    assert torch.allclose(maps["conv"].tensor, net.conv(pixels))
    batch = fm.capture(
        fm.load_model("alexnet", weights="random", size=64), ["sample:edge", "sample:chelsea"], layers="conv"
    )
    assert batch["features.0"].shape[0] == 2 and len(batch.stats()) == 2 * 5


def test_the_command_line_lists_and_shows_timm_models(tmp_path):
    from typer.testing import CliRunner

    from featuremaps.cli import app

    r = CliRunner().invoke(app, ["models", "--source", "timm", "deit_tiny"])
    assert r.exit_code == 0 and "timm:deit_tiny_patch16_224" in r.stdout
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["show", "chelsea", "--model", "timm:deit_tiny_patch16_224", "--weights", "random",
                                 "--layers", "blocks.0,blocks.11", "--out", str(out), "-q"])  # fmt: skip
    assert r.exit_code == 0, r.output
    grids = sorted(p.name for p in (out / "grids").iterdir())
    assert grids == ["000_blocks.0.png", "001_blocks.11.png"]
