"""The viewer's back room: a bounded model cache, the run store on disk and the job queue.

Everything here is plain threads and locks; the FastAPI layer (``app.py``) only calls into a
:class:`Viewer` made by :func:`featuremaps.web.create_app`. No module-level state: every cache,
lock and counter belongs to one ``Viewer``.

Life of a run (a *job*)::

    queued -> loading -> running -> rendering -> done
                  \\          \\          \\-> failed (error + message)

- ``loading``: the model is taken from the cache or built (``load_model``); at most
  ``max_cached_models`` models stay loaded (least recently used goes first);
- ``running``: one forward pass (``capture``) under that model's lock, so two users of one
  model queue instead of racing;
- ``rendering``: the maps are in memory (the page can draw from them already) while the run
  folder is written the way ``featuremaps show`` writes it (``show.show_pictures``,
  ``show.show_report``, ``runs.save_run``: pictures, index.html, manifest, raw maps);
- ``done``: the maps stay in a small in-memory LRU (bounded in bytes) and are read back with
  ``runs.load_run`` when they were dropped. Finished runs beyond ``max_runs`` are deleted,
  oldest first.
"""

from __future__ import annotations

import re
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import runs, show
from ..capture import capture
from ..errors import Busy, FeatureMapsError, NotReady, RunError, UnknownRun
from ..maps import FeatureMaps
from ..models import Model
from ..stats import clean_stats
from .caches import BytesCache, MapsCache, ModelCache
from .tiles import layer_summary

#: A run id: 16 lowercase hex digits, nothing else (it becomes a folder name).
RUN_ID_RE = re.compile(r"^[0-9a-f]{16}$")
STATES: tuple[str, ...] = ("queued", "loading", "running", "rendering", "done", "failed")
FINISHED = frozenset({"done", "failed"})
#: Words the page may send as ``layers``; anything else must look like layer names / globs.
LAYER_CHOICES: tuple[str, ...] = ("default", "conv", "relu", "pool", "norm", "all")
LAYER_SPEC_RE = re.compile(r"^[A-Za-z0-9_.*?#\[\]-]+(,[A-Za-z0-9_.*?#\[\]-]+)*$")


def new_run_id() -> str:
    return secrets.token_hex(8)


def valid_run_id(run_id: str) -> bool:
    return isinstance(run_id, str) and RUN_ID_RE.fullmatch(run_id) is not None


# --------------------------------------------------------------------------------------------------
# Requests and jobs
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunRequest:
    """What one run asks for; already checked against the allow-lists."""

    model: str
    weights: str  # "DEFAULT", "random", or "checkpoint:KEY"
    mode: str
    layers: str  # one of LAYER_CHOICES or names/globs
    size: int | None
    image: Any = field(repr=False)  # PIL RGB image, decoded and checked
    source: str = "upload"  # "sample:chelsea" or the upload's file name, for the page only

    def layers_arg(self) -> str | None:
        if self.layers == "default":
            return "conv" if self.mode == "network" else None
        return self.layers


class Job:
    """One run: its request, where it stands, and what came out of it."""

    def __init__(self, run_id: str, request: RunRequest | None, *, created: float | None = None):
        self.id = run_id
        self.request = request
        self.state = "queued"
        self.message = "waiting for a worker"
        self.error: str | None = None
        self.error_type: str | None = None
        self.created = created if created is not None else time.time()
        self.started: float | None = None
        self.captured: float | None = None  # when the forward pass ended (time.time())
        self.finished: float | None = None
        self.timings: dict[str, float] = {}
        self.info: dict[str, Any] = {}  # model, weights, pretrained, mode, input_size, notes
        self.layers: list[dict[str, Any]] = []
        self.done_event = threading.Event()

    @property
    def is_finished(self) -> bool:
        return self.state in FINISHED

    def set(self, state: str, message: str) -> None:
        self.state, self.message = state, message

    def to_dict(self) -> dict[str, Any]:
        req = self.request
        out: dict[str, Any] = {
            "id": self.id,
            "state": self.state,
            "message": self.message,
            "error": self.error,
            "error_type": self.error_type,
            "created": self.created,
            "captured_at": self.captured,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "request": None
            if req is None
            else {
                "model": req.model,
                "weights": req.weights,
                "mode": req.mode,
                "layers": req.layers,
                "size": req.size,
                "source": req.source,
            },
        }
        if self.state in ("rendering", "done"):
            out.update(self.info)
            out["layers"] = self.layers
        return out


