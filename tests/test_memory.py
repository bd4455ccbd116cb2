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

# Allocates 48 one-MB tensors, frees them, and counts the page faults of doing it again: with
# freed memory kept, the second round reuses the first round's pages.
PROBE = """
import json, resource, sys
import torch
import featuremaps as fm
from featuremaps import memory
applied = memory.reuse_freed_memory()
def round_():
    ts = [torch.ones(256 * 1024) for _ in range(48)]
    del ts
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    round_()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "settings": memory.settings(), "faults": faults[-1]}))
"""


def probe(setting: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "FEATUREMAPS_REUSE_MEMORY"}
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
    assert kept["applied"] is True
    assert kept["settings"] == {"applied": True, "limit_mb": 512}
    assert kept["faults"] < 500  # 48 MB again without touching a fresh page (12,288 pages of 4 kB)

    default = probe("0")
    assert default["applied"] is False
    assert default["settings"] == {"applied": False, "limit_mb": 0}
    assert default["faults"] > 5000  # glibc gave the memory back, so it is faulted in again


def test_capture_turns_it_on_once():
    import torch

    import featuremaps as fm

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.ReLU())
    fm.capture(model, torch.zeros(1, 3, 8, 8))
    first = memory.settings()
    assert "applied" in first
    assert memory.reuse_freed_memory(limit_mb=1) is first["applied"]  # already decided: no second change
    assert memory.settings() == first
