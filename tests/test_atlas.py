"""The channel atlas on a planted model: it finds exactly the images with the planted pattern, at the
right place, with the receptive field's crop box; its numbers are fm.capture's; bad files are
skipped and listed; the Parquet store reads in DuckDB; the API's answers (top, channels_of,
distribution, crops, maps); the folder rules."""

from __future__ import annotations

import base64
import csv
import importlib
import io
import itertools
import re
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import featuremaps as fm
from featuremaps.errors import LayerError, RunError
from test_atlas_model import (
    oracle_conv1,
    oracle_conv2,
    planted_net,
    planted_pictures,
    random_net,
    write_planted,
)

AtlasError = fm.AtlasError
LAYERS = "features.0,features.3"


def make(folder: Path, out: Path, model=None, **kw):
    options = {"layers": LAYERS, "size": 32, "batch_size": 3, "part_size": 6, "workers": 0, "top_k": 5}
    options.update(kw)
    return fm.atlas(model if model is not None else planted_net(), folder, out=out, **options)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    boxes = write_planted(root / "pics")
    atlas = make(root / "pics", root / "atlas")
    return root, boxes, atlas


# -- the planted channels ------------------------------------------------------------------------------
def expected_box(
    layer: str, y: int, x: int, picture_size: tuple[int, int], size: int = 32
) -> tuple[int, int, int, int]:
    """The crop box, from the receptive field computed by hand for PlantedNet: conv1 sees rows
    y-1..y+1 (3 px); conv2 sees the pooled positions y-1..y+1, i.e. input rows 2y-3..2y+4 (8 px).
    Clipped at the input's borders, then scaled to the original picture (floor / ceil)."""
    lo, hi = (y - 1, y + 2) if layer == "features.0" else (2 * y - 3, 2 * y + 5)
    lo_x, hi_x = (x - 1, x + 2) if layer == "features.0" else (2 * x - 3, 2 * x + 5)
    lo, hi, lo_x, hi_x = max(lo, 0), min(hi, size), max(lo_x, 0), min(hi_x, size)
    w0, h0 = picture_size
    sy, sx = h0 / size, w0 / size
    return (int(np.floor(lo * sy)), int(np.floor(lo_x * sx)), int(np.ceil(hi * sy)), int(np.ceil(hi_x * sx)))


@pytest.mark.parametrize("layer, oracle", [("features.0", oracle_conv1), ("features.3", oracle_conv2)])
def test_the_red_channel_finds_exactly_the_red_pictures_at_the_right_place(planted, layer, oracle):
    root, boxes, atlas = planted
    pictures = planted_pictures()
    red = {f"{root / 'pics' / n}" for n, b in boxes.items() if b is not None}
    hits = atlas.top(layer, 0, k=5)
    assert {h.image for h in hits[:4]} == red
    assert hits[4].value < 0.1 * hits[3].value  # the fifth is not red: the channel is silent there
    for h in hits[:4]:
        name = Path(h.image).name
        picture, square = pictures[name]
        m = oracle(picture, 0)
        # where the max is: the first maximum of an independent computation of the map
        assert (h.y, h.x) == np.unravel_index(np.argmax(m), m.shape), name
        assert h.value == pytest.approx(m.max(), rel=1e-5)
        # the crop is the receptive field of that position, in the original picture's pixels
        assert h.box == expected_box(layer, h.y, h.x, picture.size), name
        t, le, b, r = h.box
        cy, cx = (t + b) / 2, (le + r) / 2
        assert square[0] <= cy <= square[2] and square[1] <= cx <= square[3], (name, h.box, square)
    corner = next(h for h in hits if h.image.endswith("d_red_corner.png"))
    if layer == "features.3":  # its 8 px field at position (0, 0) is cut by the border: clipped
        assert (corner.y, corner.x) == (0, 0) and corner.box == (0, 0, 5, 5)


