"""Synthetic EM-like volumes with exact instance ground truth, computed block by block.

The volume is a pure function of the global voxel coordinate, the seed and :class:`SynthParams`,
so any block can be computed on its own and is bit-identical to the same region of a
whole-volume computation.  This is what lets :func:`write_synth` make volumes larger than RAM.

Recipe (all lengths in nm; positions are voxel centres, ``(index + 0.5) * voxel_size``)
---------------------------------------------------------------------------------------
* **Cells.**  Physical space is cut into cubes of ``cell_size`` nm (the *cell grid*); each cube
  holds one seed, jittered inside it.  A voxel belongs to the nearest seed among the 27 cubes
  around its own (a Voronoi tessellation with the physical, hence anisotropic-in-voxels, metric).
  The cell of grid index ``(i, j, k)`` has label ``1 + ravel((i, j, k), grid_shape)``; 0 is unused.
* **Membranes.**  The distance from a voxel to the bisector plane between its nearest and
  second-nearest seed is its distance to the cell boundary.  Voxels closer than half of
  ``membrane_thickness`` (modulated by a slow noise) are membrane and are drawn dark.
  *The ground truth keeps every voxel labelled with its cell id*, membranes included (dense
  instance labels); the membrane mask is returned separately by :func:`synth_block`.
* **Organelles.**  Mitochondria-like dark ellipsoids with a darker rim, and small vesicles
  (dark rings), are drawn inside their own cell only; they do not change the labels.
* **Texture, blur, noise.**  Smooth value noise modulates the cytoplasm, the image is blurred
  with a Gaussian of ``blur_sigma`` nm (computed on the block grown by the kernel radius and
  cropped), and per-voxel noise is added.

Randomness never comes from an RNG stream: every random number is a counter-based hash
(splitmix64) of ``(seed, what, where)``, e.g. ``(seed, "jitter-z", cell index)`` or
``(seed, "noise", z, y, x)``.  Only IEEE-exact arithmetic (``+ - * /``, ``sqrt``, ``floor``) is
used per voxel, so results do not depend on block shape, SIMD paths or thread count.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from emseg.engine.lock import locked
from emseg.errors import ConfigError, GeometryError
from emseg.geometry import Block, Coordinate, Roi, as_coordinate, plan_blocks, round_up

__all__ = [
    "SynthBlock",
    "SynthParams",
    "cell_grid_shape",
    "synth_block",
    "synth_volume",
    "write_synth",
]

logger = logging.getLogger(__name__)

LABEL_NAME = "ground_truth"
"""Name of the label image :func:`write_synth` writes under ``DST/labels/``."""


@dataclass(frozen=True, slots=True)
class SynthParams:
    """Appearance of a synthetic volume.  Lengths are in nm; intensities are fractions of 255.

    Parameters
    ----------
    voxel_size : tuple of float
        Voxel size ``(z, y, x)`` in nm, e.g. ``(40, 4, 4)`` for anisotropic serial-section EM.
    cell_size : float
        Spacing of the cell seeds in nm: the mean cell diameter.
    jitter : float
        How far seeds wander inside their grid cube, 0 (regular lattice) to 1 (anywhere).
    membrane_thickness : float
        Full width of the dark band between two cells in nm (two membranes plus the cleft).
    membrane_variation : float
        Relative slow variation of the membrane thickness, 0 to <1.
    mito_per_cell : float
        Mean number of mitochondria per cell.
    vesicles_per_cell : float
        Mean number of vesicles per cell.
    blur_sigma : float
        Standard deviation of the Gaussian blur in nm (per axis ``blur_sigma / voxel_size``).
    texture : float
        Amplitude of the smooth cytoplasm texture (fraction of full scale).
    texture_scale : float
        Feature size of the texture in nm.
    noise : float
        Standard deviation of the per-voxel noise (fraction of full scale).
    """

    voxel_size: tuple[float, float, float] = (8.0, 8.0, 8.0)
    cell_size: float = 320.0
    jitter: float = 0.8
    membrane_thickness: float = 24.0
    membrane_variation: float = 0.3
    mito_per_cell: float = 0.7
    vesicles_per_cell: float = 3.0
    blur_sigma: float = 6.0
    texture: float = 0.06
    texture_scale: float = 40.0
    noise: float = 0.05

    def __post_init__(self) -> None:
        try:
            voxel = tuple(float(v) for v in self.voxel_size)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"voxel_size must be 3 numbers (z, y, x) in nm, got {self.voxel_size!r}") from e
        if len(voxel) != 3 or not all(math.isfinite(v) and v > 0 for v in voxel):
            raise ConfigError(f"voxel_size must be 3 positive numbers (z, y, x) in nm, got {self.voxel_size!r}")
        object.__setattr__(self, "voxel_size", voxel)
        positive = ("cell_size", "membrane_thickness", "texture_scale")
        non_negative = ("mito_per_cell", "vesicles_per_cell", "blur_sigma", "texture", "noise")
        for name in positive + non_negative:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"SynthParams.{name} must be a finite number, got {value!r}")
            if value < 0 or (name in positive and value == 0):
                kind = "positive" if name in positive else "non-negative"
                raise ConfigError(f"SynthParams.{name} must be {kind}, got {value!r}")
        for name in ("jitter", "membrane_variation"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value <= 1 or (name == "membrane_variation" and value == 1):
                raise ConfigError(f"SynthParams.{name} must lie in [0, 1), got {value!r}")
        if self.cell_size < 4 * self.membrane_thickness:
            raise ConfigError(
                f"cell_size {self.cell_size} nm is too small for membranes of {self.membrane_thickness} nm; "
                f"use a cell size of at least {4 * self.membrane_thickness:g} nm"
            )

    @property
    def blur_halo(self) -> Coordinate:
        """Radius of the blur kernel in voxels per axis: the context a block reads around itself."""
        return tuple(int(_TRUNCATE * s + 0.5) for s in self.blur_sigma_voxels)

    @property
    def blur_sigma_voxels(self) -> tuple[float, ...]:
        return tuple(self.blur_sigma / v for v in self.voxel_size)


class SynthBlock(NamedTuple):
    """One block of a synthetic volume, arrays in axis order ``(z, y, x)``."""

    raw: npt.NDArray[np.uint8]
    """The EM-like image."""
    labels: npt.NDArray[np.uint64]
    """Dense instance ground truth: every voxel holds the id of its cell (>= 1)."""
    membrane: npt.NDArray[np.bool_]
    """Voxels drawn as membrane (the cell boundaries, within half the local thickness)."""


# --- constants of the recipe (changing any of them changes every volume) ---------------------------
_TRUNCATE = 3.0  # blur kernel radius in sigmas
_MEMBRANE_VALUE = 0.18  # intensity at the centre of a membrane
_CYTOPLASM = (0.60, 0.80)  # range of per-cell brightness
_MEMBRANE_SCALE = 150.0  # nm, feature size of the membrane-thickness variation
_MITO_SEMI_AXES = ((70.0, 180.0), (25.0, 45.0))  # nm: (long axis range, short axes range)
_MITO_FACTOR, _MITO_RIM_FACTOR, _MITO_RIM = 0.62, 0.40, 0.72  # interior, rim darkening; rim starts at q
_VESICLE_RADIUS = (14.0, 24.0)  # nm
_VESICLE_FACTOR, _VESICLE_RIM_FACTOR, _VESICLE_RIM = 0.95, 0.55, 0.45
_MAX_MITO, _MAX_VESICLES = 4, 16
_MAX_REACH = 2  # cells searched around a voxel's own: 1 almost always suffices, 2 where it does not

# hash "streams": what a random number is for
_S_JITTER, _S_BRIGHT, _S_NMITO, _S_NVES = 1, 4, 5, 6
_S_MITO, _S_VES = 100, 1000  # + 16 * index + field (mitochondria), + 8 * index + field (vesicles)
_S_TEXTURE, _S_TEXTURE2, _S_MEMBRANE, _S_NOISE = 11, 12, 13, 14

_M64 = (1 << 64) - 1


def cell_grid_shape(shape: Sequence[int], params: SynthParams) -> Coordinate:
    """Number of cell seeds per axis for a volume of ``shape`` voxels; their product bounds the label ids."""
    return tuple(max(1, math.ceil(s * v / params.cell_size)) for s, v in zip(shape, params.voxel_size, strict=True))


def synth_block(
    roi: Roi,
    *,
    shape: Sequence[int],
    seed: int,
    params: SynthParams | None = None,
) -> SynthBlock:
    """Compute the voxels of ``roi`` of the synthetic volume ``(shape, seed, params)``.

    The result depends only on the global coordinates in ``roi``, never on how the volume is cut
    into blocks: any tiling reassembles bit-identically into :func:`synth_volume`.

    Parameters
    ----------
    roi : Roi
        The region to compute, in voxels ``(z, y, x)``, inside ``Roi.from_shape(shape)``.
    shape : Coordinate
        Shape of the whole volume ``(z, y, x)`` in voxels (it fixes the cell grid and the label ids).
    seed : int
        Non-negative seed; the same seed gives the same volume.
    params : SynthParams, optional
        Appearance; defaults to ``SynthParams()``.

    Returns
    -------
    SynthBlock
        ``raw`` uint8, ``labels`` uint64 (>= 1) and ``membrane`` bool, each of shape ``roi.shape``.

    Raises
    ------
    GeometryError
        If ``shape`` is not 3 positive ints or ``roi`` is not inside it.
    ConfigError
        If ``seed`` is negative or not an int.
    """
    params = SynthParams() if params is None else params
    shape_c = _check_shape(shape)
    seed = _check_seed(seed)
    if roi.ndim != 3 or not Roi.from_shape(shape_c).contains(roi):
        raise GeometryError(f"region {roi} is not inside the volume of shape {shape_c}")
    if roi.empty:
        empty = np.zeros(roi.shape, np.uint8)
        return SynthBlock(empty, empty.astype(np.uint64), empty.astype(bool))

    read = roi.grow(params.blur_halo)
    world = _World(shape_c, seed, params)
    # one voxel more on each side, so that voxels attached to their cell only diagonally can be
    # given to a face neighbour's cell consistently in every block
    labels, mdist, brightness, cell_table = world.cells(read.grow(1))
    labels = _absorb_isolated(labels, Roi.from_shape(shape_c).relative_to(read.grow(1)))
    inner = (slice(1, -1),) * 3
    labels = np.ascontiguousarray(labels[inner])
    mdist = np.ascontiguousarray(mdist[inner])
    brightness = np.ascontiguousarray(brightness[inner])

    # membranes: a smooth dark band whose half-width varies slowly
    half = np.float32(params.membrane_thickness / 2)
    if params.membrane_variation > 0:
        wobble = _value_noise(read, params.voxel_size, _MEMBRANE_SCALE, seed, _S_MEMBRANE)
        half_width = half * (np.float32(1 + params.membrane_variation) - np.float32(2 * params.membrane_variation) * wobble)
    else:
        half_width = np.full(read.shape, half, np.float32)
    t = np.clip(mdist / half_width, np.float32(0), np.float32(1))
    del half_width
    membrane_weight = np.float32(1) - t * t * (np.float32(3) - np.float32(2) * t)  # 1 on the boundary, 0 at half width
    membrane = t < np.float32(1)
    del t, mdist

    # cytoplasm: per-cell brightness plus two octaves of texture
    intensity = brightness
    if params.texture > 0:
        tex = _value_noise(read, params.voxel_size, params.texture_scale, seed, _S_TEXTURE)
        tex += _value_noise(read, params.voxel_size, params.texture_scale / 3, seed, _S_TEXTURE2)
        intensity += np.float32(params.texture) * (tex - np.float32(1))
        del tex
    intensity += (np.float32(_MEMBRANE_VALUE) - intensity) * membrane_weight
    del membrane_weight
    intensity *= world.organelle_factor(read, labels, cell_table)

    # blur with the halo, then crop to the block
    core = roi.relative_to(read).to_slices()
    if params.blur_sigma > 0 and any(h > 0 for h in params.blur_halo):
        from scipy.ndimage import gaussian_filter

        intensity = gaussian_filter(
            intensity, sigma=params.blur_sigma_voxels, truncate=_TRUNCATE, mode="nearest", output=np.float32
        )
    intensity = np.ascontiguousarray(intensity[core])
    if params.noise > 0:
        intensity += np.float32(params.noise) * _normal_noise(roi, seed)
    raw = np.clip(np.rint(intensity * np.float32(255)), 0, 255).astype(np.uint8)
    return SynthBlock(raw, np.ascontiguousarray(labels[core]), np.ascontiguousarray(membrane[core]))


def synth_volume(shape: Sequence[int], *, seed: int, params: SynthParams | None = None) -> SynthBlock:
    """The whole volume in memory (for tests and small examples): ``synth_block`` of the full region."""
    return synth_block(Roi.from_shape(_check_shape(shape)), shape=shape, seed=seed, params=params)


@locked("dst", "synth")
def write_synth(
    dst: str | os.PathLike[str],
    *,
    shape: Sequence[int],
    seed: int,
    params: SynthParams | None = None,
    chunks: int | Sequence[int] = 64,
    block_shape: int | Sequence[int] | None = None,
    overwrite: bool = False,
    zarr_format: Literal[2, 3] = 3,
    progress: bool = True,
) -> None:
    """Write a synthetic volume as an OME-Zarr image at ``dst`` with its labels at ``dst/labels/ground_truth``.

    The blocks are a stage of :func:`emseg.engine.runner.run_blockwise` (threads in this process), so memory
    is bounded by the block shape (about 100 bytes per voxel of a block and its halo, per thread),
    not the volume, and an interrupted run resumes: the same call again writes only the blocks
    without a record.  ``dst`` is marked complete only after every block is written.

    Parameters
    ----------
    dst : path
        Output OME-Zarr image (uint8, axes z, y, x, with ``params.voxel_size`` as scale).
    shape : Coordinate
        Volume shape ``(z, y, x)`` in voxels.
    seed : int
        Non-negative seed; the same seed gives identical bytes.
    params : SynthParams, optional
        Appearance; defaults to ``SynthParams()``.
    chunks : int or Coordinate
        Zarr chunk shape of both arrays, in voxels.
    block_shape : int or Coordinate, optional
        Shape of one unit of work; a multiple of ``chunks``.  Default: 128 voxels per axis
        rounded up to the chunks.
    overwrite : bool
        Replace an existing ``dst``; otherwise ``OutputExistsError`` is raised, unless ``dst`` is an
        unfinished synthetic volume of the same shape, seed, parameters and chunks (then it resumes).
    zarr_format : int
        2 or 3.
    progress : bool
        Show a progress bar on stderr.

    Raises
    ------
    OutputExistsError
        If ``dst`` exists, is not an unfinished run of the same call, and ``overwrite`` is false.
    GeometryError, ConfigError
        For an invalid shape, block shape, chunk shape or seed.
    """
    from emseg.engine.ledger import WriteSpec
    from emseg.engine.runner import run_blockwise
    from emseg.engine.runstate import OutputClaim
    from emseg.io import create_labels, create_volume, mark_complete

    params = SynthParams() if params is None else params
    shape_c = _check_shape(shape)
    seed = _check_seed(seed)
    chunk_c = tuple(min(c, s) for c, s in zip(as_coordinate(chunks, 3), shape_c))
    if any(c <= 0 for c in chunk_c):
        raise GeometryError(f"chunk shape must be positive on every axis, got {chunk_c}")
    block_c = round_up((128, 128, 128), chunk_c) if block_shape is None else as_coordinate(block_shape, 3)
    grid = plan_blocks(Roi.from_shape(shape_c), block_c, chunk_shape=chunk_c)
    image = Path(dst)
    provenance = _provenance(shape_c, seed, params)
    run = {"synth": provenance, "chunks": list(chunk_c), "zarr_format": int(zarr_format)}

    def create(record: dict[str, object]) -> None:
        create_volume(image, shape=shape_c, dtype="uint8", chunks=chunk_c, voxel_size=params.voxel_size,
                      overwrite=overwrite, zarr_format=zarr_format, extra_attrs={"synth": provenance})
        create_labels(image, LABEL_NAME, dtype="uint64", chunks=chunk_c)

    # an unfinished synthetic volume of the same call resumes; anything else is replaced or refused
    claim = OutputClaim(image, run, kind="synthetic volume", what="an earlier synth run", create=create, key="run",
                        overwrite=overwrite, once=True, validate=_has_labels)
    resume = claim.check()
    logger.info("synth %s: shape %s, seed %d, %d blocks of %s%s", dst, shape_c, seed, len(grid), grid.block_shape,
                " (resumed)" if resume else "")
    run_blockwise(None, stage="synth", grid=grid, fn=functools.partial(_synth_task, _SynthJob(str(image), shape_c, seed,
                                                                                              params)),
                  output=image, params=run, progress=progress, claim=claim,
                  writes=[WriteSpec(str(image / "0")), WriteSpec(str(image / "labels" / LABEL_NAME / "0"))])
    mark_complete(image / "labels" / LABEL_NAME)
    claim.complete()


@dataclass(frozen=True)
class _SynthJob:
    image: str
    shape: Coordinate
    seed: int
    params: SynthParams


def _synth_task(job: _SynthJob, block: Block) -> dict[str, int]:
    """One block of :func:`write_synth`: compute it and write the raw and the labels of its core."""
    from emseg.io import open_volume

    out = synth_block(block.write_roi, shape=job.shape, seed=job.seed, params=job.params)
    open_volume(job.image, allow_incomplete=True, mode="r+").write(block.write_roi, out.raw)
    open_volume(Path(job.image) / "labels" / LABEL_NAME, allow_incomplete=True, mode="r+").write(
        block.write_roi, out.labels)
    return {"voxels": int(block.write_roi.size)}


def _has_labels(image: Path) -> None:
    """Refuse to resume an unfinished synthetic volume whose labels are gone (as any existing output)."""
    from emseg.errors import OutputExistsError
    from emseg.io.safety import overwrite_hint

    if not (image / "labels" / LABEL_NAME).is_dir():
        raise OutputExistsError(f"{image} already exists; {overwrite_hint(image)}")


def _provenance(shape: Coordinate, seed: int, params: SynthParams) -> dict[str, object]:
    """What made the volume, stored in the image's attributes (JSON-compatible)."""
    fields = {name: getattr(params, name) for name in SynthParams.__dataclass_fields__}
    fields["voxel_size"] = list(params.voxel_size)
    return {"shape": list(shape), "seed": seed, "params": fields}


