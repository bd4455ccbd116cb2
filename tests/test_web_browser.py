"""The viewer page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

The real server runs with uvicorn in a background thread on 127.0.0.1 (a free port). Models have
random weights; nothing is downloaded. Screenshots go to ``artifacts/`` (git-ignored).

``FEATUREMAPS_SCREENSHOT=docs/viewer.png pytest tests/test_web_browser.py -k docs_screenshot``
re-draws the documentation screenshot (VGG16 on the chelsea sample).
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from featuremaps.web import create_app
from featuremaps.web.caches import process_rss
from featuremaps.web.server import ServerThread

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
VIEWPORT = {"width": 1280, "height": 800}
TIMEOUT_MS = 30_000


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = create_app(
        models=("alexnet", "vgg11", "vgg16"),
        weights=("random",),
        run_dir=tmp_path_factory.mktemp("runs"),
        max_cached_models=2,
        # room for VGG16's runs above what this test process already holds (in a whole test session,
        # gigabytes): these tests are about the page, not the budget (tests/test_web_limits.py)
        max_memory=process_rss() + 4 * 2**30,
    )
    with ServerThread(app) as url:
        yield app, url


def write_png(path: Path, size=(120, 96)) -> Path:
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    arr[:, : size[0] // 2] = (30, 140, 220)
    Image.fromarray(arr).save(path)
    return path


def forward_passes(url: str) -> int:
    return httpx.get(url + "api/status", timeout=10).json()["forward_passes"]


ALL_THUMBS_LOADED = """(n) => {
  const imgs = Array.from(document.querySelectorAll('.view .strip .card img'));
  return imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0) ? Date.now() : false;
}"""
IMG_READY = """(sel) => { const i = document.querySelector(sel); return !!i && !i.hidden && i.complete && i.naturalWidth > 0; }"""


def img_src(page, sel: str) -> str:
    return page.eval_on_selector(sel, "i => i.getAttribute('src') || ''")


def wait_img(page, sel: str, contains: str | None = None) -> str:
    if contains is not None:
        page.wait_for_function(
            "([s, c]) => (document.querySelector(s).getAttribute('src') || '').includes(c)", arg=[sel, contains]
        )
    page.wait_for_function(IMG_READY, arg=sel)
    return img_src(page, sel)


def choose(page, model: str, size: str) -> None:
    page.wait_for_selector("#cfg-a .f-model option", state="attached")
    page.select_option("#cfg-a .f-model", model)
    page.fill("#size", size)


# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------
def test_upload_browse_and_redraw_without_rerunning(server, page, tmp_path):
    app, url = server
    page.goto(url)
    choose(page, "alexnet", "96")
    page.set_input_files("#file", str(write_png(tmp_path / "picture.png")))

    # thumbnails of every captured layer, with names and shapes
    page.wait_for_function(ALL_THUMBS_LOADED, arg=5)
    cards = page.locator(".strip .card")
    assert cards.count() == 5
    assert cards.nth(0).locator(".lname").inner_text() == "features.0"
    assert "64×23×23" in cards.nth(0).locator(".lshape").inner_text()
    assert page.locator(".v-random").is_visible()
    assert "not pretrained" in page.locator(".v-random").inner_text()
    page.wait_for_function("() => document.querySelector('#progress-text').textContent === 'done'")
    assert "picture.png" in page.locator(".v-meta").get_attribute("title")
    passes = forward_passes(url)
    assert passes == 1

    # a layer -> its channel grid
    cards.nth(1).click()
    grid_src = wait_img(page, ".grid-img", "/layers/1/grid.png")
    assert "192 channels" in page.locator(".p-text").inner_text()
    assert cards.nth(1).get_attribute("class").split().count("selected") == 1

    # a channel -> large view, value range, overlay
    layout = page.evaluate("app.views[0].grid")
    box = page.locator(".grid-img").bounding_box()
    scale = box["width"] / layout["width"]
    k = layout["cols"] + 2  # second row, third column
    x = box["x"] + (layout["x0"] + layout["sep"] + 2 * layout["cell_w"] + layout["tile_w"] / 2) * scale
    y = box["y"] + (layout["y0"] + layout["sep"] + 1 * layout["cell_h"] + layout["tile_h"] / 2) * scale
    page.mouse.click(x, y)
    channel = layout["channels"][k]
    wait_img(page, ".c-img", f"/channels/{channel}.png")
    assert f"channel {channel}" in page.locator(".c-title").inner_text()
    page.wait_for_function("() => document.querySelector('.c-range').textContent.includes('…')")
    value_text = page.locator(".c-range").inner_text()
    assert value_text.startswith("values") and "mean" in value_text
    assert page.locator(".s-lo").inner_text() not in ("", "low")
    assert page.locator(".grid-mark").is_visible()
    overlay_before = wait_img(page, ".o-img", f"channel={channel}")
    assert "alpha=0.50" in overlay_before

    # the opacity slider redraws the overlay (other pixels, same run)
    page.locator(".alpha").fill("0.85")
    overlay_after = wait_img(page, ".o-img", "alpha=0.85")
    assert overlay_after != overlay_before
    a = httpx.get(url + overlay_before.lstrip("/"), timeout=10).content
    b = httpx.get(url + overlay_after.lstrip("/"), timeout=10).content
    assert (
        np.abs(np.asarray(Image.open(io.BytesIO(a)), float) - np.asarray(Image.open(io.BytesIO(b)), float)).mean() > 1
    )
    assert page.locator(".alpha-out").inner_text() == "0.85"

    # normalization: every picture redraws, the model does not run again
    thumbs_before = [img_src(page, f".strip .card:nth-child({i + 1}) img") for i in range(5)]
    channel_before = img_src(page, ".c-img")
    page.select_option("#norm", "global")
    wait_img(page, ".grid-img", "norm=global")
    wait_img(page, ".c-img", "norm=global")
    page.wait_for_function(ALL_THUMBS_LOADED, arg=5)
    thumbs_after = [img_src(page, f".strip .card:nth-child({i + 1}) img") for i in range(5)]
    assert all(t1 != t2 and "norm=global" in t2 for t1, t2 in zip(thumbs_before, thumbs_after))
    assert img_src(page, ".c-img") != channel_before and img_src(page, ".grid-img") != grid_src
    # the same words as the grid's header: one global range across the run's 5 layers
    page.wait_for_function(
        "() => document.querySelector('.s-mid').textContent.includes('global range across 5 layers')"
    )
    page.select_option("#cmap", "magma")
    wait_img(page, ".grid-img", "cmap=magma")
    page.select_option("#reduce", "max")
    page.wait_for_function(
        "() => document.querySelector('.strip .card img').getAttribute('src').includes('reduce=max')"
    )
    assert forward_passes(url) == passes

    # keyboard: arrows move between layers and channels
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.keyboard.press("ArrowRight")
    page.wait_for_function("() => document.querySelector('.card.selected').dataset.index === '2'")
    wait_img(page, ".grid-img", "/layers/2/grid.png")
    page.keyboard.press("ArrowDown")
    wait_img(page, ".c-img", "/layers/2/channels/0.png")
    page.keyboard.press("ArrowDown")
    wait_img(page, ".c-img", "/layers/2/channels/1.png")
    page.keyboard.press("ArrowUp")
    wait_img(page, ".c-img", "/layers/2/channels/0.png")
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    page.wait_for_function("() => document.querySelector('.card.selected').dataset.index === '0'")

    # the per-layer numbers
    page.click(".tab[data-tab=numbers]")
    rows = page.locator(".numbers tbody tr")
    assert rows.count() == 5 and "features.8" in rows.nth(3).inner_text()
    page.click(".tab[data-tab=channels]")

    # the download link is the run folder
    href = page.locator(".v-download").get_attribute("href")
    assert href.endswith("/download")
    assert httpx.get(url + href.lstrip("/"), timeout=30).headers["content-type"] == "application/zip"

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "viewer-browser-test.png"))
    assert forward_passes(url) == passes


def test_bad_upload_shows_its_error_in_the_page(server, page, tmp_path):
    _, url = server
    page.goto(url)
    choose(page, "alexnet", "96")
    bad = tmp_path / "holiday.png"
    bad.write_text("this is a text file with a picture's name\n" * 10)
    page.set_input_files("#file", str(bad))
    page.wait_for_selector(".v-error:not([hidden])")
    message = page.locator(".v-error").inner_text()
    assert "holiday.png" in message and "not an image" in message
    assert page.locator(".v-state").inner_text() == "failed"
    assert page.locator(".strip .card").count() == 0
    # a wrong choice is explained in the page as well, and the server still works
    page.fill("#size", "5000")
    page.click("#samples button[data-sample=edge]")
    page.wait_for_function("() => document.querySelector('.v-error').textContent.includes('size must be between')")
    page.fill("#size", "96")
    page.click("#run")
    page.wait_for_function(ALL_THUMBS_LOADED, arg=5)
    assert page.locator(".v-error").is_hidden()


def test_side_by_side_runs(server, page):
    _, url = server
    page.goto(url)
    choose(page, "alexnet", "64")
    page.check("#compare")
    page.select_option("#cfg-b .f-model", "vgg11")
    page.select_option("#cfg-b .f-mode", "conv-pool")
    page.click("#samples button[data-sample=edge]")
    page.wait_for_function("() => document.querySelectorAll('.view').length === 2")
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('.view')).every(v => v.querySelectorAll('.card img').length > 0 &&"
        " Array.from(v.querySelectorAll('.card img')).every(i => i.complete && i.naturalWidth > 0))"
    )
    views = page.locator(".view")
    assert views.nth(0).locator(".card").count() == 5
    assert views.nth(1).locator(".card").count() == 8 + 5  # vgg11: 8 convs + 5 max pools
    assert "vgg11" in views.nth(1).locator(".v-model").inner_text()
    wait_img(page, "#compare-img", "/api/compare.png")
    # clicking in B makes B the one the keys move
    views.nth(1).locator(".card").nth(3).click()
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.keyboard.press("ArrowRight")
    page.wait_for_function(
        "() => document.querySelectorAll('.view')[1].querySelector('.card.selected').dataset.index === '4'"
    )
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "viewer-compare.png"))


def test_vgg16_thumbnails_appear_about_a_second_after_the_forward_pass(server, page):
    _, url = server
    page.goto(url)
    choose(page, "vgg16", "")
    page.click("#samples button[data-sample=chelsea]")
    loaded_ms = page.wait_for_function(ALL_THUMBS_LOADED, arg=13, timeout=120_000).json_value()
    run_id = page.evaluate("app.views[0].job.id")
    job = httpx.get(f"{url}api/runs/{run_id}", timeout=10).json()
    assert job["input_size"] == [224, 224]
    delay = loaded_ms / 1000 - job["captured_at"]
    print(
        f"VGG16 at 224: forward pass {job['timings']['capture_s']:.2f} s, all 13 thumbnails shown {delay:.2f} s after it ended"
    )
    assert delay < 1.5


def test_the_header_counts_a_forward_pass_while_the_run_folder_is_still_written(server, page, monkeypatch):
    """The header ("N forward passes · M models loaded") is read again when the forward pass is
    done, not only when the whole run is: it used to say 0 all the while a run was being saved."""
    import threading

    app, url = server
    viewer = app.state.viewer
    gate, real_save = threading.Event(), viewer._save

    def held_save(*args, **kwargs):
        gate.wait(60)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(viewer, "_save", held_save)
    before = forward_passes(url)
    page.goto(url)
    page.wait_for_function("() => /forward pass/.test(document.querySelector('#server-status').textContent)")
    choose(page, "alexnet", "64")
    try:
        page.click("#samples button[data-sample=edge]")
        page.wait_for_function(
            "(n) => document.querySelector('#server-status').textContent.startsWith(`${n} forward pass`)",
            arg=before + 1,
        )
        run_id = page.evaluate("app.views[0].job.id")
        assert httpx.get(f"{url}api/runs/{run_id}", timeout=10).json()["state"] == "rendering"
        assert "alexnet" in " ".join(httpx.get(f"{url}api/status", timeout=10).json()["models_loaded"])
    finally:
        gate.set()
    page.wait_for_function("() => document.querySelector('#progress-text').textContent === 'done'")


def test_pretrained_weights_unavailable_offline_is_shown(page, offline, tmp_path):
    app = create_app(models=("alexnet",), weights=("DEFAULT", "random"), run_dir=tmp_path / "runs")
    with ServerThread(app) as url:
        page.goto(url)
        page.wait_for_selector("#cfg-a .f-weights option", state="attached")
        assert page.locator("#cfg-a .f-weights").input_value() == "DEFAULT"
        assert "not cached" in page.locator("#cfg-a .weights-note").inner_text()
        page.click("#samples button[data-sample=coffee]")
        page.wait_for_selector(".v-error:not([hidden])")
        assert "not cached and cannot be downloaded" in page.locator(".v-error").inner_text()
        assert page.locator(".v-model").inner_text() == "alexnet"
        assert page.locator(".v-state").inner_text() == "failed"
        assert forward_passes(url) == 0


@pytest.mark.skipif(
    not os.environ.get("FEATUREMAPS_SCREENSHOT"), reason="set FEATUREMAPS_SCREENSHOT=path to redraw the docs screenshot"
)
def test_docs_screenshot(server, page):
    _, url = server
    page.goto(url)
    choose(page, "vgg16", "")
    page.click("#samples button[data-sample=chelsea]")
    page.wait_for_function(ALL_THUMBS_LOADED, arg=13, timeout=120_000)
    page.locator(".strip .card").nth(6).click()
    wait_img(page, ".grid-img", "/layers/6/grid.png")
    page.evaluate("app.views[0].selectChannel(37)")
    page.locator(".alpha").fill("0.6")
    wait_img(page, ".c-img", "/channels/37.png")
    wait_img(page, ".o-img", "alpha=0.60")
    page.evaluate("document.activeElement && document.activeElement.blur()")
    time.sleep(0.3)
    target = Path(os.environ["FEATUREMAPS_SCREENSHOT"])
    target.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(target))
