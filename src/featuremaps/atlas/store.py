"""The atlas folder: Parquet parts written as the run goes, the tables merged from them at the end
(DuckDB), and the rules that make it resumable and atomic.

Layout::

    atlas/
      manifest.json            written last: the atlas is complete when it is there (and the marker is not)
      .featuremaps-partial     while a run fills the folder: who is writing it (locked with flock)
      run.json                 the run's settings, written first (a resumed run must match them)
      inputs.parquet           the frozen list of inputs: image_id, image (as given), file, label
      parts/part-000000/       one part = a fixed range of image ids, renamed into place when complete:
        stats.parquet            image_id, layer, channel, max, mean, y, x   (one row per usable image x layer x channel)
        images.parquet           image_id, status (ok | skipped), reason, width, height
        topk.parquet             the part's own top-k per channel (layer, channel, image_id, value, y, x)
        sketch.parquet           the part's quantile sketch per channel (layer, channel, stat, bucket, count)
        channels.parquet         the part's exact count / min / max / sum per channel
      topk.parquet             layer, channel, rank, image, value, y, x, box_top, box_left, box_bottom, box_right
      histograms.parquet       layer, channel, stat, bucket, lower, upper, count (the merged sketch)
      channels.parquet         layer, channel, images, max_min, max_max, max_mean, mean_min, mean_max, mean_mean
      images.parquet           image_id, image, file, label, status, reason, width, height
      skipped.csv              image, reason
      index.html               the report
      portraits/               with portraits=True: each channel's portrait (featuremaps.portrait's cache)

Atomicity: a part is built in a hidden sibling (``parts/.part-000003.tmp-PID-XXXXXXXX``) and
renamed into place, so a part is there completely or not at all; a kill (SIGKILL included) loses
at most the parts in flight, which a resumed run (the same plan: parts are fixed ranges of ids)
does again. Every other file is written to a temporary name and renamed. ``manifest.json`` is
written once everything else is, and the marker removed after it: a folder with the marker, or
without a manifest, is never taken for a complete atlas.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import RunError
from ..folders import MANIFEST, PARTIAL_MARKER, _process_start, check_replaceable, temp_sibling, write_atomic
from .sketch import channel_sketch

SCHEMA_VERSION = 1
RUN = "run.json"
INPUTS = "inputs.parquet"
PARTS = "parts"
STATS = "stats.parquet"
PART_IMAGES = "images.parquet"
PART_TOPK = "topk.parquet"
PORTRAITS = "portraits"  # the portrait cache of the report, when asked for (featuremaps.portrait.cache)
PART_SKETCH = "sketch.parquet"
PART_CHANNELS = "channels.parquet"
PART_FILES = (STATS, PART_IMAGES, PART_TOPK, PART_SKETCH, PART_CHANNELS)
TOPK = "topk.parquet"
HISTOGRAMS = "histograms.parquet"
CHANNELS = "channels.parquet"
IMAGES = "images.parquet"
SKIPPED = "skipped.csv"
REPORT = "index.html"
#: The columns of ``topk.parquet``, in order (rank 1 = highest value; the box in original-image pixels).
TOPK_COLUMNS = (
    "layer",
    "channel",
    "rank",
    "image",
    "value",
    "y",
    "x",
    "box_top",
    "box_left",
    "box_bottom",
    "box_right",
)
_FINAL = (TOPK, HISTOGRAMS, CHANNELS, IMAGES, SKIPPED, REPORT)
_PART_RE = re.compile(r"^part-(\d{6})$")
_TMP_RE = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]{8}$")
_COMPRESSION = "zstd"


def part_name(part: int) -> str:
    return f"part-{part:06d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_parquet(table: pa.Table, path: Path, *, row_group_size: int | None = None) -> None:
    """Write ``table`` to ``path`` through a temporary name (a kill leaves the old file or none)."""
    write_atomic(path, lambda tmp: pq.write_table(table, tmp, compression=_COMPRESSION, row_group_size=row_group_size))


def write_text(text: str, path: Path) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# -- what is in a folder ---------------------------------------------------------------------------
@dataclass(frozen=True)
class FolderState:
    """What ``--out`` holds: ``absent``, ``empty``, ``finished`` (a complete atlas), ``unfinished``
    (an atlas a run has started: resumable), ``other`` (an atlas-less featuremaps folder or anything
    else). ``run``: the unfinished run's settings (None before they were written)."""

    kind: str
    run: dict[str, Any] | None = None
    done: tuple[int, ...] = ()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def folder_state(root: str | os.PathLike) -> FolderState:
    path = Path(root)
    if not (path.exists() or path.is_symlink()):
        return FolderState("absent")
    if path.is_symlink() or not path.is_dir():
        return FolderState("other")
    try:
        names = {p.name for p in path.iterdir()}
    except OSError as exc:
        raise RunError(f"cannot read {path}: {exc.strerror or exc}; check its permissions") from None
    if not names:
        return FolderState("empty")
    marker = _read_json(path / PARTIAL_MARKER) if PARTIAL_MARKER in names else None
    if isinstance(marker, dict) and marker.get("kind") == "atlas":
        run = _read_json(path / RUN)
        return FolderState("unfinished", run if isinstance(run, dict) else None, done_parts(path))
    if PARTIAL_MARKER not in names:
        manifest = _read_json(path / MANIFEST)
        if isinstance(manifest, dict) and manifest.get("kind") == "atlas":
            return FolderState("finished", manifest)
    return FolderState("other")