def test_the_edge_channel_finds_the_vertical_edges(planted):
    root, _, atlas = planted
    hits = atlas.top("features.0", 1, k=3)
    assert {Path(h.image).name for h in hits[:2]} == {"h_vedge.png", "i_vedge_large.png"}
    assert hits[2].value < 0.2 * hits[1].value
    first = next(h for h in hits if h.image.endswith("h_vedge.png"))
    # the edge is between input columns 9 and 10: the kernel's peak is at x = 9 or 10
    assert first.x in (9, 10) and first.box[1] <= 10 <= first.box[3]


def test_topk_parquet_has_the_columns_the_issue_names_and_ranks_by_value(planted):
    root, _, atlas = planted
    con = duckdb.connect()
    path = str(root / "atlas" / "topk.parquet")
    cols = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM '{path}'").fetchall()]
    assert cols == [
        "layer",
        "channel",
        "rank",
        "image",
        "value",
        "y",
        "x",
        "box_top",
        "box_left",
        "box_bottom",
        "box_right",
    ]
    rows = con.execute(
        f"SELECT layer, channel, rank, value, image FROM '{path}' ORDER BY layer, channel, rank"
    ).fetchall()
    assert len(rows) == 2 * 2 * 5  # 2 layers x 2 channels x top 5
    for (lay, ch, rank, value, _), nxt in itertools.pairwise(rows):
        if nxt[0] == lay and nxt[1] == ch:
            assert nxt[2] == rank + 1 and nxt[3] <= value
    # against the full store: rank 1 is the highest max of the channel
    best = con.execute(
        f"SELECT max(max) FROM read_parquet('{root / 'atlas'}/parts/*/stats.parquet') WHERE layer = 'features.3' "
        "AND channel = 1"
    ).fetchone()[0]
    assert best == pytest.approx(next(r[3] for r in rows if r[:3] == ("features.3", 1, 1)))


def test_the_store_is_plain_parquet_that_duckdb_reads(planted):
    root, boxes, atlas = planted
    con = duckdb.connect()
    stats = f"read_parquet('{root / 'atlas'}/parts/*/stats.parquet')"
    n, images = con.execute(f"SELECT count(*), count(DISTINCT image_id) FROM {stats}").fetchone()
    assert images == len(boxes) and n == len(boxes) * (2 + 2)
    dupes = con.execute(
        f"SELECT count(*) FROM (SELECT image_id, layer, channel FROM {stats} GROUP BY ALL HAVING count(*) > 1)"
    )
    assert dupes.fetchone()[0] == 0
    hist = f"'{root / 'atlas' / 'histograms.parquet'}'"
    per = con.execute(f"SELECT layer, channel, stat, sum(count) FROM {hist} GROUP BY ALL").fetchall()
    assert len(per) == 8 and all(c == len(boxes) for *_, c in per)
    # the same through the atlas's own views
    assert atlas.sql("SELECT count(*) FROM activations WHERE image LIKE '%a_red.png'").fetchall()[0][0] == 4
    assert atlas.sql("SELECT count(*) FROM stats WHERE layer = ?", ["features.0"]).fetchall()[0][0] == 2 * len(boxes)


def test_top_beyond_the_stored_k_ranks_from_the_store(planted):
    _, _, atlas = planted
    more = atlas.top("features.0", 1, k=8)
    assert [h.rank for h in more] == list(range(1, 9))
    assert [h.image for h in more[:5]] == [h.image for h in atlas.top("features.0", 1, k=5)]
    values = [h.value for h in more]
    assert values == sorted(values, reverse=True)
    with pytest.raises(AtlasError, match="channels 0..1, not 7"):
        atlas.top("features.0", 7)
    with pytest.raises(AtlasError, match="did you mean features.0"):
        atlas.top("features.00", 0)


def test_channels_of_one_image(planted):
    root, _, atlas = planted
    path = root / "pics" / "a_red.png"
    rows = atlas.channels_of(str(path), layer="features.0", k=2)
    assert [r.channel for r in rows] == [0, 1] and rows[0].value > 3
    assert rows[0].rank is not None and rows[0].quantile > 0.6  # among the few red pictures
    assert atlas.channels_of(path.resolve(), k=1)[0].channel == 0  # any path to the same file
    by_q = atlas.channels_of(str(path), by="quantile", k=4)
    assert by_q[0].quantile == max(r.quantile for r in by_q)
    with pytest.raises(AtlasError, match="is not in this atlas"):
        atlas.channels_of("elsewhere.png")


