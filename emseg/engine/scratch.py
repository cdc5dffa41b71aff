"""Scratch arrays of multi-stage runs, kept inside the output next to the completion markers.

``OUT/emseg_state/scratch/<name>``: plain zarr arrays (3-D block data such as label fragments, or
1-D tables such as per-block offsets).  They are compressed for speed (lz4), reused when a rerun
resumes, and removed with :func:`remove_scratch` once the run is complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import zarr
from zarr.codecs import BloscCodec

from emseg.engine.ledger import STATE_GROUP
from emseg.io.location import Location, PathOrUrl, exists, location, open_zarr_array, open_zarr_group, remove_tree
from emseg.io.volume import Volume, open_volume

SCRATCH_GROUP = "scratch"

__all__ = ["Table", "read_table", "read_table_at", "remove_scratch", "require_scratch", "scratch_path", "write_table"]


def scratch_path(output: PathOrUrl, name: str) -> Location:
    """Where the scratch array ``name`` of ``output`` lives."""
    return location(output) / STATE_GROUP / SCRATCH_GROUP / name


def require_scratch(
    output: PathOrUrl,
    name: str,
    *,
    shape: Sequence[int],
    dtype: npt.DTypeLike,
    chunks: Sequence[int],
) -> Volume:
    """Open the 3-D scratch array ``name``, creating it (zero-filled) unless one of this very
    shape, dtype and chunking exists already (a resumed run keeps what finished blocks wrote)."""
    path = scratch_path(output, name)
    group = _state_group(output).require_group(SCRATCH_GROUP)
    shape_t, chunks_t, dtype_n = tuple(int(s) for s in shape), tuple(int(c) for c in chunks), np.dtype(dtype)
    if name in group:
        old = group[name]
        if isinstance(old, zarr.Array) and old.shape == shape_t and old.chunks == chunks_t and old.dtype == dtype_n:
            return open_volume(path, mode="r+")
        del group[name]
    group.create_array(name, shape=shape_t, chunks=chunks_t, dtype=dtype_n, fill_value=0,
                       compressors=_fast_codec(group.metadata.zarr_format))
    return open_volume(path, mode="r+")


def _state_group(output: PathOrUrl) -> zarr.Group:
    """``OUT/emseg_state``, made through the output's own group so that it has the output's zarr format
    (opened on its own, a missing one would be made as zarr v3 inside a v2 output)."""
    return open_zarr_group(output, mode="a").require_group(STATE_GROUP)


def _fast_codec(zarr_format: int) -> Any:
    """lz4 at level 1 with bit shuffling: label ids compress well and fast."""
    if zarr_format == 3:
        return BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle")
    from numcodecs import Blosc

    return Blosc(cname="lz4", clevel=1, shuffle=Blosc.BITSHUFFLE)


def write_table(output: PathOrUrl, name: str, data: npt.NDArray[Any], *, chunk: int = 1 << 16) -> None:
    """Store a 1-D table (replacing any previous one)."""
    group = _state_group(output).require_group(SCRATCH_GROUP)
    if name in group:
        del group[name]
    data = np.ascontiguousarray(data).reshape(-1)
    array = group.create_array(name, shape=data.shape, chunks=(max(1, min(chunk, len(data))),), dtype=data.dtype,
                               fill_value=0)
    if len(data):
        array[:] = data


def read_table(output: PathOrUrl, name: str, start: int = 0, stop: int | None = None) -> npt.NDArray[Any]:
    """Entries ``start:stop`` of a 1-D table."""
    array = open_zarr_array(scratch_path(output, name), mode="r")
    stop = int(array.shape[0]) if stop is None else int(stop)
    if stop <= start:
        return np.zeros(0, dtype=array.dtype)
    return np.asarray(array[int(start):stop])


def read_table_at(output: PathOrUrl, name: str, indices: Sequence[int]) -> npt.NDArray[Any]:
    """Entries of a 1-D table at ``indices`` (any order)."""
    array = open_zarr_array(scratch_path(output, name), mode="r")
    return np.asarray(array.get_coordinate_selection(np.asarray(indices, dtype=np.int64)))


class Table:
    """An open 1-D scratch table: ``table[i]`` / ``table[i:j]`` / ``table.at(indices)`` read entries."""

    def __init__(self, output: PathOrUrl, name: str) -> None:
        self._array = open_zarr_array(scratch_path(output, name), mode="r")

    def __len__(self) -> int:
        return int(self._array.shape[0])

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice) and key.start is not None and key.stop is not None and key.stop <= key.start:
            return np.zeros(0, dtype=self._array.dtype)
        return np.asarray(self._array[key])

    def at(self, indices: Sequence[int]) -> npt.NDArray[Any]:
        return np.asarray(self._array.get_coordinate_selection(np.asarray(indices, dtype=np.int64)))


def remove_scratch(output: PathOrUrl) -> None:
    """Delete every scratch array of ``output`` (the completion markers stay)."""
    path = location(output) / STATE_GROUP / SCRATCH_GROUP
    if exists(path):
        group = _state_group(output)
        del group[SCRATCH_GROUP]
        remove_tree(path)
