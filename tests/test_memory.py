"""featuremaps.memory: glibc keeps freed memory for the next capture, and the opt-out works."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from featuremaps import memory

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)

# Captures every output of a small conv net (19 outputs of 4 MB) five times and counts the page
# faults of each capture: with freed memory kept, later captures reuse the earlier ones' pages.
PROBE = """
import json, resource
import torch
import featuremaps as fm
from featuremaps import memory
torch.manual_seed(0)
layers = []
for _ in range(6):
    layers += [torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(inplace=True)]
model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), *layers).eval()
x = torch.randn(1, 3, 256, 256)
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    maps = fm.capture(model, x, layers="all")
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del maps
print(json.dumps({"settings": memory.settings(), "faults": faults}))
"""


def probe(setting: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "FEATUREMAPS_REUSE_MEMORY"}
    env["THP_MEM_ALLOC_ENABLE"] = "0"  # 4 kB pages, so that faults count pages
    if setting is not None:
        env["FEATUREMAPS_REUSE_MEMORY"] = setting
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("", 512), ("1", 512), ("on", 512), ("0", 0), ("off", 0), ("false", 0), ("256", 256), ("-5", 0), ("lots", 512)],
)
def test_limit_from_env(monkeypatch, raw, expected):
    monkeypatch.setenv("FEATUREMAPS_REUSE_MEMORY", raw)
    assert memory.limit_mb_from_env() == expected


@glibc
def test_freed_memory_is_reused_and_the_opt_out_leaves_glibc_alone():
    kept = probe(None)
    assert kept["settings"] == {"applied": True, "limit_mb": 512}
    # 19 x 4 MB kept per capture: about 20,000 pages of 4 kB when they are fresh
    assert sum(kept["faults"][2:]) < 6_000, kept["faults"]  # a stray 4 MB block at most, now and then

    default = probe("0")
    assert default["settings"] == {"applied": False, "limit_mb": 0}
    assert sum(default["faults"][2:]) > 20_000, default["faults"]  # glibc gave most of it back: faulted in again


def test_capture_turns_it_on_once():
    import torch

    import featuremaps as fm

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.ReLU())
    fm.capture(model, torch.zeros(1, 3, 8, 8))
    first = memory.settings()
    assert "applied" in first
    assert memory.reuse_freed_memory(limit_mb=1) is first["applied"]  # already decided: no second change
    assert memory.settings() == first


@pytest.mark.parametrize(
    ("preset", "torch_first", "expected"),
    [(None, False, "1"), ("0", False, "0"), (None, True, None)],
)
def test_huge_pages_are_asked_for_only_before_torch(preset, torch_first, expected):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    code = ("import torch\n" if torch_first else "") + (
        "import os, featuremaps\nprint(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(expected)
