"""Storage of a region graph and of fragment -> segment lookups, beside the fragments.

Layout inside the fragments label image ``F`` (e.g. ``OUT.zarr/labels/fragments``)::

    F/graph/blocks/<block_id>.npz     the edges block <block_id> owns (u, v, area, aff_sum,
                                      quantile, score), written atomically (temp file + rename)
    F/graph/lookup_<name>             1-D uint64 zarr arrays: fragment id -> segment id

One small file per block keeps every write independent (no two workers touch one object) and
lets the global step stream the graph block by block; nothing gathers it whole.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import zarr

from emseg.io.location import Location, PathOrUrl, exists, location, open_zarr_array, remove_tree, write_bytes

__all__ = ["GRAPH_DIR", "graph_dir", "lookup_path", "open_lookup", "read_block_edges", "remove_graph",
           "write_block_edges", "write_lookup"]

GRAPH_DIR = "graph"


def graph_dir(fragments: PathOrUrl) -> Location:
    return location(fragments) / GRAPH_DIR


def _block_file(fragments: PathOrUrl, block_id: int) -> Location:
    return graph_dir(fragments) / "blocks" / f"{int(block_id)}.npz"


def write_block_edges(fragments: PathOrUrl, block_id: int, arrays: Mapping[str, npt.NDArray[Any]]) -> None:
    """Write one block's edge arrays (replacing an earlier attempt); atomic (rename on a filesystem,
    one PUT on object storage)."""
    buffer = io.BytesIO()
    # numpy's stub matches **kwds against its allow_pickle: bool parameter
    np.savez(buffer, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]
    write_bytes(_block_file(fragments, block_id), buffer.getvalue())


def read_block_edges(
    fragments: PathOrUrl, block_id: int, fields: tuple[str, ...] | None = None
) -> dict[str, npt.NDArray[Any]]:
    """One block's edge arrays (all fields, or only ``fields``)."""
    with np.load(io.BytesIO(_block_file(fragments, block_id).read_bytes())) as data:
        return {k: np.asarray(data[k]) for k in (fields or tuple(data.files))}


def remove_graph(fragments: PathOrUrl) -> None:
    remove_tree(graph_dir(fragments))


def lookup_path(fragments: PathOrUrl, name: str) -> Location:
    return graph_dir(fragments) / f"lookup_{name}"


def write_lookup(path: PathOrUrl, lookup: npt.NDArray[np.uint64], *, attrs: Mapping[str, Any],
                 chunk: int = 1 << 20) -> None:
    """Store a fragment -> segment lookup as a 1-D uint64 zarr array; ``attrs`` are written last
    (a reader checks them to know the array is complete)."""
    path = location(path)
    if exists(path):
        remove_tree(path)
    array = zarr.create_array(str(path), shape=lookup.shape, chunks=(max(1, min(chunk, len(lookup))),),
                              dtype=np.uint64, fill_value=0)
    array[:] = lookup
    array.attrs.update(dict(attrs))


def lookup_attrs(path: PathOrUrl) -> dict[str, Any]:
    """Attributes of a stored lookup (``{}`` when there is none)."""
    try:
        return dict(open_zarr_array(path, mode="r").attrs)
    except (FileNotFoundError, zarr.errors.ArrayNotFoundError, zarr.errors.NodeTypeValidationError):
        return {}


def open_lookup(path: PathOrUrl) -> Any:
    """The stored lookup, opened lazily: ``lookup[a:b]`` reads only that range."""
    return open_zarr_array(path, mode="r")
