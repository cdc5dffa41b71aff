"""Boxes in voxel space and the block grid every stage works on.

Vocabulary (used everywhere in emseg):

* ``Coordinate``: a tuple of ints in axis order ``(z, y, x)`` (or ``(y, x)`` in 2D).
* ``Roi(offset, shape)``: an immutable, hashable box in voxels of the volume being processed.
* ``total_roi``: the region to produce.  ``write_roi``: the part of it a block owns exclusively.
  ``read_roi = write_roi.grow(halo, halo)``: what the block reads; it may reach past the volume,
  where the reader mirrors (the U-Net paper's overlap-tile).

::

        read_roi
        +---------------------------+
        |   halo                    |
        |     +---------------+     |
        |     |   write_roi   |     |
        |     |  (the core)   |     |
        |     +---------------+     |
        +---------------------------+

Depends on the standard library and numpy only.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

from emseg.errors import GeometryError

Coordinate = tuple[int, ...]

__all__ = ["ANISOTROPY_2D", "Block", "BlockGrid", "Coordinate", "Roi", "as_coordinate", "coarse_yx", "downsample_factor",
           "fine_yx", "plan_blocks", "round_up"]

ANISOTROPY_2D = 2.5
"""z spacing / in-plane spacing at or above which a volume is serial sections: the bundled 2-D model
predicts it (:func:`emseg.models.zoo.choose_bundled`) and its fragments are made per section
(:func:`emseg.workflows.agglomerate.choose_mode`)."""


def downsample_factor(requested: int | None, run_voxel_size_nm: float | None, voxel_size: Sequence[float]) -> int:
    """The in-plane downsampling of a prediction (:attr:`emseg.config.PredictOptions.downsample`): ``requested``, else the
    model's run voxel size over the volume's finer y/x voxel size, rounded, at least 1; 1 when the model
    names none or the volume records no voxel size (1 nm on every axis)."""
    if requested is not None:
        return int(requested)
    if run_voxel_size_nm is None or len(voxel_size) != 3 or all(float(v) == 1.0 for v in voxel_size):
        return 1
    return max(1, round(run_voxel_size_nm / min(float(voxel_size[1]), float(voxel_size[2]))))


def coarse_yx(point: Sequence[int], factor: int, *, up: bool = False) -> tuple[int, int, int]:
    """A (z, y, x) corner or shape on voxels ``factor`` times larger in y and x (z kept): divided, rounded
    down, or up with ``up`` (an end, or a shape that must cover every fine voxel)."""
    z, y, x = (int(v) for v in point)
    return (z, -(-y // factor), -(-x // factor)) if up else (z, y // factor, x // factor)


def fine_yx(point: Sequence[int], factor: int) -> tuple[int, int, int]:
    """A (z, y, x) corner or shape on voxels ``factor`` times smaller in y and x: the inverse of :func:`coarse_yx`."""
    z, y, x = (int(v) for v in point)
    return (z, y * factor, x * factor)


def as_coordinate(value: int | Sequence[int], ndim: int) -> Coordinate:
    """Broadcast an int, or check a sequence, into a ``ndim``-long tuple of ints."""
    if isinstance(value, bool):
        raise GeometryError(f"expected an int or {ndim} ints (one per axis), got {value!r}")
    if isinstance(value, int):
        return (int(value),) * ndim
    coord = tuple(int(v) for v in value)
    if len(coord) != ndim:
        raise GeometryError(f"expected {ndim} values (one per axis), got {len(coord)}: {coord}")
    return coord


def round_up(shape: Sequence[int], multiple: Sequence[int]) -> Coordinate:
    """Smallest shape >= ``shape`` whose every axis is a multiple of ``multiple``."""
    return tuple(-(-int(s) // int(m)) * int(m) for s, m in zip(shape, multiple, strict=True))


@dataclass(frozen=True, slots=True)
class Roi:
    """A box ``[offset, offset + shape)`` in voxels, axis order ``(z, y, x)``.

    Parameters
    ----------
    offset : Coordinate
        First voxel of the box; may be negative (a read region reaching past the volume).
    shape : Coordinate
        Extent per axis, in voxels; never negative.
    """

    offset: Coordinate
    shape: Coordinate

    def __post_init__(self) -> None:
        offset = tuple(int(o) for o in self.offset)
        shape = tuple(int(s) for s in self.shape)
        if len(offset) != len(shape):
            raise GeometryError(f"Roi offset {offset} and shape {shape} differ in dimensionality")
        if any(s < 0 for s in shape):
            raise GeometryError(f"Roi shape must be non-negative, got {shape}")
        object.__setattr__(self, "offset", offset)
        object.__setattr__(self, "shape", shape)

    @classmethod
    def from_shape(cls, shape: Sequence[int]) -> Roi:
        """The box ``[0, shape)``: a whole volume."""
        return cls((0,) * len(shape), tuple(shape))

    @classmethod
    def from_bounds(cls, begin: Sequence[int], end: Sequence[int]) -> Roi:
        """The box ``[begin, end)``; an empty box where ``end < begin``."""
        return cls(tuple(begin), tuple(max(0, e - b) for b, e in zip(begin, end, strict=True)))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def begin(self) -> Coordinate:
        return self.offset

    @property
    def end(self) -> Coordinate:
        return tuple(o + s for o, s in zip(self.offset, self.shape))

    @property
    def size(self) -> int:
        """Number of voxels."""
        return math.prod(self.shape)

    @property
    def empty(self) -> bool:
        return self.size == 0

    def grow(self, lo: int | Sequence[int], hi: int | Sequence[int] | None = None) -> Roi:
        """Grow by ``lo`` voxels before and ``hi`` (default ``lo``) after, per axis.

        Negative values shrink the box.
        """
        lo_c = as_coordinate(lo, self.ndim)
        hi_c = lo_c if hi is None else as_coordinate(hi, self.ndim)
        return Roi(
            tuple(o - a for o, a in zip(self.offset, lo_c)),
            tuple(s + a + b for s, a, b in zip(self.shape, lo_c, hi_c)),
        )

    def shift(self, by: int | Sequence[int]) -> Roi:
        return Roi(tuple(o + b for o, b in zip(self.offset, as_coordinate(by, self.ndim))), self.shape)

    def intersect(self, other: Roi) -> Roi:
        """The overlap of two boxes (empty, anchored at the larger begin, when they are disjoint)."""
        self._check_ndim(other)
        begin = tuple(max(a, b) for a, b in zip(self.begin, other.begin))
        end = tuple(min(a, b) for a, b in zip(self.end, other.end))
        return Roi.from_bounds(begin, end)

    def contains(self, other: Roi | Sequence[int]) -> bool:
        """Whether a box (or a single voxel coordinate) lies inside this one."""
        if isinstance(other, Roi):
            self._check_ndim(other)
            return all(sb <= ob and oe <= se for sb, se, ob, oe in zip(self.begin, self.end, other.begin, other.end))
        return all(b <= c < e for b, e, c in zip(self.begin, self.end, other))

    def relative_to(self, origin: Roi | Sequence[int]) -> Roi:
        """This box in the coordinates of an array that starts at ``origin``."""
        start = origin.offset if isinstance(origin, Roi) else tuple(origin)
        return Roi(tuple(o - s for o, s in zip(self.offset, start)), self.shape)

    def to_slices(self) -> tuple[slice, ...]:
        """Slices for indexing an array whose first voxel is the origin.  Call only where indexing."""
        if any(o < 0 for o in self.offset):
            raise GeometryError(f"cannot index an array with {self}: negative offset")
        return tuple(slice(o, o + s) for o, s in zip(self.offset, self.shape))

    def _check_ndim(self, other: Roi) -> None:
        if other.ndim != self.ndim:
            raise GeometryError(f"{self} and {other} differ in dimensionality")

    def __str__(self) -> str:
        return f"Roi(offset={self.offset}, shape={self.shape})"


@dataclass(frozen=True, slots=True)
class Block:
    """One unit of distributed work.

    ``block_id`` is the C-order ravel of ``block_index`` in the grid: an int stable between runs.
    """

    block_id: int
    block_index: Coordinate
    read_roi: Roi
    write_roi: Roi


@dataclass(frozen=True, slots=True)
class BlockGrid:
    """Core boxes of ``block_shape`` tiling ``total_roi`` exactly, each read with a halo around it.

    Cores in the last row of each axis are clipped to ``total_roi``; their read regions still carry
    the full halo (the reader mirrors beyond the volume).  ``Block.read_roi`` is what a block's
    worker reads: :meth:`read_roi` is the one place it is computed.
    """

    total_roi: Roi
    block_shape: Coordinate
    halo: Coordinate
    """Context read before each core (the low side; both sides when ``halo_hi`` is None), voxels."""
    halo_hi: Coordinate | None = None
    """Context read after each core, voxels; None: the same as ``halo``."""
    snap: Coordinate | None = None
    """Before the halo is added, the core is rounded outward to multiples of ``snap`` counted from
    ``total_roi.offset`` (a model's tile: a clipped last core still reads whole tiles); None: no rounding."""

    @property
    def ndim(self) -> int:
        return self.total_roi.ndim

    @property
    def halos(self) -> tuple[Coordinate, Coordinate]:
        """Context read on the (low, high) side of each core, voxels per axis."""
        return self.halo, self.halo if self.halo_hi is None else self.halo_hi

    def read_roi(self, write_roi: Roi) -> Roi:
        """The region a block with this core reads: the core (rounded to ``snap``) grown by the halos."""
        core = write_roi
        if self.snap is not None:
            origin = self.total_roi.offset
            begin = tuple(o + (b - o) // s * s for o, b, s in zip(origin, write_roi.begin, self.snap))
            end = tuple(o + -(-(e - o) // s) * s for o, e, s in zip(origin, write_roi.end, self.snap))
            core = Roi.from_bounds(begin, end)
        lo, hi = self.halos
        return core.grow(lo, hi)

    @property
    def grid_shape(self) -> Coordinate:
        return tuple(-(-s // b) for s, b in zip(self.total_roi.shape, self.block_shape))

    def __len__(self) -> int:
        return math.prod(self.grid_shape)

    def __iter__(self) -> Iterator[Block]:
        for block_index in itertools.product(*(range(g) for g in self.grid_shape)):
            yield self.block_at(block_index)

    def block_at(self, block_index: Sequence[int]) -> Block:
        index = tuple(int(i) for i in block_index)
        if not all(0 <= i < g for i, g in zip(index, self.grid_shape)) or len(index) != self.ndim:
            raise GeometryError(f"block index {index} is outside the grid {self.grid_shape}")
        begin = tuple(o + i * b for o, i, b in zip(self.total_roi.offset, index, self.block_shape))
        write_roi = Roi(begin, self.block_shape).intersect(self.total_roi)
        block_id = 0
        for i, g in zip(index, self.grid_shape):
            block_id = block_id * g + i
        return Block(block_id, index, self.read_roi(write_roi), write_roi)

    def block(self, block_id: int) -> Block:
        """The block with this id (its C-order position in the grid)."""
        if not 0 <= block_id < len(self):
            raise GeometryError(f"block id {block_id} is outside a grid of {len(self)} blocks")
        index = []
        for g in reversed(self.grid_shape):
            index.append(block_id % g)
            block_id //= g
        return self.block_at(tuple(reversed(index)))

    def faces(self) -> Iterator[tuple[Block, Block, int]]:
        """Every pair of face-adjacent blocks ``(lower, upper, axis)``, each pair once."""
        for block in self:
            for axis in range(self.ndim):
                up = list(block.block_index)
                up[axis] += 1
                if up[axis] < self.grid_shape[axis]:
                    yield block, self.block_at(up), axis


MAX_BLOCKS = 1_000_000
"""Most blocks one run may have: each is a scheduler task (a few kB) and a completion marker file."""


def plan_blocks(
    total_roi: Roi,
    block_shape: int | Sequence[int],
    halo: int | Sequence[int] | tuple[int | Sequence[int], int | Sequence[int]] = 0,
    *,
    chunk_shape: Sequence[int] | None = None,
    multiple: Sequence[int] | None = None,
    snap: Sequence[int] | None = None,
) -> BlockGrid:
    """Cut ``total_roi`` into a grid of blocks.

    Parameters
    ----------
    total_roi : Roi
        The region to produce, in voxels.
    block_shape : int or Coordinate
        Core shape of one block, in voxels.  Clipped to ``total_roi``'s shape where larger.
    halo : int, Coordinate or (Coordinate, Coordinate)
        Context read on each side of a core, in voxels (from the model, never typed in); a tuple
        ``(lo, hi)`` when the two sides differ (a model's tiles: :attr:`emseg.ops.tiling.Tiling.block_halo`).
    chunk_shape : Coordinate, optional
        Storage chunk (or shard) shape of the output.  The block shape must be a multiple of it
        so that no two workers ever write the same storage object.
    multiple : Coordinate, optional
        Required multiple of the block shape (e.g. a model's input multiple, ``2**depth``).
    snap : Coordinate, optional
        Read whole multiples of this around each core (a model's tile shape): see :attr:`BlockGrid.snap`.

    Raises
    ------
    GeometryError
        If the block shape is not positive or not a multiple of ``chunk_shape`` / ``multiple``.
    """
    ndim = total_roi.ndim
    block = as_coordinate(block_shape, ndim)
    pair = isinstance(halo, tuple) and len(halo) == 2 and not all(isinstance(h, int) for h in halo)
    if pair:  # (lo, hi)
        lo_c, hi_c = as_coordinate(halo[0], ndim), as_coordinate(halo[1], ndim)  # type: ignore[index]
    else:
        lo_c = hi_c = as_coordinate(cast("int | Sequence[int]", halo), ndim)
    snap_c = None if snap is None else as_coordinate(snap, ndim)
    if any(b <= 0 for b in block):
        raise GeometryError(f"block shape must be positive on every axis, got {block}")
    if any(h < 0 for h in lo_c + hi_c):
        raise GeometryError(f"halo must be non-negative on every axis, got {(lo_c, hi_c) if pair else lo_c}")
    if snap_c is not None and any(s <= 0 for s in snap_c):
        raise GeometryError(f"snap must be positive on every axis, got {snap_c}")
    # A block larger than the volume is one block (its core is the volume) on that axis.
    block = tuple(min(b, max(s, 1)) if s < b else b for b, s in zip(block, total_roi.shape))
    n_blocks = math.prod(-(-s // b) for s, b in zip(total_roi.shape, block))
    if n_blocks > MAX_BLOCKS:
        from emseg.errors import ResourceLimitError

        raise ResourceLimitError(
            f"block shape {block} cuts {total_roi.shape} into {n_blocks:,} blocks, more than the {MAX_BLOCKS:,} "
            "one run can track (each block is a task and a completion marker); use a larger --block-size"
        )
    for name, required in (("output chunk shape", chunk_shape), ("required multiple", multiple)):
        if required is None:
            continue
        req = as_coordinate(required, ndim)
        bad = [
            axis
            for axis, (b, r, s) in enumerate(zip(block, req, total_roi.shape))
            if b % r and b != s  # a single block covering the whole axis needs no alignment
        ]
        if bad:
            suggestion = round_up(block, req)
            raise GeometryError(
                f"block shape {block} is not a multiple of the {name} {req} on axes {bad}; "
                f"use e.g. --block-size {','.join(map(str, suggestion))}"
            )
    return BlockGrid(total_roi, block, lo_c, hi_c if hi_c != lo_c else None, snap_c)