def test_distribution_of_a_channel(planted):
    root, boxes, atlas = planted
    d = atlas.distribution("features.0", 0)
    values = atlas.sql("SELECT max FROM stats WHERE layer = 'features.0' AND channel = 0").fetchall()
    values = np.array([v for (v,) in values])
    assert (
        d.count == len(boxes) and d.maximum == pytest.approx(values.max()) and d.minimum == pytest.approx(values.min())
    )
    assert d.mean == pytest.approx(values.mean(), rel=1e-6)
    edges, counts = d.histogram(8)
    assert counts.sum() == len(boxes) and counts[-1] == 4  # the four red pictures in the top bin
    info = atlas.channel("features.0", 0, k=3).to_dict()
    assert info["images"] == len(boxes) and len(info["top"]) == 3 and info["receptive_field"] == [3, 3]
    assert info["distribution"]["histogram"]["counts"][-1] >= 4
    assert d.picture().size == (360, 140)


def test_crops_with_their_heatmaps(planted):
    root, boxes, atlas = planted
    crops = atlas.crops("features.0", 0, k=4)
    assert len(crops) == 4
    for c in crops:
        original = Image.open(atlas.file_of(c.hit.image)).convert("RGB")
        t, le, b, r = c.hit.box
        assert c.picture.size == (r - le, b - t) == c.heatmap.size
        assert np.array_equal(np.asarray(c.picture), np.asarray(original.crop((le, t, r, b))))
        assert c.activation.shape == (b - t, r - le)
        assert c.scale[1] >= c.activation.max() > 0.9 * c.hit.value  # the crop holds the channel's peak
    with pytest.raises(AtlasError, match="opacity"):
        atlas.crops("features.0", 0, alpha=2)


