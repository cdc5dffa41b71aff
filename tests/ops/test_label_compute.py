"""Per-block compute (emseg.segment) and stitching (emseg.ops.stitch): numpy in, numpy out."""

from __future__ import annotations

import cc3d
import numpy as np
import pytest

from emseg.errors import ConfigError, InvalidDataError
from emseg.ops import (
    WatershedParams,
    boundary_map,
    check_connectivity,
    check_threshold,
    foreground_mask,
    label_components,
    watershed_fragments,
)
from emseg.ops.stitch import (
    block_relabel_table,
    crossing_shifts,
    offsets_from_counts,
    plane_pairs,
    resolve_merges,
    select_merges,
    to_global,
)
from tests.support import assert_same_partition, blob_mask


def test_foreground_rules_on_uint8_and_float() -> None:
    values = np.array([0, 127, 128, 255], dtype=np.uint8)
    np.testing.assert_array_equal(foreground_mask(values, threshold=0.5, rule="below"), [1, 1, 0, 0])
    np.testing.assert_array_equal(foreground_mask(values, threshold=0.5, rule="above"), [0, 0, 1, 1])
    np.testing.assert_array_equal(foreground_mask(values, threshold=0.5, rule="nonzero"), [0, 1, 1, 1])
    floats = values.astype(np.float32) / 255
    np.testing.assert_array_equal(foreground_mask(floats, threshold=0.5, rule="below"), [1, 1, 0, 0])
    np.testing.assert_allclose(boundary_map(values, rule="below"), floats)
    np.testing.assert_allclose(boundary_map(floats, rule="above"), 1 - floats)
    np.testing.assert_array_equal(boundary_map(values, rule="nonzero"), [1, 0, 0, 0])


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"threshold must be a probability in \(0, 1\], got 1.5"):
        check_threshold(1.5)
    with pytest.raises(ConfigError, match=r"connectivity must be one of \(6, 18, 26\) in 3d mode, got 8"):
        check_connectivity(8, "3d")
    with pytest.raises(InvalidDataError, match="NaN"):
        boundary_map(np.array([np.nan, 0.2], dtype=np.float32), rule="below")
    with pytest.raises(ConfigError, match="seeds must be one of"):
        WatershedParams(seeds="maxima")  # type: ignore[arg-type]


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_label_components_is_cc3d(connectivity: int) -> None:
    mask = blob_mask((12, 20, 24), seed=1)
    labels, n = label_components(mask, connectivity=connectivity)
    expected, n_expected = cc3d.connected_components(mask, connectivity=connectivity, return_N=True)
    assert labels.dtype == np.uint32 and n == n_expected
    assert_same_partition(labels, expected)


def test_label_components_2d_labels_every_section_alone() -> None:
    mask = np.ones((3, 4, 4), dtype=bool)
    labels, n = label_components(mask, connectivity=26, mode="2d")
    assert n == 3
    assert [len(np.unique(section)) for section in labels] == [1, 1, 1]
    assert len(np.unique(labels)) == 3


def test_offsets_are_an_exclusive_prefix_sum() -> None:
    offsets = offsets_from_counts([3, 0, 5])
    assert offsets.dtype == np.uint64
    np.testing.assert_array_equal(offsets, [0, 3, 3, 8])


def test_crossing_shifts_per_connectivity_and_mode() -> None:
    assert crossing_shifts(0, 6) == ((0, 0),)
    assert len(crossing_shifts(1, 18)) == 5
    assert len(crossing_shifts(2, 26)) == 9
    assert crossing_shifts(0, 26, "2d") == ()
    assert set(crossing_shifts(1, 26, "2d")) == {(0, -1), (0, 0), (0, 1)}  # plane axes (z, x): no z shift


def test_plane_pairs_and_global_ids() -> None:
    lower = to_global(np.array([[1, 0], [0, 2]], dtype=np.uint32), (2, 1), np.array([[10, 20], [0, 0]], np.uint64))
    np.testing.assert_array_equal(lower, [[11, 0], [0, 22]])
    upper = np.array([[31, 0], [0, 0]], dtype=np.uint64)
    pairs, contacts = plane_pairs(lower, upper, [(0, 0)])
    np.testing.assert_array_equal(pairs, [[11, 31]])
    pairs, contacts = plane_pairs(lower, upper, crossing_shifts(0, 26))
    np.testing.assert_array_equal(pairs, [[11, 31], [22, 31]])  # 22 touches 31 diagonally only
    np.testing.assert_array_equal(contacts, [1, 1])


def test_select_merges_needs_a_large_contact() -> None:
    lower = np.array([[1, 1, 1, 1, 2, 2, 2, 2]], dtype=np.uint64)
    upper = np.array([[5, 5, 5, 5, 5, 6, 6, 6]], dtype=np.uint64)
    pairs, contacts = plane_pairs(lower, upper, [(0, 0)])
    kept = select_merges(pairs, contacts, lower, upper, min_fraction=0.5)
    np.testing.assert_array_equal(kept, [[1, 5], [2, 6]])  # 2-5 touch through one voxel of four


def test_union_find_and_block_tables_number_segments_consecutively() -> None:
    # three blocks with 3, 2, 4 fragments; 2~4, 4~7, 5~9 merge
    offsets = offsets_from_counts([3, 2, 4])
    merges = resolve_merges(np.array([[2, 4], [7, 4], [5, 9]], dtype=np.uint64), int(offsets[-1]))
    assert merges.n_segments == 9 - 3
    final = merges.final_ids(np.arange(10, dtype=np.uint64))
    np.testing.assert_array_equal(final, [0, 1, 2, 3, 2, 4, 5, 2, 6, 4])
    starts = np.searchsorted(merges.merged_ids, offsets, side="right")
    for b in range(3):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        table = block_relabel_table(lo, hi - lo, int(starts[b]), merges.merged_ids[starts[b]:starts[b + 1]],
                                    merges.merged_final[starts[b]:starts[b + 1]])
        np.testing.assert_array_equal(table[1:], final[lo + 1: hi + 1])
        assert table[0] == 0


def test_watershed_separates_touching_cells_along_the_membrane() -> None:
    boundary = np.zeros((8, 16, 16), dtype=np.float32)
    boundary[:, :, 8] = 1.0  # a membrane splitting the volume in two along x
    labels, n = watershed_fragments(boundary, WatershedParams(seeds="minima"))
    assert n == 2
    assert len(np.unique(labels[:, :, :8])) == 1 and len(np.unique(labels[:, :, 9:])) == 1
    assert labels[0, 0, 0] != labels[0, 0, 15]


def test_size_filter_merges_small_fragments_into_neighbours() -> None:
    boundary = np.zeros((1, 32, 32), dtype=np.float32)
    boundary[0, :, 16] = 1.0
    boundary[0, 4:7, 3:6] = 1.0  # a small ring-free speck: its minimum becomes a tiny pocket
    boundary[0, 5, 4] = 0.0
    params = WatershedParams(seeds="minima", min_size=4)
    labels, n = watershed_fragments(boundary, params, mode="2d")
    unfiltered, n_unfiltered = watershed_fragments(boundary, WatershedParams(seeds="minima"), mode="2d")
    assert n_unfiltered == 3 and n == 2
    assert labels.min() >= 1
