"""Grad-CAM speed and memory against pytorch-grad-cam (the oracle library), measured in the same run.

    python benchmarks/cam.py                  # ResNet-50 at 224x224: 3 timing processes x 10 repetitions
    python benchmarks/cam.py --quick          # ResNet-18, one timing process
    python benchmarks/cam.py --json out.json  # also every row with unrounded figures

Every row computes the same map: Grad-CAM of class 281 at ``layer4`` for one random 224x224 image, upsampled to the
input and scaled to [0, 1] (the rows' maps are checked to agree before anything is timed).

Rows. The oracle is pytorch-grad-cam's ``GradCAM`` built once and called repeatedly, its fastest use. featuremaps is
``fm.cam`` with the layer given, and with the default layer (found on the warm-up call, then remembered). Two
reference rows are not CAM libraries: the bare forward pass without autograd (the baseline of the time ratios), and
a hand-written floor that runs the network up to ``layer3`` without autograd and records the graph from ``layer4``
on (what a CAM at ``layer4`` cannot go below; see "Class evidence" under Performance in the README).

Time: each process builds the model once, warms every row up, then interleaves the rows' repetitions so that the
drifts of a shared machine hit every row alike; a row's ratio is the median over repetitions of its time over the
bare pass timed just before it, and the table gives the median over processes with their range. Peak memory: each
row runs in a fresh process, once to warm up and once measured. "Peak" is the most resident memory in use during the
measured call (VmHWM, reset before it) above what was in use before the first call, so the model's weights and the
libraries do not count but what the previous call left behind does; "rise" is the peak over the memory in use just
before the measured call; "held" is what a call leaves in use after it returns (freed heap given back first): the
oracle keeps its last forward graph (``retain_graph=True``) and the parameters' gradients until its next call. A
few MB in every row, the bare pass's included, are the libraries' one-time buffers (thread pools, kernel caches).
Random weights (seed 0): speed and memory do not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import featuremaps as fm  # isort: skip  (before torch, as in the CLI: it asks for huge pages, see featuremaps.memory)
import torch
import torch.nn.functional as F

TARGET = 281
BARE = "bare forward, no autograd (baseline)"
ORACLE = "pytorch-grad-cam GradCAM (built once, called per image)"
FM = "featuremaps fm.cam(layer='layer4')"
FM_DEFAULT = "featuremaps fm.cam() (default layer: layer4)"
FLOOR = "reference: hand-written, no autograd before layer4"
ROWS = (BARE, ORACLE, FM, FM_DEFAULT, FLOOR)


def make(name: str, size: int):
    model = fm.load_model(name, weights="random", seed=0, progress=False)
    torch.manual_seed(0)
    return model, torch.randn(1, 3, size, size)


def floor(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Grad-CAM at a torchvision ResNet's ``layer4`` with nothing to spare: the stem and ``layer1``-``layer3`` under
    ``no_grad``, autograd from ``layer4`` on, the gradient with respect to its output alone."""
    with torch.no_grad():
        h = module.maxpool(module.relu(module.bn1(module.conv1(x))))
        h = module.layer3(module.layer2(module.layer1(h)))
    with torch.enable_grad():
        a = module.layer4(h)
        logits = module.fc(torch.flatten(module.avgpool(a), 1))
        (g,) = torch.autograd.grad(logits[0, TARGET], a)
    cam = torch.relu((g.mean(dim=(2, 3), keepdim=True) * a.detach()).sum(dim=1))
    up = F.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    lo, hi = up.amin(), up.amax()
    return (up - lo) / (hi - lo) if hi > lo else torch.zeros_like(up)