# --------------------------------------------------------------------------------------------------
# The viewer service
# --------------------------------------------------------------------------------------------------
class Viewer:
    """Models, runs and jobs of one app instance."""

    def __init__(
        self,
        *,
        run_dir: Path,
        max_runs: int = 20,
        max_cached_models: int = 2,
        device: str = "cpu",
        checkpoints: Mapping[str, Path] | None = None,
        workers: int = 2,
        max_pending: int = 16,
        max_loaded_bytes: int = 1536 * 2**20,
        png_cache_bytes: int = 64 * 2**20,
        on_evict: Callable[[str], None] | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.max_runs = max(1, int(max_runs))
        self.max_pending = max(1, int(max_pending))
        self.models = ModelCache(max_cached_models, device=device, checkpoints=checkpoints)
        self.maps_cache = MapsCache(max_loaded_bytes)
        self.png_cache = BytesCache(png_cache_bytes)
        self.forward_passes = 0
        self.on_evict = on_evict
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._load_locks: dict[str, threading.Lock] = {}
        self._executor = ThreadPoolExecutor(max_workers=max(1, int(workers)), thread_name_prefix="featuremaps-run")
        self._adopt_existing()

    # -- bookkeeping -------------------------------------------------------------------------------
    def _adopt_existing(self) -> None:
        """Runs left in ``run_dir`` by an earlier viewer (marked with ``viewer_run_id``)."""
        found = []
        for folder in self.run_dir.iterdir():
            if not folder.is_dir() or not valid_run_id(folder.name):
                continue
            try:
                manifest = runs.read_manifest(folder)
            except RunError:
                continue
            if manifest.get("viewer_run_id") != folder.name:
                continue
            found.append((folder.stat().st_mtime, folder.name, manifest))
        for mtime, run_id, manifest in sorted(found):
            job = Job(run_id, None, created=mtime)
            self._fill_from_manifest(job, manifest)
            job.set("done", "loaded from the run folder")
            job.done_event.set()
            self._jobs[run_id] = job
        self._evict()

    def _fill_from_manifest(self, job: Job, manifest: Mapping[str, Any]) -> None:
        asked = str((manifest.get("viewer_request") or {}).get("weights") or "")
        job.info = {
            "model": manifest.get("model"),
            "weights": asked if asked.startswith("checkpoint:") else manifest.get("weights"),
            "pretrained": bool(manifest.get("pretrained")),
            "mode": manifest.get("mode"),
            "input_size": manifest.get("input_size"),
            "notes": list(manifest.get("notes") or ()),
            "source": manifest.get("viewer_source"),
        }
        job.layers = [
            {
                "index": i,
                "name": layer["name"],
                "kind": layer["kind"],
                "type": layer["type"],
                "shape": list(layer["shape"]),
                "spatial": len(layer["shape"]) == 4,
                "stats": clean_stats(layer["stats"]),
            }
            for i, layer in enumerate(manifest.get("layers", []))
        ]

    def folder(self, run_id: str) -> Path:
        if not valid_run_id(run_id):
            raise UnknownRun("no such run")
        return self.run_dir / run_id

    def job(self, run_id: str) -> Job:
        if not valid_run_id(run_id):
            raise UnknownRun(f"no run {run_id[:40]!r}")
        with self._lock:
            job = self._jobs.get(run_id)
        if job is None:
            raise UnknownRun(
                f"run {run_id} does not exist or was removed (the viewer keeps the last {self.max_runs} runs)"
            )
        return job

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def pending(self) -> int:
        with self._lock:
            return sum(1 for j in self._jobs.values() if not j.is_finished)

    def _evict(self) -> None:
        with self._lock:
            finished = [j for j in self._jobs.values() if j.is_finished]
            gone = finished[: max(0, len(finished) - self.max_runs)]
            for job in gone:
                self._jobs.pop(job.id, None)
        for job in gone:
            self.maps_cache.drop(job.id)
            if self.on_evict is not None:
                self.on_evict(job.id)
            shutil.rmtree(self.run_dir / job.id, ignore_errors=True)

    # -- submitting --------------------------------------------------------------------------------
    def submit(self, request: RunRequest) -> Job:
        with self._lock:
            waiting = sum(1 for j in self._jobs.values() if not j.is_finished)
            if waiting >= self.max_pending:
                raise Busy(f"{waiting} runs are already waiting; try again in a moment")
            run_id = new_run_id()
            while run_id in self._jobs:
                run_id = new_run_id()
            job = Job(run_id, request)
            self._jobs[run_id] = job
        self._executor.submit(self._run, job)
        return job

    def _run(self, job: Job) -> None:
        req = job.request
        assert req is not None
        job.started = time.time()
        try:
            loaded = self.models.is_loaded(req.model, req.weights)
            job.set(
                "loading", f"{req.model} is loaded" if loaded else f"loading {req.model}, {weights_label(req.weights)}"
            )
            t0 = time.perf_counter()
            model, run_lock = self.models.get(req.model, req.weights)
            if req.size is not None:
                model = model.with_size(req.size)
            job.timings["load_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            if run_lock.locked():
                job.set("loading", f"waiting for {req.model}: another run is using it")
            with run_lock:
                job.set("running", f"forward pass of {req.model} ({req.mode})")
                t1 = time.perf_counter()
                maps = capture(model, req.image, mode=req.mode, layers=req.layers_arg())
                with self._lock:
                    self.forward_passes += 1
            job.captured = time.time()
            job.timings["wait_s"] = t1 - t0
            job.timings["capture_s"] = time.perf_counter() - t1
            maps = maps.cpu()
            job.info = {
                "model": maps.model,
                # a checkpoint is shown by its allow-list key, not by its path on the server
                "weights": req.weights if req.weights.startswith("checkpoint:") else maps.weights,
                "pretrained": maps.pretrained,
                "mode": maps.mode,
                "input_size": list(maps.input_size),
                "notes": list(maps.notes),
                "source": req.source,
            }
            job.layers = [layer_summary(e, i) for i, e in enumerate(maps.entries)]
            # The page may draw from the maps while the folder is written: keep them in memory.
            self.maps_cache.put(job.id, maps, pinned=True)
            job.set("rendering", "writing the run folder")
            t0 = time.perf_counter()
            try:
                self._save(job, maps, model)
            finally:
                self.maps_cache.unpin(job.id)
            job.timings["save_s"] = time.perf_counter() - t0
            job.set("done", f"{len(maps)} maps captured")
        except FeatureMapsError as exc:
            self._fail(job, one_line(exc), type(exc).__name__)
        except Exception as exc:  # a bug or a torch error: still a clear message, never a dead server
            self._fail(job, f"the run failed: {type(exc).__name__}: {one_line(exc)}", "InternalError")
        finally:
            job.finished = time.time()
            if job.request is not None:  # the picture is in the run folder now; free the memory
                job.request = _without_image(job.request)
            job.done_event.set()
            self._evict()

    def _fail(self, job: Job, message: str, kind: str) -> None:
        job.error, job.error_type = message, kind
        job.layers, job.info = [], {}
        job.set("failed", message)
        self.maps_cache.drop(job.id)
        shutil.rmtree(self.run_dir / job.id, ignore_errors=True)

    def _save(self, job: Job, maps: FeatureMaps, model: Model) -> None:
        """The run folder, as ``featuremaps show`` writes it (overview, overlay, channel grids,
        filters, index.html, manifest, raw maps), plus the viewer's own manifest keys."""
        req = job.request
        assert req is not None
        pictures = runs.encode_pictures(show.show_pictures(maps, model=model))
        html = show.show_report(maps, pictures, source=req.source)
        extra = {
            "source": req.source,
            "render": {},
            "viewer_run_id": job.id,
            "viewer_source": req.source,
            "viewer_request": {
                "model": req.model,
                "weights": req.weights,
                "mode": req.mode,
                "layers": req.layers,
                "size": req.size,
            },
        }
        runs.save_run(maps, self.folder(job.id), pictures=pictures, files={"index.html": html}, extra=extra, raw=True)

    # -- reading runs back -------------------------------------------------------------------------
    def maps(self, run_id: str) -> FeatureMaps:
        """A run's maps, from memory or read back from its folder (``UnknownRun`` when it has none)."""
        job = self.job(run_id)
        if job.state not in ("rendering", "done"):
            raise NotReady(f"run {run_id} is {job.state}" + (f": {job.error}" if job.error else ""))
        maps = self.maps_cache.get(run_id)
        if maps is not None:
            return maps
        if job.state != "done":
            raise NotReady(f"run {run_id} is still being written")
        with self._lock:
            lock = self._load_locks.setdefault(run_id, threading.Lock())
        try:
            with lock:  # one reader per run; the others wait and take its result
                maps = self.maps_cache.get(run_id)
                if maps is None:
                    folder = self.folder(run_id)
                    if not folder.is_dir():
                        raise UnknownRun(f"run {run_id} was removed (the viewer keeps the last {self.max_runs} runs)")
                    maps = runs.load_run(folder)
                    self.maps_cache.put(run_id, maps)
        finally:
            with self._lock:
                self._load_locks.pop(run_id, None)
        return maps

    def wait(self, run_id: str, timeout: float | None = None) -> Job:
        job = self.job(run_id)
        job.done_event.wait(timeout)
        return job

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def weights_label(weights: str) -> str:
    """How the viewer names a weights choice (the menu, the progress line): ``random (not
    pretrained)``, ``pretrained (DEFAULT)``, ``checkpoint NAME``."""
    if weights == "random":
        return "random (not pretrained)"
    if weights.startswith("checkpoint:"):
        return f"checkpoint {weights.split(':', 1)[1]}"
    return f"pretrained ({weights})"


def _without_image(req: RunRequest) -> RunRequest:
    return RunRequest(req.model, req.weights, req.mode, req.layers, req.size, None, req.source)


def one_line(exc: BaseException) -> str:
    """An exception as one line of text for an HTTP error or a failed job."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
