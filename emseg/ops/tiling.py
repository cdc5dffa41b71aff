"""The run's tiles and blocks: arithmetic over shapes, no model runs and nothing is read here.

The overlap-tile strategy of the U-Net paper on a **global tile grid**.  Tile ``k`` owns the
output voxels ``[k * tile_shape, (k + 1) * tile_shape)`` in volume coordinates; its model input
starts ``input_offset`` voxels before that.  Because the grid is global, the tile shape is fixed
for a run and batches always hold ``batch_size`` tiles (the last one padded with zero tiles),
every output voxel is computed by the same tile from the same input whatever the block size or
the number of workers.

::

    volume axis:  0        T        2T       3T
                  |--------|--------|--------|     tile cores (each voxel owned by one tile)
            |---------------|                      tile 0's model input ("valid": core + context)
                     |---------------|             tile 1's model input

Two modes:

* ``"crop"``: each tile's output is cropped to its core.  Exact for "valid"-padded models (halo =
  ``model.context``), and for "same"-padded models once the halo reaches ``ceil(rf / 2)``.
* ``"gaussian"``: for "same"-padded models whose halo is smaller than half the receptive field.
  The whole output of every tile (core + halo) is accumulated with a Gaussian weight and
  normalised, so seams between tiles are blended.

A run's blocks (:func:`plan_block_grid`) are whole tiles and whole output chunks; the batch size
(:func:`default_batch_size`), the tiles and voxels computed (:func:`count_tiles`) and a block's
memory (:func:`memory_estimate`) follow from the tiling and the grid.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from emseg.errors import GeometryError
from emseg.geometry import BlockGrid, Coordinate, Roi, plan_blocks, round_up

__all__ = [
    "BATCH_INPUT_VOXELS",
    "DEFAULT_TILE_2D",
    "DEFAULT_TILE_2D_CPU",
    "DEFAULT_TILE_3D",
    "Blend",
    "Tiling",
    "count_tiles",
    "default_batch_size",
    "make_tiling",
    "memory_estimate",
    "plan_block_grid",
    "tiles_in_block",
]

Blend = Literal["crop", "gaussian"]

#: Default tile core of a 2D model, (z, y, x) voxels: for the valid 2D U-Net (88 px of context) the
#: model computes 1116^2 input voxels per 1024^2 output voxels (1.19x; 1.39x at 512^2, 1.85x at 256^2).
#: On a CPU smaller tiles stay in cache: :data:`DEFAULT_TILE_2D_CPU` (``emseg.predict`` picks by device).
DEFAULT_TILE_2D = (1, 1024, 1024)
#: Bundled 2D U-Net, bf16, 1 thread, same run (benchmarks/README.md): output Mvoxel/s 3.35 (256^2 tiles),
#: 3.10 (512^2), 3.45 (768^2), 2.81 (1024^2); 512 also divides the usual section sizes (no wasted tiles).
DEFAULT_TILE_2D_CPU = (1, 512, 512)
DEFAULT_TILE_3D = (64, 64, 64)

DEFAULT_BLOCK_3D = (64, 256, 256)
DEFAULT_BLOCK_2D = (4, 512, 512)  # rounded up to the 2D tile (1024): 4 Mvoxel, enough blocks to share
DEFAULT_CHUNKS_3D = (64, 128, 128)
DEFAULT_CHUNKS_2D = (4, 256, 256)
#: 2-D models: a block as deep as the input's z-chunks (up to this depth), so that each input chunk is
#: decompressed once rather than once per 4-section block (`emseg import` writes 32-deep chunks).  From
#: 16-deep chunks, read + write took 49 ms per Mvoxel in 4-deep blocks and 20 ms in 16-deep ones
#: ~7% of a block of the base-16 same-padded U-Net, ~2% of the bundled base-32 model.
MAX_BLOCK_DEPTH_2D = 64
#: ... as long as the volume still has this many blocks, so that workers that run at different speeds
#: (shared cores) still finish together: on 32x1024x1024 with 2 workers, 8 blocks of 16 sections took
#: 7.6-8.6 s, 16 of 8 sections 7.0-7.7 s and 32 of 4 sections 6.6-7.3 s (same-padded U-Net).
MIN_BLOCKS = 32
DEFAULT_BATCH_SIZE = 4
#: Automatic batch size: about this many model input voxels per forward pass (CPU, CUDA).  On a CPU one
#: tile already fills a worker's cores, and a smaller pass stays in cache: one 604^2 tile per pass ran
#: 1.5x the voxels/s of two (bf16, channels-last, 1 thread; `benchmarks/README.md`), so 2-D
#: CPU tiles go one at a time; a GPU wants several.
BATCH_INPUT_VOXELS = {"cpu": 400_000, "cuda": 8_000_000}


def default_batch_size(tiling: Tiling, device: str, tiles_per_block: int) -> int:
    """Tiles per forward pass: about :data:`BATCH_INPUT_VOXELS` input voxels, at most one block's tiles.

    Constant for a run (it is a plan parameter), so that every tile sees the same batch shape and the
    output is bit-identical for any block shape and worker count.
    """
    target = BATCH_INPUT_VOXELS["cuda" if device.startswith("cuda") else "cpu"]
    most = max(1, min(tiles_per_block, round(target / math.prod(tiling.input_shape))))
    # the largest batch up to that which divides a block's tiles: no zero-padded tiles in full blocks
    return next(b for b in range(most, 0, -1) if tiles_per_block % b == 0)


@dataclass(frozen=True, slots=True)
class Tiling:
    """How a run cuts the volume into model tiles (volume axes ``(z, y, x)``, voxels).

    Attributes
    ----------
    tile_shape : Coordinate
        Spacing of the global tile grid: the core each tile owns.
    input_shape : Coordinate
        Model input per tile (z is 1 for 2D models).
    input_offset : Coordinate
        The input starts this many voxels before the tile's core (the low-side halo).
    output_shape : Coordinate
        Model output per tile.
    output_offset : Coordinate
        The output starts this many voxels before the tile's core (0 for "valid" models).
    blend : {"crop", "gaussian"}
        Crop each output to its core, or blend whole outputs with a Gaussian weight.
    model_ndim : int
        2 (the model sees ``(y, x)`` slices) or 3.
    volume_shape : Coordinate
        Shape of the volume; tiles exist for ``0 <= k * tile_shape < volume_shape``.
    """

    tile_shape: Coordinate
    input_shape: Coordinate
    input_offset: Coordinate
    output_shape: Coordinate
    output_offset: Coordinate
    blend: Blend
    model_ndim: int
    volume_shape: Coordinate

    @property
    def halo(self) -> tuple[Coordinate, Coordinate]:
        """Context read on the (low, high) side of a tile's core, voxels per axis."""
        hi = tuple(i - o - t for i, o, t in zip(self.input_shape, self.input_offset, self.tile_shape))
        return self.input_offset, hi

    @property
    def block_halo(self) -> tuple[Coordinate, Coordinate]:
        """Context a block reads on the (low, high) side of its core rounded out to whole tiles, voxels.

        The tiles' input :attr:`halo`, plus with Gaussian blending the neighbouring tiles whose
        outputs reach into the core.  A grid planned with ``plan_blocks(..., halo=tiling.block_halo,
        snap=tiling.tile_shape)`` gives each block a ``read_roi`` that contains :meth:`read_roi` of its
        core (equal to it away from the volume's borders, where fewer Gaussian tiles exist).
        """
        lo, hi = self.halo
        if self.blend == "crop":
            return lo, hi
        extra_lo, extra_hi = [], []
        for before, out, t in zip(self.output_offset, self.output_shape, self.tile_shape):
            after = out - before - t
            extra_lo.append(-(-max(0, after) // t) * t)  # tiles before the core whose output reaches in
            extra_hi.append(-(-max(0, before) // t) * t)  # and after it
        return (tuple(a + e for a, e in zip(lo, extra_lo)), tuple(a + e for a, e in zip(hi, extra_hi)))

    @property
    def grid_shape(self) -> Coordinate:
        return tuple(-(-v // t) for v, t in zip(self.volume_shape, self.tile_shape))

    def tile_ranges(self, write_roi: Roi) -> list[range]:
        """Per axis, the tile indices a block with this core must compute."""
        ranges = []
        for axis, (b, e, t) in enumerate(zip(write_roi.begin, write_roi.end, self.tile_shape)):
            if self.blend == "crop":
                lo, hi = b // t, -(-e // t)
            else:  # every tile whose whole output overlaps the core
                before = self.output_offset[axis]
                after = self.output_shape[axis] - before - t
                lo, hi = max(0, (b - after) // t), min(self.grid_shape[axis], -(-(e + before) // t))
            ranges.append(range(lo, hi))
        return ranges

    def tiles(self, write_roi: Roi) -> list[Coordinate]:
        """Origins (first core voxel) of the tiles a block computes, in global C order."""
        ranges = self.tile_ranges(write_roi)
        return [tuple(k * t for k, t in zip(index, self.tile_shape)) for index in itertools.product(*ranges)]

    def read_roi(self, write_roi: Roi) -> Roi:
        """The region a block reads: the union of its tiles' inputs (may reach past the volume)."""
        ranges = self.tile_ranges(write_roi)
        begin = tuple(r.start * t - o for r, t, o in zip(ranges, self.tile_shape, self.input_offset))
        end = tuple((r.stop - 1) * t - o + i for r, t, o, i in zip(ranges, self.tile_shape, self.input_offset, self.input_shape))
        return Roi.from_bounds(begin, end)


def make_tiling(
    model: Any,
    volume_shape: Sequence[int],
    *,
    tile_shape: Sequence[int] | None = None,
    halo: Sequence[int] | None = None,
) -> Tiling:
    """Derive the tiling of a run from the model's geometry.

    Parameters
    ----------
    model : SegmentationModel
        Declares ``ndim``, ``padding``, ``input_multiple``, ``context``, ``receptive_field``,
        ``valid_input_shape()`` and ``output_shape()``.
    volume_shape : Coordinate
        ``(z, y, x)`` voxels.
    tile_shape : Coordinate, optional
        Core of one tile, ``(z, y, x)``; rounded up to the model's input multiple and clipped to
        the volume (rounded up).  Default :data:`DEFAULT_TILE_3D` for 3D models,
        :data:`DEFAULT_TILE_2D` for 2D.
    halo : Coordinate, optional
        "same"-padded models only: context around each tile, rounded up to the input multiple.
        Default ``ceil(receptive_field / 2)``, capped at half the tile.  Where it is smaller than
        half the receptive field, tiles are blended with a Gaussian weight.  "valid" models always
        use ``model.context``.

    Raises
    ------
    GeometryError
        The volume is too small for the model's context, or a halo was given for a "valid" model.
    """
    vol = tuple(int(v) for v in volume_shape)
    if len(vol) != 3:
        raise GeometryError(f"expected a (z, y, x) volume shape, got {vol}")
    nd = int(model.ndim)
    lead = 3 - nd  # 1 for a 2D model: the z axis is not seen by the model
    multiple = (1,) * lead + tuple(model.input_multiple)
    tile: Coordinate
    if tile_shape is None:
        tile = DEFAULT_TILE_3D if nd == 3 else DEFAULT_TILE_2D
    else:
        tile = tuple(int(t) for t in tile_shape)
        if len(tile) != 3 or any(t < 1 for t in tile):
            raise GeometryError(f"tile shape must be 3 positive values (z, y, x), got {tile}")
    if nd == 2:
        tile = (1,) + tile[1:]
    tile = tuple(min(t, r) for t, r in zip(round_up(tile, multiple), round_up(vol, multiple)))
    if model.padding == "valid":
        if halo is not None and tuple(halo)[lead:] != tuple(model.context):
            raise GeometryError(
                f"a 'valid'-padded model needs exactly its context {tuple(model.context)} as halo, got "
                f"{tuple(halo)}; leave --halo out"
            )
        ctx: Coordinate = tuple(model.context)
        in_shape = model.valid_input_shape(tuple(t + 2 * c for t, c in zip(tile[lead:], ctx)))
        out_shape = model.output_shape(in_shape)
        input_offset: Coordinate = (0,) * lead + ctx
        output_offset: Coordinate = (0,) * 3
        blend: Blend = "crop"
    else:
        need = tuple(-(-r // 2) for r in model.receptive_field)
        if halo is None:
            h = tuple(min(n, max(m, t // 2)) for n, m, t in zip(need, multiple[lead:], tile[lead:]))
        else:
            h = tuple(int(v) for v in halo)[lead:] if len(tuple(halo)) == 3 else tuple(int(v) for v in halo)
            if len(h) != nd or any(v < 0 for v in h):
                raise GeometryError(f"halo must be 3 non-negative values (z, y, x), got {tuple(halo)}")
        h = round_up(h, multiple[lead:])
        in_shape = model.valid_input_shape(tuple(t + 2 * v for t, v in zip(tile[lead:], h)))
        out_shape = model.output_shape(in_shape)
        input_offset = output_offset = (0,) * lead + h
        blend = "crop" if all(v >= n for v, n in zip(h, need)) else "gaussian"
    in3 = (1,) * lead + tuple(in_shape)
    out3 = (1,) * lead + tuple(out_shape)
    low = input_offset
    too_small = [a for a in range(3) if vol[a] <= low[a]]
    if too_small:
        raise GeometryError(
            f"the volume {vol} is too small for the model: along axes {too_small} it must be larger than the "
            f"context {low} the model needs on each side (mirroring would reflect more than once); "
            f"use a larger volume{' or a 2D model' if 0 in too_small else ''}"
        )
    return Tiling(tile, in3, input_offset, out3, output_offset, blend, nd, vol)


def tiles_in_block(tiling: Tiling, write_roi: Roi) -> int:
    """Number of tiles a block computes."""
    return math.prod(len(r) for r in tiling.tile_ranges(write_roi))


def _lcm(a: Sequence[int], b: Sequence[int]) -> Coordinate:
    return tuple(math.lcm(int(x), int(y)) for x, y in zip(a, b))


def _section_block_depth(shape: Coordinate, input_chunks: Coordinate, block: Coordinate, multiple: int) -> int:
    """Sections per block of a 2-D model: the input's z-chunk depth (rounded up to ``multiple``, the
    output chunk depth) or a divisor of it, the deepest that leaves :data:`MIN_BLOCKS` blocks; else
    ``block[0]``.  The depth does not change the values, only how often a chunk is decompressed."""
    depth = round_up((min(input_chunks[0], shape[0]),), (multiple,))[0]
    for d in range(min(depth, MAX_BLOCK_DEPTH_2D), block[0], -1):
        if depth % d or d % multiple:
            continue
        blocks = math.prod(-(-s // b) for s, b in zip(shape, (d,) + tuple(block[1:])))
        if blocks >= MIN_BLOCKS:
            return d
    return block[0]


def plan_block_grid(volume_shape: Coordinate, input_chunks: Coordinate, tiling: Tiling, *,
                    block_size: Coordinate | None = None, chunks: Coordinate | None = None) -> tuple[BlockGrid, Coordinate]:
    """The run's blocks and output chunks: ``block_size`` (whole tiles and chunks) or the default
    block of the model's kind (2-D models: deeper to match the input's z-chunks, :func:`_section_block_depth`),
    and ``chunks`` or the default chunks (dividing a given block), clipped to the block.

    Raises
    ------
    GeometryError
        ``block_size`` is smaller than the tile core on an axis where the volume is not.
    """
    two_d = tiling.model_ndim == 2
    block: Coordinate
    chunk: Coordinate
    if block_size is not None:
        block = block_size
        small = [a for a in range(3) if block[a] < tiling.tile_shape[a] and block[a] < volume_shape[a]]
        if small:
            raise GeometryError(
                f"block shape {block} is smaller than the model's tile core {tiling.tile_shape} on axes {small}; "
                f"use a block of at least {tuple(max(b, t) for b, t in zip(block, tiling.tile_shape))} "
                "(or a smaller --tile-size)"
            )
    if chunks is not None:
        chunk = chunks
    else:
        chunk = DEFAULT_CHUNKS_2D if two_d else DEFAULT_CHUNKS_3D
        if block_size is not None:  # the default chunk must divide the block the user chose
            chunk = tuple(math.gcd(c, b) for c, b in zip(chunk, block))
    if block_size is None:
        block = round_up(DEFAULT_BLOCK_2D if two_d else DEFAULT_BLOCK_3D, _lcm(chunk, tiling.tile_shape))
        if two_d:
            block = (_section_block_depth(volume_shape, input_chunks, block, chunk[0]),) + block[1:]
    grid = plan_blocks(Roi.from_shape(volume_shape), block, tiling.block_halo,
                       chunk_shape=chunk, multiple=tiling.tile_shape, snap=tiling.tile_shape)
    return grid, tuple(min(c, b) for c, b in zip(chunk, grid.block_shape))


def count_tiles(grid: BlockGrid, tiling: Tiling, batch_size: int, tta: bool) -> tuple[int, int]:
    """(tiles, model input voxels computed) over all blocks, padding tiles and TTA included."""
    # Blocks differ only in whether they are the last along an axis: group them by that.
    per_axis: list[dict[int, int]] = []
    for axis in range(3):
        counts: dict[int, int] = {}
        for i in range(grid.grid_shape[axis]):
            b = i * grid.block_shape[axis]
            e = min(b + grid.block_shape[axis], grid.total_roi.shape[axis])
            lo_hi = Roi((0, 0, 0), (1, 1, 1))
            begin = list(lo_hi.begin)
            shape = list(lo_hi.shape)
            begin[axis], shape[axis] = b, e - b
            n = len(tiling.tile_ranges(Roi(tuple(begin), tuple(shape)))[axis])
            counts[n] = counts.get(n, 0) + 1
        per_axis.append(counts)
    tiles = computed = 0
    flips = 2**tiling.model_ndim if tta else 1
    for (nz, cz), (ny, cy), (nx, cx) in _product_items(per_axis):
        n = nz * ny * nx
        blocks = cz * cy * cx
        tiles += n * blocks
        computed += -(-n // batch_size) * batch_size * math.prod(tiling.input_shape) * flips * blocks
    return tiles, computed


def _product_items(per_axis: list[dict[int, int]]) -> Iterator[tuple[tuple[int, int], ...]]:
    return itertools.product(*(list(d.items()) for d in per_axis))


def memory_estimate(grid: BlockGrid, tiling: Tiling, batch_size: int, tta: bool, c_in: int, c_out: int,
                     in_bytes: int, dtype: str, model_cfg: dict[str, Any]) -> int:
    first = grid.block(0)
    read = first.read_roi.size
    core = first.write_roi.size
    arrays = read * c_in * (in_bytes + 4)  # raw + normalised float32
    arrays += core * c_out * (4 + (1 if dtype == "uint8" else 2 if dtype == "float16" else 4))
    if tiling.blend == "gaussian":
        arrays += core * 4
    tile_in = math.prod(tiling.input_shape)
    tensors = batch_size * (tile_in * c_in + math.prod(tiling.output_shape) * c_out * (2 if tta else 1)) * 4
    # activations: a few full-resolution feature maps of the first level live at once
    width = int(model_cfg.get("base_channels", 32))
    activations = batch_size * tile_in * width * 4 * 4
    return arrays + tensors + activations
