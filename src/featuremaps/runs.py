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
import uuid
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch

from .errors import RunError
from .maps import FeatureMap, FeatureMaps, LayerStats

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
        """The PNG file's bytes (fast compression)."""
        if self.png is not None:
            return self.png
        buf = io.BytesIO()
        self.image.save(buf, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)  # fast: zlib's RLE mode
        return buf.getvalue()

    def with_png(self) -> "Picture":
        """The same picture with its PNG bytes encoded and kept."""
        from dataclasses import replace

        return self if self.png is not None else replace(self, png=self.encoded())


def safe_name(text: str) -> str:
    """A layer name as a file-name part: ``features.28`` stays, ``layer1.0.relu#2`` -> ``layer1.0.relu_call2``."""
    text = text.replace("#", "_call")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "layer"


def layer_stem(entry: FeatureMap) -> str:
    """The file stem used for one entry: ``NNN_<name>``."""
    return f"{entry.index:03d}_{safe_name(entry.name)}"


def _check_relpath(path: str) -> str:
    p = Path(path)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise RunError(f"picture path {path!r} must be relative and stay inside the run folder")
    return p.as_posix()


def manifest_for(maps: FeatureMaps, *, raw: bool, pictures: Iterable[Picture] = (), extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest describing ``maps`` (and the pictures written beside it)."""
    from . import __version__

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
        "schema_version": SCHEMA_VERSION,
        "featuremaps_version": __version__,
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
            {"path": p.path, "kind": p.kind, "layer": p.layer, "caption": p.caption, "width": p.image.width, "height": p.image.height}
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


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary sibling of ``folder`` to fill; on success it replaces ``folder``,
    on any failure it is removed and ``folder`` is left as it was.

    Raises:
        RunError: ``folder`` exists (without ``overwrite``) or cannot be written.
    """
    target = Path(folder)
    if target.exists() and not overwrite:
        raise RunError(f"{target} already exists; choose another output folder or use --force to replace it")
    if target.exists() and not target.is_dir():
        raise RunError(f"{target} exists and is not a folder; choose another output folder")
    parent = target.parent
    tmp = parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        if target.exists():
            old = parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
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
    manifest = manifest_for(maps, raw=raw, pictures=pictures, extra=extra)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=True), encoding="utf-8")


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


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a run folder, checked for its schema version."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise RunError(f"{folder} is not a featuremaps run folder (no {MANIFEST}); give a folder written by `featuremaps show`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read {path}: {exc}") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise RunError(f"{path} has schema version {version!r}; this featuremaps reads version {SCHEMA_VERSION}")
    return manifest


def load_run(folder: str | os.PathLike) -> FeatureMaps:
    """Read a run folder back into :class:`FeatureMaps` (raw maps must have been saved)."""
    root = Path(folder)
    manifest = read_manifest(root)
    entries = []
    for layer in manifest["layers"]:
        if not layer.get("raw"):
            raise RunError(f"{root} was saved without raw maps, so it cannot be loaded back; save it again with raw maps")
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
                zf.write(path, arcname=f"{root.name}/{path.relative_to(root).as_posix()}",
                         compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)
    return target.getvalue() if dest is None else None