def done_parts(root: Path) -> tuple[int, ...]:
    """The parts already complete in ``root`` (renamed into place, so with all their files)."""
    try:
        found = [int(m.group(1)) for p in (root / PARTS).iterdir() if (m := _PART_RE.match(p.name)) and p.is_dir()]
    except OSError:
        return ()
    return tuple(sorted(found))


def _ours(root: Path) -> str | None:
    """The first file in an unfinished atlas that an atlas run would not have written, or None."""
    allowed = {PARTIAL_MARKER, RUN, INPUTS, MANIFEST, *_FINAL}
    for p in root.iterdir():
        if p.name == PARTS and p.is_dir() and not p.is_symlink():
            for q in p.iterdir():
                if not ((_PART_RE.match(q.name) or _TMP_RE.match(q.name)) and q.is_dir() and not q.is_symlink()):
                    return f"{PARTS}/{q.name}"
                for f in q.iterdir():
                    if f.name not in PART_FILES and not _TMP_RE.match(f.name):
                        return f"{PARTS}/{q.name}/{f.name}"
        elif p.name not in allowed and not _TMP_RE.match(p.name):
            return p.name
    return None


def check_folder(root: str | os.PathLike, *, resume: bool, force: bool) -> FolderState:
    """Whether an atlas may be written to ``root`` with these options, before any work starts.

    Raises:
        RunError: a finished atlas without ``force`` (or ``resume``, which then has nothing to do), an
            unfinished one without ``resume`` or ``force``, a folder featuremaps did not write, or
            one that another process is writing.
    """
    path = Path(root)
    state = folder_state(path)
    if state.kind == "finished":
        if force:
            check_replaceable(path, overwrite=True)  # nothing in it that featuremaps did not write
        elif not resume:
            raise RunError(
                f"{path} already holds a finished atlas; open it with fm.open_atlas({str(path)!r}), choose another "
                "--out, or use --force to replace it"
            )
    elif state.kind == "unfinished":
        holder = _holder(path)
        if holder is not None:
            raise RunError(f"{path} is being written by another featuremaps process ({holder}); wait for it or stop it")
        if force:
            stray = _ours(path)
            if stray is not None:
                raise RunError(
                    f"{path} holds files an atlas run did not write ({stray}), so --force will not replace it; move "
                    "them out or choose another output folder"
                )
        elif not resume:
            raise RunError(
                f"{path} holds an unfinished atlas ({len(state.done)} parts done); run the same command with --resume "
                "to finish it, or --force to start over"
            )
    elif state.kind == "other":
        what = "is not a folder" if path.exists() and not path.is_dir() else "is not an atlas featuremaps wrote"
        raise RunError(f"{path} {what}; choose another output folder (--out)")
    return state


