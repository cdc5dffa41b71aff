"""The plan of an ``emseg predict`` run: model, tiles, blocks, batch, precision and memory, computed
before any work starts (``--dry-run`` prints it).  Arithmetic over shapes and metadata; nothing is
written and no model runs here."""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emseg.config import PredictOptions
from emseg.errors import (
    ConfigError,
    GeometryError,
    VolumeShapeError,
)
from emseg.geometry import BlockGrid, Coordinate, Roi, plan_blocks, round_up
from emseg.io.location import Location, PathOrUrl, absolute
from emseg.ops.inference import (
    DEFAULT_TILE_2D_CPU,
    OutputDtype,
    Precision,
    Tiling,
    make_tiling,
    resolve_precision,
    tiles_in_block,
)

log = logging.getLogger(__name__)

STAGE = "predict"
BUNDLED = Path(__file__).parents[2] / "models" / "bundled"
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


def target_device(cluster: str | os.PathLike[str] | None = None, devices: Sequence[int] | None = None,
                  client: Any = None) -> str:
    """Where the blocks will run, ``"cuda"`` or ``"cpu"``, to choose the automatic precision and batch."""
    from emseg.cluster import Connection, load_profile, visible_gpus

    if isinstance(client, Connection):
        return "cuda" if client.resources and "GPU" in client.resources else "cpu"
    if devices:
        return "cuda"
    if cluster is not None:
        profile = load_profile(cluster)
        if profile.kind == "local-gpu":
            return "cuda"
        if profile.kind == "slurm":
            return "cuda" if profile.slurm.gpus_per_job else "cpu"
    return "cuda" if visible_gpus() else "cpu"


def default_checkpoint(voxel_size: Sequence[float] | None = None) -> Path:
    """The bundled checkpoint for a volume of ``voxel_size`` ``(z, y, x)`` nm (``None``: unknown).

    Strongly anisotropic volumes get the 2-D ssTEM membrane model (``emseg/models/bundled``),
    near-isotropic ones the 3-D FIB-SEM affinity model (``bundled/fib3d``); see
    :func:`emseg.models.zoo.choose_bundled`, which also warns when the voxel size is far from the
    chosen model's training resolution.

    Raises
    ------
    ConfigError
        No bundled model is installed.
    """
    return _choose_bundled(voxel_size)[0]


def model_path(model: str | os.PathLike[str]) -> Path:
    """A checkpoint path, or the name of a bundled model (``sstem2d``, ``fib3d``) where no such path exists."""
    from emseg.models.zoo import bundled_path

    path = Path(model)
    if not path.exists():
        named = bundled_path(str(model), root=BUNDLED)
        if named is not None:
            return named
    return path


def _choose_bundled(voxel_size: Sequence[float] | None) -> tuple[Path, str]:
    from emseg.models.zoo import choose_bundled

    choice = choose_bundled(voxel_size, root=BUNDLED)
    log.info("bundled model %s: %s", choice.model.path, choice.reason)
    if choice.warning:
        log.warning("%s", choice.warning)
    return choice.model.path, f"bundled {choice.model.name} ({choice.reason})"




