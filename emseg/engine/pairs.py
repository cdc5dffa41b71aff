"""Pairs of global ids found by workers (face matches), kept in storage instead of on the client.

``OUT/emseg_state/pairs/<stage>/<block_id // 4096>/<block_id>.npy``: one uint64 ``(k, 2)`` array
per block that found any pair, written atomically (temporary file + rename) so that a block killed
mid-write leaves no partial file.  The client streams them back in id order
(:func:`iter_pairs`) into :func:`emseg.ops.stitch.resolve_merges_streamed` and never holds them all.
They stay beside the completion records (a rerun that must relabel a damaged block redoes the
union-find from them) and go when the output is overwritten.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt

from emseg.engine.ledger import STATE_GROUP

PAIRS_DIR = "pairs"
FANOUT = 4096

__all__ = ["iter_pairs", "pairs_path", "write_pairs"]


def pairs_path(output: str | os.PathLike[str], stage: str, block_id: int) -> Path:
    return Path(output) / STATE_GROUP / PAIRS_DIR / stage / str(block_id // FANOUT) / f"{block_id}.npy"


def write_pairs(output: str | os.PathLike[str], stage: str, block_id: int, pairs: npt.NDArray[np.uint64]) -> int:
    """Store a block's pairs (an empty array removes an old file); the number of pairs."""
    path = pairs_path(output, stage, block_id)
    pairs = np.ascontiguousarray(pairs, dtype=np.uint64).reshape(-1, 2)
    if not len(pairs):
        path.unlink(missing_ok=True)
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    with tmp.open("wb") as f:
        np.save(f, pairs)
    os.replace(tmp, path)
    return len(pairs)


def iter_pairs(output: str | os.PathLike[str], stage: str, block_ids: npt.NDArray[np.int64]
               ) -> Iterator[npt.NDArray[np.uint64]]:
    """The pairs of ``block_ids`` (those that reported pairs), one block at a time."""
    for block_id in block_ids.tolist():
        yield np.load(pairs_path(output, stage, block_id))
