"""Checks shared by the labelling tests (imported as a plain module: tests/ is not a package)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import ndimage


def blob_mask(shape, seed: int, sigma: float = 1.5, level: float = 0.5) -> npt.NDArray[np.bool_]:
    """Seeded smoothed noise, thresholded: many components of all sizes crossing block faces."""
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.random(shape), sigma) > level


def assert_same_partition(labels: npt.NDArray, reference: npt.NDArray) -> None:
    """Same background and a bijection between the nonzero ids (ids may be numbered differently)."""
    np.testing.assert_array_equal(labels == 0, reference == 0)
    fg = reference != 0
    pairs = np.unique(np.stack([labels[fg].astype(np.uint64), reference[fg].astype(np.uint64)], axis=1), axis=0)
    n_labels = len(np.unique(labels[fg]))
    n_reference = len(np.unique(reference[fg]))
    assert n_labels == n_reference, f"{n_labels} segments, expected {n_reference}"
    assert len(pairs) == n_reference, f"{len(pairs) - n_reference} segments are split or merged"


def assert_consecutive_uint64(labels: npt.NDArray, n_segments: int) -> None:
    assert labels.dtype == np.uint64
    ids = np.unique(labels)
    ids = ids[ids != 0]
    np.testing.assert_array_equal(ids, np.arange(1, n_segments + 1, dtype=np.uint64))
