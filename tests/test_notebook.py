"""The walkthrough notebook runs from top to bottom (so it can never rot)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "seed_walkthrough.ipynb"


@pytest.mark.slow
def test_seed_walkthrough_executes(offline, tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 8, "the pictures must display inline"
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "RANDOM weights" in text  # offline: said out loud, never silent