# --- the cell world -----------------------------------------------------------------------------


class _CellTable(NamedTuple):
    """Per-cell quantities for the cells ``[lo, lo + shape)`` of the cell grid (arrays ``(z, y, x)``)."""

    lo: Coordinate
    seeds: npt.NDArray[np.float64]  # (3, tz, ty, tx) nm
    labels: npt.NDArray[np.uint64]
    brightness: npt.NDArray[np.float32]
    cell_index: npt.NDArray[np.int64]  # (3, tz, ty, tx) global cell indices
    present: npt.NDArray[np.bool_] | None = None  # cells owning a voxel of the region


class _World:
    def __init__(self, shape: Coordinate, seed: int, params: SynthParams) -> None:
        self.shape = shape
        self.seed = seed
        self.params = params
        self.voxel = params.voxel_size
        self.grid = cell_grid_shape(shape, params)
        self.extent = tuple(s * v for s, v in zip(shape, self.voxel))  # nm

    def cell_of(self, read: Roi) -> list[npt.NDArray[np.int64]]:
        """Cell-grid index of each voxel along each axis (voxels past the volume use the edge cells)."""
        out = []
        for axis in range(3):
            pos = _positions(read, axis, self.voxel)
            idx = np.floor(pos / self.params.cell_size).astype(np.int64)
            out.append(np.clip(idx, 0, self.grid[axis] - 1))
        return out

    def table(self, lo: Sequence[int], hi: Sequence[int]) -> _CellTable:
        """Seeds, labels and brightness of cells ``[lo, hi)`` (clipped to the grid)."""
        lo_c = tuple(max(0, int(a)) for a in lo)
        hi_c = tuple(min(g, int(b)) for b, g in zip(hi, self.grid))
        ranges = [np.arange(a, b, dtype=np.int64) for a, b in zip(lo_c, hi_c)]
        index = np.stack(np.meshgrid(*ranges, indexing="ij"))
        cs = self.params.cell_size
        seeds = np.empty(index.shape, np.float64)
        for axis in range(3):
            u = _cell_uniform(self.seed, _S_JITTER + axis, index)
            begin = index[axis] * cs
            end = np.minimum(begin + cs, self.extent[axis])
            seeds[axis] = begin + (0.5 + self.params.jitter * (u - 0.5)) * (end - begin)
        labels = (1 + np.ravel_multi_index(tuple(index), self.grid)).astype(np.uint64)
        lo_b, hi_b = _CYTOPLASM
        brightness = (lo_b + (hi_b - lo_b) * _cell_uniform(self.seed, _S_BRIGHT, index)).astype(np.float32)
        return _CellTable(lo_c, seeds, labels, brightness, index)

    def cells(
        self, read: Roi
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.float32], npt.NDArray[np.float32], _CellTable]:
        """Labels, distance to the cell boundary (nm) and cell brightness of every voxel of ``read``.

        Also returns the table of the cells that own at least one voxel of ``read``.
        """
        cell = self.cell_of(read)
        table = self.table([c[0] - _MAX_REACH for c in cell], [c[-1] + 1 + _MAX_REACH for c in cell])
        pos = [_positions(read, axis, self.voxel) for axis in range(3)]
        labels = np.empty(read.shape, np.uint64)
        mdist = np.empty(read.shape, np.float32)
        bright = np.empty(read.shape, np.float32)
        present = np.zeros(table.labels.shape, bool)
        cap = self.params.membrane_thickness * (1 + self.params.membrane_variation)  # > any half-width
        for (kz, z0, z1), (ky, y0, y1), (kx, x0, x1) in itertools.product(*(_runs(c) for c in cell)):
            k = (kz, ky, kx)
            sub_pos = (pos[0][z0:z1], pos[1][y0:y1], pos[2][x0:x1])
            sl = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
            # search the 27 cells around k; redo the voxels where a farther seed could matter with
            # 125.  Which voxels those are depends on the position alone, never on the block.
            todo = None
            for reach in range(1, _MAX_REACH + 1):
                cands = self._candidates(k, reach, table.lo)
                nearest, nearest_sq, boundary = _nearest(sub_pos, table.seeds[:, cands[0], cands[1], cands[2]], cap)
                take = np.ones(nearest.shape, bool) if todo is None else todo
                if reach < _MAX_REACH:
                    todo = ~self._exact(k, reach, sub_pos, nearest_sq, boundary)
                    take = ~todo
                labels[sl] = np.where(take, table.labels[cands][nearest], labels[sl])
                bright[sl] = np.where(take, table.brightness[cands][nearest], bright[sl])
                mdist[sl] = np.where(take, boundary, mdist[sl])
                owners = np.flatnonzero(np.bincount(nearest[take], minlength=len(cands[0])))
                present[tuple(c[owners] for c in cands)] = True
                if todo is not None and not todo.any():
                    break
        return labels, mdist, bright, table._replace(present=present)

    def _candidates(self, k: Coordinate, reach: int, lo: Coordinate) -> tuple[npt.NDArray[np.intp], ...]:
        """Table indices of the cells within ``reach`` of cell ``k``, nearer rings first.

        Within a ring the order is fixed, so a voxel's nearest seed (ties keep the first) does
        not depend on how far the search had to reach.
        """
        offsets = sorted(
            itertools.product(range(-reach, reach + 1), repeat=3), key=lambda o: max(abs(d) for d in o)
        )
        cands = [
            tuple(a + d - b for a, d, b in zip(k, off, lo))
            for off in offsets
            if all(0 <= a + d < g for a, d, g in zip(k, off, self.grid))
        ]
        return tuple(np.array(c, dtype=np.intp) for c in zip(*cands))

    def _exact(
        self,
        k: Coordinate,
        reach: int,
        pos: tuple[npt.NDArray[np.float64], ...],
        nearest_sq: npt.NDArray[np.float32],
        boundary: npt.NDArray[np.float32],
    ) -> npt.NDArray[np.bool_]:
        """Voxels whose nearest seed and cell boundary no seed beyond ``reach`` cells can change.

        Seeds outside the searched cells are at least ``B`` away, the distance to the searched
        box's faces plus the jitter margin (a seed keeps ``(1 - jitter) / 2`` of its cell's width
        from the cell's faces; faces on the edge of the cell grid have no seeds beyond them).
        Such a seed cannot be the nearest where ``d_1 < B``, and its bisector plane is at least
        ``(B - d_1) / 2`` away.  A margin keeps float32 rounding from mattering.
        """
        cs = self.params.cell_size
        keep_out = 0.5 * (1 - self.params.jitter)
        bound: npt.NDArray[np.float64] | None = None
        for axis in range(3):
            last_width = min(cs, self.extent[axis] - (self.grid[axis] - 1) * cs)
            lo_d = (
                pos[axis] - (k[axis] - reach) * cs + keep_out * cs
                if k[axis] - reach > 0
                else np.full(len(pos[axis]), np.inf)
            )
            hi_d = (
                (k[axis] + reach + 1) * cs - pos[axis] + keep_out * last_width
                if k[axis] + reach + 1 < self.grid[axis]
                else np.full(len(pos[axis]), np.inf)
            )
            d = np.minimum(lo_d, hi_d).reshape([-1 if a == axis else 1 for a in range(3)])
            bound = d if bound is None else np.minimum(bound, d)
        assert bound is not None
        bound = (bound - 1e-3 * cs).astype(np.float32)
        nearest = np.sqrt(nearest_sq)
        exact: npt.NDArray[np.bool_] = (nearest < bound) & (boundary <= (bound - nearest) / np.float32(2))
        return exact

    def organelle_factor(
        self, read: Roi, labels: npt.NDArray[np.uint64], table: _CellTable
    ) -> npt.NDArray[np.float32]:
        """Multiplicative darkening by mitochondria and vesicles (1 where there are none).

        Overlaps combine with ``minimum`` so the order organelles are drawn in does not matter.
        """
        factor = np.ones(read.shape, np.float32)
        keep = np.ones(table.labels.shape, bool) if table.present is None else table.present
        index = table.cell_index[:, keep]
        cell_labels = table.labels[keep]
        seeds = table.seeds[:, keep]
        p = self.params
        n_mito = np.floor(p.mito_per_cell + _cell_uniform(self.seed, _S_NMITO, index)).astype(np.int64)
        n_ves = np.floor(p.vesicles_per_cell + _cell_uniform(self.seed, _S_NVES, index)).astype(np.int64)
        n_mito = np.minimum(n_mito, _MAX_MITO)
        n_ves = np.minimum(n_ves, _MAX_VESICLES)
        cs = p.cell_size
        pos = [_positions(read, axis, self.voxel) for axis in range(3)]
        for m in range(int(n_mito.max(initial=0))):
            has = np.flatnonzero(n_mito > m)
            u = [_cell_uniform(self.seed, _S_MITO + 16 * m + f, index[:, has]) for f in range(9)]
            centre = seeds[:, has] + (np.stack(u[:3]) - 0.5) * (0.5 * cs)
            (a0, a1), (b0, b1) = _MITO_SEMI_AXES
            semi = np.stack([a0 + (a1 - a0) * u[3], b0 + (b1 - b0) * u[4], b0 + (b1 - b0) * u[4]])
            rot = _rotation(np.stack(u[5:9]) - 0.5)
            for j, c in enumerate(has):
                _draw_ellipsoid(
                    factor, labels, pos, cell_labels[c], centre[:, j], rot[:, :, j], semi[:, j],
                    _MITO_FACTOR, _MITO_RIM_FACTOR, _MITO_RIM,
                )
        r0, r1 = _VESICLE_RADIUS
        identity = np.eye(3)
        for v in range(int(n_ves.max(initial=0))):
            has = np.flatnonzero(n_ves > v)
            u = [_cell_uniform(self.seed, _S_VES + 8 * v + f, index[:, has]) for f in range(4)]
            centre = seeds[:, has] + (np.stack(u[:3]) - 0.5) * (0.8 * cs)
            radius = r0 + (r1 - r0) * u[3]
            for j, c in enumerate(has):
                _draw_ellipsoid(
                    factor, labels, pos, cell_labels[c], centre[:, j], identity, np.full(3, radius[j]),
                    _VESICLE_FACTOR, _VESICLE_RIM_FACTOR, _VESICLE_RIM,
                )
        return factor


