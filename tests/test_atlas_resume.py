"""Resumable and atomic: a run killed with SIGKILL in the middle of a part, started again with
--resume, finishes with exactly the rows of an uninterrupted run (none missing, none twice); a
killed run never looks complete; a run killed while merging finishes without computing again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import featuremaps as fm
from featuremaps.errors import RunError
from test_atlas_model import noise, write_planted

MODEL = f"{Path(__file__).with_name('test_atlas_model.py').resolve()}:planted_net"
LAYERS = "features.0,features.3"
TABLES = ("topk.parquet", "images.parquet", "histograms.parquet", "channels.parquet")
STATS = "SELECT image_id, layer, channel, max, mean, y, x FROM stats ORDER BY image_id, layer, channel"


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_planted(root / "pics")
    for i in range(13):
        noise((24 + i, 30), 100 + i).save(root / "pics" / f"z_noise{i:02d}.png")
    (root / "pics" / "z_truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    return root


def run_api(pics: Path, out: Path, **kw):
    model = fm.load_model(MODEL, "random")
    options = {"layers": LAYERS, "size": 32, "batch_size": 2, "part_size": 4, "workers": 0, "top_k": 3}
    return fm.atlas(model, pics, out=out, **{**options, **kw})


@pytest.fixture(scope="module")
def reference(pictures):
    return run_api(pictures / "pics", pictures / "reference")


def assert_same(a: fm.Atlas, b: fm.Atlas) -> None:
    for name in TABLES:
        assert pq.read_table(a.folder / name).equals(pq.read_table(b.folder / name)), name
    rows = a.sql(STATS).fetchall()
    assert rows == b.sql(STATS).fetchall()
    keys = [r[:3] for r in rows]
    assert len(keys) == len(set(keys))  # none twice


def test_sigkill_in_the_middle_of_a_part_then_resume(pictures, reference, tmp_path):
    out = tmp_path / "atlas"
    command = [sys.executable, "-m", "featuremaps.cli", "atlas", str(pictures / "pics"), "--model", MODEL,
               "--weights", "random", "--layers", LAYERS, "--size", "32", "--batch-size", "2", "--workers", "0",
               "--top-k", "3", "--part-size", "4", "--out", str(out), "--quiet"]  # fmt: skip
    # each forward pass sleeps 0.4 s: a part (2 batches) takes 0.8 s, so 0.4 s after a part lands the next is half done
    env = {**os.environ, "FEATUREMAPS_TEST_DELAY": "0.4"}
    proc = subprocess.Popen(command + ["--no-report"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "parts" / "part-000001").is_dir():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run did not get going"
            time.sleep(0.02)
        time.sleep(0.4)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    from featuremaps.atlas.store import done_parts, folder_state

    state = folder_state(out)
    assert state.kind == "unfinished" and 2 <= len(state.done) < 7 and not (out / "manifest.json").exists()
    with pytest.raises(RunError, match="unfinished atlas"):
        fm.open_atlas(out)
    kept = {p: (out / "parts" / f"part-{p:06d}" / "stats.parquet").stat().st_mtime_ns for p in done_parts(out)}
    # resume on the command line: the parts written before the kill are kept, the one in flight is done again
    result = subprocess.run(command + ["--resume", "--no-report"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert {p: (out / "parts" / f"part-{p:06d}" / "stats.parquet").stat().st_mtime_ns for p in kept} == kept
    assert not [p for p in (out / "parts").iterdir() if p.name.startswith(".")]
    assert_same(fm.open_atlas(out), reference)


def test_killed_while_merging_resumes_without_computing_again(pictures, reference, tmp_path, monkeypatch):
    out = tmp_path / "atlas"
    from featuremaps.atlas import build

    real = build.write_manifest

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process died right before the manifest

    monkeypatch.setattr(build, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        run_api(pictures / "pics", out)
    assert (out / "topk.parquet").exists() and not (out / "manifest.json").exists()
    with pytest.raises(RunError, match="unfinished atlas"):
        fm.open_atlas(out)
    # a part half written by a killed process, and a stray temporary file: cleared on resume
    stale = out / "parts" / ".part-000002.tmp-999999-deadbeef"
    stale.mkdir()
    (stale / "stats.parquet").write_bytes(b"half a file")
    (out / ".topk.parquet.tmp-999999-deadbeef").write_bytes(b"half a file")
    monkeypatch.setattr(build, "write_manifest", real)
    from featuremaps.atlas import engine

    def no_compute(*args, **kwargs):
        raise AssertionError("every part is there: nothing to compute")

    monkeypatch.setattr(engine, "batch_stats", no_compute)
    finished = run_api(pictures / "pics", out, resume=True)
    assert not stale.exists() and not (out / ".topk.parquet.tmp-999999-deadbeef").exists()
    assert_same(finished, reference)
