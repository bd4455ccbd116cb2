"""The viewer under abuse, through FastAPI's TestClient (issue 13): memory and disk budgets decided
before anything is decoded or loaded, what a finished run keeps, cross-site and rebinding requests,
uploads admitted before they are decoded, fair queue slots, and names the file system refuses.

Runs use tiny inputs (alexnet, vgg11 at 32-64 px, random weights); a refused run costs nothing
(no model is loaded), so the refusals are checked against large requests directly.
"""

from __future__ import annotations

import io
import threading
import time
import warnings

import numpy as np
import pytest
from PIL import Image

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx.*")
    from fastapi.testclient import TestClient

from featuremaps import runs
from featuremaps.web import create_app
from featuremaps.web import forms as web_forms
from featuremaps.web import server as web_server
from featuremaps.web.caches import process_rss
from featuremaps.web.jobs import folder_bytes
from viewer_polling import wait_done

GB = 2**30


def budget(extra: float = 1.5) -> int:
    """A memory limit ``extra`` GB above what this test process holds now (the viewer sets the
    process's own memory aside)."""
    return process_rss() + int(extra * GB)


def form(**fields) -> dict:
    data = {"model": "alexnet", "weights": "random", "mode": "network", "size": "64", "sample": "edge"}
    data.update(fields)
    return data


def jpeg(width: int, height: int) -> bytes:
    """A large JPEG that compresses to little (a smooth gradient)."""
    x = np.linspace(0, 255, width, dtype=np.float32)
    row = np.stack([x, x[::-1], np.full_like(x, 128)], axis=-1).astype(np.uint8)
    im = Image.fromarray(np.broadcast_to(row, (height, width, 3)).copy())
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=70)
    return buf.getvalue()


def gated(app) -> threading.Event:
    """Hold every model load until the returned event is set."""
    gate = threading.Event()
    models = app.state.viewer.models
    real = models._loader

    def slow_loader(*args, **kwargs):
        gate.wait(30)
        return real(*args, **kwargs)

    models._loader = slow_loader
    return gate


# --------------------------------------------------------------------------------------------------
# 1. memory and disk
# --------------------------------------------------------------------------------------------------
def test_a_run_over_the_memory_limit_is_refused_before_anything_loads(tmp_path):
    app = create_app(models=("vgg16", "alexnet"), weights=("random",), run_dir=tmp_path, max_memory=budget(1.2))
    with TestClient(app) as c:
        t0 = time.monotonic()
        r = c.post("/api/runs", data=form(model="vgg16", mode="conv-relu", size="512", sample="chelsea"))
        assert r.status_code == 413, r.text
        detail = r.json()["detail"]
        assert "\n" not in detail and "vgg16 in conv-relu mode at 512x512 (26 maps of 8.2 GB)" in detail
        assert "of memory" in detail and "--max-memory" in detail and "smaller size" in detail
        assert time.monotonic() - t0 < 10  # from the shapes alone
        status = c.get("/api/status").json()
        assert status["model_loads"] == 0 and status["forward_passes"] == 0 and status["pending"] == 0
        # what fits runs, with its estimate
        job = c.post("/api/runs", data=form(mode="conv-relu")).json()
        assert job["estimate"]["memory_bytes"] < 100 * 2**20
        assert wait_done(c, job["id"])["state"] == "done"