def _nearest(
    pos: tuple[npt.NDArray[np.float64], ...], seeds: npt.NDArray[np.float64], cap: float
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Nearest seed of each voxel of a box and the distance to the boundary of its cell.

    Parameters
    ----------
    pos : tuple of 1-D arrays
        Voxel positions (nm) along z, y and x of a box.
    seeds : (3, n) array
        Candidate seeds in nm, in a fixed order; ties keep the earlier one.
    cap : float
        Distances to the boundary beyond this (nm) are reported as ``cap``.

    Returns
    -------
    nearest : uint8 array
        Index of the nearest candidate.
    nearest_sq : float32 array
        Squared distance to it, nm^2.
    boundary : float32 array
        Distance to the nearest bisector plane between the nearest seed and any other candidate,
        ``(d_x^2 - d_1^2) / (2 |s_1 - s_x|)``: the distance to the cell's boundary (a convex cell
        is the intersection of those half-spaces), capped at ``cap``.
    """
    shape = tuple(len(p) for p in pos)
    n = seeds.shape[1]
    sq = [[((p - s) ** 2).astype(np.float32) for p, s in zip(pos, seeds[:, k])] for k in range(n)]

    def distance_sq(k: int) -> npt.NDArray[np.float32]:
        dz, dy, dx = sq[k]
        d: npt.NDArray[np.float32] = dz[:, None, None] + dy[None, :, None]
        d = d + dx[None, None, :]
        return d

    d1 = np.full(shape, np.inf, np.float32)
    i1 = np.zeros(shape, np.uint8)  # at most (2 * _MAX_REACH + 1)^3 = 125 candidates
    for k in range(n):
        d = distance_sq(k)
        closer = d < d1
        np.copyto(d1, d, where=closer)
        np.copyto(i1, k, where=closer)
    diff = (seeds[:, :, None] - seeds[:, None, :]) ** 2
    boundary = np.full(shape, cap, np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        inv_gap = np.float32(0.5) / np.sqrt(diff[0] + diff[1] + diff[2]).astype(np.float32)  # inf on the diagonal
        for k in range(n):
            # 0 * inf = nan where k is the nearest seed itself; fmin ignores it
            np.fmin(boundary, (distance_sq(k) - d1) * inv_gap[k][i1], out=boundary)
    return i1, d1, boundary


def _absorb_isolated(labels: npt.NDArray[np.uint64], volume: Roi) -> npt.NDArray[np.uint64]:
    """Relabel voxels that share no face with a voxel of their own cell (corner slivers of a cell).

    Such a voxel takes the most common label among its face neighbours inside the volume
    (``volume``, in array coordinates), the smallest on a tie.  Decided for every voxel but the
    outermost layer of ``labels`` at once from the original labels, so the result is a function
    of the neighbourhood alone.  It makes the cells 6-connected in nearly every case.
    """
    core = labels[1:-1, 1:-1, 1:-1]
    inside = [(np.arange(n) >= b) & (np.arange(n) < e) for n, b, e in zip(labels.shape, volume.begin, volume.end)]
    inside_core = inside[0][1:-1, None, None] & inside[1][None, 1:-1, None] & inside[2][None, None, 1:-1]
    attached = np.zeros(core.shape, bool)
    neighbours = []
    for axis in range(3):
        for step in (-1, 1):
            sl = [slice(1, -1)] * 3
            sl[axis] = slice(1 + step, labels.shape[axis] - 1 + step)
            valid = inside[axis][sl[axis]].reshape([-1 if a == axis else 1 for a in range(3)])
            neighbour = labels[tuple(sl)]
            attached |= (neighbour == core) & valid
            neighbours.append((neighbour, valid))
    lonely = np.argwhere(~attached & inside_core)
    if len(lonely) == 0:
        return labels
    out = labels.copy()
    for z, y, x in lonely:
        votes: dict[int, int] = {}
        for neighbour, valid in neighbours:
            if valid[min(z, valid.shape[0] - 1), min(y, valid.shape[1] - 1), min(x, valid.shape[2] - 1)]:
                label = int(neighbour[z, y, x])
                votes[label] = votes.get(label, 0) + 1
        if votes:
            out[z + 1, y + 1, x + 1] = min(votes, key=lambda lab: (-votes[lab], lab))
    return out


def _draw_ellipsoid(
    factor: npt.NDArray[np.float32],
    labels: npt.NDArray[np.uint64],
    pos: list[npt.NDArray[np.float64]],
    label: np.uint64,
    centre: npt.NDArray[np.float64],
    rot: npt.NDArray[np.float64],
    semi: npt.NDArray[np.float64],
    inner: float,
    rim: float,
    rim_from: float,
) -> None:
    """Darken the part of an ellipsoid that lies inside cell ``label``: ``rim`` near its surface."""
    # quadratic form q(p) = (p - c)^T A (p - c), A = R diag(1/semi^2) R^T; q <= 1 inside
    a = (rot * (1.0 / semi**2)[None, :]) @ rot.T
    half = np.sqrt(np.diag((rot * semi[None, :] ** 2) @ rot.T))  # bounding-box half extent, nm
    sl = []
    for axis in range(3):
        p = pos[axis]
        lo = int(np.searchsorted(p, centre[axis] - half[axis], side="left"))
        hi = int(np.searchsorted(p, centre[axis] + half[axis], side="right"))
        if hi <= lo:
            return
        sl.append(slice(lo, hi))
    dz, dy, dx = (pos[axis][sl[axis]] - centre[axis] for axis in range(3))
    dz3, dy3, dx3 = dz[:, None, None], dy[None, :, None], dx[None, None, :]
    q = a[0, 0] * dz3**2 + a[1, 1] * dy3**2
    q = q + a[2, 2] * dx3**2
    q = q + 2 * a[0, 1] * (dz3 * dy3)
    q = q + 2 * a[0, 2] * (dz3 * dx3)
    q = q + 2 * a[1, 2] * (dy3 * dx3)
    box = tuple(sl)
    inside = (q <= 1) & (labels[box] == label)
    value = np.where(q >= rim_from, np.float32(rim), np.float32(inner))
    np.minimum(factor[box], value, out=factor[box], where=inside)


def _rotation(quat: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Rotation matrices ``(3, 3, n)`` from unnormalised quaternions ``(4, n)`` (arithmetic only)."""
    w, x, y, z = quat / np.sqrt(quat[0] ** 2 + quat[1] ** 2 + quat[2] ** 2 + quat[3] ** 2 + 1e-12)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


