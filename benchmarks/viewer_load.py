"""Soak test of the viewer (issue 13), bounded and on loopback.

``featuremaps serve`` runs in its own process with ``--max-memory`` and ``--max-disk``; 8 client
threads for ``--minutes`` mix runs of every mode at the largest allowed size (``--size``, the
viewer's ``max_input_size``), JPEG uploads and picture requests (thumbnails, grids, channels,
overlays). Reported: requests, 5xx (target 0), other codes, p50/p95 latency, the server's peak RSS
against ``--max-memory`` (sampled every 0.2 s; target: never above), the store's peak size against
``--max-disk`` (target: never above), and the RSS after the clients stop.

    .venv/bin/python benchmarks/viewer_load.py --minutes 3
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

MODES = ("network", "conv", "conv-relu", "conv-pool")


def jpeg(seed: int, side: int = 1600) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((side // 8, side // 8, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).resize((side, side)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def folder_bytes(root: Path) -> int:
    total = 0
    for p in root.rglob("*"):
        try:
            total += p.lstat().st_blocks * 512
        except OSError:
            pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--models", default="alexnet,vgg11")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--max-memory", default="3G")
    ap.add_argument("--max-disk", default="1G")
    ap.add_argument("--trace", type=Path, help="write the server's RSS and reserved memory every 0.2 s to this CSV")
    args = ap.parse_args()

    def to_bytes(t: str) -> int:
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        return int(float(t[:-1]) * units[t[-1].upper()]) if t[-1].upper() in units else int(t)

    mem_limit, disk_limit = to_bytes(args.max_memory), to_bytes(args.max_disk)
    store = Path(tempfile.mkdtemp(prefix="viewer-soak-"))
    out = store.parent / (store.name + ".out")
    cmd = [
        str(Path(sys.executable).with_name("featuremaps")), "serve", "--port", "0", "--models", args.models,
        "--weights", "random", "--run-dir", str(store / "runs"), "--max-memory", args.max_memory,
        "--max-disk", args.max_disk,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=out.open("w"), stderr=subprocess.DEVNULL, env={**os.environ})
    deadline = time.monotonic() + 90
    while "featuremaps viewer:" not in out.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the viewer did not start")
        time.sleep(0.1)
    url = out.read_text().split("featuremaps viewer:", 1)[1].split()[0]
    me = psutil.Process(proc.pid)
    peaks = {"rss": 0, "disk": 0}
    stop = threading.Event()

    trace: list[str] = ["t_s,rss_mb,reserved_mb,set_aside_mb,pending"]
    t_zero = time.monotonic()

    def sample() -> None:
        with httpx.Client(base_url=url, timeout=10) as c:
            while not stop.is_set():
                try:
                    rss = me.memory_info().rss
                    peaks["rss"] = max(peaks["rss"], rss)
                    peaks["disk"] = max(peaks["disk"], folder_bytes(store / "runs"))
                    if args.trace:
                        st = c.get("/api/status").json()
                        mem = st["memory"]
                        trace.append(
                            f"{time.monotonic() - t_zero:.1f},{rss / 2**20:.0f},{mem['reserved_bytes'] / 2**20:.0f},"
                            f"{mem['set_aside_bytes'] / 2**20:.0f},{st['pending']}"
                        )
                except (psutil.Error, OSError, httpx.HTTPError):
                    pass
                time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    models = args.models.split(",")
    results: list[tuple[str, int, float]] = []
    errors: list[str] = []
    done: list[dict] = []
    lock = threading.Lock()
    end = time.monotonic() + args.minutes * 60

    def client(k: int) -> None:
        rng = random.Random(k)
        mine: list[str] = []
        with httpx.Client(base_url=url, timeout=120) as c:
            while time.monotonic() < end:
                t0 = time.perf_counter()
                kind = "picture"
                try:
                    for rid in list(mine):  # pick up this client's runs that are done by now
                        state = c.get(f"/api/runs/{rid}").json()
                        if state.get("state") == "done":
                            with lock:
                                done.append(state)
                        if state.get("state") in ("done", "failed", None):
                            mine.remove(rid)
                    t0 = time.perf_counter()
                    if rng.random() < 0.2 or not done:
                        kind = "run"
                        data = {"model": rng.choice(models), "weights": "random", "mode": rng.choice(MODES),
                                "size": str(args.size)}  # fmt: skip
                        if rng.random() < 0.5:
                            kind = "upload"
                            r = c.post(
                                "/api/runs",
                                data=data,
                                files={"image": ("p.jpg", jpeg(rng.randrange(99)), "image/jpeg")},
                            )
                        else:
                            r = c.post("/api/runs", data={**data, "sample": rng.choice(["chelsea", "coffee", "edge"])})
                        if r.status_code == 202:
                            mine.append(r.json()["id"])
                    else:
                        with lock:
                            job = rng.choice(done[-6:])
                        layers = [la for la in job["layers"] if la["spatial"]]
                        la = rng.choice(layers)
                        base = f"/api/runs/{job['id']}/layers/{la['index']}"
                        view = f"norm={rng.choice(['map', 'layer', 'global'])}&cmap={rng.choice(['viridis', 'magma'])}"
                        pick = rng.choice(["thumb", "grid", "channel", "overlay"])
                        ch = rng.randrange(la["channels"])
                        path = {
                            "thumb": f"{base}/thumb.png?{view}",
                            "grid": f"{base}/grid.png?{view}&per_page=64",
                            "channel": f"{base}/channels/{ch}.png?{view}",
                            "overlay": f"{base}/overlay.png?{view}&channel={ch}",
                        }[pick]
                        r = c.get(path)
                    with lock:
                        results.append((kind, r.status_code, time.perf_counter() - t0))
                    if r.status_code == 429:
                        time.sleep(0.5)
                except Exception as exc:  # a dropped connection is a failure too
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    t_start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t_start
    with httpx.Client(base_url=url, timeout=30) as c:
        wait = time.monotonic() + 120
        while c.get("/api/status").json()["pending"] and time.monotonic() < wait:
            time.sleep(0.5)
        status = c.get("/api/status").json()
    time.sleep(2)
    rss_after = me.memory_info().rss
    stop.set()
    sampler.join()
    proc.terminate()
    proc.wait(20)
    if args.trace:
        args.trace.write_text("\n".join(trace) + "\n")

    codes: dict[int, int] = {}
    for _, code, _ in results:
        codes[code] = codes.get(code, 0) + 1
    lat = sorted(t for _, code, t in results if code < 400)
    q = statistics.quantiles(lat, n=20) if len(lat) >= 20 else [float("nan")] * 19
    n5 = sum(v for k, v in codes.items() if k >= 500)
    runs = sum(1 for kind, code, _ in results if kind in ("run", "upload") and code == 202)
    mb = 2**20
    print(f"command: {' '.join(sys.argv)}")
    print(
        "| clients | minutes | requests | runs admitted | 5xx | other codes | p50 | p95 | peak RSS / --max-memory | peak store / --max-disk | RSS after |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    others = ", ".join(f"{k}: {v}" for k, v in sorted(codes.items()) if k < 500)
    print(
        f"| {args.clients} | {elapsed / 60:.1f} | {len(results)} | {runs} ({status['forward_passes']} forward passes) | {n5} | "
        f"{others} | {q[9] * 1000:.0f} ms | {q[18] * 1000:.0f} ms | {peaks['rss'] / mb:.0f} / {mem_limit / mb:.0f} MB | "
        f"{peaks['disk'] / mb:.0f} / {disk_limit / mb:.0f} MB | {rss_after / mb:.0f} MB |"
    )
    if errors:
        print(f"{len(errors)} client errors, e.g. {errors[:3]}")


if __name__ == "__main__":
    main()
