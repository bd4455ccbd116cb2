"""The end of a run: the parts merged into the atlas's tables, with DuckDB (streaming, bounded memory)
over the parts' Parquet files. Each step writes its file through a temporary name, so the merge can
be killed and run again (``--resume`` does) with the same result.

The top-k of a channel is the k highest per-image maxima over all parts; ties go to the lower image
id, in every part and in the merge, so the result does not depend on how the images were cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ..folders import write_atomic
from .sketch import bucket_bounds
from .store import (
    CHANNELS,
    HISTOGRAMS,
    IMAGES,
    INPUTS,
    PART_CHANNELS,
    PART_IMAGES,
    PART_SKETCH,
    PART_TOPK,
    SKIPPED,
    TOPK,
    TOPK_COLUMNS,
    part_files,
    write_parquet,
)

if TYPE_CHECKING:  # pragma: no cover
    import duckdb

    from .engine import AtlasLayer


def connect() -> "duckdb.DuckDBPyConnection":
    import duckdb

    con = duckdb.connect()
    con.execute("SET preserve_insertion_order = false")
    return con


def to_arrow(rel: Any) -> pa.Table:
    """A DuckDB result as a pyarrow Table (``to_arrow_table`` where this DuckDB has it)."""
    fetch = getattr(rel, "to_arrow_table", None)
    return fetch() if fetch is not None else rel.arrow()


def sql_string(text: str) -> str:
    return "'" + str(text).replace("'", "''") + "'"


def sql_list(paths: Sequence[str]) -> str:
    return "[" + ", ".join(sql_string(p) for p in paths) + "]"


def _copy(con: "duckdb.DuckDBPyConnection", query: str, path: Path, options: str) -> None:
    write_atomic(path, lambda tmp: con.execute(f"COPY ({query}) TO {sql_string(str(tmp))} ({options})"))


def merge_images(con: "duckdb.DuckDBPyConnection", root: Path, num_parts: int) -> None:
    """``images.parquet`` (every input with its status and size) and ``skipped.csv``."""
    parts = sql_list(part_files(root, num_parts, PART_IMAGES))
    query = (
        "SELECT i.image_id, i.image, i.file, i.label, p.status, p.reason, p.width, p.height "
        f"FROM read_parquet({sql_string(str(root / INPUTS))}) i JOIN read_parquet({parts}) p USING (image_id) "
        "ORDER BY i.image_id"
    )
    _copy(con, query, root / IMAGES, "FORMAT parquet, COMPRESSION zstd")
    skipped = (
        f"SELECT image, reason FROM read_parquet({sql_string(str(root / IMAGES))}) WHERE status = 'skipped' "
        "ORDER BY image_id"
    )
    _copy(con, skipped, root / SKIPPED, "FORMAT csv, HEADER true")


def merge_topk(
    con: "duckdb.DuckDBPyConnection", root: Path, num_parts: int, layers: Sequence["AtlasLayer"], k: int
) -> None:
    """``topk.parquet``: the parts' top-k lists merged, with each hit's crop box in original pixels."""
    parts = sql_list(part_files(root, num_parts, PART_TOPK))
    rel = con.sql(
        "SELECT t.layer, t.channel, t.image_id, t.value, t.y, t.x, i.image, i.width, i.height, "
        "row_number() OVER (PARTITION BY t.layer, t.channel ORDER BY t.value DESC, t.image_id) AS rank "
        f"FROM read_parquet({parts}) t JOIN read_parquet({sql_string(str(root / IMAGES))}) i USING (image_id) "
        f"QUALIFY rank <= {int(k)}"
    )
    table = to_arrow(rel)
    order = {layer.name: i for i, layer in enumerate(layers)}
    by_name = {layer.name: layer for layer in layers}
    names = [str(v) for v in table.column("layer").to_pylist()]
    li = np.array([order[n] for n in names], dtype=np.int64)
    channel = table.column("channel").to_numpy().astype(np.int64)
    rank = table.column("rank").to_numpy().astype(np.int64)
    idx = np.lexsort((rank, channel, li))
    ys = table.column("y").to_numpy()
    xs = table.column("x").to_numpy()
    hs = table.column("height").to_numpy()
    ws = table.column("width").to_numpy()
    boxes = np.zeros((len(names), 4), np.int32)
    for i in range(len(names)):
        boxes[i] = by_name[names[i]].box(ys[i], xs[i], hs[i], ws[i])
    take = pa.array(idx)
    layer_names = [layer.name for layer in layers]
    out = pa.table(
        {
            "layer": pa.DictionaryArray.from_arrays(pa.array(li[idx], pa.int32()), pa.array(layer_names, pa.string())),
            "channel": pa.array(channel[idx], pa.int32()),
            "rank": pa.array(rank[idx], pa.int32()),
            "image": table.column("image").take(take),
            "value": table.column("value").take(take).cast(pa.float32()),
            "y": pa.array(ys[idx], pa.int32()),
            "x": pa.array(xs[idx], pa.int32()),
            "box_top": pa.array(boxes[idx, 0]),
            "box_left": pa.array(boxes[idx, 1]),
            "box_bottom": pa.array(boxes[idx, 2]),
            "box_right": pa.array(boxes[idx, 3]),
        }
    )
    out = out.set_column(0, "layer", out.column("layer").cast(pa.string())).select(list(TOPK_COLUMNS))
    write_parquet(out, root / TOPK)


def merge_sketches(
    con: "duckdb.DuckDBPyConnection", root: Path, num_parts: int, layers: Sequence["AtlasLayer"]
) -> None:
    """``histograms.parquet``: the parts' sketches summed per channel and bucket, with the buckets' bounds."""
    parts = sql_list(part_files(root, num_parts, PART_SKETCH))
    table = to_arrow(
        con.sql(
            "SELECT layer, channel, stat, bucket, sum(count)::BIGINT AS count "
            f"FROM read_parquet({parts}) GROUP BY layer, channel, stat, bucket"
        )
    )
    order = {layer.name: i for i, layer in enumerate(layers)}
    li = np.array([order[str(n)] for n in table.column("layer").to_pylist()], dtype=np.int64)
    stat = np.array([s == "mean" for s in table.column("stat").to_pylist()], dtype=np.int64)
    channel = table.column("channel").to_numpy().astype(np.int64)
    bucket = table.column("bucket").to_numpy().astype(np.int64)
    idx = np.lexsort((bucket, stat, channel, li))
    lower, upper = bucket_bounds(bucket[idx])
    out = pa.table(
        {
            "layer": pa.array([layers[i].name for i in li[idx]], pa.string()),
            "channel": pa.array(channel[idx], pa.int32()),
            "stat": pa.array(np.where(stat[idx] == 1, "mean", "max"), pa.string()),
            "bucket": pa.array(bucket[idx], pa.int16()),
            "lower": pa.array(lower),
            "upper": pa.array(upper),
            "count": table.column("count").take(pa.array(idx)),
        }
    )
    write_parquet(out, root / HISTOGRAMS)


def merge_channels(
    con: "duckdb.DuckDBPyConnection", root: Path, num_parts: int, layers: Sequence["AtlasLayer"]
) -> None:
    """``channels.parquet``: per channel the number of images and the exact min / max / mean of
    its per-image max and mean."""
    parts = sql_list(part_files(root, num_parts, PART_CHANNELS))
    table = to_arrow(
        con.sql(
            "SELECT layer, channel, sum(images)::BIGINT AS images, min(max_min) AS max_min, max(max_max) AS max_max, "
            "sum(max_sum) / nullif(sum(images), 0) AS max_mean, min(mean_min) AS mean_min, max(mean_max) AS mean_max, "
            "sum(mean_sum) / nullif(sum(mean_images), 0) AS mean_mean "
            f"FROM read_parquet({parts}) GROUP BY layer, channel"
        )
    )
    order = {layer.name: i for i, layer in enumerate(layers)}
    li = np.array([order[str(n)] for n in table.column("layer").to_pylist()], dtype=np.int64)
    idx = pa.array(np.lexsort((table.column("channel").to_numpy(), li)))
    out = table.take(idx)
    out = out.set_column(0, "layer", out.column("layer").cast(pa.string()))
    write_parquet(out, root / CHANNELS)
