"""``emseg label``: boundary predictions -> a uint64 instance segmentation, blockwise on Dask."""

from __future__ import annotations

from typing import Any

import click

from emseg.cli.options import cluster_options, mode_option, option_flags, output_options, pop_fields
from emseg.cli.output import echo_report
from emseg.config import LabelOptions, RunOptions


@click.command()
@click.argument("pred", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", "output", type=click.Path(file_okay=False), required=True,
              help="Label output: a new OME-Zarr path, or PRED's own image (labels go to PRED/labels/segments).")
@option_flags(LabelOptions, exclude=("mode",))
@mode_option(help="Label every z-section on its own (segments never continue along z), or in 3-D  [default: 3-D].")
@cluster_options(devices=False)
@output_options(zarr_format="PRED's; labels inside PRED follow PRED")
def label(pred: str, output: str, zarr_format: int | None, as_json: bool, **fields: Any) -> None:
    """Label the boundary prediction PRED into globally unique, consecutive uint64 segment ids.

    PRED is an OME-Zarr image (c, z, y, x) whose channel 0 is the boundary probability (uint8 p*255
    or float), or a plain (z, y, x) probability map or mask.  Blocks are labelled independently,
    stitched across faces by union-find, and relabelled to ids 1..N.
    """
    from emseg.workflows.label import label as run_label

    run = RunOptions.build(**pop_fields(fields, RunOptions))
    options = LabelOptions.build(**pop_fields(fields, LabelOptions))  # mode: --2d/--3d
    report = run_label(pred, output, options, run=run, zarr_format=zarr_format)
    echo_report(report, as_json)
