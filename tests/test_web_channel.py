"""The viewer's channel page and CAM panel through FastAPI's TestClient: every endpoint answers what the
library answers for the same question (the atlas's channel view, its crops with their heatmaps, its
distribution picture, an image's full maps, the cached portrait, ``fm.cam`` on the run's picture), and
every bad parameter gets a one-line ``detail`` with the status of its ViewerError class.

Two atlases of the same generated pictures: one of the planted model (a red-square channel and a
vertical-edge channel, given as an object: only the viewer's own pictures can show it), one of
AlexNet with random weights at 64 px (the model the viewer runs, so its runs' channels match it).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx.*")
    from fastapi.testclient import TestClient

import featuremaps as fm
from featuremaps import render
from featuremaps.cam import cam
from featuremaps.portrait import portrait_image
from featuremaps.web import create_app
from test_atlas_model import planted_net, write_planted
from viewer_polling import wait_done

PORTRAIT = {"size": 64, "steps": 3}
PL = "/api/atlases/planted/layers/features.0/channels"


# --------------------------------------------------------------------------------------------------
# fixtures (shared with test_web_channel_browser.py)
# --------------------------------------------------------------------------------------------------
def make_atlases(root: Path) -> tuple[fm.Atlas, Path]:
    """The planted atlas (with its model object) and the AlexNet atlas folder, over the same pictures."""
    write_planted(root / "pics")
    common = {"layers": "features.0,features.3", "workers": 0, "top_k": 5}
    planted = fm.atlas(planted_net(), root / "pics", size=32, out=root / "planted", **common)
    fm.atlas("alexnet", root / "pics", weights="random", size=64, out=root / "alexnet", **common)
    return fm.open_atlas(root / "planted", model=planted.model()), root / "alexnet"


def viewer_app(root: Path, planted: fm.Atlas, alexnet: Path, **kw):
    return create_app(
        models=("alexnet",),
        weights=("random",),
        run_dir=root / "runs",
        atlases=[planted, alexnet],
        portrait_dir=root / "portraits",
        portrait_options=PORTRAIT,
        **kw,
    )


def start_run(client: TestClient, **fields) -> dict:
    data = {"model": "alexnet", "weights": "random", "mode": "network", "size": "64", "sample": "chelsea", **fields}
    r = client.post("/api/runs", data=data)
    assert r.status_code == 202, r.text
    return wait_done(client, r.json()["id"])


@pytest.fixture(scope="module")
def atlases(tmp_path_factory):
    root = tmp_path_factory.mktemp("channel")
    planted, alexnet = make_atlases(root)
    return root, planted, alexnet


@pytest.fixture(scope="module")
def app(atlases):
    root, planted, alexnet = atlases
    return viewer_app(root, planted, alexnet)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def run(client):
    job = start_run(client)
    assert job["state"] == "done", job
    return job


def picture(r) -> np.ndarray:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))


def detail(r, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    text = r.json()["detail"]
    assert isinstance(text, str) and text and "\n" not in text
    return text


# --------------------------------------------------------------------------------------------------
# the page and the atlases
# --------------------------------------------------------------------------------------------------
def test_the_channel_page_and_its_files(client):
    r = client.get("/channel?atlas=planted&layer=features.0&channel=0")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert "/static/channel.js" in r.text and 'id="ch-crops"' in r.text
    assert r.text.index("/static/dom.js") < r.text.index("/static/channel.js")  # the shared helpers load first
    for name in ("channel.js", "channel.css", "extras.js"):
        assert client.get(f"/static/{name}").status_code == 200, name
    index = client.get("/").text
    assert "/static/extras.js" in index and "cam-panel" in index and "c-page" in index


def test_the_served_atlases(client, atlases):
    _, planted, _ = atlases
    body = client.get("/api/atlases").json()["atlases"]
    assert [a["id"] for a in body] == ["planted", "alexnet"]
    first = body[0]
    assert first["model"] == planted.model_name and first["images"] == planted.num_images == 11
    assert [(x["name"], x["channels"]) for x in first["layers"]] == [(x.name, x.channels) for x in planted.layers]
    assert body[1]["model"] == "alexnet" and body[1]["input_size"] == [64, 64]


def test_an_atlas_channel_is_the_librarys_channel_view(client, atlases):
    root, planted, _ = atlases
    body = client.get(f"{PL}/0.json?k=5").json()
    want = planted.channel("features.0", 0, k=5).to_dict()
    assert [(h["rank"], h["image"], h["value"], h["y"], h["x"], h["box"]) for h in body["top"]] == [
        (h["rank"], h["image"], h["value"], h["y"], h["x"], h["box"]) for h in want["top"]
    ]
    assert body["distribution"] == want["distribution"] and body["images"] == want["images"] == 11
    # the planted red channel: its four strongest images are the four red pictures
    assert {Path(h["image"]).name for h in body["top"][:4]} == {
        "a_red.png", "b_red_large.png", "c_red_wide.png", "d_red_corner.png",
    }  # fmt: skip
    hit = body["top"][0]
    assert hit["crop"] == f"{PL}/0/crops/1.png?k=5" and hit["maps"] == f"{PL}/0/top/1/maps.png"
    assert hit["name"] == Path(hit["image"]).name
    assert body["distribution_png"] == f"{PL}/0/distribution.png"
    assert body["can_run"] is False  # a model object: the viewer cannot run it
    assert client.get("/api/atlases/alexnet/layers/features.0/channels/3.json").json()["can_run"] is True
    assert len(client.get(f"{PL}/1.json").json()["top"]) == 9  # k=9 by default, beyond the stored 5


def test_crops_are_the_librarys_crops_with_their_heatmaps(client, atlases):
    _, planted, _ = atlases
    crops = planted.crops("features.0", 0, 5, alpha=0.5, cmap="jet")
    for crop in crops:
        r = crop.hit.rank
        heat = picture(client.get(f"{PL}/0/crops/{r}.png?k=5"))
        bare = picture(client.get(f"{PL}/0/crops/{r}.png?k=5&heat=0"))
        t, le, b, ri = crop.hit.box
        assert heat.shape == bare.shape == (b - t, ri - le, 3)
        assert np.array_equal(heat, np.asarray(crop.heatmap)) and np.array_equal(bare, np.asarray(crop.picture))
        assert not np.array_equal(heat, bare)
    other = planted.crops("features.0", 0, 5, alpha=0.8, cmap="viridis")[0]
    assert np.array_equal(
        picture(client.get(f"{PL}/0/crops/1.png?k=5&alpha=0.8&cmap=viridis")), np.asarray(other.heatmap)
    )


def test_the_distribution_picture_and_an_images_full_maps(client, atlases):
    _, planted, _ = atlases
    dist = planted.distribution("features.0", 0)
    assert np.array_equal(picture(client.get(f"{PL}/0/distribution.png")), np.asarray(dist.picture()))
    assert np.array_equal(picture(client.get(f"{PL}/0/distribution.png?mark=2.5")), np.asarray(dist.picture(mark=2.5)))
    hit = planted.top("features.0", 0, 2)[1]
    maps = planted.maps(hit.image, layers=["features.0"])
    want = render.channel_grid(maps["features.0"], per_page=None, cmap="viridis", palette=True).convert("RGB")
    assert np.array_equal(picture(client.get(f"{PL}/0/top/2/maps.png")), np.asarray(want))


def test_an_atlas_portrait_is_made_in_the_background_and_cached(client, app, atlases):
    root, planted, _ = atlases
    url = f"{PL}/1/portrait"
    state = client.get(url + ".json").json()
    assert state["state"] == "none" and state["url"] is None and state["make"] == url
    assert "no portrait" in detail(client.get(url + ".png"), 404)
    r = client.post(url)
    assert r.status_code == 202 and r.json()["state"] in ("queued", "running", "done")
    assert app.state.insight.portraits.wait(("atlas", "planted", "features.0", 1))["state"] == "done"
    state = client.get(url + ".json").json()
    assert state["state"] == "done" and state["url"] == url + ".png"
    want = portrait_image(planted.model(), "features.0", 1, cache_dir=root / "portraits", compute=False, **PORTRAIT)
    assert want is not None and want.size == (64, 64)
    assert np.array_equal(picture(client.get(url + ".png")), np.asarray(want))


@pytest.mark.parametrize(
    "url, status, words",
    [
        ("/api/atlases/nope/layers/features.0/channels/0.json", 404, "no atlas 'nope'"),
        ("/api/atlases/planted/layers/features.9/channels/0.json", 404, "no layer 'features.9'"),
        (f"{PL}/7.json", 404, "channels 0..1"),
        (f"{PL}/-1.json", 404, "channels 0..1"),
        (f"{PL}/0.json?k=0", 400, "between 1 and 32"),
        (f"{PL}/0.json?k=33", 400, "between 1 and 32"),
        (f"{PL}/0.json?k=x", 422, "k"),
        (f"{PL}/0/crops/0.png", 404, "rank is 1..9"),
        (f"{PL}/0/crops/6.png?k=5", 404, "rank is 1..5"),
        (f"{PL}/0/crops/1.png?alpha=2", 400, "opacity"),
        (f"{PL}/0/crops/1.png?cmap=nope", 400, "colormap"),
        (f"{PL}/0/crops/1.png?heat=2", 400, "heat is 1"),
        (f"{PL}/0/top/0/maps.png", 404, "rank is 1 or more"),
        (f"{PL}/0/top/99/maps.png", 404, "has 11 images"),
        (f"{PL}/0/distribution.png?mark=x", 422, "mark"),
        (f"{PL}/5/portrait.json", 404, "channels 0..1"),
    ],
)
def test_bad_atlas_requests(client, url, status, words):
    assert words in detail(client.get(url), status)


def test_an_atlas_image_opens_as_a_viewer_run_when_the_viewer_runs_its_model(client, atlases):
    _, _, alexnet_folder = atlases
    alexnet = fm.open_atlas(alexnet_folder)
    hit = alexnet.top("features.3", 4, 1)[0]
    r = client.post("/api/atlases/alexnet/layers/features.3/channels/4/top/1/run")
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["page"] == f"/?run={job['id']}&layer=features.3&channel=4"
    assert job["request"]["layers"] == "features.0,features.3" and job["request"]["source"] == Path(hit.image).name
    done = wait_done(client, job["id"])
    assert done["state"] == "done", done
    assert [x["name"] for x in done["layers"]] == ["features.0", "features.3"]
    words = detail(client.post(f"{PL}/0/top/1/run"), 400)
    assert "does not run PlantedNet" in words
    assert "rank is 1 or more" in detail(client.post(f"{PL}/0/top/0/run"), 404)


# --------------------------------------------------------------------------------------------------
# a run's channel page
# --------------------------------------------------------------------------------------------------
def test_a_run_channel_page_lists_the_atlases_of_its_model_and_layer(client, run):
    rid = run["id"]
    body = client.get(f"/api/runs/{rid}/layers/0/channels/3/page.json").json()
    assert body["layer"] == {"index": 0, "name": "features.0", "channels": 64} and body["channel"] == 3
    assert body["model"] == "alexnet" and body["previous"] == f"/channel?run={rid}&layer=0&channel=2"
    assert body["run_page"] == f"/?run={rid}&layer=features.0&channel=3"
    assert [a["id"] for a in body["atlases"]] == ["alexnet"]  # not the planted one: another model
    assert body["atlases"][0]["page"] == "/channel?atlas=alexnet&layer=features.0&channel=3"
    for key in ("channel_png", "overlay_png", "input_png", "channel_json"):
        assert client.get(body[key]).status_code == 200, key
    last = client.get(f"/api/runs/{rid}/layers/0/channels/63/page.json").json()
    assert last["next"] is None and last["previous"].endswith("channel=62")
    index = [x["name"] for x in run["layers"]].index("features.6")
    assert client.get(f"/api/runs/{rid}/layers/{index}/channels/0/page.json").json()["atlases"] == []


def test_bad_run_channel_requests(client, run):
    rid = run["id"]
    n = len(run["layers"])
    assert f"0..{n - 1}" in detail(client.get(f"/api/runs/{rid}/layers/{n}/channels/0/page.json"), 404)
    assert "channels 0..63" in detail(client.get(f"/api/runs/{rid}/layers/0/channels/64/page.json"), 404)
    assert "channels 0..63" in detail(client.get(f"/api/runs/{rid}/layers/0/channels/64/portrait.json"), 404)
    assert detail(client.get("/api/runs/0123456789abcdef/layers/0/channels/0/page.json"), 404)
    assert detail(client.get("/api/runs/nope/cam.json"), 404)
    failed = start_run(client, layers="no_such_layer")
    assert failed["state"] == "failed"
    assert "failed" in detail(client.get(f"/api/runs/{failed['id']}/layers/0/channels/0/page.json"), 409)
    assert "failed" in detail(client.get(f"/api/runs/{failed['id']}/cam.json"), 409)


def test_a_run_portrait_is_the_portrait_of_the_runs_model(client, app, run, tmp_path):
    rid = run["id"]
    url = f"/api/runs/{rid}/layers/0/channels/5/portrait"
    assert client.get(url + ".json").json()["state"] == "none"
    assert client.post(url).status_code == 202
    assert app.state.insight.portraits.wait(("model", "alexnet", "random", "features.0", 5))["state"] == "done"
    assert client.get(url + ".json").json()["url"] == url + ".png"
    got = picture(client.get(url + ".png"))
    # made again from scratch in another cache folder, with the model loaded here
    model = fm.load_model("alexnet", "random")
    want = np.asarray(portrait_image(model, "features.0", 5, cache_dir=tmp_path, **PORTRAIT))
    assert got.shape == want.shape == (64, 64, 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


# --------------------------------------------------------------------------------------------------
# the CAM panel
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def oracle_model():
    return fm.load_model("alexnet", "random", size=64)


def run_picture(client, run_id: str) -> Image.Image:
    return Image.open(io.BytesIO(client.get(f"/api/runs/{run_id}/input.png").content)).convert("RGB")


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam"])
def test_the_cam_is_fm_cam_on_the_runs_picture(client, run, oracle_model, method):
    rid = run["id"]
    body = client.get(f"/api/runs/{rid}/cam.json", params={"method": method, "layer": "features.10"}).json()
    want = cam(oracle_model, run_picture(client, rid), method, layer="features.10")
    assert body["method"] == method and body["layer"] == "features.10" and body["target"] == want.target
    assert body["probability"] == pytest.approx(want.probability, rel=1e-5)
    assert [(c["index"], c["label"]) for c in body["top_classes"]] == [(c.index, c.label) for c in want.classes]
    assert len(body["top_classes"]) == 5
    assert [c["channel"] for c in body["channels"]] == [c for c, _ in want.top_channels(8)]
    for got, (_, value) in zip(body["channels"], want.top_channels(8)):
        assert got["contribution"] == pytest.approx(value, rel=1e-4, abs=1e-9)
    # each breakdown channel links to its layer's grid in this run
    index = [x["name"] for x in run["layers"]].index("features.10")
    assert body["layer_index"] == index and {c["layer_index"] for c in body["channels"]} == {index}
    overlay = picture(client.get(f"/api/runs/{rid}/cam.png", params={"method": method, "layer": "features.10"}))
    assert np.abs(overlay.astype(int) - np.asarray(want.overlay()).astype(int)).max() <= 1


def test_cam_target_default_layer_and_pictures(client, run, oracle_model):
    rid = run["id"]
    default = client.get(f"/api/runs/{rid}/cam.json").json()
    assert default["layer"] == cam(oracle_model, run_picture(client, rid)).layer
    assert default["layer_index"] is None  # the run did not capture that layer: no grid link
    by_index = client.get(f"/api/runs/{rid}/cam.json?target=7&layer=features.10").json()
    assert by_index["target"] == 7 and by_index["label"] == "class 7"
    assert "class 7" in by_index["title"]
    bare = picture(client.get(f"/api/runs/{rid}/cam.png?legend=0&layer=features.10"))
    assert bare.shape == (64, 64, 3)
    r1 = client.get(f"/api/runs/{rid}/cam.png?layer=features.10")
    r2 = client.get(f"/api/runs/{rid}/cam.png?layer=features.10", headers={"If-None-Match": r1.headers["etag"]})
    assert r2.status_code == 304
    methods = client.get("/api/cam/methods").json()["methods"]
    assert [m["id"] for m in methods] == ["gradcam", "gradcam++", "layercam"]


@pytest.mark.parametrize(
    "query, status, words",
    [
        ("method=nope", 400, "unknown CAM method 'nope'"),
        ("target=no+such+class", 400, "no such class"),
        ("target=100000", 400, "100000"),
        ("layer=no.such.layer", 404, "no.such.layer"),
        ("channels=0", 400, "between 1 and 64"),
        ("layer=" + "x" * 201, 400, "at most 200"),
    ],
)
def test_bad_cam_requests(client, run, query, status, words):
    assert words in detail(client.get(f"/api/runs/{run['id']}/cam.json?{query}"), status)


@pytest.mark.parametrize(
    "query, status, words", [("alpha=2", 400, "opacity"), ("cmap=nope", 400, "colormap"), ("legend=3", 400, "legend")]
)
def test_bad_cam_picture_requests(client, run, query, status, words):
    assert words in detail(client.get(f"/api/runs/{run['id']}/cam.png?{query}"), status)


# --------------------------------------------------------------------------------------------------
# create_app and the CLI
# --------------------------------------------------------------------------------------------------
def test_a_folder_that_is_no_atlas_is_refused_before_the_store_is_taken(tmp_path):
    with pytest.raises(fm.FeatureMapsError, match="not found"):
        create_app(models=("alexnet",), weights=("random",), run_dir=tmp_path / "runs", atlases=[tmp_path / "none"])
    # the store was not taken: another viewer can use it
    app = create_app(models=("alexnet",), weights=("random",), run_dir=tmp_path / "runs")
    app.state.viewer.close()


def test_serve_takes_atlas_folders(tmp_path):
    from typer.testing import CliRunner

    from featuremaps.cli import app as cli

    runner = CliRunner()
    assert "--atlas" in runner.invoke(cli, ["serve", "--help"]).output
    r = runner.invoke(cli, ["serve", "--port", "0", "--run-dir", str(tmp_path / "runs"), "--atlas", str(tmp_path)])
    assert r.exit_code == 1
    assert "atlas" in r.output and "Traceback" not in r.output


def test_an_atlas_without_its_model_still_shows_its_numbers_and_says_why_it_draws_no_crops(atlases, tmp_path):
    root, _, _ = atlases
    app = create_app(models=("alexnet",), weights=("random",), run_dir=tmp_path / "runs", atlases=[root / "planted"])
    with TestClient(app) as c:
        body = c.get(f"{PL}/0.json?k=3").json()
        assert [Path(h["image"]).name for h in body["top"]] == ["a_red.png", "b_red_large.png", "c_red_wide.png"]
        assert c.get(f"{PL}/0/distribution.png").status_code == 200
        assert "made with a model object" in detail(c.get(f"{PL}/0/crops/1.png?k=3"), 404)
        state = c.get(f"{PL}/0/portrait.json").json()
        assert state["state"] == "unavailable" and "model object" in state["error"] and state["make"] is None


def test_posts_from_other_sites_are_refused(client, run):
    for url in (f"{PL}/0/portrait", f"/api/runs/{run['id']}/layers/0/channels/0/portrait", f"{PL}/0/top/1/run"):
        r = client.post(url, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403, url


def test_an_evicted_runs_cams_are_forgotten(atlases, tmp_path):
    root, planted, alexnet = atlases
    app = create_app(models=("alexnet",), weights=("random",), run_dir=tmp_path / "runs", max_runs=1)
    with TestClient(app) as c:
        first = start_run(c)
        assert c.get(f"/api/runs/{first['id']}/cam.json").status_code == 200
        cams = app.state.insight.cams
        assert any(k[0] == first["id"] for k in cams._results)
        second = start_run(c)
        assert c.get(f"/api/runs/{first['id']}").status_code == 404
        assert not any(k[0] == first["id"] for k in cams._results)
        assert c.get(f"/api/runs/{second['id']}/cam.json").status_code == 200
