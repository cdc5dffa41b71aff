"""Agglomeration of fragments: hierarchical merge scores (waterz) and a union-find that scales.

Compute only (numpy in, numpy out).

* :func:`merge_scores`: waterz's hierarchical agglomeration by mean affinity (the merge function
  of waterz and lsd, ``OneMinus<MeanAffinity>``, precompiled in the waterz wheel) over a block plus
  context, run to the end; for every queried edge ``(u, v)`` the score at which ``u`` and ``v``
  first ended up in one region (1.0 when never).  Thresholding these scores at ``t`` reproduces
  waterz's segmentation at threshold ``t`` inside the block.
* :class:`UnionFind`: a parent array over fragment ids ``0..n`` (memory O(fragments)), with
  vectorised hooking (every root hooks onto the smaller root, so a component's root is its
  smallest id, whatever the order of the edges) and pointer jumping.
* :func:`consecutive_lookup`: fragment id -> consecutive segment id ``1..N`` (0 stays 0).

waterz writes progress to file descriptor 1 (C++ ``std::cout``) and Python's ``sys.stdout``; both
are sent to ``/dev/null`` while it runs (:func:`quiet_stdout`), so nothing leaks into a command's
output.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import fastremap
import numpy as np
import numpy.typing as npt

__all__ = ["NEVER", "UnionFind", "consecutive_lookup", "merge_scores", "quiet_stdout"]

NEVER = np.float32(1.0)
"""Merge score of two fragments that the agglomeration never joined (every threshold is < 1)."""

_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved: tuple[int, Any] | None = None


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Send file descriptor 1 and ``sys.stdout`` to /dev/null (reference-counted across threads)."""
    global _quiet_depth, _quiet_saved
    with _quiet_lock:
        if _quiet_depth == 0:
            sys.stdout.flush()
            devnull = os.open(os.devnull, os.O_WRONLY)
            saved_fd = os.dup(1)
            os.dup2(devnull, 1)
            os.close(devnull)
            _quiet_saved = (saved_fd, sys.stdout)
            sys.stdout = io.StringIO()
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _quiet_saved is not None:
                saved_fd, stream = _quiet_saved
                sys.stdout = stream
                os.dup2(saved_fd, 1)
                os.close(saved_fd)
                _quiet_saved = None


