"""Capturing a transformer: every block of torchvision's vit_b_16 at 224x224, read as maps, against
its bare forward pass (``torch.inference_mode``) in the same process.

Each process runs a warm-up, then ``--repeats`` interleaved pairs (bare pass, capture); the ratio
of a pair is the capture's time over the bare pass just before it, and a process reports the median
ratio. ``--processes`` fresh processes are run and the median of their medians is the figure.
Target (issue 16): <= 1.15x. Random weights (speed does not depend on them).

    python benchmarks/transformers.py [--processes 3] [--repeats 15] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = "child"


def child(repeats: int) -> dict:
    import torch

    import featuremaps as fm

    model = fm.load_model("vit_b_16", weights="random")
    x = torch.randn(1, 3, 224, 224)
    module = model.module

    def bare() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            module(x)
        return time.perf_counter() - t0

    def captured() -> float:
        t0 = time.perf_counter()
        maps = fm.capture(model, x, layers="blocks")
        took = time.perf_counter() - t0
        assert len(maps) == 12 and maps[0].spatial == (768, 14, 14)
        return took

    for _ in range(3):
        bare(), captured()
    pairs = [(bare(), captured()) for _ in range(repeats)]
    return {
        "bare_s": statistics.median(b for b, _ in pairs),
        "capture_s": statistics.median(c for _, c in pairs),
        "ratio": statistics.median(c / b for b, c in pairs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(CHILD, nargs="?", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == CHILD:
        print(json.dumps(child(args.repeats)))
        return
    runs = []
    for _ in range(args.processes):
        r = subprocess.run(
            [sys.executable, __file__, "--repeats", str(args.repeats), CHILD], capture_output=True, text=True
        )
        if r.returncode != 0:
            raise SystemExit(r.stderr[-600:])
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    ratios = [r["ratio"] for r in runs]
    print("| vit_b_16 @224 | seconds | time / bare forward |")
    print("|---|---:|---:|")
    print(f"| bare forward | {statistics.median(r['bare_s'] for r in runs):.3f} | 1.00x |")
    print(
        f"| every block (12 token outputs read as 768x14x14 maps) | {statistics.median(r['capture_s'] for r in runs):.3f} "
        f"| {statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f}x) |"
    )
    print("\ntarget: <= 1.15x")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
