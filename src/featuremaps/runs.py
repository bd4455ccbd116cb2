"""The run folder: what ``featuremaps show`` writes, the viewer offers for download, and
:func:`load_run` reads back into the same :class:`~featuremaps.maps.FeatureMaps`.

Layout::

    run/
      manifest.json        schema_version, model, weights, mode, layers (shapes, stats, files)
      input.png            the picture as the model saw it
      maps/NNN_<layer>.npy raw kept tensors (numpy, never pickled)
      ...png, index.html   pictures and the report, when the caller adds them

A folder is written completely or not at all: everything goes to a hidden sibling folder that is
renamed into place at the end, and removed if anything fails.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import os
import re
import shutil
import socket
import uuid
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch

from .errors import RunError
from .layers import file_stem
from .maps import FeatureMap, FeatureMaps
from .render.png import to_png_bytes
from .stats import LayerStats

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Picture:
    """A picture to write into a run folder, and what it shows (listed in the manifest).

    ``png`` may hold the already encoded file, so that a picture shown in a report and written
    to disk is encoded once.
    """

    path: str
    image: "Image.Image" = field(repr=False)
    kind: str = "picture"
    layer: str | None = None
    caption: str = ""
    png: bytes | None = field(default=None, repr=False)

    def encoded(self) -> bytes:
        """The PNG file's bytes (:func:`featuremaps.render.png.to_png_bytes`, fast settings)."""
        if self.png is not None:
            return self.png
        return to_png_bytes(self.image, rle=True)

    def with_png(self) -> "Picture":
        """The same picture with its PNG bytes encoded and kept."""
        from dataclasses import replace

        return self if self.png is not None else replace(self, png=self.encoded())


def layer_stem(entry: FeatureMap) -> str:
    """The file stem used for one entry: ``NNN_<name>`` (:func:`featuremaps.layers.file_stem`)."""
    return file_stem(entry.index, entry.name)


def _check_relpath(path: str) -> str:
    p = Path(path)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise RunError(f"picture path {path!r} must be relative and stay inside the run folder")
    return p.as_posix()


def manifest_for(
    maps: FeatureMaps, *, raw: bool, pictures: Iterable[Picture] = (), extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The manifest describing ``maps`` (and the pictures written beside it)."""
    layers = []
    for e in maps.entries:
        layers.append(
            {
                "index": e.index,
                "name": e.name,
                "module": e.module,
                "kind": e.kind,
                "type": e.type,
                "call": e.call,
                "shape": list(e.shape),
                "stored_shape": list(e.tensor.shape),
                "dtype": str(e.tensor.dtype).replace("torch.", ""),
                "reduction": e.reduction,
                "channels": list(e.channels) if e.channels is not None else None,
                "stats": e.stats.as_dict(),
                "raw": f"maps/{layer_stem(e)}.npy" if raw else None,
            }
        )
    manifest: dict[str, Any] = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": maps.model,
        "weights": maps.weights,
        "pretrained": maps.pretrained,
        "mode": maps.mode,
        "input_size": list(maps.input_size),
        "reduction": maps.reduction,
        "notes": list(maps.notes),
        "input_image": "input.png" if maps.image is not None else None,
        "layers": layers,
        "pictures": [
            {
                "path": p.path,
                "kind": p.kind,
                "layer": p.layer,
                "caption": p.caption,
                "width": p.image.width,
                "height": p.image.height,
            }
            for p in pictures
        ],
    }
    if extra:
        manifest.update(extra)
    return manifest


def _write_picture(picture: Picture, root: Path) -> None:
    dest = root / _check_relpath(picture.path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(picture.encoded())


def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))


def encode_pictures(pictures: Iterable[Picture]) -> list[Picture]:
    """The pictures with their PNG bytes, encoded a few at a time (zlib releases the GIL)."""
    with _pool() as pool:
        return list(pool.map(Picture.with_png, pictures))


def write_pictures(root: Path, pictures: Iterable[Picture]) -> None:
    """Encode (where needed) and write pictures under ``root``, a few at a time."""
    with _pool() as pool:
        list(pool.map(lambda p: _write_picture(p, root), pictures))


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
    file, and ``.NAME.old-PID-XXXXXXXX`` folders with a featuremaps manifest, whose process is
    gone. Anything else, and the folders of live processes, are left alone. Returns what was removed."""
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
            ours = isinstance(marker, dict) and marker.get("pid") == int(m["pid"])
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
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, RunError):
            raise
        raise RunError(f"cannot write {target}: {exc.strerror or exc}; check the path and free disk space") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(root: Path, manifest: Mapping[str, Any], *, kind: str) -> dict[str, Any]:
    """Write ``root/manifest.json``, the one way featuremaps writes a manifest: ``schema_version``,
    ``kind`` (one of :data:`FOLDER_KINDS`), ``featuremaps_version``, then the caller's keys, and
    ``files``, every file under ``root`` (so that a later ``--force`` can tell that nothing else was
    added). Call it last, once every other file is written."""
    from . import __version__

    if kind not in FOLDER_KINDS:
        raise ValueError(f"unknown folder kind {kind!r}")
    body: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "kind": kind, "featuremaps_version": __version__}
    body.update(manifest)
    body["kind"] = kind
    body["files"] = [f for f in _files_under(root) if f not in (MANIFEST, PARTIAL_MARKER)]
    (root / MANIFEST).write_text(json.dumps(body, indent=2, allow_nan=True), encoding="utf-8")
    return body


