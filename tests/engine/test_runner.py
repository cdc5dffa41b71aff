"""run_blockwise on a real LocalCluster: every block once, resume, refusal of other parameters, failures."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emseg.cluster import ClusterProfile, connect, load_profile
from emseg.engine.ledger import Ledger
from emseg.engine.runner import run_blockwise
from emseg.errors import ConfigError, IncompleteOutputError, ResumeMismatchError, RunIncompleteError
from emseg.geometry import Block, Roi, plan_blocks
from emseg.io import create_volume, open_volume


def add_one(block: Block, *, src: str, dst: str, fail_ids: tuple[int, ...] = ()) -> dict[str, int]:
    if block.block_id in fail_ids:
        raise ValueError(f"block {block.block_id} is cursed")
    data = open_volume(src).read(block.read_roi, pad="reflect")
    core = block.write_roi.relative_to(block.read_roi)
    open_volume(dst, allow_incomplete=True, mode="r+").write(block.write_roi, data[core.to_slices()] + 1)
    return {"voxels": block.write_roi.size}


@pytest.fixture(scope="module")
def client():
    with connect(workers=2) as connection:
        yield connection.client


def test_every_block_once_then_resume_then_refuse(client, make_volume, tmp_path: Path) -> None:
    src = make_volume(shape=(12, 40, 40), chunks=(4, 16, 16))
    dst = tmp_path / "out.zarr"
    out = create_volume(dst, shape=(12, 40, 40), dtype="uint8", chunks=(4, 16, 16), voxel_size=(1, 1, 1))
    grid = plan_blocks(out.roi, (4, 16, 16), (1, 2, 2), chunk_shape=out.chunks)
    fn = functools.partial(add_one, src=str(src), dst=str(dst))
    report = run_blockwise(client, stage="copy", grid=grid, fn=fn, output=dst, params={"k": 1}, progress=False)
    assert (report.computed, report.skipped, report.total) == (len(grid), 0, len(grid))
    assert sum(r["voxels"] for r in report.results.values()) == out.roi.size
    expected = open_volume(src).read(out.roi) + 1
    assert np.array_equal(open_volume(dst, allow_incomplete=True).read(out.roi), expected)
    again = run_blockwise(client, stage="copy", grid=grid, fn=fn, output=dst, params={"k": 1}, progress=False)
    assert (again.computed, again.skipped) == (0, len(grid))
    with pytest.raises(ResumeMismatchError, match=r"differs in: k\); pass --overwrite"):
        run_blockwise(client, stage="copy", grid=grid, fn=fn, output=dst, params={"k": 2}, progress=False)
    redo = run_blockwise(client, stage="copy", grid=grid, fn=fn, output=dst, params={"k": 2}, overwrite=True,
                         progress=False)
    assert redo.computed == len(grid)


def test_failed_blocks_are_reported_and_rerun_finishes(client, make_volume, tmp_path: Path) -> None:
    src = make_volume(shape=(8, 32, 32))
    dst = tmp_path / "out.zarr"
    out = create_volume(dst, shape=(8, 32, 32), dtype="uint8", chunks=(4, 16, 16), voxel_size=(1, 1, 1))
    grid = plan_blocks(out.roi, (4, 16, 16), 0, chunk_shape=out.chunks)
    cursed = functools.partial(add_one, src=str(src), dst=str(dst), fail_ids=(3, 5))
    with pytest.raises(RunIncompleteError, match=r"2 of 8 blocks failed .*cursed.*rerun the same command") as err:
        run_blockwise(client, stage="copy", grid=grid, fn=cursed, output=dst, params={}, retries=0, progress=False)
    assert err.value.exit_code == 3
    assert set(Ledger(dst, "copy").done()) == set(range(8)) - {3, 5}
    healed = functools.partial(add_one, src=str(src), dst=str(dst))
    report = run_blockwise(client, stage="copy", grid=grid, fn=healed, output=dst, params={}, progress=False)
    assert (report.computed, report.skipped) == (2, 6)
    assert np.array_equal(open_volume(dst, allow_incomplete=True).read(out.roi), open_volume(src).read(out.roi) + 1)


def test_profiles(tmp_path: Path) -> None:
    assert load_profile(None) == ClusterProfile(kind="local")
    assert load_profile("local-gpu").kind == "local-gpu"
    good = tmp_path / "p.yaml"
    good.write_text("kind: local\nworkers: 3\n")
    assert load_profile(good).workers == 3
    good.write_text("kind: local\nworkerz: 3\n")
    with pytest.raises(ConfigError, match="workerz: Extra inputs"):
        load_profile(good)
    with pytest.raises(ConfigError, match="neither a profile name"):
        load_profile(tmp_path / "nope.yaml")


# ---------------------------------------------------------------------------------------------
# integrity: records carry the chunks a block wrote; reruns and `info --verify` check them


def _copy_stage(client, src: Path, dst: Path, shape=(12, 40, 40), chunks=(4, 16, 16)):
    from emseg.engine.runner import WriteSpec
    from emseg.io import mark_complete

    if not dst.exists():
        create_volume(dst, shape=shape, dtype="uint8", chunks=chunks, voxel_size=(1, 1, 1))
    grid = plan_blocks(Roi.from_shape(shape), chunks, (1, 2, 2), chunk_shape=chunks)
    fn = functools.partial(add_one, src=str(src), dst=str(dst))
    report = run_blockwise(client, stage="copy", grid=grid, fn=fn, output=dst, params={"k": 1}, progress=False,
                           writes=[WriteSpec(str(dst / "0"))])
    mark_complete(dst)
    return grid, report


def _chunk_file(dst: Path, index: tuple[int, int, int]) -> Path:
    return dst / "0" / "c" / "/".join(map(str, index))


def test_deleted_and_truncated_chunks_are_refused_then_exactly_recomputed(client, make_volume, tmp_path) -> None:
    src = make_volume(shape=(12, 40, 40), chunks=(4, 16, 16))
    dst = tmp_path / "out.zarr"
    grid, first = _copy_stage(client, src, dst)
    assert first.computed == len(grid) == 27
    original = open_volume(dst).read(Roi.from_shape((12, 40, 40)))
    _chunk_file(dst, (1, 1, 1)).unlink()                      # deleted
    damaged = _chunk_file(dst, (2, 0, 2))
    damaged.write_bytes(damaged.read_bytes()[:10])            # truncated
    with pytest.raises(IncompleteOutputError, match=r"chunks were deleted or damaged; rerun"):
        open_volume(dst)
    _, again = _copy_stage(client, src, dst)
    assert (again.computed, again.repaired, again.skipped) == (2, 2, 25)
    assert sorted(again.results) == list(range(27))
    assert np.array_equal(open_volume(dst).read(Roi.from_shape((12, 40, 40))), original)
    _, clean = _copy_stage(client, src, dst)
    assert (clean.computed, clean.repaired) == (0, 0)


def test_a_rerun_recomputes_a_chunk_rewritten_with_the_same_size(client, make_volume, tmp_path) -> None:
    src = make_volume(shape=(12, 40, 40), chunks=(4, 16, 16))
    dst = tmp_path / "out.zarr"
    grid, _ = _copy_stage(client, src, dst)
    original = open_volume(dst).read(Roi.from_shape((12, 40, 40)))
    target = _chunk_file(dst, (0, 2, 1))
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF                                          # same size, other bytes, written now
    target.write_bytes(bytes(data))
    _, rerun = _copy_stage(client, src, dst)                  # the new modification time: read, compared
    assert (rerun.computed, rerun.repaired, rerun.skipped) == (1, 1, len(grid) - 1)
    assert np.array_equal(open_volume(dst).read(Roi.from_shape((12, 40, 40))), original)
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))  # touched, not changed
    _, touched = _copy_stage(client, src, dst)
    assert (touched.computed, touched.repaired) == (0, 0)


def test_info_verify_finds_same_size_damage_that_kept_its_time_and_the_rerun_recomputes_it(client, make_volume,
                                                                                            tmp_path) -> None:
    src = make_volume(shape=(12, 40, 40), chunks=(4, 16, 16))
    dst = tmp_path / "out.zarr"
    grid, _ = _copy_stage(client, src, dst)
    original = open_volume(dst).read(Roi.from_shape((12, 40, 40)))
    emseg = Path(sys.executable).parent / "emseg"
    ok = subprocess.run([str(emseg), "info", "--verify", str(dst)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "verified 27 blocks" in ok.stderr
    target = _chunk_file(dst, (0, 2, 1))
    before = target.stat()
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF                                          # same size, other bytes, the old time (bit rot)
    target.write_bytes(bytes(data))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    _, rerun = _copy_stage(client, src, dst)
    assert rerun.computed == 0                                # a rerun stats: only a full read sees it
    bad = subprocess.run([str(emseg), "info", "--verify", str(dst)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    errors = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("Error: ") and "1 of 27 blocks" in errors[0], bad.stderr
    assert "Traceback" not in bad.stderr
    with pytest.raises(IncompleteOutputError, match="half-written"):
        open_volume(dst)                                      # refused until repaired
    _, repaired = _copy_stage(client, src, dst)
    assert repaired.computed == 1 and repaired.skipped == len(grid) - 1
    assert np.array_equal(open_volume(dst).read(Roi.from_shape((12, 40, 40))), original)


def test_label_rerun_recomputes_a_deleted_label_chunk(client, tmp_path) -> None:
    import cc3d

    from emseg.workflows.label import label

    rng = np.random.default_rng(3)
    mask = (rng.random((16, 32, 32)) < 0.35).astype(np.uint8)
    pred = tmp_path / "mask.zarr"
    vol = create_volume(pred, shape=mask.shape, dtype="uint8", chunks=(8, 16, 16), voxel_size=(1, 1, 1))
    vol.write(vol.roi, mask)
    __import__("emseg.io", fromlist=["mark_complete"]).mark_complete(pred)
    out = tmp_path / "labels.zarr"
    first = label(pred, out, block_size=(8, 16, 16), client=client, progress=False)
    before = open_volume(out).read(Roi.from_shape(mask.shape))
    _chunk_file(out, (1, 0, 1)).unlink()
    with pytest.raises(IncompleteOutputError, match="chunks were deleted"):
        open_volume(out)
    again = label(pred, out, block_size=(8, 16, 16), client=client, progress=False)
    relabel = again.stages[-1]
    assert (relabel.computed, relabel.repaired) == (1, 1) and again.n_segments == first.n_segments
    after = open_volume(out).read(Roi.from_shape(mask.shape))
    assert np.array_equal(after, before)
    expected = cc3d.connected_components(mask, connectivity=6)
    assert len(np.unique(after)) == len(np.unique(expected))


_BLOCKS_RUN: dict[str, int] = {}
"""Worker side: task key -> blocks this process has run for it."""


def add_one_dying_once(block: Block, *, src: str, dst: str, marker: str) -> dict[str, int]:
    """add_one; the first time a task reaches its second block, its worker process is killed.

    Tasks hold several ledger chunks once the runner has timed the first ones (a run of many blocks):
    the killed task has recorded its first block, so its retry finds that block already done.
    """
    import os
    import signal

    from distributed.worker import thread_state

    key = str(getattr(thread_state, "key", ""))
    if _BLOCKS_RUN.get(key, 0) >= 1 and not Path(marker).exists():
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    _BLOCKS_RUN[key] = _BLOCKS_RUN.get(key, 0) + 1
    return add_one(block, src=src, dst=dst)


def test_blocks_recorded_by_a_task_lost_with_its_worker_are_counted(client, make_volume, tmp_path: Path) -> None:
    """A task records a block, then its worker is killed: the retry finds that block done, and the run
    still reports it, keeps its result and counts its chunk (else the census refuses the finished output)."""
    from emseg.engine.runner import WriteSpec
    from emseg.io import mark_complete

    shape, blocks = (2, 80, 80), (1, 8, 8)  # 200 blocks: the runner groups several per task
    src = make_volume(shape=shape, chunks=blocks)
    dst = tmp_path / "out.zarr"
    out = create_volume(dst, shape=shape, dtype="uint8", chunks=blocks, voxel_size=(1, 1, 1))
    grid = plan_blocks(out.roi, blocks, 0, chunk_shape=out.chunks)
    fn = functools.partial(add_one_dying_once, src=str(src), dst=str(dst), marker=str(tmp_path / "killed"))
    report = run_blockwise(client, stage="copy", grid=grid, fn=fn, output=dst, params={}, progress=False,
                           writes=[WriteSpec(str(dst / "0"))])
    assert (tmp_path / "killed").exists(), "no worker was killed"
    assert (report.computed, report.skipped) == (len(grid), 0)
    assert sorted(report.results) == list(range(len(grid)))
    mark_complete(dst)
    assert np.array_equal(open_volume(dst).read(out.roi), open_volume(src).read(out.roi) + 1)  # census holds
