"""``emseg label``: boundary predictions -> a uint64 instance segmentation, blockwise on Dask."""

from __future__ import annotations

import click

from emseg.cli.output import JSON_OPTION, echo_report
from emseg.cli.types import INT_ZYX


@click.command()
@click.argument("pred", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", "output", type=click.Path(file_okay=False), required=True,
              help="Label output: a new OME-Zarr path, or PRED's own image (labels go to PRED/labels/segments).")
@click.option("--method", type=click.Choice(["cc", "watershed"]), default="cc", show_default=True,
              help="cc: threshold + connected components; watershed: seeded watershed of the boundary map.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="Boundary probability below which a voxel is object interior.")
@click.option("--foreground", type=click.Choice(["auto", "below", "above", "nonzero"]), default="auto",
              show_default=True,
              help="Foreground rule: below = probability < threshold, above = > threshold, nonzero = value != 0; "
                   "auto = below for predictions (channel axis or float), nonzero for integer (z,y,x) masks.")
@click.option("--connectivity", type=click.Choice(["6", "18", "26"]), default="6", show_default=True,
              help="Voxel neighbourhood of cc (4 / 8 within a section with --2d).")
@click.option("--2d", "two_d", is_flag=True, help="Label every z-section on its own.")
@click.option("--min-size", type=click.IntRange(min=0), default=0, show_default=True,
              help="watershed: merge fragments smaller than this many voxels into their neighbours.")
@click.option("--seeds", type=click.Choice(["distance", "minima"]), default="distance", show_default=True,
              help="watershed seeds: distance-transform maxima or boundary minima.")
@click.option("--min-distance", type=click.IntRange(min=1), default=3, show_default=True,
              help="watershed: radius in voxels of the window in which a seed is an extremum.")
@click.option("--block-size", type=INT_ZYX, default=None,
              help="Block core shape Z,Y,X in voxels  [default: about 128 per axis, a multiple of the chunks].")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Local worker processes.")
@click.option("--cluster", default=None, help="Cluster profile: local, local-gpu, slurm or a YAML file.")
@click.option("--scheduler", default=None, help="Address of a running Dask scheduler to use instead.")
@click.option("--zarr-format", type=click.Choice(["2", "3"]), default=None,
              help="Zarr format of the output: 3 = OME-NGFF 0.5, 2 = OME-NGFF 0.4  [default: PRED's; labels inside PRED follow PRED].")
@click.option("--overwrite", is_flag=True, help="Replace existing labels (otherwise a rerun resumes).")
@click.option("--progress/--no-progress", default=True, help="Show progress bars on stderr.")
@JSON_OPTION
def label(
    pred: str,
    output: str,
    method: str,
    threshold: float,
    foreground: str,
    connectivity: str,
    two_d: bool,
    min_size: int,
    seeds: str,
    min_distance: int,
    block_size: tuple[int, ...] | None,
    workers: int | None,
    cluster: str | None,
    scheduler: str | None,
    zarr_format: str | None,
    overwrite: bool,
    progress: bool,
    as_json: bool,
) -> None:
    """Label the boundary prediction PRED into globally unique, consecutive uint64 segment ids.

    PRED is an OME-Zarr image (c, z, y, x) whose channel 0 is the boundary probability (uint8 p*255
    or float), or a plain (z, y, x) probability map or mask.  Blocks are labelled independently,
    stitched across faces by union-find, and relabelled to ids 1..N.
    """
    from emseg.label import label as run_label

    if block_size is not None and len(block_size) not in (1, 3):
        raise click.BadParameter(f"expected 1 or 3 comma-separated values Z,Y,X, got {len(block_size)}",
                                 param_hint="--block-size")
    report = run_label(
        pred, output, method=method, threshold=threshold, foreground=foreground,  # type: ignore[arg-type]
        connectivity=int(connectivity), mode="2d" if two_d else "3d", min_size=min_size,
        seeds=seeds, min_distance=min_distance,  # type: ignore[arg-type]
        block_size=None if block_size is None else (block_size * 3 if len(block_size) == 1 else block_size),
        overwrite=overwrite, progress=progress, cluster=cluster, scheduler=scheduler, workers=workers,
        zarr_format=None if zarr_format is None else int(zarr_format),
    )
    echo_report(report, as_json)
