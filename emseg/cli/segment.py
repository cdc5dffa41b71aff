"""``emseg segment``: volume in, prediction + segments out."""

from __future__ import annotations

import click

from emseg.cli.output import JSON_OPTION, echo_report
from emseg.cli.types import INDEX_LIST, INT_ZYX, ZYX


@click.command()
@click.argument("volume", type=click.Path(path_type=str))
@click.option("-o", "--output", type=click.Path(path_type=str),
              help="Output OME-Zarr (default: <volume stem>_seg.zarr beside VOLUME).")
@click.option("--pipeline", type=click.Path(dir_okay=False, path_type=str),
              help="Recipe file (pipelines/*.toml): model, block sizes, label method and thresholds.")
@click.option("--model", type=click.Path(path_type=str), help="Checkpoint directory (default: the bundled model).")
@click.option("--block-size", type=INT_ZYX, help="Prediction block core shape z,y,x.")
@click.option("--batch-size", type=int, help="Tiles per forward pass.")
@click.option("--tta", is_flag=True, default=None, help="Flip test-time augmentation.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), help="Arithmetic on the device.")
@click.option("--method", type=click.Choice(["agglomerate", "cc", "watershed"]),
              help="Labelling method [default: agglomerate: fragments, region graph, hierarchical merging].")
@click.option("--merge-threshold", type=float, help="agglomerate: merge edges scoring below this (0..1).")
@click.option("--thresholds", type=ZYX(float, minimum=float("-inf"), name="T,T,..."),
              help="agglomerate: extra thresholds, one label image labels/segments_<t> each.")
@click.option("--threshold", type=float, help="Boundary probability below which a voxel is inside a cell.")
@click.option("--2d/--3d", "two_d", default=None, help="Label each section on its own, or in 3-D.")
@click.option("--min-size", type=int, help="Smallest fragment kept (voxels).")
@click.option("--workers", type=int, help="Local workers (default: one per GPU, else one per core, memory permitting).")
@click.option("--devices", type=INDEX_LIST, help="GPU indices to use, e.g. 0,1.")
@click.option("--cluster", help="Cluster profile: local, local-gpu, slurm, or a profile YAML.")
@click.option("--scheduler", help="Address of a running Dask scheduler to use instead.")
@click.option("--zarr-format", type=click.Choice(["2", "3"]), default=None,
              help="Zarr format of the output: 3 = OME-NGFF 0.5, 2 = OME-NGFF 0.4  [default: the input's].")
@click.option("--overwrite", is_flag=True, help="Replace an output made with other parameters.")
@click.option("--dry-run", is_flag=True, help="Print the block plan and exit.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@JSON_OPTION
def segment(volume: str, output: str | None, pipeline: str | None, model: str | None, block_size: tuple[int, ...] | None,
            batch_size: int | None, tta: bool | None, precision: str | None, method: str | None,
            merge_threshold: float | None, thresholds: tuple[float, ...] | None, threshold: float | None, two_d: bool | None, min_size: int | None, workers: int | None,
            devices: tuple[int, ...] | None, cluster: str | None, scheduler: str | None, zarr_format: str | None,
            overwrite: bool,
            dry_run: bool, no_progress: bool, as_json: bool) -> None:
    """Segment VOLUME (an OME-Zarr image or zarr array): predict membranes, then label segments.

    Rerunning the same command resumes an interrupted run.
    """
    from emseg.config import load_pipeline
    from emseg.pipeline import segment as run_segment

    config = load_pipeline(pipeline, {
        "predict": {"model": model, "block_size": block_size, "batch_size": batch_size, "tta": tta,
                    "precision": precision},
        "label": {"method": method, "threshold": threshold, "min_size": min_size,
                  "mode": None if two_d is None else ("2d" if two_d else "3d")},
        # --threshold / --min-size mean the same for the fragments of the agglomeration
        "agglomerate": {"threshold": merge_threshold, "thresholds": thresholds, "fragment_threshold": threshold,
                        "min_size": min_size},
    })
    report = run_segment(volume, output, config, cluster=cluster, scheduler=scheduler, workers=workers,
                         devices=devices, overwrite=overwrite, dry_run=dry_run, progress=not no_progress,
                         zarr_format=None if zarr_format is None else int(zarr_format))
    echo_report(report, as_json)
