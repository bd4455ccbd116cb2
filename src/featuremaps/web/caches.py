"""The viewer's caches, each bounded: loaded models (with a lock per model), runs' maps in memory
(bytes), and drawn PNGs (bytes). No module-level state: every cache belongs to one viewer."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

from ..maps import FeatureMaps
from ..models import Model, load_model


class _ModelSlot:
    def __init__(self) -> None:
        self.model: Model | None = None
        self.load_lock = threading.Lock()  # one load at a time for this key
        self.run_lock = threading.Lock()  # one forward pass at a time for this model


class ModelCache:
    """Loaded models, least recently used dropped beyond ``max_models``; a lock per model."""

    def __init__(
        self,
        max_models: int,
        *,
        device: str = "cpu",
        checkpoints: Mapping[str, Path] | None = None,
        loader: Callable[..., Model] = load_model,
    ):
        self.max_models = max(1, int(max_models))
        self.device = device
        self.checkpoints = dict(checkpoints or {})
        self._loader = loader
        self._slots: OrderedDict[tuple[str, str], _ModelSlot] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def _slot(self, key: tuple[str, str]) -> _ModelSlot:
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = _ModelSlot()
            self._slots.move_to_end(key)
            return slot

    def is_loaded(self, name: str, weights: str) -> bool:
        with self._lock:
            slot = self._slots.get((name, weights))
            return slot is not None and slot.model is not None

    def loaded(self) -> list[str]:
        with self._lock:
            return [f"{n} ({w})" for (n, w), s in self._slots.items() if s.model is not None]

    def get(self, name: str, weights: str) -> tuple[Model, threading.Lock]:
        """The model (loaded now if needed) and its forward-pass lock."""
        slot = self._slot((name, weights))
        with slot.load_lock:
            if slot.model is None:
                if weights.startswith("checkpoint:"):
                    spec: str | os.PathLike = self.checkpoints[weights.split(":", 1)[1]]
                else:
                    spec = weights
                slot.model = self._loader(name, spec, device=self.device)
                self.loads += 1
        with self._lock:
            # Drop the least recently used models that are loaded; one still in use keeps
            # working (its job holds a reference) and is simply not cached any more.
            loaded = [k for k, s in self._slots.items() if s.model is not None]
            for key in loaded[: max(0, len(loaded) - self.max_models)]:
                if key != (name, weights):
                    self._slots.pop(key, None)
            # Slots that never loaded (failed loads) are dropped too, so an error is not cached.
            for key in [k for k, s in self._slots.items() if s.model is None and not s.load_lock.locked()]:
                self._slots.pop(key, None)
        assert slot.model is not None
        return slot.model, slot.run_lock


# --------------------------------------------------------------------------------------------------
# Maps in memory
# --------------------------------------------------------------------------------------------------
def maps_nbytes(maps: FeatureMaps) -> int:
    return sum(e.tensor.element_size() * e.tensor.nelement() for e in maps.entries)


class MapsCache:
    """Recently used runs' :class:`FeatureMaps`, bounded in bytes (the newest one always stays)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, tuple[FeatureMaps, int]] = OrderedDict()
        self._pinned: set[str] = set()
        self._lock = threading.Lock()

    def get(self, run_id: str) -> FeatureMaps | None:
        with self._lock:
            item = self._items.get(run_id)
            if item is None:
                return None
            self._items.move_to_end(run_id)
            return item[0]

    def put(self, run_id: str, maps: FeatureMaps, *, pinned: bool = False) -> None:
        with self._lock:
            self._items[run_id] = (maps, maps_nbytes(maps))
            self._items.move_to_end(run_id)
            if pinned:
                self._pinned.add(run_id)
            self._trim()

    def unpin(self, run_id: str) -> None:
        with self._lock:
            self._pinned.discard(run_id)
            self._trim()

    def _trim(self) -> None:
        total = sum(n for _, n in self._items.values())
        newest = next(reversed(self._items), None)
        for key in list(self._items):
            if total <= self.max_bytes:
                break
            if key in self._pinned or key == newest:
                continue
            total -= self._items.pop(key)[1]

    def drop(self, run_id: str) -> None:
        with self._lock:
            self._items.pop(run_id, None)
            self._pinned.discard(run_id)

    def __contains__(self, run_id: str) -> bool:
        with self._lock:
            return run_id in self._items

    def nbytes(self) -> int:
        with self._lock:
            return sum(n for _, n in self._items.values())


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
