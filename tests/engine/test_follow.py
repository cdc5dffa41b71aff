"""A stage that follows another on a real LocalCluster: it reads only what is written, yet starts
before the other ends; a producer that fails stops it with the producer's reason."""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from emseg.engine.follow import Progress
from emseg.engine.runner import run_blockwise
from emseg.errors import RunIncompleteError
from emseg.geometry import Block, plan_blocks
from emseg.io import create_volume, open_volume


def produce(block: Block, *, src: str, dst: str, fail_ids: tuple[int, ...] = ()) -> dict[str, float]:
    """Write ``src + 1`` (never 0) over the block, slowly."""
    if block.block_id in fail_ids:
        raise ValueError(f"block {block.block_id} is cursed")
    time.sleep(0.1)
    data = open_volume(src).read(block.write_roi)
    open_volume(dst, allow_incomplete=True, mode="r+").write(block.write_roi, data + 1)
    return {"end": time.time()}


def consume(block: Block, *, src: str, dst: str) -> dict[str, float]:
    """Read the block with its halo from what ``produce`` writes: unwritten voxels read 0."""
    start = time.time()
    data = open_volume(src, allow_incomplete=True).read(block.read_roi, pad="reflect")
    core = block.write_roi.relative_to(block.read_roi)
    open_volume(dst, allow_incomplete=True, mode="r+").write(block.write_roi, data[core.to_slices()])
    return {"start": start, "unwritten": int((data == 0).sum())}


@pytest.fixture
def client(cluster2):
    return cluster2.client


def _stages(make_volume, tmp_path: Path):
    src = make_volume(shape=(16, 64, 64), chunks=(4, 16, 16))
    values = open_volume(src).read(open_volume(src).roi)
    assert values.max() < 255  # + 1 is never 0
    made = {}
    for name in ("mid", "end"):
        made[name] = create_volume(tmp_path / f"{name}.zarr", shape=(16, 64, 64), dtype="uint8", chunks=(4, 16, 16),
                                   voxel_size=(1, 1, 1))
    first = plan_blocks(made["mid"].roi, (4, 16, 16), 0, chunk_shape=(4, 16, 16))
    # other blocks than the first stage's, read with a halo that reaches into its neighbours
    second = plan_blocks(made["end"].roi, (4, 32, 32), (1, 5, 5), chunk_shape=(4, 16, 16))
    return src, tmp_path / "mid.zarr", tmp_path / "end.zarr", first, second


def test_a_following_stage_reads_only_written_blocks_and_starts_before_the_first_ends(client, make_volume,
                                                                                      tmp_path: Path) -> None:
    src, mid, end, first, second = _stages(make_volume, tmp_path)
    progress = Progress("copy")

    def producer():
        try:
            return run_blockwise(client, stage="copy", grid=first, fn=functools.partial(produce, src=str(src),
                                 dst=str(mid)), output=mid, params={}, progress=False, posts=progress)
        finally:
            progress.end()

    with ThreadPoolExecutor(1) as pool:
        produced = pool.submit(producer)
        followed = run_blockwise(client, stage="read", grid=second, fn=functools.partial(consume, src=str(mid),
                                 dst=str(end)), output=end, params={}, progress=False, follows=progress)
        produced = produced.result()
    assert followed.computed == len(second) and produced.computed == len(first)
    assert followed.results.column("unwritten").tolist() == [0] * len(second)
    assert followed.results.column("start").min() < produced.results.column("end").max()  # they overlapped
    expected = open_volume(src).read(open_volume(src).roi) + 1
    np.testing.assert_array_equal(open_volume(end, allow_incomplete=True).read(open_volume(src).roi), expected)

    # a rerun: the first stage posts what an earlier run wrote, and the second has nothing to wait for
    again = Progress("copy")
    run_blockwise(client, stage="copy", grid=first, fn=functools.partial(produce, src=str(src), dst=str(mid)),
                  output=mid, params={}, progress=False, posts=again)
    assert again.covers(open_volume(src).roi)


def test_a_producer_that_fails_stops_the_follower_with_its_reason(client, make_volume, tmp_path: Path) -> None:
    src, mid, end, first, second = _stages(make_volume, tmp_path)
    progress = Progress("copy")

    def producer():
        try:
            run_blockwise(client, stage="copy", grid=first, fn=functools.partial(produce, src=str(src), dst=str(mid),
                          fail_ids=(len(first) - 1,)), output=mid, params={}, progress=False, retries=0,
                          posts=progress)
        except RunIncompleteError as e:
            progress.end(e)
            raise
        progress.end()

    with ThreadPoolExecutor(1) as pool:
        produced = pool.submit(producer)
        with pytest.raises(RunIncompleteError, match=r"copy did not write every block .*cursed"):
            run_blockwise(client, stage="read", grid=second, fn=functools.partial(consume, src=str(mid),
                          dst=str(end)), output=end, params={}, progress=False, follows=progress)
        with pytest.raises(RunIncompleteError):
            produced.result()