def row_functions(model, x) -> tuple[dict, list]:
    """Each row as a function of no arguments returning its (H, W) map; and what to release at the end."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    module = model.module
    oracle = GradCAM(model=module, target_layers=[module.layer4])
    targets = [ClassifierOutputTarget(TARGET)]

    def bare():
        with torch.inference_mode():
            return module(x)

    fns = {
        BARE: bare,
        ORACLE: lambda: oracle(input_tensor=x, targets=targets)[0],
        FM: lambda: fm.cam(model, x, layer="layer4", target=TARGET).upsampled,
        FM_DEFAULT: lambda: fm.cam(model, x, target=TARGET).upsampled,
        FLOOR: lambda: floor(module, x)[0],
    }
    return fns, [oracle]


def check_agreement(fns: dict) -> float:
    """The rows' maps agree (the largest difference to the oracle's, which is returned)."""
    ref = fns[ORACLE]()
    worst = 0.0
    for key in (FM, FM_DEFAULT, FLOOR):
        got = fns[key]()
        got = got.numpy() if isinstance(got, torch.Tensor) else got
        worst = max(worst, float(abs(got - ref).max()))
    if worst > 1e-4:
        raise SystemExit(f"the rows' maps differ from the oracle's by {worst:.2g}: not the same computation")
    return worst


def timed(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
        del result
    return times


def time_child(spec: str) -> None:
    """Every row of one model in this (fresh) process, interleaved; prints the samples as JSON."""
    name, size, reps = spec.split("|")
    model, x = make(name, int(size))
    fns, keep = row_functions(model, x)
    worst = check_agreement(fns)  # also the warm-up: fm.cam finds and remembers its default layer here
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(int(reps)):
        for key, fn in fns.items():
            samples[key] += timed(fn, 1)
    for o in keep:
        o.activations_and_grads.release()
    print(json.dumps({"samples": samples, "agreement": worst}))


def rss_mb(field: str = "VmRSS:") -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def give_back_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def reset_peak() -> None:
    """Give freed heap back and restart the peak count (Linux), so that only what the measured call needs shows up."""
    give_back_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def memory_child(spec: str) -> None:
    """One row in a fresh process: a warm-up call, then a measured one. ``held``: what a call leaves in use after it
    returns; ``peak``: the most in use during the measured call, both above the memory in use before the first call
    (the model's weights and the libraries do not count); ``rise``: the peak over the memory in use just before the
    measured call."""
    name, size, key = spec.split("|")
    model, x = make(name, int(size))
    fns, _ = row_functions(model, x)
    fn = fns[key]
    give_back_heap()
    before = rss_mb()
    result = fn()
    del result
    give_back_heap()
    held = rss_mb() - before
    reset_peak()
    base = rss_mb("VmHWM:")
    fn()
    top = rss_mb("VmHWM:")
    print(json.dumps({"peak_mb": top - before, "rise_mb": top - base, "held_mb": held}))


def in_child(flag: str, spec: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, flag, spec],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(name: str, size: int, reps: int, processes: int) -> tuple[list[dict], float]:
    runs = [in_child("--time-child", f"{name}|{size}|{reps}") for _ in range(processes)]
    agreement = max(r["agreement"] for r in runs)
    ratios = {
        key: sorted(statistics.median(t / b for t, b in zip(r["samples"][key], r["samples"][BARE])) for r in runs)
        for key in ROWS
    }
    vs_oracle = {
        key: sorted(statistics.median(t / o for t, o in zip(r["samples"][key], r["samples"][ORACLE])) for r in runs)
        for key in ROWS
    }
    mem = {key: in_child("--memory-child", f"{name}|{size}|{key}") for key in ROWS}
    rows = []
    for key in ROWS:
        rows.append(
            {
                "model": f"{name} @{size}",
                "what": key,
                "seconds": statistics.median(t for r in runs for t in r["samples"][key]),
                "time_ratio": statistics.median(ratios[key]),
                "time_range": (ratios[key][0], ratios[key][-1]),
                "vs_oracle": statistics.median(vs_oracle[key]),
                "vs_oracle_range": (vs_oracle[key][0], vs_oracle[key][-1]),
                "peak_mb": mem[key]["peak_mb"],
                "rise_mb": mem[key]["rise_mb"],
                "held_mb": mem[key]["held_mb"],
            }
        )
    return rows, agreement


def table(rows: list[dict]) -> str:
    lines = [
        "| model | what | seconds | time / bare forward | time / oracle | peak MB | rise MB | held MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tr = f"{r['time_ratio']:.2f}x ({r['time_range'][0]:.2f}–{r['time_range'][1]:.2f})"
        vo = f"{r['vs_oracle']:.2f}x ({r['vs_oracle_range'][0]:.2f}–{r['vs_oracle_range'][1]:.2f})"
        lines.append(
            f"| {r['model']} | {r['what']} | {r['seconds']:.3f} | {tr} | {vo} | {r['peak_mb']:.0f} "
            f"| {r['rise_mb']:.0f} | {r['held_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-18, one timing process")
    parser.add_argument("--reps", type=int, default=10, help="interleaved repetitions per process")
    parser.add_argument("--processes", type=int, default=3, help="timing processes")
    parser.add_argument("--json", help="also write every row, with unrounded figures, to this file")
    parser.add_argument("--time-child", help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_child:
        time_child(args.time_child)
        return
    if args.memory_child:
        memory_child(args.memory_child)
        return
    from importlib.metadata import version

    import pytorch_grad_cam  # noqa: F401  (fail here, not in a child, when the oracle is not installed)

    print(
        f"torch {torch.__version__}, grad-cam {version('grad-cam')}, {torch.get_num_threads()} threads, "
        f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}",
        flush=True,
    )
    name, processes = ("resnet18", 1) if args.quick else ("resnet50", args.processes)
    rows, agreement = bench(name, 224, args.reps, processes)
    print(f"largest difference between the rows' maps and the oracle's: {agreement:.2g}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
