"""Pictures checked by their pixels: layout, colours, ranges, selections and files."""

from __future__ import annotations

import io

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from featuremaps import render as R
from featuremaps.errors import FeatureMapsError
from featuremaps.maps import FeatureMap, FeatureMaps
from featuremaps.render import RenderError


# -- helpers ---------------------------------------------------------------------------------------------
def fmap(
    t: torch.Tensor, name: str = "layer", kind: str = "conv", type_: str = "Conv2d", index: int = 0, **kw
) -> FeatureMap:
    return FeatureMap(
        name=name,
        module=name.split("#")[0],
        kind=kind,
        type=type_,
        index=index,
        call=1,
        shape=tuple(t.shape),
        tensor=t,
        **kw,
    )


def colour(value: float, vmin: float, vmax: float, cmap: str = "viridis") -> tuple[int, int, int]:
    """What the renderer paints for ``value`` under a range (the public colorize)."""
    return tuple(int(v) for v in R.colorize(np.array([[value]], np.float32), cmap=cmap, vmin=vmin, vmax=vmax)[0, 0])


def mpl(cmap: str, x: float) -> tuple[int, int, int]:
    return tuple(int(v) for v in matplotlib.colormaps[cmap](x, bytes=True)[:3])


def px(im: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return tuple(im.getpixel((int(x), int(y))))


def centre(box: tuple[int, int, int, int]) -> tuple[int, int]:
    return ((box[0] + box[2]) // 2, (box[1] + box[3]) // 2)


def luminance(c: tuple[int, int, int]) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


LOW = colour(0, 0, 1)
HIGH = colour(1, 0, 1)


# -- colours and ranges ---------------------------------------------------------------------------------------
def test_colormap_ends_and_centre_match_matplotlib():
    assert mpl("viridis", 0.0) == LOW
    assert mpl("viridis", 1.0) == HIGH
    rgb = R.colorize(np.array([[-2.0, 0.0, 1.0]]), cmap="RdBu_r")  # diverging: symmetric ±2
    assert tuple(rgb[0, 1]) == mpl("RdBu_r", 0.5)
    assert tuple(rgb[0, 0]) == mpl("RdBu_r", 0.0)
    assert R.colorize(np.zeros((3, 4))).shape == (3, 4, 3)


def test_value_range_rules():
    a, b = np.array([0.0, 2.0]), np.array([-1.0, 1.0, np.nan, np.inf])
    assert R.value_range([a, b], "global") == (-1.0, 2.0)
    assert R.value_range(a, "map") == (0.0, 2.0)
    assert R.value_range([a, b], "layer", diverging=True) == (-2.0, 2.0)
    assert R.value_range(a, (0, 5)) == (0.0, 5.0)
    assert R.value_range(a, "fixed:-1,1") == (-1.0, 1.0)
    assert R.value_range(np.zeros(4), "map", diverging=True) == (-1.0, 1.0)
    assert R.value_range(np.full(3, np.nan), "map") == (0.0, 0.0)
    assert R.parse_norm("fixed:-1, 1") == (-1.0, 1.0)


@pytest.mark.filterwarnings("error")
def test_constant_nan_and_inf_maps_are_safe():
    x = np.array([[3.0, 3.0], [3.0, 3.0]])
    assert {tuple(p) for p in R.colorize(x).reshape(-1, 3)} == {LOW}  # constant -> low end
    zero = R.colorize(np.zeros((2, 2)), cmap="RdBu_r")
    assert tuple(zero[0, 0]) == mpl("RdBu_r", 0.5)  # all-zero diverging -> centre
    y = R.colorize(np.array([[np.nan, np.inf, -np.inf, 0.5]]), vmin=0, vmax=1)
    assert tuple(y[0, 0]) == R.NAN_COLOR and tuple(y[0, 1]) == HIGH and tuple(y[0, 2]) == LOW
    t = torch.full((1, 2, 8, 8), 7.0)
    t[0, 1, 0, 0] = float("nan")
    for norm in ("map", "layer", "global"):
        im = R.channel_grid(fmap(t), norm=norm, labels=False)
        g = im.info["grid"]
        assert px(im, *centre(g.tile_box(0))) == LOW
        assert px(im, g.tile_box(1)[0], g.tile_box(1)[1]) == R.NAN_COLOR


# -- grid geometry ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n, layout", [(1, (1, 1)), (3, (1, 3)), (4, (2, 2)), (5, (2, 3)), (10, (3, 4)), (64, (8, 8)), (2048, (45, 46))]
)
def test_grid_layout(n, layout):
    assert R.grid_layout(n) == layout


def test_grid_geometry_positions_and_separators():
    # 6 channels of 8x8: channel i is 0 except a bright 4x4 block in quadrant i % 4
    t = torch.zeros(1, 6, 8, 8)
    quads = [(0, 0), (0, 4), (4, 0), (4, 4)]
    for i in range(6):
        y, x = quads[i % 4]
        t[0, i, y : y + 4, x : x + 4] = 1.0
    im = R.channel_grid(fmap(t), norm="layer", labels=False)
    g = im.info["grid"]
    assert im.mode == "RGB" and im.size == (g.width, g.height)
    assert (g.rows, g.cols, g.tile_w, g.tile_h, g.sep, g.label_h) == (2, 3, 48, 48, 1, 0)  # 8 px x6 >= MIN_TILE
    assert g.width == max(3 * (48 + 1) + 1 + 2 * R.PAD, R.MIN_WIDTH)
    assert g.tile_box(4) == (g.x0 + 1 + 1 * 49, g.y0 + 1 + 1 * 49, g.x0 + 1 + 49 + 48, g.y0 + 1 + 49 + 48)
    for i in range(6):
        left, top, right, bottom = g.tile_box(i)
        y, x = quads[i % 4]
        for qy, qx in quads:  # 6x upscaled quadrant centres
            cx, cy = left + (qx + 2) * 6, top + (qy + 2) * 6
            assert px(im, cx, cy) == (HIGH if (qy, qx) == (y, x) else LOW), (i, qy, qx)
        # separators: the column right of the tile, the row under it, the frame's corner
        assert px(im, right, top + 5) == R.SEPARATOR_COLOR
        assert px(im, left + 5, bottom) == R.SEPARATOR_COLOR
        assert px(im, left - 1, top - 1) == R.SEPARATOR_COLOR
    assert im.info["channels"] == list(range(6))


def test_labels_are_written_under_tiles():
    im = R.channel_grid(fmap(torch.rand(1, 12, 7, 7)), labels=True)
    g = im.info["grid"]
    assert g.tile_w == 49 and g.label_h > 0
    for i in (0, 11):
        box = np.asarray(im.crop(g.label_box(i)))
        assert (box.sum(axis=2) < 200).any()  # dark text pixels in the strip
        assert tuple(box[0, -1]) == R.BACKGROUND_COLOR
    off = R.channel_grid(fmap(torch.rand(1, 12, 7, 7)), labels=False)
    assert off.info["grid"].label_h == 0 and off.height < im.height


@pytest.mark.parametrize(
    "channels, size, per_page",
    [
        (1, 7, 256),
        (3, 7, 256),
        (64, 7, 256),
        (2048, 7, 256),
        (2048, 7, None),
        (1, 1024, 256),
        (3, 1024, 256),
        (16, 1024, None),
        (64, 64, 256),
    ],
)
def test_bounded_readable_sizes(channels, size, per_page):
    t = torch.rand(1, channels, size, size)
    im = R.channel_grid(fmap(t), per_page=per_page)
    g = im.info["grid"]
    assert max(im.size) <= R.MAX_SIDE
    assert im.width >= R.MIN_WIDTH
    assert min(g.tile_w, g.tile_h) >= R.MIN_TILE
    assert g.n == min(channels, per_page or channels)
    if size == 7:
        assert g.tile_w == 49  # integer NEAREST upscale x7
    if size == 1024:
        d = round(1024 / g.tile_w)
        assert g.tile_w == 1024 // d  # kept, or shrunk by an integer factor (block means)
        assert (d > 1) == (channels > 3)


def test_tile_size_option_and_nearest_upscale():
    t = torch.zeros(1, 1, 2, 2)
    t[0, 0, 0, 0] = 1.0
    im = R.channel_grid(fmap(t), tile_size=100, labels=False)
    g = im.info["grid"]
    left, top, right, bottom = g.tile_box(0)
    assert (g.tile_w, g.tile_h) == (100, 100)
    tile = np.asarray(im.crop((left, top, right, bottom)))
    assert {tuple(p) for p in tile[:50, :50].reshape(-1, 3)} == {HIGH}  # hard NEAREST edges
    assert {tuple(p) for p in tile[50:, :].reshape(-1, 3)} == {LOW}


# -- normalization in grids ------------------------------------------------------------------------------------
def _two_channels() -> torch.Tensor:
    ramp = torch.linspace(0, 1, 64).reshape(8, 8)
    return torch.stack([ramp, ramp * 0.5])[None]  # channel 1 peaks at half of channel 0


def _peak(im: Image.Image, i: int) -> tuple[int, int, int]:
    left, top, right, bottom = im.info["grid"].tile_box(i)
    return px(im, right - 1, bottom - 1)  # the ramp's last value lands in the bottom-right corner


def test_norm_map_layer_global_fixed():
    f = fmap(_two_channels())
    by_map = R.channel_grid(f, norm="map", labels=False)
    by_layer = R.channel_grid(f, norm="layer", labels=False)
    assert _peak(by_map, 0) == _peak(by_map, 1) == HIGH
    assert _peak(by_layer, 0) == HIGH
    assert _peak(by_layer, 1) == colour(0.5, 0, 1)
    assert luminance(_peak(by_layer, 1)) < luminance(_peak(by_map, 1))
    assert by_layer.info["scale"] == (0.0, 1.0) and by_map.info["scale"] is None
    by_global = R.channel_grid(f, norm="global", global_range=(0.0, 4.0), labels=False)
    assert _peak(by_global, 0) == colour(1.0, 0, 4)
    fixed = R.channel_grid(f, norm=(0, 0.25), labels=False)
    assert _peak(fixed, 0) == _peak(fixed, 1) == HIGH  # clipped
    same = R.channel_grid(f, norm="fixed:0,0.25", labels=False)
    assert np.array_equal(np.asarray(fixed), np.asarray(same))


def test_global_norm_across_layers_in_overview():
    a = fmap(torch.full((1, 2, 4, 4), 1.0), "a", index=0)
    b = fmap(torch.full((1, 2, 4, 4), 3.0), "b", index=1)
    b.tensor[0, :, 0, 0] = 1.0
    maps = FeatureMaps((a, b))
    im = R.overview(maps, norm="global", tile_size=32)
    (na, box_a), (nb, box_b) = im.info["tiles"]
    # one range over both layers; non-negative data starts at 0 (zero at the dark end)
    assert (na, nb) == ("a", "b") and im.info["scale"] == (0.0, 3.0)
    assert px(im, box_a[0] + 20, box_a[1] + 20) == colour(1.0, 0, 3)
    assert px(im, box_b[0] + 20, box_b[1] + 20) == HIGH
    signed = FeatureMaps((fmap(torch.full((1, 2, 4, 4), -1.0), "s", index=0), b))
    assert R.overview(signed, norm="global", tile_size=32).info["scale"] == (-1.0, 3.0)
    assert max(im.size) <= R.MAX_SIDE


def test_zero_sits_at_the_dark_end_of_non_negative_ranges():
    # a ReLU's output (min 0) and a positive map whose values still cover half the scale start at 0;
    # signed data and positive data far from zero keep their own range
    assert R.value_range(np.array([0.0, 2.0]), "map") == (0.0, 2.0)
    assert R.value_range(np.array([0.03, 0.14]), "map") == (0.0, pytest.approx(0.14))
    assert R.value_range(np.array([-0.5, 2.0]), "map") == (-0.5, 2.0)
    assert R.value_range(np.array([100.0, 101.0]), "map") == (100.0, 101.0)
    relu_like = torch.tensor([[0.2, 0.3], [0.25, 0.4]]).view(1, 1, 2, 2)
    grid = R.channel_grid(fmap(relu_like), labels=False, tile_size=32)
    box = grid.info["grid"].tile_box(0)
    assert px(grid, box[0] + 1, box[1] + 1) == colour(0.2, 0, 0.4)  # not the darkest colour: 0 is


def test_diverging_centres_zero():
    t = torch.tensor([[-2.0, 0.0], [1.0, 0.5]]).reshape(1, 1, 2, 2)
    for kwargs in ({"cmap": "RdBu_r"}, {"diverging": True}, {"cmap": "coolwarm", "norm": "layer"}):
        im = R.channel_grid(fmap(t), labels=False, tile_size=48, **kwargs)
        cmap = kwargs.get("cmap", "RdBu_r")
        left, top, *_ = im.info["grid"].tile_box(0)
        assert px(im, left + 30, top + 5) == mpl(cmap, 0.5)  # the 0 pixel, top-right
        assert px(im, left + 5, top + 5) == mpl(cmap, 0.0)  # -2 = -max|x|


# -- selections ---------------------------------------------------------------------------------------------------
def _ranked() -> FeatureMap:
    # channel c is constant, with mean = [3, 9, 1, 7, 5, 0, 8, 2, 6, 4][c]
    means = [3, 9, 1, 7, 5, 0, 8, 2, 6, 4]
    t = torch.tensor(means, dtype=torch.float32)[None, :, None, None].expand(1, 10, 6, 6).clone()
    t[0, 5, 0, 0] = 50.0  # channel 5: lowest mean, highest max
    return fmap(t)


def test_top_k_picks_channels_in_order():
    f = _ranked()
    im = R.channel_grid(f, top_k=3, norm=(0, 9), labels=False)
    assert im.info["channels"] == [1, 6, 3]
    g = im.info["grid"]
    assert g.n == 3
    for i, v in enumerate([9, 8, 7]):
        assert px(im, *centre(g.tile_box(i))) == colour(v, 0, 9)
    assert R.channel_grid(f, top_k=1, by="max").info["channels"] == [5]
    assert R.channel_grid(f, channels=[4, 2, 9], top_k=2).info["channels"] == [4, 9]


def test_paging_and_explicit_channels():
    f = _ranked()
    im = R.channel_grid(f, per_page=4, page=2, norm=(0, 9), labels=False)
    assert im.info["channels"] == [8, 9]
    assert px(im, *centre(im.info["grid"].tile_box(0))) == colour(6, 0, 9)  # channel 8 has mean 6
    assert R.channel_grid(f, per_page=4, page=0).info["channels"] == [0, 1, 2, 3]
    with pytest.raises(RenderError, match="page 3 is out of range"):
        R.channel_grid(f, per_page=4, page=3)
    assert R.channel_grid(f, channels=[7, 2]).info["channels"] == [7, 2]
    with pytest.raises(RenderError, match="channel 10 is not in layer"):
        R.channel_grid(f, channels=[10])


def test_top_k_captured_map_keeps_original_numbers():
    t = torch.rand(1, 3, 5, 5)
    f = fmap(t, reduction="topk:3:mean", channels=(40, 7, 12))
    f = FeatureMap(**{**f._fields(), "shape": (1, 64, 5, 5)})
    im = R.channel_grid(f)
    assert im.info["channels"] == [40, 7, 12]
    assert R.channel_grid(f, channels=[12]).info["channels"] == [12]


# -- overlay and side by side ----------------------------------------------------------------------------------------
def test_overlay_lands_where_the_map_is_bright():
    m = torch.zeros(1, 4, 7, 7)
    m[0, :, 0, 0] = 1.0  # only the top-left pixel is bright
    grey = Image.new("RGB", (224, 224), (128, 128, 128))
    out = R.overlay(fmap(m), grey, alpha=0.5, cmap="jet")
    assert out.size == grey.size and out.mode == "RGB"
    hot, cold = mpl("jet", 1.0), mpl("jet", 0.0)

    def blend(c):
        return tuple(int(np.clip(128 * 0.5 + v * 0.5 + 0.5, 0, 255)) for v in c)

    assert px(out, 5, 5) == blend(hot)
    assert px(out, 218, 218) == blend(cold)
    assert px(out, 218, 5) == blend(cold) and px(out, 5, 218) == blend(cold)
    arr = np.asarray(out).astype(int)
    assert arr[:32, :32, 0].mean() > arr[-32:, -32:, 0].mean() + 40  # red corner top-left
    one = R.overlay(fmap(m), np.asarray(grey), channel=2, alpha=1.0)
    assert px(one, 3, 3) == mpl("jet", 1.0)
    with_legend = R.overlay(fmap(m), grey, legend=True)
    assert with_legend.width == 224 and with_legend.height > 224


def test_side_by_side_same_height_and_captions():
    m = fmap(torch.rand(1, 8, 14, 14), "features.5", kind="act", type_="ReLU")
    pic = Image.new("RGB", (200, 100), (10, 200, 10))
    im = R.side_by_side(pic, m, reduce="max")
    assert im.height > 100 and im.width >= 2 * 200
    assert (10, 200, 10) in {px(im, x, 60) for x in range(0, 210)}
    three = R.side_by_side(pic, m, alpha=0.4, height=150)
    assert three.width > im.width
    with pytest.raises(RenderError, match="needs the input picture"):
        R.side_by_side(None, m)


# -- overview and comparisons ----------------------------------------------------------------------------------------
def _run(n: int, prefix: str = "features", value: float | None = None) -> FeatureMaps:
    entries = []
    for i in range(n):
        t = torch.rand(1, 4, 8, 8) if value is None else torch.full((1, 4, 8, 8), value)
        entries.append(fmap(t, f"{prefix}.{i}", index=i))
    entries.append(fmap(torch.rand(1, 10), "classifier", kind="linear", type_="Linear", index=n))
    return FeatureMaps(tuple(entries), model=prefix, mode="conv")


def test_overview_one_tile_per_spatial_layer():
    maps = _run(3)
    im = R.overview(maps, tile_size=40)
    assert [name for name, _ in im.info["tiles"]] == ["features.0", "features.1", "features.2"]
    for _, box in im.info["tiles"]:
        assert box[2] - box[0] == 40 and box[3] - box[1] == 40
    assert max(im.size) <= R.MAX_SIDE
    lin = FeatureMaps((maps["classifier"],))
    with pytest.raises(RenderError, match="no spatial"):
        R.overview(lin)


def test_depth_match_rule():
    assert R.depth_match(5, 13) == [0, 3, 6, 9, 12]
    assert R.depth_match(5, 5) == [0, 1, 2, 3, 4]
    assert R.depth_match(3, 4) == [0, 2, 3]
    assert R.depth_match(1, 4) == [3]


def test_compare_runs_matches_depth_and_scales():
    deep, shallow = _run(13, "vgg", value=1.0), _run(5, "alex", value=3.0)
    im = R.compare_runs({"vgg16": deep, "alexnet": shallow}, tile_size=32, norm="global")
    assert im.info["columns"]["vgg16"] == [f"vgg.{i}" for i in (0, 3, 6, 9, 12)]
    assert im.info["columns"]["alexnet"] == [f"alex.{i}" for i in range(5)]
    assert im.info["scale"] == (0.0, 3.0)
    assert px(im, *centre(im.info["tiles"]["vgg16"][2])) == colour(1.0, 0, 3)
    assert px(im, *centre(im.info["tiles"]["alexnet"][2])) == HIGH
    narrow = R.compare_runs({"a": deep, "b": shallow}, max_columns=2, norm="map")
    assert narrow.info["columns"]["a"] == ["vgg.0", "vgg.12"] and narrow.info["scale"] is None


def test_compare_runs_default_gives_every_tile_its_own_range():
    # layers whose magnitudes differ by 1000x: one global range would flatten the small ones
    def run(scale: float, prefix: str) -> FeatureMaps:
        entries = []
        for i in range(3):
            t = torch.linspace(-1, 1, 64).view(1, 1, 8, 8).repeat(1, 2, 1, 1) * scale * 10**i
            entries.append(fmap(t, f"{prefix}.{i}", index=i))
        return FeatureMaps(tuple(entries), model=prefix, mode="network")

    im = R.compare_runs({"a": run(1.0, "a"), "b": run(0.001, "b")}, tile_size=32)
    assert im.info["scale"] is None
    ranges = im.info["ranges"]
    assert ranges["a"][2] == (pytest.approx(-100.0), pytest.approx(100.0))
    assert ranges["b"][0] == (pytest.approx(-0.001), pytest.approx(0.001))
    for k in ("a", "b"):
        for box in im.info["tiles"][k]:
            tile = np.asarray(im.crop(box))
            assert len({tuple(v) for v in tile.reshape(-1, 3)}) > 20  # structure, not one flat colour


def test_compare_runs_rows_keep_one_kind():
    def chain(mode: str, kinds: list[str]) -> FeatureMaps:
        return FeatureMaps(
            tuple(fmap(torch.rand(1, 2, 8, 8), f"f.{i}", kind=k, index=i) for i, k in enumerate(kinds)), mode=mode
        )

    relu = chain("conv-relu", ["conv", "act"] * 4)
    pool = chain("conv-pool", ["conv", "conv", "pool"] * 2)
    conv = chain("conv", ["conv"] * 4)
    im = R.compare_runs({"conv": conv, "conv-relu": relu, "conv-pool": pool})
    cols = im.info["columns"]
    assert cols["conv-relu"] == ["f.1", "f.3", "f.5", "f.7"]  # the ReLU outputs, every column
    assert cols["conv-pool"] == ["f.0", "f.1", "f.3", "f.4"]  # the conv outputs
    assert cols["conv"] == ["f.0", "f.1", "f.2", "f.3"]


# -- filters ---------------------------------------------------------------------------------------------------------------
def test_filters_rgb_first_layer():
    w = torch.zeros(4, 3, 3, 3)
    w[0, 0] = 1.0  # filter 0: pure red
    w[1, 2] = -1.0  # filter 1: everything but blue
    im = R.filters(w)
    g = im.info["grid"]
    assert g.tile_w == 48  # 3x3 kernels upscaled x16
    assert px(im, *centre(g.tile_box(0))) == (255, 0, 0)
    assert px(im, *centre(g.tile_box(1))) == (255, 255, 0)
    assert px(im, *centre(g.tile_box(2))) == (128, 128, 128)  # constant filter: mid grey
    conv = torch.nn.Conv2d(3, 8, 5)
    assert R.filters(conv, max_filters=6).info["grid"].n == 6


def test_filters_diverging_for_deeper_layers():
    w = torch.zeros(2, 8, 3, 3)
    w[0, :, 0, 0] = 1.0
    w[1, :, 0, 0] = -1.0
    im = R.filters(w)
    g = im.info["grid"]
    assert im.info["scale"] == (-1.0, 1.0)
    left, top, *_ = g.tile_box(0)
    assert px(im, left + 40, top + 40) == mpl("RdBu_r", 0.5)  # zero weights: centre colour
    assert px(im, left + 2, top + 2) == mpl("RdBu_r", 1.0)
    left, top, *_ = g.tile_box(1)
    assert px(im, left + 2, top + 2) == mpl("RdBu_r", 0.0)
    with pytest.raises(RenderError, match="conv weight"):
        R.filters(torch.zeros(3, 3))


# -- colorbar, errors, files -------------------------------------------------------------------------------------------
def test_colorbar():
    bar = R.colorbar("magma", -1.0, 2.0, width=200)
    assert bar.size[0] == 200 and bar.info["scale"] == (-1.0, 2.0)
    row = np.asarray(bar)[bar.height // 4 + 2]
    assert tuple(row[R.PAD + 1]) == mpl("magma", 0.0)


def test_errors_say_what_to_do():
    f = fmap(torch.rand(1, 2, 4, 4))
    with pytest.raises(RenderError, match="unknown norm 'loud'"):
        R.channel_grid(f, norm="loud")
    with pytest.raises(RenderError, match="vmin < vmax"):
        R.channel_grid(f, norm="fixed:1,0")
    with pytest.raises(RenderError, match="unknown colormap 'nope'"):
        R.channel_grid(f, cmap="nope")
    with pytest.raises(RenderError, match=r"needs a spatial \(N, C, H, W\) map"):
        R.channel_grid(fmap(torch.rand(1, 10), kind="linear", type_="Linear"))
    with pytest.raises(RenderError, match="unknown reduce"):
        R.overlay(f, Image.new("RGB", (8, 8)), reduce="median")
    with pytest.raises(RenderError, match="sample 1 is out of range"):
        R.channel_grid(f, sample=1)
    assert issubclass(RenderError, FeatureMapsError) and issubclass(RenderError, ValueError)


def test_png_files(tmp_path):
    a = fmap(torch.rand(1, 5, 9, 9), "features.0", index=0)
    lin = fmap(torch.rand(1, 3), "fc", kind="linear", type_="Linear", index=1)
    b = fmap(torch.randn(1, 3, 6, 6), "block/conv#2", index=2)
    maps = FeatureMaps((a, lin, b))
    paths = R.render_layer_grids(maps, tmp_path / "grids", workers=2)
    assert [p.name for p in paths] == ["000_features.0.png", "002_block_conv_call2.png"]
    for p, e in zip(paths, (a, b)):
        with Image.open(p) as f:
            on_disk = np.asarray(f.convert("RGB"))
        assert np.array_equal(on_disk, np.asarray(R.channel_grid(e, per_page=None)))
    glob = R.render_layer_grids(maps, tmp_path / "g", norm="global", workers=1, rle=False)
    assert len(glob) == 2
    with Image.open(glob[1]) as f:
        assert f.mode == "P"
    im = R.channel_grid(a)
    data = R.to_png_bytes(im)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(im))
    p = R.save_png(im, tmp_path / "x" / "one.png")
    with Image.open(p) as f:
        assert f.size == im.size
    with pytest.raises(RenderError, match="unknown channel_grid option"):
        R.render_layer_grids(maps, tmp_path, colour="red")


def test_render_layer_grids_global_range(tmp_path):
    a = fmap(torch.full((1, 2, 4, 4), 1.0), "a", index=0)
    b = fmap(torch.full((1, 2, 4, 4), 3.0), "b", index=1)
    pa, pb = R.render_layer_grids(FeatureMaps((a, b)), tmp_path, norm="global", labels=False)
    for path, expected in ((pa, colour(1.0, 0, 3)), (pb, HIGH)):
        with Image.open(path) as f:
            im = f.convert("RGB")
        box = R.channel_grid(a, labels=False).info["grid"].tile_box(1)
        assert px(im, *centre(box)) == expected


def test_global_grid_says_it_spans_all_layers():
    a = fmap(torch.full((1, 2, 4, 4), -1.0), "a", index=0)
    one = R.channel_grid(a, norm="global", global_range=(-1.75, 1.5), global_layers=13, labels=False)
    assert one.info["scale"] == (-1.75, 1.5)
    assert one.info["scale_note"] == "scale: one global range [-1.75, 1.5] across 13 layers"
    alone = R.channel_grid(a, norm="global", labels=False)  # no global range given: the layer's own, said so
    assert alone.info["scale"] == (-1.0, -1.0)
    assert "this layer's own range [-1, -1] (no range of the other layers given)" in alone.info["scale_note"]