def _holder(root: Path) -> str | None:
    """Who holds the lock of an unfinished atlas (``pid N on HOST``), or None when no live process does."""
    marker = root / PARTIAL_MARKER
    try:
        fd = os.open(marker, os.O_RDWR)
    except OSError:
        return None
    try:
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            info = _read_json(marker) or {}
            return f"pid {info.get('pid', '?')} on {info.get('host', '?')}"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def remove_atlas(root: Path) -> None:
    """Remove an atlas featuremaps wrote (checked by :func:`check_folder`): renamed to a hidden
    ``.NAME.old-PID-XXXXXXXX`` sibling first, so a kill mid-way never leaves a half-deleted atlas
    under its name (featuremaps clears such leftovers, see :func:`featuremaps.folders.clear_stale_parts`)."""
    old = root.parent / f".{root.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        root.rename(old)
    except OSError as exc:
        raise RunError(f"cannot replace {root}: {exc.strerror or exc}; check its permissions") from None
    keep = old / MANIFEST  # removed last: until then the leftover is recognisably featuremaps'
    for p in old.iterdir():
        if p != keep:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    shutil.rmtree(old, ignore_errors=True)


# -- writing ---------------------------------------------------------------------------------------
class Writer:
    """The one process filling an atlas folder: holds its lock (``flock`` on the marker, released
    by the kernel when the process dies, SIGKILL included) while it writes parts and final files."""

    def __init__(self, root: Path):
        self.root = root
        self._fd: int | None = None

    def __enter__(self) -> "Writer":
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / PARTIAL_MARKER
        fd = os.open(marker, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            holder = _read_json(marker) or {}
            raise RunError(
                f"{self.root} is being written by another featuremaps process (pid {holder.get('pid', '?')}); wait for "
                "it or stop it"
            ) from None
        body = {
            "kind": "atlas",
            "pid": os.getpid(),
            "started": _process_start(os.getpid()),
            "host": socket.gethostname(),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(body).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        (self.root / PARTS).mkdir(exist_ok=True)
        self.clear_partial_parts()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the lock goes with it
            self._fd = None

    def finish(self) -> None:
        """Mark the atlas complete: called right after ``manifest.json`` is written."""
        (self.root / PARTIAL_MARKER).unlink(missing_ok=True)
        self.release()

    def clear_partial_parts(self) -> None:
        """Temporary parts and files of killed runs (this process holds the lock: none is live)."""
        for folder in (self.root, self.root / PARTS):
            for p in folder.iterdir():
                if _TMP_RE.match(p.name):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def reset(self) -> None:
        """Remove whatever an earlier, unfinished run left (its settings differ or were never written)."""
        for p in self.root.iterdir():
            if p.name == PARTIAL_MARKER:
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        (self.root / PARTS).mkdir()

    @contextlib.contextmanager
    def part(self, part: int) -> Iterator[Path]:
        """A temporary folder to fill with one part's files, renamed into place when the block ends."""
        final = self.root / PARTS / part_name(part)
        tmp = temp_sibling(final)
        tmp.mkdir()
        try:
            yield tmp
            for f in tmp.iterdir():
                _fsync(f)
            os.rename(tmp, final)
            _fsync(self.root / PARTS)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@dataclass(frozen=True)
class LayerSpec:
    """What the store needs of one layer: its name, channels and output size."""

    name: str
    channels: int
    height: int
    width: int


class PartBuffer:
    """The per-channel numbers of one part's images, filled batch by batch (any order)."""

    def __init__(self, part: int, ids: range, layers: Sequence[LayerSpec]):
        self.part = part
        self.start = ids.start
        self.n = len(ids)
        self.layers = tuple(layers)
        self.filled = np.zeros(self.n, bool)
        self.ok = np.zeros(self.n, bool)
        self.reasons = [""] * self.n
        self.sizes = np.zeros((self.n, 2), np.int32)
        self.values = {layer.name: np.zeros((self.n, layer.channels, 3), np.float32) for layer in self.layers}

    def add(
        self,
        ids: Sequence[int],
        ok: Sequence[bool],
        reasons: Sequence[str],
        sizes: Sequence[tuple[int, int]],
        values: Mapping[str, np.ndarray],
    ) -> None:
        pos = np.asarray(ids, dtype=np.int64) - self.start
        good = np.asarray(ok, dtype=bool)
        self.filled[pos] = True
        self.ok[pos] = good
        self.sizes[pos] = np.asarray(sizes, dtype=np.int32).reshape(-1, 2)
        for p, r in zip(pos, reasons):
            self.reasons[int(p)] = r
        for name, v in values.items():
            self.values[name][pos[good]] = v

    @property
    def complete(self) -> bool:
        return bool(self.filled.all())


def _layer_column(index: np.ndarray, names: Sequence[str]) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(index, pa.int32()), pa.array(list(names), pa.string()))


def write_part(writer: Writer, buf: PartBuffer, *, top_k: int) -> None:
    """Write one complete part (see the module doc for its files)."""
    ok_pos = np.flatnonzero(buf.ok)
    ids = (buf.start + ok_pos).astype(np.int32)
    n_ok = len(ids)
    names = [layer.name for layer in buf.layers]
    topk, sketch, channels = [], [], []
    for li, layer in enumerate(buf.layers):
        v = buf.values[layer.name][ok_pos]  # (n_ok, C, 3)
        c = layer.channels
        hi, mean, flat = v[..., 0], v[..., 1], v[..., 2].astype(np.int64)
        y, x = (flat // layer.width).astype(np.int32), (flat % layer.width).astype(np.int32)
        if n_ok:
            ranked = np.where(np.isnan(hi), -np.inf, hi)
            order = np.argsort(-ranked, axis=0, kind="stable")[: min(top_k, n_ok)]  # (k, C): ties keep id order
            cols = np.broadcast_to(np.arange(c), order.shape)
            keep = ~np.isnan(hi[order, cols])
            topk.append(
                {
                    "layer": np.full(int(keep.sum()), li, np.int32),
                    "channel": cols[keep].astype(np.int32),
                    "image_id": ids[order[keep]],
                    "value": hi[order, cols][keep],
                    "y": y[order, cols][keep],
                    "x": x[order, cols][keep],
                }
            )
        for stat, values in (("max", hi), ("mean", mean)):
            ch, code, count = channel_sketch(values)
            sketch.append(
                {
                    "layer": np.full(len(ch), li, np.int32),
                    "channel": ch,
                    "stat": np.full(len(ch), stat == "mean", np.int32),
                    "bucket": code.astype(np.int16),
                    "count": count,
                }
            )
        finite_hi, finite_mean = np.isfinite(hi), np.isfinite(mean)
        channels.append(
            {
                "layer": np.full(c, li, np.int32),
                "channel": np.arange(c, dtype=np.int32),
                "images": finite_hi.sum(axis=0).astype(np.int64),
                "max_min": _masked(hi, finite_hi, np.min, np.inf),
                "max_max": _masked(hi, finite_hi, np.max, -np.inf),
                "max_sum": np.where(finite_hi, hi, 0).sum(axis=0, dtype=np.float64),
                "mean_images": finite_mean.sum(axis=0).astype(np.int64),
                "mean_min": _masked(mean, finite_mean, np.min, np.inf),
                "mean_max": _masked(mean, finite_mean, np.max, -np.inf),
                "mean_sum": np.where(finite_mean, mean, 0).sum(axis=0, dtype=np.float64),
            }
        )

    def table(
        blocks: list[dict[str, np.ndarray]], dictionaries: Mapping[str, Sequence[str]], nulls: bool = False
    ) -> pa.Table:
        cols: dict[str, Any] = {}
        keys = blocks[0].keys() if blocks else ()
        for key in keys:
            joined = np.concatenate([b[key] for b in blocks])
            if key in dictionaries:
                cols[key] = _layer_column(joined, dictionaries[key])
            else:  # NaN -> null in the channel summaries (no finite value in this part), kept in activations
                cols[key] = pa.array(joined, mask=np.isnan(joined) if nulls and joined.dtype.kind == "f" else None)
        return pa.table(cols)

    stat_names = {"layer": names}
    images = pa.table(
        {
            "image_id": pa.array(np.arange(buf.start, buf.start + buf.n, dtype=np.int32)),
            "status": pa.array(["ok" if g else "skipped" for g in buf.ok], pa.string()),
            "reason": pa.array([None if g else r for g, r in zip(buf.ok, buf.reasons)], pa.string()),
            "width": pa.array(np.where(buf.ok, buf.sizes[:, 0], 0).astype(np.int32), mask=~buf.ok),
            "height": pa.array(np.where(buf.ok, buf.sizes[:, 1], 0).astype(np.int32), mask=~buf.ok),
        }
    )
    with writer.part(buf.part) as folder:
        # a layer and about a million rows at a time: a part's rows are never all built at once
        with pq.ParquetWriter(folder / STATS, _STATS_SCHEMA, compression=_COMPRESSION) as stats_file:
            for li, layer in enumerate(buf.layers):
                step = max(1, _ROWS_PER_WRITE // layer.channels)
                for start in range(0, max(n_ok, 1), step):
                    chunk = slice(start, start + step)
                    rows = table([_stats_rows(buf, li, layer, ok_pos[chunk], ids[chunk])], stat_names)
                    stats_file.write_table(rows.cast(_STATS_SCHEMA), row_group_size=_ROWS_PER_WRITE)
                    del rows
        pq.write_table(images, folder / PART_IMAGES, compression=_COMPRESSION)
        pq.write_table(
            _or_empty(table(topk, stat_names), _TOPK_PART_SCHEMA), folder / PART_TOPK, compression=_COMPRESSION
        )
        sk = table(sketch, {"layer": names, "stat": ["max", "mean"]})
        pq.write_table(sk, folder / PART_SKETCH, compression=_COMPRESSION)
        pq.write_table(table(channels, stat_names, nulls=True), folder / PART_CHANNELS, compression=_COMPRESSION)


def _stats_rows(
    buf: PartBuffer, li: int, layer: LayerSpec, ok_pos: np.ndarray, ids: np.ndarray
) -> dict[str, np.ndarray]:
    """The ``stats.parquet`` rows of one layer of a part: one per usable image x channel."""
    v = buf.values[layer.name][ok_pos]  # (n_ok, C, 3)
    n_ok, c = len(ids), layer.channels
    flat = v[..., 2].astype(np.int64)
    return {
        "image_id": np.repeat(ids, c),
        "layer": np.full(n_ok * c, li, np.int32),
        "channel": np.tile(np.arange(c, dtype=np.int32), n_ok),
        "max": v[..., 0].ravel(),
        "mean": v[..., 1].ravel(),
        "y": (flat // layer.width).astype(np.int32).ravel(),
        "x": (flat % layer.width).astype(np.int32).ravel(),
    }


_ROWS_PER_WRITE = 1 << 20
_STATS_SCHEMA = pa.schema(
    [
        ("image_id", pa.int32()),
        ("layer", pa.dictionary(pa.int32(), pa.string())),
        ("channel", pa.int32()),
        ("max", pa.float32()),
        ("mean", pa.float32()),
        ("y", pa.int32()),
        ("x", pa.int32()),
    ]
)

_TOPK_PART_SCHEMA = pa.schema(
    [
        ("layer", pa.dictionary(pa.int32(), pa.string())),
        ("channel", pa.int32()),
        ("image_id", pa.int32()),
        ("value", pa.float32()),
        ("y", pa.int32()),
        ("x", pa.int32()),
    ]
)


def _or_empty(table: pa.Table, schema: pa.Schema) -> pa.Table:
    return table if table.num_columns else schema.empty_table()


def _masked(values: np.ndarray, mask: np.ndarray, reduce: Any, fill: float) -> np.ndarray:
    if values.shape[0] == 0:
        return np.full(values.shape[1], np.nan)
    out = reduce(np.where(mask, values, fill), axis=0).astype(np.float64)
    return np.where(mask.any(axis=0), out, np.nan)


def part_files(root: Path, num_parts: int, name: str) -> list[str]:
    return [str(root / PARTS / part_name(p) / name) for p in range(num_parts)]


def store_bytes(root: Path) -> dict[str, int]:
    """Bytes on disk: the per-image stats (all parts' ``stats.parquet``), the rest of the parts, and the final tables."""
    stats = other = 0
    for f in (root / PARTS).rglob("*.parquet"):
        if f.name == STATS:
            stats += f.stat().st_size
        else:
            other += f.stat().st_size
    final = sum((root / n).stat().st_size for n in (TOPK, HISTOGRAMS, CHANNELS, IMAGES, INPUTS) if (root / n).exists())
    return {"stats": stats, "parts_other": other, "tables": final}
