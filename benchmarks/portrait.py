"""Channel portraits: time per optimization step, as ratios to one plain forward+backward pass of the same batch.

    python benchmarks/portrait.py                 # VGG16 features.10 at 128 px: 1 channel and 64 batched (2 CPU cores: ~20 min)
    python benchmarks/portrait.py --quick         # 1 and 8 channels, fewer repetitions
    python benchmarks/portrait.py --device cuda --json out.json

What is timed, for a batch of B images (B channels, one portrait each), all in one process:

- ``plain``: the reference, no featuremaps: ``model.features[:11]`` on a ``(B, 3, 140, 140)`` batch that
  requires grad (a 128 px portrait reaches the network padded by 12 and jittered by 12: 140 px), the
  channels' means summed, and ``torch.autograd.grad`` of that with respect to the batch;
- ``core``: :func:`featuremaps.portrait.optimize` with the plain ``features[:11]`` as its network: the
  Fourier parameterization, the transforms, the normalization, the objective and Adam, around the same
  forward+backward;
- ``fm.portrait``: the whole thing, the network reached through ``capture_for_grad`` (a global forward
  hook for the pass, the layer's output kept in the graph and cloned for the model, the pass stopped
  after ``features.10``).

Paired timing, for a machine shared with other work: after each optimization step the progress callback
runs and times one plain pass, which is then taken out of the gap to the next step; each step's ratio is
to the plain passes just before and after it, and the table gives the median of those ratios and, in
brackets, the ratio of the fastest step to the fastest plain pass (what the machine does when left alone).
The first step of a run (the first at a new input shape runs the whole model once) is dropped. The target
is a ratio <= 1.3. Random weights (seed 0): timing does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import featuremaps as fm  # isort: skip  (before torch, as in the CLI: it asks for huge pages)
import torch

from featuremaps.portrait import STANDARD_TRANSFORMS, optimize
from featuremaps.portrait.portraits import network_input_size

LAYER = "features.10"
SIZE = 128


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PlainPass:
    """The reference step: a plain forward+backward of one ``(batch, 3, side, side)`` batch, no featuremaps."""

    def __init__(self, features: torch.nn.Module, batch: int, side: int, device: torch.device) -> None:
        gen = torch.Generator().manual_seed(0)
        self.features, self.device = features, device
        self.x = torch.rand(batch, 3, side, side, generator=gen).to(device).requires_grad_(True)
        self.rows = torch.arange(batch, device=device)
        self.chans = torch.arange(batch, device=device) % 256

    def __call__(self) -> float:
        _sync(self.device)
        start = time.perf_counter()
        out = self.features(self.x)
        loss = out[self.rows, self.chans].mean(dim=(1, 2)).sum()
        torch.autograd.grad(loss, [self.x])
        _sync(self.device)
        return time.perf_counter() - start


def paired_steps(run, plain: PlainPass) -> list[tuple[float, float]]:
    """``(step seconds, plain pass seconds)`` for each step of ``run(progress)`` but the first: after each
    step the progress callback times one plain pass, which is then taken out of the gap to the next step."""
    stamps: list[float] = []
    plains: list[float] = []

    def progress(done: int, total: int) -> None:
        _sync(plain.device)
        stamps.append(time.perf_counter())
        plains.append(plain())

    run(progress)
    pairs = []
    for i in range(1, len(stamps)):
        step = stamps[i] - stamps[i - 1] - plains[i - 1]
        pairs.append((step, (plains[i - 1] + plains[i]) / 2))
    return pairs


def summary(pairs: list[tuple[float, float]]) -> dict:
    steps, plains = [p[0] for p in pairs], [p[1] for p in pairs]
    return {
        "step_s": statistics.median(steps),
        "plain_s": statistics.median(plains),
        "ratio": statistics.median(s / p for s, p in pairs),  # each step against the plain passes beside it
        "min_ratio": min(steps) / min(plains),  # the fastest of each: what the machine can do when left alone
    }


def measure(model, batch: int, steps: int, device: torch.device) -> dict:
    features = model.module.features[:11]  # the plain network up to features.10 (conv3_1), the same modules
    pre = model.preprocessing
    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)
    channels = list(range(batch))
    side = network_input_size(SIZE, STANDARD_TRANSFORMS)[0]
    plain = PlainPass(features, batch, side, device)
    plain()  # warm-up
    options = {"size": SIZE, "steps": steps + 1, "seed": 0}

    def core(progress):
        optimize(features, channels, device=device, normalize=lambda x: (x - mean) / std, progress=progress, **options)

    fm.portrait(model, LAYER, channels, size=SIZE, steps=1, seed=0)  # the model seen at these shapes once
    return {
        "batch": batch,
        "input": side,
        "core": summary(paired_steps(core, plain)),
        "portrait": summary(
            paired_steps(lambda progress: fm.portrait(model, LAYER, channels, progress=progress, **options), plain)
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="1 and 8 channels, fewer repetitions")
    parser.add_argument("--steps", type=int, default=None, help="timed optimization steps per run")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the figures here too")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = fm.load_model("vgg16", weights="random", seed=0, device=args.device, progress=False)
    batches = (1, 8) if args.quick else (1, 64)
    steps = args.steps or (4 if args.quick else 6)
    rows = []
    for batch in batches:
        rows.append(measure(model, batch, steps, device))
        c, p = rows[-1]["core"], rows[-1]["portrait"]
        print(
            f"batch {batch:3d}: plain fwd+bwd {p['plain_s'] * 1e3:8.1f} ms | core step {c['step_s'] * 1e3:8.1f} ms "
            f"({c['ratio']:.2f}x, min {c['min_ratio']:.2f}x) | fm.portrait step {p['step_s'] * 1e3:8.1f} ms "
            f"({p['ratio']:.2f}x, min {p['min_ratio']:.2f}x)",
            flush=True,
        )
    one, many = rows[0], rows[-1]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'CPU'}"
    print()
    print(
        f"VGG16 (random weights) {LAYER} at {SIZE} px ({one['input']} px seen), {where}, {torch.get_num_threads()} threads"
    )
    print(
        "| channels (batch) | plain forward+backward | core step: ratio (min ratio) | fm.portrait step: ratio (min ratio) |"
    )
    print("|---|---|---|---|")
    for r in rows:
        c, p = r["core"], r["portrait"]
        print(
            f"| {r['batch']} | {p['plain_s'] * 1e3:.0f} ms | {c['step_s'] * 1e3:.0f} ms: {c['ratio']:.2f}x "
            f"({c['min_ratio']:.2f}x) | {p['step_s'] * 1e3:.0f} ms: {p['ratio']:.2f}x ({p['min_ratio']:.2f}x) |"
        )
    cost = many["portrait"]["step_s"] / one["portrait"]["step_s"]
    print(
        f"\n{many['batch']} channels batched: {cost:.1f}x one channel's step ({cost / many['batch']:.2f}x per channel)"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(
                {"device": str(device), "where": where, "threads": torch.get_num_threads(), "rows": rows}, fh, indent=2
            )


if __name__ == "__main__":
    main()