def test_full_maps_of_an_atlas_image(planted):
    root, _, atlas = planted
    maps = atlas.maps(str(root / "pics" / "b_red_large.png"))
    assert [e.name for e in maps.entries] == ["features.0", "features.3"]
    assert maps["features.0"].shape == (1, 2, 32, 32)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_values_equal_fm_capture_on_the_same_image(tmp_path, batch_size):
    """The numbers reduced inside the hook are those of fm.capture on each image: bit for bit with
    one image per pass; within float32 rounding in batches (a batched convolution adds in another order)."""
    pics = tmp_path / "pics"
    write_planted(pics)
    for name in ("astronaut", "chelsea", "coffee", "rocket"):  # the bundled photos, as files
        shutil.copy(fm.images.sample_path(name), pics / f"photo_{name}{fm.images.sample_path(name).suffix}")
    net = random_net()
    atlas = make(pics, tmp_path / "atlas", model=net, size=48, batch_size=batch_size, part_size=8)
    check = np.testing.assert_array_equal if batch_size == 1 else _close
    for (image,) in atlas.sql("SELECT image FROM images ORDER BY image_id").fetchall():
        maps = fm.capture(net, image, layers=LAYERS, size=48)
        for entry in maps.entries:
            full = entry.tensor[0].reshape(entry.shape[1], -1)
            rows = atlas.sql(
                "SELECT channel, max, mean, y, x FROM activations WHERE image = ? AND layer = ? ORDER BY channel",
                [image, entry.name],
            ).fetchall()
            got = np.array([r[1:] for r in rows])
            check(got[:, 0], full.amax(1).numpy())
            check(got[:, 1], full.mean(1).numpy())
            flat = got[:, 2] * entry.shape[3] + got[:, 3]
            at = full.gather(1, torch.as_tensor(flat, dtype=torch.long)[:, None])[:, 0]
            check(at.numpy(), full.amax(1).numpy())  # (y, x) point at the max


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_files_are_skipped_listed_and_counted(tmp_path):
    pics = tmp_path / "pics"
    write_planted(pics)
    good = (pics / "a_red.png").read_bytes()
    (pics / "truncated.png").write_bytes(good[: len(good) // 2])
    (pics / "empty.jpg").write_bytes(b"")
    (pics / "text.png").write_text("not a picture")
    (pics / "notes.txt").write_text("not an input: no image extension")
    (pics / ".hidden.png").write_bytes(good)
    atlas = make(pics, tmp_path / "atlas")
    skipped = dict(atlas.skipped())
    assert set(skipped) == {str(pics / n) for n in ("truncated.png", "empty.jpg", "text.png")}
    assert re.search("truncated or corrupt", skipped[str(pics / "truncated.png")])
    assert "empty (0 bytes)" in skipped[str(pics / "empty.jpg")]
    assert "not an image that can be read" in skipped[str(pics / "text.png")]
    with open(tmp_path / "atlas" / "skipped.csv", newline="", encoding="utf-8") as f:
        listed = list(csv.DictReader(f))
    assert {r["image"]: r["reason"] for r in listed} == skipped
    m = atlas.manifest
    n = len(planted_pictures())
    assert (m["images"], m["usable"], m["skipped"], m["ignored_files"]) == (n + 3, n, 3, 1)
    assert atlas.top("features.0", 0, k=1)[0].image.endswith("a_red.png")  # the run went on
    with pytest.raises(AtlasError, match="was skipped by this atlas"):
        atlas.channels_of(str(pics / "empty.jpg"))


def test_workers_decode_the_same(tmp_path, planted):
    root, _, atlas = planted
    again = make(root / "pics", tmp_path / "atlas", workers=1)
    assert pq.read_table(again.folder / "topk.parquet").equals(pq.read_table(atlas.folder / "topk.parquet"))


def test_inputs_text_lists_and_imagefolder_trees(tmp_path):
    pics = tmp_path / "pics"
    write_planted(pics)
    listing = tmp_path / "lists" / "few.txt"
    listing.parent.mkdir()
    listing.write_text(
        "# two red pictures and one missing file\n../pics/a_red.png\n\n../pics/b_red_large.png\nnowhere.png\n"
    )
    atlas = make(listing, tmp_path / "from-list")
    assert [i for i, in atlas.sql("SELECT image FROM images ORDER BY image_id").fetchall()] == [
        "../pics/a_red.png", "../pics/b_red_large.png", "nowhere.png"]  # fmt: skip
    assert "not found" in dict(atlas.skipped())["nowhere.png"]
    tree = tmp_path / "tree"
    for cls, names in {"red": ["a_red.png", "b_red_large.png"], "other": ["e_green.png"]}.items():
        (tree / cls).mkdir(parents=True)
        for n in names:
            shutil.copy(pics / n, tree / cls / n)
    atlas = make(tree, tmp_path / "from-tree")
    assert atlas.manifest["source_kind"] == "imagefolder"
    labels = atlas.sql("SELECT label, count(*) FROM images GROUP BY label ORDER BY label").fetchall()
    assert labels == [("other", 1), ("red", 2)]
    from torchvision.datasets import ImageFolder

    atlas = make(ImageFolder(str(tree)), tmp_path / "from-dataset")
    assert atlas.sql("SELECT count(*) FROM images WHERE label = 'red'").fetchall()[0][0] == 2


def test_input_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no pictures")
    with pytest.raises(AtlasError, match="holds no images \\(1 other files\\)"):
        make(tmp_path / "empty", tmp_path / "atlas")
    with pytest.raises(AtlasError, match="not found"):
        make(tmp_path / "missing", tmp_path / "atlas")
    (tmp_path / "blank.txt").write_text("\n# nothing\n")
    with pytest.raises(AtlasError, match="lists no image paths"):
        make(tmp_path / "blank.txt", tmp_path / "atlas")
    with pytest.raises(AtlasError, match="top-k must be an integer >= 1, not 0"):
        make(tmp_path, tmp_path / "atlas", top_k=0)
    assert not (tmp_path / "atlas").exists()


def test_the_atlas_folder_inside_the_source_is_not_an_input(tmp_path):
    write_planted(tmp_path / "pics")
    first = make(tmp_path / "pics", tmp_path / "pics" / "atlas")
    assert first.num_images == len(planted_pictures())  # index.html etc. are not pictures; the folder is skipped


def test_layers_that_cannot_be_in_an_atlas(tmp_path):
    write_planted(tmp_path / "pics")
    with pytest.raises(LayerError, match=r"fc \(Linear\) outputs shape \(1, 3\), not \(N, C, H, W\)"):
        make(tmp_path / "pics", tmp_path / "atlas", layers="fc")
    with pytest.raises(LayerError, match="no layer named 'features.9'"):
        make(tmp_path / "pics", tmp_path / "atlas", layers="features.9")

    class Shared(torch.nn.Module):  # one ReLU called twice per pass, as in ResNet's blocks
        def __init__(self):
            super().__init__()
            self.a, self.b, self.relu = torch.nn.Conv2d(3, 2, 3), torch.nn.Conv2d(2, 2, 3), torch.nn.ReLU()

        def forward(self, x):
            return self.relu(self.b(self.relu(self.a(x))))

    with pytest.raises(LayerError, match="relu is called 2 times per pass.*select its first call as relu#1"):
        make(tmp_path / "pics", tmp_path / "atlas", model=Shared(), layers="relu")
    atlas = make(tmp_path / "pics", tmp_path / "atlas", model=Shared(), layers="relu#1,b")
    assert [layer.name for layer in atlas.layers] == ["b", "relu"]  # the model's order
    assert atlas.layer("relu").receptive_field.size == (3, 3) and atlas.layer("b").receptive_field.size == (5, 5)


def test_report_is_one_offline_file(planted):
    root, _, atlas = planted
    page = (root / "atlas" / "index.html").read_text(encoding="utf-8")
    assert atlas.weights == "as given" and "RANDOM" not in page  # a model object's own (planted) weights
    srcs = re.findall(r"<img src='([^']*)'", page)
    assert len(srcs) == 4 and all(s.startswith("data:image/jpeg;base64,") for s in srcs)  # 2 layers x 2 channels
    assert not re.search(r"(src|href)=['\"]https?:", page) and "<script" not in page
    assert page.count("<figure class='ch'>") == 4 and "id='layer-features-3'" in page


# -- the folder rules --------------------------------------------------------------------------------
def test_a_finished_atlas_is_replaced_only_with_force(tmp_path):
    write_planted(tmp_path / "pics")
    out = tmp_path / "atlas"
    make(tmp_path / "pics", out)
    with pytest.raises(RunError, match="already holds a finished atlas.*--force"):
        make(tmp_path / "pics", out)
    again = make(tmp_path / "pics", out, resume=True)  # nothing to do
    assert again.num_images == len(planted_pictures())
    replaced = make(tmp_path / "pics", out, force=True, top_k=2)
    assert replaced.top_k == 2 and not list(tmp_path.glob(".atlas.*"))
    (out / "mine.txt").write_text("a user's file")
    with pytest.raises(RunError, match="holds files featuremaps did not write \\(mine.txt\\)"):
        make(tmp_path / "pics", out, force=True)
    assert (out / "mine.txt").exists() and (out / "manifest.json").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    for kw in ({}, {"force": True}, {"resume": True}):
        with pytest.raises(RunError, match="is not an atlas featuremaps wrote"):
            make(tmp_path / "pics", other, **kw)
    assert (other / "thesis.tex").read_text() == "precious"
    with pytest.raises(RunError, match="not found"):
        fm.open_atlas(tmp_path / "nowhere")


def test_an_unfinished_atlas_needs_resume_and_the_same_settings(tmp_path, monkeypatch):
    write_planted(tmp_path / "pics")
    out = tmp_path / "atlas"
    calls = {"n": 0}

    def stop_after_two(done, total):
        calls["n"] += 1
        if calls["n"] == 3:  # the first call reports what is done already; then two batches
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make(tmp_path / "pics", out, progress=stop_after_two)
    with pytest.raises(RunError, match="holds an unfinished atlas \\(1 parts done\\).*--resume"):
        make(tmp_path / "pics", out)
    with pytest.raises(RunError, match="unfinished atlas.*--resume"):
        fm.open_atlas(out)
    with pytest.raises(AtlasError, match="was started with --top-k 5, not 4"):
        make(tmp_path / "pics", out, resume=True, top_k=4)
    with pytest.raises(AtlasError, match="was started with --layers features.0,features.3, not features.0"):
        make(tmp_path / "pics", out, resume=True, layers="features.0")
    seen = []
    finished = make(tmp_path / "pics", out, resume=True, progress=lambda d, t: seen.append(d))
    assert seen[0] == 6 and seen[-1] == len(planted_pictures())  # one part of 6 was kept
    reference = make(tmp_path / "pics", tmp_path / "reference")
    for name in ("topk.parquet", "images.parquet", "histograms.parquet", "channels.parquet"):
        assert pq.read_table(finished.folder / name).equals(pq.read_table(reference.folder / name)), name


def test_a_second_writer_is_refused(tmp_path):
    from featuremaps.atlas.store import Writer, check_folder

    out = tmp_path / "atlas"
    with Writer(out), pytest.raises(RunError, match="being written by another featuremaps process \\(pid \\d+"):
        check_folder(out, resume=True, force=False)
    assert check_folder(out, resume=True, force=False).kind == "unfinished"


def test_stats_are_written_a_few_rows_at_a_time_with_the_same_rows(planted, tmp_path, monkeypatch):
    """A part's stats.parquet is written a layer and a bounded number of rows at a time (memory does
    not hold a whole part's rows): many small writes give the rows of the planted atlas, in row groups."""
    from featuremaps.atlas import store

    root, _, atlas = planted
    monkeypatch.setattr(store, "_ROWS_PER_WRITE", 5)  # 2 channels: 2 images a write
    small = make(root / "pics", tmp_path / "atlas")
    query = "SELECT image_id, layer, channel, max, mean, y, x FROM stats ORDER BY image_id, layer, channel"
    assert small.sql(query).fetchall() == atlas.sql(query).fetchall()
    groups = pq.ParquetFile(small.folder / "parts" / "part-000000" / "stats.parquet").metadata.num_row_groups
    assert groups == 2 * 3  # 6 images of the first part: 3 writes per layer
    assert pq.read_table(small.folder / "topk.parquet").equals(pq.read_table(atlas.folder / "topk.parquet"))


def test_portraits_are_drawn_beside_the_crops_and_read_back_from_their_cache(planted, tmp_path, monkeypatch):
    root, _, _ = planted
    from featuremaps.portrait import portrait_image

    opts = {"size": 32, "steps": 4, "seed": 3}
    a = make(root / "pics", tmp_path / "atlas", portraits=True, portrait_options=opts)
    page = (tmp_path / "atlas" / "index.html").read_text(encoding="utf-8")
    arts = re.findall(r"<img class='portrait' src='data:image/png;base64,([^']*)' alt='([^']*)'", page)
    assert [alt for _, alt in arts] == [f"{layer} channel {c} portrait" for layer in LAYERS.split(",") for c in (0, 1)]
    cache = tmp_path / "atlas" / "portraits"
    model = planted_net()
    for b64, alt in arts:  # each is the cached portrait of that channel, the one featuremaps.portrait makes
        layer, _, channel = alt.split()[:3]
        cached = portrait_image(model, layer, int(channel), cache_dir=cache, compute=False, **opts)
        assert cached is not None
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))
        assert np.array_equal(shown, np.asarray(cached)) and shown.std() > 0  # not one flat colour
    assert a.manifest["portraits"] == {"cache": str(cache), "options": opts}
    # a second atlas with the same cache reads them back: no optimization runs
    cache_module = importlib.import_module("featuremaps.portrait.cache")

    def no_optimization(*args, **kwargs):
        raise AssertionError("the portraits were made again")

    monkeypatch.setattr(cache_module, "portrait", no_optimization, raising=False)
    make(root / "pics", tmp_path / "again", portraits=cache, portrait_options=opts)
    assert (tmp_path / "again" / "index.html").read_text(encoding="utf-8").count("class='portrait'") == 4
    with pytest.raises(AtlasError, match="portraits are drawn into index.html"):
        make(root / "pics", tmp_path / "none", portraits=True, report=False)