@dataclass(frozen=True)
class PredictionPlan:
    """Everything a prediction run will do, computed before any work starts (``--dry-run``).

    Attributes
    ----------
    volume, checkpoint : Path
        Input volume and checkpoint directory.
    grid : BlockGrid
        Blocks over the whole volume; each ``Block.read_roi`` is what its worker reads (``tiling.block_halo``).
    tiling : Tiling
        The global tile grid (tile core, model input and output shapes).
    options : PredictOptions
        The run's options with every default resolved (block, tile, halo, chunks, batch size,
        precision); its :meth:`~emseg.config.Options.fingerprint` is part of ``params``.
    out_channels : int
        Output channels, named by ``outputs``.
    output_voxels : int
        Voxels written (spatial, per channel).
    computed_voxels : int
        Model input voxels processed, padding tiles and TTA flips included.
    memory_per_block : int
        Rough peak bytes one worker needs for a block (arrays plus an activation estimate).
    params : dict
        What determines the output; its hash decides resume versus ``ResumeMismatchError``.
    """

    volume: Location
    checkpoint: Path
    volume_shape: Coordinate
    volume_dtype: str
    voxel_size: tuple[float, ...]
    grid: BlockGrid
    tiling: Tiling
    options: PredictOptions
    model_name: str
    padding: str
    outputs: tuple[str, ...]
    activation: str
    mean: float
    std: float
    output_voxels: int
    computed_voxels: int
    tiles: int
    memory_per_block: int
    params: dict[str, Any] = field(repr=False)
    model_choice: str | None = None
    """Why this model, when it was chosen from the bundled ones (no ``--model``)."""

    @property
    def out_channels(self) -> int:
        return len(self.outputs)

    @property
    def chunks(self) -> Coordinate:
        """Spatial chunk shape of the output, ``(z, y, x)``; divides the block shape."""
        assert self.options.chunks is not None  # resolved by plan_prediction
        return self.options.chunks

    @property
    def batch_size(self) -> int:
        assert self.options.batch_size is not None  # resolved by plan_prediction
        return self.options.batch_size

    @property
    def tta(self) -> bool:
        return self.options.tta

    @property
    def precision(self) -> Precision:
        assert self.options.precision != "auto"  # resolved by plan_prediction
        return self.options.precision

    @property
    def dtype(self) -> OutputDtype:
        return self.options.dtype

    def summary(self) -> str:
        t = self.tiling
        lo, hi = t.halo

        def fmt(c: Sequence[int]) -> str:
            return "x".join(map(str, c))

        lines = [
            f"input      {self.volume}  {fmt(self.volume_shape)} {self.volume_dtype}, voxel size "
            f"{','.join(f'{v:g}' for v in self.voxel_size)} nm",
            f"model      {self.checkpoint}  {self.model_name} ({t.model_ndim}D, {self.padding}), outputs "
            f"{','.join(self.outputs)} ({self.activation})"
            + (f"\n           {self.model_choice}" if self.model_choice else ""),
            f"blocks     {len(self.grid)} of {fmt(self.grid.block_shape)} (grid {fmt(self.grid.grid_shape)}), "
            f"output chunks {fmt(self.chunks)}",
            f"tiles      {self.tiles} of core {fmt(t.tile_shape)}, model input {fmt(t.input_shape)}, output "
            f"{fmt(t.output_shape)}, {t.blend}; batch {self.batch_size}{', flip TTA' if self.tta else ''}, {self.precision}",
            f"halo       {fmt(lo)} before, {fmt(hi)} after each tile",
            f"voxels     {self.output_voxels:,} output, {self.computed_voxels:,} computed "
            f"({self.computed_voxels / max(self.output_voxels, 1):.2f}x)",
            f"memory     ~{self.memory_per_block / 2**20:.0f} MiB per block per worker (estimate)",
            f"output     {self.dtype}, {self.out_channels} channel(s)",
        ]
        return "\n".join(lines)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _lcm(a: Sequence[int], b: Sequence[int]) -> Coordinate:
    return tuple(math.lcm(int(x), int(y)) for x, y in zip(a, b))


def _block_depth_2d(shape: Coordinate, input_chunks: Coordinate, block: Coordinate, multiple: int) -> int:
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