# --- deterministic noise ---------------------------------------------------------------------------


def _splitmix(h: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The splitmix64 finaliser, elementwise (uint64 arithmetic wraps)."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _key(seed: int, stream: int) -> int:
    """A 64-bit key for one (seed, stream) pair, in Python ints."""
    h = (seed * 0x9E3779B97F4A7C15 + stream * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & _M64
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _M64
    return h ^ (h >> 31)


def _axis_hash(key: int, axis: int, coords: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
    """Mixed hash of one coordinate axis (1-D), to be combined across axes and mixed again."""
    salted = (coords + np.int64(1 << 40)).astype(np.uint64) * np.uint64((0x9E3779B97F4A7C15 + 2 * axis) & _M64)
    return _splitmix(salted ^ np.uint64(_key(key, axis + 1)))


def _hash3(key: int, z: npt.NDArray[np.int64], y: npt.NDArray[np.int64], x: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
    """Hash of every ``(z, y, x)`` of broadcastable index arrays."""
    return _splitmix(_axis_hash(key, 0, z) + (_axis_hash(key, 1, y) ^ _axis_hash(key, 2, x)))


def _to_unit(h: npt.NDArray[np.uint64]) -> npt.NDArray[np.float64]:
    """Uniform in [0, 1) from the top 53 bits."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _cell_uniform(seed: int, stream: int, index: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """One uniform number in [0, 1) per cell, for ``index`` of shape ``(3, ...)``."""
    return _to_unit(_hash3(_key(seed, stream), index[0], index[1], index[2]))


def _positions(roi: Roi, axis: int, voxel: Sequence[float]) -> npt.NDArray[np.float64]:
    """Physical positions (nm) of the voxel centres of ``roi`` along ``axis``."""
    idx = np.arange(roi.offset[axis], roi.end[axis], dtype=np.float64)
    return (idx + 0.5) * voxel[axis]


def _runs(values: npt.NDArray[np.int64]) -> list[tuple[int, int, int]]:
    """``(value, start, stop)`` for each run of equal values of a sorted 1-D array."""
    cuts = np.flatnonzero(np.diff(values)) + 1
    starts = np.concatenate([[0], cuts])
    stops = np.concatenate([cuts, [len(values)]])
    return [(int(values[a]), int(a), int(b)) for a, b in zip(starts, stops)]


def _value_noise(
    roi: Roi, voxel: Sequence[float], scale: float, seed: int, stream: int
) -> npt.NDArray[np.float32]:
    """Smooth noise in [0, 1): hashed values on a lattice of ``scale`` nm, smoothstep-interpolated.

    The interpolation is done axis by axis with elementwise arithmetic, so each voxel's value is
    a function of its global position only.
    """
    key = _key(seed, stream)
    lattice, weight = [], []
    for axis in range(3):
        u = _positions(roi, axis, voxel) / scale
        cell = np.floor(u)
        t = (u - cell).astype(np.float32)
        lattice.append(cell.astype(np.int64))
        weight.append(t * t * (np.float32(3) - np.float32(2) * t))
    ranges = [np.arange(c[0], c[-1] + 2, dtype=np.int64) for c in lattice]
    values = _to_unit(_hash3(key, ranges[0][:, None, None], ranges[1][None, :, None], ranges[2][None, None, :]))
    out = values.astype(np.float32)
    for axis in range(3):  # x first, then y, then z
        ax = 2 - axis
        i = lattice[ax] - ranges[ax][0]
        t = weight[ax].reshape([-1 if a == ax else 1 for a in range(3)])
        lo = np.take(out, i, axis=ax)
        hi = np.take(out, i + 1, axis=ax)
        out = lo + (hi - lo) * t
    return np.ascontiguousarray(out, dtype=np.float32)


def _normal_noise(roi: Roi, seed: int) -> npt.NDArray[np.float32]:
    """Approximately standard-normal noise per voxel (Irwin-Hall of four 16-bit uniforms)."""
    z, y, x = (np.arange(o, e, dtype=np.int64) for o, e in zip(roi.offset, roi.end))
    h = _hash3(_key(seed, _S_NOISE), z[:, None, None], y[None, :, None], x[None, None, :])
    mask = np.uint64(0xFFFF)
    total = (h & mask).astype(np.float32)
    for shift in (16, 32, 48):
        total += ((h >> np.uint64(shift)) & mask).astype(np.float32)
    # sum of 4 uniforms on [0, 65536): mean 2 * 65535, variance 4 * (65536^2 - 1) / 12
    return (total - np.float32(2 * 65535)) * np.float32(math.sqrt(3) / 65536)


def _check_shape(shape: Sequence[int]) -> Coordinate:
    try:
        shape_c = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as e:
        raise GeometryError(f"volume shape must be 3 positive ints (z, y, x), got {shape!r}") from e
    if len(shape_c) != 3 or any(s <= 0 for s in shape_c):
        raise GeometryError(f"volume shape must be 3 positive ints (z, y, x), got {shape!r}")
    return shape_c


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)
