"""Fixtures for the inference tests: tiny random-weight checkpoints, smooth volumes, one Dask cluster."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from emseg.models import build, save_checkpoint


def tiny_model(ndim: int = 3, padding: str = "valid", in_channels: int = 1, out_channels: int = 1,
               seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return build("unet", ndim=ndim, in_channels=in_channels, out_channels=out_channels, base_channels=2,
                 depth=2, padding=padding).eval()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``checkpoints(ndim, padding, ...)``: a saved tiny U-Net, cached per session."""
    root = tmp_path_factory.mktemp("checkpoints")
    made: dict[tuple[Any, ...], Path] = {}

    def get(ndim: int = 3, padding: str = "valid", in_channels: int = 1, out_channels: int = 1,
            activation: str = "sigmoid", seed: int = 0) -> Path:
        key = (ndim, padding, in_channels, out_channels, activation, seed)
        if key not in made:
            model = tiny_model(ndim, padding, in_channels, out_channels, seed)
            outputs = tuple(f"out{i}" for i in range(out_channels))
            made[key] = save_checkpoint(model, root / "-".join(map(str, key)), outputs=outputs,
                                        activation=activation, normalization={"mean": 0.4, "std": 0.3})  # type: ignore[arg-type]
        return made[key]

    return get


def smooth_volume(shape: tuple[int, ...], seed: int = 0, dtype: str = "uint8") -> np.ndarray:
    """Seeded random data, lightly smoothed so that the model sees structure."""
    rng = np.random.default_rng(seed)
    x = rng.random(shape)
    for axis in range(-3, 0):
        x = (x + np.roll(x, 1, axis) + np.roll(x, -1, axis)) / 3
    x = (x - x.min()) / (x.max() - x.min())
    if dtype == "uint8":
        return (x * 255).astype(np.uint8)
    if dtype == "uint16":
        return (x * 65535).astype(np.uint16)
    return x.astype(dtype)


@pytest.fixture
def write_volume(tmp_path: Path) -> Callable[..., Path]:
    """Write a finished OME-Zarr image holding ``data`` (``(z, y, x)`` or ``(c, z, y, x)``)."""
    from emseg.io import create_volume, mark_complete

    def write(data: np.ndarray, name: str = "vol.zarr", chunks: tuple[int, ...] = (8, 16, 16),
              voxel_size: tuple[float, ...] = (40.0, 4.0, 4.0)) -> Path:
        path = tmp_path / name
        channels = data.shape[0] if data.ndim == 4 else None
        volume = create_volume(path, shape=data.shape[-3:], dtype=data.dtype, chunks=chunks, voxel_size=voxel_size,
                               offset_nm=(80.0, 8.0, 4.0), channels=channels)
        volume.write(volume.roi, data)
        mark_complete(path)
        return path

    return write


@pytest.fixture(scope="session")
def cluster2() -> Iterator[Any]:
    """A real LocalCluster of 2 single-threaded worker processes, shared by the session."""
    from emseg.cluster import connect

    with connect(workers=2) as connection:
        yield connection


@pytest.fixture(scope="session")
def cluster1() -> Iterator[Any]:
    """A real LocalCluster of 1 worker process."""
    from emseg.cluster import connect

    with connect(workers=1) as connection:
        yield connection
