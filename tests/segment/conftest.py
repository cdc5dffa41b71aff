"""Fixtures of the labelling tests: one LocalCluster for the session, volumes written to tmp_path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy.typing as npt
import pytest

from emseg.cluster import connect


@pytest.fixture(scope="session")
def connection():
    """A real distributed LocalCluster with 2 worker processes, shared by the labelling tests."""
    with connect(workers=2) as conn:
        yield conn


@pytest.fixture
def write_zarr(tmp_path: Path) -> Callable[..., Path]:
    """Write an array ``(z, y, x)`` or ``(c, z, y, x)`` as a finished OME-Zarr image; return its path."""
    from emseg.io import create_volume, mark_complete

    def write(data: npt.NDArray, name: str = "pred.zarr", chunks=(8, 8, 8), voxel_size=(1.0, 1.0, 1.0)) -> Path:
        path = tmp_path / name
        channels = data.shape[0] if data.ndim == 4 else None
        shape = data.shape[-3:]
        volume = create_volume(path, shape=shape, dtype=data.dtype, chunks=tuple(min(c, s) for c, s in zip(chunks, shape)),
                               voxel_size=voxel_size, channels=channels)
        volume.write(volume.roi, data)
        mark_complete(path)
        return path

    return write