def merge_scores(
    fragments: npt.NDArray[Any],
    affs: npt.NDArray[np.float32],
    u: npt.NDArray[np.uint64],
    v: npt.NDArray[np.uint64],
) -> npt.NDArray[np.float32]:
    """Hierarchical merge score of the edges ``(u, v)`` inside one region (a block plus context).

    Parameters
    ----------
    fragments : integer array (z, y, x)
        Fragment ids of the region (0 = none).
    affs : float32 array (3, z, y, x)
        Nearest-neighbour affinities of the region (waterz's convention, see
        :mod:`emseg.ops.affinities`).
    u, v : uint64 arrays
        The edges to score; fragments not in the region are never merged.

    Returns
    -------
    float32 array
        For each edge, the score ``1 - mean affinity`` of the merge that first put ``u`` and ``v``
        in one region, or :data:`NEVER` (1.0).
    """
    import waterz

    out = np.full(len(u), NEVER, dtype=np.float32)
    if not len(u) or not fragments.size:
        return out
    # waterz allocates per id up to the largest: number the region's fragments 1..n
    local, remap = fastremap.renumber(np.ascontiguousarray(fragments), preserve_zero=True, in_place=False)
    local = np.ascontiguousarray(local, dtype=np.uint64)
    n = int(max(remap.values())) if remap else 0
    if n < 2:
        return out
    with quiet_stdout():
        results = list(waterz.agglomerate(np.ascontiguousarray(affs[:3], dtype=np.float32), [float(NEVER)],
                                          fragments=local, return_merge_history=True))
    history = results[0][1]
    # union by size with link times (merge order): u and v join at the latest link on the path
    # between them in this forest (its depth is O(log n)); waterz at threshold t stops at the first
    # merge scoring >= t, so that merge's effective score is the running maximum of the scores
    level = np.maximum.accumulate(np.array([m["score"] for m in history] or [0.0], dtype=np.float32))
    par = list(range(n + 1))
    siz = [1] * (n + 1)
    when = np.full(n + 1, -1, dtype=np.int64)
    for index, merge in enumerate(history):
        ra, rb = int(merge["a"]), int(merge["b"])  # walked up to their roots
        while par[ra] != ra:
            ra = par[ra]
        while par[rb] != rb:
            rb = par[rb]
        if ra == rb:
            continue
        if siz[ra] < siz[rb] or (siz[ra] == siz[rb] and ra > rb):
            ra, rb = rb, ra
        par[rb] = ra
        siz[ra] += siz[rb]
        when[rb] = index
    parent = np.asarray(par, dtype=np.int64)
    keys = np.array(list(remap.keys()), dtype=np.uint64)
    values = np.array(list(remap.values()), dtype=np.int64)
    order = np.argsort(keys)
    keys, values = keys[order], values[order]

    def local_id(ids: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
        at = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
        return np.where(keys[at] == ids, values[at], 0)

    a, b = local_id(u), local_id(v)
    valid = (a > 0) & (b > 0)
    a, b = a[valid], b[valid]
    # depth of every node, then walk the deeper end up until both meet
    depth = np.zeros(n + 1, dtype=np.int64)
    node = np.arange(n + 1)
    while True:
        up = parent[node]
        moving = up != node
        if not moving.any():
            break
        depth += moving
        node = up
    latest = np.full(len(a), -1, dtype=np.int64)
    while True:
        apart = a != b
        step_a = apart & (depth[a] >= depth[b]) & (parent[a] != a)
        step_b = apart & (depth[b] >= depth[a]) & (parent[b] != b)
        if not (step_a.any() or step_b.any()):
            break
        latest = np.where(step_a, np.maximum(latest, when[a]), latest)
        latest = np.where(step_b, np.maximum(latest, when[b]), latest)
        a = np.where(step_a, parent[a], a)
        b = np.where(step_b, parent[b], b)
    joined = (a == b) & (latest >= 0)
    result = np.where(joined, level[np.maximum(latest, 0)], NEVER).astype(np.float32)
    out[valid] = result
    return out


class UnionFind:
    """Disjoint sets over ids ``0..n`` in one numpy array (O(n) memory, vectorised unions).

    Roots are the smallest id of their set, so the result does not depend on the order in which
    edges are added.  Id 0 is its own set.
    """

    def __init__(self, n: int) -> None:
        self.parent: npt.NDArray[np.int64] = np.arange(int(n) + 1, dtype=np.int64)

    def find(self, ids: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
        """Roots of ``ids`` (with path compression of the ids themselves)."""
        ids = np.asarray(ids, dtype=np.int64)
        roots = self.parent[ids]
        while True:
            up = self.parent[roots]
            if np.array_equal(up, roots):
                break
            roots = up
        self.parent[ids] = roots
        return roots

    def union(self, u: npt.NDArray[Any], v: npt.NDArray[Any]) -> None:
        """Join the sets of every pair ``(u[i], v[i])``."""
        u = np.asarray(u, dtype=np.int64)
        v = np.asarray(v, dtype=np.int64)
        while len(u):
            ru, rv = self.find(u), self.find(v)
            apart = ru != rv
            if not apart.any():
                break
            u, v, ru, rv = u[apart], v[apart], ru[apart], rv[apart]
            hi, lo = np.maximum(ru, rv), np.minimum(ru, rv)
            np.minimum.at(self.parent, hi, lo)

    def roots(self) -> npt.NDArray[np.int64]:
        """Root of every id ``0..n`` (compresses the whole array)."""
        parent = self.parent
        while True:
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up
        self.parent = parent
        return parent


def consecutive_lookup(roots: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.uint64], int]:
    """Fragment id -> segment id ``1..N`` from the roots of ids ``0..n`` (roots = smallest member).

    Segments are numbered in the order of their smallest fragment; ``lookup[0] == 0``.
    """
    ids = np.arange(len(roots), dtype=np.int64)
    is_root = roots == ids
    is_root[0] = False
    number = np.cumsum(is_root, dtype=np.uint64)
    lookup = number[roots]
    lookup[0] = 0
    return lookup.astype(np.uint64), int(number[-1]) if len(number) else 0
