"""The viewer's back room: admission, the job queue, the run store on disk and its budgets.

Everything here is plain threads and locks; the FastAPI layer (``app.py``) only calls into a
:class:`Viewer` made by :func:`featuremaps.web.create_app`. No module-level state: every cache,
lock, budget and counter belongs to one ``Viewer``.

Life of a run (a *job*)::

    admitted -> queued -> loading -> running -> rendering -> done
       \\            \\          \\          \\          \\-> failed (error + message)
        \\-> 413/429 before anything is read or decoded

- *admission* (:meth:`Viewer.admit`, before the upload is decoded): the run's memory and disk are
  estimated from the model's output shapes (a capture of the model's skeleton on the meta
  device: exact shapes, nothing computed, a few ms); a run that could never fit the budgets is
  refused with a 413 and a one-line reason; beyond ``max_pending`` runs waiting, or
  ``max_pending_per_client`` for one client, with a 429;
- ``queued``: waiting for a worker (clients take turns) and then for its memory: every run
  reserves its estimated peak (and its model's weights, when not loaded) from the memory budget
  before it starts, so that runs side by side never hold more than ``max_memory`` together;
- ``loading``: the model is taken from the cache or built (``load_model``);
- ``running``: one forward pass (``capture``) under that model's lock;
- ``rendering``: the maps are made compact (:mod:`~featuremaps.web.compact`: numbers, reductions,
  float16 channel maps) and the page draws from them while the run folder is written the way
  ``featuremaps show`` writes it, within the disk budget (oldest runs are evicted to make room);
- ``done``: what the page needs stays in a byte-bounded cache (a few MB per run) and the channel
  maps are read from the folder on demand. Finished runs beyond ``max_runs``, or beyond
  ``max_disk`` bytes on disk, are deleted, oldest first.

The store (``run_dir``) survives restarts: runs this viewer wrote are adopted again, temporary
folders of killed runs are cleared, and one viewer at a time uses a store (a lock file).
"""

from __future__ import annotations

import contextlib
import math
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import render, runs, show
from ..capture import capture
from ..errors import Busy, FeatureMapsError, NotReady, RunError, TooLarge, UnknownRun, ViewerError
from ..maps import FeatureMap, FeatureMaps
from ..memory import release_freed_memory
from ..models import Model, skeleton
from ..stats import clean_stats
from .caches import ArrayCache, Budget, BytesCache, ModelCache, fmt_bytes, process_rss
from .compact import LiveRun, RunData, layer_nbytes, read_channel, read_layer, read_run, viewer_files
from .tiles import ChannelReader, LayerReader, layer_summary

#: A run id: 16 lowercase hex digits, nothing else (it becomes a folder name).
RUN_ID_RE = re.compile(r"^[0-9a-f]{16}$")
STATES: tuple[str, ...] = ("queued", "loading", "running", "rendering", "done", "failed")
FINISHED = frozenset({"done", "failed"})
#: Words the page may send as ``layers``; anything else must look like layer names / globs.
LAYER_CHOICES: tuple[str, ...] = ("default", "conv", "relu", "pool", "norm", "all")
LAYER_SPEC_RE = re.compile(r"^[A-Za-z0-9_.*?#\[\]-]+(,[A-Za-z0-9_.*?#\[\]-]+)*$")

#: Memory the process needs beyond what it held at start and what is reserved: torch's first
#: forward pass, allocator slack after large runs, request handling, PNG encoding, threads.
RUNTIME_MARGIN = 320 * 2**20
#: Per run, on top of its maps: the input tensor, the report, bookkeeping.
RUN_OVERHEAD = 48 * 2**20
#: A loaded model takes its weights and about a third more (buffers, allocator rounding).
MODEL_FACTOR = 1.35
MODEL_OVERHEAD = 32 * 2**20
#: The run folder beside its maps and grids: overview, overlay, report, manifest, per-file blocks.
FOLDER_OVERHEAD = 8 * 2**20
FILE_BLOCK = 4096
#: Channels per grid page in the run folder (``show.show_pictures``' default).
FOLDER_PER_PAGE = 512
LOCK_FILE = ".featuremaps-viewer.lock"
OWN_PREFIX = "featuremaps-viewer-"


def new_run_id() -> str:
    return secrets.token_hex(8)


def valid_run_id(run_id: str) -> bool:
    return isinstance(run_id, str) and RUN_ID_RE.fullmatch(run_id) is not None


