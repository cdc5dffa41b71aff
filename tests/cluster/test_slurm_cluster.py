"""emseg's Dask runs on a real SLURM (cluster/slurm-up.sh): same bytes as a local run, no leaked jobs.

The blocks run a halo-dependent filter (a Gaussian), so a block computed from the wrong region, a lost
block or a block written twice by a half-dead worker would show in a byte comparison with the local run.
"""

from __future__ import annotations

import functools
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cloudpickle
import dask
import numpy as np
import pytest
import yaml

from emseg.cluster import Connection, connect, load_profile
from emseg.cluster.slurm import SlurmError
from emseg.engine.runner import StageReport, run_blockwise
from emseg.geometry import Block, plan_blocks
from emseg.io import create_volume, open_volume

from .conftest import TEST_PROFILE, queue, wait_queue_empty

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("slurm")]

# Workers unpickle the block function; by value, they need not import this test module.
cloudpickle.register_pickle_by_value(__import__(__name__))

SHAPE, CHUNKS, HALO = (16, 64, 64), (4, 32, 32), (2, 4, 4)


def smooth(block: Block, *, src: str, dst: str, delay: float = 0.0) -> dict[str, object]:
    """Gaussian of the block's read region, cropped to its core (needs the halo to be right)."""
    from scipy.ndimage import gaussian_filter

    raw = open_volume(src).read(block.read_roi, pad="reflect").astype(np.float32)
    out = gaussian_filter(raw, sigma=(0.7, 1.3, 1.3), truncate=3.0)
    core = block.write_roi.relative_to(block.read_roi)
    time.sleep(delay)
    open_volume(dst, allow_incomplete=True, mode="r+").write(block.write_roi, out[core.to_slices()])
    return {"voxels": block.write_roi.size, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}


def run(cluster: str | Path, src: Path, dst: Path, *, delay: float = 0.0,
        before: Callable[[Connection], None] | None = None) -> tuple[np.ndarray, StageReport]:
    out = create_volume(dst, shape=SHAPE, dtype="float32", chunks=CHUNKS, voxel_size=(40, 4, 4))
    grid = plan_blocks(out.roi, CHUNKS, HALO, chunk_shape=out.chunks)
    fn = functools.partial(smooth, src=str(src), dst=str(dst), delay=delay)
    with connect(cluster) as connection:
        if before is not None:
            before(connection)
        report = run_blockwise(connection.client, stage="smooth", grid=grid, fn=fn, output=dst, params={},
                               resources=connection.resources, retries=2, progress=False)
    assert report.computed == len(grid) == 16
    return open_volume(dst, allow_incomplete=True).read(out.roi), report


@pytest.fixture(scope="module")
def local_result(tmp_path_factory: pytest.TempPathFactory, make_volume_module: Path) -> np.ndarray:
    data, _ = run("local", make_volume_module, tmp_path_factory.mktemp("local") / "out.zarr")
    return data


@pytest.fixture(scope="module")
def make_volume_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from emseg.io import mark_complete

    path = tmp_path_factory.mktemp("src") / "raw.zarr"
    volume = create_volume(path, shape=SHAPE, dtype="uint8", chunks=CHUNKS, voxel_size=(40, 4, 4))
    volume.write(volume.roi, np.random.default_rng(7).integers(0, 255, SHAPE, dtype=np.uint8))
    mark_complete(path)
    return path


def test_slurm_run_is_bit_identical_to_local_and_leaves_no_job(local_result, make_volume_module, tmp_path) -> None:
    assert load_profile(TEST_PROFILE).kind == "slurm"
    data, _ = run(TEST_PROFILE, make_volume_module, tmp_path / "out.zarr")
    assert data.dtype == np.float32 and data.tobytes() == local_result.tobytes()
    assert wait_queue_empty() == []


