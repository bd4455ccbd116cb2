"""The viewer's HTTP API through FastAPI's TestClient: every endpoint and every error status.

Runs use small torchvision models with random weights at a small input size, so nothing is
downloaded and every run takes a fraction of a second.
"""

from __future__ import annotations

import io
import json
import struct
import threading
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

with warnings.catch_warnings():  # starlette's notice about httpx is not ours
    warnings.filterwarnings("ignore", message=".*httpx.*")
    from fastapi.testclient import TestClient

from featuremaps import runs
from featuremaps.web import create_app
from featuremaps.web import server as web_server
from viewer_polling import wait_done

SIZE = "64"


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def png_bytes(size=(96, 80), color=(200, 60, 30), fmt="PNG") -> bytes:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    arr[: size[1] // 2] = color
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 8000, height: int = 6000) -> bytes:
    """A valid grayscale PNG of width x height black pixels: tens of KB that decode to ~50 MB."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def start_run(client: TestClient, **fields) -> dict:
    data = {"model": "alexnet", "weights": "random", "mode": "network", "size": SIZE}
    files = None
    upload = fields.pop("upload", None)
    data.update({k: v for k, v in fields.items() if v is not None})
    if upload is not None:
        files = {"image": upload}
    elif "sample" not in data:
        data["sample"] = "chelsea"
    r = client.post("/api/runs", data=data, files=files)
    assert r.status_code == 202, r.text
    return r.json()


def forward_passes(client: TestClient) -> int:
    return client.get("/api/status").json()["forward_passes"]


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return create_app(
        models=("alexnet", "vgg11", "resnet18"),
        weights=("random",),
        run_dir=tmp_path_factory.mktemp("viewer-runs"),
        max_runs=8,
        max_upload_bytes=200_000,
        max_cached_models=2,
    )


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def run(client):
    job = start_run(client)
    done = wait_done(client, job["id"])
    assert done["state"] == "done", done
    return done


# --------------------------------------------------------------------------------------------------
# page, options, status
# --------------------------------------------------------------------------------------------------
def test_index_and_static_files(client):
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "featuremaps" in r.text and "/static/app.js" in r.text
    assert r.text.index("/static/dom.js") < r.text.index("/static/app.js")  # the shared helpers load first
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for name, kind in (
        ("dom.js", "javascript"), ("app.js", "javascript"), ("style.css", "text/css"), ("index.html", "text/html")
    ):  # fmt: skip
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"], name
    assert client.get("/static/nothing.js").status_code == 404


def test_options_lists_every_choice(client):
    o = client.get("/api/options").json()
    assert [m["name"] for m in o["models"]] == ["alexnet", "vgg11", "resnet18"]
    assert [w["id"] for w in o["weights"]] == ["random"]
    assert o["weights"][0]["pretrained"] is False
    assert o["weights"][0]["label"] == "random (not pretrained)"
    assert o["modes"] == ["network", "conv", "conv-relu", "conv-pool"]
    assert set(o["reductions"]) >= {"mean", "max", "l2", "std"}
    assert o["norms"] == ["map", "layer", "global"]
    assert "viridis" in o["cmaps"] and "RdBu_r" in o["cmaps"]
    assert "chelsea" in o["samples"] and "edge" in o["samples"]
    assert o["limits"]["max_upload_bytes"] == 200_000


def test_status(client):
    s = client.get("/api/status").json()
    assert {"forward_passes", "models_loaded", "runs", "pending"} <= set(s)


# --------------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------------
def test_run_from_sample_goes_through_its_states(client, run):
    assert run["state"] == "done" and run["error"] is None
    assert run["model"] == "alexnet" and run["mode"] == "network"
    assert run["pretrained"] is False and run["weights"].startswith("random")
    assert run["input_size"] == [64, 64]
    assert run["source"] == "sample:chelsea"
    names = [layer["name"] for layer in run["layers"]]
    assert names == ["features.0", "features.3", "features.6", "features.8", "features.10"]
    first = run["layers"][0]
    assert first["shape"][:2] == [1, 64] and first["kind"] == "conv" and first["spatial"]
    assert {"min", "max", "mean", "std", "zero_fraction", "dead_fraction"} <= set(first["stats"])
    assert {"load_s", "capture_s", "save_s"} <= set(run["timings"])
    listed = client.get("/api/runs").json()["runs"]
    assert run["id"] in [r["id"] for r in listed]


def test_run_from_upload(client):
    job = start_run(client, upload=("cat.png", png_bytes(), "image/png"), mode="conv-pool", layers="conv")
    assert job["state"] in ("queued", "loading", "running", "rendering", "done")
    done = wait_done(client, job["id"])
    assert done["state"] == "done", done
    assert done["source"] == "cat.png" and done["mode"] == "conv-pool"
    assert all(layer["kind"] == "conv" for layer in done["layers"])
    r = client.get(f"/api/runs/{job['id']}/input.png")
    assert r.status_code == 200
    assert Image.open(io.BytesIO(r.content)).size == (64, 64)


def test_layer_choice_all_includes_non_spatial_layers(client):
    done = wait_done(client, start_run(client, layers="all", size="64")["id"])
    assert done["state"] == "done", done
    flat = [layer for layer in done["layers"] if not layer["spatial"]]
    assert flat and flat[-1]["kind"] == "linear"
    i = done["layers"].index(flat[-1])
    r = client.get(f"/api/runs/{done['id']}/layers/{i}/thumb.png")
    assert r.status_code == 400 and "no maps to draw" in r.json()["detail"]
    assert client.get(f"/api/runs/{done['id']}/layers/{i}").status_code == 200


def test_mode_that_does_not_fit_the_model_fails_with_its_message(client):
    done = wait_done(client, start_run(client, model="resnet18", mode="conv", size="64")["id"])
    assert done["state"] == "failed"
    assert done["error_type"] == "LayerError"
    assert "network" in done["error"] and "\n" not in done["error"]
    r = client.get(f"/api/runs/{done['id']}/layers/0/thumb.png")
    assert r.status_code == 409
    assert client.get(f"/api/runs/{done['id']}/download").status_code == 409


# --------------------------------------------------------------------------------------------------
# pictures, caching
# --------------------------------------------------------------------------------------------------
def _png(r) -> Image.Image:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    im = Image.open(io.BytesIO(r.content))
    im.load()
    return im


def test_every_picture_endpoint_draws_without_running_the_model(client, run):
    base = f"/api/runs/{run['id']}"
    before = forward_passes(client)
    thumb = _png(client.get(f"{base}/layers/0/thumb.png?reduce=max&norm=map&cmap=magma"))
    assert thumb.size == (15, 15)  # alexnet features.0 at 64x64 input
    grid = _png(client.get(f"{base}/layers/1/grid.png?norm=layer&cmap=gray&page=1&per_page=64"))
    layout = client.get(f"{base}/layers/1/grid.json?norm=layer&cmap=gray&page=1&per_page=64").json()
    assert (layout["width"], layout["height"]) == grid.size
    assert layout["total"] == 192 and layout["pages"] == 3 and layout["channels"][0] == 64
    assert len(layout["channels"]) == layout["n"] == 64
    top = client.get(f"{base}/layers/1/grid.json?top_k=5").json()
    assert top["n"] == 5 and top["total"] == 5
    chan = _png(client.get(f"{base}/layers/2/channels/7.png?norm=global&cmap=RdBu_r"))
    assert chan.size == (3, 3)
    info = client.get(f"{base}/layers/2/channels/7.json?norm=global&cmap=RdBu_r").json()
    assert info["channel"] == 7 and info["min"] <= info["mean"] <= info["max"]
    assert info["scale"][0] == pytest.approx(-info["scale"][1])  # diverging colormap: centred on 0
    overlay = _png(client.get(f"{base}/layers/2/overlay.png?channel=7&alpha=0.3"))
    assert overlay.size == (64, 64)
    reduced = _png(client.get(f"{base}/layers/2/overlay.png?reduce=l2&alpha=0.8"))
    assert reduced.size == (64, 64)
    layer = client.get(f"{base}/layers/2").json()
    assert layer["name"] == "features.6" and len(layer["channel_stats"]["max"]) == layer["channels"] == 384
    assert _png(client.get(f"{base}/input.png")).size == (64, 64)
    assert _png(client.get("/api/cmaps/viridis.png")).size == (256, 1)
    assert _png(client.get("/api/samples/chelsea.png")).width <= 256
    assert forward_passes(client) == before


def test_display_switches_change_the_pictures(client, run):
    base = f"/api/runs/{run['id']}/layers/1"
    a = client.get(f"{base}/channels/3.png?norm=map").content
    b = client.get(f"{base}/channels/3.png?norm=layer").content
    c = client.get(f"{base}/channels/3.png?norm=map&cmap=gray").content
    assert len({a, b, c}) == 3
    o1 = client.get(f"{base}/overlay.png?channel=3&alpha=0.2").content
    o2 = client.get(f"{base}/overlay.png?channel=3&alpha=0.9").content
    assert o1 != o2
    t1 = client.get(f"{base}/thumb.png?reduce=mean").content
    t2 = client.get(f"{base}/thumb.png?reduce=std").content
    assert t1 != t2


def test_etag_and_304(client, run):
    url = f"/api/runs/{run['id']}/layers/0/thumb.png?norm=global"
    r = client.get(url)
    etag = r.headers["etag"]
    assert "immutable" in r.headers["cache-control"]
    again = client.get(url, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == etag
    assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
    other = client.get(url.replace("global", "map"))
    assert other.headers["etag"] != etag
    # run-independent JSON is cached the same way
    j = client.get(f"/api/runs/{run['id']}/layers/0")
    assert (
        client.get(f"/api/runs/{run['id']}/layers/0", headers={"If-None-Match": j.headers["etag"]}).status_code == 304
    )
    # job state is never cached
    assert client.get(f"/api/runs/{run['id']}").headers["cache-control"] == "no-store"


def test_runs_are_read_back_from_disk_when_dropped_from_memory(client, app, run):
    before = forward_passes(client)
    viewer = app.state.viewer
    url = f"/api/runs/{run['id']}/layers/4/channels/11.png?cmap=inferno"
    first = _png(client.get(url))
    viewer.cache.drop(lambda key: key[0] == run["id"])
    viewer.png_cache.drop_prefix(run["id"] + "|")
    assert (run["id"], "data") not in viewer.cache
    again = _png(client.get(url))
    assert again.size == (3, 3) and np.array_equal(np.asarray(first), np.asarray(again))
    assert (run["id"], "data") in viewer.cache
    assert forward_passes(client) == before


# --------------------------------------------------------------------------------------------------
# the run folder
# --------------------------------------------------------------------------------------------------
def test_download_is_the_run_folder(client, run, tmp_path):
    r = client.get(f"/api/runs/{run['id']}/download")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert "attachment" in r.headers["content-disposition"] and run["id"] in r.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        names = zf.namelist()
        zf.extractall(tmp_path)
    top = f"{run['id']}/"
    for need in ("manifest.json", "input.png", "index.html", "overview.png"):
        assert top + need in names
    assert sum(n.startswith(top + "maps/") and n.endswith(".npy") for n in names) == 5
    manifest = runs.read_manifest(tmp_path / run["id"])
    assert manifest["model"] == "alexnet" and manifest["viewer_run_id"] == run["id"]
    back = runs.load_run(tmp_path / run["id"])
    assert back.names == [layer["name"] for layer in run["layers"]]


def test_run_files(client, run):
    r = client.get(f"/api/runs/{run['id']}/files/manifest.json")
    assert r.status_code == 200 and json.loads(r.content)["schema_version"] == 1
    assert _png(client.get(f"/api/runs/{run['id']}/files/overview.png")).width > 100
    assert client.get(f"/api/runs/{run['id']}/files/index.html").status_code == 200
    assert client.get(f"/api/runs/{run['id']}/files/nothing.txt").status_code == 404
    assert client.get(f"/api/runs/{run['id']}/files/maps").status_code == 404  # a folder


@pytest.mark.parametrize(
    "path",
    [
        "/static/..%2F..%2F..%2Fpyproject.toml",
        "/static/%2e%2e/app.py",
        "/static/..%2Fapp.py",
        "/api/runs/..%2F..%2Fetc%2Fpasswd",
        "/api/runs/..%2F..%2Fetc/input.png",
        "/api/runs/%2e%2e/download",
        "/api/runs/RUN/files/..%2F..%2F..%2Fetc%2Fpasswd",
        "/api/runs/RUN/files/..%2Fmanifest.json",
        "/api/runs/RUN/files/%2Fetc%2Fpasswd",
        "/api/runs/RUN/files/maps%2F..%2F..%2Fmanifest.json",
        "/api/runs/RUN/files/.hidden",
        "/api/runs/RUN/files/..\\manifest.json",
        "/api/runs/0123456789abcdeg/download",
        "/api/runs/0123456789ABCDEF/download",
    ],
)
def test_path_traversal_is_404(client, run, path):
    r = client.get(path.replace("RUN", run["id"]))
    assert r.status_code == 404, (path, r.status_code, r.text[:200])


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
def test_unknown_run_is_404(client):
    for url in (
        "/api/runs/0123456789abcdef",
        "/api/runs/0123456789abcdef/layers/0/thumb.png",
        "/api/runs/0123456789abcdef/download",
        "/api/runs/nothing/input.png",
    ):
        r = client.get(url)
        assert r.status_code == 404, url
        assert r.json()["detail"]


@pytest.mark.parametrize(
    ("fields", "status", "words"),
    [
        ({"model": "resnet50"}, 400, "not offered"),
        ({"model": "../../etc/passwd"}, 400, "not offered"),
        ({"model": "os:system"}, 400, "not offered"),
        ({"weights": "DEFAULT"}, 400, "not offered"),
        ({"weights": "/tmp/evil.pth"}, 400, "not offered"),
        ({"weights": "checkpoint:nope"}, 400, "checkpoint"),
        ({"mode": "deconv"}, 422, "mode"),
        ({"size": "big"}, 422, "size"),
        ({"size": "4096"}, 422, "size"),
        ({"layers": "features.0;rm -rf"}, 422, "layers"),
        ({"sample": "nothing"}, 400, "sample"),
        ({"sample": "../../pyproject.toml"}, 400, "sample"),
        ({"sample": ""}, 400, "no image"),
    ],
)
def test_bad_run_requests(client, fields, status, words):
    data = {"model": "alexnet", "weights": "random", "mode": "network", "sample": "chelsea", "size": SIZE}
    data.update(fields)
    r = client.post("/api/runs", data=data)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and words in detail and "\n" not in detail


def test_file_and_sample_together_is_400(client):
    r = client.post(
        "/api/runs",
        data={"model": "alexnet", "weights": "random", "sample": "edge"},
        files={"image": ("a.png", png_bytes(), "image/png")},
    )
    assert r.status_code == 400 and "either" in r.json()["detail"]


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("notes.png", b"this is a text file, not a picture\n" * 20, "not an image"),
        ("empty.png", b"", "empty"),
        ("cut.png", png_bytes(size=(120, 90))[:300], "truncated or corrupt"),
        ("cut.jpg", png_bytes(size=(120, 90), fmt="JPEG")[:400], "truncated or corrupt"),
    ],
)
def test_bad_uploads_are_400_with_a_message(client, name, content, words):
    before = client.get("/api/status").json()
    r = client.post(
        "/api/runs", data={"model": "alexnet", "weights": "random"}, files={"image": (name, content, "image/png")}
    )
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert words in detail and "\n" not in detail
    assert client.get("/api/status").json()["pending"] == before["pending"]


def test_decompression_bomb_is_400(client):
    bomb = png_bomb()
    assert len(bomb) < 200_000
    r = client.post(
        "/api/runs", data={"model": "alexnet", "weights": "random"}, files={"image": ("bomb.png", bomb, "image/png")}
    )
    assert r.status_code == 400, r.text
    assert "pixels" in r.json()["detail"]
    assert client.get("/api/status").status_code == 200


def test_too_large_upload_is_413(client):
    big = b"\x89PNG\r\n\x1a\n" + bytes(300_000)
    r = client.post(
        "/api/runs", data={"model": "alexnet", "weights": "random"}, files={"image": ("big.png", big, "image/png")}
    )
    assert r.status_code == 413
    assert "limit" in r.json()["detail"]
    # slightly over the file limit but under the body limit (form overhead) is caught too
    r = client.post(
        "/api/runs",
        data={"model": "alexnet", "weights": "random"},
        files={"image": ("big.png", bytes(200_001), "image/png")},
    )
    assert r.status_code == 413
    assert client.get("/api/status").status_code == 200


def test_chunked_upload_over_the_limit_is_413(client):
    def body():
        boundary = b"--xyz\r\n"
        yield (
            boundary
            + b'Content-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
        )
        for _ in range(40):
            yield bytes(10_000)
        yield b"\r\n--xyz--\r\n"

    r = client.post("/api/runs", content=body(), headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413


@pytest.mark.parametrize(
    ("query", "status", "words"),
    [
        ("layers/0/thumb.png?norm=bogus", 400, "norm"),
        ("layers/0/thumb.png?norm=fixed:1,0", 400, "vmin < vmax"),
        ("layers/0/thumb.png?cmap=hot_pink", 400, "colormap"),
        ("layers/0/thumb.png?reduce=median", 400, "reduction"),
        ("layers/0/grid.png?per_page=0", 400, "per_page"),
        ("layers/0/grid.png?page=99", 400, "page"),
        ("layers/0/grid.json?tile=9999", 400, "tile"),
        ("layers/0/grid.png?page=-1", 400, "page must be 0 or more"),
        ("layers/0/grid.json?per_page=9999", 400, "per_page"),
        ("layers/0/grid.png?top_k=0", 400, "top_k must be 1 or more"),
        ("layers/0/grid.json?cmap=hot_pink", 400, "colormap"),
        ("layers/0/overlay.png?alpha=2", 400, "alpha"),
        ("layers/0/overlay.png?channel=x", 400, "channel"),
        ("layers/0/channels/999.png", 404, "channel"),
        ("layers/0/channels/-1.png", 404, "channel"),
        ("layers/99/thumb.png", 404, "layer"),
        ("layers/99", 404, "layer"),
        ("layers/x/thumb.png", 422, "index"),
    ],
)
def test_bad_picture_parameters(client, run, query, status, words):
    r = client.get(f"/api/runs/{run['id']}/{query}")
    assert r.status_code == status, (query, r.text)
    assert words in r.json()["detail"]


def test_fixed_norm_is_accepted(client, run):
    r = client.get(f"/api/runs/{run['id']}/layers/0/channels/0.json?norm=fixed:-1,1")
    assert r.status_code == 200 and r.json()["scale"] == [-1.0, 1.0]


def test_cross_site_post_is_refused(client):
    r = client.post(
        "/api/runs",
        data={"model": "alexnet", "weights": "random", "sample": "edge"},
        headers={"Origin": "http://evil.example"},
    )
    assert r.status_code == 403


def test_compare_two_runs(client, run):
    other = wait_done(client, start_run(client, model="vgg11", size="64")["id"])
    assert other["state"] == "done", other
    im = _png(client.get(f"/api/compare.png?runs={run['id']},{other['id']}"))
    assert im.width > 200
    assert client.get(f"/api/compare.png?runs={run['id']}").status_code == 400
    assert client.get(f"/api/compare.png?runs={run['id']},0123456789abcdef").status_code == 404


# --------------------------------------------------------------------------------------------------
# separate apps: limits, offline weights, eviction, checkpoints, serve()
# --------------------------------------------------------------------------------------------------
def test_pretrained_weights_offline_fail_with_the_library_message(offline, tmp_path):
    app = create_app(models=("alexnet",), weights=("DEFAULT", "random"), run_dir=tmp_path / "runs")
    with TestClient(app) as c:
        options = c.get("/api/options").json()
        assert options["models"][0]["pretrained_cached"] is False
        job = start_run(c, weights="DEFAULT")
        done = wait_done(c, job["id"])
        assert done["state"] == "failed"
        assert done["error_type"] == "WeightsUnavailableError"
        assert "not cached and cannot be downloaded" in done["error"]
        assert "weights='random'" in done["error"] or "--weights random" in done["error"]
        assert "layers" not in done or not done["layers"]
        assert c.get("/api/status").json()["forward_passes"] == 0  # never silently random
        assert c.get(f"/api/runs/{job['id']}/layers/0/thumb.png").status_code == 409
        assert not (tmp_path / "runs" / job["id"]).exists()


def test_runs_beyond_max_runs_are_evicted_oldest_first(tmp_path):
    app = create_app(models=("alexnet",), weights=("random",), run_dir=tmp_path, max_runs=2)
    with TestClient(app) as c:
        ids = []
        for _ in range(3):
            ids.append(start_run(c, size="64")["id"])
            assert wait_done(c, ids[-1])["state"] == "done"
        assert c.get(f"/api/runs/{ids[0]}").status_code == 404
        assert c.get(f"/api/runs/{ids[0]}/layers/0/thumb.png").status_code == 404
        assert not (tmp_path / ids[0]).exists()
        assert (tmp_path / ids[1]).is_dir() and (tmp_path / ids[2]).is_dir()
        assert [r["id"] for r in c.get("/api/runs").json()["runs"]] == [ids[2], ids[1]]


def test_a_new_viewer_adopts_its_runs_and_leaves_other_folders_alone(tmp_path):
    (tmp_path / "my-notes").mkdir()
    (tmp_path / "0123456789abcdef").mkdir()  # looks like a run id, but is not a viewer run
    app = create_app(models=("alexnet",), weights=("random",), run_dir=tmp_path, max_runs=1)
    with TestClient(app) as c:
        rid = start_run(c, size="64")["id"]
        assert wait_done(c, rid)["state"] == "done"
    app2 = create_app(models=("alexnet",), weights=("random",), run_dir=tmp_path, max_runs=1)
    with TestClient(app2) as c2:
        job = c2.get(f"/api/runs/{rid}").json()
        assert job["state"] == "done" and job["model"] == "alexnet" and len(job["layers"]) == 5
        assert c2.get(f"/api/runs/{rid}/layers/0/grid.png").status_code == 200
        assert c2.get("/api/status").json()["forward_passes"] == 0
    assert (tmp_path / "my-notes").is_dir() and (tmp_path / "0123456789abcdef").is_dir()


def test_own_temporary_run_dir_is_removed_on_shutdown():
    app = create_app(models=("alexnet",), weights=("random",))
    root = app.state.run_dir
    with TestClient(app) as c:
        assert c.get("/api/options").status_code == 200
        assert root.is_dir()
    assert not root.exists()


def test_two_apps_share_nothing(tmp_path):
    a = create_app(models=("alexnet",), weights=("random",), run_dir=tmp_path / "a")
    b = create_app(models=("alexnet",), weights=("random",), run_dir=tmp_path / "b")
    assert a.state.viewer is not b.state.viewer
    with TestClient(a) as ca, TestClient(b) as cb:
        rid = start_run(ca, size="64")["id"]
        assert wait_done(ca, rid)["state"] == "done"
        assert cb.get(f"/api/runs/{rid}").status_code == 404
        assert cb.get("/api/status").json()["forward_passes"] == 0


TINY_MODEL = """
import torch
from torch import nn

