"""Capture speed and memory, as ratios to a bare forward pass measured in the same run.

    python benchmarks/capture.py            # the full table (about 15 minutes on 2 cores)
    python benchmarks/capture.py --quick    # AlexNet and VGG16 at 224 only
    python benchmarks/capture.py --only resnet50 --json out.json   # one model at 224, exact figures

Time: each model runs in fresh child processes (so that what earlier models left in the heap does
not count), configurations interleaved after a warm-up (which also teaches featuremaps where each
model's forward pass may stop). In a process, the ratio is the median over repetitions of each
capture's time over the bare pass timed just before it, which cancels the slow drifts of a shared
machine; at 224x224 five processes run per model, and the table gives the median of their ratios
and, in brackets, their range (this shared machine's noise comes in episodes of seconds that slow
memory-heavy rows most: a process that meets one reads up to 10% high). Two reference rows are
not featuremaps: a tutorial's plain hooks, which keep every output but are wrong under in-place
ops (what keeping every output costs by itself), and a hand-written minimal correct capture for
one model family (the floor; see ``floor()``).
Peak memory: each configuration runs in a fresh child process, once to warm up (up to 1024x1024)
and once measured; the figure is the rise of the peak resident set size (VmHWM, reset before the
measured call), so model weights are not counted.
(A model's first capture at an input shape can take a second pass, when its forward() code writes
into captured outputs, as ResNet's ``out += identity`` does; later captures do not.)
Random weights (seed 0): speed and memory do not depend on the weights' values.
"""

from __future__ import annotations

import argparse
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

FLOOR = "reference: hand-written minimal correct capture (VGG, AlexNet: conv outputs; ResNet: every leaf)"
CONFIGS = {
    "bare forward": None,
    "conv outputs": {"layers": "conv"},
    "every leaf output": {"layers": "all"},
    "every leaf, reduced (mean)": {"layers": "all", "reduce": "mean"},
    "reference: plain hooks keeping every leaf output (wrong under in-place ops)": "plain",
    FLOOR: "floor",
}


def make(name: str, size: int):
    model = fm.load_model(name, weights="random", seed=0, progress=False)
    torch.manual_seed(0)
    return model, torch.randn(1, 3, size, size)


def plain_hooks(module: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """What a tutorial does: a forward hook on every leaf appending its output. It is wrong under
    in-place ops (a ReLU overwrites the conv output it was given), and shows what merely keeping
    every output costs."""
    outputs: list[torch.Tensor] = []
    leaves = [m for n, m in module.named_modules() if n and next(m.children(), None) is None]
    handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for m in leaves]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return outputs


