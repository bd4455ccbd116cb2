"""The Ray engine: the same batches (the plan's), decoded by Ray Data tasks, run through the same
per-batch function (:func:`~featuremaps.atlas.engine.batch_stats`) in a pool of actors that each
load the model once (one actor per GPU where the cluster has GPUs), and handed back to this process,
which writes the same parts as the local engine.

Local by default (``ray.init()`` on this machine); ``address`` joins a cluster (``"auto"``, or
``ray://head:10001``). Every worker must be able to read the image files at the paths this
process lists (a shared file system) and to build the model (featuremaps installed; a model given
as an object is shipped to the actors, so its class must be importable there).

On a small machine, actors that take every CPU leave none to Ray Data's decoding tasks and the
pipeline waits forever (the known hang): the actors here are sized to leave the decoding a CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .engine import AtlasLayer, BatchResult, batch_stats, model_identity
from .errors import AtlasError
from .inputs import ImageList, Plan, decode

if TYPE_CHECKING:  # pragma: no cover
    from ..preprocess import Preprocessing


def _decode_batch(
    row: dict[str, Any], *, files: Any, pre: "Preprocessing", starts: np.ndarray, lengths: np.ndarray, width: int
) -> dict[str, Any]:
    """Ray Data task: batch ``row["batch"]`` of the plan -> its input tensor (padded to ``width``
    images), which images are usable, why not, and their sizes."""
    import ray

    paths = ray.get(files) if isinstance(files, ray.ObjectRef) else files
    k = int(row["id"])
    start, n = int(starts[k]), int(lengths[k])
    c, h, w = pre.channels, *pre.size
    x = np.zeros((width, c, h, w), np.float32)
    ok = np.zeros(width, bool)
    sizes = np.zeros((width, 2), np.int32)
    reasons = []
    for i in range(n):
        t, reason, size = decode(paths[start + i].as_py(), pre)
        if t is not None:
            x[i] = t.numpy()
            ok[i] = True
            sizes[i] = size
        reasons.append(reason)
    return {"batch": k, "start": start, "n": n, "x": x, "ok": ok, "sizes": sizes, "reasons": "\n".join(reasons)}


class _ModelActor:
    """Ray Data actor: loads the model once, then runs the per-batch function on each batch."""

    def __init__(self, *, source: Any, layers: Sequence[dict], size: Sequence[int], device: str):
        import torch

        from ..models import load_model
        from .engine import AtlasLayer

        if isinstance(source, dict):
            self.model = load_model(
                source["model"],
                source["weights"],
                seed=int(source["seed"]),
                device=device,
                size=tuple(size),
                progress=False,
            )
        else:
            self.model = source.to(device) if isinstance(source, torch.nn.Module) else source
        self.layers = [AtlasLayer.from_json(d) for d in layers]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        out: dict[str, Any] = {k: batch[k] for k in ("batch", "start", "n", "ok", "sizes", "reasons")}
        rows = len(batch["batch"])
        for layer in self.layers:
            out[_column(layer)] = np.zeros((rows, batch["x"].shape[1], layer.channels, 3), np.float32)
        for r in range(rows):
            n = int(batch["n"][r])
            ok = np.asarray(batch["ok"][r][:n], bool)
            if not ok.any():
                continue
            x = torch.from_numpy(np.ascontiguousarray(batch["x"][r][:n][ok]))
            values = batch_stats(self.model, self.layers, x)
            where = np.flatnonzero(ok)
            for layer in self.layers:
                out[_column(layer)][r, where] = values[layer.name]
        return out


def _column(layer: AtlasLayer) -> str:
    return "stats:" + layer.name


def ray_batches(
    model: Any,
    images: ImageList,
    pre: "Preprocessing",
    plan: Plan,
    parts: Sequence[int],
    layers: Sequence[AtlasLayer],
    *,
    address: str | None = None,
    actors: int | None = None,
) -> Iterator[BatchResult]:
    """The results of the plan's batches of ``parts``, computed on Ray Data (any order)."""
    try:
        import ray
        import ray.data
        from ray.data import ActorPoolStrategy
    except ImportError:
        raise AtlasError("--engine ray needs Ray Data: pip install 'featuremaps[ray]' (or 'ray[data]')") from None

    from ..models import module_device, unwrap_model

    owns = not ray.is_initialized()
    if owns:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        except Exception as exc:  # a bad address, a cluster that is down
            raise AtlasError(
                f"cannot start or join Ray ({type(exc).__name__}: {_first_line(exc)}); check --ray-address"
            ) from None
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        if hasattr(ctx, "print_on_execution_start"):
            ctx.print_on_execution_start = False
        resources = ray.cluster_resources()
        cpus = float(resources.get("CPU", 1))
        gpus = int(resources.get("GPU", 0))
        module, _ = unwrap_model(model)
        wants_gpu = module_device(module).type == "cuda" and gpus > 0
        # actors and decoding share the CPUs: leave the decoding one (a whole CPU from 2 up)
        decode_cpus = 1.0 if cpus >= 2 else cpus / 2
        if wants_gpu:
            pool, actor_cpus, actor_gpus = actors or gpus, 1.0 if cpus >= gpus + 1 else 0.0, 1
        else:
            actor_cpus = 1.0 if cpus >= 2 else cpus / 2
            pool, actor_gpus = actors or max(1, int((cpus - decode_cpus) // actor_cpus)), 0
        if not wants_gpu and pool * actor_cpus > cpus - decode_cpus + 1e-9:
            raise AtlasError(
                f"{pool} model actors of {actor_cpus:g} CPU would leave Ray Data's decoding no CPU of the cluster's "
                f"{cpus:g} (it would wait forever); use --ray-actors {max(1, int((cpus - decode_cpus) // actor_cpus))} or fewer"
            )
        batches = list(plan.batches(parts))
        starts = np.array([b[0] for b in batches], np.int64)
        lengths = np.array([len(b) for b in batches], np.int64)
        width = int(lengths.max())
        identity = model_identity(model)
        source: Any = identity["reload"] if identity["reload"] is not None else module.cpu() if wants_gpu else module
        batch_bytes = width * pre.channels * pre.size[0] * pre.size[1] * 4
        ds = ray.data.range(len(batches), override_num_blocks=len(batches))
        ds = ds.map(
            _decode_batch,
            fn_kwargs={
                "files": ray.put(images.files),
                "pre": pre,
                "starts": starts,
                "lengths": lengths,
                "width": width,
            },
            num_cpus=decode_cpus,
            memory=3 * batch_bytes + (64 << 20),  # (a logical request: it also keeps the decoding out of the actors)
        )
        ds = ds.map_batches(
            _ModelActor,
            fn_constructor_kwargs={
                "source": source,
                "layers": [layer.to_json() for layer in layers],
                "size": list(pre.size),
                "device": "cuda" if wants_gpu else "cpu",
            },
            batch_size=1,
            compute=ActorPoolStrategy(size=pool),
            num_cpus=actor_cpus,
            num_gpus=actor_gpus,
        )
        names = [layer.name for layer in layers]
        try:
            for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for r in range(len(block["batch"])):
                    n = int(block["n"][r])
                    start = int(block["start"][r])
                    ok = np.asarray(block["ok"][r][:n], bool)
                    where = np.flatnonzero(ok)
                    reasons = str(block["reasons"][r]).split("\n") if n else []
                    values = {name: np.asarray(block[_column(layer)][r][where]) for name, layer in zip(names, layers)}
                    yield BatchResult(
                        ids=tuple(range(start, start + n)),
                        ok=tuple(bool(v) for v in ok),
                        reasons=tuple(reasons),
                        sizes=tuple((int(w), int(h)) for w, h in block["sizes"][r][:n]),
                        values=values,
                    )
        except ray.exceptions.RayError as exc:
            raise AtlasError(f"the Ray pipeline failed: {_first_line(exc)}") from None
    finally:
        if owns:
            ray.shutdown()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return " ".join(text[-1].split())[:300] if text else type(exc).__name__
