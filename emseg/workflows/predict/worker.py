"""The worker side of ``emseg predict``: what one task does with one block (read with its halo, run
the model, write the core), with the per-worker caches of the model and the opened volumes."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from emseg.config import PredictOptions
from emseg.errors import (
    EmsegError,
    InvalidDataError,
)
from emseg.geometry import Block, Roi, coarse_yx
from emseg.ops.tiling import Tiling, tiles_in_block

log = logging.getLogger(__name__)



class PredictConfig(BaseModel):
    """What a worker needs to predict one block; sent to the workers by value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str
    """Input volume path."""
    output: str
    """Output OME-Zarr image path (level 0 at ``output/0``)."""
    checkpoint: str
    """Checkpoint directory."""
    checkpoint_mtime_ns: int
    """Modification time of the weights, nanoseconds; part of the per-worker model cache key."""
    tiling: Tiling
    """The run's global tile grid."""
    options: PredictOptions
    """The run's options, every default resolved (:attr:`PredictionPlan.options`)."""
    threads: int
    """torch threads per CPU worker."""
    run: str = ""
    """This run's id: a worker keeps the volumes it opened for the run (:func:`_run_volume`); empty: none kept."""


_MODEL_CACHE: dict[tuple[str, int, str, str], tuple[Any, Any]] = {}
#: The volumes a worker opened for the current run, by (run, path, mode): opening reads and checks the
#: metadata, ~3-4 ms per volume and block on a local disk.  A run holds the output's lock, and
#: its input is read-only, so what was opened stays valid until the run ends.
_VOLUMES: dict[tuple[str, str, str], Any] = {}
#: One model load or forward pass at a time per worker process.  A GPU worker runs two blocks at once
#: (:func:`predict` asks for half a GPU per block): while one holds this lock on the GPU, the other
#: reads its input or writes its output, so zarr I/O overlaps with the model.
_COMPUTE = threading.Lock()
_OPENING = threading.Lock()


def _worker_model(config: PredictConfig) -> tuple[Any, Any]:
    """The checkpoint's model on this worker's device, loaded once per worker process."""
    import torch

    from emseg.models import load_checkpoint
    from emseg.ops.inference import prepare_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and torch.get_num_threads() != config.threads:
        torch.set_num_threads(config.threads)
    if device == "cuda":  # fp32 means fp32: no TF32 convolutions / matmuls behind its back
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = config.options.precision != "fp32"
    key = (config.checkpoint, config.checkpoint_mtime_ns, device, config.options.precision)  # bf16 on a CPU: fused
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()  # one model per worker
        ckpt = load_checkpoint(config.checkpoint)
        precision = None if config.options.precision == "auto" else config.options.precision  # resolved by the plan
        _MODEL_CACHE[key] = (prepare_model(ckpt.model, device, precision), ckpt.config)
        log.info("loaded %s on %s", config.checkpoint, device)
    return _MODEL_CACHE[key]


def compute_block(config: PredictConfig, raw: Any, read_roi: Roi, write_roi: Roi) -> Any:
    """The model's outputs for ``write_roi``, ``(c, z, y, x)`` in the output dtype, from the input ``raw``
    read over ``read_roi`` (mirrored beyond the volume): the compute of one block, shared by the
    workers (:func:`predict_block_task`) and the lazy dask path of :func:`emseg.predict` on arrays."""
    from emseg.ops.inference import downsample_sections, predict_block, repeat_sections, to_output_dtype

    options = config.options
    assert options.batch_size is not None and options.precision != "auto"  # resolved by plan_prediction
    factor = options.downsample or 1
    fine_shape = write_roi.shape
    if factor > 1:  # the block in the model's voxels: its read region is whole coarse voxels (plan_prediction)
        raw = downsample_sections(raw, factor)
        read_roi = Roi.from_bounds(coarse_yx(read_roi.begin, factor), coarse_yx(read_roi.end, factor))
        write_roi = Roi.from_bounds(coarse_yx(write_roi.begin, factor), coarse_yx(write_roi.end, factor, up=True))
    with _COMPUTE:
        model, cfg = _worker_model(config)
        values = predict_block(
            model, raw, raw_roi=read_roi, write_roi=write_roi, tiling=config.tiling,
            mean=cfg.normalization.mean, std=cfg.normalization.std, activation=cfg.activation,
            batch_size=options.batch_size, tta=options.tta, precision=options.precision,
        )
    return to_output_dtype(repeat_sections(values, factor, fine_shape), options.dtype)



def _run_volume(config: PredictConfig, path: str, mode: Literal["r", "r+"]) -> Any:
    """``open_volume(path)`` (the output: ``mode="r+"``, incomplete), opened once per worker and run."""
    from emseg.io import open_volume

    key = (config.run, path, mode)
    volume = _VOLUMES.get(key) if config.run else None
    if volume is None:
        volume = open_volume(path, mode=mode, allow_incomplete=mode == "r+")
        if config.run:
            with _OPENING:
                if any(k[0] != config.run for k in _VOLUMES):
                    _VOLUMES.clear()  # another run's: only the current run's are kept
                _VOLUMES[key] = volume
    return volume


def predict_block_task(config: PredictConfig, block: Block) -> dict[str, Any]:
    """Worker task: read the block's tiles' inputs, run the model, write the core.  Idempotent."""
    start = time.perf_counter()
    with _COMPUTE:
        _worker_model(config)  # loaded before the first read, so that reads overlap the other block's compute
    source = _run_volume(config, config.input, "r")
    read_roi = block.read_roi
    try:
        raw = source.read(read_roi, pad="reflect")
    except EmsegError:
        raise
    except (ValueError, RuntimeError, OSError, TypeError) as e:  # codec errors, truncated chunks
        raise InvalidDataError(f"{config.input}: cannot read {read_roi} for block {block.block_id}: "
                               f"{type(e).__name__}: {e}") from e
    try:
        values = compute_block(config, raw, read_roi, block.write_roi)
    except InvalidDataError as e:
        raise InvalidDataError(f"{config.input}: block {block.block_id} ({block.write_roi}): {e}") from e
    out = _run_volume(config, config.output, "r+")
    out.write(block.write_roi, values)
    return {"seconds": round(time.perf_counter() - start, 3), "tiles": tiles_in_block(config.tiling, block.write_roi)}
