"""A small load test: the viewer, started with ``featuremaps.web.serve`` in its own process on
loopback, gets 200 requests from 8 client threads — image uploads (new runs) mixed with picture
requests (thumbnails, channel grids, single channels, overlays) with varied display settings.

It must answer every request without a 5xx (a 429 "busy" or a 404 for a run that was evicted
meanwhile are fine), still answer afterwards, and give its memory back: the server's resident
memory (psutil RSS) after the burst must be within ``RSS_SLACK`` of its level after a warm-up run
(the PNG cache alone may hold up to ``png_cache_bytes`` = 96 MB; every map is a few hundred KB).
"""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from viewer_polling import wait_done

CLIENTS = 8
REQUESTS = 200
UPLOAD_SHARE = 0.15
RSS_SLACK = 300 * 2**20
TIME_LIMIT_S = 120

SERVER = """
import sys
from featuremaps.web import serve
serve(host="127.0.0.1", port=0, models=("alexnet",), weights=("random",), max_runs=12, workers=2, max_pending=8,
      run_dir=sys.argv[1])
"""


def small_png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(80, 160)), int(rng.integers(80, 160))
    arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("load-runs")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        line = ""
        deadline = time.monotonic() + 60
        while "featuremaps viewer:" not in line:
            line = proc.stdout.readline()
            if (not line and proc.poll() is not None) or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the server did not start: {proc.stderr.read() if proc.poll() is not None else 'timeout'}"
                )
        url = line.split("featuremaps viewer:", 1)[1].strip()
        with httpx.Client(base_url=url, timeout=30) as c:
            for _ in range(200):
                try:
                    if c.get("/api/options").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.05)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def upload(client: httpx.Client, seed: int) -> httpx.Response:
    return client.post(
        "/api/runs",
        data={
            "model": "alexnet",
            "weights": "random",
            "mode": random.Random(seed).choice(["network", "conv-pool"]),
            "size": "64",
        },
        files={"image": (f"img{seed}.png", small_png(seed), "image/png")},
    )


def picture_urls(run: dict, rng: random.Random) -> str:
    layers = [layer for layer in run["layers"] if layer["spatial"]]
    i = rng.randrange(len(layers))
    layer = layers[i]
    channel = rng.randrange(layer["shape"][1])
    view = f"norm={rng.choice(['map', 'layer', 'global'])}&cmap={rng.choice(['viridis', 'magma', 'gray', 'RdBu_r'])}"
    kind = rng.choice(["thumb", "grid", "channel", "overlay", "thumb", "channel"])
    base = f"/api/runs/{run['id']}/layers/{layer['index']}"
    if kind == "thumb":
        return f"{base}/thumb.png?{view}&reduce={rng.choice(['mean', 'max', 'l2', 'std'])}"
    if kind == "grid":
        return f"{base}/grid.png?{view}&per_page=64&page={rng.randrange(-(-layer['shape'][1] // 64))}"
    if kind == "channel":
        return f"{base}/channels/{channel}.png?{view}"
    return f"{base}/overlay.png?{view}&channel={channel}&alpha={rng.choice(['0.25', '0.5', '0.75'])}"


def test_200_mixed_requests_from_8_clients(server):
    url, proc = server
    me = psutil.Process(proc.pid)
    t_start = time.monotonic()
    with httpx.Client(base_url=url, timeout=30) as c:
        # warm-up: the model is loaded, one run exists, every kind of picture was drawn once
        r = upload(c, 0)
        assert r.status_code == 202, r.text
        first = wait_done(c, r.json()["id"])
        assert first["state"] == "done", first
        warm_rng = random.Random(0)
        for _ in range(12):
            assert c.get(picture_urls(first, warm_rng)).status_code == 200
        rss_warm = me.memory_info().rss

    done_runs = [first]
    runs_lock = threading.Lock()
    statuses: list[tuple[str, int]] = []
    failures: list[str] = []
    counter = iter(range(REQUESTS))
    counter_lock = threading.Lock()

    def client_loop(k: int) -> None:
        rng = random.Random(100 + k)
        with httpx.Client(base_url=url, timeout=30) as c:
            mine: list[str] = []
            while True:
                with counter_lock:
                    n = next(counter, None)
                if n is None or time.monotonic() - t_start > TIME_LIMIT_S:
                    break
                try:
                    if rng.random() < UPLOAD_SHARE:
                        r = upload(c, 1000 + n)
                        statuses.append(("upload", r.status_code))
                        if r.status_code == 202:
                            mine.append(r.json()["id"])
                    else:
                        # pick up runs this client started that are done by now
                        for rid in list(mine):
                            job = c.get(f"/api/runs/{rid}").json()
                            if job.get("state") == "done":
                                with runs_lock:
                                    done_runs.append(job)
                                mine.remove(rid)
                            elif job.get("state") == "failed" or "state" not in job:
                                mine.remove(rid)
                        with runs_lock:
                            run = rng.choice(done_runs[-8:])
                        r = c.get(picture_urls(run, rng))
                        statuses.append(("picture", r.status_code))
                        if r.status_code == 200:
                            assert r.headers["content-type"] == "image/png"
                except Exception as exc:  # a dropped connection counts as a failure too
                    failures.append(f"{type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client_loop, range(CLIENTS)))
    elapsed = time.monotonic() - t_start

    assert not failures, failures[:5]
    assert len(statuses) == REQUESTS, f"only {len(statuses)} requests in {elapsed:.0f} s"
    codes = [code for _, code in statuses]
    assert not [s for s in statuses if s[1] >= 500], [s for s in statuses if s[1] >= 500][:5]
    assert set(codes) <= {200, 202, 404, 429}, sorted(set(codes))
    assert codes.count(200) >= REQUESTS // 2
    uploads = [code for kind, code in statuses if kind == "upload"]
    assert uploads and 202 in uploads

    with httpx.Client(base_url=url, timeout=30) as c:
        deadline = time.monotonic() + 60
        while c.get("/api/status").json()["pending"] and time.monotonic() < deadline:
            time.sleep(0.1)
        status = c.get("/api/status").json()
        assert status["pending"] == 0
        assert c.get("/api/options").status_code == 200
        r = upload(c, 99999)
        assert r.status_code == 202 and wait_done(c, r.json()["id"])["state"] == "done"
        assert proc.poll() is None
    time.sleep(0.5)
    rss_after = me.memory_info().rss
    print(
        f"\n{REQUESTS} requests from {CLIENTS} clients in {elapsed:.1f} s; codes {sorted(set(codes))}; "
        f"{status['forward_passes']} forward passes; RSS after warm-up {rss_warm / 2**20:.0f} MB, after {rss_after / 2**20:.0f} MB"
    )
    assert rss_after - rss_warm < RSS_SLACK


def test_oversized_upload_over_a_real_socket_gets_413_and_the_server_lives_on(server):
    url, proc = server
    big = b"\x89PNG\r\n\x1a\n" + bytes(21 * 2**20)  # over the default 20 MB limit
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post(
            "/api/runs", data={"model": "alexnet", "weights": "random"}, files={"image": ("huge.png", big, "image/png")}
        )
        assert r.status_code == 413
        assert "limit" in r.json()["detail"]
        assert c.get("/api/status").status_code == 200
    assert proc.poll() is None
