import itertools

import numpy as np
import pytest

from emseg.errors import GeometryError
from emseg.geometry import Roi, plan_blocks, round_up


def test_roi_basics() -> None:
    roi = Roi((1, 2, 3), (4, 5, 6))
    assert roi.end == (5, 7, 9)
    assert roi.size == 120
    assert roi.grow(1) == Roi((0, 1, 2), (6, 7, 8))
    assert roi.grow((1, 0, 0), (0, 0, 2)) == Roi((0, 2, 3), (5, 5, 8))
    assert roi.intersect(Roi((0, 0, 0), (2, 3, 4))) == Roi((1, 2, 3), (1, 1, 1))
    assert roi.intersect(Roi((10, 10, 10), (1, 1, 1))).empty
    assert roi.contains(Roi((2, 3, 4), (1, 1, 1)))
    assert not roi.contains(roi.grow(1))
    assert roi.relative_to(Roi((1, 1, 1), (9, 9, 9))).to_slices() == (slice(0, 4), slice(1, 6), slice(2, 8))
    assert hash(roi) == hash(Roi((1, 2, 3), (4, 5, 6)))


def test_roi_rejects_bad_input() -> None:
    with pytest.raises(GeometryError, match="non-negative"):
        Roi((0, 0), (1, -1))
    with pytest.raises(GeometryError, match="dimensionality"):
        Roi((0, 0), (1, 1, 1))
    with pytest.raises(GeometryError, match="negative offset"):
        Roi((-1, 0), (2, 2)).to_slices()


@pytest.mark.parametrize("shape", [(10, 33, 47), (1, 64, 64), (7, 8, 9)])
@pytest.mark.parametrize("block", [(4, 16, 16), (8, 8, 32), (16, 64, 64)])
@pytest.mark.parametrize("halo", [0, (1, 3, 5)])
def test_cores_tile_the_volume_exactly(shape, block, halo) -> None:
    grid = plan_blocks(Roi.from_shape(shape), block, halo)
    hits = np.zeros(shape, dtype=np.int32)
    for i, b in enumerate(grid):
        assert b.block_id == i
        assert grid.block(b.block_id) == b
        assert b.read_roi == b.write_roi.grow(grid.halo, grid.halo)
        hits[b.write_roi.to_slices()] += 1
    assert (hits == 1).all()
    assert len(list(grid)) == len(grid)


def test_faces_pair_each_neighbour_once() -> None:
    grid = plan_blocks(Roi.from_shape((8, 8, 8)), 4)
    faces = list(grid.faces())
    assert len(faces) == 3 * 4  # 2x2x2 grid: 4 faces per axis
    for lower, upper, axis in faces:
        assert lower.write_roi.end[axis] == upper.write_roi.begin[axis]


def test_alignment_to_chunks_and_multiple() -> None:
    roi = Roi.from_shape((64, 512, 512))
    plan_blocks(roi, (32, 256, 256), chunk_shape=(16, 128, 128), multiple=(1, 16, 16))
    with pytest.raises(GeometryError, match=r"not a multiple of the output chunk shape .* use e.g. --block-size 32,256,256"):
        plan_blocks(roi, (32, 200, 256), chunk_shape=(16, 128, 128))
    with pytest.raises(GeometryError, match="required multiple"):
        plan_blocks(roi, (32, 250, 256), multiple=(1, 16, 16))
    # a block covering a whole (short) axis needs no alignment on it
    plan_blocks(Roi.from_shape((5, 512, 512)), (8, 256, 256), chunk_shape=(4, 128, 128))
    assert round_up((5, 250), (4, 16)) == (8, 256)


def test_block_ids_are_c_order() -> None:
    grid = plan_blocks(Roi.from_shape((4, 6, 8)), (2, 3, 4))
    expected = list(itertools.product(range(2), range(2), range(2)))
    assert [b.block_index for b in grid] == expected


def test_asymmetric_halo_and_snap_give_the_read_region() -> None:
    # (lo, hi) halo: each core is read with lo voxels before it and hi after it
    grid = plan_blocks(Roi.from_shape((10, 100, 100)), (10, 64, 64), ((0, 8, 8), (0, 12, 12)))
    assert grid.halos == ((0, 8, 8), (0, 12, 12))
    for b in grid:
        assert b.read_roi == b.write_roi.grow((0, 8, 8), (0, 12, 12))
    # snap: the clipped last core (36 voxels) is read as whole 32-voxel tiles (64) before the halo
    snapped = plan_blocks(Roi.from_shape((10, 100, 100)), (10, 64, 64), ((0, 8, 8), (0, 12, 12)), snap=(1, 32, 32))
    last = snapped.block_at((0, 1, 1))
    assert last.write_roi == Roi((0, 64, 64), (10, 36, 36))
    assert last.read_roi == Roi((0, 64, 64), (10, 64, 64)).grow((0, 8, 8), (0, 12, 12))
    assert snapped.block_at((0, 0, 0)).read_roi == grid.block_at((0, 0, 0)).read_roi
    # a symmetric halo keeps the one-halo grid (and its fingerprint record)
    assert plan_blocks(Roi.from_shape((8, 8, 8)), 4, ((1, 2, 3), (1, 2, 3))).halo_hi is None
    with pytest.raises(GeometryError, match="halo must be non-negative"):
        plan_blocks(Roi.from_shape((8, 8, 8)), 4, ((0, 0, 0), (0, -1, 0)))
    with pytest.raises(GeometryError, match="snap must be positive"):
        plan_blocks(Roi.from_shape((8, 8, 8)), 4, snap=(1, 0, 1))
    with pytest.raises(GeometryError, match="expected an int or 3 ints"):
        plan_blocks(Roi.from_shape((8, 8, 8)), True)


def test_the_recorded_grid_rebuilds_the_same_blocks(tmp_path) -> None:
    from emseg.engine.ledger import Ledger, grid_of
    from emseg.engine.runner import _with_grid
    from emseg.engine.runstate import claim_stage

    grids = [plan_blocks(Roi.from_shape((6, 40, 40)), (2, 16, 16), (1, 2, 3)),
             plan_blocks(Roi.from_shape((6, 40, 40)), (2, 16, 16), ((0, 4, 4), (0, 6, 6)), snap=(1, 8, 8))]
    for k, grid in enumerate(grids):
        ledger = Ledger(tmp_path / f"out{k}.zarr", "stage")
        claim_stage(ledger, len(grid), "fingerprint", _with_grid({}, grid), overwrite=False)
        assert list(grid_of(ledger)) == list(grid)
