"""Run folders: written completely or not at all, and read back into the same result."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import featuremaps as fm
from featuremaps.errors import RunError
from featuremaps.runs import (
    SCHEMA_VERSION,
    Picture,
    load_run,
    read_manifest,
    save_run,
    zip_run,
)


@pytest.fixture
def maps(tiny):
    return fm.capture(tiny, fm.edge_image(64), layers="all", size=32)


def test_round_trip(tmp_path, maps):
    folder = save_run(maps, tmp_path / "run")
    back = load_run(folder)
    assert back.names == maps.names and back.mode == maps.mode and back.weights == maps.weights
    for a, b in zip(maps.entries, back.entries):
        assert torch.equal(a.tensor, b.tensor) and a.stats == b.stats and a.shape == b.shape
    assert back.image.size == (32, 32)
    assert np.array_equal(np.asarray(back.image), np.asarray(maps.image))
    manifest = read_manifest(folder)
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["layers"][0]["stats"]["shape"] == [1, 4, 32, 32]
    # raw maps are plain .npy, readable without pickle
    np.load(folder / manifest["layers"][0]["raw"], allow_pickle=False)


def test_reduced_round_trip_keeps_reduction_and_channels(tmp_path, tiny):
    maps = fm.capture(tiny, torch.randn(1, 3, 16, 16), layers="conv", reduce="topk:2")
    back = load_run(save_run(maps, tmp_path / "r"))
    assert back["features.0"].channels == maps["features.0"].channels
    assert back["features.0"].reduction == "topk:2:mean" and back.reduction == "topk:2:mean"


def test_existing_folder_is_kept_unless_overwrite(tmp_path, maps):
    folder = tmp_path / "run"
    save_run(maps, folder)
    with pytest.raises(RunError, match=r"already exists; choose another output folder \(--out\) or use --force"):
        save_run(maps, folder)
    first = read_manifest(folder)["created"]
    save_run(maps, folder, overwrite=True)  # a folder featuremaps wrote may be replaced
    assert read_manifest(folder)["created"] >= first and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_overwrite_never_replaces_a_folder_featuremaps_did_not_write(tmp_path, maps):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("thesis")
    with pytest.raises(RunError, match=r"precious was not written by featuremaps .*so --force will not replace it"):
        save_run(maps, precious, overwrite=True)
    assert (precious / "thesis.txt").read_text() == "thesis" and sorted(p.name for p in tmp_path.iterdir()) == [
        "precious"
    ]
    # a manifest.json that is not featuremaps' own does not count either
    (precious / "manifest.json").write_text(json.dumps({"name": "my project"}))
    with pytest.raises(RunError, match="was not written by featuremaps"):
        save_run(maps, precious, overwrite=True)
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    with pytest.raises(RunError, match="exists and is not a folder featuremaps wrote"):
        save_run(maps, afile, overwrite=True)
    assert afile.read_text() == "x"


def test_overwrite_refuses_a_run_folder_with_files_added_to_it(tmp_path, maps):
    folder = save_run(maps, tmp_path / "run")
    assert "input.png" in read_manifest(folder)["files"] and "manifest.json" not in read_manifest(folder)["files"]
    (folder / "maps" / "my_notes.md").write_text("mine")
    with pytest.raises(RunError, match=r"holds files featuremaps did not write \(maps/my_notes.md\)"):
        save_run(maps, folder, overwrite=True)
    assert (folder / "maps" / "my_notes.md").read_text() == "mine"


def test_the_old_run_survives_until_the_new_one_is_complete(tmp_path, maps):
    from PIL import Image

    folder = save_run(maps, tmp_path / "run")
    before = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))

    class Broken:
        width = height = 1

        def save(self, *a, **k):
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        save_run(
            maps,
            folder,
            pictures=[Picture("ok.png", Image.new("RGB", (2, 2))), Picture("a.png", Broken())],
            overwrite=True,
        )  # type: ignore[list-item]
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_comparison_or_demo_folder_is_not_loaded_as_a_run(tmp_path, maps):
    from featuremaps.runs import write_manifest

    (tmp_path / "cmp").mkdir()
    write_manifest(tmp_path / "cmp", {"runs": []}, kind="comparison")
    with pytest.raises(RunError, match=r"cmp is a comparison folder, not a run folder; its runs are in its subfolders"):
        load_run(tmp_path / "cmp")


def test_stale_parts_of_killed_runs_are_cleared_and_nothing_else(tmp_path, maps):
    import subprocess
    import sys

    from featuremaps.runs import PARTIAL_MARKER, clear_stale_parts

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def part(name, pid, marker=True):
        p = tmp_path / f".{name}.tmp-{pid}-0123abcd"
        p.mkdir()
        (p / "big.npy").write_bytes(b"0" * 1000)
        if marker:
            (p / PARTIAL_MARKER).write_text(json.dumps({"pid": pid, "started": None}))
        return p

    stale = part("run", dead.pid)
    unmarked = part("other", dead.pid, marker=False)  # not featuremaps' own: kept
    live = part("busy", os.getpid())  # a live process's: kept
    old_own = tmp_path / f".run.old-{dead.pid}-89abcdef"  # a replaced run, left by a kill between two renames
    old_own.mkdir()
    (old_own / "manifest.json").write_text(json.dumps({"schema_version": 1, "kind": "run"}))
    save_run(maps, tmp_path / "next")  # the next run in that folder clears what the dead process left
    assert not stale.exists() and not old_own.exists()
    assert unmarked.exists() and live.exists() and (tmp_path / "next" / "manifest.json").is_file()
    assert clear_stale_parts(tmp_path) == []


def test_failure_leaves_nothing_half_written(tmp_path, maps):
    class Broken:
        width = height = 1

        def save(self, *a, **k):
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        save_run(maps, tmp_path / "run", pictures=[Picture("a.png", Broken())])  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_pictures_and_files_are_listed(tmp_path, maps):
    from PIL import Image

    pic = Picture("grids/000_features.0.png", Image.new("RGB", (5, 4)), kind="grid", layer="features.0")
    folder = save_run(
        maps, tmp_path / "run", pictures=[pic], files={"index.html": "<p>hi</p>"}, extra={"cmap": "viridis"}
    )
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["pictures"] == [
        {
            "path": "grids/000_features.0.png",
            "kind": "grid",
            "layer": "features.0",
            "caption": "",
            "width": 5,
            "height": 4,
        }
    ]
    assert manifest["cmap"] == "viridis"
    assert (folder / "index.html").read_text() == "<p>hi</p>"
    with pytest.raises(RunError, match="must be relative and stay inside"):
        save_run(maps, tmp_path / "x", pictures=[Picture("../evil.png", Image.new("RGB", (1, 1)))])


def test_bad_folders(tmp_path):
    with pytest.raises(RunError, match="is not a featuremaps run folder"):
        load_run(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(RunError, match="schema version 99; this featuremaps reads version 1"):
        load_run(tmp_path)


def test_zip_holds_every_file(tmp_path, maps):
    import io
    import zipfile

    folder = save_run(maps, tmp_path / "run")
    names = zipfile.ZipFile(io.BytesIO(zip_run(folder))).namelist()
    assert "run/manifest.json" in names and "run/input.png" in names
    assert sum(n.startswith("run/maps/") for n in names) == len(maps)


def test_zip_streams_to_a_file_and_stores_pngs(tmp_path, maps):
    import zipfile

    folder = save_run(maps, tmp_path / "run")
    dest = tmp_path / "run.zip"
    assert zip_run(folder, dest) is None
    with zipfile.ZipFile(dest) as zf:
        info = {i.filename: i for i in zf.infolist()}
        assert info["run/input.png"].compress_type == zipfile.ZIP_STORED
        assert info["run/manifest.json"].compress_type == zipfile.ZIP_DEFLATED
        assert json.loads(zf.read("run/manifest.json"))["schema_version"] == SCHEMA_VERSION


def test_a_file_written_atomically_is_whole_or_the_old_one(tmp_path):
    from featuremaps.folders import write_atomic

    path = tmp_path / "notes.txt"
    path.write_text("old")

    def fails_halfway(tmp):
        tmp.write_text("half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, fails_halfway)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    seen = []
    write_atomic(path, lambda tmp: (seen.append(tmp.name), tmp.write_text("new")))
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert seen[0].startswith(
        f".notes.txt.tmp-{os.getpid()}-"
    )  # hidden; the atlas store clears such names after a kill
