"""Tiny OME-Zarr fixtures for the downstream tools: raw, an emseg-like output, labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from emseg.io import create_labels, create_volume, mark_complete


def _blobs(shape: tuple[int, int, int], seed: int, n_ids: int = 12) -> np.ndarray:
    """Piecewise-constant labels: the nearest of ``n_ids`` random seeds (plus a zero region)."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 1, (n_ids, 3)) * np.array(shape)
    grid = np.stack(np.meshgrid(*(np.arange(s) + 0.5 for s in shape), indexing="ij"), axis=-1)
    dist = ((grid[..., None, :] - centres) ** 2).sum(-1)
    ids = rng.choice(np.arange(1, 10_000, dtype=np.uint64), n_ids, replace=False)
    labels = ids[dist.argmin(-1)]
    labels[: shape[0] // 4, : shape[1] // 4] = 0
    return labels.astype(np.uint64)


@pytest.fixture
def raw_image(tmp_path: Path) -> Path:
    """``raw.zarr``: 20x48x40 uint8, voxel size 8,4,4 nm."""
    rng = np.random.default_rng(1)
    vol = create_volume(tmp_path / "raw.zarr", shape=(20, 48, 40), dtype=np.uint8, chunks=(8, 16, 16),
                        voxel_size=(8.0, 4.0, 4.0))
    vol.write(vol.roi, rng.integers(0, 256, vol.shape, dtype=np.uint8))
    mark_complete(tmp_path / "raw.zarr")
    return tmp_path / "raw.zarr"


@pytest.fixture
def output_image(tmp_path: Path, raw_image: Path) -> Path:
    """``out.zarr`` like ``emseg segment`` writes: prediction (c=2) at 0, labels/segments, source recorded."""
    rng = np.random.default_rng(2)
    out = tmp_path / "out.zarr"
    pred = create_volume(out, shape=(20, 48, 40), dtype=np.uint8, chunks=(8, 16, 16), voxel_size=(8.0, 4.0, 4.0),
                         channels=2, extra_attrs={"source": str(raw_image)})
    pred.write(pred.roi, rng.integers(0, 256, (2, *pred.shape), dtype=np.uint8))
    seg = create_labels(out, "segments")
    seg.write(seg.roi, _blobs(seg.shape, seed=3))
    mark_complete(out)
    mark_complete(out / "labels" / "segments")
    return out


@pytest.fixture
def blob_labels():
    return _blobs
