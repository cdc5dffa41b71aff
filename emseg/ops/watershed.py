"""Seeded watershed of a boundary map, with seeds and a size filter: numpy in, numpy out.

Seeds come from the maxima of the distance transform of the foreground (``seeds="distance"``, the
usual choice for thick membranes and binary masks) or from the low-boundary minima of the map
(``seeds="minima"``).  The boundary map itself is flooded (:func:`skimage.segmentation.watershed`),
so fragments meet along its ridges.  Fragments smaller than ``min_size`` voxels are removed and
flooded again from their neighbours.

Every voxel of the block receives a fragment (no background) unless the block holds no seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import edt
import fastremap
import numpy as np
import numpy.typing as npt
from scipy import ndimage
from skimage.segmentation import watershed

from emseg.errors import ConfigError
from emseg.geometry import Coordinate
from emseg.ops.components import Mode, label_components, local_dtype

SeedMethod = Literal["distance", "minima"]
SEED_METHODS: tuple[str, ...] = ("distance", "minima")

__all__ = ["SEED_METHODS", "SeedMethod", "WatershedParams", "absorb_boundary_only", "filter_small", "find_seeds", "watershed_fragments"]


@dataclass(frozen=True)
class WatershedParams:
    """Parameters of the seeded watershed.

    Attributes
    ----------
    threshold : float
        Boundary probability below which a voxel is object interior (seeds, face stitching).
    seeds : {"distance", "minima"}
        Seed maxima of the interior's distance transform, or minima of the boundary map.
    min_distance : int
        Radius, in voxels along the finest axis, of the neighbourhood in which a seed is a maximum
        (minimum); larger values give fewer, larger fragments.
    min_size : int
        Fragments smaller than this (voxels) are merged into their neighbours (0: keep all).
    sigma : float
        Gaussian smoothing (voxels) of the boundary map before ``seeds="minima"`` (0: none).
    """

    threshold: float = 0.5
    seeds: SeedMethod = "distance"
    min_distance: int = 3
    min_size: int = 0
    sigma: float = 0.0

    def __post_init__(self) -> None:
        if self.seeds not in SEED_METHODS:
            raise ConfigError(f"seeds must be one of {SEED_METHODS}, got {self.seeds!r}")
        if self.min_distance < 1:
            raise ConfigError(f"min_distance must be at least 1 voxel, got {self.min_distance}")
        if self.min_size < 0:
            raise ConfigError(f"min_size must be non-negative (voxels), got {self.min_size}")
        if self.sigma < 0:
            raise ConfigError(f"sigma must be non-negative (voxels), got {self.sigma}")

    def footprint(self, mode: Mode, voxel_size: Sequence[float] = (1.0, 1.0, 1.0)) -> Coordinate:
        """Window (voxels, z, y, x) of the seed maxima/minima filter; ``z = 1`` in 2D mode."""
        finest = min(voxel_size)
        radius = [max(1, round(self.min_distance * finest / v)) for v in voxel_size]
        if mode == "2d":
            radius[0] = 0
        return tuple(2 * r + 1 for r in radius)

    def halo(self, mode: Mode, voxel_size: Sequence[float] = (1.0, 1.0, 1.0)) -> Coordinate:
        """Context (voxels, z, y, x) a block reads around its core: the seed window and smoothing
        twice over, so that fragments at a core face match those of the neighbouring block."""
        smooth = math.ceil(3 * self.sigma)
        return tuple(0 if (mode == "2d" and axis == 0) else 2 * (f // 2) + smooth + 2
                     for axis, f in enumerate(self.footprint(mode, voxel_size)))


def _struct(mode: Mode) -> npt.NDArray[np.bool_]:
    """Face connectivity for flooding (in-section only in 2D mode)."""
    struct: npt.NDArray[np.bool_] = np.asarray(ndimage.generate_binary_structure(3, 1), dtype=bool)
    if mode == "2d":
        struct[0] = struct[2] = False
    return struct


def find_seeds(
    boundary: npt.NDArray[np.float32],
    params: WatershedParams,
    *,
    mode: Mode = "3d",
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
) -> tuple[npt.NDArray[Any], int]:
    """Seed labels ``1..n`` (0 elsewhere) of a boundary map ``(z, y, x)``."""
    foreground = boundary < params.threshold
    size = params.footprint(mode, voxel_size)
    if params.seeds == "distance":
        if mode == "2d":
            dist = np.stack([edt.edt(section, anisotropy=tuple(voxel_size[1:]), black_border=False, parallel=1)
                             for section in foreground]) if foreground.size else foreground.astype(np.float32)
        else:
            dist = edt.edt(foreground, anisotropy=tuple(voxel_size), black_border=False, parallel=1)
        peaks = (dist == ndimage.maximum_filter(dist, size=size, mode="nearest")) & foreground
    else:
        smooth = boundary
        if params.sigma > 0:
            sigma = (0.0, params.sigma, params.sigma) if mode == "2d" else params.sigma
            smooth = ndimage.gaussian_filter(boundary, sigma=sigma, mode="nearest")
        peaks = (smooth == ndimage.minimum_filter(smooth, size=size, mode="nearest")) & foreground
    # face connectivity: a plateau must not leak diagonally through a one-voxel membrane
    return label_components(peaks, connectivity=6, mode=mode)


def _reflood(
    labels: npt.NDArray[Any], drop: npt.NDArray[Any], elevation: npt.NDArray[np.float32], mode: Mode
) -> npt.NDArray[Any]:
    """Remove the fragments ``drop`` and flood their voxels from the remaining neighbours."""
    drop = drop[drop != 0]
    if not drop.size:
        return labels
    markers = fastremap.mask(labels, drop.tolist())
    if not markers.any():  # nothing would be left to flood from
        return labels
    flooded: npt.NDArray[Any] = watershed(  # type: ignore[no-untyped-call]
        elevation, markers=markers, connectivity=_struct(mode))
    return flooded.astype(labels.dtype, copy=False)


def _renumber(labels: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], int]:
    labels, remap = fastremap.renumber(labels, in_place=True, preserve_zero=True)
    n = int(max(remap.values())) if remap else 0
    return labels.astype(local_dtype(labels.size), copy=False), n


def filter_small(
    labels: npt.NDArray[Any], elevation: npt.NDArray[np.float32], min_size: int, *, mode: Mode = "3d"
) -> tuple[npt.NDArray[Any], int]:
    """Merge fragments smaller than ``min_size`` voxels into their neighbours (by flooding again).

    Fragments touching the array's border are kept whatever their size: they may continue beyond
    it.  Returns consecutive labels ``1..n`` and ``n``.
    """
    if min_size > 1 and labels.size:
        sizes = np.bincount(labels.ravel())
        border = np.zeros(sizes.shape, dtype=bool)
        for axis in range(labels.ndim):
            if mode == "2d" and axis == 0:  # sections are segmented on their own
                continue
            for index in (0, -1):
                border[np.unique(np.take(labels, index, axis=axis))] = True
        labels = _reflood(labels, np.flatnonzero((sizes < min_size) & (sizes > 0) & ~border), elevation, mode)
    return _renumber(labels)


def absorb_boundary_only(
    labels: npt.NDArray[Any], elevation: npt.NDArray[np.float32], threshold: float, *, mode: Mode = "3d"
) -> tuple[npt.NDArray[Any], int]:
    """Flood fragments that hold no interior voxel (``elevation < threshold``) from their neighbours.

    Cropping a block's watershed to its core leaves slivers of membrane belonging to cells whose
    interior lies in the halo; they would never match across a face.  Returns labels ``1..n``, ``n``.
    """
    if labels.size:
        interior = np.bincount(labels[elevation < threshold], minlength=int(labels.max()) + 1)
        present = np.bincount(labels.ravel(), minlength=len(interior))
        labels = _reflood(labels, np.flatnonzero((present > 0) & (interior == 0)), elevation, mode)
    return _renumber(labels)


def watershed_fragments(
    boundary: npt.NDArray[np.float32],
    params: WatershedParams,
    *,
    mode: Mode = "3d",
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
) -> tuple[npt.NDArray[Any], int]:
    """Fragments of a boundary map ``(z, y, x)`` in [0, 1]: seeded watershed plus size filter.

    Parameters
    ----------
    boundary : float32 array (z, y, x)
        Boundary (membrane) probability; its ridges separate fragments.
    mode : {"3d", "2d"}
        ``"2d"`` segments every section on its own (seeds, flooding and the size filter).
    voxel_size : (z, y, x) floats
        Anisotropy of the distance transform and of the seed window.

    Returns
    -------
    labels : uint32 array (z, y, x), ids ``1..n`` (0 only where the block holds no seed)
    n : int
    """
    seeds, n_seeds = find_seeds(boundary, params, mode=mode, voxel_size=voxel_size)
    if n_seeds == 0:
        return np.zeros(boundary.shape, dtype=local_dtype(boundary.size)), 0
    labels = watershed(boundary, markers=seeds, connectivity=_struct(mode))  # type: ignore[no-untyped-call]
    return filter_small(labels.astype(seeds.dtype, copy=False), boundary, params.min_size, mode=mode)