def test_worker_job_cancelled_mid_run_is_survived(local_result, make_volume_module, tmp_path) -> None:
    """scancel the only worker job while blocks run: a replacement job finishes the run."""
    killed: list[str] = []
    seen: set[str] = set()
    profile = profile_with(tmp_path, minimum_jobs=1, maximum_jobs=1)

    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set():
            done = list((tmp_path / "out.zarr").glob("0/c/*/*/*"))
            running = [line.split()[0] for line in queue() if line.split()[1].startswith("emseg-") and line.endswith("RUNNING")]
            seen.update(running)
            if len(done) >= 4 and running and not killed:  # a few blocks written: the run is under way
                subprocess.run(["scancel", running[0]], check=True)
                killed.append(running[0])
            time.sleep(0.3)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    start = time.monotonic()
    try:
        # the cluster gives a vanished worker 15 s to come back before replacing its job; 3 s here
        with dask.config.set({"distributed.deploy.lost-worker-timeout": "3s"}):
            data, report = run(profile, make_volume_module, tmp_path / "out.zarr", delay=0.4)
    finally:
        stop.set()
        thread.join()
    assert killed, "the run ended before a worker job could be cancelled"
    assert len(seen) >= 2, f"no replacement worker job was seen (jobs: {seen})"
    print(f"killed job {killed[0]}, jobs seen {sorted(seen)}, run took {time.monotonic() - start:.1f} s")
    assert data.tobytes() == local_result.tobytes()
    assert wait_queue_empty() == []


def test_ctrl_c_cancels_every_job(tmp_path) -> None:
    with pytest.raises(KeyboardInterrupt):
        with connect(TEST_PROFILE) as connection:
            assert connection.resources is None and connection.client.scheduler_info()["workers"]
            assert queue(), "a worker job should be running"
            raise KeyboardInterrupt
    assert wait_queue_empty() == []


def profile_with(tmp_path: Path, **slurm: object) -> Path:
    data = yaml.safe_load(TEST_PROFILE.read_text())
    data["slurm"].update(slurm)
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_refused_job_is_reported_before_anything_is_submitted(tmp_path) -> None:
    with pytest.raises(SlurmError, match=r"SLURM refuses the worker job of this profile: .*invalid partition"):
        with connect(profile_with(tmp_path, queue="no-such-partition")):
            pass
    assert queue() == []


def test_worker_that_never_starts_times_out_and_is_cancelled(tmp_path) -> None:
    profile = profile_with(tmp_path, start_timeout=4, job_extra_directives=["--begin=now+3600"])
    with pytest.raises(SlurmError, match=r"no SLURM worker started within 4 s \(jobs named emseg-\w+: \d+: PENDING \(BeginTime\)\); check `squeue"):
        with connect(profile):
            pass
    assert wait_queue_empty() == []


def test_gpu_job_runs_one_pinned_worker_per_gpu(local_result, make_volume_module, tmp_path) -> None:
    """gpus_per_job: 2 on the dev SLURM's fake GPUs: one job, two workers pinned to GPU 0 and GPU 1,
    every block asks for GPU=1, and the output is still the local one."""
    profile = profile_with(tmp_path, gpus_per_job=2, cores=2, minimum_jobs=1, maximum_jobs=1)

    def two_gpu_workers(connection: Connection) -> None:
        assert connection.resources == {"GPU": 1}
        connection.client.wait_for_workers(2, timeout=60)
        workers = connection.client.scheduler_info()["workers"].values()
        assert sorted(w["resources"].get("GPU") for w in workers) == [1, 1]

    data, report = run(profile, make_volume_module, tmp_path / "out.zarr", delay=0.2, before=two_gpu_workers)
    assert data.tobytes() == local_result.tobytes()
    assert {r["gpu"] for r in report.results.values()} == {"0", "1"}, "workers are not pinned to one GPU each"
    assert wait_queue_empty() == []


def test_a_cluster_that_fails_to_start_leaves_no_key_files_behind(monkeypatch, tmp_path) -> None:
    """The scheduler cannot start (its port is taken, a warning made an error here): the run's key
    files are deleted with their private directory, and nothing complains about them afterwards."""
    import gc
    import socket

    import emseg.cluster.slurm as slurm

    profile = profile_with(tmp_path, log_directory=str(tmp_path / "jobs"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        kwargs = slurm.cluster_kwargs
        monkeypatch.setattr(slurm, "cluster_kwargs", lambda *a, **k: {
            **kwargs(*a, **k), "scheduler_options": {"dashboard": False, "dashboard_address": taken}})
        with pytest.raises(Exception, match="already in use"):
            with connect(profile):
                pass
    gc.collect()  # a key file deleted after its directory would raise here (an unraisable error)
    assert list((tmp_path / "jobs").glob(".emseg-tls-*")) == []
    assert wait_queue_empty() == []
