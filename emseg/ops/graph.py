"""Region adjacency graph of fragments, one block at a time (numpy in, numpy out).

Edges are pairs of touching fragments ``u < v`` with statistics over their contact: the number
of voxel pairs (contact area), the sum of the affinities across it (the exact mean affinity is
``aff_sum / area``) and optionally a quantile of those affinities.

Ownership: a voxel pair ``(p, p + e_d)`` belongs to the block whose core holds the lower voxel
``p``.  A block reads its core plus one voxel on the high side of every axis and counts exactly
the pairs it owns.  When every fragment lies inside one block (fragments not merged across block
faces), all contacts of an edge ``(u, v)`` belong to one block, so every edge is computed exactly
once, complete, with no aggregation across blocks::

    core of block A   | core of block B
    . . . . . . u u u | v v . . .        the pairs (u, v) across the face are A's:
                    ^---^                 A reads its core and B's first section
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from emseg.errors import ConfigError, InvalidDataError
from emseg.geometry import Coordinate

__all__ = ["Edges", "block_edges", "check_quantile", "edge_union"]


@dataclass(frozen=True)
class Edges:
    """Edges of a region graph, sorted by ``(u, v)``, ``u < v``.

    Attributes
    ----------
    u, v : uint64 arrays
        Fragment ids of the two ends.
    area : int64 array
        Number of touching voxel pairs (face contacts).
    aff_sum : float64 array
        Sum of the affinities of those pairs; ``aff_sum / area`` is the mean affinity.
    quantile : float32 array
        The requested quantile of the contact affinities (NaN when none was asked for).
    score : float32 array
        Merge score of the hierarchical agglomeration with context (``1.0`` = never merged);
        ``1 - mean affinity`` until :func:`emseg.ops.agglomerate.merge_scores` fills it.
    """

    u: npt.NDArray[np.uint64]
    v: npt.NDArray[np.uint64]
    area: npt.NDArray[np.int64]
    aff_sum: npt.NDArray[np.float64]
    quantile: npt.NDArray[np.float32]
    score: npt.NDArray[np.float32]

    def __len__(self) -> int:
        return len(self.u)

    @property
    def mean_affinity(self) -> npt.NDArray[np.float64]:
        return self.aff_sum / np.maximum(self.area, 1)

    def with_score(self, score: npt.NDArray[np.float32]) -> Edges:
        return Edges(self.u, self.v, self.area, self.aff_sum, self.quantile, np.asarray(score, dtype=np.float32))

    def as_arrays(self) -> dict[str, npt.NDArray[Any]]:
        return {"u": self.u, "v": self.v, "area": self.area, "aff_sum": self.aff_sum, "quantile": self.quantile,
                "score": self.score}

    @classmethod
    def from_arrays(cls, arrays: Any) -> Edges:
        return cls(*(np.asarray(arrays[k]) for k in ("u", "v", "area", "aff_sum", "quantile", "score")))

    @classmethod
    def empty(cls) -> Edges:
        return cls(np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(0, np.float64),
                   np.zeros(0, np.float32), np.zeros(0, np.float32))


def check_quantile(quantile: float | None) -> float | None:
    if quantile is not None and not 0.0 <= float(quantile) <= 1.0:
        raise ConfigError(f"quantile must lie in [0, 1], got {quantile}")
    return None if quantile is None else float(quantile)


def block_edges(
    fragments: npt.NDArray[Any],
    affs: npt.NDArray[np.float32],
    core_shape: Coordinate,
    *,
    mode: Literal["3d", "2d"] = "3d",
    quantile: float | None = None,
) -> Edges:
    """The edges a block owns.

    Parameters
    ----------
    fragments : integer array (z, y, x)
        Global fragment ids (0 = none) of the block's core plus at most one voxel on the high side
        of each axis (less at the volume's end); the core starts at index (0, 0, 0).
    affs : float32 array (3, z, y, x)
        Nearest-neighbour affinities over the same region (``affs[d][p]`` joins ``p`` and ``p - e_d``).
    core_shape : (z, y, x)
        Shape of the core: pairs whose lower voxel lies in it are counted.
    mode : {"3d", "2d"}
        ``"2d"``: no edges across sections.
    quantile : float in [0, 1], optional
        Also compute this quantile (linear interpolation) of each edge's contact affinities.

    Returns
    -------
    Edges
        Sorted by ``(u, v)``; ``score`` is ``1 - mean affinity``.
    """
    quantile = check_quantile(quantile)
    shape = fragments.shape
    if affs.shape[1:] != shape or any(c > s or s > c + 1 for c, s in zip(core_shape, shape)):
        raise InvalidDataError(f"block of fragments {shape}, affinities {affs.shape[1:]} and core {core_shape} "
                               "do not fit: the region must be the core plus at most one voxel per axis")
    contacts, split = _kernels()
    first = 1 if mode == "2d" else 0
    frag = np.ascontiguousarray(fragments, dtype=np.uint64)
    aff = np.ascontiguousarray(affs[:3], dtype=np.float32)
    bounds = np.zeros(2, dtype=np.uint64)
    no_ids, no_values = np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.float32)
    args = (frag, aff, aff.view(np.uint32), *core_shape, first)
    count = contacts(*args, _COUNT, 0, 0, no_ids, no_ids, no_values, no_ids, bounds)
    if not count:
        return Edges.empty()
    low = int(bounds[0])
    span = int(bounds[1]) - low + 1
    packed = np.empty(count if span * span <= _FITS else 0, dtype=np.uint64)
    if len(packed) and contacts(*args, _PACK, low, span, no_ids, no_ids, no_values, packed, bounds) >= 0:
        # ids near each other, values non-negative: one sort of the packed (pair, value bits)
        packed.sort()
        key, bits = np.empty(count, dtype=np.int64), np.empty(count, dtype=np.uint32)
        split(packed, key, bits)
        del packed
        value = bits.view(np.float32)
        decode = _from_offsets(low, span)
    else:
        del packed
        u, v = np.empty(count, dtype=np.uint64), np.empty(count, dtype=np.uint64)
        value = np.empty(count, dtype=np.float32)
        contacts(*args, _LIST, 0, 0, u, v, value, no_ids, bounds)
        key, value, decode = _sorted_pairs(u, v, value, low, span)
    starts = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
    area = np.diff(np.append(starts, len(key))).astype(np.int64)
    aff_sum = np.add.reduceat(value.astype(np.float64), starts)
    if quantile is None:
        q = np.full(len(starts), np.nan, dtype=np.float32)
    else:
        pos = quantile * (area - 1)
        below = np.floor(pos).astype(np.int64)
        above = np.minimum(below + 1, area - 1)
        frac = (pos - below).astype(np.float32)
        q = value[starts + below] + (value[starts + above] - value[starts + below]) * frac
    out_u, out_v = decode(key[starts])
    mean = aff_sum / area
    return Edges(out_u.astype(np.uint64), out_v.astype(np.uint64), area, aff_sum, q.astype(np.float32),
                 (1.0 - mean).astype(np.float32))


_COUNT, _LIST, _PACK = 0, 1, 2
"""What :func:`_kernels`' pass over the contacts does: count them (and their id bounds), list them, pack them."""

_FITS = 2**32
"""Pairs of ids a 32-bit key tells apart (n * n for n ids)."""

_INF_BITS = np.uint32(0x7F800000)


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """The compiled passes of :func:`block_edges` (numba, cached on disk).

    ``contacts(fragments, affs, aff_bits, core_z, core_y, core_x, first_axis, op, low, n, u, v, value, packed,
    bounds)`` visits the pairs of different non-zero ids whose lower voxel lies in the core, along the axes
    from ``first_axis``, in raster order per axis, and returns their number.  ``op`` :data:`_COUNT` also
    writes the lowest and highest id of the pairs to ``bounds``; :data:`_LIST` writes each pair's lower and
    higher id and the affinity of its upper voxel to ``u``, ``v``, ``value``; :data:`_PACK` writes
    ``(u - low) * n + (v - low)`` in the high 32 bits of ``packed`` and the affinity's float bits (-0.0 as
    +0.0) in the low 32, whose order is the values' order for non-negative floats; it returns -1 on a
    negative or NaN affinity.  ``split(packed, key, bits)`` takes a packed array apart again.
    """
    import numba

    @numba.njit(cache=True, nogil=True)  # type: ignore[untyped-decorator]
    def contacts(frag: Any, affs: Any, aff_bits: Any, c0: int, c1: int, c2: int, first: int, op: int, low: int,
                 n: int, u: Any, v: Any, value: Any, packed: Any, bounds: Any) -> int:
        nz, ny, nx = frag.shape
        lowest = np.uint64(0xFFFFFFFFFFFFFFFF)
        highest = np.uint64(0)
        base = np.uint64(low)
        width = np.uint64(n)
        count = 0
        for d in range(first, 3):
            dz, dy, dx = int(d == 0), int(d == 1), int(d == 2)
            for z in range(min(c0, nz - dz)):
                for y in range(min(c1, ny - dy)):
                    for x in range(min(c2, nx - dx)):
                        a = frag[z, y, x]
                        b = frag[z + dz, y + dy, x + dx]
                        if a != b and a != 0 and b != 0:
                            lo, hi = min(a, b), max(a, b)
                            if op == 0:
                                lowest = min(lowest, lo)
                                highest = max(highest, hi)
                            elif op == 1:
                                u[count] = lo
                                v[count] = hi
                                value[count] = affs[d, z + dz, y + dy, x + dx]
                            else:
                                bits = aff_bits[d, z + dz, y + dy, x + dx]
                                if bits == 0x80000000:
                                    bits = 0
                                if bits > 0x7F800000:
                                    return -1
                                pair = (lo - base) * width + (hi - base)
                                packed[count] = (pair << np.uint64(32)) | np.uint64(bits)
                            count += 1
        if op == 0:
            bounds[0] = lowest
            bounds[1] = highest
        return count

    @numba.njit(cache=True, nogil=True)  # type: ignore[untyped-decorator]
    def split(packed: Any, key: Any, bits: Any) -> None:
        for i in range(len(packed)):
            key[i] = packed[i] >> np.uint64(32)
            bits[i] = packed[i] & np.uint64(0xFFFFFFFF)

    return contacts, split


Decode = Callable[[npt.NDArray[np.int64]], tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]]
"""Pair keys -> their ``(u, v)`` ids."""


