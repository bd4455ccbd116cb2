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

import datetime as _dt
import io
import os
import zipfile
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch

from .errors import RunError
from .folders import (  # noqa: F401  (the run folder's public names, kept importable from here)
    FOLDER_KINDS,
    MANIFEST,
    PARTIAL_MARKER,
    SCHEMA_VERSION,
    atomic_folder,
    check_replaceable,
    clear_stale_parts,
    read_manifest,
    write_manifest,
)
from .layers import file_stem
from .maps import FeatureMap, FeatureMaps
from .render.png import to_png_bytes
from .stats import LayerStats

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image


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
    channels: tuple[int | str, ...] | None = None  # a channel grid's channels, in tile order

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
                **({"layout": e.layout} if e.layout else {}),
                **({"spatial": list(e.spatial), "prefix": e.prefix} if e.spatial is not None else {}),
                "stats": e.stats.as_dict(),
                **({"sample_stats": [r.as_dict() for r in e.stats.samples]} if e.stats.samples else {}),
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
                **({"channels": list(p.channels)} if p.channels is not None else {}),
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


def _write_raw(entry: FeatureMap, root: Path) -> None:
    np.save(root / "maps" / f"{layer_stem(entry)}.npy", entry.tensor.detach().cpu().numpy(), allow_pickle=False)


def raw_nbytes(maps: FeatureMaps) -> int:
    """What the raw maps of ``maps`` take on disk (``.npy`` files, without their small headers)."""
    return sum(e.tensor.element_size() * e.tensor.nelement() for e in maps.entries)


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
    extra_pictures = [Picture("input.png", maps.image, kind="input")] if maps.image is not None else []
    jobs = [lambda p=p: _write_picture(p, root) for p in [*pictures, *extra_pictures]]
    if raw:
        (root / "maps").mkdir(parents=True, exist_ok=True)
        jobs += [lambda e=e: _write_raw(e, root) for e in maps.entries]
    with _pool() as pool:  # PNG encoding and file writes release the GIL: a few at a time
        futures = [pool.submit(job) for job in jobs]
        try:
            for done in futures:
                done.result()
        except BaseException:  # Ctrl-C, kill -TERM, a failed write: no more files into this folder
            pool.shutdown(wait=True, cancel_futures=True)
            raise
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


def load_run(folder: str | os.PathLike) -> FeatureMaps:
    """Read a run folder back into :class:`FeatureMaps` (raw maps must have been saved)."""
    root = Path(folder)
    manifest = read_manifest(root, kind="run")
    entries = []
    for layer in manifest["layers"]:
        if not layer.get("raw"):
            raise RunError(
                f"{root} was saved without raw maps (featuremaps show --save-maps none, the default), so it cannot be "
                "loaded back; run it again with --save-maps shown or all"
            )
        raw = root / _check_relpath(layer["raw"])
        try:
            array = np.load(raw, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise RunError(f"cannot read {raw}: {exc}") from None
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
                _stats=LayerStats.from_dict(layer["stats"], layer.get("sample_stats") or ()),
                layout=layer.get("layout"),
                spatial=tuple(layer["spatial"]) if layer.get("spatial") else None,
                prefix=int(layer.get("prefix", 0)),
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
