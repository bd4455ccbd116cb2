"""Folders featuremaps writes, and the one rule for replacing one: written completely or not at
all (a hidden temporary sibling renamed into place), replacing only a folder featuremaps wrote
itself (its manifest says so and lists every file), and the temporary folders of killed runs
cleared by the next run. One manifest writer and reader, with a ``kind`` for every folder.

Torch-free: the CLI checks ``--out`` with it before anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import RunError
from .version import __version__

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


# -- folders featuremaps writes ---------------------------------------------------------------------
#: What a folder's manifest says it is; readers check it (see :func:`read_manifest`).
FOLDER_KINDS: tuple[str, ...] = ("run", "comparison", "demo", "atlas", "portraits")
#: The file inside a temporary folder that says which process is filling it (see :func:`clear_stale_parts`).
PARTIAL_MARKER = ".featuremaps-partial"
_PART_RE = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<pid>\d+)-(?P<tag>[0-9a-f]{8})$")


def _own_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest when featuremaps wrote it (a ``schema_version`` and a ``kind`` or a
    ``featuremaps_version``), else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("schema_version"), int):
        return None
    if manifest.get("kind") in FOLDER_KINDS or "featuremaps_version" in manifest:
        return manifest
    return None


def _files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())


def check_replaceable(folder: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuse, with a one-line :class:`RunError`, to write into ``folder`` when that would lose
    anything featuremaps did not write: an existing folder may be replaced (``overwrite``) only
    when its manifest says featuremaps wrote it and it holds no file that manifest does not list.

    Called before any work starts (the CLI calls it before loading a model) and again by
    :func:`atomic_folder` right before the old folder is replaced.
    """
    target = Path(folder)
    if not (target.exists() or target.is_symlink()):
        return
    if not overwrite:
        raise RunError(f"{target} already exists; choose another output folder (--out) or use --force to replace it")
    if target.is_symlink() or not target.is_dir():
        raise RunError(f"{target} exists and is not a folder featuremaps wrote; choose another output folder")
    manifest = _own_manifest(target)
    if manifest is None:
        raise RunError(
            f"{target} was not written by featuremaps (no featuremaps manifest.json in it), so --force will not "
            "replace it; choose another output folder"
        )
    listed = manifest.get("files")
    if isinstance(listed, list):
        foreign = [f for f in _files_under(target) if f not in set(listed) and f != MANIFEST]
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise RunError(
                f"{target} holds files featuremaps did not write ({foreign[0]}{more}), so --force will not replace it; "
                "move them out or choose another output folder"
            )


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (Linux: clock ticks since boot), to tell it from a later process
    with the same pid; None where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _alive(pid: int, started: str | None) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:  # pragma: no cover - platforms without signals
        return True
    now = _process_start(pid)
    return started is None or now is None or now == started