def write_run(
    maps: FeatureMaps,
    root: Path,
    *,
    pictures: Iterable[Picture] = (),
    files: Mapping[str, str | bytes] | None = None,
    extra: Mapping[str, Any] | None = None,
    raw: bool = True,
) -> None:
    """Write a run's files into an existing (empty) folder; see :func:`save_run`."""
    pictures = list(pictures)
    for p in pictures:
        _check_relpath(p.path)
    if raw:
        (root / "maps").mkdir(parents=True, exist_ok=True)
        for e in maps.entries:
            np.save(root / "maps" / f"{layer_stem(e)}.npy", e.tensor.detach().cpu().numpy(), allow_pickle=False)
    extra_pictures = [Picture("input.png", maps.image, kind="input")] if maps.image is not None else []
    write_pictures(root, [*pictures, *extra_pictures])
    for rel, content in (files or {}).items():
        dest = root / _check_relpath(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    write_manifest(root, manifest_for(maps, raw=raw, pictures=pictures, extra=extra), kind="run")


def save_run(
    maps: FeatureMaps,
    folder: str | os.PathLike,
    *,
    pictures: Iterable[Picture] = (),
    files: Mapping[str, str | bytes] | None = None,
    extra: Mapping[str, Any] | None = None,
    raw: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a run folder atomically and return its path.

    Args:
        maps: the captured maps.
        folder: where the run goes; must not exist unless ``overwrite``.
        pictures: PNGs to write (paths relative to the folder), listed in the manifest.
        files: other files (e.g. ``{"index.html": html}``).
        extra: more manifest keys.
        raw: also write the kept tensors as ``.npy`` (needed by :func:`load_run`).
        overwrite: replace an existing folder (only once the new one is complete).

    Raises:
        RunError: the folder exists (without ``overwrite``) or cannot be written.
    """
    pictures = list(pictures)
    for p in pictures:  # refuse bad paths before anything is written
        _check_relpath(p.path)
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        write_run(maps, tmp, pictures=pictures, files=files, extra=extra, raw=raw)
    return Path(folder)


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


def load_run(folder: str | os.PathLike) -> FeatureMaps:
    """Read a run folder back into :class:`FeatureMaps` (raw maps must have been saved)."""
    root = Path(folder)
    manifest = read_manifest(root, kind="run")
    entries = []
    for layer in manifest["layers"]:
        if not layer.get("raw"):
            raise RunError(
                f"{root} was saved without raw maps, so it cannot be loaded back; save it again with raw maps"
            )
        raw = root / _check_relpath(layer["raw"])
        try:
            array = np.load(raw, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise RunError(f"cannot read {raw}: {exc}") from None
        stats = dict(layer["stats"])
        stats["shape"] = tuple(stats["shape"])
        entries.append(
            FeatureMap(
                name=layer["name"],
                module=layer["module"],
                kind=layer["kind"],
                type=layer["type"],
                index=int(layer["index"]),
                call=int(layer["call"]),
                shape=tuple(layer["shape"]),
                tensor=torch.from_numpy(array),
                reduction=layer.get("reduction"),
                channels=tuple(layer["channels"]) if layer.get("channels") is not None else None,
                _stats=LayerStats(**stats),
            )
        )
    image = None
    if manifest.get("input_image"):
        from PIL import Image

        with Image.open(root / _check_relpath(manifest["input_image"])) as im:
            image = im.convert("RGB")
    return FeatureMaps(
        entries=tuple(entries),
        model=manifest["model"],
        weights=manifest["weights"],
        pretrained=bool(manifest.get("pretrained")),
        mode=manifest["mode"],
        input_size=tuple(manifest["input_size"]),  # type: ignore[arg-type]
        image=image,
        reduction=manifest.get("reduction"),
        notes=tuple(manifest.get("notes", ())),
    )


def zip_run(folder: str | os.PathLike, dest: str | os.PathLike | BinaryIO | None = None) -> bytes | None:
    """The whole run folder as a zip archive: written to ``dest`` (a path or binary file) and
    streamed file by file, or returned as bytes when ``dest`` is None (small runs only).

    PNGs and raw maps are stored as they are (PNGs are compressed already, and deflating hundreds
    of MB of floats costs far more time than it saves); text files are deflated.
    """
    root = Path(folder)
    read_manifest(root)
    target: Any = io.BytesIO() if dest is None else dest
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                stored = path.suffix in (".png", ".npy")
                zf.write(
                    path,
                    arcname=f"{root.name}/{path.relative_to(root).as_posix()}",
                    compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED,
                )
    return target.getvalue() if dest is None else None