# --------------------------------------------------------------------------------------------------
# Requests, estimates and jobs
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunRequest:
    """What one run asks for; already checked against the allow-lists."""

    model: str
    weights: str  # "DEFAULT", "random", or "checkpoint:KEY"
    mode: str
    layers: str  # one of LAYER_CHOICES or names/globs
    size: int | None
    image: Any = field(repr=False)  # PIL RGB image, decoded, checked and resized to the model's input
    source: str = "upload"  # "sample:chelsea" or the upload's file name, for the page only
    client: str = ""  # who asked (the client's address), for taking turns

    def layers_arg(self) -> str | None:
        if self.layers == "default":
            return "conv" if self.mode == "network" else None
        return self.layers


def _grid_pixels(channels: int, h: int, w: int) -> int:
    """Pixels of the channel grid pages the run folder gets for one layer (palette images: bytes)."""
    total = 0
    for start in range(0, channels, FOLDER_PER_PAGE):
        n = min(FOLDER_PER_PAGE, channels - start)
        g = render.grid_geometry(n, (h, w))
        total += g.width * (g.grid_h + 200)  # header and colorbar
    return total


@dataclass(frozen=True)
class Estimate:
    """What a run will take, from its output shapes (bytes)."""

    entries: int
    outputs: int  # every captured output, float32
    largest: int  # the largest one
    stored: int  # the compact channel maps (float16)
    pictures: int  # the run folder's channel grids (palette pixels: their PNGs are at most that)
    reduced: int  # the four reductions of every spatial layer
    model: int  # the model's weights
    pixels: tuple[int, int] = (224, 224)

    @classmethod
    def of(cls, entries: tuple[FeatureMap, ...] | list[FeatureMap], model_bytes: int) -> Estimate:
        outputs = largest = stored = pictures = reduced = 0
        for e in entries:
            n = int(math.prod(e.shape))
            outputs += 4 * n
            largest = max(largest, 4 * n)
            if e.is_spatial and e.spatial_size is not None:
                h, w = e.spatial_size
                stored += 2 * n
                pictures += _grid_pixels(e.num_channels, h, w)
                reduced += 16 * h * w
            else:
                stored += 4 * n
        return cls(len(entries), outputs, largest, stored, pictures, reduced, int(model_bytes))

    @property
    def memory(self) -> int:
        """The run's peak, its model's weights aside: every output at once during the capture
        (plus the forward pass's own activations), or the compact maps and the run folder's
        pictures (and their PNGs) while the folder is written."""
        capture_peak = self.outputs + 3 * self.largest
        save_peak = self.stored + 2 * self.pictures + 2 * self.largest + self.reduced
        return max(capture_peak, save_peak) + RUN_OVERHEAD

    @property
    def model_memory(self) -> int:
        return int(self.model * MODEL_FACTOR) + MODEL_OVERHEAD

    @property
    def disk(self) -> int:
        return self.stored + self.pictures + self.reduced + FOLDER_OVERHEAD + 4 * FILE_BLOCK * self.entries

    def describe(self) -> str:
        return f"{self.entries} maps of {fmt_bytes(self.outputs)}"


class Job:
    """One run: its request, where it stands, and what came out of it."""

    def __init__(self, run_id: str, request: RunRequest | None, *, created: float | None = None):
        self.id = run_id
        self.request = request
        self.client = request.client if request is not None else ""
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
        self.estimate: Estimate | None = None
        self.live: LiveRun | None = None  # what the page draws from while the folder is written
        self.disk_bytes = 0
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
        if self.estimate is not None:
            out["estimate"] = {"memory_bytes": self.estimate.memory, "disk_bytes": self.estimate.disk}
        if self.state in ("rendering", "done"):
            out.update(self.info)
            out["layers"] = self.layers
            out["disk_bytes"] = self.disk_bytes
        return out


# --------------------------------------------------------------------------------------------------
# The store's lock
# --------------------------------------------------------------------------------------------------
class StoreLock:
    """One viewer at a time per run store: an exclusive lock on a file in it, let go when the
    process ends, however it ends (``kill -9`` too)."""

    def __init__(self, root: Path):
        self.path = root / LOCK_FILE
        self._file: Any = None

    def acquire(self) -> bool:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return True
        f = open(self.path, "a+")  # noqa: SIM115  (held open: the lock lives as long as the file)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        self._file = f
        return True

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def clear_orphan_stores(parent: Path) -> list[Path]:
    """Remove the temporary stores of viewers that are gone (killed before they could remove
    their own): ``featuremaps-viewer-*`` folders with a store lock that nobody holds."""
    removed = []
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(OWN_PREFIX) and p.is_dir()]
    except OSError:
        return removed
    for path in candidates:
        if path.is_symlink() or not (path / LOCK_FILE).is_file():
            continue
        lock = StoreLock(path)
        if lock.acquire():
            try:
                shutil.rmtree(path, ignore_errors=True)
            finally:
                lock.release()
            if not path.exists():
                removed.append(path)
    return removed