def test_runs_side_by_side_stay_within_the_memory_budget(tmp_path, monkeypatch):
    import featuremaps.web.jobs as jobs

    app = create_app(models=("alexnet",), weights=("random",), run_dir=tmp_path, workers=3, max_memory=budget(1.2))
    viewer = app.state.viewer
    est = viewer.estimate(jobs.RunRequest("alexnet", "random", "conv-relu", "default", 224, None))
    # a budget with room for the model and one such run at a time, not two
    viewer.memory.fixed = viewer.memory.limit - (est.model_memory + est.memory + est.memory // 2)
    seen, real_capture = [], jobs.capture

    def watching_capture(*args, **kwargs):
        seen.append(viewer.memory.held())
        time.sleep(0.2)
        return real_capture(*args, **kwargs)

    monkeypatch.setattr(jobs, "capture", watching_capture)
    with TestClient(app) as c:
        ids = [c.post("/api/runs", data=form(mode="conv-relu", size="224")).json()["id"] for _ in range(3)]
        assert all(wait_done(c, i)["state"] == "done" for i in ids)
    assert len(seen) == 3 and max(seen) <= viewer.memory.room
    assert viewer.memory.waits > 0  # the later runs waited for the first one's memory


def test_a_model_the_viewer_lets_go_is_freed_with_its_weights(tmp_path):
    """Dropped from the model cache, a model is gone: nothing the capture learned about it keeps it
    (it used to, so each reload after a drop added a copy of its weights to the process)."""
    import gc
    import weakref

    app = create_app(
        models=("alexnet", "vgg11"), weights=("random",), run_dir=tmp_path, max_cached_models=1, max_memory=budget(2)
    )
    viewer = app.state.viewer
    with TestClient(app) as c:
        assert wait_done(c, c.post("/api/runs", data=form()).json()["id"])["state"] == "done"
        first = weakref.ref(viewer.models._slots[("alexnet", "random")].model.module)
        assert wait_done(c, c.post("/api/runs", data=form(model="vgg11")).json()["id"])["state"] == "done"
        assert viewer.models.loaded() == ["vgg11 (random)"]
        gc.collect()
        assert first() is None
        assert ("model", "alexnet", "random") not in viewer.memory.holders()


def test_the_memory_budget_counts_what_the_process_holds_beyond_its_reservations():
    """Memory freed but not given back, or an estimate that came out low, shows in the observed
    figure: a reservation waits for it (after asking for freed memory back), and is granted once
    only the observed figure has held it back for ``patience`` seconds."""
    from featuremaps.web.caches import Budget

    rss = {"now": 600}
    relieved = []

    def relieve():
        relieved.append(1)
        if len(relieved) == 1:
            rss["now"] -= 100  # malloc_trim gave some back, the first time

    b = Budget(1000, 300, observe=lambda: rss["now"], relieve=relieve, patience=0.6)
    assert b.free == 400  # 1000 - max(300 accounted, 600 observed)
    assert b.reserve("a", 450, timeout=0.1)  # after the relief: 500 observed, 450 fits
    assert len(relieved) == 1 and b.held() == 450
    # accounted: 750 of 1000; observed 950 (a's memory and 200 more): 250 fits by the accounts, not by RSS
    rss["now"] = 950
    assert not b.reserve("b", 250, timeout=0.3)
    assert b.observed_waits > 0 and "b" not in b.holders()
    t0 = time.monotonic()
    assert b.reserve("b", 250, timeout=5)  # the allocator does not give it back: granted after patience
    assert 0.5 <= time.monotonic() - t0 < 3
    # what the accounts themselves refuse is never granted by patience
    rss["now"] = 0
    assert not b.reserve("c", 100, timeout=0.8)
    b.release("a")
    assert b.reserve("c", 100, timeout=0.1)


def test_the_store_stays_within_max_disk_oldest_runs_first(tmp_path):
    limit = 24 * 2**20  # room for two or three of these runs (about 8 MB each)
    app = create_app(models=("alexnet",), weights=("random",), run_dir=tmp_path, max_disk=limit)
    with TestClient(app) as c:
        ids = []
        for _ in range(5):
            job = c.post("/api/runs", data=form(mode="conv-relu")).json()
            assert wait_done(c, job["id"])["state"] == "done"
            ids.append(job["id"])
            assert folder_bytes(tmp_path) <= limit
        listed = [r["id"] for r in c.get("/api/runs").json()["runs"]]
        assert ids[-1] in listed and ids[0] not in listed and not (tmp_path / ids[0]).exists()
        assert c.get("/api/status").json()["disk"]["used_bytes"] <= limit
        # a run whose folder could never fit is refused up front
        r = c.post("/api/runs", data=form(mode="conv-relu", size="224"))
        assert r.status_code == 413 and "on disk" in r.json()["detail"] and "--max-disk" in r.json()["detail"]


def test_a_finished_run_keeps_little_in_memory_and_float16_maps_on_disk(tmp_path):
    # room above what this test process holds already (in a whole test session, gigabytes)
    app = create_app(models=("vgg11",), weights=("random",), run_dir=tmp_path, max_memory=process_rss() + 3 * 2**30)
    with TestClient(app) as c:
        done = wait_done(c, c.post("/api/runs", data=form(model="vgg11", mode="conv-relu", size="96")).json()["id"])
        assert done["state"] == "done", done
        full = sum(4 * int(np.prod(layer["shape"])) for layer in done["layers"])
        kept = c.get("/api/status").json()["kept_bytes"]
        assert kept < full / 10
        manifest = runs.read_manifest(tmp_path / done["id"])
        assert {layer["dtype"] for layer in manifest["layers"]} == {"float16"}
        assert "viewer/reduced.npz" in manifest["files"] and "viewer/channels.json" in manifest["files"]
        # the folder still reads back with the library, and the numbers are the full output's
        back = runs.load_run(tmp_path / done["id"])
        e = back.entries[3]
        layer = c.get(f"/api/runs/{done['id']}/layers/3").json()
        assert layer["channel_stats"]["max"][5] == pytest.approx(float(e.maps(0)[5].max()), rel=2e-3)
        info = c.get(f"/api/runs/{done['id']}/layers/3/channels/5.json").json()
        assert info["max"] == layer["channel_stats"]["max"][5]


def test_a_memory_limit_below_what_the_process_holds_is_refused(tmp_path):
    from featuremaps.errors import ViewerError

    with pytest.raises(ViewerError, match=r"too small: the viewer holds .* give --max-memory at least"):
        create_app(models=("alexnet",), weights=("random",), run_dir=tmp_path, max_memory=256 * 2**20)


# --------------------------------------------------------------------------------------------------
# 2. cross-site and DNS rebinding
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers",
    [{"Origin": "null"}, {"Origin": "NULL"}, {"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}],
)
def test_cross_site_runs_are_refused(tmp_path, headers):
    app = create_app(models=("alexnet",), weights=("random",), run_dir=tmp_path)
    with TestClient(app) as c:
        r = c.post("/api/runs", data=form(), headers=headers)
        assert r.status_code == 403 and "cross-site" in r.json()["detail"]
        assert c.get("/api/status").json()["pending"] == 0
        ok = c.post("/api/runs", data=form(), headers={"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"})
        assert ok.status_code == 202


def test_every_bind_keeps_a_host_allow_list(tmp_path):
    hosts, ips = web_server.allowed_hosts_for("0.0.0.0", ["viewer.lab.example"])
    assert ips and "localhost" in hosts and "viewer.lab.example" in hosts and "0.0.0.0" not in hosts
    app = create_app(
        models=("alexnet",), weights=("random",), run_dir=tmp_path, allowed_hosts=hosts, allow_ip_hosts=ips
    )
    with TestClient(app, base_url="http://evil.example:8000") as c:  # a rebinding page's own name
        r = c.post("/api/runs", data=form(), headers={"Origin": "http://evil.example:8000"})
        assert r.status_code == 400 and "--allow-host" in r.json()["detail"]
        assert c.get("/api/options").status_code == 400
    for base in ("http://192.168.1.20:8000", "http://[fe80::1]:8000", "http://viewer.lab.example", "http://localhost"):
        with TestClient(app, base_url=base) as c:
            assert c.get("/api/options").status_code == 200, base
    loop_hosts, loop_ips = web_server.allowed_hosts_for("127.0.0.1")
    assert not loop_ips and set(loop_hosts) == {"127.0.0.1", "localhost", "::1"}


def test_serve_on_all_interfaces_says_which_hosts_it_answers(monkeypatch, capsys, tmp_path):
    made = {}

    class Fake:
        def run(self, sockets=None):
            pass

    def fake_server(app, log_level, **options):
        made["app"], made["options"] = app, options
        return Fake()

    monkeypatch.setattr(web_server, "_uvicorn_server", fake_server)
    web_server.serve(host="0.0.0.0", port=0, models=("alexnet",), weights=("random",), run_dir=tmp_path,
                     allow_hosts=["viewer.lab.example"])  # fmt: skip
    err = capsys.readouterr().err
    assert "DNS rebinding" in err and "viewer.lab.example" in err and "--allow-host" in err
    with TestClient(made["app"], base_url="http://evil.example") as c:
        assert c.get("/api/options").status_code == 400


# --------------------------------------------------------------------------------------------------
# 3. uploads: admitted first, decoded small
# --------------------------------------------------------------------------------------------------
def test_uploads_to_a_busy_viewer_are_refused_without_being_decoded(tmp_path, monkeypatch):
    decodes = []
    real_size, real_load = web_forms.decoded_size, web_forms.load_image
    monkeypatch.setattr(web_forms, "decoded_size", lambda *a, **k: decodes.append("size") or real_size(*a, **k))
    monkeypatch.setattr(web_forms, "load_image", lambda *a, **k: decodes.append("load") or real_load(*a, **k))
    big = jpeg(6000, 4000)  # 24 megapixels in a few hundred KB
    app = create_app(
        models=("alexnet",), weights=("random",), run_dir=tmp_path, max_pending=1, workers=1,
        max_upload_bytes=4 * 2**20,
    )  # fmt: skip
    gate = gated(app)
    with TestClient(app) as c:
        first = c.post("/api/runs", data=form(sample=""), files={"image": ("big.jpg", big, "image/jpeg")})
        assert first.status_code == 202, first.text
        assert decodes == ["size", "load"]
        job = app.state.viewer.job(first.json()["id"])
        assert job.request.image.size == (64, 64)  # the queued run holds the resized picture only
        for _ in range(12):
            r = c.post("/api/runs", data=form(sample=""), files={"image": ("big.jpg", big, "image/jpeg")})
            assert r.status_code == 429 and r.headers["retry-after"]
        assert decodes == ["size", "load"]  # refused before the upload was read
        gate.set()
        assert wait_done(c, first.json()["id"])["state"] == "done"


def test_a_jpeg_upload_is_decoded_at_reduced_scale(tmp_path, monkeypatch):
    sizes = []
    real_load = web_forms.load_image

    def spying_load(*args, **kwargs):
        image = real_load(*args, **kwargs)
        sizes.append(image.size)
        return image

    monkeypatch.setattr(web_forms, "load_image", spying_load)
    app = create_app(models=("alexnet",), weights=("random",), run_dir=tmp_path, max_upload_bytes=4 * 2**20)
    with TestClient(app) as c:
        r = c.post(
            "/api/runs", data=form(sample="", size="96"), files={"image": ("b.jpg", jpeg(4000, 3000), "image/jpeg")}
        )
        assert r.status_code == 202
        assert wait_done(c, r.json()["id"])["state"] == "done"
        assert Image.open(io.BytesIO(c.get(f"/api/runs/{r.json()['id']}/input.png").content)).size == (96, 96)
    assert sizes == [(500, 375)]  # 1/8 scale: the smallest that still covers 96x96


# --------------------------------------------------------------------------------------------------
# 6. fair queue slots, names the file system refuses
# --------------------------------------------------------------------------------------------------
def test_one_client_cannot_take_every_queue_slot_and_clients_take_turns(tmp_path, monkeypatch):
    import featuremaps.web.jobs as jobs

    order, real_capture = [], jobs.capture

    def recording_capture(model, image, **kwargs):
        if getattr(image, "device", None) is None or image.device.type != "meta":  # not an estimate
            order.append(kwargs.get("mode"))
        return real_capture(model, image, **kwargs)

    monkeypatch.setattr(jobs, "capture", recording_capture)
    app = create_app(models=("alexnet",), weights=("random",), run_dir=tmp_path, max_pending=8, workers=1)
    gate = gated(app)
    with TestClient(app, client=("10.0.0.1", 5000)) as a, TestClient(app, client=("10.0.0.2", 5000)) as b:
        mine = [a.post("/api/runs", data=form(mode="network")) for _ in range(2)]
        assert [r.status_code for r in mine] == [202, 202]
        r = a.post("/api/runs", data=form(mode="network"))
        assert r.status_code == 429 and "per client" in r.json()["detail"]
        other = b.post("/api/runs", data=form(mode="conv"))
        assert other.status_code == 202
        gate.set()
        for job in [*mine, other]:
            assert wait_done(a, job.json()["id"])["state"] == "done"
    assert order == ["network", "conv", "network"]  # b's run went before a's second


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    app = create_app(models=("alexnet",), weights=("random",), run_dir=tmp_path_factory.mktemp("runs"))
    with TestClient(app, raise_server_exceptions=False) as c:
        job = c.post("/api/runs", data=form()).json()
        assert wait_done(c, job["id"])["state"] == "done"
        yield c, job["id"]


@pytest.mark.parametrize(
    "path",
    [
        "manifest.json%00",
        "manifest.json%00.png",
        "%00",
        "a" * 300,
        "maps/" + "b" * 256 + ".npy",
        "x/" * 600,
        "manifest.json%0A",
        "manifest.json%7F",
        "%ff%fe",
    ],
)
def test_names_the_file_system_refuses_are_404(done_run, path):
    c, rid = done_run
    r = c.get(f"/api/runs/{rid}/files/{path}")
    assert r.status_code == 404, (path[:40], r.status_code, r.text[:200])
    assert c.get(f"/api/runs/{rid}/files/manifest.json").status_code == 200


def test_the_download_is_streamed_not_written_to_a_temporary_file(done_run, monkeypatch):
    import tempfile
    import zipfile

    c, rid = done_run

    def no_temp_files(*args, **kwargs):
        raise AssertionError("the download wrote a temporary file")

    monkeypatch.setattr(tempfile, "mkstemp", no_temp_files)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", no_temp_files)
    r = c.get(f"/api/runs/{rid}/download")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert "content-length" not in r.headers  # sent as it is made
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        assert zf.testzip() is None
        names = set(zf.namelist())
    manifest = runs.read_manifest(c.app.state.viewer.folder(rid))
    assert {f"{rid}/{f}" for f in manifest["files"]} | {f"{rid}/manifest.json"} == names


def test_downloads_at_once_are_bounded(done_run):
    c, rid = done_run
    viewer = c.app.state.viewer
    held = [viewer.take_download(rid) for _ in range(4)]  # the default max_downloads
    r = c.get(f"/api/runs/{rid}/download")
    assert r.status_code == 429 and "downloads" in r.json()["detail"]
    held[0]()
    held[0]()  # ending twice frees one slot, not two
    assert c.get(f"/api/runs/{rid}/download").status_code == 200
    r = c.get(f"/api/runs/{rid}/download")
    assert r.status_code == 200
    for release in held[1:]:
        release()


@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_url_that_trickles_is_given_up_after_the_overall_deadline(monkeypatch, where):
    import socket

    from featuremaps import images
    from featuremaps.errors import ImageError

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def trickle() -> None:  # a byte every 0.2 s: never idle for URL_TIMEOUT, never done
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
            data = head + b"\x89PNG" + bytes(99996) if where == "body" else head
            sent = len(head) if where == "body" else 0
            if where == "body":
                conn.sendall(head)
            while not stop.is_set() and sent < len(data):
                try:
                    conn.sendall(data[sent : sent + 1])
                except OSError:
                    return
                sent += 1
                time.sleep(0.2)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    monkeypatch.setattr(images, "URL_TIMEOUT", 1.0)
    monkeypatch.setattr(images, "URL_DEADLINE", 1.5)
    t0 = time.monotonic()
    try:
        with pytest.raises(ImageError, match=r"took longer than 1\.5 s to download .* download the image first"):
            images.load_image(f"http://127.0.0.1:{port}/slow.png")
        assert time.monotonic() - t0 < 10  # bounded: without the deadline this would wait for ever
    finally:
        stop.set()
        thread.join(5)
        listener.close()