def floor(module: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The least work that gives correct maps, written by hand for one model family without
    featuremaps' generality: what featuremaps' own rows cannot go below.

    VGG, AlexNet: the ``features`` loop up to the last conv, keeping each conv output, each ReLU
    run out of place (the floor for "conv outputs": nothing after the last conv runs).
    ResNet: one global hook keeping every leaf output; in-place ReLUs handed a kept output run out
    of place with the model's tensor re-pointed at the result (``set_``); the BatchNorm outputs
    that ``out += identity`` writes into (the last of each block) are copied (the floor for
    "every leaf output")."""
    features = getattr(module, "features", None)
    with torch.no_grad():
        if isinstance(features, torch.nn.Sequential):
            layers = list(features)
            last = max(i for i, m in enumerate(layers) if isinstance(m, torch.nn.Conv2d))
            outputs = []
            for m in layers[: last + 1]:
                if isinstance(m, torch.nn.Conv2d):
                    x = m(x)
                    outputs.append(x)
                else:
                    x = F.relu(x) if isinstance(m, torch.nn.ReLU) else m(x)
            return outputs
        return _resnet_floor(module, x)


def _resnet_floor(module: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    from torch.nn.modules.module import register_module_forward_hook
    from torchvision.models.resnet import BasicBlock, Bottleneck

    leaves = {id(m) for n, m in module.named_modules() if n and next(m.children(), None) is None}
    blocks = [b for b in module.modules() if isinstance(b, (BasicBlock, Bottleneck))]
    added_to = {id(b.bn3 if isinstance(b, Bottleneck) else b.bn2) for b in blocks}
    relus = [m for m in module.modules() if isinstance(m, torch.nn.ReLU) and m.inplace]
    outputs: list[torch.Tensor] = []
    kept: dict[int, int] = {}  # data_ptr of a kept output -> its index in outputs
    pending: dict[int, torch.Tensor] = {}

    def before(m, args):
        i = kept.pop(args[0].data_ptr(), None)
        if i is not None:
            outputs[i] = args[0].detach()
            m.inplace = False
            pending[id(m)] = args[0]

    def after(m, args, out):
        t = pending.pop(id(m), None)
        if t is not None:
            m.inplace = True
            t.set_(out)
            out = t
        if id(m) in leaves:
            if id(m) in added_to:
                outputs.append(out.clone())
            else:
                kept[out.data_ptr()] = len(outputs)
                outputs.append(out)
        return t  # the model's own tensor, re-pointed; None (keep the output) when nothing ran out of place

    handles = [m.register_forward_pre_hook(before) for m in relus] + [register_module_forward_hook(after)]
    try:
        module(x)
    finally:
        for h in handles:
            h.remove()
        for m in relus:
            m.inplace = True
    return outputs


def run_config(model, x, config):
    if config is None:
        with torch.inference_mode():
            return model.module(x)
    if config == "plain":
        return plain_hooks(model.module, x)
    if config == "floor":
        return floor(model.module, x)
    return fm.capture(model, x, **config)


def seed_loop(model, x) -> list[torch.Tensor]:
    """The seed's way: apply the 13 convs one after another, keeping every output."""
    convs = [m for m in model.module.features.children() if isinstance(m, torch.nn.Conv2d)]
    outputs = []
    with torch.no_grad():
        for conv in convs:
            x = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
            outputs.append(x)
    return outputs


CHAIN_CONFIGS = {
    "plain loop keeping every output (seed)": lambda m, x: seed_loop(m, x),
    "featuremaps conv chain, full maps": lambda m, x: fm.capture(m, x, mode="conv"),
    "featuremaps conv chain, reduced (mean)": lambda m, x: fm.capture(m, x, mode="conv", reduce="mean"),
}


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM), in MB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Give freed heap back to the system and restart the peak count (Linux), so that only what
    the measured call needs shows up."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def child(spec: str) -> None:
    """Run one configuration once and print the rise of the peak RSS (MB)."""
    kind, name, size, key = spec.split("|")
    model, x = make(name, int(size))
    if kind == "capture" and int(size) <= 1024:  # steady state: what a model learns on its first pass is learned
        run_config(model, x, CONFIGS[key])
    reset_peak()
    base = peak_rss_mb()
    if kind == "capture":
        run_config(model, x, CONFIGS[key])
    else:
        CHAIN_CONFIGS[key](model, x)
    print(json.dumps({"peak_mb": peak_rss_mb() - base}))


