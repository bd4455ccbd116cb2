"""The viewer after a crash and under many connections (issue 13, items 4 and 5), on loopback.

- ``kill -9`` of ``featuremaps serve`` in the middle of writing a run: the next start on the same
  store (the default one, then ``--run-dir``) clears the killed run's temporary folder, leaves
  folders featuremaps did not write alone, and serves the finished run again without a forward pass;
- a viewer whose process may open 256 files gets 300 idle connections and still answers a normal
  request, with a short log; a client that sends its headers a byte at a time, keeps a connection
  idle, trickles a body or stops reading a download is cut off.

Every wait is a loop with a deadline; the servers are real processes (or uvicorn in a thread).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest

from featuremaps.web import create_app
from featuremaps.web import server as web_server
from featuremaps.web.jobs import LOCK_FILE, OWN_PREFIX
from featuremaps.web.server import ServerThread
from viewer_polling import wait_done

FEATUREMAPS = Path(sys.executable).with_name("featuremaps")


def start_serve(tmp_path: Path, name: str, *args: str, env: dict | None = None, preexec=None) -> tuple:
    """``featuremaps serve`` in a process of its own; returns (process, url, stderr file)."""
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    cmd = [str(FEATUREMAPS), "serve", "--port", "0", "--models", "alexnet", "--weights", "random", *args]
    proc = subprocess.Popen(
        cmd,
        stdout=out.open("w"),
        stderr=err.open("w"),
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        preexec_fn=preexec,
    )
    deadline = time.monotonic() + 90
    while True:
        text = out.read_text()
        if "featuremaps viewer:" in text:
            url = text.split("featuremaps viewer:", 1)[1].split()[0]
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"featuremaps serve did not start: {err.read_text()[-2000:]}")
        time.sleep(0.05)
    with httpx.Client(base_url=url, timeout=10) as c:
        for _ in range(200):
            try:
                if c.get("/api/options").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
    return proc, url, err


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def form(**fields: str) -> dict:
    data = {"model": "alexnet", "weights": "random", "mode": "conv-relu", "size": "64", "sample": "edge"}
    data.update(fields)
    return data


# --------------------------------------------------------------------------------------------------
# 4. crash leftovers
# --------------------------------------------------------------------------------------------------
def test_after_kill_9_a_restart_clears_the_leftovers_and_serves_the_finished_run(tmp_path):
    cache = tmp_path / "cache"
    store = cache / "featuremaps" / "viewer"  # serve's default store under XDG_CACHE_HOME
    env = {"XDG_CACHE_HOME": str(cache)}
    proc, url, _ = start_serve(tmp_path, "first", env=env)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            done = wait_done(c, c.post("/api/runs", data=form()).json()["id"])
            assert done["state"] == "done", done
            grid = c.get(f"/api/runs/{done['id']}/layers/2/grid.png").content
            assert (store / done["id"] / "manifest.json").is_file()
            # a large run, killed while its folder is being written
            part = None
            for _ in range(3):
                rid = c.post("/api/runs", data=form(size="512", sample="chelsea")).json()["id"]
                deadline = time.monotonic() + 120
                while part is None and time.monotonic() < deadline:
                    part = next((p for p in store.iterdir() if p.name.startswith(f".{rid}.tmp-{proc.pid}-")), None)
                    if part is None and c.get(f"/api/runs/{rid}").json()["state"] in ("done", "failed"):
                        break  # finished before it was seen: try again
                    time.sleep(0.002)
                if part is not None:
                    break
            assert part is not None, "never saw a run folder being written"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    finally:
        stop(proc)
    assert part.is_dir() and not (store / rid).exists()  # what kill -9 leaves
    foreign = store / ".notes.tmp-1-abcdef12"  # looks like a part, but featuremaps did not write it
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")

    proc, url, _ = start_serve(tmp_path, "again", "--run-dir", str(store))
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            assert not part.exists()
            assert (foreign / "mine.txt").read_text() == "keep me"
            listed = {r["id"]: r["state"] for r in c.get("/api/runs").json()["runs"]}
            assert listed == {done["id"]: "done"}
            assert c.get(f"/api/runs/{rid}").status_code == 404
            again = c.get(f"/api/runs/{done['id']}").json()
            assert again["model"] == "alexnet" and [la["name"] for la in again["layers"]] == [
                la["name"] for la in done["layers"]
            ]
            assert c.get(f"/api/runs/{done['id']}/layers/2/grid.png").content == grid
            assert c.get(f"/api/runs/{done['id']}/download").status_code == 200
            status = c.get("/api/status").json()
            assert status["forward_passes"] == 0 and status["model_loads"] == 0
            assert status["disk"]["run_dir"] == str(store)
            assert wait_done(c, c.post("/api/runs", data=form(mode="network")).json()["id"])["state"] == "done"
    finally:
        stop(proc)


def test_a_second_viewer_on_the_same_store_is_refused(tmp_path):
    from featuremaps.errors import ViewerError

    app = create_app(models=("alexnet",), weights=("random",), run_dir=tmp_path)
    try:
        with pytest.raises(ViewerError, match=r"is in use by another featuremaps viewer; .* another --run-dir"):
            create_app(models=("alexnet",), weights=("random",), run_dir=tmp_path)
    finally:
        app.state.viewer.close()
    create_app(models=("alexnet",), weights=("random",), run_dir=tmp_path).state.viewer.close()


def test_temporary_stores_of_killed_viewers_are_removed_by_the_next(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / f"{OWN_PREFIX}killed"
    (dead / "0123456789abcdef").mkdir(parents=True)
    (dead / LOCK_FILE).write_text("")
    other = tmp_path / f"{OWN_PREFIX}not-ours"  # no lock file: not a viewer's store
    other.mkdir()
    app = create_app(models=("alexnet",), weights=("random",))
    live = app.state.run_dir
    second = create_app(models=("alexnet",), weights=("random",))  # the live store is locked: kept
    try:
        assert not dead.exists() and other.is_dir() and live.is_dir() and second.state.run_dir != live
    finally:
        second.state.viewer.close()
        app.state.viewer.close()
    assert not live.exists()


# --------------------------------------------------------------------------------------------------
# 5. connections
# --------------------------------------------------------------------------------------------------
def _few_files() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def test_300_idle_connections_under_a_256_file_limit_do_not_stop_a_normal_request(tmp_path):
    proc, url, err = start_serve(tmp_path, "fds", "--run-dir", str(tmp_path / "runs"), preexec=_few_files)
    host, port = url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
    idle: list[socket.socket] = []
    room = 256 - web_server.FD_RESERVE  # connections the server keeps under that limit

    def closed_by_server() -> int:
        n = 0
        for s in idle:
            try:
                n += s.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
            except BlockingIOError:
                pass
            except OSError:
                n += 1
        return n

    try:
        for _ in range(300):
            idle.append(socket.create_connection((host, int(port)), timeout=10))
        deadline = time.monotonic() + 30  # the server accepts them all, closing the oldest idle ones
        while closed_by_server() < 300 - room and time.monotonic() < deadline:
            time.sleep(0.1)
        assert closed_by_server() >= 300 - room
        assert psutil.Process(proc.pid).num_fds() < 256
        with httpx.Client(base_url=url, timeout=10) as c:
            r = c.get("/api/options")
            assert r.status_code == 200 and [m["name"] for m in r.json()["models"]] == ["alexnet"]
            assert wait_done(c, c.post("/api/runs", data=form()).json()["id"])["state"] == "done"
        assert proc.poll() is None
    finally:
        for s in idle:
            s.close()
        stop(proc)
    log = err.read_text()
    assert len(log) < 20_000, log[-2000:]
    # accept() never runs out of descriptors: a burst of accepts (the listen backlog) fits in the file reserve
    assert "Too many open files" not in log and "socket.accept() out of system resource" not in log, log[-2000:]


@pytest.fixture
def quick_server(tmp_path):
    app = create_app(models=("alexnet",), weights=("random",), run_dir=tmp_path / "runs", body_timeout=1.0)
    server = ServerThread(app, header_timeout=0.5, keep_alive=1, write_timeout=1.0)
    with server as url:
        host, port = url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
        yield app, url, (host, int(port))


def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> bool:
    """True when the server closes ``sock`` within ``seconds`` (sending ``trickle`` a byte at a time)."""
    sock.settimeout(0.1)
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        try:
            if i < len(trickle):
                sock.send(trickle[i : i + 1])
                i += 1
            data = sock.recv(65536)
            if data == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def test_headers_sent_a_byte_at_a_time_and_idle_connections_are_cut(quick_server):
    _, _, addr = quick_server
    slow = socket.create_connection(addr)
    silent = socket.create_connection(addr)
    kept = None
    try:
        request = b"GET /api/options HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Filler: " + b"a" * 200 + b"\r\n\r\n"
        assert closed_within(slow, 5, trickle=request)  # 0.5 s for the headers, however they trickle
        assert closed_within(silent, 5)
        kept = socket.create_connection(addr)
        kept.sendall(b"GET /api/options HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        kept.settimeout(5)
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
        assert closed_within(kept, 5)  # then 1 s of keep-alive
    finally:
        for s in (slow, silent, kept):
            if s is not None:
                s.close()
    with httpx.Client(timeout=10) as c:  # a normal client is not hurried
        assert c.get(f"http://{addr[0]}:{addr[1]}/api/options").status_code == 200


def test_a_body_that_trickles_gets_a_408(quick_server):
    _, _, addr = quick_server
    sock = socket.create_connection(addr)
    try:
        sock.sendall(
            b"POST /api/runs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            b'Content-Length: 100000\r\n\r\n--x\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
        )  # then the field's value, a byte at a time
        sock.settimeout(0.2)
        answer = b""
        deadline = time.monotonic() + 10
        while b"\r\n\r\n" not in answer and time.monotonic() < deadline:
            try:
                sock.send(b"a")
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    finally:
        sock.close()


def test_a_download_the_client_stops_reading_is_cut_and_its_slot_freed(quick_server):
    app, url, addr = quick_server
    with httpx.Client(base_url=url, timeout=60) as c:
        rid = c.post("/api/runs", data=form(size="224")).json()["id"]
        assert wait_done(c, rid)["state"] == "done"
    viewer = app.state.viewer
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(addr)
    try:
        sock.sendall(f"GET /api/runs/{rid}/download HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        deadline = time.monotonic() + 5
        while not viewer._pins and time.monotonic() < deadline:  # the download started
            time.sleep(0.01)
        assert viewer._pins[rid] == 1
        deadline = time.monotonic() + 20  # 1 s after the client stopped taking anything
        while viewer._pins and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not viewer._pins
    finally:
        sock.close()
    held = [viewer.take_download(rid) for _ in range(4)]  # every slot is free again
    for release in held:
        release()


def test_a_flood_of_one_log_line_is_rate_limited():
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("featuremaps.test.flood")
    logger.propagate = False
    logger.addHandler(Keep())
    logger.addFilter(web_server.RateLimitedLog(per_window=5, window=0.5))
    for _ in range(1000):
        logger.error("socket.accept() out of system resource")
    logger.error("another message")
    assert [r.getMessage() for r in records].count("socket.accept() out of system resource") == 5
    assert records[-1].getMessage() == "another message"
    time.sleep(0.6)
    logger.error("socket.accept() out of system resource")
    assert records[-1].getMessage().startswith("socket.accept() out of system resource (995 more like it")


def test_serve_rate_limits_the_loggers_a_flood_writes_to():
    web_server.quiet_floods()
    for name in ("asyncio", "uvicorn.error"):
        assert any(isinstance(f, web_server.RateLimitedLog) for f in logging.getLogger(name).filters)
