"""emseg.cluster's local clusters: worker layout, torch-ready worker processes, a quiet run."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from emseg.cluster import WORKER_MALLOC_ENV, WORKER_MEMORY, ClusterProfile, Layout, connect, default_layout
from emseg.cluster.local import _layout


def test_default_layout_is_one_single_threaded_worker_per_core_memory_permitting() -> None:
    assert default_layout(8, 64 * WORKER_MEMORY) == Layout(8, 1)
    assert default_layout(8, 2 * WORKER_MEMORY) == Layout(2, 4)  # little memory: fewer workers, more threads
    assert default_layout(3, WORKER_MEMORY // 2) == Layout(1, 3)
    assert default_layout(1, 0) == Layout(1, 1)


def test_profile_overrides_the_layout() -> None:
    cores = len(os.sched_getaffinity(0))
    assert _layout(ClusterProfile(workers=3, threads_per_worker=2)) == Layout(3, 2)
    assert _layout(ClusterProfile(threads_per_worker=cores)) == Layout(1, cores)
    assert _layout(ClusterProfile(workers=1)) == Layout(1, cores)


def _worker_state() -> tuple[str | None, str | None, int]:
    import torch

    return os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("MALLOC_MMAP_THRESHOLD_"), torch.get_num_threads()


def test_workers_start_without_malloc_trimming_and_close_without_being_killed(caplog) -> None:
    # distributed's nanny default (MALLOC_TRIM_THRESHOLD_=65536) must not reach emseg's workers, and
    # closing workers that imported torch must not take the nanny's 4 s grace period and a SIGKILL
    with caplog.at_level(logging.INFO, logger="distributed.nanny"):
        with connect(workers=1) as connection:
            # connect() keeps Dask's loggers at WARNING in this process; this test reads the nanny's INFO lines
            logging.getLogger("distributed.nanny").setLevel(logging.INFO)
            state = connection.client.run(_worker_state)
    (trim, mmap, threads), = state.values()
    assert (trim, mmap) == (WORKER_MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"], WORKER_MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"])
    assert threads == connection.threads_per_worker
    messages = [r.getMessage() for r in caplog.records]
    assert any("Nanny at" in m and "closed" in m for m in messages), messages  # the log was captured
    assert not [m for m in messages if "still alive" in m or "killed by signal" in m], messages


def test_segment_prints_no_distributed_line(shared_data: Path, tmp_path: Path) -> None:
    """A normal ``emseg segment`` on a small real volume: results on stdout, no Dask log line on stderr."""
    import tifffile

    from emseg.io import create_volume, mark_complete

    raw = tifffile.imread(shared_data / "isbi2012" / "test-volume.tif")[:2, :192, :192]
    volume = create_volume(tmp_path / "isbi.zarr", shape=raw.shape, dtype="uint8", chunks=(2, 96, 96),
                           voxel_size=(50.0, 4.0, 4.0))
    volume.write(volume.roi, raw)
    mark_complete(tmp_path / "isbi.zarr")
    emseg = Path(sys.executable).with_name("emseg")
    done = subprocess.run([str(emseg), "segment", str(tmp_path / "isbi.zarr"), "-o", str(tmp_path / "seg.zarr"),
                           "--workers", "2", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "segments" in done.stdout
    assert not [line for line in done.stderr.splitlines() if "distributed" in line], done.stderr
