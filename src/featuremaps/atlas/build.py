"""One atlas run, start to finish (or from where a killed run stopped): the folder checked and
locked, the settings and the input list frozen, the parts of the plan computed by an engine and
written as they complete, then merged, drawn and sealed with the manifest."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq

from ..folders import write_manifest
from .engine import (
    AtlasLayer,
    BatchResult,
    Phase,
    Progress,
    default_part_size,
    local_batches,
    model_identity,
    preprocessing_json,
)
from .errors import AtlasError
from .inputs import ImageList, Plan
from .merge import connect, merge_channels, merge_images, merge_sketches, merge_topk, sql_string, to_arrow
from .reader import Atlas
from .sketch import ALPHA, MIN_VALUE
from .store import (
    IMAGES,
    INPUTS,
    PORTRAITS,
    RUN,
    SCHEMA_VERSION,
    TOPK,
    FolderState,
    PartBuffer,
    Writer,
    check_folder,
    done_parts,
    remove_atlas,
    store_bytes,
    write_parquet,
    write_part,
    write_text,
)

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from ..models import Model
    from ..preprocess import Preprocessing

#: Settings a resumed run must share with the run it finishes (what each is called on the command line).
_SAME = {
    "source": "the source",
    "source_kind": "the kind of source",
    "model_name": "--model",
    "weights": "--weights",
    "layer_names": "--layers",
    "input_size": "--size",
    "top_k": "--top-k",
    "batch_size": "--batch-size",
    "part_size": "the part size",
}


def _settings(
    images: ImageList,
    identity: dict,
    layers: tuple[AtlasLayer, ...],
    pre: "Preprocessing",
    *,
    top_k: int,
    batch_size: int,
    part_size: int,
) -> dict[str, Any]:
    return {
        "kind": "atlas-run",
        "schema_version": SCHEMA_VERSION,
        "source": images.source,
        "source_kind": images.kind,
        "num_images": len(images),
        "ignored_files": images.ignored,
        "model": identity,
        "model_name": identity["name"],
        "weights": identity["weights"],
        "layer_names": [layer.name for layer in layers],
        "layers": [layer.to_json() for layer in layers],
        "input_size": list(pre.size),
        "preprocessing": preprocessing_json(pre),
        "top_k": top_k,
        "batch_size": batch_size,
        "part_size": part_size,
    }


def check_resumable(root: Path, before: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse to resume with settings that would not give the rows the first run would have written."""
    for key, what in _SAME.items():
        if key == "part_size" and now.get(key) is None:
            continue
        if before.get(key) != now.get(key):
            raise AtlasError(
                f"{root} was started with {what} {_show(before.get(key))}, not {_show(now.get(key))}; resume with "
                "the same settings, or use --force to start over"
            )


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return repr(value) if isinstance(value, str) else str(value)