def in_child(flag: str, spec: str):
    """Run this script with ``flag spec`` in a fresh process; what it printed last, as JSON."""
    out = subprocess.run(
        [sys.executable, __file__, flag, spec],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_memory(kind: str, name: str, size: int, key: str) -> float:
    return in_child("--child", f"{kind}|{name}|{size}|{key}")["peak_mb"]


def timed(fn, reps: int) -> list[float]:
    """Seconds until ``fn`` returns; what it returned is let go after the clock stops."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
        del result
    return times


def interleaved(fns: dict, reps: int) -> dict[str, list[float]]:
    """Seconds of each function, after one warm-up call each (which also teaches featuremaps its
    schedules), repetitions interleaved so that drifts of the shared machine hit every row alike."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            samples[key] += timed(fn, 1)
    return samples


def time_child(spec: str) -> None:
    """Time every configuration of one model in this (fresh) process; print the samples as JSON."""
    name, size, reps = spec.split("|")
    model, x = make(name, int(size))
    fns = {key: (lambda config=config: run_config(model, x, config)) for key, config in CONFIGS.items()}
    print(json.dumps(interleaved(fns, int(reps))))


def measure_times(name: str, size: int, reps: int) -> dict[str, list[float]]:
    return in_child("--time-child", f"{name}|{size}|{reps}")


def bench_capture(name: str, size: int, reps: int, memory: bool, processes: int = 1) -> list[dict]:
    """Each model in fresh processes, so that what earlier models left in the heap does not count.
    In each process the time ratio is the median over repetitions of (capture / the bare pass just
    before it); with several processes, the row gives the median of their ratios and their range
    (noise on a shared machine comes in episodes of seconds: several processes spread the samples)."""
    runs = [measure_times(name, size, reps) for _ in range(processes)]
    ratios = {
        key: sorted(statistics.median(t / b for t, b in zip(run[key], run["bare forward"])) for run in runs)
        for key in CONFIGS
    }
    mem = {k: measure_memory("capture", name, size, k) for k in CONFIGS} if memory else {}
    rows = []
    for key in CONFIGS:
        row = {
            "model": f"{name} @{size}",
            "what": key,
            "seconds": statistics.median(t for run in runs for t in run[key]),
            "time_ratio": statistics.median(ratios[key]),
        }
        if processes > 1 and key != "bare forward":
            row["time_range"] = (ratios[key][0], ratios[key][-1])
            row["time_ratios"] = ratios[key]  # one per process (for --json)
        if memory:
            row["peak_mb"] = mem[key]
            row["mem_ratio"] = mem[key] / mem["bare forward"]
        rows.append(row)
    return rows


def bench_memory_only(name: str, size: int, keys: list[str]) -> list[dict]:
    mem = {k: measure_memory("capture", name, size, k) for k in ["bare forward", *keys]}
    return [
        {"model": f"{name} @{size}", "what": k, "peak_mb": mem[k], "mem_ratio": mem[k] / mem["bare forward"]}
        for k in ["bare forward", *keys]
    ]


def chain_time_child(spec: str) -> None:
    size, reps = (int(v) for v in spec.split("|"))
    model, x = make("vgg16", size)
    fns = {key: (lambda fn=fn: fn(model, x)) for key, fn in CHAIN_CONFIGS.items()}
    print(json.dumps(interleaved(fns, reps)))


def bench_chain(size: int, reps: int) -> list[dict]:
    samples = in_child("--chain-time-child", f"{size}|{reps}")
    base_key = next(iter(CHAIN_CONFIGS))
    mem = {k: measure_memory("chain", "vgg16", size, k) for k in CHAIN_CONFIGS}
    return [
        {
            "model": f"vgg16 @{size}",
            "what": key,
            "seconds": statistics.median(samples[key]),
            "time_ratio": statistics.median(t / b for t, b in zip(samples[key], samples[base_key])),
            "peak_mb": mem[key],
            "mem_ratio": mem[key] / mem[base_key],
        }
        for key in CHAIN_CONFIGS
    ]


def table(rows: list[dict]) -> str:
    head = "| model | what | seconds | time / baseline | peak MB | memory / baseline |\n|---|---|---:|---:|---:|---:|"
    lines = [head]
    for r in rows:
        s = f"{r['seconds']:.3f}" if "seconds" in r else "–"
        tr = f"{r['time_ratio']:.2f}x" if "time_ratio" in r else "–"
        if "time_range" in r:
            tr += f" ({r['time_range'][0]:.2f}–{r['time_range'][1]:.2f}x)"
        pm = f"{r['peak_mb']:.0f}" if "peak_mb" in r else "–"
        mr = f"{r['mem_ratio']:.2f}x" if "mem_ratio" in r else "–"
        lines.append(f"| {r['model']} | {r['what']} | {s} | {tr} | {pm} | {mr} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="AlexNet and VGG16 at 224 only")
    parser.add_argument("--only", choices=["alexnet", "vgg16", "resnet50"], help="this model at 224 only")
    parser.add_argument("--json", help="also write every row, with unrounded figures, to this file")
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions per process")
    parser.add_argument("--processes", type=int, default=5, help="timing processes per model at 224x224")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--time-child", help=argparse.SUPPRESS)
    parser.add_argument("--chain-time-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    if args.time_child:
        time_child(args.time_child)
        return
    if args.chain_time_child:
        chain_time_child(args.chain_time_child)
        return
    torch.set_grad_enabled(True)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}",
        flush=True,
    )
    rows = []
    jobs = [("alexnet", 224, args.reps, args.processes), ("vgg16", 224, args.reps, args.processes)]
    if args.only:
        jobs = [(args.only, 224, args.reps, args.processes)]
    elif not args.quick:
        jobs += [("resnet50", 224, args.reps, args.processes), ("vgg16", 1024, 3, 1)]
    for name, size, reps, processes in jobs:
        rows += bench_capture(name, size, reps, memory=True, processes=processes)
        print(table(rows[-len(CONFIGS) :]), flush=True)
    if not (args.quick or args.only):
        rows += bench_memory_only("vgg16", 2048, ["every leaf, reduced (mean)"])
        print(table(rows[-2:]), flush=True)
        print("\nThe seed's conv chain on VGG16 (baseline: the plain loop that keeps every output)", flush=True)
        chain_rows = bench_chain(224, 3)
        print(table(chain_rows), flush=True)
        rows += chain_rows
    print("\n" + table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
