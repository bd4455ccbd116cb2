"""Reading an atlas: :class:`Atlas`, what :func:`featuremaps.open_atlas` and :func:`featuremaps.atlas` give.

Everything a viewer's channel page shows comes from here, so that the page is a thin shell:
:meth:`Atlas.channel` (the top images with their crop boxes, the activation distribution, the
channel's numbers), :meth:`Atlas.crops` (each crop as a PIL picture with the channel's heatmap
over it), :meth:`Atlas.maps` (the full maps of one image, for the link to them), and
:meth:`Atlas.sql` for anything else (DuckDB over the Parquet files).
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import RunError
from ..folders import PARTIAL_MARKER, read_manifest
from .engine import AtlasLayer, preprocessing_from_json
from .errors import AtlasError
from .merge import connect, sql_list, sql_string, to_arrow
from .sketch import Distribution, bucket_codes
from .store import CHANNELS, HISTOGRAMS, IMAGES, PARTS, REPORT, STATS, TOPK, part_name

if TYPE_CHECKING:  # pragma: no cover
    import duckdb
    from PIL import Image

    from ..maps import FeatureMaps
    from ..models import Model


@dataclass(frozen=True)
class TopImage:
    """One of the images that excite a channel most.

    Attributes:
        rank: 1 for the highest value.
        image: the image's path as given to the atlas.
        value: the channel's max over the image's map.
        y, x: where that max is, in the layer's output.
        box: ``(top, left, bottom, right)``: the receptive field of ``(y, x)`` in the original
            image's pixels (bottom/right exclusive, clipped at the borders): the crop to show.
    """

    layer: str
    channel: int
    rank: int
    image: str
    value: float
    y: int
    x: int
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class ChannelActivation:
    """How one channel responds to one image (see :meth:`Atlas.channels_of`).

    Attributes:
        value, mean: the channel's max and mean over the image's map; ``y, x``: where the max is.
        quantile: the fraction of the atlas's images whose max is lower (from the sketch, within
            a bucket): near 1 means this image is among the channel's strongest.
        rank: the image's rank in the channel's top-k, or None when it is not in it.
    """

    layer: str
    channel: int
    value: float
    mean: float
    y: int
    x: int
    quantile: float
    rank: int | None


@dataclass(frozen=True, eq=False)
class Crop:
    """A top image's crop with the channel's activation over it (see :meth:`Atlas.crops`).

    Attributes:
        hit: which image and where.
        picture: the original image's pixels in ``hit.box`` (RGB).
        heatmap: ``picture`` with the channel's map, coloured, blended over it.
        activation: the channel's map over the crop, float32 ``(height, width)`` of ``picture``
            (each output position placed at the centre of its receptive field, bilinear between).
        scale: the colour range ``(vmin, vmax)``, the same for every crop of one call.
    """

    hit: TopImage
    picture: "Image.Image" = field(repr=False)
    heatmap: "Image.Image" = field(repr=False)
    activation: np.ndarray = field(repr=False)
    scale: tuple[float, float] = (0.0, 1.0)


@dataclass(frozen=True)
class ChannelView:
    """Everything a channel page shows, in one call (see :meth:`Atlas.channel`).

    Attributes:
        top: the top images, strongest first.
        distribution: the channel's per-image max over the atlas's images.
        images: how many images have a value; ``max_mean``/``mean_mean``: the average per-image max / mean.
        receptive_field: ``(height, width)`` in input pixels, or None (the whole image).
    """

    layer: str
    channel: int
    top: tuple[TopImage, ...]
    distribution: Distribution
    images: int
    max_mean: float
    mean_mean: float
    receptive_field: tuple[int, int] | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (for a viewer's API)."""
        return {
            "layer": self.layer,
            "channel": self.channel,
            "images": self.images,
            "max_mean": self.max_mean,
            "mean_mean": self.mean_mean,
            "receptive_field": None if self.receptive_field is None else list(self.receptive_field),
            "top": [
                {"rank": h.rank, "image": h.image, "value": h.value, "y": h.y, "x": h.x, "box": list(h.box)}
                for h in self.top
            ],
            "distribution": self.distribution.to_dict(),
        }


