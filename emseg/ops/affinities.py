"""Affinities: the common input of the region graph and the agglomeration (numpy in, numpy out).

Convention (waterz, lsd): ``affs[d][p]`` is the affinity between voxel ``p`` and its lower neighbour
``p - e_d`` along axis ``d`` (0 = z, 1 = y, 2 = x); ``affs[d]`` is 0 in the first section along
``d``, where that neighbour does not exist.  A boundary map ``b`` is turned into affinities by
``1 - max(b[p], b[p - e_d])``, so boundary models and affinity models share one code path.
Extra channels beyond the first three (long-range offsets) are kept by the caller; only the
three nearest-neighbour channels are used here.

::

    b:   . . 1 . .        aff_x[p] = 1 - max(b[p], b[p - e_x])
    ax:  0 1 0 0 1        (0 at x = 0)
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from emseg.errors import VolumeShapeError
from emseg.ops.threshold import probability

InputKind = Literal["boundary", "affinities"]
INPUT_KINDS: tuple[str, ...] = ("boundary", "affinities")
NEAREST = 3
"""Nearest-neighbour affinity channels (z, y, x) every affinity input starts with."""

__all__ = ["INPUT_KINDS", "InputKind", "affinities_from_boundary", "boundary_from_affinities", "prediction_affinities"]


def affinities_from_boundary(boundary: npt.NDArray[np.float32], *, mode: Literal["3d", "2d"] = "3d") -> npt.NDArray[np.float32]:
    """Nearest-neighbour affinities ``(3, z, y, x)`` float32 of a boundary map ``(z, y, x)`` in [0, 1].

    ``mode="2d"``: no affinity across sections (channel 0 is all zero).
    """
    b = np.asarray(boundary, dtype=np.float32)
    affs = np.zeros((3, *b.shape), dtype=np.float32)
    for d in range(3):
        if mode == "2d" and d == 0:
            continue
        if b.shape[d] < 2:
            continue
        hi = [slice(None)] * 3
        lo = [slice(None)] * 3
        hi[d] = slice(1, None)
        lo[d] = slice(None, -1)
        out = affs[d][tuple(hi)]
        np.maximum(b[tuple(hi)], b[tuple(lo)], out=out)
        np.subtract(np.float32(1.0), out, out=out)
    return affs


def boundary_from_affinities(affs: npt.NDArray[np.float32], *, mode: Literal["3d", "2d"] = "3d") -> npt.NDArray[np.float32]:
    """A boundary map ``1 - mean(nearest-neighbour affinities)`` ``(z, y, x)`` (seeds of fragments).

    ``mode="2d"`` averages the in-section channels (y, x) only.
    """
    channels = affs[1:NEAREST] if mode == "2d" else affs[:NEAREST]
    return np.subtract(np.float32(1.0), np.mean(channels, axis=0, dtype=np.float32), dtype=np.float32)


def prediction_affinities(
    data: npt.NDArray[Any], kind: InputKind, *, mode: Literal["3d", "2d"] = "3d"
) -> npt.NDArray[np.float32]:
    """Nearest-neighbour affinities ``(3, z, y, x)`` float32 of a stored prediction block.

    Parameters
    ----------
    data : array (c, z, y, x) or (z, y, x)
        The prediction as stored: uint8 ``p*255``, uint16 or float probabilities.
        ``kind="boundary"``: channel 0 (or the whole array without a channel axis) is the boundary
        probability.  ``kind="affinities"``: channels 0..2 are the z, y, x affinities.
    mode : {"3d", "2d"}
        ``"2d"``: affinities across sections are set to 0.

    Raises
    ------
    VolumeShapeError
        Affinities with fewer than 3 channels.
    """
    if kind == "boundary":
        b = data[0] if data.ndim == 4 else data
        return affinities_from_boundary(probability(b), mode=mode)
    if data.ndim != 4 or data.shape[0] < NEAREST:
        raise VolumeShapeError(f"affinities need at least {NEAREST} channels (z, y, x), got an array of shape "
                               f"{data.shape}")
    affs = np.array(probability(data[:NEAREST]), dtype=np.float32, copy=True)
    if mode == "2d":
        affs[0] = 0
    return affs
