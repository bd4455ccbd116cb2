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
import json
import os
import re
import shutil
import uuid
import zipfile
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    """A picture to write into a run folder, and what it shows (listed in the manifest)."""

    path: str
    image: "Image.Image" = field(repr=False)
    kind: str = "picture"
    layer: str | None = None
    caption: str = ""


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


def _write_png(image: "Image.Image", path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", compress_level=1)


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
    target = Path(folder)
    if target.exists() and not overwrite:
        raise RunError(f"{target} already exists; choose another output folder or use --force to replace it")
    if target.exists() and not target.is_dir():
        raise RunError(f"{target} exists and is not a folder; choose another output folder")
    pictures = list(pictures)
    for p in pictures:
        _check_relpath(p.path)
    parent = target.parent if str(target.parent) else Path(".")
    tmp = parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        if raw:
            (tmp / "maps").mkdir()
            for e in maps.entries:
                np.save(tmp / "maps" / f"{layer_stem(e)}.npy", e.tensor.detach().cpu().numpy(), allow_pickle=False)
        jobs = [(p.image, tmp / p.path) for p in pictures]
        if maps.image is not None:
            jobs.append((maps.image, tmp / "input.png"))
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            list(pool.map(lambda job: _write_png(*job), jobs))
        for rel, content in (files or {}).items():
            dest = tmp / _check_relpath(rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        manifest = manifest_for(maps, raw=raw, pictures=pictures, extra=extra)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=True), encoding="utf-8")
        if target.exists():
            old = parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(f"cannot write {target}: {exc.strerror or exc}; check the path and free disk space") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


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


def zip_run(folder: str | os.PathLike) -> bytes:
    """The whole run folder as a zip archive (for downloads)."""
    root = Path(folder)
    read_manifest(root)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                zf.write(path, arcname=f"{root.name}/{path.relative_to(root).as_posix()}")
    return buf.getvalue()