def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3, padding=1))
"""


def test_checkpoints_are_chosen_by_key_and_shown_without_their_path(tmp_path):
    (tmp_path / "tinymodel.py").write_text(TINY_MODEL)
    spec = f"{tmp_path / 'tinymodel.py'}:build"
    torch.manual_seed(3)
    import importlib.util

    mod_spec = importlib.util.spec_from_file_location("tinymodel_for_test", tmp_path / "tinymodel.py")
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    torch.save(module.build().state_dict(), tmp_path / "good.pth")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "bad.pth")
    app = create_app(
        models=(spec,),
        weights=("random",),
        checkpoints={"trained": tmp_path / "good.pth", "broken": tmp_path / "bad.pth"},
        run_dir=tmp_path / "runs",
    )
    with TestClient(app) as c:
        weights = c.get("/api/options").json()["weights"]
        assert [w["id"] for w in weights] == ["random", "checkpoint:broken", "checkpoint:trained"]
        assert [w["label"] for w in weights] == ["random (not pretrained)", "checkpoint broken", "checkpoint trained"]
        done = wait_done(c, start_run(c, model=spec, weights="checkpoint:trained", size="64")["id"])
        assert done["state"] == "done", done
        assert done["pretrained"] is True and done["weights"] == "checkpoint:trained"
        assert str(tmp_path) not in json.dumps(done["layers"]) + done["weights"]
        bad = wait_done(c, start_run(c, model=spec, weights="checkpoint:broken", size="64")["id"])
        assert bad["state"] == "failed" and bad["error_type"] == "ModelError"
        r = c.post("/api/runs", data={"model": spec, "weights": str(tmp_path / "good.pth"), "sample": "edge"})
        assert r.status_code == 400


def test_create_app_checks_its_allow_lists():
    from featuremaps.errors import ModelError

    with pytest.raises(ModelError, match="unknown model"):
        create_app(models=("not_a_model",))
    with pytest.raises(ModelError, match="checkpoints"):
        create_app(weights=("/tmp/weights.pth",))
    with pytest.raises(ModelError, match="at least one"):
        create_app(weights=())


def test_busy_server_answers_429_and_runs_queue(tmp_path):
    app = create_app(models=("alexnet",), weights=("random",), run_dir=tmp_path, max_pending=1, workers=1)
    gate = threading.Event()
    models = app.state.viewer.models
    real = models._loader

    def slow_loader(*args, **kwargs):
        gate.wait(20)
        return real(*args, **kwargs)

    models._loader = slow_loader
    with TestClient(app) as c:
        first = start_run(c, size="64")
        r = c.post("/api/runs", data={"model": "alexnet", "weights": "random", "sample": "edge", "size": "32"})
        assert r.status_code == 429 and r.headers["retry-after"]
        assert c.get(f"/api/runs/{first['id']}").json()["state"] == "loading"
        gate.set()
        assert wait_done(c, first["id"])["state"] == "done"
        assert start_run(c, size="64")["state"] in ("queued", "loading", "running", "rendering", "done")


def test_one_forward_pass_at_a_time_per_model(tmp_path, monkeypatch):
    import featuremaps.web.jobs as jobs

    active, peak = [0], [0]
    lock = threading.Lock()
    real_capture = jobs.capture

    def counting_capture(*args, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.15)
            return real_capture(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(jobs, "capture", counting_capture)
    app = create_app(models=("alexnet",), weights=("random",), run_dir=tmp_path, workers=4)
    with TestClient(app) as c:
        ids = [start_run(c, size="64")["id"] for _ in range(4)]
        assert all(wait_done(c, i)["state"] == "done" for i in ids)
        assert c.get("/api/status").json()["forward_passes"] == 4
        assert c.get("/api/status").json()["model_loads"] == 1
    assert peak[0] == 1


def test_allowed_hosts(tmp_path):
    app = create_app(
        models=("alexnet",), weights=("random",), run_dir=tmp_path, allowed_hosts=["127.0.0.1", "localhost"]
    )
    with TestClient(app, base_url="http://127.0.0.1:8765") as c:
        assert c.get("/api/options").status_code == 200
    with TestClient(app, base_url="http://attacker.example") as c:
        assert c.get("/api/options").status_code == 400


class _FakeServer:
    def __init__(self):
        self.sockets = None

    def run(self, sockets=None):
        self.sockets = sockets


@pytest.mark.parametrize(("host", "warns"), [("127.0.0.1", False), ("0.0.0.0", True)])
def test_serve_picks_a_port_prints_the_address_and_warns_off_loopback(monkeypatch, capsys, tmp_path, host, warns):
    fake = _FakeServer()
    made = {}

    def fake_server(app, log_level, **options):
        made["app"] = app
        return fake

    monkeypatch.setattr(web_server, "_uvicorn_server", fake_server)
    web_server.serve(host=host, port=0, models=("alexnet",), weights=("random",), run_dir=tmp_path)
    out, err = capsys.readouterr()
    assert "featuremaps viewer: http://127.0.0.1:" in out
    port = int(out.strip().rsplit(":", 1)[1].rstrip("/"))
    assert port > 0 and fake.sockets[0].fileno() == -1  # closed after run()
    assert ("warning" in err) is warns
    with TestClient(made["app"], base_url=f"http://127.0.0.1:{port}") as c:
        assert c.get("/api/options").status_code == 200


def test_is_loopback():
    assert web_server.is_loopback("127.0.0.1") and web_server.is_loopback("::1") and web_server.is_loopback("localhost")
    assert not web_server.is_loopback("0.0.0.0") and not web_server.is_loopback("192.168.1.2")


def test_run_dir_path_is_kept(tmp_path):
    app = create_app(models=("alexnet",), weights=("random",), run_dir=tmp_path / "nested" / "runs")
    assert Path(app.state.run_dir).is_dir()


# --------------------------------------------------------------------------------------------------
# issue 12: the viewer draws with the renderer's own rules (channel choice, scale text, comparisons)
# --------------------------------------------------------------------------------------------------
INF_MODEL = """
import torch
from torch import nn

