"""Nodes are opened with the zarr format they are stored in (no probing of the other format's objects)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from emseg.io import open_volume
from emseg.io.location import zarr_format_at


def test_the_stored_format_of_groups_and_arrays_and_none_where_nothing_is(tmp_path: Path) -> None:
    for fmt in (2, 3):
        group = zarr.open_group(str(tmp_path / f"g{fmt}.zarr"), mode="w", zarr_format=fmt)
        group.create_array("a", shape=(4,), dtype="uint8")
        assert zarr_format_at(tmp_path / f"g{fmt}.zarr") == fmt
        assert zarr_format_at(tmp_path / f"g{fmt}.zarr" / "a") == fmt
    assert zarr_format_at(tmp_path / "missing.zarr") is None
    assert zarr_format_at(tmp_path) is None  # a folder that is no zarr node


def test_volumes_of_both_formats_open_and_read_alike(tmp_path: Path) -> None:
    data = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8)
    for fmt in (2, 3):
        path = tmp_path / f"v{fmt}.zarr"
        zarr.open_array(str(path), mode="w", shape=data.shape, chunks=(1, 8, 8), dtype="uint8", zarr_format=fmt)[:] = data
        volume = open_volume(path)
        assert np.array_equal(volume.read(volume.roi), data)
