"""The plan of an ``emseg predict`` run: model, tiles, blocks, batch, precision and memory, computed
before any work starts (``--dry-run`` prints it).  Arithmetic over shapes and metadata; nothing is
written and no model runs here."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emseg.config import PredictOptions
from emseg.engine.runstate import file_digest
from emseg.errors import (
    ConfigError,
    VolumeShapeError,
)
from emseg.geometry import BlockGrid, Coordinate, Roi, coarse_yx, downsample_factor, fine_yx
from emseg.io.location import Location, PathOrUrl, absolute
from emseg.ops.inference import OutputDtype, Precision, resolve_precision
from emseg.ops.tiling import (
    DEFAULT_CHUNKS_2D,
    DEFAULT_CHUNKS_3D,
    DEFAULT_TILE_2D_CPU,
    Tiling,
    count_tiles,
    default_batch_size,
    make_tiling,
    memory_estimate,
    plan_block_grid,
    tiles_in_block,
)

log = logging.getLogger(__name__)

STAGE = "predict"
BUNDLED = Path(__file__).parents[2] / "models" / "bundled"
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




def _in_model_voxels(shape: tuple[int, int, int] | None, factor: int, what: str) -> tuple[int, int, int] | None:
    """A block or chunk shape given in the input's voxels, in the model's (y and x divided by ``factor``)."""
    if shape is None or factor == 1:
        return shape
    if shape[1] % factor or shape[2] % factor:
        raise ConfigError(f"{what} {','.join(map(str, shape))} is not a multiple of the model's in-plane "
                          f"downsampling {factor} in y and x; use a multiple, or --downsample 1")
    return coarse_yx(shape, factor)


def _on_input_voxels(grid: BlockGrid, factor: int, shape: Coordinate) -> BlockGrid:
    """The blocks of ``grid`` (the model's voxels) on the input's voxels of ``shape``: every core, halo
    and tile ``factor`` times larger in y and x, so that a block reads exactly its model-voxel region."""
    if factor == 1:
        return grid
    return BlockGrid(Roi.from_shape(shape), fine_yx(grid.block_shape, factor), fine_yx(grid.halo, factor),
                     None if grid.halo_hi is None else fine_yx(grid.halo_hi, factor),
                     None if grid.snap is None else fine_yx(grid.snap, factor))


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
    def downsample(self) -> int:
        """In-plane factor of the model's voxels over the input's (1: the input's own)."""
        return self.options.downsample or 1

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
            f"halo       {fmt(lo)} before, {fmt(hi)} after each tile"
            + (f" (model voxels: the sections downsampled {self.downsample}x in y and x)" if self.downsample > 1 else ""),
            f"voxels     {self.output_voxels:,} output, {self.computed_voxels:,} computed "
            f"({self.computed_voxels / max(self.output_voxels, 1):.2f}x)",
            f"memory     ~{self.memory_per_block / 2**20:.0f} MiB per block per worker (estimate)",
            f"output     {self.dtype}, {self.out_channels} channel(s)",
        ]
        return "\n".join(lines)


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
        models) or ``4,512,512`` (2D; deeper to match the input's z-chunks, :func:`emseg.ops.tiling.plan_block_grid`) rounded
        up to the chunks and tile, the tile of
        :func:`emseg.ops.tiling.make_tiling` (2D models on a CPU: ``DEFAULT_TILE_2D_CPU``), chunks
        ``64,128,128`` / ``4,256,256`` clipped to the block, :func:`emseg.ops.tiling.default_batch_size`, and the
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
    factor = downsample_factor(opts.downsample, cfg.run_voxel_size_nm, volume.voxel_size)
    if cfg.voxel_size_nm is not None and model_choice is None:  # the automatic choice warned already
        trained = tuple(cfg.voxel_size_nm)[-model.ndim :]
        have = tuple(volume.voxel_size)[-model.ndim :]
        if any(abs(a - b) > 0.05 * b for a, b in zip(have, trained)):
            log.warning("%s has voxel size %s nm but the model was trained at %s nm", volume_path, have, trained)
    if factor > 1:
        log.info("the model runs at %g nm in y and x: the sections are downsampled %dx", cfg.run_voxel_size_nm, factor)
        block_size = _in_model_voxels(block_size, factor, "--block-size")
        chunks = _in_model_voxels(chunks, factor, "--chunks")
        tile_size = None if tile_size is None else coarse_yx(tile_size, factor, up=True)
        halo = None if halo is None else coarse_yx(halo, factor, up=True)
        if chunks is None and block_size is None:  # the output keeps the default chunks of the input's voxels
            z, y, x = DEFAULT_CHUNKS_2D if model.ndim == 2 else DEFAULT_CHUNKS_3D
            chunks = (z, max(1, y // factor), max(1, x // factor))
    model_shape = coarse_yx(volume.shape, factor, up=True)
    if tile_size is None and model.ndim == 2 and not device.startswith("cuda"):
        tile_size = DEFAULT_TILE_2D_CPU  # a GPU takes make_tiling's larger default
    tiling = make_tiling(model, model_shape, tile_shape=tile_size, halo=halo)
    model_grid, chunk = plan_block_grid(model_shape, volume.chunks, tiling, block_size=block_size, chunks=chunks)
    grid, chunk = _on_input_voxels(model_grid, factor, volume.shape), fine_yx(chunk, factor)
    if batch_size is None:
        batch_size = default_batch_size(tiling, device, tiles_in_block(tiling, model_grid.block(0).write_roi))
    tiles, computed = count_tiles(model_grid, tiling, batch_size, opts.tta)
    resolved = opts.model_copy(update=dict(model=str(ckpt_dir), downsample=factor, block_size=grid.block_shape,
                                           tile_size=fine_yx(tiling.tile_shape, factor),
                                           halo=fine_yx(tiling.input_offset, factor), chunks=chunk,
                                           batch_size=batch_size, precision=precision))
    params = {
        "stage": STAGE,
        "source": str(absolute(volume_path)),
        "volume_shape": list(volume.shape),
        "checkpoint_sha256": file_digest(ckpt_dir / "model.safetensors"),
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
        memory_per_block=memory_estimate(grid, tiling, batch_size, opts.tta, in_channels, len(cfg.outputs),
                                          volume.dtype.itemsize, dtype, cfg.model),
        params=params, model_choice=model_choice,
    )
