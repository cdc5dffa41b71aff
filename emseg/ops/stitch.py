"""Making per-block labels one global segmentation: offsets, face matching, union-find, relabel tables.

Compute only (numpy in, numpy out); :mod:`emseg.workflows.label` runs it blockwise.

The scheme, for blocks labelled independently with local ids ``1..count_b``:

1. **offsets**: ``global = local + offsets[b]`` with ``offsets`` the exclusive prefix sum of the
   per-block counts (:func:`offsets_from_counts`), so ids are unique with no packing limit.
2. **face pairs**: for each boundary between two block rows along an axis, the last section of
   the lower blocks and the first section of the upper ones are compared voxel by voxel, along
   every neighbourhood offset that crosses the boundary (:func:`crossing_shifts`: one for 6-
   connectivity, nine for 26, which also catches block edges and corners), giving pairs of global
   ids that touch (:func:`plane_pairs`).
3. **union-find** over those pairs (:func:`resolve_merges`, scipy's graph connected components):
   every id merged into a smaller one of its component is recorded with its final id.
   :func:`resolve_merges_streamed` does the same over pairs streamed from storage in batches,
   holding only the merged ids (16 bytes each, 64-bit ids), never all pairs.
4. **relabel**: final ids are consecutive ``1..N``; a block's lookup table
   (:func:`block_relabel_table`) needs only its offset and the merged ids in its own id range.

::

      block (i, j)            block (i, j+1)
    +------------+  +------------+
    |        ..a |  | b..        |    a (global) touches b across the face
    |        ..a |  | b..        |    -> pair (a, b) -> one component -> one final id
    +------------+  +------------+
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from emseg.geometry import Coordinate

__all__ = [
    "MergeTable",
    "block_relabel_table",
    "crossing_shifts",
    "offsets_from_counts",
    "plane_pairs",
    "relabel_block",
    "resolve_merges",
    "resolve_merges_streamed",
    "select_merges",
    "to_global",
    "unique_pairs",
]

_REACH = {6: 1, 18: 2, 26: 3, 4: 1, 8: 2}


def offsets_from_counts(counts: Sequence[int] | npt.NDArray[Any]) -> npt.NDArray[np.uint64]:
    """Exclusive prefix sum of per-block label counts, length ``n_blocks + 1`` (uint64).

    ``offsets[b]`` is added to block ``b``'s local ids; ``offsets[-1]`` is the number of fragments.
    """
    out = np.zeros(len(counts) + 1, dtype=np.uint64)
    np.cumsum(np.asarray(counts, dtype=np.uint64), out=out[1:])
    return out


def crossing_shifts(axis: int, connectivity: int, mode: str = "3d") -> tuple[Coordinate, ...]:
    """In-plane shifts ``(s, t)`` of the neighbourhood offsets that step +1 along ``axis``.

    The plane holds the two other axes in order.  A voxel at ``p`` in the last section below the
    boundary touches ``p + (s, t)`` in the first section above it.  6-connectivity gives
    ``((0, 0),)``, 18 adds the four face-diagonals, 26 all nine.  In ``mode="2d"`` sections do not
    touch along z: nothing crosses axis 0 and shifts never move along z.
    """
    if mode == "2d" and axis == 0:
        return ()
    reach = _REACH[connectivity]
    others = [a for a in range(3) if a != axis]
    shifts = []
    for s, t in itertools.product((-1, 0, 1), repeat=2):
        if 1 + abs(s) + abs(t) > reach:
            continue
        if mode == "2d" and ((others[0] == 0 and s) or (others[1] == 0 and t)):
            continue
        shifts.append((s, t))
    return tuple(shifts)


def to_global(
    local: npt.NDArray[Any], splits: Sequence[int], offsets: npt.NDArray[np.uint64]
) -> npt.NDArray[np.uint64]:
    """Local ids of a 2D plane that spans up to 2 x 2 blocks -> global ids (0 stays 0).

    ``splits[k]`` is where the second block starts along plane axis ``k`` (the plane's size when it
    spans one block); ``offsets[i, j]`` is the offset of the block at that quadrant.
    """
    out = local.astype(np.uint64)
    s0, s1 = splits
    for i, rows in enumerate((slice(0, s0), slice(s0, None))):
        for j, cols in enumerate((slice(0, s1), slice(s1, None))):
            part = out[rows, cols]
            if part.size:
                part[part != 0] += offsets[i, j]
    return out


def plane_pairs(
    lower: npt.NDArray[np.uint64], upper: npt.NDArray[np.uint64], shifts: Sequence[Coordinate]
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
    """Pairs of nonzero ids that touch across a boundary, with their number of voxel contacts.

    ``lower[p]`` touches ``upper[p + shift]`` for every shift.  Pairs of equal ids are dropped.

    Returns
    -------
    pairs : uint64 array (k, 2), unique rows ``(lower id, upper id)``
    contacts : int64 array (k,)
    """
    found = []
    n0, n1 = lower.shape
    for s, t in shifts:
        lo = lower[max(0, -s): n0 - max(0, s), max(0, -t): n1 - max(0, t)]
        up = upper[max(0, s): n0 - max(0, -s), max(0, t): n1 - max(0, -t)]
        keep = (lo != 0) & (up != 0) & (lo != up)
        if keep.any():
            found.append(np.stack([lo[keep], up[keep]], axis=1))
    if not found:
        return np.zeros((0, 2), dtype=np.uint64), np.zeros(0, dtype=np.int64)
    return unique_pairs(np.concatenate(found), counts=True)


def unique_pairs(pairs: npt.NDArray[Any], *, counts: bool = False) -> Any:
    """Unique rows of a ``(k, 2)`` id array in (first, second) order, as uint64 (with their counts).

    Rows are packed into one 64-bit key when the ids span less than ``2**32`` (always within a
    face): a 1-D sort, several times faster than ``np.unique(axis=0)``, which sorts rows as records.
    """
    pairs = np.asarray(pairs).reshape(-1, 2)
    if not len(pairs):
        empty = np.zeros((0, 2), dtype=np.uint64)
        return (empty, np.zeros(0, dtype=np.int64)) if counts else empty
    pairs = pairs.astype(np.uint64, copy=False)
    low, high = int(pairs.min()), int(pairs.max())
    if high - low < 2**32:
        keys = (pairs[:, 0] - np.uint64(low)) << np.uint64(32)
        keys |= pairs[:, 1] - np.uint64(low)
        if counts:
            keys, n = np.unique(keys, return_counts=True)
        else:
            keys = np.unique(keys)
        out = np.empty((len(keys), 2), dtype=np.uint64)
        np.right_shift(keys, np.uint64(32), out=out[:, 0])
        np.bitwise_and(keys, np.uint64(2**32 - 1), out=out[:, 1])
        out += np.uint64(low)
        return (out, n.astype(np.int64)) if counts else out
    if counts:
        rows, n = np.unique(pairs, axis=0, return_counts=True)
        return rows, n.astype(np.int64)
    return np.unique(pairs, axis=0)


def select_merges(
    pairs: npt.NDArray[np.uint64],
    contacts: npt.NDArray[np.int64],
    lower: npt.NDArray[np.uint64],
    upper: npt.NDArray[np.uint64],
    *,
    min_fraction: float,
) -> npt.NDArray[np.uint64]:
    """Keep the pairs whose contact covers ``min_fraction`` of the smaller of the two face areas.

    A face area is the number of a fragment's (interior) voxels in its own section (``lower`` or
    ``upper``).  An object crossing the face gives a fraction near 1; two objects leaking into
    each other through a few voxels of a weak boundary give a small one.
    """
    if not len(pairs):
        return pairs
    ids_lo, area_lo = np.unique(lower[lower != 0], return_counts=True)
    ids_up, area_up = np.unique(upper[upper != 0], return_counts=True)
    a = area_lo[np.searchsorted(ids_lo, pairs[:, 0])]
    b = area_up[np.searchsorted(ids_up, pairs[:, 1])]
    keep = contacts >= np.maximum(1.0, min_fraction * np.minimum(a, b))
    return pairs[keep]


@dataclass(frozen=True)
class MergeTable:
    """Result of the union-find: which global ids were merged, and every final id.

    Attributes
    ----------
    merged_ids : uint64 array, sorted
        Global ids that are not the smallest of their component.
    merged_final : uint64 array
        Final (consecutive) id of each merged id.
    n_segments : int
        Number of final segments ``N`` (final ids are ``1..N``).
    """

    merged_ids: npt.NDArray[np.uint64]
    merged_final: npt.NDArray[np.uint64]
    n_segments: int

    def final_ids(self, global_ids: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        """Final id of any global ids (for checks; blocks use :func:`block_relabel_table`)."""
        ids = np.asarray(global_ids, dtype=np.uint64)
        out = ids - np.searchsorted(self.merged_ids, ids, side="left").astype(np.uint64)
        hit = np.searchsorted(self.merged_ids, ids)
        inside = hit < len(self.merged_ids)
        match = np.zeros(ids.shape, dtype=bool)
        match[inside] = self.merged_ids[hit[inside]] == ids[inside]
        out[match] = self.merged_final[hit[match]]
        out[ids == 0] = 0
        return out


def resolve_merges(pairs: npt.NDArray[np.uint64], n_fragments: int) -> MergeTable:
    """Union-find over pairs of global ids ``1..n_fragments`` (scipy graph connected components).

    Each component keeps its smallest id as representative.  The final id of a representative
    ``g`` is ``g`` minus the number of merged ids below it, which numbers the representatives
    ``1..N`` in order; a merged id takes its representative's final id.
    """
    pairs = np.asarray(pairs, dtype=np.uint64).reshape(-1, 2)
    if not len(pairs):
        empty = np.zeros(0, dtype=np.uint64)
        return MergeTable(empty, empty, int(n_fragments))
    nodes, inverse = np.unique(pairs, return_inverse=True)
    inverse = inverse.reshape(-1, 2)
    graph = sparse.coo_array((np.ones(len(inverse), dtype=np.int8), (inverse[:, 0], inverse[:, 1])),
                             shape=(len(nodes), len(nodes)))
    _, component = connected_components(graph, directed=False)
    # nodes are sorted, so the first node of each component is its smallest id
    _, first = np.unique(component, return_index=True)
    representative = nodes[first][component]
    merged = nodes != representative
    merged_ids = nodes[merged]
    reps = representative[merged]
    merged_final = reps - np.searchsorted(merged_ids, reps, side="left").astype(np.uint64)
    return MergeTable(merged_ids, merged_final, int(n_fragments) - len(merged_ids))


def _merge_table(merged_ids: npt.NDArray[np.uint64], reps: npt.NDArray[np.uint64], n_fragments: int) -> MergeTable:
    merged_final = reps - np.searchsorted(merged_ids, reps, side="left").astype(np.uint64)
    return MergeTable(merged_ids, merged_final, int(n_fragments) - len(merged_ids))


def _lookup(ids: npt.NDArray[np.uint64], keys: npt.NDArray[np.uint64], values: npt.NDArray[np.uint64]
            ) -> npt.NDArray[np.uint64]:
    """``values[keys == id]`` where ``id`` is in the sorted ``keys``, else ``id`` itself."""
    if not len(keys):
        return ids
    at = np.searchsorted(keys, ids)
    at[at == len(keys)] = 0
    hit = keys[at] == ids
    return np.where(hit, values[at], ids)


def resolve_merges_streamed(
    batches: Iterable[npt.NDArray[np.uint64]], n_fragments: int, *, batch_pairs: int = 1 << 16
) -> MergeTable:
    """:func:`resolve_merges` over pairs that arrive in batches (e.g. read block by block from storage).

    The state is the forest of merged ids only: sorted ``ids`` (uint64) and the smallest id of
    each one's component (``rep``), 16 bytes per merged fragment.  A batch of pairs (grown to at
    least ``batch_pairs`` or the state's size, which keeps the total work linear) is mapped onto
    current representatives, its components found with scipy (indices within the batch), and the
    state updated: each old representative that joined a smaller one is re-pointed, and so is
    every id pointing at it.  Representatives are always roots, so one lookup resolves any id.
    The result equals :func:`resolve_merges` of all pairs at once.
    """
    ids = np.zeros(0, dtype=np.uint64)
    rep = np.zeros(0, dtype=np.uint64)
    pending: list[npt.NDArray[np.uint64]] = []
    held = 0

    def absorb(pairs: npt.NDArray[np.uint64]) -> None:
        nonlocal ids, rep
        pairs = _lookup(pairs.reshape(-1), ids, rep).reshape(-1, 2)
        pairs = pairs[pairs[:, 0] != pairs[:, 1]]
        if not len(pairs):
            return
        nodes, inverse = np.unique(pairs, return_inverse=True)
        del pairs
        root = _batch_reps(nodes, inverse.reshape(-1, 2))  # smallest id of each batch component
        moved = nodes != root
        new_ids, new_rep = nodes[moved], root[moved]
        del nodes, root, moved, inverse
        rep = _lookup(rep, new_ids, new_rep)  # ids pointing at a representative that moved
        # new_ids are batch nodes, i.e. roots before this batch: none of them is in ids yet
        ids = np.concatenate([ids, new_ids])
        rep = np.concatenate([rep, new_rep])
        order = np.argsort(ids, kind="stable")
        ids, rep = ids[order], rep[order]

    for arrived in batches:
        arrived = np.asarray(arrived, dtype=np.uint64).reshape(-1, 2)
        step = max(batch_pairs, len(ids))
        for start in range(0, len(arrived), step):  # a big part in slices: temporaries stay ~6x a slice
            part = arrived[start: start + step]
            pending.append(part)
            held += len(part)
            if held >= max(batch_pairs, len(ids)):
                absorb(np.concatenate(pending) if len(pending) > 1 else pending[0])
                pending, held = [], 0
    if pending:
        absorb(np.concatenate(pending) if len(pending) > 1 else pending[0])
    return _merge_table(ids, rep, n_fragments)


def _batch_reps(nodes: npt.NDArray[np.uint64], edges: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
    """Smallest node of each node's component (``nodes`` sorted, ``edges`` index pairs into it)."""
    graph = sparse.coo_array((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])),
                             shape=(len(nodes), len(nodes)))
    _, component = connected_components(graph, directed=False)
    _, first = np.unique(component, return_index=True)
    return nodes[first][component]


def block_relabel_table(
    offset: int, count: int, start: int, merged_ids: npt.NDArray[np.uint64], merged_final: npt.NDArray[np.uint64]
) -> npt.NDArray[np.uint64]:
    """Lookup table local id -> final id for one block (``table[0] == 0``).

    Parameters
    ----------
    offset, count : int
        The block's global id offset and number of local ids.
    start : int
        Number of merged ids below the block's range (``searchsorted(merged_ids, offset, "right")``).
    merged_ids, merged_final : uint64 arrays
        The part of :class:`MergeTable` inside ``(offset, offset + count]``.
    """
    table = np.arange(count + 1, dtype=np.uint64) + np.uint64(offset)
    table -= (np.searchsorted(merged_ids, table, side="left") + start).astype(np.uint64)
    if len(merged_ids):
        table[(merged_ids - np.uint64(offset)).astype(np.int64)] = merged_final
    table[0] = 0
    return table


def relabel_block(local: npt.NDArray[Any], table: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """Apply a lookup table to a block of local ids: a uint64 block of final ids."""
    return np.take(table, local)
