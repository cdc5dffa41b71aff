"""``emseg evaluate``: score a segmentation against ground truth."""

from __future__ import annotations

import json
import math

import click


@click.command()
@click.argument("seg", type=click.Path(exists=True))
@click.argument("gt", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the scores as one JSON object.")
def evaluate(seg: str, gt: str, as_json: bool) -> None:
    """Score the segmentation SEG against the ground truth GT (label volumes of the same shape).

    SEG and GT are OME-Zarr (label) images, zarr arrays or TIFF stacks.  Scores: adapted Rand
    error (ground-truth 0 ignored), VOI split/merge in bits, pixel error of per-section boundary
    maps, and foreground IoU/Dice, as in skimage.metrics.
    """
    from emseg.label import evaluate_paths

    scores = evaluate_paths(seg, gt)
    if as_json:
        values = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in scores.as_dict().items()}
        click.echo(json.dumps(values))
    else:
        click.echo(scores.summary())
