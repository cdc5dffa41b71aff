"""``emseg finetune`` and ``emseg calibrate``: from a labelled volume to a calibrated checkpoint
(thin layers over :mod:`emseg.workflows.finetune`)."""

from __future__ import annotations

from typing import Any

import click

from emseg.cli.options import field_option
from emseg.cli.output import echo_report
from emseg.cli.types import SIZES
from emseg.config import RunOptions

LABEL_KINDS = ["auto", "instances", "membrane-mask", "interior-mask"]


def _voxel_size(value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        size = tuple(float(v) for v in value.split(","))
    except ValueError as e:
        raise click.BadParameter(f"expected Z,Y,X in nm, e.g. 40,4,4; got {value!r}") from e
    if len(size) != 3:
        raise click.BadParameter(f"expected 3 values Z,Y,X in nm, got {value!r}")
    return size


def _data_options(f: Any) -> Any:
    for decorator in reversed([
        click.option("--raw", required=True, help="Raw EM (zarr, OME-Zarr, TIFF, file.h5/dataset); a [z0:z1] suffix "
                     "selects sections."),
        click.option("--labels", required=True, help="Labels of the same voxels: instance ids (0 = boundary or "
                     "unlabelled) or a membrane mask; same syntax."),
        click.option("--labels-kind", type=click.Choice(LABEL_KINDS), default="auto", show_default=True,
                     help="instances, membrane-mask (non-zero = membrane), interior-mask (0 = membrane), or auto."),
        click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
                     help="Checkpoint directory to write (use it with emseg segment --model)."),
        click.option("--model", type=click.Path(exists=True, file_okay=False),
                     help="Starting checkpoint  [default: the bundled model emseg segment picks for the voxel size]."),
        click.option("--voxel-size", help="Z,Y,X in nm  [default: the raw's metadata]."),
        click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Local workers of the segmentation runs that score the model."),
        field_option(RunOptions, "scheduler", metavar="ADDRESS", show_default=False,
                     help="Address of a running Dask scheduler for the segmentation runs that score the model, "
                          "instead of local workers."),
        click.option("--overwrite", is_flag=True, help="Replace an existing output directory."),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
    ]):
        f = decorator(f)
    return f


@click.command()
@_data_options
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=15.0, show_default=True,
              help="Minutes for the whole run: scoring the starting model, training rounds, scoring each.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.25,
              show_default=True, help="Share of the longest axis (in nm) held out for validation.")
@click.option("--max-steps", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Most training steps (the time limit usually ends the run first).")
@click.option("--patch-shape", type=SIZES, help="Training patch  [default: 40,40,40 for 3-D models, 256,256 for 2-D].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True,
              help="Learning rate (constant; the weights start trained).")
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True, help="Patches per step.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="Training arithmetic: auto is bf16 autocast on GPUs and on CPUs that compute bf16 natively, "
                   "fp32 where bf16 is emulated (15-20x slower there).")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="torch CPU threads of the training (0: torch's default).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of sampling and augmentation.")
@click.option("--progress/--no-progress", default=True, help="Progress bar on stderr.")
def finetune(raw: str, labels: str, labels_kind: str, output: str, model: str | None, voxel_size: str | None,
             workers: int, scheduler: str | None, overwrite: bool, as_json: bool, time_limit: float, val_fraction: float, max_steps: int,
             patch_shape: tuple[int, ...] | None, lr: float, batch_size: int, precision: str, threads: int, seed: int,
             progress: bool) -> None:
    """Fine-tune a model on your labelled volume and calibrate its merge threshold.

    Holds out the last part of the volume, scores the starting model there with the real pipeline
    (segment -> ARE/VOI), trains in rounds within --time-limit, keeps the weights and threshold that
    score best there with one sweep step of margin below the merge cliff, and writes them as a
    checkpoint. Rerun the same command to resume.

    \b
    emseg finetune --raw fib_gala/train-raw.tif --labels fib_gala/train-labels.tif \\
                   --voxel-size 10,10,10 -o my-model --time-limit 15
    emseg segment my-volume.zarr --model my-model
    """
    from emseg.workflows.finetune import finetune as run_finetune

    report = run_finetune(raw, labels, output, model=model, voxel_size=_voxel_size(voxel_size),
                          labels_kind=labels_kind,  # type: ignore[arg-type]
                          time_limit_min=time_limit, val_fraction=val_fraction, max_steps=max_steps,
                          patch_shape=patch_shape, lr=lr, batch_size=batch_size,
                          precision=precision,  # type: ignore[arg-type]
                          threads=threads, seed=seed, workers=workers, scheduler=scheduler, overwrite=overwrite,
                          progress=progress)
    echo_report(report, as_json)


@click.command()
@_data_options
def calibrate(raw: str, labels: str, labels_kind: str, output: str, model: str | None, voxel_size: str | None,
              workers: int, scheduler: str | None, overwrite: bool, as_json: bool) -> None:
    """Calibrate a model's merge threshold on your labels (no training); write a checkpoint carrying it.

    \b
    emseg calibrate --raw cremi/raw.tif[0:3] --labels cremi/neuron_ids.tif[0:3] --voxel-size 40,4,4 -o cremi-model
    emseg segment my-volume.zarr --model cremi-model
    """
    from emseg.workflows.finetune import calibrate as run_calibrate

    report = run_calibrate(raw, labels, output, model=model, voxel_size=_voxel_size(voxel_size),
                           labels_kind=labels_kind,  # type: ignore[arg-type]
                           workers=workers, scheduler=scheduler, overwrite=overwrite)
    echo_report(report, as_json)
