"""``emseg predict``: run a checkpoint over a volume, block by block, into an OME-Zarr image.

Orchestration glue only: plan the tiles and blocks (:func:`plan_prediction`, in :mod:`.plan`), create
the output, hand one task per block (:func:`predict_block_task`, in :mod:`.worker`) to
:func:`emseg.engine.runner.run_blockwise`, and mark the output complete.
The compute lives in :mod:`emseg.ops.inference`; each worker loads the model once and keeps it.

A rerun of the same command resumes (finished blocks are skipped); a rerun with another model,
block layout or parameter is refused with :class:`~emseg.errors.ResumeMismatchError` unless
``overwrite``.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from emseg.config import PredictOptions, RunOptions
from emseg.engine.lock import locked
from emseg.errors import (
    ConfigError,
    InvalidDataError,
    RunIncompleteError,
)
from emseg.io.location import Location, PathOrUrl, absolute, location
from emseg.workflows.predict.plan import (
    BUNDLED,
    STAGE,
    PredictionPlan,
    default_checkpoint,
    plan_prediction,
    target_device,
)
from emseg.workflows.predict.worker import PredictConfig, compute_block, predict_block_task

if TYPE_CHECKING:
    from emseg.engine.follow import Progress
    from emseg.engine.runstate import OutputClaim

log = logging.getLogger(__name__)

__all__ = [
    "BUNDLED",
    "PredictConfig",
    "PredictOptions",
    "PredictReport",
    "PredictionPlan",
    "compute_block",
    "default_checkpoint",
    "plan_prediction",
    "predict",
    "predict_block_task",
    "target_device",
]


# ---------------------------------------------------------------------------------------------
# the run


@dataclass(frozen=True)
class PredictReport:
    """What a prediction run did.

    Attributes
    ----------
    output : Path
        The OME-Zarr image written.
    blocks, computed, skipped : int
        Blocks in the run; computed now; already done by an earlier run (resume).
    seconds : float
        Wall-clock time of the blockwise stage.
    voxels : int
        Output voxels computed now (spatial).
    plan : PredictionPlan
    dry_run : bool
        Nothing was computed or written.
    """

    output: Location
    blocks: int
    computed: int
    skipped: int
    seconds: float
    voxels: int
    plan: PredictionPlan = field(repr=False)
    dry_run: bool = False

    @property
    def voxels_per_second(self) -> float:
        return self.voxels / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        if self.dry_run:
            return self.plan.summary()
        rate = f", {self.voxels_per_second / 1e6:.2f} Mvoxel/s" if self.computed else ""
        model = f"\nmodel: {self.plan.model_choice}" if self.plan.model_choice else ""
        return (f"predicted {self.output}: {self.blocks} blocks ({self.computed} computed, {self.skipped} already "
                f"done) in {self.seconds:.1f} s{rate}{model}")

    def to_json(self) -> dict[str, Any]:
        return {"output": str(self.output), "blocks": self.blocks, "computed": self.computed,
                "skipped": self.skipped, "seconds": self.seconds, "voxels": self.voxels,
                "voxels_per_second": None if not self.computed else self.voxels_per_second,
                "dry_run": self.dry_run, "model": str(self.plan.checkpoint), "model_choice": self.plan.model_choice}


def output_claim(plan: PredictionPlan, output: Location, overwrite: bool, zarr_format: int | None = None) -> OutputClaim:
    """The prediction image ``output``: resumed when it holds this very run, else created (see
    :mod:`emseg.engine.runstate`)."""
    from emseg.engine.runstate import OutputClaim

    def create(record: dict[str, Any]) -> None:
        from emseg.io import create_volume, update_status

        fmt = zarr_format if zarr_format is not None else _zarr_format_of(plan.volume)
        create_volume(output, shape=plan.volume_shape, dtype=plan.dtype, chunks=plan.chunks,
                      voxel_size=plan.voxel_size, offset_nm=_volume_offset(plan.volume), channels=plan.out_channels,
                      overwrite=overwrite, name="predictions", zarr_format=fmt)  # type: ignore[arg-type]
        # The source is recorded as an absolute path, so that `emseg view` finds it from any folder.
        update_status(output, stage=record["stage"], source=str(absolute(plan.volume)), params=record["params"],
                      outputs=list(plan.outputs), checkpoint=str(plan.checkpoint))

    return OutputClaim(output, plan.params, kind="prediction", what="an earlier prediction", create=create,
                       stage=STAGE, others="a raw image or labels", overwrite=overwrite)


def _zarr_format_of(path: Location) -> int:
    """2 or 3: the zarr format of a volume (outputs follow their input unless told otherwise)."""
    from emseg.io import open_volume

    metadata = getattr(open_volume(path).array, "metadata", None)  # precomputed/N5 inputs: zarr v3 outputs
    return int(metadata.zarr_format) if metadata is not None else 3


def _volume_offset(path: Location) -> tuple[float, ...]:
    from emseg.io import open_volume

    return open_volume(path).offset_nm


@locked("output_path", "predict")
def predict(
    volume_path: PathOrUrl,
    output_path: PathOrUrl,
    options: PredictOptions | None = None,
    *,
    run: RunOptions | None = None,
    dry_run: bool = False,
    zarr_format: int | None = None,
    voxel_size: Sequence[float] | None = None,
    posts: Progress | None = None,
    **fields: Any,
) -> PredictReport:
    """Predict ``checkpoint``'s outputs for every voxel of a volume into an OME-Zarr image.

    The output has axes ``(c, z, y, x)``: one channel per model output, the input's voxel size and
    offset, dtype ``uint8`` (probability x 255, rounded), ``float16`` or ``float32``.  Its
    ``emseg`` attributes record the source, checkpoint and parameters; it is marked complete only
    once every block is written.

    Parameters
    ----------
    volume_path, output_path : path
        Input volume; output image (refused if it exists, unless it holds this same run (resume) or
        ``overwrite``).
    options, **fields
        The run's :class:`~emseg.config.PredictOptions` (``checkpoint=``, ``block_size=``,
        ``batch_size=`` ...); see :func:`plan_prediction`.
    run : RunOptions, optional
        Where the blocks run and what happens to an existing output (:class:`~emseg.config.RunOptions`:
        ``cluster``, ``scheduler``, ``workers``, ``devices``, see :func:`emseg.cluster.connect`;
        ``overwrite``: replace an existing output, also one from a run with other parameters;
        ``progress``: progress bar on stderr; ``client``: an open cluster, e.g. to chain predict and
        label on one cluster); its fields may also be given among ``**fields``.
    dry_run : bool
        Only plan: return a report whose ``summary()`` is the plan; nothing is written.
    zarr_format : {2, 3}, optional
        Zarr format of the output (3: OME-NGFF 0.5, 2: 0.4); default: the input's.
    posts : Progress, optional
        Announce the written blocks to a stage that reads them while this one runs
        (:mod:`emseg.engine.follow`; ``emseg segment``'s fragments).

    Raises
    ------
    ResumeMismatchError
        The output holds a run with other parameters and ``overwrite`` is false.
    InvalidDataError
        Some blocks hold NaN or unreadable chunks (the other blocks are kept).
    RunIncompleteError
        Some blocks failed otherwise; a rerun resumes.
    """
    from emseg.engine.runner import WriteSpec, run_blockwise
    from emseg.io import check_distinct

    run = RunOptions.take(run, fields)
    plan = plan_prediction(volume_path, options, device=target_device(run.cluster, run.devices, run.client),
                           voxel_size=voxel_size, **fields)
    output = location(output_path)
    if dry_run:
        return PredictReport(output, len(plan.grid), 0, 0, 0.0, 0, plan, dry_run=True)
    check_distinct(volume_path, output)
    from emseg.engine.resources import check_memory, worker_memory

    check_memory(plan.memory_per_block, worker_memory(**run.where),
                 f"a prediction block of {'x'.join(map(str, plan.grid.block_shape))} voxels",
                 "use a smaller --block-size, --tile-size or --batch-size, or workers with more memory")
    if zarr_format not in (None, 2, 3):
        raise ConfigError(f"--zarr-format must be 2 or 3, got {zarr_format!r}")
    claim = output_claim(plan, output, run.overwrite, zarr_format)
    claim.check()  # refused before a cluster starts
    from emseg.cluster import connect

    with connect(**run.where) as connection:
        config = PredictConfig(
            input=str(absolute(volume_path)), output=str(absolute(output)), checkpoint=str(plan.checkpoint.resolve()),
            checkpoint_mtime_ns=(plan.checkpoint / "model.safetensors").stat().st_mtime_ns, tiling=plan.tiling,
            options=plan.options, threads=connection.threads_per_worker, run=uuid.uuid4().hex,
        )
        resources = connection.resources
        if resources and "GPU" in resources and connection.threads_per_worker >= 2:
            resources = {**resources, "GPU": resources["GPU"] / 2}  # two blocks per GPU: I/O overlaps compute
        try:
            stage = run_blockwise(
                connection.client, stage=STAGE, grid=plan.grid, fn=functools.partial(predict_block_task, config),
                output=output, params=plan.params, overwrite=run.overwrite, resources=resources,
                progress=run.progress, writes=[WriteSpec(str(output / "0"))], claim=claim, posts=posts,
            )
        except RunIncompleteError as e:
            if isinstance(e.__cause__, InvalidDataError):
                raise InvalidDataError(f"{e.__cause__}; the other blocks are kept ({e})") from e
            raise
    claim.complete()
    return PredictReport(output, stage.total, stage.computed, stage.skipped, stage.seconds, stage.voxels, plan)
