"""The channel page and the CAM panel in headless Chromium (Debian's /usr/bin/chromium, Playwright).

The planted atlas (a red-square channel) and an AlexNet atlas with random weights, over generated
pictures (see test_web_channel.py); the viewer runs AlexNet with random weights at 64 px. Screenshots
go to /tmp (``FEATUREMAPS_SHOTS`` to change it).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest

from featuremaps.web.server import ServerThread
from test_web_channel import make_atlases, viewer_app

pytestmark = pytest.mark.browser

SHOTS = Path(os.environ.get("FEATUREMAPS_SHOTS", "/tmp"))
VIEWPORT = {"width": 1280, "height": 900}
TIMEOUT_MS = 60_000
IMG_READY = """(sel) => { const i = document.querySelector(sel);
  return !!i && !i.hidden && i.complete && i.naturalWidth > 0; }"""
ALL_READY = """([sel, n]) => { const imgs = Array.from(document.querySelectorAll(sel));
  return imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0); }"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("channel-browser")
    planted, alexnet = make_atlases(root)
    app = viewer_app(root, planted, alexnet)
    with ServerThread(app) as url:
        yield app, url


def start_run(page, url: str) -> None:
    """The sample picture through AlexNet (random weights) at 64 px, from the page itself."""
    page.goto(url)
    page.wait_for_selector("#cfg-a .f-model option", state="attached")
    page.select_option("#cfg-a .f-model", "alexnet")
    page.fill("#size", "64")
    page.click("#samples [data-sample='chelsea']")
    page.click("#run")
    page.wait_for_function("() => document.querySelector('#progress-text').textContent === 'done'")


def test_the_atlas_channel_page(server, page):
    app, url = server
    page.goto(url + "channel?atlas=planted&layer=features.0&channel=0&k=5")
    page.wait_for_function(ALL_READY, arg=[".crop img.heat", 5])
    page.wait_for_function(ALL_READY, arg=[".crop img.bare", 5])
    page.wait_for_function(IMG_READY, arg="#ch-dist")
    assert page.locator("#ch-title").inner_text() == "features.0 · channel 0"
    assert page.locator("#ch-top-title").text_content() == "Top 5 images of 11"
    captions = page.locator(".crop .cap").all_inner_texts()
    assert [c.split(" ")[1] for c in captions[:4]] == [
        "a_red.png",
        "b_red_large.png",
        "c_red_wide.png",
        "d_red_corner.png",
    ]
    assert re.match(r"#1 a_red\.png · max 3\.17 at \(\d+, \d+\)", captions[0])
    assert "images11" in page.locator("#ch-dist-numbers").inner_text().replace("\t", "").replace("\n", "")
    # no portrait yet: the button makes one in the background, and the page shows it when done
    assert page.locator("#ch-portrait-state").inner_text() == "no portrait yet"
    page.click("#ch-make")
    page.wait_for_function(IMG_READY, arg="#ch-portrait")
    assert page.locator("#ch-make").is_hidden()
    # the next channel, and an image's full maps
    assert page.locator("#ch-next").get_attribute("href") == "/channel?atlas=planted&layer=features.0&channel=1"
    href = page.locator(".crop[data-rank='1'] .maps-link").get_attribute("href")
    r = httpx.get(url.rstrip("/") + href, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert page.locator(".run-link").count() == 0  # a model object: no viewer run of its images
    page.screenshot(path=str(SHOTS / "featuremaps-channel-atlas.png"), full_page=True)


def test_a_run_channel_page_with_its_atlas_and_back(server, page):
    app, url = server
    start_run(page, url)
    page.locator(".strip .card").nth(1).click()  # features.3
    page.wait_for_function(IMG_READY, arg=".grid-img")
    page.keyboard.press("ArrowDown")  # channel 0
    page.wait_for_selector(".c-page:not([hidden])")
    link = page.locator(".c-page").get_attribute("href")
    assert re.fullmatch(r"/channel\?run=[0-9a-f]{16}&layer=1&channel=0", link), link
    page.click(".c-page")
    page.wait_for_url(re.compile(r"/channel\?run="))
    page.wait_for_function(IMG_READY, arg="#ch-map")
    page.wait_for_function(IMG_READY, arg="#ch-overlay")
    page.wait_for_function(ALL_READY, arg=[".crop img.heat", 9])
    page.wait_for_function(IMG_READY, arg="#ch-dist")
    assert page.locator("#ch-title").inner_text() == "features.3 · channel 0 of 192"
    assert "alexnet" in page.locator("#ch-meta").inner_text()
    assert "atlas alexnet" in page.locator("#ch-top-note").inner_text()
    assert page.locator("#ch-values").inner_text().startswith("values ")
    page.wait_for_selector("#ch-portrait-section[data-state='none']")
    page.screenshot(path=str(SHOTS / "featuremaps-channel-run.png"), full_page=True)
    # an atlas image opens as a viewer run, on that layer and channel
    page.locator(".crop[data-rank='2'] .run-link").click()
    page.wait_for_url(re.compile(r"/\?run=[0-9a-f]{16}&layer=features\.3&channel=0"))
    page.wait_for_function("() => document.querySelector('#progress-text').textContent === 'done'")
    page.wait_for_function("() => document.querySelector('.c-title').textContent === 'features.3 · channel 0'")
    page.wait_for_function(IMG_READY, arg=".c-img")
    assert page.locator(".strip .card").count() == 2  # the atlas's layers


def test_the_cam_panel(server, page):
    app, url = server
    start_run(page, url)
    page.click(".cam-toggle")
    page.wait_for_function(IMG_READY, arg=".cam-img")
    rows = page.locator(".cam-top5 tr")
    rows.nth(4).wait_for()
    assert rows.count() == 5
    texts = rows.all_inner_texts()
    assert all(re.match(r"class \d+\s+\d+\.\d+%", t) for t in texts), texts
    assert "Grad-CAM of class" in page.locator(".cam-title").inner_text()
    # a layer the run captured: the breakdown channels link to their tiles in the grid
    page.fill(".cam-layer", "features.10")
    page.select_option(".cam-method", "layercam")
    page.wait_for_function("() => document.querySelector('.cam-title').textContent.startsWith('LayerCAM')")
    page.wait_for_function(ALL_READY, arg=[".cam-ch img", 8])
    first = page.locator(".cam-ch").first
    channel = first.get_attribute("data-channel")
    first.click()
    page.wait_for_function(
        "(c) => document.querySelector('.c-title').textContent === `features.10 · channel ${c}`", arg=channel
    )
    page.wait_for_function(IMG_READY, arg=".c-img")
    assert page.locator(".card.selected .lname").inner_text() == "features.10"
    # another target from the top-5
    target = page.locator(".cam-top5 tr").nth(2).get_attribute("data-index")
    page.locator(".cam-top5 tr").nth(2).click()
    page.wait_for_function(
        "(t) => document.querySelector('.cam-title').textContent.includes(`class ${t} `)", arg=target
    )
    page.wait_for_function(IMG_READY, arg=".cam-img")
    page.screenshot(path=str(SHOTS / "featuremaps-cam-panel.png"), full_page=True)


def test_bad_channel_addresses_say_what_to_do(server, page):
    app, url = server
    page.goto(url + "channel?atlas=planted&layer=features.9&channel=0")
    page.wait_for_selector("#ch-error:not([hidden])")
    assert "no layer 'features.9'" in page.locator("#ch-error").inner_text()
    page.goto(url + "channel")
    page.wait_for_selector("#ch-error:not([hidden])")
    assert "/channel?run=ID" in page.locator("#ch-error").inner_text()
