"""``featuremaps atlas`` through typer's runner: one-line errors (exit 1) before any model loads,
a complete run with its summary, --resume after an interruption, SIGTERM's message, the progress bar."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

import featuremaps.models
from featuremaps.cli import app
from test_atlas_model import write_planted

runner = CliRunner()
MODEL = f"{Path(__file__).with_name('test_atlas_model.py').resolve()}:planted_net"
COMMON = ["--weights", "random", "--layers", "features.0,features.3", "--size", "32", "--batch-size", "3",
          "--workers", "0", "--top-k", "4", "--part-size", "6"]  # fmt: skip


def run(*args: str):
    return runner.invoke(app, ["atlas", *args], catch_exceptions=False)


def one_line_error(result, pattern: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and re.search(pattern, lines[0]), lines[0]


@pytest.fixture
def pics(tmp_path):
    write_planted(tmp_path / "pics")
    return tmp_path / "pics"


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load weights fails the test: these errors must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was found")

    monkeypatch.setattr(featuremaps.models, "load_model", refuse)


def test_mistakes_answer_in_one_line_before_any_model_loads(tmp_path, pics, no_model):
    (tmp_path / "empty").mkdir()
    out = str(tmp_path / "atlas")
    one_line_error(run(str(tmp_path / "missing"), "--out", out), "missing not found; pass a folder of images")
    one_line_error(run(str(tmp_path / "empty"), "--model", "alexnet", "--out", out), "holds no images")
    one_line_error(run(str(pics), "--top-k", "0", "--out", out), "top-k must be an integer >= 1, not 0 \\(--top-k\\)")
    one_line_error(run(str(pics), "--batch-size", "0", "--out", out), "batch size must be an integer >= 1")
    one_line_error(run(str(pics), "--engine", "spark", "--out", out), "unknown engine 'spark'; use local")
    one_line_error(run(str(pics), "--resume", "--force", "--out", out), "give one of them")
    one_line_error(run(str(pics), "--portraits", "--no-report", "--out", out), "drop --no-report")
    # a typo in --layers is found on the architecture alone (meta device), before weights load
    one_line_error(
        run(str(pics), "--model", "alexnet", "--layers", "features.1O", "--out", out),
        "no layer named 'features.1O'; did you mean features.1, ",
    )
    one_line_error(
        run(str(pics), "--model", "alexnet", "--layers", "classifier.1", "--out", out), "not \\(N, C, H, W\\) maps"
    )
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("mine")
    one_line_error(run(str(pics), "--out", str(other), "--force"), "is not an atlas featuremaps wrote")
    assert not (tmp_path / "atlas").exists()


def test_a_run_then_the_folder_rules(tmp_path, pics):
    out = tmp_path / "atlas"
    (pics / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    r = run(str(pics), "--model", MODEL, *COMMON, "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "atlas of 12 images, 1 skipped" in r.stdout and f"wrote {out}/" in r.stdout
    assert "features.3: 2 channels, 16x16, receptive field 8x8 px" in r.stdout
    assert "RANDOM weights" in r.stderr
    assert "ran with RANDOM weights (random(seed=0))" in (out / "index.html").read_text(encoding="utf-8")
    for name in ("manifest.json", "index.html", "topk.parquet", "skipped.csv", "histograms.parquet"):
        assert (out / name).is_file(), name
    one_line_error(run(str(pics), "--model", MODEL, *COMMON, "--out", str(out)), "already holds a finished atlas")
    r = run(str(pics), "--model", MODEL, *COMMON, "--out", str(out), "--resume")
    assert r.exit_code == 0 and "already a complete atlas: nothing to resume" in r.stderr
    r = run(str(pics), "--model", MODEL, *COMMON, "--out", str(out), "--force", "--quiet")
    assert r.exit_code == 0 and r.stdout == ""


def test_interrupted_then_resumed(tmp_path, pics, monkeypatch):
    out = tmp_path / "atlas"
    from featuremaps.atlas import engine
    from featuremaps.cli.common import Terminated

    real = engine.batch_stats
    calls = {"n": 0}

    def stop_in_the_second_part(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # parts of 6 images, batches of 3: the third batch is in the second part
            raise Terminated()
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "batch_stats", stop_in_the_second_part)
    r = run(str(pics), "--model", MODEL, *COMMON, "--out", str(out))
    assert r.exit_code == 143
    assert "terminated; 1 finished parts are kept" in r.stderr and "--resume to finish" in r.stderr
    one_line_error(run(str(pics), "--model", MODEL, *COMMON, "--out", str(out)), "holds an unfinished atlas")
    one_line_error(
        run(str(pics), "--model", MODEL, *COMMON, "--top-k", "5", "--out", str(out), "--resume"),
        "was started with --top-k 4, not 5",
    )
    monkeypatch.setattr(engine, "batch_stats", real)
    r = run(str(pics), "--model", MODEL, *COMMON, "--out", str(out), "--resume")
    assert r.exit_code == 0, r.output
    assert "atlas of 11 images" in r.stdout


def test_the_progress_bar_shows_images_per_second_and_the_time_left():
    import time

    from featuremaps.cli import atlas as cli_atlas

    bar = cli_atlas._progress(False)
    task = bar.add_task("vgg16 over photos/", total=400, completed=100)
    for done in (110, 120, 130):
        time.sleep(0.05)
        bar.update(task, completed=done)
    console = Console(file=io.StringIO(), force_terminal=True, width=160, record=True)
    console.print(bar.make_tasks_table(bar.tasks))
    text = console.export_text()
    speed, left = bar.tasks[0].speed, bar.tasks[0].time_remaining
    assert speed is not None and speed > 0 and left is not None
    assert "130/400" in text and f"{speed:.1f} img/s" in text  # rich's own estimate over the last updates
    hours, minutes, seconds = (int(v) for v in re.search(r"ETA\s+(\d+):(\d\d):(\d\d)", text).groups())
    assert hours * 3600 + minutes * 60 + seconds == int(left)  # the time left: 270 images at that speed


def test_the_cli_reports_progress_to_the_bar(tmp_path, pics, monkeypatch):
    """The command hands the library's progress calls to the bar: every batch, up to the total."""
    from featuremaps.cli import atlas as cli_atlas

    seen = []
    real = cli_atlas._progress

    def spy(quiet):
        bar = real(quiet)
        update = bar.update

        def record(task, **kw):
            if "completed" in kw:
                seen.append((next(t.total for t in bar.tasks if t.id == task), kw["completed"]))
            return update(task, **kw)

        bar.update = record
        return bar

    monkeypatch.setattr(cli_atlas, "_progress", spy)
    r = run(str(pics), "--model", MODEL, *COMMON, "--out", str(tmp_path / "atlas"))
    assert r.exit_code == 0, r.output
    assert seen == [(11, 3), (11, 6), (11, 9), (11, 11)]  # 11 pictures in batches of 3 (parts of 6)
