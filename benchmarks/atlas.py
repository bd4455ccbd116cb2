"""The channel atlas: images/s against a bare batched forward pass, peak memory against the number of
images, and the store's size per image (with its extrapolation to ImageNet).

    python benchmarks/atlas.py                        # the issue's table (2 shared CPU cores: about 25 minutes)
    python benchmarks/atlas.py --images 96 --rss-images 200,2000 --repeats 1   # a shorter run
    python benchmarks/atlas.py --only speed --json out.json

Speed (one fresh child process per model, random weights, seed 0: speed does not depend on the weights'
values): ``fm.atlas`` (the library call, what ``featuremaps atlas`` runs: layers checked, receptive fields
measured, every batch captured with the in-hook ``channel-stats`` reduction, parts written, merged with
DuckDB, ``index.html`` drawn) against the bare loop: the *same* DataLoader (the atlas's own dataset, batch
sampler and collate: same images, batch size, workers, decoding and resizing) with ``model(x)`` under
``torch.inference_mode()`` and nothing kept. The runs alternate, bare / atlas / bare / atlas / bare, and
each atlas run's ratio is to the mean of the bare runs either side of it (which cancels the slow drifts of
a shared machine); the table gives the median ratio and, in brackets, the range. Two ratios: the whole
call, and its batch pass alone (from the first batch to the last part written: what grows with the
number of images; merging and the report are a cost per channel, paid once).

Memory: each AlexNet atlas (its 5 conv layers, 1,152 channels) runs in a fresh child process; the figure
is the peak resident set size (VmHWM) of that process, model included, and separately the largest peak
of its DataLoader workers. The per-image numbers wait in memory until their part is written: a part is
at most about 4 million rows (images x channels), so memory is bounded by the part size, not by the
number of images.

Store: bytes on disk per image of the ResNet-50 layer3+layer4 atlas (``manifest.json`` ``bytes``: the
parts' ``stats.parquet`` files, the rest of the parts, the merged tables), extrapolated linearly to the
1,281,167 images of ImageNet's training set (the per-channel tables do not grow with images: the linear
figure is an upper bound), with the time that would take at the measured images/s.

Images are generated (smooth colour fields with shapes and noise, 256 to 512 px, JPEG quality 90;
160 to 320 px for the memory runs) in a temporary folder, the same files for both loops.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import featuremaps as fm  # isort: skip  (before torch, as in the CLI: it asks for huge pages, see featuremaps.memory)
import numpy as np
from PIL import Image, ImageDraw

IMAGENET_TRAIN = 1_281_167
SPEED = {  # label: (model, layers)
    "VGG16 conv layers": ("vgg16", "conv"),
    "ResNet-50 layer3+layer4": ("resnet50", "layer3,layer4"),
}
SIZE = 224


# -- pictures --------------------------------------------------------------------------------------
def picture(seed: int, lo: int, hi: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(lo, hi + 1, 2))
    field = Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        x1, y1 = x0 + int(rng.integers(8, w // 2)), y0 + int(rng.integers(8, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    noisy = np.asarray(field, np.int16) + rng.integers(-12, 13, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def make_pictures(folder: Path, n: int, lo: int, hi: int, *, like: Path | None = None) -> Path:
    """``n`` pictures in ``folder`` (hard links to those of ``like`` where it has them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = folder / f"img{i:05d}.jpg"
        if path.exists():
            continue
        source = like / path.name if like is not None else None
        if source is not None and source.exists():
            os.link(source, path)
        else:
            picture(i, lo, hi).save(path, quality=90)
    return folder


# -- measuring in a child process ------------------------------------------------------------------
def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM), in MB."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def speed_child(spec: dict) -> dict:
    import torch

    from featuremaps.atlas.engine import default_part_size, plan_layers, preprocessing_for
    from featuremaps.atlas.inputs import Plan, list_inputs, loader

    folder, out = Path(spec["folder"]), Path(spec["out"])
    batch, workers = spec["batch_size"], spec["workers"]
    model = fm.load_model(spec["model"], weights="random", seed=0, size=SIZE, progress=False)
    module = model.module
    images = list_inputs(folder)
    pre = preprocessing_for(model, SIZE)
    chosen = plan_layers(model, spec["layers"], SIZE)
    plan = Plan(len(images), default_part_size(sum(layer.channels for layer in chosen), batch), batch)
    n = len(images)

    def bare() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for b in loader(images, pre, plan, range(plan.num_parts), workers=workers, pin=False):
                module(b.x)
        return n / (time.perf_counter() - start)

    def atlas(i: int) -> dict:
        marks: dict[str, float] = {}

        def phase(text: str) -> None:
            marks.setdefault(text.split()[0], time.perf_counter())

        start = time.perf_counter()
        a = fm.atlas(
            model,
            folder,
            layers=spec["layers"],
            out=out / f"atlas-{i}",
            size=SIZE,
            batch_size=batch,
            workers=workers,
            on_phase=phase,
        )
        end = time.perf_counter()
        first, merged = marks.get("local", start), marks.get("merging", end)
        files: dict[str, int] = {}
        for f in a.folder.rglob("*"):
            if f.is_file():
                key = f"parts/{f.name}" if f.parent.parent.name == "parts" else f.name
                files[key] = files.get(key, 0) + f.stat().st_size
        return {
            "files": files,
            "part_size": a.manifest["part_size"],
            "call": n / (end - start),
            "pass": n / (merged - first),
            "setup_s": first - start,
            "merge_report_s": end - merged,
            "bytes": a.manifest["bytes"],
            "channels": sum(layer.channels for layer in a.layers),
            "parts": a.manifest["parts"],
        }

    with torch.inference_mode():  # warm-up: threads, allocator
        x = torch.zeros(batch, 3, SIZE, SIZE)
        module(x)
    bares, atlases = [bare()], []
    for i in range(spec["repeats"]):
        atlases.append(atlas(i))
        bares.append(bare())
    return {"bare": bares, "atlas": atlases, "images": n, "batch_size": batch, "workers": workers}