def _from_offsets(low: int, n: int) -> Decode:
    """Keys ``(u - low) * n + (v - low)`` -> ``(u, v)``."""
    width, base = np.int64(n), np.uint64(low)

    def decode(k: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
        return (k // width).astype(np.uint64) + base, (k % width).astype(np.uint64) + base

    return decode


def _sorted_pairs(
    u: npt.NDArray[np.uint64], v: npt.NDArray[np.uint64], value: npt.NDArray[np.float32], low: int, span: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], Decode]:
    """Contacts ``(u, v, value)`` (ids in ``low .. low + span - 1``) as one int64 key per pair, sorted by
    (key, value), and the key -> ``(u, v)`` decoding.

    The key orders pairs as ``(u, v)``: from the ids' offsets in the block's id range where that range is
    small (fragment ids of one block are near each other), else from their ranks.  Where the pair needs at
    most 32 bits and the values are non-negative floats (whose bits sort like the values), key and value
    bits are packed into one uint64 and sorted in place: a plain sort, several times faster than the
    indirect sort of the two arrays (``lexsort``) it equals.
    """
    ids: npt.NDArray[np.uint64] | None = None
    if span * span > _FITS:
        ranked = np.unique(np.concatenate([u, v]))
        if len(ranked) ** 2 <= _FITS or span >= 2**31:
            ids = ranked
    decode: Decode
    if ids is None:
        n = np.int64(span)
        key = (u - np.uint64(low)).astype(np.int64) * n + (v - np.uint64(low)).astype(np.int64)
        decode = _from_offsets(low, span)
    else:
        n = np.int64(len(ids))
        key = np.searchsorted(ids, u).astype(np.int64) * n + np.searchsorted(ids, v).astype(np.int64)
        ranks = ids

        def decode(k: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
            return ranks[k // n], ranks[k % n]

    bits = (value + np.float32(0)).view(np.uint32)  # -0.0 as +0.0, which it equals
    if int(n) ** 2 <= _FITS and bool((bits <= _INF_BITS).all()):  # no sign bit, no NaN
        packed = (key.astype(np.uint64) << np.uint64(32)) | bits.astype(np.uint64)
        packed.sort()
        _, split = _kernels()
        sorted_bits = np.empty(len(packed), dtype=np.uint32)
        split(packed, key, sorted_bits)
        return key, sorted_bits.view(np.float32), decode
    order = np.lexsort((value, key))
    return key[order], value[order], decode


def edge_union(parts: list[Edges]) -> Edges:
    """Concatenate edges of several blocks (for tests and small volumes), sorted by ``(u, v)``."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return Edges.empty()
    arrays = {k: np.concatenate([p.as_arrays()[k] for p in parts]) for k in parts[0].as_arrays()}
    order = np.lexsort((arrays["v"], arrays["u"]))
    return Edges.from_arrays({k: a[order] for k, a in arrays.items()})
