"""The services behind the viewer's channel page and CAM panel: the atlases it serves, the CAMs of
its runs, and channel portraits made in the background. Everything drawn or computed here is asked
of the library (:class:`featuremaps.atlas.Atlas`, :func:`featuremaps.cam.cam`,
:func:`featuremaps.portrait.portrait_image`); this module only finds the model, holds the locks and
budgets, and keeps the results.

- :class:`Atlases`: the atlas folders given to ``serve --atlas`` (or ``Atlas`` objects), each by a
  short id; a channel of a run is matched with the atlases of the same model, weights and layer.
- :class:`CamService`: ``fm.cam`` on a run's picture with the run's model (from the viewer's model
  cache, under the model's forward-pass lock, within the memory budget); the last results kept.
- :class:`PortraitService`: a portrait is read from its cache folder (``compute=False``) or made by
  one background worker, one at a time (a few seconds on a GPU, minutes on a CPU); its state is
  polled (``none``, ``queued``, ``running``, ``done``, ``failed``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atlas import Atlas, open_atlas
from ..cam import CAM_METHODS, CamError, CamResult, cam, check_method
from ..errors import Busy, FeatureMapsError, LayerError, NotFound, ParamError, RunError
from ..runs import read_manifest
from .jobs import Viewer, one_line

#: Most images a channel page shows (crops are captured again, all at once).
MAX_TOP = 32
#: Portraits waiting for the worker before new requests get a 429.
MAX_PORTRAITS_WAITING = 8
#: CAM results kept (each holds the raw map, the upsampled one and the picture: a few hundred KB).
CAM_RESULTS = 16
#: What a CAM holds beyond the run's own estimate when none is known (a user's model).
CAM_FALLBACK_BYTES = 256 * 2**20
_ID_RE = re.compile(r"[^a-z0-9_-]+")


# --------------------------------------------------------------------------------------------------
# Atlases
# --------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class ServedAtlas:
    """One atlas the viewer serves: its id (in URLs), the library's :class:`Atlas`, a token that
    changes when the atlas folder is written again (it is in every cache key), and the lock that
    keeps its model to one capture at a time."""

    id: str
    atlas: Atlas
    token: str
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def reload(self) -> Mapping[str, Any] | None:
        return self.atlas.manifest.get("reload")

    def describe(self) -> dict[str, Any]:
        a = self.atlas
        return {
            "id": self.id,
            "folder": a.folder.name,
            "model": a.model_name,
            "weights": a.weights,
            "pretrained": a.pretrained,
            "images": a.num_images,
            "skipped": a.num_skipped,
            "top_k": a.top_k,
            "input_size": list(a.input_size),
            "layers": [{"name": layer.name, "channels": layer.channels, "kind": layer.kind} for layer in a.layers],
        }


class Atlases:
    """The served atlases by id (``folder name``, made unique)."""

    def __init__(self, items: Sequence[str | os.PathLike | Atlas] = ()):
        self._items: OrderedDict[str, ServedAtlas] = OrderedDict()
        for item in items:
            a = item if isinstance(item, Atlas) else open_atlas(Path(item).expanduser())
            base = _ID_RE.sub("-", a.folder.resolve().name.lower()).strip("-")[:40] or "atlas"
            aid, n = base, 2
            while aid in self._items:
                aid, n = f"{base}-{n}", n + 1
            token = hashlib.sha1((a.folder / "manifest.json").read_bytes()).hexdigest()[:12]
            self._items[aid] = ServedAtlas(aid, a, token)

    def __len__(self) -> int:
        return len(self._items)

    def all(self) -> list[ServedAtlas]:
        return list(self._items.values())

    def get(self, aid: str) -> ServedAtlas:
        found = self._items.get(aid)
        if found is None:
            known = ", ".join(self._items) or "none (start the viewer with --atlas FOLDER)"
            raise NotFound(f"no atlas {aid[:40]!r}; atlases: {known}")
        return found

    def channel(self, aid: str, layer: str, channel: int) -> ServedAtlas:
        """The atlas, checked to have ``layer`` and ``channel`` (404 otherwise, with the library's words)."""
        served = self.get(aid)
        try:
            found = served.atlas.layer(layer)
        except FeatureMapsError as exc:
            raise NotFound(one_line(exc)) from None
        if not 0 <= channel < found.channels:
            raise NotFound(f"{layer} has channels 0..{found.channels - 1}, not {channel}")
        return served

    def matching(self, model: str, weights: str, layer: str) -> list[ServedAtlas]:
        """The atlases of the same model and weights as a run (by the names the library rebuilds
        them from) that hold ``layer``."""
        out = []
        for served in self._items.values():
            reload = served.reload
            if not reload or str(reload.get("model")) != model:
                continue
            if str(reload.get("weights", "")).lower() != str(weights).lower():
                continue
            if any(x.name == layer for x in served.atlas.layers):
                out.append(served)
        return out


def check_k(k: int) -> int:
    if not 1 <= k <= MAX_TOP:
        raise ParamError(f"k is how many top images to show, between 1 and {MAX_TOP}")
    return k


def check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha <= 1.0:
        raise ParamError("alpha is the heatmap's opacity, between 0 and 1")
    return round(alpha, 2)


# --------------------------------------------------------------------------------------------------
# A run's model
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunModel:
    """Which model (of the viewer's allow-list) made a run, with its weights choice and input size."""

    name: str
    weights: str
    size: int | None


def run_model(viewer: Viewer, run_id: str) -> RunModel:
    job = viewer.job(run_id)
    req = job.request
    if req is not None:
        return RunModel(req.model, req.weights, req.size)
    try:  # a run adopted from the store after a restart: its request is in the manifest
        asked = read_manifest(viewer.folder(run_id)).get("viewer_request") or {}
    except RunError:
        asked = {}
    if not asked.get("model") or not asked.get("weights"):
        raise NotFound(f"run {run_id} does not say which model made it")
    size = asked.get("size")
    return RunModel(str(asked["model"]), str(asked["weights"]), int(size) if size else None)


@contextlib.contextmanager
def model_of_run(viewer: Viewer, run_id: str, *, what: str, extra: int = 0) -> Iterator[tuple[Any, threading.Lock]]:
    """The run's model from the viewer's cache (loaded if it was dropped) and its forward-pass lock,
    with the memory of the task (``extra`` beyond the run's own peak) and of the model reserved."""
    rm = run_model(viewer, run_id)
    job = viewer.job(run_id)
    est = job.estimate
    loaded = viewer.models.is_loaded(rm.name, rm.weights)
    need = (est.memory if est is not None else CAM_FALLBACK_BYTES) + extra
    model_memory = est.model_memory if est is not None and not loaded else 0
    with viewer.reserved(("insight", run_id, what, time.monotonic_ns()), need + model_memory, what=what):
        model, lock = viewer.models.acquire(rm.name, rm.weights)
        try:
            key = ("model", rm.name, rm.weights)
            if model_memory and not viewer.memory.amount(key):  # as a run does: the model's weights stay counted
                viewer.memory.set(key, model_memory)
            yield model, lock
        finally:
            viewer.models.release(rm.name, rm.weights)


# --------------------------------------------------------------------------------------------------
# CAMs of runs
# --------------------------------------------------------------------------------------------------
def parse_target(target: str) -> int | str | None:
    text = target.strip()
    if not text:
        return None
    if len(text) > 80:
        raise ParamError("target is a class index or a label (at most 80 characters)")
    return int(text) if text.isdigit() else text


def parse_method(method: str) -> str:
    try:
        return check_method(method)
    except CamError:
        raise ParamError(f"unknown CAM method {method[:20]!r}; use one of {', '.join(CAM_METHODS)}") from None


class CamService:
    """``fm.cam`` of a run, the last :data:`CAM_RESULTS` results kept by (run, method, layer, target)."""

    def __init__(self, viewer: Viewer):
        self.viewer = viewer
        self._results: OrderedDict[tuple, CamResult] = OrderedDict()
        self._lock = threading.Lock()
        self._making: dict[tuple, threading.Lock] = {}

    def result(self, run_id: str, method: str, layer: str, target: str) -> CamResult:
        key = (run_id, parse_method(method), layer.strip(), target.strip())
        with self._lock:
            if key in self._results:
                self._results.move_to_end(key)
                return self._results[key]
            making = self._making.setdefault(key, threading.Lock())
        with making:
            with self._lock:
                if key in self._results:
                    return self._results[key]
            try:
                result = self._compute(run_id, key[1], key[2], parse_target(key[3]))
            finally:
                with self._lock:
                    self._making.pop(key, None)
            with self._lock:
                self._results[key] = result
                while len(self._results) > CAM_RESULTS:
                    self._results.popitem(last=False)
        return result

    def forget(self, run_id: str) -> None:
        with self._lock:
            for key in [k for k in self._results if k[0] == run_id]:
                del self._results[key]

    def _compute(self, run_id: str, method: str, layer: str, target: int | str | None) -> CamResult:
        viewer = self.viewer
        data = viewer.data(run_id)  # 409 while the run has no maps
        if data.image is None:
            raise NotFound("this run has no input picture to explain")
        rm = run_model(viewer, run_id)
        # the backward pass holds about the forward pass's activations again
        est = viewer.job(run_id).estimate
        extra = est.outputs if est is not None else 0
        with model_of_run(viewer, run_id, what="this CAM", extra=extra) as (m, lock), lock:
            try:
                return cam(m.with_size(rm.size), data.image, method, layer=layer or None, target=target)
            except LayerError as exc:
                raise NotFound(one_line(exc)) from None
            except CamError as exc:
                raise ParamError(one_line(exc)) from None


def cam_json(result: CamResult, layers: Sequence[Mapping[str, Any]], *, channels: int) -> dict[str, Any]:
    """:meth:`CamResult.to_dict` with, for each breakdown channel, where it is in the run's grid
    (the index of the run's layer of that name, or None when the run did not capture it)."""
    body = result.to_dict(channels=channels)
    index = next((int(layer["index"]) for layer in layers if layer.get("name") == result.layer), None)
    body["title"] = result.title
    body["layer_index"] = index
    for ch in body["channels"]:
        ch["layer_index"] = index
    return body


# --------------------------------------------------------------------------------------------------
# Portraits
# --------------------------------------------------------------------------------------------------
#: ``use()`` -> a context manager giving the model (with its lock held) for a portrait.
ModelUse = Callable[[], contextlib.AbstractContextManager[Any]]


@dataclass(eq=False)
class PortraitJob:
    key: tuple
    layer: str
    channel: int
    use: ModelUse
    state: str = "queued"
    error: str | None = None
    done_steps: int = 0
    total_steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "error": self.error,
            "progress": [self.done_steps, self.total_steps] if self.total_steps else None,
        }


