"""``emseg evaluate``: score a segmentation, or a threshold sweep of a run, against ground truth."""

from __future__ import annotations

import json

import click

from emseg.cli.options import overwrite_option
from emseg.cli.output import json_option


@click.command()
@click.argument("segs", metavar="SEG...", nargs=-1, required=True, type=click.Path(exists=True))
@click.argument("gt", type=click.Path(exists=True))
@click.option("--gt-kind", type=click.Choice(["auto", "instances", "interior-mask", "membrane-mask"]), default="auto",
              show_default=True,
              help="What GT holds: instance ids (0 = unlabelled), a 0/255 or 0/1 mask whose non-zero value is the "
                   "interior (ISBI 2012) or the membrane; auto: exactly {0,1} or {0,255} is a mask, the rarer "
                   "value being the membrane.")
@click.option("--mode", type=click.Choice(["auto", "section", "volume"]), default="auto", show_default=True,
              help="Score each section on its own and average (section) or the whole volume (volume); "
                   "auto: per section for a mask GT, as a volume for instance GT.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write the split-vs-merge curve (and scores per threshold) as a PNG.")
@json_option("Print the scores as JSON.")
@overwrite_option("Replace the --plot file if it exists (only one emseg wrote).")
def evaluate(segs: tuple[str, ...], gt: str, gt_kind: str, mode: str, plot: str | None, as_json: bool,
             overwrite: bool) -> None:
    """Score the segmentation(s) SEG... against the ground truth GT (label volumes of the same shape).

    SEG and GT are OME-Zarr (label) images, zarr arrays or TIFF stacks.  A SEG that is a run output
    with several label images (one per agglomeration threshold, and the fragments) is expanded into
    all of them: a threshold sweep, scored in one pass over GT.

    \b
    Definition: ground-truth 0 is ignored.  A binary-mask GT (ISBI 2012: 0 = membrane,
    255 = interior) becomes the 4-connected components of the interior of each section, and is
    scored per section: the mean over sections of each section's scores.  Scores: adapted Rand
    error, VOI split/merge in bits, pixel error of per-section boundary maps, foreground IoU/Dice,
    as skimage.metrics computes them.

    One segmentation prints its scores (--json: one object); several print one row each and the
    lowest ARE + VOI (--json: {"ground_truth", "gt_kind", "mode", "results": [...]}).
    """
    from emseg.workflows.evaluate import evaluate_sweep, plot_sweep

    if plot:  # refuse a bad plot path before scoring
        from pathlib import Path

        from emseg.errors import ConfigError
        from emseg.io.safety import check_file_output

        if Path(plot).suffix.lower() not in (".png", ".pdf", ".svg"):
            raise ConfigError(f"--plot {plot}: expected a .png, .pdf or .svg file")
        check_file_output(plot, [Path(p) for p in (*segs, gt)], overwrite)
    report = evaluate_sweep(list(segs), gt, gt_kind=gt_kind, mode=mode)  # type: ignore[arg-type]
    if plot:
        plot_sweep(report, plot)
    single = len(report.results) == 1
    if as_json:
        if single:
            click.echo(json.dumps({**report.results[0].as_dict(), "gt_kind": report.gt_kind, "mode": report.mode}))
        else:
            click.echo(json.dumps(report.as_dict()))
    elif single:
        click.echo(report.results[0].scores.summary())
        click.echo(report.definition())
    else:
        click.echo(report.table())
    if plot:
        click.echo(f"wrote {plot}", err=True)