def plan_prediction(
    volume_path: PathOrUrl,
    options: PredictOptions | None = None,
    *,
    device: str | None = None,
    voxel_size: Sequence[float] | None = None,
    **fields: Any,
) -> PredictionPlan:
    """Plan a prediction run without computing anything.

    Parameters
    ----------
    volume_path : path
        Input volume (any :func:`emseg.io.open_volume` path), ``(z, y, x)`` or ``(c, z, y, x)``.
    options : PredictOptions, optional
        The run's options (:class:`emseg.config.PredictOptions`: ``model`` (alias ``checkpoint``),
        ``block_size``, ``tile_size``, ``halo``, ``chunks``, ``batch_size``, ``tta``, ``precision``,
        ``dtype``); ``**fields`` replace single ones.  Defaults left ``None`` are resolved here: the
        bundled model for the voxel size (:func:`default_checkpoint`), block ``64,256,256`` (3D
        models) or ``4,512,512`` (2D; deeper to match the input's z-chunks, :func:`_block_depth_2d`) rounded
        up to the chunks and tile, the tile of
        :func:`emseg.ops.inference.make_tiling` (2D models on a CPU: ``DEFAULT_TILE_2D_CPU``), chunks
        ``64,128,128`` / ``4,256,256`` clipped to the block, :func:`default_batch_size`, and the
        precision of :func:`emseg.ops.inference.resolve_precision`.
    device : {"cpu", "cuda"}, optional
        Where the blocks will run (for the automatic precision and batch size); default: CUDA if
        this process sees a GPU.
    voxel_size : tuple of float, optional
        ``(z, y, x)`` nm replacing the input's metadata (``--voxel-size``): picks the bundled model and
        goes to the output.

    Raises
    ------
    EmsegError
        Unreadable volume or checkpoint, channel mismatch, block or volume too small, bad option.
    """
    from emseg.io import open_volume
    from emseg.models import load_checkpoint

    opts = PredictOptions.build(options, **fields)
    block_size, tile_size, halo, chunks = opts.block_size, opts.tile_size, opts.halo, opts.chunks
    batch_size, dtype = opts.batch_size, opts.dtype
    device = device or target_device()
    precision = resolve_precision(opts.precision, device)
    volume = open_volume(volume_path, voxel_size=voxel_size)
    model_choice = None  # no --model: the bundled model matching the volume's voxel size
    if opts.model is None:
        ckpt_dir, model_choice = _choose_bundled(volume.voxel_size)
    else:
        ckpt_dir = model_path(opts.model)
    ckpt = load_checkpoint(ckpt_dir)
    model, cfg = ckpt.model, ckpt.config
    ckpt_dir = ckpt_dir if ckpt_dir.is_dir() else ckpt_dir.parent
    in_channels = volume.channels or 1
    if in_channels != model.in_channels:
        raise VolumeShapeError(
            f"{volume_path} has {in_channels} channel(s) but the model {ckpt_dir} expects "
            f"{model.in_channels}; use a checkpoint trained on {in_channels}-channel input"
        )
    if cfg.activation == "none" and dtype == "uint8":
        raise ConfigError(f"{ckpt_dir} outputs raw logits (activation 'none'), which uint8 cannot hold; "
                          "pass --dtype float16 or float32")
    if volume.dtype.kind not in "uf" or (volume.dtype.kind == "u" and volume.dtype.itemsize > 2):
        raise VolumeShapeError(f"{volume_path}: cannot predict on {volume.dtype} input; expected uint8, uint16 or float")
    if cfg.voxel_size_nm is not None and model_choice is None:  # the automatic choice warned already
        trained = tuple(cfg.voxel_size_nm)[-model.ndim :]
        have = tuple(volume.voxel_size)[-model.ndim :]
        if any(abs(a - b) > 0.05 * b for a, b in zip(have, trained)):
            log.warning("%s has voxel size %s nm but the model was trained at %s nm", volume_path, have, trained)
    if tile_size is None and model.ndim == 2 and not device.startswith("cuda"):
        tile_size = DEFAULT_TILE_2D_CPU  # a GPU takes make_tiling's larger default
    tiling = make_tiling(model, volume.shape, tile_shape=tile_size, halo=halo)
    two_d = model.ndim == 2
    block: Coordinate
    chunk: Coordinate
    if block_size is not None:
        block = block_size
        small = [a for a in range(3) if block[a] < tiling.tile_shape[a] and block[a] < volume.shape[a]]
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
            block = (_block_depth_2d(volume.shape, volume.chunks, block, chunk[0]),) + block[1:]
    grid = plan_blocks(Roi.from_shape(volume.shape), block, tiling.block_halo,
                       chunk_shape=chunk, multiple=tiling.tile_shape, snap=tiling.tile_shape)
    chunk = tuple(min(c, b) for c, b in zip(chunk, grid.block_shape))
    if batch_size is None:
        batch_size = default_batch_size(tiling, device, tiles_in_block(tiling, grid.block(0).write_roi))
    tiles, computed = _count_tiles(grid, tiling, batch_size, opts.tta)
    resolved = opts.model_copy(update=dict(model=str(ckpt_dir), block_size=grid.block_shape,
                                           tile_size=tiling.tile_shape, halo=tiling.input_offset, chunks=chunk,
                                           batch_size=batch_size, precision=precision))
    params = {
        "stage": STAGE,
        "source": str(absolute(volume_path)),
        "volume_shape": list(volume.shape),
        "checkpoint_sha256": _file_digest(ckpt_dir / "model.safetensors"),
        "model": cfg.model,
        "outputs": list(cfg.outputs),
        "activation": cfg.activation,
        "normalization": [cfg.normalization.mean, cfg.normalization.std],
        "tile_input": list(tiling.input_shape),
        "blend": tiling.blend,
        **resolved.fingerprint(),
    }
    if voxel_size is not None:  # an override is part of what the output holds (its metadata)
        params["voxel_size"] = list(volume.voxel_size)
    return PredictionPlan(
        volume=absolute(volume_path), checkpoint=ckpt_dir, volume_shape=volume.shape, volume_dtype=str(volume.dtype),
        voxel_size=volume.voxel_size, grid=grid, tiling=tiling, options=resolved, model_name=str(cfg.model.get("name")), padding=model.padding,
        outputs=tuple(cfg.outputs), activation=cfg.activation, mean=cfg.normalization.mean,
        std=cfg.normalization.std, output_voxels=math.prod(volume.shape), computed_voxels=computed, tiles=tiles,
        memory_per_block=_memory_estimate(grid, tiling, batch_size, opts.tta, in_channels, len(cfg.outputs),
                                          volume.dtype.itemsize, dtype, cfg.model),
        params=params, model_choice=model_choice,
    )


def _count_tiles(grid: BlockGrid, tiling: Tiling, batch_size: int, tta: bool) -> tuple[int, int]:
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
    import itertools

    return itertools.product(*(list(d.items()) for d in per_axis))


def _memory_estimate(grid: BlockGrid, tiling: Tiling, batch_size: int, tta: bool, c_in: int, c_out: int,
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
