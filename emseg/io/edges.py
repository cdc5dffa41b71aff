"""Storage of a region graph and of fragment -> segment lookups, beside the fragments.

Layout inside the fragments label image ``F`` (e.g. ``OUT.zarr/labels/fragments``)::

    F/graph/blocks/<block_id>.npz     the edges block <block_id> owns (u, v, area, aff_sum,
                                      quantile, score), written atomically (temp file + rename)
    F/graph/lookup_<name>             1-D uint64 zarr arrays: fragment id -> segment id

One small file per block keeps every write independent (no two workers touch one object) and
lets the global step stream the graph block by block; nothing gathers it whole.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import zarr

__all__ = ["GRAPH_DIR", "graph_dir", "lookup_path", "open_lookup", "read_block_edges", "remove_graph",
           "write_block_edges", "write_lookup"]

GRAPH_DIR = "graph"


def graph_dir(fragments: str | os.PathLike[str]) -> Path:
    return Path(fragments) / GRAPH_DIR


def _block_file(fragments: str | os.PathLike[str], block_id: int) -> Path:
    return graph_dir(fragments) / "blocks" / f"{int(block_id)}.npz"


def write_block_edges(fragments: str | os.PathLike[str], block_id: int, arrays: Mapping[str, npt.NDArray[Any]]) -> None:
    """Write one block's edge arrays (replacing an earlier attempt); atomic on POSIX filesystems."""
    target = _block_file(fragments, block_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".npz", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            # numpy's stub matches **kwds against its allow_pickle: bool parameter
            np.savez(f, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_block_edges(
    fragments: str | os.PathLike[str], block_id: int, fields: tuple[str, ...] | None = None
) -> dict[str, npt.NDArray[Any]]:
    """One block's edge arrays (all fields, or only ``fields``)."""
    with np.load(_block_file(fragments, block_id)) as data:
        return {k: np.asarray(data[k]) for k in (fields or tuple(data.files))}


def remove_graph(fragments: str | os.PathLike[str]) -> None:
    shutil.rmtree(graph_dir(fragments), ignore_errors=True)


def lookup_path(fragments: str | os.PathLike[str], name: str) -> Path:
    return graph_dir(fragments) / f"lookup_{name}"


def write_lookup(path: str | os.PathLike[str], lookup: npt.NDArray[np.uint64], *, attrs: Mapping[str, Any],
                 chunk: int = 1 << 20) -> None:
    """Store a fragment -> segment lookup as a 1-D uint64 zarr array; ``attrs`` are written last
    (a reader checks them to know the array is complete)."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    array = zarr.create_array(str(path), shape=lookup.shape, chunks=(max(1, min(chunk, len(lookup))),),
                              dtype=np.uint64, fill_value=0)
    array[:] = lookup
    array.attrs.update(dict(attrs))


def lookup_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Attributes of a stored lookup (``{}`` when there is none)."""
    try:
        return dict(zarr.open_array(str(path), mode="r").attrs)
    except (FileNotFoundError, zarr.errors.ArrayNotFoundError, zarr.errors.NodeTypeValidationError):
        return {}


def open_lookup(path: str | os.PathLike[str]) -> Any:
    """The stored lookup, opened lazily: ``lookup[a:b]`` reads only that range."""
    return zarr.open_array(str(path), mode="r")
