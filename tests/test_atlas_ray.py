"""The Ray engine (local Ray, 2 CPUs: one model actor, one CPU left to Ray Data's decoding) writes
the same store as the local engine: the same topk.parquet, the same rows."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

import featuremaps as fm
from test_atlas_model import planted_net, write_planted

MODEL_FILE = Path(__file__).with_name("test_atlas_model.py")
OPTIONS = {"layers": "features.0,features.3", "size": 32, "batch_size": 3, "part_size": 6, "workers": 0, "top_k": 4}


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=128 * 2**20)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    write_planted(root / "pics")
    (root / "pics" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


def _same_store(a: Path, b: Path) -> None:
    for name in ("topk.parquet", "images.parquet", "histograms.parquet", "channels.parquet"):
        assert pq.read_table(a / name).equals(pq.read_table(b / name)), name
    con_a, con_b = fm.open_atlas(a), fm.open_atlas(b)
    query = "SELECT image_id, layer, channel, max, mean, y, x FROM stats ORDER BY image_id, layer, channel"
    assert con_a.sql(query).fetchall() == con_b.sql(query).fetchall()
    assert (a / "skipped.csv").read_text() == (b / "skipped.csv").read_text()


def test_ray_gives_the_local_store_with_a_model_built_in_each_actor(local_ray, pictures):
    model = fm.load_model(f"{MODEL_FILE}:planted_net", "random")  # reloadable: each actor builds it
    local = fm.atlas(model, pictures / "pics", out=pictures / "local", **OPTIONS)
    remote = fm.atlas(model, pictures / "pics", out=pictures / "ray", engine="ray", **OPTIONS)
    assert (
        remote.manifest["engine"] == "ray"
        and remote.manifest["reload"]["model"] == f"{MODEL_FILE.resolve()}:planted_net"
    )
    _same_store(local.folder, remote.folder)
    assert remote.num_skipped == 1 and remote.top("features.0", 0, k=1)[0].image.endswith("a_red.png")


def test_ray_ships_a_model_object_to_its_actors(local_ray, pictures, tmp_path):
    from ray import cloudpickle

    import test_atlas_model

    cloudpickle.register_pickle_by_value(test_atlas_model)  # the tests' module is not importable in Ray's workers
    try:
        remote = fm.atlas(planted_net(), pictures / "pics", out=tmp_path / "ray", engine="ray", **OPTIONS)
    finally:
        cloudpickle.unregister_pickle_by_value(test_atlas_model)
    assert remote.manifest["reload"] is None
    local = fm.atlas(planted_net(), pictures / "pics", out=tmp_path / "local", **OPTIONS)
    _same_store(local.folder, remote.folder)


def test_ray_refuses_actors_that_leave_the_decoding_no_cpu(local_ray, pictures, tmp_path):
    with pytest.raises(fm.AtlasError, match="would leave Ray Data's decoding no CPU.*--ray-actors 1 or fewer"):
        fm.atlas(planted_net(), pictures / "pics", out=tmp_path / "ray", engine="ray", ray_actors=2, **OPTIONS)


def test_the_command_joins_a_running_cluster_with_ray_address(local_ray, pictures, tmp_path):
    """``featuremaps atlas --engine ray --ray-address ADDRESS`` in another process joins this test's
    Ray cluster (a driver of its own, the cluster's CPUs) and writes the local engine's store."""
    import os
    import subprocess
    import sys

    address = ray.get_runtime_context().gcs_address
    common = ["--model", f"{MODEL_FILE}:planted_net", "--weights", "random", "--layers", OPTIONS["layers"],
              "--size", "32", "--batch-size", "3", "--part-size", "6", "--workers", "0", "--top-k", "4",
              "--quiet", "--no-report"]  # fmt: skip
    command = [sys.executable, "-m", "featuremaps.cli", "atlas", str(pictures / "pics"), *common]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    joined = subprocess.run(
        [*command, "--engine", "ray", "--ray-address", address, "--out", str(tmp_path / "ray")],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert joined.returncode == 0, joined.stderr
    local = subprocess.run([*command, "--out", str(tmp_path / "local")], capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr
    assert fm.open_atlas(tmp_path / "ray").manifest["engine"] == "ray"
    _same_store(tmp_path / "local", tmp_path / "ray")
