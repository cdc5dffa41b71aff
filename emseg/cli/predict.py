"""``emseg predict``: run a model over a volume, block by block, into an OME-Zarr image."""

from __future__ import annotations

import json
from typing import Any

import click

from emseg.cli.options import cluster_options, option_flags, output_options, pop_fields, voxel_size_option
from emseg.config import PredictOptions, RunOptions


@click.command()
@click.argument("volume", type=click.Path(path_type=str))
@click.option("-o", "--output", type=click.Path(path_type=str), required=True,
              help="Output OME-Zarr image (e.g. OUT.zarr, or a URL: s3://bucket/OUT.zarr).")
@voxel_size_option()
@option_flags(PredictOptions)
@cluster_options()
@output_options(dry_run=True)
def predict(volume: str, output: str, voxel_size: tuple[float, ...] | None, zarr_format: int | None, dry_run: bool,
            as_json: bool, **fields: Any) -> None:
    """Predict the model's outputs for every voxel of VOLUME into the OME-Zarr image OUTPUT.

    VOLUME is OME-Zarr, a zarr array, a neuroglancer precomputed layer or an N5 dataset, as a path
    or an s3://, gs://, https:// or file:// URL.

    Blocks are processed in parallel on a Dask cluster (overlap-tile with mirrored borders).
    Rerunning the same command resumes an interrupted run; exit code 3 means some blocks failed
    and a rerun resumes.
    """
    from emseg.workflows.predict import predict as run_predict

    run = RunOptions.build(**pop_fields(fields, RunOptions))
    options = PredictOptions.build(**pop_fields(fields, PredictOptions))
    report = run_predict(volume, output, options, run=run, dry_run=dry_run, zarr_format=zarr_format,
                         voxel_size=voxel_size)
    if as_json:
        data = report.to_json()
        if dry_run:
            plan = report.plan
            data.update(blocks=len(plan.grid), block_shape=list(plan.grid.block_shape),
                        tile_shape=list(plan.tiling.tile_shape), tile_input=list(plan.tiling.input_shape),
                        halo=[list(h) for h in plan.tiling.halo], output_voxels=plan.output_voxels,
                        computed_voxels=plan.computed_voxels, memory_per_block=plan.memory_per_block,
                        downsample=plan.downsample)  # tiles and halo in the model's voxels
        click.echo(json.dumps(data))
    else:
        click.echo(report.summary())