class Atlas:
    """A finished atlas folder, read with DuckDB.

    Attributes:
        folder: where it is.
        manifest: its ``manifest.json``.
        layers: the layers, in the order they were given.
    """

    def __init__(self, folder: str | Path, *, model: "Model | Any | None" = None):
        self.folder = Path(folder)
        if (self.folder / PARTIAL_MARKER).exists():
            raise RunError(
                f"{self.folder} holds an unfinished atlas; run the same `featuremaps atlas` command with --resume to "
                "finish it"
            )
        try:
            self.manifest = read_manifest(self.folder, kind="atlas")
        except RunError as exc:
            if not self.folder.is_dir():
                raise RunError(f"{self.folder} not found; give the folder `featuremaps atlas` wrote (--out)") from None
            raise exc from None
        self.layers: tuple[AtlasLayer, ...] = tuple(AtlasLayer.from_json(d) for d in self.manifest["layers"])
        self._by_name = {layer.name: layer for layer in self.layers}
        self._model = model
        self._con: duckdb.DuckDBPyConnection | None = None
        self._lock = threading.Lock()
        self._files: dict[str, str] | None = None

    # -- what it is ------------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        """Every input, usable or not."""
        return int(self.manifest["images"])

    @property
    def num_skipped(self) -> int:
        return int(self.manifest["skipped"])

    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    @property
    def model_name(self) -> str:
        return str(self.manifest["model"])

    @property
    def weights(self) -> str:
        return str(self.manifest["weights"])

    @property
    def pretrained(self) -> bool:
        return bool(self.manifest["pretrained"])

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.manifest["input_size"])  # type: ignore[return-value]

    @property
    def report(self) -> Path:
        """The report, ``index.html`` (absent when the atlas was made with ``report=False``)."""
        return self.folder / REPORT

    def __repr__(self) -> str:
        layers = ", ".join(f"{layer.name} ({layer.channels})" for layer in self.layers)
        return (
            f"Atlas({str(self.folder)!r}: {self.model_name} · {self.weights} · {self.num_images} images, "
            f"{self.num_skipped} skipped · {layers})"
        )

    def layer(self, name: str) -> AtlasLayer:
        """The layer called ``name``.

        Raises:
            AtlasError: no such layer in this atlas (with the closest names).
        """
        found = self._by_name.get(name)
        if found is None:
            close = difflib.get_close_matches(str(name), list(self._by_name), n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise AtlasError(f"no layer {name!r} in this atlas; {hint}it has {', '.join(self._by_name)}")
        return found

    def _check(self, layer: str, channel: int) -> AtlasLayer:
        found = self.layer(layer)
        if not isinstance(channel, (int, np.integer)) or isinstance(channel, bool) or not 0 <= channel < found.channels:
            raise AtlasError(f"{layer} has channels 0..{found.channels - 1}, not {channel!r}")
        return found

    # -- DuckDB ----------------------------------------------------------------------------------
    def _db(self) -> "duckdb.DuckDBPyConnection":
        with self._lock:
            if self._con is None:
                con = connect()
                root = self.folder.resolve()
                parts = sql_list([str(root / PARTS / part_name(p) / STATS) for p in range(int(self.manifest["parts"]))])

                def path(name: str) -> str:
                    return sql_string(str(root / name))

                con.execute(f"CREATE VIEW stats AS SELECT * FROM read_parquet({parts})")
                con.execute(f"CREATE VIEW images AS SELECT * FROM read_parquet({path(IMAGES)})")
                con.execute(f"CREATE VIEW topk AS SELECT * FROM read_parquet({path(TOPK)})")
                con.execute(f"CREATE VIEW histograms AS SELECT * FROM read_parquet({path(HISTOGRAMS)})")
                con.execute(f"CREATE VIEW channels AS SELECT * FROM read_parquet({path(CHANNELS)})")
                con.execute("CREATE VIEW skipped AS SELECT image, reason FROM images WHERE status = 'skipped'")
                con.execute(
                    "CREATE VIEW activations AS SELECT s.image_id, i.image, i.label, s.layer, s.channel, s.max, "
                    "s.mean, s.y, s.x FROM stats s JOIN images i USING (image_id)"
                )
                self._con = con
            return self._con.cursor()

    def sql(self, query: str, params: Sequence[Any] | None = None) -> "duckdb.DuckDBPyRelation":
        """Run ``query`` with DuckDB over the atlas's tables, as views: ``stats`` (image_id, layer,
        channel, max, mean, y, x: every image x layer x channel), ``activations`` (the same with
        the image's path and label), ``images``, ``skipped``, ``topk``, ``histograms``, ``channels``.
        Returns DuckDB's relation (``.fetchall()``, ``.to_arrow_table()``, ``.df()``...)."""
        con = self._db()
        return con.sql(query, params=list(params)) if params else con.sql(query)

    def _rows(self, query: str, params: Sequence[Any]) -> list[tuple]:
        return self._db().execute(query, list(params)).fetchall()

    # -- channels --------------------------------------------------------------------------------
    def top(self, layer: str, channel: int, k: int = 9) -> tuple[TopImage, ...]:
        """The ``k`` images (strongest first) whose max activation of ``channel`` is highest, with
        where the max is and its crop box. Up to the atlas's top-k from ``topk.parquet``; more are
        ranked from the stored per-image numbers (the same order: value, then image order)."""
        found = self._check(layer, channel)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise AtlasError(f"k must be an integer >= 1, not {k!r}")
        if k <= self.top_k:
            rows = self._rows(
                "SELECT rank, image, value, y, x, box_top, box_left, box_bottom, box_right FROM topk "
                "WHERE layer = ? AND channel = ? ORDER BY rank LIMIT ?",
                [layer, int(channel), k],
            )
            return tuple(
                TopImage(layer, int(channel), int(r), img, float(v), int(y), int(x), (int(t), int(le), int(b), int(ri)))
                for r, img, v, y, x, t, le, b, ri in rows
            )
        rows = self._rows(
            "SELECT i.image, s.max, s.y, s.x, i.height, i.width FROM stats s JOIN images i USING (image_id) "
            "WHERE s.layer = ? AND s.channel = ? AND NOT isnan(s.max) ORDER BY s.max DESC, s.image_id LIMIT ?",
            [layer, int(channel), k],
        )
        return tuple(
            TopImage(layer, int(channel), n, img, float(v), int(y), int(x), found.box(y, x, h, w))
            for n, (img, v, y, x, h, w) in enumerate(rows, 1)
        )

    def distribution(self, layer: str, channel: int, *, stat: str = "max") -> Distribution:
        """The distribution over the atlas's images of the channel's per-image ``max`` (or ``mean``)."""
        self._check(layer, channel)
        if stat not in ("max", "mean"):
            raise AtlasError(f"stat is 'max' or 'mean' (per image), not {stat!r}")
        buckets = self._rows(
            "SELECT bucket, count FROM histograms WHERE layer = ? AND channel = ? AND stat = ? ORDER BY bucket",
            [layer, int(channel), stat],
        )
        summary = self._rows(
            f"SELECT images, {stat}_min, {stat}_max, {stat}_mean FROM channels WHERE layer = ? AND channel = ?",
            [layer, int(channel)],
        )
        count, lo, hi, mean = summary[0] if summary else (0, None, None, None)
        return Distribution(
            layer=layer,
            channel=int(channel),
            stat=stat,
            count=int(sum(c for _, c in buckets)),
            minimum=float("nan") if lo is None else float(lo),
            maximum=float("nan") if hi is None else float(hi),
            mean=float("nan") if mean is None else float(mean),
            codes=np.array([b for b, _ in buckets], dtype=np.int64),
            counts=np.array([c for _, c in buckets], dtype=np.int64),
        )

    def channel(self, layer: str, channel: int, *, k: int = 9) -> ChannelView:
        """What a channel page shows: the top ``k`` images with their crop boxes, the distribution
        of the channel's per-image max, and its averages (no model needed; see :meth:`crops`)."""
        found = self._check(layer, channel)
        rows = self._rows(
            "SELECT images, max_mean, mean_mean FROM channels WHERE layer = ? AND channel = ?", [layer, int(channel)]
        )
        images, max_mean, mean_mean = rows[0] if rows else (0, None, None)
        rf = found.receptive_field
        return ChannelView(
            layer=layer,
            channel=int(channel),
            top=self.top(layer, channel, k),
            distribution=self.distribution(layer, channel),
            images=int(images),
            max_mean=float("nan") if max_mean is None else float(max_mean),
            mean_mean=float("nan") if mean_mean is None else float(mean_mean),
            receptive_field=None if rf is None else (int(rf.size[0]), int(rf.size[1])),
        )

    # -- images ----------------------------------------------------------------------------------
    def _image_id(self, image: Any) -> int:
        text = str(image)
        rows = self._rows(
            "SELECT image_id, status, reason FROM images WHERE image = ? ORDER BY image_id LIMIT 1", [text]
        )
        if not rows:
            resolved = str(Path(text).expanduser().resolve())
            rows = self._rows(
                "SELECT image_id, status, reason FROM images WHERE file = ? ORDER BY image_id LIMIT 1", [resolved]
            )
        if not rows:
            raise AtlasError(
                f"{text} is not in this atlas ({self.num_images} images); give its path as listed (the image column "
                "of images.parquet)"
            )
        image_id, status, reason = rows[0]
        if status != "ok":
            raise AtlasError(f"{text} was skipped by this atlas: {reason}")
        return int(image_id)

    def file_of(self, image: str) -> str:
        """The file an image (as listed) was read from."""
        with self._lock:
            if self._files is None:
                table = to_arrow(
                    connect().sql(f"SELECT image, file FROM read_parquet({sql_string(str(self.folder / IMAGES))})")
                )
                self._files = dict(zip(table.column("image").to_pylist(), table.column("file").to_pylist()))
        try:
            return self._files[image]
        except KeyError:
            raise AtlasError(f"{image} is not in this atlas; give its path as listed in images.parquet") from None

    def channels_of(
        self, image: Any, *, layer: str | None = None, k: int = 10, by: str = "value"
    ) -> tuple[ChannelActivation, ...]:
        """The ``k`` channels that fire most for ``image`` (its path as listed, or any path to the
        same file), in ``layer`` or in every layer. ``by="value"`` ranks by the channel's max on
        this image; ``by="quantile"`` by how exceptional that max is for the channel (the fraction
        of the atlas's images below it), which compares channels of different scales and layers."""
        if by not in ("value", "quantile"):
            raise AtlasError(f"by is 'value' or 'quantile', not {by!r}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise AtlasError(f"k must be an integer >= 1, not {k!r}")
        if layer is not None:
            self.layer(layer)
        image_id = self._image_id(image)
        where = "s.image_id = ?" + (" AND s.layer = ?" if layer is not None else "")
        params: list[Any] = [image_id] + ([layer] if layer is not None else [])
        table = to_arrow(
            self._db().sql(
                f"SELECT s.layer, s.channel, s.max, s.mean, s.y, s.x FROM stats s WHERE {where}", params=params
            )
        )
        import pyarrow as pa

        values = table.column("max").to_numpy()
        codes = bucket_codes(np.where(np.isfinite(values), values, 0.0))
        query = pa.table(
            {
                "layer": table.column("layer").cast(pa.string()),
                "channel": table.column("channel"),
                "code": pa.array(codes.astype(np.int32)),
            }
        )
        con = self._db()
        con.register("q", query)
        ranks = to_arrow(
            con.sql(
                "SELECT q.layer, q.channel, "
                "(coalesce(sum(h.count) FILTER (WHERE h.bucket < q.code), 0) + "
                "0.5 * coalesce(sum(h.count) FILTER (WHERE h.bucket = q.code), 0)) / sum(h.count) AS quantile, "
                "any_value(t.rank) AS rank "
                "FROM q JOIN histograms h ON h.layer = q.layer AND h.channel = q.channel AND h.stat = 'max' "
                "LEFT JOIN (SELECT layer, channel, rank FROM topk WHERE image = ?) t "
                "ON t.layer = q.layer AND t.channel = q.channel GROUP BY q.layer, q.channel",
                params=[self._image_name(image_id)],
            )
        )
        con.unregister("q")
        info = {
            (str(lay), int(ch)): (float(qv), None if r is None else int(r))
            for lay, ch, qv, r in zip(*(ranks.column(c).to_pylist() for c in ("layer", "channel", "quantile", "rank")))
        }
        rows = []
        for lay, ch, v, m, y, x in zip(
            *(table.column(c).to_pylist() for c in ("layer", "channel", "max", "mean", "y", "x"))
        ):
            quantile, rank = info.get((str(lay), int(ch)), (float("nan"), None))
            rows.append(ChannelActivation(str(lay), int(ch), float(v), float(m), int(y), int(x), quantile, rank))
        order = {name: i for i, name in enumerate(self._by_name)}
        if by == "value":
            rows.sort(key=lambda r: (-_finite(r.value), order[r.layer], r.channel))
        else:
            rows.sort(key=lambda r: (-_finite(r.quantile), -_finite(r.value), order[r.layer], r.channel))
        return tuple(rows[:k])

    def _image_name(self, image_id: int) -> str:
        return self._rows("SELECT image FROM images WHERE image_id = ?", [image_id])[0][0]

    def skipped(self) -> tuple[tuple[str, str], ...]:
        """``(image, reason)`` of every input that was skipped, in input order."""
        return tuple((str(i), str(r)) for i, r in self._rows("SELECT image, reason FROM skipped", []))

    # -- pictures (need the model) -----------------------------------------------------------------
    def model(self, model: "Model | Any | None" = None) -> Any:
        """The model to capture full maps with: ``model``, the one this atlas was made with in this
        process, or the same model built again from the manifest (name, weights, seed)."""
        if model is not None:
            return model
        if self._model is None:
            reload = self.manifest.get("reload")
            if reload is None:
                raise AtlasError(
                    f"this atlas was made with a model object ({self.model_name}); pass model= to draw its maps"
                )
            from ..models import load_model

            self._model = load_model(reload["model"], reload["weights"], seed=int(reload["seed"]), progress=False)
        return self._model

    def crops(
        self,
        layer: str,
        channel: int,
        k: int = 9,
        *,
        model: "Model | Any | None" = None,
        alpha: float = 0.5,
        cmap: str = "jet",
    ) -> tuple[Crop, ...]:
        """The top ``k`` images' crops (their receptive-field boxes) with the channel's activation
        heatmap over each: the ``k`` images are captured again (full maps of this one layer)."""
        import torch

        from ..capture import capture
        from ..render import colorize
        from .inputs import load_picture

        found = self._check(layer, channel)
        if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise AtlasError(f"alpha is the heatmap's opacity between 0 and 1, not {alpha!r}")
        hits = self.top(layer, channel, k)
        if not hits:
            return ()
        net = self.model(model)
        pre = preprocessing_from_json(self.manifest["preprocessing"])
        pictures = [load_picture(self.file_of(h.image)) for h in hits]
        x = torch.cat([pre(p)[0] for p in pictures])
        maps = capture(net, x, layers=[found.select])
        entry = next(e for e in maps.entries if e.name == found.name)
        chmaps = entry.tensor[:, int(channel)].detach().float().cpu().numpy()
        pieces = []
        for hit, picture, m in zip(hits, pictures, chmaps):
            pieces.append(_activation_over(m, found, picture.size, hit.box))
        lo = min(0.0, min(float(p.min()) for p in pieces if p.size))
        hi = max(float(p.max()) for p in pieces if p.size)
        hi = hi if hi > lo else lo + 1.0
        out = []
        for hit, picture, act in zip(hits, pictures, pieces):
            t, le, b, r = hit.box
            crop = picture.crop((le, t, r, b))
            heat = colorize(act, cmap=cmap, vmin=lo, vmax=hi)
            blend = np.asarray(crop, np.float32) * (1 - alpha) + heat.astype(np.float32) * alpha
            from PIL import Image

            out.append(Crop(hit, crop, Image.fromarray(np.clip(blend + 0.5, 0, 255).astype(np.uint8)), act, (lo, hi)))
        return tuple(out)

    def maps(
        self, image: Any, *, layers: str | Sequence[str] | None = None, model: "Model | Any | None" = None
    ) -> "FeatureMaps":
        """The full feature maps of one of the atlas's images (its layers by default), as
        :func:`featuremaps.capture` gives them: what a channel page links to."""
        from ..capture import capture

        image_id = self._image_id(image)
        file = self.file_of(self._image_name(image_id))
        wanted = layers if layers is not None else [layer.select for layer in self.layers]
        return capture(self.model(model), file, layers=wanted, size=self.input_size)


def _finite(v: float) -> float:
    return v if np.isfinite(v) else -np.inf


def _activation_over(
    m: np.ndarray, layer: AtlasLayer, size: tuple[int, int], box: tuple[int, int, int, int]
) -> np.ndarray:
    """The channel's map ``m`` (h, w) over ``box`` of an original picture of ``size`` (w, h):
    each output position at the centre of its receptive field (``offset + i * stride`` input
    pixels), bilinear in between, sampled at the centre of every picture pixel of the box."""
    w0, h0 = size
    top, left, bottom, right = box
    rf = layer.receptive_field
    h, w = m.shape
    rows, cols = np.arange(top, bottom) + 0.5, np.arange(left, right) + 0.5  # picture pixel centres
    if rf is None:  # no geometry: the map spread over the whole picture, centres aligned
        ys, xs = rows * h / h0 - 0.5, cols * w / w0 - 0.5
    else:  # picture -> input pixel coordinate (resized whole, no crop) -> output position
        (in_h, in_w), (oy, ox), (sy, sx) = rf.input_size, rf.offset, rf.stride
        ys = (rows * in_h / h0 - 0.5 - oy) / sy
        xs = (cols * in_w / w0 - 0.5 - ox) / sx
    return _bilinear(m.astype(np.float32), np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1))


def _bilinear(m: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    y1 = np.minimum(y0 + 1, m.shape[0] - 1)
    x1 = np.minimum(x0 + 1, m.shape[1] - 1)
    fy = (ys - y0)[:, None].astype(np.float32)
    fx = (xs - x0)[None, :].astype(np.float32)
    top = m[y0][:, x0] * (1 - fx) + m[y0][:, x1] * fx
    bottom = m[y1][:, x0] * (1 - fx) + m[y1][:, x1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)
