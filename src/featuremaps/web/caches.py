"""The viewer's bounded resources, each bounded in bytes: the memory budget every run, model and
drawing reserves from before it allocates, loaded models (with a lock per model), what is kept of
runs (:class:`ArrayCache`) and drawn PNGs (:class:`BytesCache`). No module-level state: every cache
belongs to one viewer."""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any

from ..models import Model, load_model


def process_rss() -> int:
    """This process's resident memory in bytes (0 where it cannot be read)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # the peak: an upper bound
    except (ImportError, OSError):  # pragma: no cover - not Linux or macOS
        return 0


def fmt_bytes(n: float) -> str:
    """``1.5 GB``, ``320 MB``, ``12 KB`` (powers of 1024)."""
    n = float(n)
    if n >= 2**30:
        return f"{n / 2**30:.1f} GB"
    if n >= 2**20:
        return f"{n / 2**20:.0f} MB"
    return f"{max(0.0, n) / 1024:.0f} KB"


# --------------------------------------------------------------------------------------------------
# The memory budget
# --------------------------------------------------------------------------------------------------
class Budget:
    """Bytes that may be held at once, handed out as named reservations: whoever is about to hold
    memory (a run, a loaded model, a decode, a channel grid) reserves it first and releases it
    when done, waiting while others hold too much. ``fixed`` is held from the start (the process
    itself, the caches' limits).

    ``observe`` (the process's resident memory, for the memory budget) keeps the reservations
    honest: what is in use is taken as the larger of what is reserved and what is observed, so
    memory that was freed but not yet given back to the system, or an estimate that came out low,
    makes the next reservation wait too. ``relieve`` is called before such a wait (hand freed
    memory back); a reservation that only the observed figure holds back is granted after
    ``patience`` seconds, so that memory the allocator never gives back cannot stop the viewer."""

    def __init__(
        self,
        limit: int,
        fixed: int = 0,
        *,
        observe: Callable[[], int] | None = None,
        relieve: Callable[[], None] | None = None,
        patience: float = 10.0,
    ):
        self.limit = int(limit)
        self.fixed = int(fixed)
        self.observe = observe
        self.relieve = relieve
        self.patience = float(patience)
        self._held: dict[Hashable, int] = {}
        self._cv = threading.Condition()
        self.waits = 0
        self.observed_waits = 0  # waits that the observed figure alone caused

    def _in_use(self, observed: bool = True) -> int:
        accounted = self.fixed + sum(self._held.values())
        if observed and self.observe is not None:
            return max(accounted, int(self.observe()))
        return accounted

    @property
    def free(self) -> int:
        with self._cv:
            return self.limit - self._in_use()

    @property
    def room(self) -> int:
        """What one reservation may ever get: the limit less the fixed part."""
        return self.limit - self.fixed

    def held(self) -> int:
        with self._cv:
            return sum(self._held.values())

    def holders(self) -> dict[Hashable, int]:
        with self._cv:
            return dict(self._held)

    def reserve(
        self,
        key: Hashable,
        nbytes: int,
        *,
        timeout: float | None = None,
        make_room: Callable[[int], bool] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> bool:
        """Hold ``nbytes`` more under ``key`` (added to what ``key`` holds), waiting up to ``timeout``
        seconds (None: as long as it takes) for others to release; ``make_room(missing)`` is asked
        first to free some (e.g. drop idle models) and returns whether it did. False when the time
        is up, ``stop()`` says so, or ``nbytes`` can never fit."""
        nbytes = max(0, int(nbytes))
        deadline = None if timeout is None else time.monotonic() + timeout
        relieved = False
        since: float | None = None  # since when only the observed memory is in the way
        with self._cv:
            if nbytes > self.room - self._held.get(key, 0):
                return False
            while True:
                accounted_missing = nbytes - (self.limit - self._in_use(observed=False))
                missing = nbytes - (self.limit - self._in_use())
                if accounted_missing <= 0 < missing:
                    now = time.monotonic()
                    since = now if since is None else since
                    if now - since >= self.patience:
                        missing = accounted_missing
                else:
                    since = None
                if missing <= 0:
                    self._held[key] = self._held.get(key, 0) + nbytes
                    return True
                if accounted_missing <= 0 and self.relieve is not None and not relieved:
                    relieved = True  # only the observed memory is in the way: hand freed memory back, look again
                    self._cv.release()
                    try:
                        self.relieve()
                    finally:
                        self._cv.acquire()
                    continue
                if make_room is not None:
                    self._cv.release()
                    try:
                        freed = make_room(missing)
                    finally:
                        self._cv.acquire()
                    if freed:
                        continue
                if stop is not None and stop():
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.waits += 1
                if accounted_missing <= 0:
                    self.observed_waits += 1
                self._cv.wait(0.5 if left is None else min(0.5, left))

    def set(self, key: Hashable, nbytes: int) -> None:
        """Hold exactly ``nbytes`` under ``key`` now (shrinking never waits; the caller checked growth)."""
        with self._cv:
            self._held[key] = max(0, int(nbytes))
            self._cv.notify_all()

    def release(self, key: Hashable) -> None:
        with self._cv:
            if self._held.pop(key, None) is not None:
                self._cv.notify_all()

    def amount(self, key: Hashable) -> int:
        with self._cv:
            return self._held.get(key, 0)


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
class _ModelSlot:
    def __init__(self) -> None:
        self.model: Model | None = None
        self.users = 0  # runs holding it right now
        self.load_lock = threading.Lock()  # one load at a time for this key
        self.run_lock = threading.Lock()  # one forward pass at a time for this model


class ModelCache:
    """Loaded models, least recently used dropped beyond ``max_models``; a lock per model. A model
    that a run holds (:meth:`acquire` .. :meth:`release`) is never dropped; ``on_drop(key)`` is told
    when a model is let go (its memory can be handed back)."""

    def __init__(
        self,
        max_models: int,
        *,
        device: str = "cpu",
        checkpoints: Mapping[str, Path] | None = None,
        loader: Callable[..., Model] = load_model,
        on_drop: Callable[[tuple[str, str]], None] | None = None,
    ):
        self.max_models = max(1, int(max_models))
        self.device = device
        self.checkpoints = dict(checkpoints or {})
        self._loader = loader
        self._slots: OrderedDict[tuple[str, str], _ModelSlot] = OrderedDict()
        self._lock = threading.Lock()
        self.on_drop = on_drop
        self.loads = 0

    def is_loaded(self, name: str, weights: str) -> bool:
        with self._lock:
            slot = self._slots.get((name, weights))
            return slot is not None and slot.model is not None

    def loaded(self) -> list[str]:
        with self._lock:
            return [f"{n} ({w})" for (n, w), s in self._slots.items() if s.model is not None]

    def acquire(self, name: str, weights: str) -> tuple[Model, threading.Lock]:
        """The model (loaded now if needed) and its forward-pass lock; hold it until :meth:`release`."""
        key = (name, weights)
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = _ModelSlot()
            self._slots.move_to_end(key)
            slot.users += 1
        try:
            with slot.load_lock:
                if slot.model is None:
                    if weights.startswith("checkpoint:"):
                        spec: str | os.PathLike = self.checkpoints[weights.split(":", 1)[1]]
                    else:
                        spec = weights
                    slot.model = self._loader(name, spec, device=self.device)
                    self.loads += 1
        except BaseException:
            self.release(name, weights)
            raise
        self._trim()
        assert slot.model is not None
        return slot.model, slot.run_lock

    def release(self, name: str, weights: str) -> None:
        key = (name, weights)
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None:
                slot.users = max(0, slot.users - 1)
                if slot.model is None and slot.users == 0:  # a failed load is not cached
                    self._slots.pop(key, None)
        self._trim()

    def _trim(self) -> None:
        dropped = []
        with self._lock:
            loaded = [k for k, s in self._slots.items() if s.model is not None]
            for key in loaded[: max(0, len(loaded) - self.max_models)]:
                if self._slots[key].users == 0:
                    self._slots.pop(key)
                    dropped.append(key)
        for key in dropped:
            if self.on_drop is not None:
                self.on_drop(key)

    def drop_idle(self, keep: tuple[str, str] | None = None) -> bool:
        """Let go of the least recently used model no run holds (not ``keep``); False when none."""
        with self._lock:
            for key, slot in self._slots.items():
                if key != keep and slot.users == 0 and slot.model is not None:
                    self._slots.pop(key)
                    break
            else:
                return False
        if self.on_drop is not None:
            self.on_drop(key)
        return True


# --------------------------------------------------------------------------------------------------
# What is kept of runs, and drawn PNGs
# --------------------------------------------------------------------------------------------------
class ArrayCache:
    """Values (what is kept of runs, layers read from their folders) bounded by their size in
    bytes, least recently used dropped first; one load at a time per key, the others wait for it."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self._loading: dict[Hashable, threading.Lock] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> bool:
        """Keep ``value``; False (and not kept) when it alone is over a quarter of the limit."""
        if nbytes > self.max_bytes // 4:
            return False
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= old[1]
            self._items[key] = (value, int(nbytes))
            self._size += int(nbytes)
            while self._size > self.max_bytes and self._items:
                _, (_, n) = self._items.popitem(last=False)
                self._size -= n
        return True

    def get_or_load(self, key: Hashable, load: Callable[[], tuple[Any, int]]) -> Any:
        """The cached value, or ``load()`` -> ``(value, nbytes)`` run once for all who ask at once."""
        value = self.get(key)
        if value is not None:
            with self._lock:
                self.hits += 1
            return value
        with self._lock:
            gate = self._loading.setdefault(key, threading.Lock())
        try:
            with gate:
                value = self.get(key)
                if value is None:
                    with self._lock:
                        self.misses += 1
                    value, nbytes = load()
                    self.put(key, value, nbytes)
        finally:
            with self._lock:
                if self._loading.get(key) is gate and not gate.locked():
                    self._loading.pop(key, None)
        return value

    def drop(self, match: Callable[[Hashable], bool]) -> None:
        with self._lock:
            for key in [k for k in self._items if match(k)]:
                self._size -= self._items.pop(key)[1]

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def nbytes(self) -> int:
        with self._lock:
            return self._size


class BytesCache:
    """Rendered PNGs keyed by their ETag, bounded in bytes, least recently used dropped first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return data

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes // 4:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= len(old)
            self._items[key] = data
            self._size += len(data)
            while self._size > self.max_bytes and self._items:
                _, gone = self._items.popitem(last=False)
                self._size -= len(gone)

    def drop_prefix(self, prefix: str) -> None:
        with self._lock:
            for key in [k for k in self._items if k.startswith(prefix)]:
                self._size -= len(self._items.pop(key))

    def nbytes(self) -> int:
        with self._lock:
            return self._size
