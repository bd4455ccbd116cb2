"""Process memory settings that make keeping every layer's output cheap.

Huge pages: PyTorch's CPU allocator backs large tensors with transparent huge pages when the
environment variable ``THP_MEM_ALLOC_ENABLE=1`` is set before torch is imported, which makes
faulting in fresh memory several times cheaper. :func:`ask_for_huge_pages` sets it when
featuremaps is imported first (the CLI, the viewer); ``THP_MEM_ALLOC_ENABLE=0`` opts out.

Reuse: a capture keeps many multi-MB tensors alive at once (about 130 MB for every leaf output of
ResNet-50 at 224x224), where a bare forward pass reuses a few buffers. With glibc's default
settings, the memory of the previous capture goes back to the system when it is freed, so the next
capture gets fresh pages that the kernel must fault in and zero one by one: on ResNet-50 that cost
more than the extra work of capturing itself (28,000 page faults, about 40 ms, against a 70 ms
forward pass). :func:`reuse_freed_memory` asks glibc to keep freed memory for reuse instead, up to
a limit; :func:`featuremaps.capture` calls it once, before its first pass. A reduced chain
(``mode="conv"`` and the like with ``reduce=``), which is about using little memory, hands each
step's freed output back at once instead (:func:`release_freed_memory`).

Set the environment variable ``FEATUREMAPS_REUSE_MEMORY=0`` to leave the allocator alone, or to a
number of megabytes to change the limit (default 512). Nothing is done outside Linux with glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys
import threading

DEFAULT_LIMIT_MB = 512
#: the largest ``M_MMAP_THRESHOLD`` that every 64-bit glibc accepts: blocks up to this size come
#: from the heap (and can be reused); larger ones are still mapped and unmapped on their own.
MMAP_THRESHOLD = 32 * 2**20
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_lock = threading.Lock()
_state: dict[str, object] = {}


def ask_for_huge_pages() -> bool:
    """Set ``THP_MEM_ALLOC_ENABLE=1`` unless torch is already imported or the variable is set;
    returns whether huge-page allocation is asked for."""
    if "torch" not in sys.modules:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"


@functools.lru_cache(maxsize=1)
def _libc():
    """glibc through ctypes, or None elsewhere (looked up once: ``find_library`` runs a subprocess)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):  # pragma: no cover - unusual libc
        return None


def limit_mb_from_env() -> int:
    """The limit ``FEATUREMAPS_REUSE_MEMORY`` asks for (0: off)."""
    raw = os.environ.get("FEATUREMAPS_REUSE_MEMORY", "").strip().lower()
    if raw in ("", "1", "on", "yes", "true"):
        return DEFAULT_LIMIT_MB
    if raw in ("0", "off", "no", "false"):
        return 0
    try:
        return max(0, int(raw))
    except ValueError:
        return DEFAULT_LIMIT_MB


def reuse_freed_memory(limit_mb: int | None = None) -> bool:
    """Let this process keep up to ``limit_mb`` MB of freed memory for reuse (glibc ``mallopt``),
    so that repeated captures do not fault in fresh pages. Done once per process; returns whether
    the settings are in effect."""
    if "applied" in _state:  # every capture calls this: no lock once it is decided
        return bool(_state["applied"])
    with _lock:
        if "applied" in _state:
            return bool(_state["applied"])
        limit = limit_mb_from_env() if limit_mb is None else limit_mb
        libc = _libc() if limit > 0 else None
        ok = False
        if libc is not None:
            trim = min(limit * 2**20, 2**31 - 1)
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim))
        _state["applied"] = ok
        _state["limit_mb"] = limit if ok else 0
        return ok


def settings() -> dict[str, object]:
    """What :func:`reuse_freed_memory` did: ``{"applied": bool, "limit_mb": int}`` (empty before)."""
    return dict(_state)


def release_freed_memory() -> None:
    """Give freed memory back to the system now (``malloc_trim``), e.g. after a large job."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
