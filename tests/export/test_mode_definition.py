"""Mode downsampling gives what the plain definition gives: the most frequent label of
each group, ties to the smallest non-zero label, background only when strictly the most frequent."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from emseg.export.pyramid import downsample_mode


def mode_by_definition(labels: np.ndarray, factor: tuple[int, ...]) -> np.ndarray:
    """Group by group, in plain Python (a partial group at the end repeats its last voxel)."""
    pad = [(0, (-s) % f) for s, f in zip(labels.shape, factor)]
    data = np.pad(labels, pad, mode="edge")
    out = np.zeros(tuple(s // f for s, f in zip(data.shape, factor)), dtype=labels.dtype)
    for index in np.ndindex(out.shape):
        group = data[tuple(slice(i * f, (i + 1) * f) for i, f in zip(index, factor))].ravel().tolist()
        most = max(group.count(v) for v in group)
        winners = [v for v in group if group.count(v) == most and v != 0]
        out[index] = min(winners) if winners else 0
    return out


@pytest.mark.parametrize("dtype", [np.uint64, np.uint32, np.uint8, np.int32, np.int64, np.bool_])
def test_mode_equals_the_definition_for_every_factor(dtype: type) -> None:
    rng = np.random.default_rng(7)
    few = 2 if dtype == np.bool_ else 4  # few distinct values: ties and background in many groups
    labels = rng.integers(0, few, size=(5, 9, 11)).astype(dtype)
    if dtype in (np.int32, np.int64):
        labels = labels - 1  # a negative label too
    if dtype == np.uint64:
        labels[labels == 3] = np.uint64(2**63 + 5)  # beyond int64
    for factor in itertools.product((1, 2), repeat=3):
        got = downsample_mode(labels, factor)
        assert got.dtype == labels.dtype
        np.testing.assert_array_equal(got, mode_by_definition(labels, factor), err_msg=f"factor {factor}")


def test_a_section_is_downsampled_like_a_one_section_volume() -> None:
    labels = np.random.default_rng(3).integers(0, 5, size=(13, 6)).astype(np.uint64)
    np.testing.assert_array_equal(downsample_mode(labels, (2, 2)), downsample_mode(labels[None], (1, 2, 2))[0])