def build(
    model: "Model | nn.Module",
    images: ImageList,
    out: str | Path,
    *,
    layers: tuple[AtlasLayer, ...],
    pre: "Preprocessing",
    top_k: int = 16,
    batch_size: int = 32,
    part_size: int | None = None,
    workers: int = 0,
    engine: str = "local",
    ray_address: str | None = None,
    ray_actors: int | None = None,
    resume: bool = False,
    force: bool = False,
    report: bool = True,
    portraits: "bool | str | os.PathLike" = False,
    portrait_options: Mapping[str, Any] | None = None,
    on_progress: Progress | None = None,
    on_phase: Phase | None = None,
    state: FolderState | None = None,
) -> Atlas:
    """Make (or finish) the atlas of ``images`` in ``out``; see :func:`featuremaps.atlas`."""
    root = Path(out)
    state = state if state is not None else check_folder(root, resume=resume, force=force)
    phase = on_phase or (lambda text: None)
    if state.kind == "finished":
        if not force:
            phase("the atlas is already complete: nothing to resume")
            return Atlas(root, model=model)
        remove_atlas(root)
    identity = model_identity(model)
    channels = sum(layer.channels for layer in layers)
    settings = _settings(
        images,
        identity,
        layers,
        pre,
        top_k=top_k,
        batch_size=batch_size,
        part_size=part_size if part_size is not None else default_part_size(channels, batch_size),
    )
    with Writer(root) as writer:
        before = _read_run(root) if state.kind == "unfinished" and resume else None
        if before is not None:
            now = dict(settings, part_size=part_size)
            check_resumable(root, before, now)
            settings = before
            images = ImageList.from_table(pq.read_table(root / INPUTS), source=images.source, kind=images.kind)
            done = set(done_parts(root))
        else:
            writer.reset()  # what an unfinished run left (--force), or a run killed before its settings were written
            write_parquet(images.table(), root / INPUTS)
            write_text(json.dumps(settings, indent=2), root / RUN)  # last: the run has started
            done = set()
        plan = Plan(len(images), int(settings["part_size"]), int(settings["batch_size"]))
        pending = [p for p in range(plan.num_parts) if p not in done]
        total = len(images)
        done_images = sum(len(plan.part_ids(p)) for p in done)
        if on_progress:
            on_progress(done_images, total)
        if pending:
            phase(f"{engine} engine: {total - done_images} images in {len(pending)} parts")
            batches = _engine(
                engine,
                model,
                images,
                pre,
                plan,
                pending,
                layers,
                workers=workers,
                ray_address=ray_address,
                ray_actors=ray_actors,
            )
            buffers: dict[int, PartBuffer] = {}
            try:
                for result in batches:
                    part = plan.part_of(result.ids[0])
                    buf = buffers.get(part)
                    if buf is None:
                        buf = buffers[part] = PartBuffer(part, plan.part_ids(part), [layer.spec for layer in layers])
                    buf.add(result.ids, result.ok, result.reasons, result.sizes, result.values)
                    done_images += len(result.ids)
                    if buf.complete:
                        write_part(writer, buf, top_k=int(settings["top_k"]))
                        del buffers[part]
                    if on_progress:
                        on_progress(done_images, total)
            finally:
                batches.close()  # stops the DataLoader's workers / the Ray pipeline
            if buffers:
                raise AtlasError(
                    f"the {engine} engine returned no results for parts {sorted(buffers)}; run again with --resume"
                )
        phase("merging the parts")
        _finish(
            writer,
            root,
            settings,
            layers,
            engine=engine,
            report=report,
            phase=phase,
            model=model,
            portraits=portraits,
            portrait_options=portrait_options,
        )
    return Atlas(root, model=model)


def make_portraits(
    model: "Model | nn.Module",
    layers: Sequence[AtlasLayer],
    cache: Path,
    options: Mapping[str, Any],
    phase: Phase,
) -> tuple[dict[tuple[str, int], bytes], dict[str, str]]:
    """Every channel's portrait (:func:`featuremaps.portrait.portrait_images`: read from ``cache``, the
    missing ones made a layer at a time), as PNG bytes for the report; a layer whose portraits
    cannot be made gets its one-line reason instead (the atlas itself is not lost for it)."""
    import io

    from ..errors import FeatureMapsError
    from ..portrait import portrait_images

    drawn: dict[tuple[str, int], bytes] = {}
    missing: dict[str, str] = {}
    for layer in layers:
        phase(f"portraits of {layer.name}: {layer.channels} channels (cached ones are read back)")
        try:
            found = portrait_images(model, layer.name, range(layer.channels), cache_dir=cache, **options)
        except FeatureMapsError as exc:
            missing[layer.name] = str(exc)
            phase(f"no portraits for {layer.name}: {exc}")
            continue
        for channel, picture in found.items():
            buf = io.BytesIO()
            picture.save(buf, format="PNG")
            drawn[(layer.name, int(channel))] = buf.getvalue()
    return drawn, missing


def is_random(weights: str) -> bool:
    """Whether the weights are a random initialization (``random(seed=N)``), not trained ones."""
    return str(weights).startswith("random")


