"""The ``show`` pipeline: which raw maps a folder keeps, a report that stays small, the checks made
before any work, and channel selections that some layers cannot fill."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import featuremaps as fm
from featuremaps import report
from featuremaps.errors import OptionError, RunError
from featuremaps.runs import load_run, read_manifest
from featuremaps.show import LARGE_WRITE, check_show, kept_maps, save_show


@pytest.fixture
def maps(tiny):
    return fm.capture(tiny, fm.edge_image(64), layers="all", size=32)


def test_raw_maps_are_opt_in(tmp_path, maps):
    folder = save_show(maps, tmp_path / "none")  # the default keeps none
    manifest = read_manifest(folder)
    assert manifest["save_maps"] == "none" and not (folder / "maps").exists()
    assert all(layer["raw"] is None for layer in manifest["layers"])
    with pytest.raises(RunError, match=r"saved without raw maps .*--save-maps shown or all"):
        load_run(folder)
    full = load_run(save_show(maps, tmp_path / "all", save_maps="all"))
    assert torch.equal(full["features.3"].tensor, maps["features.3"].tensor)


def test_shown_keeps_exactly_the_channels_the_grids_show(tmp_path, maps):
    folder = save_show(maps, tmp_path / "shown", save_maps="shown", channels="top3")
    back = load_run(folder)
    manifest = read_manifest(folder)
    grids = {p["layer"]: p["channels"] for p in manifest["pictures"] if p["kind"] == "grid"}
    conv = back["features.3"]
    assert (
        conv.reduction == "channels"
        and list(conv.channel_ids()) == grids["features.3"]
        and len(grids["features.3"]) == 3
    )
    original = maps["features.3"].tensor[0]
    for i, c in enumerate(conv.channel_ids()):
        assert torch.equal(conv.tensor[0, i], original[c])
    assert conv.stats == maps["features.3"].stats  # the numbers are still those of the whole layer
    assert np.load(folder / "maps" / "003_features.3.npy").shape == (1, 3, 16, 16)
    assert back["classifier"].tensor.shape == maps["classifier"].tensor.shape  # non-spatial entries stay whole
    again = save_show(back, tmp_path / "again", save_maps="all")  # a loaded subset draws and saves again
    assert load_run(again)["features.3"].channel_ids() == conv.channel_ids()


def test_kept_maps_rules(maps):
    assert kept_maps(maps, [], "none") is None and kept_maps(maps, [], "all") is maps
    with pytest.raises(OptionError, match="unknown --save-maps 'some'; use one of none, shown, all"):
        kept_maps(maps, [], "some")


def test_the_report_links_its_pictures_when_they_are_large(tmp_path, maps, monkeypatch):
    small = save_show(maps, tmp_path / "small")
    html = (small / "index.html").read_text()
    assert "data:image/png;base64," in html and "src='grids/" not in html
    monkeypatch.setattr(report, "INLINE_LIMIT", 1000)
    big = save_show(maps, tmp_path / "big")
    html = (big / "index.html").read_text()
    assert "data:image/png;base64," not in html and "src='grids/000_features.0.png'" in html
    assert "keep the folder together" in html
    for src in __import__("re").findall(r"src='([^']+)'", html):
        assert (big / src).is_file(), src


def test_announce_tells_the_sizes_before_writing(tmp_path, maps):
    told = []

    def announce(size):
        told.append(size)
        assert not (tmp_path / "run").exists()  # before anything is written

    save_show(maps, tmp_path / "run", save_maps="all", announce=announce)
    (size,) = told
    assert size.raw_maps == sum(e.tensor.numel() * 4 for e in maps.entries)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "run" / "grids").iterdir())
    assert 0 < on_disk <= size.pictures and size.total == size.pictures + size.raw_maps + size.report
    assert LARGE_WRITE == 100 * 2**20


def test_channels_beyond_a_layer_are_left_out_of_its_grid(tmp_path, maps):
    # features.0 has 4 channels, features.3 has 6: channels 2-5 fill the second, half the first
    folder = save_show(maps, tmp_path / "run", channels="2-5")
    grids = {p["layer"]: p for p in read_manifest(folder)["pictures"] if p["kind"] == "grid"}
    assert grids["features.3"]["channels"] == [2, 3, 4, 5]
    assert grids["features.0"]["channels"] == [2, 3]
    assert "without 2 of the channels asked for: it has 4" in grids["features.0"]["caption"]
    folder = save_show(maps, tmp_path / "five", channels="5")
    grids = {p["layer"] for p in read_manifest(folder)["pictures"] if p["kind"] == "grid"}
    assert "features.3" in grids and "features.0" not in grids  # a layer with none of them has no grid


def test_check_show_refuses_early(tiny):
    check_show(tiny, channels="0-3")
    with pytest.raises(OptionError, match=r"channel 999 is not in any selected layer \(they have 4 to 6 channels\)"):
        check_show(tiny, channels="999")
    with pytest.raises(fm.LayerError, match="no layer named 'features.9'"):
        check_show(tiny, layers="features.9")
    with pytest.raises(fm.LayerError, match="unknown mode 'conv-max'"):
        check_show(tiny, mode="conv-max")
    resnet = fm.models.skeleton("resnet18")
    with pytest.raises(fm.LayerError, match="resnet18 has no plain sequential conv stack"):
        check_show(resnet, mode="conv-relu")
    vgg = fm.models.skeleton("vgg16")
    with pytest.raises(OptionError, match=r"channel 600 is not in any selected layer \(they have 64 to 512 channels\)"):
        check_show(vgg, mode="conv-relu", channels="600")


def test_manifest_files_list_everything_written(tmp_path, maps):
    folder = save_show(maps, tmp_path / "run", save_maps="all")
    manifest = json.loads((folder / "manifest.json").read_text())
    written = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted([*manifest["files"], "manifest.json"]) == written
