"""run_blockwise on a real LocalCluster: every block once, resume, refusal of other parameters, failures."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from emseg.cluster import ClusterProfile, connect, load_profile
from emseg.errors import ConfigError, ResumeMismatchError, RunIncompleteError
from emseg.geometry import Block, plan_blocks
from emseg.io import create_volume, open_volume
from emseg.io.ledger import Ledger
from emseg.runner import run_blockwise


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
