"""The wait a user sees: ``featuremaps show`` from a fresh process, against a plain script.

Rows (each a fresh process, interleaved, median of ``--repeats`` runs):

* ``featuremaps show edge --model vgg16 --weights FILE.pth --out D`` (every channel of the 13 conv
  layers drawn, the report and the folder written);
* the plain script: ``import torch, torchvision``, build VGG16 (with its random initialisation,
  as ``torchvision.models.vgg16()`` does), load the same checkpoint, one forward pass;
* ``featuremaps --help`` (absolute seconds).

Targets (issue 12): ``show`` <= 1.0x the plain script, ``--help`` <= 0.5 s. The checkpoint is a
random VGG16 state_dict written once into a temporary folder (no download).

    python benchmarks/cli.py [--repeats 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLAIN = """
import torch, torchvision
m = torchvision.models.vgg16()
m.load_state_dict(torch.load({ckpt!r}, map_location="cpu", weights_only=True))
m.eval()
with torch.no_grad():
    m(torch.randn(1, 3, 224, 224))
"""


def _exe() -> str:
    found = shutil.which("featuremaps", path=str(Path(sys.executable).parent)) or shutil.which("featuremaps")
    if not found:
        raise SystemExit("featuremaps is not installed in this environment: pip install -e .")
    return found


def _timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])}... failed ({r.returncode}): {r.stderr[-400:]}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    exe = _exe()
    with tempfile.TemporaryDirectory(prefix="featuremaps-bench-") as tmp:
        root = Path(tmp)
        ckpt = root / "vgg16.pth"
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"import torch, torchvision; torch.save(torchvision.models.vgg16().state_dict(), {str(ckpt)!r})",
            ],
            check=True,
        )
        show = [
            exe,
            "show",
            "edge",
            "--model",
            "vgg16",
            "--weights",
            str(ckpt),
            "--out",
            str(root / "run"),
            "--force",
            "-q",
        ]
        plain = [sys.executable, "-c", PLAIN.format(ckpt=str(ckpt))]
        helper = [exe, "--help"]
        for cmd in (show, plain, helper):  # warm the page cache and Python's bytecode cache
            _timed(cmd, root)
        times: dict[str, list[float]] = {"show": [], "plain": [], "help": []}
        for _ in range(args.repeats):
            for key, cmd in (("show", show), ("plain", plain), ("help", helper)):
                times[key].append(_timed(cmd, root))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [s / p for s, p in zip(times["show"], times["plain"])]
    rows = [
        ("plain script: import, build VGG16, load the checkpoint, one forward", med["plain"], "1.00x"),
        ("featuremaps show edge --model vgg16 --weights FILE (every channel drawn)", med["show"],
         f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x)"),
        ("featuremaps --help", med["help"], f"{med['help'] / med['plain']:.2f}x"),
    ]  # fmt: skip
    print(f"| what | seconds (median of {args.repeats}) | / plain script |")
    print("|---|---:|---:|")
    for what, secs, ratio in rows:
        print(f"| {what} | {secs:.2f} | {ratio} |")
    print(f"\ncpu count {os.cpu_count()}; targets: show <= 1.0x the plain script, --help <= 0.5 s")
    if args.json:
        args.json.write_text(json.dumps({"times": times, "median": med, "show_over_plain": ratios}, indent=2))


if __name__ == "__main__":
    main()