class PortraitService:
    """Channel portraits from a cache folder, made by one background worker when asked.

    Args:
        cache_dir: where ``featuremaps.portrait`` keeps them (one PNG per channel, by model fingerprint).
        options: ``size``, ``steps``, ``seed``... as :func:`featuremaps.portrait.portrait_image` takes
            (default: its budget for the model's device).
    """

    def __init__(self, cache_dir: Path, options: Mapping[str, Any] | None = None):
        self.cache_dir = Path(cache_dir)
        self.options = dict(options or {})
        self._jobs: dict[tuple, PortraitJob] = {}
        self._queue: deque[PortraitJob] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def cached(self, model: Any, layer: str, channel: int) -> Any:
        """The cached portrait (PIL) or None; never computes."""
        from ..portrait import portrait_image

        try:
            return portrait_image(model, layer, channel, cache_dir=self.cache_dir, compute=False, **self.options)
        except LayerError as exc:
            raise NotFound(one_line(exc)) from None

    def state(self, key: tuple) -> dict[str, Any] | None:
        with self._cv:
            job = self._jobs.get(key)
            return job.to_dict() if job is not None else None

    def start(self, key: tuple, layer: str, channel: int, use: ModelUse) -> dict[str, Any]:
        """Queue the portrait (once: asking again while it is queued or running answers its state)."""
        with self._cv:
            if self._closed:
                raise Busy("the viewer is shutting down")
            job = self._jobs.get(key)
            if job is not None and job.state in ("queued", "running"):
                return job.to_dict()
            waiting = sum(1 for j in self._queue)
            if waiting >= MAX_PORTRAITS_WAITING:
                raise Busy(f"{waiting} portraits are waiting already; try again when one is made")
            job = PortraitJob(key, layer, channel, use)
            self._jobs[key] = job
            self._queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="featuremaps-portrait", daemon=True)
                self._thread.start()
            self._cv.notify()
            return job.to_dict()

    def wait(self, key: tuple, timeout: float = 60.0) -> dict[str, Any] | None:
        """Wait until the portrait is made or failed (for tests and scripts)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                job = self._jobs.get(key)
                if job is None or job.state in ("done", "failed") or time.monotonic() > deadline:
                    return job.to_dict() if job is not None else None
                self._cv.wait(0.1)

    def _work(self) -> None:
        from ..portrait import portrait_image

        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait(1.0)
                if self._closed:
                    return
                job = self._queue.popleft()
                job.state = "running"

            def progress(done: int, total: int, job: PortraitJob = job) -> None:
                job.done_steps, job.total_steps = int(done), int(total)

            try:
                with job.use() as model:
                    portrait_image(
                        model, job.layer, job.channel, cache_dir=self.cache_dir, compute=True, progress=progress,
                        **self.options,
                    )  # fmt: skip
                state, error = "done", None
            except FeatureMapsError as exc:
                state, error = "failed", one_line(exc)
            except Exception as exc:  # a torch error: a message on the page, never a dead worker
                state, error = "failed", f"the portrait failed: {type(exc).__name__}: {one_line(exc)}"
            with self._cv:
                job.state, job.error = state, error
                self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)


@dataclass(eq=False)
class Insight:
    """What ``app.state.insight`` holds: the atlases, the CAMs and the portraits of one viewer."""

    viewer: Viewer
    atlases: Atlases
    cams: CamService
    portraits: PortraitService

    def close(self) -> None:
        self.portraits.close()


def make_insight(
    viewer: Viewer,
    *,
    atlases: Atlases | Sequence[str | os.PathLike | Atlas] = (),
    portrait_dir: str | os.PathLike | None = None,
    portrait_options: Mapping[str, Any] | None = None,
) -> Insight:
    """The services of one viewer (``portrait_dir`` default: ``portraits/`` in its run store)."""
    cache = Path(portrait_dir).expanduser() if portrait_dir is not None else viewer.run_dir / "portraits"
    served = atlases if isinstance(atlases, Atlases) else Atlases(atlases)
    return Insight(viewer, served, CamService(viewer), PortraitService(cache, portrait_options))


__all__ = [
    "MAX_TOP",
    "Atlases",
    "CamService",
    "Insight",
    "PortraitService",
    "RunModel",
    "ServedAtlas",
    "cam_json",
    "check_alpha",
    "check_k",
    "make_insight",
    "model_of_run",
    "parse_method",
    "parse_target",
    "run_model",
]
