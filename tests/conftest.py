"""Shared fixtures: the real EM data beside the repo and small seeded volumes on disk."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real EM); the tests that use it fail loudly if it is missing."""
    assert SHARED_DATA.is_dir(), f"real EM data expected at {SHARED_DATA} (see README)"
    return SHARED_DATA


@pytest.fixture
def make_volume(tmp_path: Path) -> Callable[..., Path]:
    """Write a finished OME-Zarr image of seeded random data and return its path."""
    from emseg.io import create_volume, mark_complete

    def make(name: str = "vol.zarr", shape=(16, 32, 32), dtype="uint8", chunks=(8, 16, 16),
             voxel_size=(40.0, 4.0, 4.0), seed: int = 0, zarr_format: int = 3) -> Path:
        rng = np.random.default_rng(seed)
        data = rng.integers(0, 255, size=shape).astype(dtype)
        path = tmp_path / name
        volume = create_volume(path, shape=shape, dtype=dtype, chunks=chunks, voxel_size=voxel_size,
                               zarr_format=zarr_format)
        volume.write(volume.roi, data)
        mark_complete(path)
        return path

    return make


def tree_digest(path: Path) -> str:
    """Hash of every file (name and bytes) below ``path``: proves an input was left untouched."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        digest.update(str(f.relative_to(path.parent)).encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()