def _read_run(root: Path) -> dict[str, Any] | None:
    try:
        run = json.loads((root / RUN).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return run if isinstance(run, dict) and run.get("schema_version") == SCHEMA_VERSION else None


def _engine(
    engine: str, model, images, pre, plan, parts, layers, *, workers, ray_address, ray_actors
) -> Iterator[BatchResult]:
    if engine == "ray":
        from .ray_engine import ray_batches

        return ray_batches(model, images, pre, plan, parts, layers, address=ray_address, actors=ray_actors)
    return local_batches(model, images, pre, plan, parts, layers, workers=workers)


def _finish(
    writer: Writer,
    root: Path,
    settings: dict,
    layers: tuple[AtlasLayer, ...],
    *,
    engine: str,
    report: bool,
    phase: Phase,
    model: "Model | nn.Module | None" = None,
    portraits: "bool | str | os.PathLike" = False,
    portrait_options: Mapping[str, Any] | None = None,
) -> None:
    """Merge the parts into the final tables, draw the report, write the manifest (last)."""
    num_parts = Plan(int(settings["num_images"]), int(settings["part_size"]), int(settings["batch_size"])).num_parts
    con = connect()
    merge_images(con, root, num_parts)
    merge_topk(con, root, num_parts, layers, int(settings["top_k"]))
    merge_sketches(con, root, num_parts, layers)
    merge_channels(con, root, num_parts, layers)
    counts = dict(
        con.execute(
            f"SELECT status, count(*) FROM read_parquet({sql_string(str(root / IMAGES))}) GROUP BY status"
        ).fetchall()
    )
    identity = settings["model"]
    size = settings["input_size"]
    if report:
        from .report import write_report

        phase("drawing the report")
        files = to_arrow(con.sql(f"SELECT image, file FROM read_parquet({sql_string(str(root / IMAGES))})"))
        meta = {
            "model": identity["name"],
            "weights": identity["weights"],
            "source": f"{settings['source']} ({settings['source_kind']})",
            "images": f"{settings['num_images']} ({counts.get('skipped', 0)} skipped)",
            "input": f"{size[0]}x{size[1]} (whole image resized, no crop)",
            "top-k": str(settings["top_k"]),
        }
        warning = None
        if is_random(identity["weights"]):  # (a model object's own weights, "as given", may be trained)
            warning = (
                f"{identity['name']} ran with RANDOM weights ({identity['weights']}): these channels are an untrained "
                "network's, not learned features."
            )
        drawn, missing = {}, {}
        if portraits and model is not None:
            cache = root / PORTRAITS if portraits is True else Path(portraits)
            drawn, missing = make_portraits(model, layers, cache, portrait_options or {}, phase)
        write_report(
            root,
            topk=pq.read_table(root / TOPK),
            files=dict(zip(files.column("image").to_pylist(), files.column("file").to_pylist())),
            layers=layers,
            meta=meta,
            warning=warning,
            portraits=drawn,
            portrait_notes=missing,
        )
    manifest = {
        "model": identity["name"],
        "weights": identity["weights"],
        "pretrained": identity["pretrained"],
        "reload": identity["reload"],
        "source": settings["source"],
        "source_kind": settings["source_kind"],
        "images": int(settings["num_images"]),
        "usable": int(counts.get("ok", 0)),
        "skipped": int(counts.get("skipped", 0)),
        "ignored_files": int(settings.get("ignored_files", 0)),
        "layers": [layer.to_json() for layer in layers],
        "input_size": size,
        "preprocessing": settings["preprocessing"],
        "top_k": int(settings["top_k"]),
        "batch_size": int(settings["batch_size"]),
        "part_size": int(settings["part_size"]),
        "parts": num_parts,
        "engine": engine,
        "sketch": {"alpha": ALPHA, "min_value": MIN_VALUE},
        "portraits": (
            {
                "cache": str(root / PORTRAITS if portraits is True else Path(portraits)),
                "options": dict(portrait_options or {}),
            }
            if portraits and report
            else None
        ),
        "bytes": store_bytes(root),
    }
    write_manifest(root, manifest, kind="atlas")
    writer.finish()