def clear_stale_parts(parent: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders that featuremaps left in ``parent`` when a run was killed
    (``kill -9``, a power cut): hidden ``.NAME.tmp-PID-XXXXXXXX`` folders with featuremaps' marker
    file (or still empty), and ``.NAME.old-PID-XXXXXXXX`` folders with a featuremaps manifest, whose
    process is gone. Anything else, and the folders of live processes, are left alone. Returns what was removed."""
    root = Path(parent)
    removed: list[Path] = []
    try:
        candidates = [p for p in root.iterdir() if p.name.startswith(".") and _PART_RE.match(p.name)]
    except OSError:
        return removed
    host = socket.gethostname()
    for path in candidates:
        if path.is_symlink() or not path.is_dir():
            continue
        m = _PART_RE.match(path.name)
        assert m is not None
        marker: dict[str, Any] = {}
        try:
            marker = json.loads((path / PARTIAL_MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            marker = {}
        if m["what"] == "tmp":
            # the marker is written right after the folder is made: killed in between, it is empty
            ours = (isinstance(marker, dict) and marker.get("pid") == int(m["pid"])) or not any(path.iterdir())
        else:
            ours = _own_manifest(path) is not None
        if not ours or (isinstance(marker, dict) and marker.get("host", host) != host):
            continue
        if _alive(int(m["pid"]), marker.get("started") if isinstance(marker, dict) else None):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    return removed


def _part_name(target: Path, what: str) -> Path:
    return target.parent / f".{target.name}.{what}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def temp_sibling(path: str | os.PathLike) -> Path:
    """A hidden, unique name next to ``path`` (``.NAME.tmp-PID-XXXXXXXX``) to write before renaming."""
    return _part_name(Path(path), "tmp")


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Write one file through a temporary sibling: ``write(tmp)`` fills it, then it replaces ``path``
    in one rename, so a failure or a kill leaves the old file (or none), never half of one; on a
    failure the temporary file is removed."""
    target = Path(path)
    tmp = temp_sibling(target)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary sibling of ``folder`` to fill; on success it replaces ``folder``,
    on any failure (an exception, Ctrl-C, ``kill -TERM`` in the CLI) it is removed and ``folder`` is
    left as it was. Temporary folders of killed runs in the same parent are cleared first
    (:func:`clear_stale_parts`).

    Raises:
        RunError: ``folder`` exists (without ``overwrite``), was not written by featuremaps (see
            :func:`check_replaceable`), or cannot be written.
    """
    target = Path(folder)
    check_replaceable(target, overwrite=overwrite)
    parent = target.parent
    tmp = _part_name(target, "tmp")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        clear_stale_parts(parent)
        tmp.mkdir()
        marker = {"pid": os.getpid(), "started": _process_start(os.getpid()), "host": socket.gethostname()}
        (tmp / PARTIAL_MARKER).write_text(json.dumps(marker), encoding="utf-8")
        yield tmp
        (tmp / PARTIAL_MARKER).unlink()
        if target.exists():
            check_replaceable(target, overwrite=overwrite)  # again: something may have been added meanwhile
            old = _part_name(target, "old")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except OSError as exc:
        _remove(tmp)
        if isinstance(exc, RunError):
            raise
        raise RunError(f"cannot write {target}: {exc.strerror or exc}; check the path and free disk space") from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(folder: Path) -> None:
    """Remove a temporary folder of ours completely: again if a write still in flight added a file
    while it was being removed (a thread finishing its file after Ctrl-C)."""
    for _ in range(5):
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            return
        time.sleep(0.05)


def write_manifest(root: Path, manifest: Mapping[str, Any], *, kind: str) -> dict[str, Any]:
    """Write ``root/manifest.json``, the one way featuremaps writes a manifest: ``schema_version``,
    ``kind`` (one of :data:`FOLDER_KINDS`), ``featuremaps_version``, then the caller's keys, and
    ``files``, every file under ``root`` (so that a later ``--force`` can tell that nothing else was
    added). Call it last, once every other file is written."""
    if kind not in FOLDER_KINDS:
        raise ValueError(f"unknown folder kind {kind!r}")
    body: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "kind": kind, "featuremaps_version": __version__}
    body.update(manifest)
    body["kind"] = kind
    body["files"] = [f for f in _files_under(root) if f not in (MANIFEST, PARTIAL_MARKER)]
    (root / MANIFEST).write_text(json.dumps(body, indent=2, allow_nan=True), encoding="utf-8")
    return body


def read_manifest(folder: str | os.PathLike, *, kind: str | None = None) -> dict[str, Any]:
    """The manifest of a folder featuremaps wrote, checked for its schema version and, when
    ``kind`` is given, its kind (folders written before kinds existed are runs, comparisons or demos
    by their content)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise RunError(
            f"{folder} is not a featuremaps run folder (no {MANIFEST}); give a folder written by `featuremaps show`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read {path}: {' '.join(str(exc).split())}") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise RunError(f"{path} has schema version {version!r}; this featuremaps reads version {SCHEMA_VERSION}")
    found = manifest.get("kind") or ("run" if isinstance(manifest.get("layers"), list) else None)
    if kind is not None and found != kind:
        what = f"a {found} folder" if found in FOLDER_KINDS else "not a folder of a known kind"
        readers = {"run": "load_run", "atlas": "open_atlas"}
        hint = (
            f"; open it with {readers[found]}"
            if found in readers
            else ("; its runs are in its subfolders" if found == "comparison" else "")
        )
        raise RunError(f"{folder} is {what}, not a {kind} folder{hint}")
    return manifest