def build():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():  # planted: each channel a constant, channel 2 all +inf
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([1.0, 2.0, float("inf"), 0.5]))
    return nn.Sequential(conv, nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
"""


def test_grid_json_names_the_channels_the_picture_shows_also_with_inf(tmp_path):
    (tmp_path / "infmodel.py").write_text(INF_MODEL)
    spec = f"{tmp_path / 'infmodel.py'}:build"
    app = create_app(models=(spec,), weights=("random",), run_dir=tmp_path / "runs")
    with TestClient(app) as c:
        done = wait_done(c, start_run(c, model=spec, size="32", layers="0")["id"])
        assert done["state"] == "done", done
        layout = c.get(f"/api/runs/{done['id']}/layers/0/grid.json?top_k=2").json()
        picture = _png(c.get(f"/api/runs/{done['id']}/layers/0/grid.png?top_k=2"))
        stored = runs.load_run(tmp_path / "runs" / done["id"])
    from featuremaps import render

    drawn = render.channel_grid(stored.entries[0], top_k=2, page=0, per_page=128)
    assert layout["channels"] == drawn.info["channels"] == [1, 0]  # the +inf channel has no finite mean
    assert picture.size == drawn.size


def test_grid_json_says_the_scale_the_header_writes(client, run):
    base = f"/api/runs/{run['id']}/layers/2"
    layout = client.get(f"{base}/grid.json?norm=global").json()
    spatial = sum(1 for layer in run["layers"] if layer["spatial"])
    lo = min(layer["stats"]["min"] for layer in run["layers"] if layer["spatial"])
    hi = max(layer["stats"]["max"] for layer in run["layers"] if layer["spatial"])
    assert layout["scale_note"].startswith("scale: one global range [")
    assert layout["scale_note"].endswith(f"across {spatial} layers")
    assert layout["scale"] == pytest.approx([0.0 if lo >= 0 else lo, hi])
    channel = client.get(f"{base}/channels/0.json?norm=global").json()
    assert channel["scale"] == pytest.approx(layout["scale"]) and channel["scale_layers"] == spatial
    assert client.get(f"{base}/grid.json?norm=layer").json()["scale_note"].startswith("scale: one range for the layer")


def test_compare_shows_one_kind_per_row_as_the_library_draws_it(client, run):
    from featuremaps import render
    from featuremaps.capture import capture
    from featuremaps.models import load_model

    relu = wait_done(client, start_run(client, mode="conv-relu")["id"])
    assert relu["state"] == "done", relu
    kinds = {layer["kind"] for layer in relu["layers"]}
    assert kinds == {"conv", "act"}
    got = _png(client.get(f"/api/compare.png?runs={run['id']},{relu['id']}"))
    model = load_model("alexnet", "random").with_size(64)  # the same seeded weights as the viewer's
    expected = render.compare_runs(
        {
            "A: alexnet": capture(model, "sample:chelsea", layers="conv"),
            "B: alexnet": capture(model, "sample:chelsea", mode="conv-relu"),
        },
        tile_size=96,
    )
    assert all(name in {"features.1", "features.4", "features.7", "features.9", "features.11"}
               for name in expected.info["columns"]["B: alexnet"])  # fmt: skip
    assert got.size == expected.size
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(expected))