def rss_child(spec: dict) -> dict:
    model = fm.load_model("alexnet", weights="random", seed=0, size=SIZE, progress=False)
    loaded = peak_rss_mb()
    a = fm.atlas(
        model,
        spec["folder"],
        out=spec["out"],
        size=SIZE,
        batch_size=spec["batch_size"],
        workers=spec["workers"],
    )
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "images": a.num_images,
        "peak_mb": peak_rss_mb(),
        "after_load_mb": loaded,
        "worker_peak_mb": children,
        "parts": a.manifest["parts"],
        "part_size": a.manifest["part_size"],
    }


def in_child(kind: str, spec: dict) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", kind, json.dumps(spec)],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the table -------------------------------------------------------------------------------------
def ratios(result: dict, key: str) -> list[float]:
    b = result["bare"]
    return [a[key] / ((b[i] + b[i + 1]) / 2) for i, a in enumerate(result["atlas"])]


def _med(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x" + (f" [{min(values):.2f}-{max(values):.2f}]" if len(values) > 1 else "")


def report(speed: dict, rss: list[dict], args: argparse.Namespace) -> str:
    lines = []
    if speed:
        lines += [
            f"Speed, {args.images} generated images at {SIZE}x{SIZE}, batch {args.batch_size}, {args.workers} "
            f"DataLoader workers, {os.cpu_count()} CPUs, torch threads {args.threads}, random weights:",
            "",
            "| model, layers | bare loop (img/s) | fm.atlas call (img/s) | ratio, whole call | ratio, batch pass "
            "| setup + merge & report (s) | target |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, r in speed.items():
            call, batch_pass = ratios(r, "call"), ratios(r, "pass")
            fixed = statistics.median(a["setup_s"] + a["merge_report_s"] for a in r["atlas"])
            lines.append(
                f"| {label} | {statistics.median(r['bare']):.1f} | "
                f"{statistics.median(a['call'] for a in r['atlas']):.1f} | {_med(call)} | {_med(batch_pass)} | "
                f"{fixed:.1f} | >= 0.9x |"
            )
        lines.append("")
    if rss:
        base = rss[0]["peak_mb"]
        lines += [
            f"Peak memory, AlexNet conv layers (1,152 channels), batch {args.batch_size}, {args.workers} workers, "
            "each atlas in a fresh process:",
            "",
            "| images | parts (images each) | peak RSS, main process (MB) | vs the first | largest worker peak RSS "
            "(MB, pages shared with the parent included) | target |",
            "|---|---|---|---|---|---|",
        ]
        for r in rss:
            lines.append(
                f"| {r['images']} | {r['parts']} ({r['part_size']}) | {r['peak_mb']:.0f} | {r['peak_mb'] / base:.2f}x "
                f"| {r['worker_peak_mb']:.0f} | <= 1.1x |"
            )
        lines.append("")
    store = speed.get("ResNet-50 layer3+layer4")
    if store:
        lines += store_table(store)
    return "\n".join(lines)


PER_IMAGE = ("parts/stats.parquet", "parts/images.parquet", "inputs.parquet", "images.parquet")
PER_PART = ("parts/topk.parquet", "parts/sketch.parquet", "parts/channels.parquet")


def store_table(store: dict) -> list[str]:
    """Bytes on disk by file, and their extrapolation to ImageNet: the per-image files scale with the
    images; each part's own top-k, sketch and channel summary with the parts (the sketch, which grows with
    a part's images up to its number of buckets, scaled as if linear: an upper bound); the merged
    per-channel tables and the report stay (the merged sketch grows, as the parts' do)."""
    a = store["atlas"][0]
    n, files, part_size = store["images"], a["files"], a["part_size"]
    parts_now, parts_then = a["parts"], -(-IMAGENET_TRAIN // part_size)
    fill = part_size / min(n, part_size)  # a part of the measured run holds min(n, part_size) images
    lines = [
        f"Store, ResNet-50 layer3+layer4 ({a['channels']} channels, parts of {part_size} images), {n} images "
        f"({parts_now} part(s)), and at ImageNet scale ({IMAGENET_TRAIN:,} images, {parts_then:,} parts):",
        "",
        "| file(s) | grows with | bytes here | per image here | at ImageNet scale |",
        "|---|---|---|---|---|",
    ]
    total_here = total_then = 0.0
    for name, size in sorted(files.items(), key=lambda kv: -kv[1]):
        if name in PER_IMAGE:
            grows, then = "images", size * IMAGENET_TRAIN / n
        elif name in PER_PART:
            scale = fill if name == "parts/sketch.parquet" else 1.0
            grows, then = "parts", size / parts_now * scale * parts_then
        elif name == "histograms.parquet":
            grows, then = "buckets (bounded)", size * fill
        else:
            grows, then = "channels (fixed)", size
        total_here, total_then = total_here + size, total_then + then
        lines.append(f"| {name} | {grows} | {size:,} | {size / n:,.0f} | {_gb(then)} |")
    lines.append(f"| total | | {total_here:,.0f} | {total_here / n:,.0f} | {_gb(total_then)} |")
    ips = statistics.median(x["call"] for x in store["atlas"])
    lines += [
        "",
        f"At ImageNet scale: {_gb(total_then)} on disk ({total_then / IMAGENET_TRAIN:,.0f} bytes per image); "
        f"{IMAGENET_TRAIN / ips / 3600:,.0f} hours of this machine at the {ips:.1f} img/s measured here.",
    ]
    return lines


def _gb(size: float) -> str:
    return f"{size / 1e9:,.2f} GB" if size >= 1e8 else f"{size / 1e6:,.2f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400, help="pictures for the speed runs (default 400)")
    parser.add_argument("--rss-images", default="400,4000", help="picture counts of the memory runs (default 400,4000)")
    parser.add_argument("--repeats", type=int, default=2, help="atlas runs per model, each between two bare runs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the atlas's default)")
    parser.add_argument("--only", choices=["speed", "rss"], default=None)
    parser.add_argument("--models", default=",".join(SPEED), help="speed rows to run (comma-separated labels)")
    parser.add_argument(
        "--folder", default=None, help="where to put pictures and atlases (default: a temporary folder)"
    )
    parser.add_argument("--json", default=None, help="write every figure here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, spec = args.child
        result = (speed_child if kind == "speed" else rss_child)(json.loads(spec))
        print(json.dumps(result))
        return
    import torch

    from featuremaps.atlas.engine import default_workers

    args.workers = default_workers() if args.workers is None else args.workers
    args.threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        root = Path(tmp)
        speed: dict[str, dict] = {}
        rss: list[dict] = []
        if args.only in (None, "speed"):
            folder = make_pictures(root / "speed", args.images, 256, 512)
            wanted = [m.strip() for m in args.models.split(",")]
            for label in wanted:
                name, layers = SPEED[label]
                spec = {"model": name, "layers": layers, "folder": str(folder), "out": str(root / f"out-{name}")}
                spec |= {"batch_size": args.batch_size, "workers": args.workers, "repeats": args.repeats}
                print(f"speed: {label} ...", file=sys.stderr, flush=True)
                speed[label] = in_child("speed", spec)
        if args.only in (None, "rss"):
            counts = sorted(int(c) for c in args.rss_images.split(","))
            biggest = make_pictures(root / f"rss-{counts[-1]}", counts[-1], 160, 320)
            for n in counts:
                folder = make_pictures(root / f"rss-{n}", n, 160, 320, like=biggest)
                spec = {"folder": str(folder), "out": str(root / f"rss-out-{n}")}
                spec |= {"batch_size": args.batch_size, "workers": args.workers}
                print(f"memory: AlexNet over {n} images ...", file=sys.stderr, flush=True)
                rss.append(in_child("rss", spec))
    text = report(speed, rss, args)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"speed": speed, "rss": rss, "table": text}, indent=2))


if __name__ == "__main__":
    main()
