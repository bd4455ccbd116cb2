"""Waiting for a viewer run in the web tests (in-process TestClient or a served httpx.Client alike)."""

from __future__ import annotations

import time

import httpx


def wait_done(client: httpx.Client, run_id: str, timeout: float = 90.0) -> dict:
    """Poll run ``run_id`` until it is done or failed, and return its job; fails the test on a non-200
    answer or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(f"/api/runs/{run_id}")
        assert r.status_code == 200, r.text
        job = r.json()
        if job["state"] in ("done", "failed"):
            return job
        assert time.monotonic() < deadline, f"run {run_id} still {job['state']} after {timeout:g} s"
        time.sleep(0.03)
