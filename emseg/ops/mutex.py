"""Mutex watershed fragments from (long-range) affinities (mwatershed): numpy in, numpy out.

Affinities ``(C, z, y, x)`` in [0, 1]: channel ``c`` at voxel ``p`` is the affinity of ``p`` and
``p + offsets[c]`` (the checkpoint convention: ``(-1, 0, 0)`` is ``aff_z``).  The mutex watershed
(Wolf et al. 2018, as implemented by ``mwatershed``) processes all edges by decreasing
``|affinity - bias|``: attractive ones (``affinity > bias``) merge unless a repulsive one forbids
it.  Long-range channels mostly repel, which is what separates cells that touch through a weak
membrane; nearest-neighbour channels alone give an under-segmentation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import fastremap
import numpy as np
import numpy.typing as npt

from emseg.errors import ConfigError
from emseg.geometry import Coordinate
from emseg.ops.components import local_dtype

__all__ = ["check_offsets", "mutex_fragments", "offsets_halo"]


def check_offsets(offsets: Sequence[Sequence[int]], channels: int) -> tuple[Coordinate, ...]:
    """Offsets as tuples of 3 ints, one per channel (the first ``len(offsets)`` channels are used)."""
    out = tuple(tuple(int(v) for v in o) for o in offsets)
    if not out or any(len(o) != 3 for o in out):
        raise ConfigError(f"offsets must be (z, y, x) triples, one per affinity channel, got {offsets!r}")
    if len(out) > channels:
        raise ConfigError(f"{len(out)} offsets but the affinities have {channels} channels")
    if any(not any(o) for o in out):
        raise ConfigError("an offset of (0, 0, 0) joins a voxel with itself")
    return out  # type: ignore[return-value]


def offsets_halo(offsets: Sequence[Coordinate], mode: Literal["3d", "2d"] = "3d") -> Coordinate:
    """Context (voxels, z, y, x) a block reads for its mutex watershed: the longest offset + 1 per axis."""
    reach = [max(abs(o[a]) for o in offsets) + 1 for a in range(3)]
    if mode == "2d":
        reach[0] = 0
    return tuple(reach)  # type: ignore[return-value]


def mutex_fragments(
    affs: npt.NDArray[np.float32],
    offsets: Sequence[Coordinate],
    *,
    bias: float = 0.5,
    long_range_bias: float | None = None,
    mode: Literal["3d", "2d"] = "3d",
) -> tuple[npt.NDArray[Any], int]:
    """Mutex watershed of affinities ``(C, z, y, x)``: labels ``1..n`` (uint32 unless huge) and ``n``.

    Parameters
    ----------
    affs : float array (C, z, y, x) in [0, 1]
        One channel per offset (extra channels are ignored).
    offsets : (z, y, x) triples
        Partner offset of each channel.
    bias : float
        Nearest-neighbour edges attract when their affinity exceeds this.
    long_range_bias : float, optional
        The same for longer offsets (default: ``bias``); raise it to split more.
    mode : {"3d", "2d"}
        ``"2d"``: channels whose offset moves along z are dropped, so sections stay apart.
    """
    import mwatershed

    keep = [c for c, o in enumerate(offsets) if not (mode == "2d" and o[0] != 0)]
    if not keep:
        raise ConfigError("no in-section affinity channel for 2-D mutex watershed")
    far = long_range_bias if long_range_bias is not None else bias
    weights = np.empty((len(keep), *affs.shape[1:]), dtype=np.float64)
    for i, c in enumerate(keep):
        nearest = sum(abs(v) for v in offsets[c]) == 1
        weights[i] = affs[c].astype(np.float64) - (bias if nearest else far)
    labels = mwatershed.agglom(weights, [list(offsets[c]) for c in keep])
    labels, remap = fastremap.renumber(np.ascontiguousarray(labels), preserve_zero=True, in_place=True)
    n = int(max(remap.values())) if remap else 0
    return labels.astype(local_dtype(labels.size), copy=False), n