def folder_bytes(folder: Path) -> int:
    """What a folder takes on disk (allocated blocks, not apparent sizes)."""
    total = 0
    for p in folder.rglob("*"):
        try:
            st = p.lstat()
        except OSError:
            continue
        blocks = getattr(st, "st_blocks", None)
        total += blocks * 512 if blocks is not None else st.st_size
    return total


# --------------------------------------------------------------------------------------------------
# The viewer service
# --------------------------------------------------------------------------------------------------
class Viewer:
    """Models, runs, jobs and budgets of one app instance.

    Args:
        run_dir: the run store (made if missing).
        own_dir: ``run_dir`` is a temporary store of this viewer, removed by :meth:`close`.
        max_memory: bytes the whole process may hold (its resident memory); what it held when the
            viewer was made, a runtime margin and the caches' limits are set aside, the rest goes to
            models, runs, decodes and grids, each reserved before it is allocated.
        max_disk: bytes the store may take.
    """

    def __init__(
        self,
        *,
        run_dir: Path,
        own_dir: bool = False,
        max_runs: int = 20,
        max_cached_models: int = 2,
        device: str = "cpu",
        checkpoints: Mapping[str, Path] | None = None,
        workers: int = 2,
        max_pending: int = 16,
        max_pending_per_client: int | None = None,
        max_memory: int = 4 * 2**30,
        max_disk: int = 4 * 2**30,
        png_cache_bytes: int = 64 * 2**20,
        array_cache_bytes: int = 128 * 2**20,
        max_downloads: int = 4,
        on_evict: Callable[[str], None] | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.own_dir = own_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._store_lock = StoreLock(self.run_dir)
        if not self._store_lock.acquire():
            raise ViewerError(
                f"the run store {self.run_dir} is in use by another featuremaps viewer; "
                "stop that one or give this one another --run-dir"
            )
        self.max_runs = max(1, int(max_runs))
        self.max_pending = max(1, int(max_pending))
        self.max_pending_per_client = max(
            1, int(max_pending_per_client) if max_pending_per_client else math.ceil(self.max_pending / 4)
        )
        self.baseline = process_rss()
        fixed = self.baseline + RUNTIME_MARGIN + int(png_cache_bytes) + int(array_cache_bytes)
        if int(max_memory) < fixed + 64 * 2**20:
            self._store_lock.release()
            raise ViewerError(
                f"a memory limit of {fmt_bytes(max_memory)} is too small: the viewer holds {fmt_bytes(self.baseline)} "
                f"already and sets {fmt_bytes(fixed - self.baseline)} aside for its caches and margin; "
                f"give --max-memory at least {fmt_bytes(fixed + 512 * 2**20)}"
            )
        self.memory = Budget(int(max_memory), fixed, observe=process_rss, relieve=release_freed_memory)
        self.disk = Budget(int(max_disk))
        self.models = ModelCache(max_cached_models, device=device, checkpoints=checkpoints, on_drop=self._model_dropped)
        self.cache = ArrayCache(array_cache_bytes)
        self.png_cache = BytesCache(png_cache_bytes)
        self.forward_passes = 0
        self.on_evict = on_evict
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._queue: OrderedDict[str, deque[Job]] = OrderedDict()
        self._served: dict[str, int] = {}  # client -> when a run of theirs was last started (a count)
        self._turn = 0
        self._start_lock = threading.Lock()  # runs reserve their memory one at a time, in turn
        self._pins: Counter[str] = Counter()
        self._downloads = threading.BoundedSemaphore(max(1, int(max_downloads)))
        self._skeletons: OrderedDict[tuple[str, int | None], Model | None] = OrderedDict()
        self._estimates: OrderedDict[tuple, Estimate | None] = OrderedDict()
        self._closed = False
        self.cleared_parts = [p.name for p in runs.clear_stale_parts(self.run_dir)]
        self._adopt_existing()
        self._workers = max(1, int(workers))
        self._threads: list[threading.Thread] = []  # started with the first run

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
            job.disk_bytes = folder_bytes(self.run_dir / run_id)
            job.set("done", "loaded from the run folder")
            job.done_event.set()
            self._jobs[run_id] = job
            self.disk.set(("run", run_id), job.disk_bytes)
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
                "channels": int(layer["shape"][1]) if len(layer["shape"]) >= 2 else 1,
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
                f"run {run_id} does not exist or was removed (the viewer keeps the last {self.max_runs} runs "
                f"and at most {fmt_bytes(self.disk.limit)} of them)"
            )
        return job

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def pending(self) -> int:
        with self._lock:
            return sum(1 for j in self._jobs.values() if not j.is_finished)

    def _evict_one(self, keep: str | None = None) -> bool:
        """Delete the oldest finished run (none in use by a download); False when there is none."""
        with self._lock:
            gone = next(
                (j for j in self._jobs.values() if j.is_finished and j.id != keep and not self._pins[j.id]), None
            )
            if gone is None:
                return False
            self._jobs.pop(gone.id, None)
        self._forget(gone.id)
        return True

    def _forget(self, run_id: str) -> None:
        self.cache.drop(lambda k: isinstance(k, tuple) and k[0] == run_id)
        if self.on_evict is not None:
            self.on_evict(run_id)
        shutil.rmtree(self.run_dir / run_id, ignore_errors=True)
        self.disk.release(("run", run_id))

    def _evict(self) -> None:
        """Finished runs beyond ``max_runs``, and beyond the disk limit, oldest first."""
        while True:
            with self._lock:
                finished = sum(1 for j in self._jobs.values() if j.is_finished)
            if finished <= self.max_runs and self.disk.free >= 0:
                return
            if not self._evict_one():
                return

    def _model_dropped(self, key: tuple[str, str]) -> None:
        self.memory.release(("model", *key))

    # -- admission ---------------------------------------------------------------------------------
    def _skeleton(self, name: str, size: int | None) -> Model | None:
        key = (name, size)
        with self._lock:
            if key in self._skeletons:
                self._skeletons.move_to_end(key)
                return self._skeletons[key]
        sk = skeleton(name, size=size)
        with self._lock:
            self._skeletons[key] = sk
            while len(self._skeletons) > 8:
                self._skeletons.popitem(last=False)
        return sk

    def estimate(self, req: RunRequest) -> Estimate | None:
        """What ``req`` will take, from the shapes of a capture of the model's skeleton on the meta
        device (None for a user's own model: estimated once it is loaded). Raises the library's
        error when the run cannot work (a layer that does not exist, a mode that does not fit)."""
        key = (req.model, req.mode, req.layers, req.size)
        with self._lock:
            if key in self._estimates:
                self._estimates.move_to_end(key)
                return self._estimates[key]
        sk = self._skeleton(req.model, req.size)
        est = None
        if sk is not None:
            pre = sk.preprocessing
            x = torch.zeros(1, pre.channels, *pre.size, device="meta")
            maps = capture(sk, x, mode=req.mode, layers=req.layers_arg())
            est = replace(
                Estimate.of(maps.entries, sum(p.numel() * p.element_size() for p in sk.module.parameters())),
                pixels=(pre.size[1], pre.size[0]),
            )
        with self._lock:
            self._estimates[key] = est
            while len(self._estimates) > 64:
                self._estimates.popitem(last=False)
        return est

    def input_size(self, req: RunRequest) -> tuple[int, int]:
        """``(width, height)`` of the picture the model takes (uploads are resized to it at once)."""
        try:
            est = self.estimate(req)
        except Exception:  # the run fails later with the library's message
            est = None
        if est is not None:
            return est.pixels
        side = req.size or 224
        return (side, side)

    def fit_picture(self, req: RunRequest, image: Any) -> Any:
        """The picture resized to the model's input as the model's preprocessing resizes it (so
        that the capture's own resize has nothing left to do), or, for a user's own model, as the
        library resizes for such models (bilinear, to ``size`` or 224)."""
        try:
            sk = self._skeleton(req.model, req.size)
        except Exception:
            sk = None
        if sk is not None:
            return sk.preprocessing.resize(image)
        from PIL import Image

        w, h = self.input_size(req)
        return image if image.size == (w, h) else image.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=None)

    def check_fits(self, req: RunRequest, est: Estimate | None) -> None:
        """Refuse (413) a run that could never fit the memory or disk limits."""
        if est is None:
            return
        model = 0 if self.models.is_loaded(req.model, req.weights) else est.model_memory
        need = est.memory + model
        what = f"{req.model} in {req.mode} mode at {est.pixels[0]}x{est.pixels[1]} ({est.describe()})"
        if need > self.memory.room:
            raise TooLarge(
                f"{what} needs about {fmt_bytes(need)} of memory, more than the {fmt_bytes(self.memory.room)} this "
                f"viewer may use for runs (--max-memory {fmt_bytes(self.memory.limit)}); choose a smaller size, fewer "
                "layers or network mode"
            )
        if est.disk > self.disk.limit:
            raise TooLarge(
                f"{what} needs about {fmt_bytes(est.disk)} on disk, more than the store's limit of "
                f"{fmt_bytes(self.disk.limit)} (--max-disk); choose a smaller size or fewer layers"
            )

    def admit(self, req: RunRequest) -> Job:
        """Take a run in before its image is decoded (:meth:`enqueue` hands the image over,
        :meth:`discard` gives the place back). A run that cannot work is returned failed.

        Raises:
            TooLarge: the run could never fit the memory or disk limits (413).
            Busy: too many runs are waiting, or too many of this client's (429).
        """
        failure: FeatureMapsError | None = None
        try:
            est = self.estimate(req)
        except FeatureMapsError as exc:
            est, failure = None, exc
        except Exception:  # a model the meta device cannot run: estimated once it is loaded
            est = None
        self.check_fits(req, est)
        with self._lock:
            if self._closed:
                raise Busy("the viewer is shutting down")
            waiting = [j for j in self._jobs.values() if not j.is_finished]
            if len(waiting) >= self.max_pending:
                raise Busy(f"{len(waiting)} runs are already waiting; try again in a moment")
            mine = sum(1 for j in waiting if j.client == req.client)
            if mine >= self.max_pending_per_client:
                raise Busy(
                    f"you have {mine} runs waiting already (at most {self.max_pending_per_client} per client); "
                    "wait for one to finish"
                )
            run_id = new_run_id()
            while run_id in self._jobs:
                run_id = new_run_id()
            job = Job(run_id, req)
            job.estimate = est
            job.set("queued", "reading the image")
            self._jobs[run_id] = job
        if failure is not None:
            self._fail(job, one_line(failure), type(failure).__name__)
            job.done_event.set()
        return job

    def enqueue(self, job: Job, image: Any) -> Job:
        """Hand an admitted run its (decoded, resized) picture and queue it."""
        assert job.request is not None
        job.request = replace(job.request, image=image)
        with self._cv:
            job.set("queued", "waiting for a worker")
            self._queue.setdefault(job.client, deque()).append(job)
            if not self._threads and not self._closed:
                self._threads = [
                    threading.Thread(target=self._work, name=f"featuremaps-run-{i}", daemon=True)
                    for i in range(self._workers)
                ]
                for t in self._threads:
                    t.start()
            self._cv.notify()
        return job

    def discard(self, job: Job) -> None:
        """Forget an admitted run whose image could not be read."""
        with self._lock:
            self._jobs.pop(job.id, None)

    def submit(self, request: RunRequest) -> Job:
        """Admit and queue a run whose picture is ready."""
        job = self.admit(request)
        if job.is_finished:
            return job
        return self.enqueue(job, request.image)

    @contextlib.contextmanager
    def reserved(self, key: Any, nbytes: int, *, what: str, timeout: float = 30.0) -> Iterator[None]:
        """Hold ``nbytes`` of the memory budget for a short task (a decode, a grid); 429 when it
        cannot be had within ``timeout`` seconds, 413 when it could never fit."""
        if nbytes > self.memory.room:
            raise TooLarge(
                f"{what} needs about {fmt_bytes(nbytes)} of memory, more than this viewer may use "
                f"(--max-memory {fmt_bytes(self.memory.limit)})"
            )
        if not self.memory.reserve(key, nbytes, timeout=timeout, make_room=self._drop_idle_model):
            raise Busy(f"the viewer is busy with other runs ({what} waits for memory); try again in a moment")
        try:
            yield
        finally:
            self.memory.release(key)

    def _drop_idle_model(self, missing: int, keep: tuple[str, str] | None = None) -> bool:
        return self.models.drop_idle(keep=keep)

    # -- the queue ---------------------------------------------------------------------------------
    def _next_job(self) -> Job | None:
        """The next job, clients in turn: of the clients with runs waiting, the one whose run was
        started longest ago (or never) goes first (called with the lock held)."""
        if not self._queue:
            return None
        client = min(self._queue, key=lambda c: self._served.get(c, -1))  # ties: who queued first
        jobs = self._queue.pop(client)
        job = jobs.popleft()
        if jobs:
            self._queue[client] = jobs
        self._turn += 1
        self._served[client] = self._turn
        if len(self._served) > 4096:  # forget clients with nothing waiting
            self._served = {c: t for c, t in self._served.items() if c in self._queue or t > self._turn - 1024}
        return job

    def _work(self) -> None:
        while True:
            with self._cv:
                job = self._next_job()
                while job is None and not self._closed:
                    self._cv.wait(1.0)
                    job = self._next_job()
                if job is None:
                    return
            self._run(job)

    def _reserve_run(self, job: Job, est: Estimate, model_key: tuple[str, str]) -> None:
        """Reserve the run's peak, and its model's weights when not loaded, waiting in turn."""
        req = job.request
        assert req is not None
        run_key = ("run", job.id)
        with self._start_lock:
            model_mem = 0 if self.memory.amount(("model", *model_key)) else est.model_memory
            need = est.memory + model_mem
            if need > self.memory.room:
                raise TooLarge(
                    f"{req.model} in {req.mode} mode ({est.describe()}) needs about {fmt_bytes(need)} of memory, more than "
                    f"the {fmt_bytes(self.memory.room)} this viewer may use for runs (--max-memory)"
                )
            if need > self.memory.free:
                job.set("queued", f"waiting for memory: other runs hold {fmt_bytes(self.memory.held())}")
            ok = self.memory.reserve(
                run_key,
                need,
                make_room=lambda missing: self._drop_idle_model(missing, keep=model_key),
                stop=lambda: self._closed,
            )
            if not ok:
                raise Busy("the viewer is shutting down")
            if model_mem:
                self.memory.set(run_key, est.memory)
                self.memory.set(("model", *model_key), model_mem)

    def _reserve_disk(self, job: Job, nbytes: int) -> None:
        """Reserve room in the store for the run folder, deleting the oldest runs to make it."""
        key = ("writing", job.id)
        have = self.disk.amount(key)
        if nbytes <= have:
            self.disk.set(key, nbytes)
            return
        if nbytes > self.disk.room:
            raise TooLarge(
                f"this run's folder takes {fmt_bytes(nbytes)}, more than the store's limit of "
                f"{fmt_bytes(self.disk.limit)} (--max-disk); choose a smaller size or fewer layers"
            )
        ok = self.disk.reserve(
            key, nbytes - have, make_room=lambda missing: self._evict_one(keep=job.id), stop=lambda: self._closed
        )
        if not ok:
            raise Busy("the viewer is shutting down")

    def _run(self, job: Job) -> None:
        req = job.request
        assert req is not None
        job.started = time.time()
        model_key = (req.model, req.weights)
        acquired = False
        try:
            est = job.estimate
            if est is not None:
                self._reserve_run(job, est, model_key)
            loaded = self.models.is_loaded(req.model, req.weights)
            job.set(
                "loading", f"{req.model} is loaded" if loaded else f"loading {req.model}, {weights_label(req.weights)}"
            )
            t0 = time.perf_counter()
            model, run_lock = self.models.acquire(req.model, req.weights)
            acquired = True
            if est is None:  # a user's own model: its shapes are known now
                est = self._estimate_loaded(model, req)
                job.estimate = est
                self.memory.set(("model", *model_key), max(self.memory.amount(("model", *model_key)), est.model_memory))
                self.check_fits(replace(req, image=None), replace(est, model=0))
                self._reserve_run(job, replace(est, model=0), model_key)
            if req.size is not None:
                model = model.with_size(req.size)
            job.timings["load_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            if run_lock.locked():
                job.set("loading", f"waiting for {req.model}: another run is using it")
            with run_lock:
                job.set("running", f"forward pass of {req.model} ({req.mode})")
                t1 = time.perf_counter()
                box = [capture(model, req.image, mode=req.mode, layers=req.layers_arg()).cpu()]
                with self._lock:
                    self.forward_passes += 1
            job.captured = time.time()
            job.timings["wait_s"] = t1 - t0
            job.timings["capture_s"] = time.perf_counter() - t1
            t0 = time.perf_counter()
            live = LiveRun(box)  # the page draws from it while it is made compact and written
            data = live.data
            job.timings["summary_s"] = time.perf_counter() - t0
            job.info = {
                "model": data.model,
                # a checkpoint is shown by its allow-list key, not by its path on the server
                "weights": req.weights if req.weights.startswith("checkpoint:") else data.weights,
                "pretrained": data.pretrained,
                "mode": data.mode,
                "input_size": list(data.input_size),
                "notes": list(data.notes),
                "source": req.source,
            }
            job.layers = [layer_summary(e, i) for i, e in enumerate(data.entries)]
            job.live = live
            job.set("rendering", "writing the run folder")
            t0 = time.perf_counter()
            stored, data = live.finish()  # each float32 output goes once its compact copy is made
            release_freed_memory()
            job.timings["compact_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            self._save(job, stored, data, model, est)
            del stored
            job.timings["save_s"] = time.perf_counter() - t0
            layers = runs.read_manifest(self.folder(job.id)).get("layers", [])
            data = replace(data, raw={i: str(layer["raw"]) for i, layer in enumerate(layers) if layer.get("raw")})
            self.cache.put((job.id, "data"), data, data.nbytes)
            job.set("done", f"{len(data.entries)} maps captured")
            job.live = None
        except FeatureMapsError as exc:
            self._fail(job, one_line(exc), type(exc).__name__)
        except Exception as exc:  # a bug or a torch error: still a clear message, never a dead server
            self._fail(job, f"the run failed: {type(exc).__name__}: {one_line(exc)}", "InternalError")
        finally:
            job.live = None
            if acquired:
                self.models.release(req.model, req.weights)
            self.memory.release(("run", job.id))
            self.disk.release(("writing", job.id))
            job.finished = time.time()
            job.request = replace(req, image=None)  # the picture is in the run folder now
            job.done_event.set()
            release_freed_memory()
            self._evict()

    def _estimate_loaded(self, model: Model, req: RunRequest) -> Estimate:
        """The estimate of a run of a loaded user model: a capture that keeps only the channel mean
        of each output (their shapes are what is needed; the full maps are never held)."""
        pre = model.preprocessing.with_size(req.size)
        x = torch.zeros(1, pre.channels, *pre.size, device=model.device)
        maps = capture(model.with_size(req.size), x, mode=req.mode, layers=req.layers_arg(), reduce="mean")
        weights = sum(p.numel() * p.element_size() for p in model.module.parameters())
        return replace(Estimate.of(maps.entries, weights), pixels=(pre.size[1], pre.size[0]))

    def _fail(self, job: Job, message: str, kind: str) -> None:
        job.error, job.error_type = message, kind
        job.layers, job.info = [], {}
        job.live = None
        job.set("failed", message)
        self.cache.drop(lambda k: isinstance(k, tuple) and k[0] == job.id)
        shutil.rmtree(self.run_dir / job.id, ignore_errors=True)

    def _save(self, job: Job, stored: FeatureMaps, data: RunData, model: Model, est: Estimate) -> None:
        """The run folder, as ``featuremaps show`` writes it (overview, overlay, channel grids,
        filters, index.html, manifest, raw maps), plus the viewer's own files and manifest keys,
        within the disk budget."""
        req = job.request
        assert req is not None
        self._reserve_disk(job, est.disk)
        pictures = runs.encode_pictures(show.show_pictures(stored, model=model))
        html = show.show_report(stored, pictures, source=req.source)
        files: dict[str, str | bytes] = {"index.html": html, **viewer_files(data)}
        exact = (
            sum(layer_nbytes(e) for e in stored.entries)
            + sum(len(p.encoded()) for p in pictures)
            + sum(len(v) for v in files.values())
            + (stored.image.width * stored.image.height * 3 if stored.image is not None else 0)
            + 256 * 1024  # the manifest
            + FILE_BLOCK * (len(pictures) + len(stored.entries) + len(files) + 8)
        )
        self._reserve_disk(job, exact)
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
        runs.save_run(stored, self.folder(job.id), pictures=pictures, files=files, extra=extra, raw=True)
        job.disk_bytes = folder_bytes(self.folder(job.id))
        self.disk.set(("run", job.id), job.disk_bytes)
        self.disk.release(("writing", job.id))

    # -- reading runs back -------------------------------------------------------------------------
    def _ready(self, run_id: str) -> Job:
        job = self.job(run_id)
        if job.state not in ("rendering", "done"):
            raise NotReady(f"run {run_id} is {job.state}" + (f": {job.error}" if job.error else ""))
        return job

    def data(self, run_id: str) -> RunData:
        """What the viewer keeps of a run: from the run being written, the cache, or its folder."""
        job = self._ready(run_id)
        live = job.live
        if live is not None:
            return live.data
        folder = self.folder(run_id)

        def load() -> tuple[RunData, int]:
            if not folder.is_dir():
                raise UnknownRun(f"run {run_id} was removed (the viewer keeps the last {self.max_runs} runs)")
            data = read_run(folder)
            return data, data.nbytes

        return self.cache.get_or_load((run_id, "data"), load)

    def layer_reader(self, run_id: str) -> LayerReader:
        """``layer(i)``: every channel of layer ``i`` as stored (``(C, H, W)``)."""
        job = self._ready(run_id)
        live = job.live
        if live is not None:
            return live.layer
        data = self.data(run_id)
        folder = self.folder(run_id)

        def layer(i: int) -> np.ndarray:
            def load() -> tuple[np.ndarray, int]:
                arr = read_layer(folder, data.raw[i])
                return arr, arr.nbytes

            return self.cache.get_or_load((run_id, "layer", i), load)

        return layer

    def channel_reader(self, run_id: str) -> ChannelReader:
        """``channel(i, pos)``: channel ``pos`` of layer ``i`` as ``(H, W)`` float32, read on its own."""
        job = self._ready(run_id)
        live = job.live
        if live is not None:
            return live.channel
        data = self.data(run_id)
        folder = self.folder(run_id)

        def channel(i: int, pos: int) -> np.ndarray:
            whole = self.cache.get((run_id, "layer", i))
            if whole is not None:
                return np.asarray(whole[pos], dtype=np.float32)
            return read_channel(folder, data.raw[i], pos)

        return channel

    def grid_memory(self, run_id: str, index: int) -> int:
        """What drawing one of a layer's channel grids holds at most: the stored layer, a float32
        copy, the tiles and the canvas."""
        data = self.data(run_id)
        if not 0 <= index < len(data.entries):
            return 0
        e = data.entries[index]
        n = int(e.tensor.nelement())
        return layer_nbytes(e) + 8 * n + render.MAX_SIDE**2 + 16 * 2**20

    def take_download(self, run_id: str) -> Callable[[], None]:
        """One of ``max_downloads`` downloads at once (429 beyond), its run kept from eviction
        meanwhile; returns what ends it (safe to call twice)."""
        if not self._downloads.acquire(blocking=False):
            raise Busy("too many downloads at once; try again when one has finished")
        with self._lock:
            self._pins[run_id] += 1
        once = threading.Lock()

        def release() -> None:
            if not once.acquire(blocking=False):
                return
            with self._lock:
                self._pins[run_id] -= 1
                if self._pins[run_id] <= 0:
                    del self._pins[run_id]
            self._downloads.release()

        return release

    def wait(self, run_id: str, timeout: float | None = None) -> Job:
        job = self.job(run_id)
        job.done_event.wait(timeout)
        return job

    def status(self) -> dict[str, Any]:
        """Budgets and caches, for ``/api/status``."""
        return {
            "memory": {
                "limit_bytes": self.memory.limit,
                "baseline_bytes": self.baseline,
                "set_aside_bytes": self.memory.fixed,
                "reserved_bytes": self.memory.held(),
                "rss_bytes": process_rss(),
            },
            "disk": {"limit_bytes": self.disk.limit, "used_bytes": self.disk.held(), "run_dir": str(self.run_dir)},
            "kept_bytes": self.cache.nbytes(),
            "png_cache_bytes": self.png_cache.nbytes(),
        }

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        deadline = time.monotonic() + 5
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=max(0.0, deadline - time.monotonic()))
        self._store_lock.release()
        if self.own_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def own_store() -> Path:
    """A new temporary run store (``featuremaps-viewer-*``); the ones of viewers that were killed
    are cleared first."""
    parent = Path(tempfile.gettempdir())
    clear_orphan_stores(parent)
    return Path(tempfile.mkdtemp(prefix=OWN_PREFIX, dir=parent))


def weights_label(weights: str) -> str:
    """How the viewer names a weights choice (the menu, the progress line): ``random (not
    pretrained)``, ``pretrained (DEFAULT)``, ``checkpoint NAME``."""
    if weights == "random":
        return "random (not pretrained)"
    if weights.startswith("checkpoint:"):
        return f"checkpoint {weights.split(':', 1)[1]}"
    return f"pretrained ({weights})"


def one_line(exc: BaseException) -> str:
    """An exception as one line of text for an HTTP error or a failed job."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
