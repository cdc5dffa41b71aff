"""``emseg segment``: volume in, prediction + segments out."""

from __future__ import annotations

from typing import Any

import click

from emseg.cli.options import (
    cluster_options,
    field_option,
    mode_option,
    option_flags,
    output_options,
    pop_fields,
    voxel_size_option,
)
from emseg.cli.output import echo_report
from emseg.config import AgglomerateOptions, PredictOptions, RunOptions, SegmentLabelOptions


@click.command()
@click.argument("volume", type=click.Path(path_type=str))
@click.option("-o", "--output", type=click.Path(path_type=str),
              help="Output OME-Zarr, a path or a URL (s3://bucket/OUT.zarr)  [default: <volume stem>_seg.zarr "
                   "beside VOLUME].")
@voxel_size_option()
@click.option("--pipeline", type=click.Path(dir_okay=False, path_type=str),
              help="Recipe file (pipelines/*.toml): model, block sizes, label method and thresholds; the options "
                   "below override its fields.")
@option_flags(PredictOptions)
@field_option(SegmentLabelOptions, "method")
@field_option(AgglomerateOptions, "threshold", "--merge-threshold", dest="merge_threshold", show_default=False,
              help="agglomerate: merge fragments whose edge score (1 - mean affinity) is below this  [default: the "
                   "recipe's, else the model's agglomeration_threshold, else 0.8].")
@field_option(AgglomerateOptions, "thresholds")
@field_option(SegmentLabelOptions, "threshold",
              help="Boundary probability below which a voxel is inside a cell (agglomerate: seeds of the fragments).")
@mode_option(help="Per-section labels (--2d, for per-section benchmarks such as ISBI), or 3-D labels with "
                   "fragments in 3-D too (--3d)  [default: 3-D segments; the agglomeration links fragments made "
                   "per section when z >= 2.5 x the y/x voxel size; plain watershed/cc labels per section there].")
@field_option(SegmentLabelOptions, "min_size", help="Smallest fragment kept (voxels; watershed and agglomerate).", show_default=False)
@cluster_options()
@field_option(RunOptions, "overlap", help="Start each block's fragments as soon as the prediction blocks it reads "
              "are written, beside the prediction (--no-overlap: after all of it; the output is the same).")
@output_options(dry_run=True)
def segment(volume: str, output: str | None, voxel_size: tuple[float, ...] | None, pipeline: str | None, method: str | None, merge_threshold: float | None,
            thresholds: tuple[float, ...] | None, threshold: float | None, mode: str | None, min_size: int | None,
            zarr_format: int | None, dry_run: bool, as_json: bool, **fields: Any) -> None:
    """Segment VOLUME: predict membranes, then label segments.

    VOLUME is an OME-Zarr image, a zarr array (daisy's resolution/offset are read), a neuroglancer
    precomputed layer (sharded or not) or an N5 dataset, as a path or an s3://, gs://, https:// or
    file:// URL; credentials and endpoints come from the usual variables (AWS_ENDPOINT_URL ...).

    Rerunning the same command resumes an interrupted run.
    """
    from emseg.config import load_pipeline, segment_overrides
    from emseg.workflows.segment import segment as run_segment

    run = RunOptions.build(**pop_fields(fields, RunOptions))
    config = load_pipeline(pipeline, segment_overrides(
        method=method, threshold=threshold, merge_threshold=merge_threshold, thresholds=thresholds,
        mode=mode, min_size=min_size,
        **pop_fields(fields, PredictOptions)))
    report = run_segment(volume, output, config, run=run, dry_run=dry_run, zarr_format=zarr_format,
                         voxel_size=voxel_size)
    echo_report(report, as_json)
