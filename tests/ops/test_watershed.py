"""Seeded flooding and the cheap small-fragment merge against scikit-image's watershed."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.segmentation import watershed

from emseg.ops.watershed import (
    WatershedParams,
    find_seeds,
    flood,
    merge_into_neighbours,
    quantize,
    watershed_fragments,
)


def _boundary(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A membrane-like map: ridges of smoothed noise, quantized like a uint8 prediction."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), (0.0, 3.0, 3.0))
    ridges = ndimage.gaussian_gradient_magnitude(noise, 1.0)
    return (np.rint(ridges / ridges.max() * 255) / 255).astype(np.float32)


@pytest.mark.parametrize("mode", ["2d", "3d"])
def test_flood_agrees_with_skimage(mode: str) -> None:
    boundary = _boundary((4, 96, 96), 0)
    seeds, n = find_seeds(boundary, WatershedParams(threshold=0.3, seeds="minima"), mode=mode)  # type: ignore[arg-type]
    assert n > 10
    ours = flood(boundary, seeds, mode=mode)  # type: ignore[arg-type]
    struct = ndimage.generate_binary_structure(3, 1)
    if mode == "2d":
        struct[0] = struct[2] = False
    theirs = watershed(boundary, markers=seeds, connectivity=struct)
    assert ours.dtype == seeds.dtype and ours.min() >= 1  # every voxel reached
    np.testing.assert_array_equal(ours[seeds > 0], seeds[seeds > 0])
    # same flooding order up to ties inside a level (skimage lets a lower voxel jump the queue)
    assert (ours == theirs).mean() > 0.97
    if mode == "2d":  # no section floods into another
        for z in range(boundary.shape[0]):
            assert set(np.unique(ours[z])) <= set(np.unique(seeds[z])) - {0}


def test_flood_leaves_sections_without_seeds_empty() -> None:
    boundary = np.zeros((2, 8, 8), dtype=np.float32)
    seeds = np.zeros((2, 8, 8), dtype=np.uint32)
    seeds[0, 2, 2] = 1
    out = flood(boundary, seeds, mode="2d")
    assert (out[0] == 1).all() and (out[1] == 0).all()
    assert (flood(boundary, seeds, mode="3d") == 1).all()
    assert not flood(boundary, np.zeros_like(seeds), mode="3d").any()


def test_quantize_keeps_uint8_levels_exact() -> None:
    values = np.arange(256, dtype=np.uint8)
    levels = quantize((values / 255).astype(np.float32))
    assert levels.dtype == np.uint16 and np.array_equal(np.argsort(levels, kind="stable"), np.arange(256))
    assert len(np.unique(levels)) == 256


def test_merge_into_neighbours_picks_the_largest_contact() -> None:
    labels = np.array([[[1, 1, 1, 2, 2],
                        [1, 3, 3, 2, 2],
                        [1, 3, 2, 2, 2],
                        [4, 4, 4, 4, 4]]], dtype=np.uint32)
    drop = np.zeros(5, dtype=bool)
    drop[3] = True  # 3 touches 1 on three faces, 2 on two, 4 on two
    out = merge_into_neighbours(labels, drop, mode="2d")
    assert out.dtype == labels.dtype
    np.testing.assert_array_equal(out[labels == 3], 1)
    np.testing.assert_array_equal(out[labels != 3], labels[labels != 3])
    # a chain of dropped fragments ends at a kept one
    drop[1] = True
    out = merge_into_neighbours(labels, drop, mode="2d")
    assert set(np.unique(out)) == {2, 4}


def test_watershed_fragments_size_filter_leaves_no_small_inner_fragment() -> None:
    boundary = _boundary((2, 128, 128), 1)
    labels, n = watershed_fragments(boundary, WatershedParams(threshold=0.3, seeds="minima", min_size=30), mode="2d")
    assert np.array_equal(np.unique(labels), np.arange(1, n + 1))
    sizes = np.bincount(labels.ravel())
    border = np.zeros(len(sizes), dtype=bool)
    for section in labels:
        border[np.concatenate([section[0], section[-1], section[:, 0], section[:, -1]])] = True
    assert not ((sizes < 30) & (sizes > 0) & ~border).any()
