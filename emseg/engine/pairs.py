"""Pairs of global ids found by workers (face matches), kept in storage instead of on the client.

``OUT/emseg_state/pairs/<stage>/<block_id // 4096>/<block_id>.npy``: one uint64 ``(k, 2)`` array
per block that found any pair, written atomically (temporary file + rename) so that a block killed
mid-write leaves no partial file.  The client streams them back in id order
(:func:`iter_pairs`) into :func:`emseg.ops.stitch.resolve_merges_streamed` and never holds them all.
They stay beside the completion records (a rerun that must relabel a damaged block redoes the
union-find from them) and go when the output is overwritten.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from emseg.engine.ledger import STATE_GROUP
from emseg.io.location import Location, PathOrUrl, exists, location, write_bytes

PAIRS_DIR = "pairs"
FANOUT = 4096

__all__ = ["iter_pairs", "pairs_path", "write_pairs"]


def pairs_path(output: PathOrUrl, stage: str, block_id: int) -> Location:
    return location(output) / STATE_GROUP / PAIRS_DIR / stage / str(block_id // FANOUT) / f"{block_id}.npy"


def write_pairs(output: PathOrUrl, stage: str, block_id: int, pairs: npt.NDArray[np.uint64]) -> int:
    """Store a block's pairs (an empty array removes an old file); the number of pairs."""
    path = pairs_path(output, stage, block_id)
    pairs = np.ascontiguousarray(pairs, dtype=np.uint64).reshape(-1, 2)
    if not len(pairs):
        if exists(path):
            path.unlink()
        return 0
    buffer = io.BytesIO()
    np.save(buffer, pairs)
    write_bytes(path, buffer.getvalue())  # atomic: a rename on disk, one PUT on object storage
    return len(pairs)


def iter_pairs(output: PathOrUrl, stage: str, block_ids: npt.NDArray[np.int64]
               ) -> Iterator[npt.NDArray[np.uint64]]:
    """The pairs of ``block_ids`` (those that reported pairs), one block at a time."""
    for block_id in block_ids.tolist():
        yield np.load(io.BytesIO(pairs_path(output, stage, block_id).read_bytes()))
