"""What an atlas reads, and how: a folder (recursive), a text file of paths, a torchvision
``ImageFolder``-style tree (or such a dataset object), or a list of paths; each image decoded and
preprocessed in DataLoader workers with every check of :func:`featuremaps.images.load_image`.

A file that cannot be used (corrupt, truncated, empty, not an image, missing) is *skipped*: it
gets no rows, its one-line reason goes to ``skipped.csv``, and the run goes on. In a folder, only
files with an extension Pillow reads are inputs (others are counted as ignored); every line of a
text list is an input. Names starting with ``.`` are never inputs.

The list is frozen when an atlas starts (``inputs.parquet``), so a resumed run reads exactly the
images the first one listed; paths are held in Arrow arrays, not Python lists, so that a million of
them cost one buffer and DataLoader workers (forked) do not copy them page by page.

Torch is imported only by the functions that build tensors: the CLI lists a folder before torch loads.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ..errors import FeatureMapsError, ImageError
from .errors import AtlasError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..preprocess import Preprocessing

#: Pillow formats that need an external handler or are not pictures (their extensions are not inputs).
_STUB_FORMATS = frozenset({"BUFR", "GRIB", "HDF5", "EPS", "MPEG", "WMF", "IPTC"})
#: How each kind of source is described in messages and the manifest.
KINDS: tuple[str, ...] = ("folder", "imagefolder", "list", "paths", "dataset")


@functools.cache
def image_suffixes() -> frozenset[str]:
    """Lower-case file extensions (``.jpg``...) of the formats Pillow can open here."""
    from PIL import Image

    Image.init()
    known = Image.registered_extensions()
    found = {ext.lower() for ext, fmt in known.items() if fmt in Image.OPEN and fmt not in _STUB_FORMATS}
    return frozenset(found | {".mpo"})  # multi-picture JPEG files open through the JPEG plugin


@dataclass(frozen=True, eq=False)
class ImageList:
    """The images of one atlas, in a fixed order (image ids are positions in it).

    Attributes:
        source: the source as the user gave it (a folder, a list file...), for messages.
        kind: one of :data:`KINDS`.
        images: each image's path as given (a folder's path joined with the file's path in it; a
            list's line as written), the ``image`` column of every table.
        files: the absolute path each image is read from.
        labels: class names of an ImageFolder tree or dataset, else None.
        ignored: files of a folder that are not inputs (no image extension).
    """

    source: str
    kind: str
    images: pa.Array
    files: pa.Array
    labels: pa.Array | None = None
    ignored: int = 0

    def __len__(self) -> int:
        return len(self.images)

    def table(self) -> pa.Table:
        """``image_id, image, file, label``: what ``inputs.parquet`` holds."""
        n = len(self.images)
        labels = self.labels if self.labels is not None else pa.nulls(n, pa.string())
        return pa.table(
            {"image_id": pa.array(range(n), pa.int32()), "image": self.images, "file": self.files, "label": labels}
        )

    @classmethod
    def from_table(cls, table: pa.Table, *, source: str, kind: str) -> "ImageList":
        labels = table.column("label").combine_chunks()
        return cls(
            source=source,
            kind=kind,
            images=table.column("image").combine_chunks(),
            files=table.column("file").combine_chunks(),
            labels=None if labels.null_count == len(labels) else labels,
        )


def list_inputs(source: Any, *, exclude: str | os.PathLike | None = None) -> ImageList:
    """The images of ``source``: a folder (recursive, sorted; an ``ImageFolder`` tree gets its
    class names as labels), a text file of paths (one per line, ``#`` comments; relative paths are
    relative to the file's folder), one image file, a list of paths, or a torchvision
    ``DatasetFolder``/``ImageFolder`` object. ``exclude``: a folder never to list (the atlas's own).

    Raises:
        AtlasError: the source does not exist, cannot be read, or holds no image.
    """
    if hasattr(source, "samples") and hasattr(source, "classes"):
        return _from_dataset(source)
    if isinstance(source, (list, tuple)):
        return _from_paths(source)
    if not isinstance(source, (str, os.PathLike)):
        raise AtlasError(
            f"an atlas reads a folder, a text file of paths, a list of paths or an ImageFolder, not {type(source).__name__}"
        )
    given = os.fspath(source)
    if not str(given).strip():
        raise AtlasError("the image source is empty; pass a folder of images or a text file listing image paths")
    path = Path(given).expanduser()
    if path.is_dir():
        return _from_folder(given, path, exclude)
    if path.is_file():
        if path.suffix.lower() in image_suffixes():
            return _from_paths([given], source=given, kind="list")
        return _from_list_file(given, path)
    raise AtlasError(f"{given} not found; pass a folder of images or a text file listing image paths")


def _from_folder(given: str, root: Path, exclude: str | os.PathLike | None) -> ImageList:
    suffixes = image_suffixes()
    skip = Path(exclude).resolve() if exclude is not None else None
    base = root.resolve()
    rel_paths: list[str] = []
    ignored = 0
    failures: list[OSError] = []
    for folder, dirs, files in os.walk(base, onerror=failures.append):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (skip is None or (here / d).resolve() != skip))
        rel = here.relative_to(base)
        for name in sorted(files):
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in suffixes:
                rel_paths.append((rel / name).as_posix())
            else:
                ignored += 1
    if failures and failures[0].filename and Path(failures[0].filename) == base:
        raise AtlasError(f"{given} cannot be read ({failures[0].strerror}); check its permissions")
    if not rel_paths:
        other = f" ({ignored} other files)" if ignored else ""
        raise AtlasError(
            f"{given} holds no images{other}: looked recursively for files Pillow reads (.jpg, .png, .webp, .bmp, "
            ".tif...); pass a folder of images or a text file listing image paths"
        )
    shown = Path(given)
    labels = None
    parts = [p.split("/") for p in rel_paths]
    if all(len(p) == 2 for p in parts):  # root/<class>/<image>: torchvision's ImageFolder layout
        labels = pa.array([p[0] for p in parts], pa.string())
        kind = "imagefolder"
    else:
        kind = "folder"
    return ImageList(
        source=given,
        kind=kind,
        images=pa.array([str(shown / p) for p in rel_paths], pa.string()),
        files=pa.array([str(base / p) for p in rel_paths], pa.string()),
        labels=labels,
        ignored=ignored,
    )


def _from_list_file(given: str, path: Path) -> ImageList:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AtlasError(
            f"{given} is neither an image nor a text file of paths (it is not UTF-8 text); pass a folder of images "
            "or a text file with one image path per line"
        ) from None
    except OSError as exc:
        raise AtlasError(f"{given} cannot be read ({exc.strerror or exc}); check its permissions") from None
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise AtlasError(f"{given} lists no image paths; write one image path per line")
    here = path.resolve().parent
    files = [str((here / Path(ln).expanduser()).resolve()) for ln in lines]
    return ImageList(source=given, kind="list", images=pa.array(lines, pa.string()), files=pa.array(files, pa.string()))


def _from_paths(paths: Sequence[Any], *, source: str | None = None, kind: str = "paths") -> ImageList:
    if not paths:
        raise AtlasError("the list of images is empty; pass at least one image path")
    given = []
    for p in paths:
        if not isinstance(p, (str, os.PathLike)):
            raise AtlasError(f"a list of images holds paths (str or Path), not {type(p).__name__}")
        given.append(os.fspath(p))
    files = [str(Path(p).expanduser().resolve()) for p in given]
    return ImageList(
        source=source if source is not None else f"{len(given)} paths",
        kind=kind,
        images=pa.array(given, pa.string()),
        files=pa.array(files, pa.string()),
    )


def _from_dataset(dataset: Any) -> ImageList:
    samples = list(dataset.samples)
    if not samples:
        raise AtlasError(f"the {type(dataset).__name__} holds no samples; check its root folder")
    classes = list(dataset.classes)
    paths = [os.fspath(s[0]) for s in samples]
    try:
        labels = [str(classes[int(s[1])]) for s in samples]
    except (IndexError, TypeError, ValueError):
        labels = None
    root = getattr(dataset, "root", None)
    listed = _from_paths(paths, source=os.fspath(root) if root is not None else type(dataset).__name__, kind="dataset")
    return ImageList(
        source=listed.source,
        kind="dataset",
        images=listed.images,
        files=listed.files,
        labels=pa.array(labels, pa.string()) if labels is not None else None,
    )


# -- decoding ----------------------------------------------------------------------------------------
def decode(file: str, pre: "Preprocessing") -> "tuple[torch.Tensor | None, str, tuple[int, int]]":
    """One image -> (its input tensor ``(C, H, W)``, ``""``, its size ``(width, height)`` as
    loaded), or ``(None, reason, (0, 0))`` when it cannot be used. Never raises for a bad file:
    one bad file must not stop a run over a million."""
    try:
        picture = load_picture(file)
    except ImageError as exc:
        return None, _one_line(exc), (0, 0)
    except (FeatureMapsError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # a decoder's own bug on a strange file
        return (
            None,
            _one_line(f"{Path(file).name} cannot be decoded ({type(exc).__name__}: {exc}); check the file"),
            (0, 0),
        )
    x, _ = pre(picture)
    return x[0], "", picture.size


def load_picture(file: str):
    """The picture as the atlas sees it: :func:`featuremaps.images.load_image` (EXIF orientation
    applied, RGB), so that crop boxes and decoded sizes always agree."""
    from ..images import load_image

    return load_image(file)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class ImageDataset:
    """A map-style dataset for a DataLoader: item ``i`` is ``(i, tensor or None, reason, (w, h))``."""

    def __init__(self, files: pa.Array, pre: "Preprocessing"):
        self.files = files
        self.pre = pre

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        x, reason, size = decode(self.files[i].as_py(), self.pre)
        return i, x, reason, size


@dataclass(frozen=True)
class Batch:
    """A decoded batch: the ids of all its images, the input tensor of the usable ones (in id order),
    and per image whether it is usable, why not, and its size ``(width, height)``."""

    ids: tuple[int, ...]
    x: "torch.Tensor | None"
    ok: tuple[bool, ...]
    reasons: tuple[str, ...]
    sizes: tuple[tuple[int, int], ...]


def collate(items: list) -> Batch:
    import torch

    xs = [x for _, x, _, _ in items if x is not None]
    return Batch(
        ids=tuple(int(i) for i, _, _, _ in items),
        x=torch.stack(xs) if xs else None,
        ok=tuple(x is not None for _, x, _, _ in items),
        reasons=tuple(r for _, _, r, _ in items),
        sizes=tuple((int(s[0]), int(s[1])) for _, _, _, s in items),
    )


# -- the plan: parts and batches ---------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """How the images are cut: parts of ``part_size`` consecutive ids (the unit that is written,
    and redone after a kill), each cut into batches of ``batch_size`` (a batch never spans two
    parts). Fixed when an atlas starts, so every engine and every resumed run makes the same batches."""

    num_images: int
    part_size: int
    batch_size: int

    @property
    def num_parts(self) -> int:
        return -(-self.num_images // self.part_size)

    def part_ids(self, part: int) -> range:
        start = part * self.part_size
        return range(start, min(self.num_images, start + self.part_size))

    def batches(self, parts: Sequence[int]) -> Iterator[list[int]]:
        for p in parts:
            ids = self.part_ids(p)
            for start in range(ids.start, ids.stop, self.batch_size):
                yield list(range(start, min(ids.stop, start + self.batch_size)))

    def part_of(self, image_id: int) -> int:
        return image_id // self.part_size


def loader(images: ImageList, pre: "Preprocessing", plan: Plan, parts: Sequence[int], *, workers: int, pin: bool):
    """A DataLoader over the batches of ``parts``, decoding in ``workers`` processes (0: in this one)."""
    from torch.utils.data import DataLoader

    batches = list(plan.batches(parts))
    return DataLoader(
        ImageDataset(images.files, pre),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin,
        prefetch_factor=2 if workers else None,
    )
