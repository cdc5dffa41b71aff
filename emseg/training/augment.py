"""On-the-fly augmentation of training patches; numpy in, numpy out, reproducible from a Generator.

* :func:`elastic_field` / :func:`deform`: the U-Net paper's elastic deformation: random displacements
  drawn from N(0, sigma^2) on a coarse ``grid`` x ``grid`` lattice of control points, interpolated
  smoothly (cubic spline, ``scipy.ndimage.zoom(order=3)``) to a dense per-pixel field.  Every array
  of a sample is resampled with the *same* field (raw and weights linearly, labels by nearest
  neighbour), so labels stay aligned with the raw.  3D samples get one in-plane (y, x) field applied
  to every section (ssTEM is anisotropic); isotropic 3D samples get a 3D field.
* :func:`transpose_axes`: isotropic 3D only: random permutation of (z, y, x) (xy/xz/yz views).
* :func:`flip_rotate`: random flips of every axis and rot90 in (y, x) when square.
* :func:`intensity`: contrast, brightness, gamma, Gaussian noise on raw scaled to [0, 1].
* :func:`section_defects`: 3D only: missing (black) and dark sections, as in serial-section EM.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from scipy import ndimage

__all__ = ["deform", "elastic_field", "flip_rotate", "intensity", "section_defects", "transpose_axes"]

FloatArray = npt.NDArray[np.float32]


def elastic_field(shape: Sequence[int], rng: np.random.Generator, *, sigma: float = 10.0, grid: int = 3) -> FloatArray:
    """Dense displacement field ``(2, y, x)`` (or ``(3, z, y, x)``) in pixels, from a coarse random grid.

    Parameters
    ----------
    shape : (y, x) or (z, y, x)
        Field shape, pixels; a 3-value shape gives a 3D field (isotropic volumes).
    sigma : float
        Standard deviation of each control point's displacement, pixels.
    grid : int
        Control points per axis (the paper: 3 x 3).
    """
    shape = tuple(int(s) for s in shape)
    nd = len(shape)
    coarse = rng.normal(0.0, sigma, size=(nd, *([grid] * nd)))
    field = np.empty((nd, *shape), dtype=np.float32)
    for axis in range(nd):
        zoom = [s / grid for s in shape]
        dense = ndimage.zoom(coarse[axis], zoom, order=3, mode="nearest", grid_mode=True)
        field[axis] = dense[tuple(slice(0, s) for s in shape)]
    return field


def deform(array: npt.NDArray[np.generic], field: FloatArray, *, order: int) -> npt.NDArray[np.generic]:
    """Resample ``array`` (``(y, x)`` or ``(z, y, x)``, every section alike) at ``grid + field``.

    ``order=0`` (nearest) for labels, ``1`` for raw and weight maps.  Outside the array the data is
    mirrored.  The dtype is kept.
    """
    if array.ndim not in (2, 3):
        raise ValueError(f"deform expects (y, x) or (z, y, x), got shape {array.shape}")
    if field.shape[0] == 3:  # a 3D field: resample the whole volume
        if array.shape != field.shape[1:]:
            raise ValueError(f"a 3D field {field.shape[1:]} needs a volume of that shape, got {array.shape}")
        grid = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in array.shape), indexing="ij")
        coords = np.stack([g + f for g, f in zip(grid, field, strict=True)])
        return ndimage.map_coordinates(array, coords, order=order, mode="mirror")
    ys, xs = np.meshgrid(np.arange(array.shape[-2]), np.arange(array.shape[-1]), indexing="ij")
    coords = np.stack([ys + field[0], xs + field[1]])
    sections = array[None] if array.ndim == 2 else array
    out = np.stack([ndimage.map_coordinates(s, coords, order=order, mode="mirror") for s in sections])
    return out[0] if array.ndim == 2 else out


def flip_rotate(arrays: Sequence[npt.NDArray[np.generic]], rng: np.random.Generator, *, ndim: int) -> list[npt.NDArray[np.generic]]:
    """Apply one random flip/rot90 to every array (same trailing ``ndim`` spatial axes)."""
    flips = rng.random(ndim) < 0.5
    k = int(rng.integers(4))
    out = []
    for a in arrays:
        for axis in range(ndim):
            if flips[axis]:
                a = np.flip(a, axis=a.ndim - ndim + axis)
        if a.shape[-1] == a.shape[-2]:
            a = np.rot90(a, k, axes=(a.ndim - 2, a.ndim - 1))
        out.append(np.ascontiguousarray(a))
    return out


def transpose_axes(arrays: Sequence[npt.NDArray[np.generic]], rng: np.random.Generator) -> list[npt.NDArray[np.generic]]:
    """One random permutation of the last three (z, y, x) axes, the same for every array.

    For isotropic volumes: a patch is then seen in its xy, xz or yz orientation.  Arrays whose
    spatial shape is not a cube keep their axes.
    """
    perm = [int(p) for p in rng.permutation(3)]
    out = []
    for a in arrays:
        if len(set(a.shape[-3:])) == 1:
            lead = list(range(a.ndim - 3))
            a = np.ascontiguousarray(a.transpose(*lead, *(len(lead) + p for p in perm)))
        out.append(a)
    return out


def intensity(raw: FloatArray, rng: np.random.Generator) -> FloatArray:
    """Random contrast (x0.75-1.25), brightness (+-0.1), gamma (e^+-0.3), noise (sd <= 0.03); [0, 1] in and out."""
    mean = float(raw.mean())
    out = (raw - mean) * rng.uniform(0.75, 1.25) + mean + rng.uniform(-0.1, 0.1)
    out = np.clip(out, 0.0, 1.0) ** np.exp(rng.uniform(-0.3, 0.3))
    out = out + rng.normal(0.0, rng.uniform(0.0, 0.03), size=raw.shape)
    return np.asarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


def section_defects(raw: FloatArray, rng: np.random.Generator, *, prob: float) -> FloatArray:
    """Blank (missing) or darken (x0.2-0.5) each section of ``(z, y, x)`` raw with probability ``prob``."""
    raw = raw.copy()
    for z in range(raw.shape[0]):
        if rng.random() < prob:
            raw[z] = 0.0 if rng.random() < 0.5 else raw[z] * rng.uniform(0.2, 0.5)
    return raw
