"""Fixtures of the agglomeration tests: a synthetic cell volume with a noisy boundary map, on disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.segmentation import find_boundaries

from emseg.cluster import connect


@pytest.fixture(scope="session")
def connection():
    """A real distributed LocalCluster with 2 worker processes, shared by these tests."""
    with connect(workers=2) as conn:
        yield conn


def cells(shape: tuple[int, int, int], n: int, seed: int, *, gaps: float = 0.15,
          noise: float = 0.08, blur: float = 0.8) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.float32]]:
    """Voronoi cells and a boundary map of them: smoothed membranes with holes and noise.

    Returns the ground-truth cells (ids 1..n) and the boundary probability (float32 in [0, 1]).
    """
    rng = np.random.default_rng(seed)
    points = rng.uniform(0, 1, size=(n, 3)) * np.asarray(shape)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    _, nearest = cKDTree(points).query(grid + 0.5)
    gt = (nearest.reshape(shape) + 1).astype(np.uint32)
    membrane = find_boundaries(gt, mode="inner").astype(np.float32)
    holes = ndimage.gaussian_filter(rng.uniform(size=shape).astype(np.float32), 2.0)
    membrane[holes < np.quantile(holes, gaps)] *= 0.3  # weak spots: fragments leak, agglomeration decides
    boundary = ndimage.gaussian_filter(membrane, blur) * 1.8 + rng.normal(0, noise, size=shape).astype(np.float32)
    return gt, np.clip(boundary, 0, 1).astype(np.float32)


@pytest.fixture
def write_prediction(tmp_path: Path) -> Callable[..., Path]:
    """Write a prediction image (c, z, y, x) as uint8 p*255 (or float affinities) and return its path."""
    from emseg.io import create_volume, mark_complete, update_status

    def write(data: npt.NDArray, name: str = "pred.zarr", chunks=(8, 16, 16), voxel_size=(1.0, 1.0, 1.0),
              outputs: tuple[str, ...] | None = None) -> Path:
        path = tmp_path / name
        if data.ndim == 3:
            data = data[None]
        if np.issubdtype(data.dtype, np.floating) and outputs is None:
            data = np.round(data * 255).astype(np.uint8)
        volume = create_volume(path, shape=data.shape[1:], dtype=data.dtype, chunks=chunks, voxel_size=voxel_size,
                               channels=data.shape[0])
        volume.write(volume.roi, data)
        update_status(path, outputs=list(outputs or ("membrane",)))
        mark_complete(path)
        return path

    return write
