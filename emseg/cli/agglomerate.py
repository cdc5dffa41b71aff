"""``emseg agglomerate``: fragments -> region graph -> agglomerated segments, one label image per threshold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from emseg.cli.types import INT_ZYX, ZYX

THRESHOLDS = ZYX(float, minimum=float("-inf"), name="T,T,...")


@click.command()
@click.argument("target", type=click.Path(path_type=str))
@click.option("--threshold", type=float, default=None,
              help="Merge fragments whose edge score (1 - mean affinity) is below this; written to labels/segments "
                   "[default: the tuned default].")
@click.option("--thresholds", type=THRESHOLDS, default=None,
              help="Extra thresholds, e.g. 0.3,0.5,0.7: one label image labels/segments_<t> each (the graph is reused).")
@click.option("--score", type=click.Choice(["hierarchical", "mean"]), default="hierarchical", show_default=True,
              help="hierarchical: waterz mean-affinity merge score decided per block plus context; "
                   "mean: the edge's own 1 - mean affinity (exactly blockwise = whole volume).")
@click.option("--2d/--3d", "two_d", default=None,
              help="Fragments and graph per section, or in 3-D [default: per section when z >= 2.5 x the y/x voxel size].")
@click.option("--fragments", "fragments_method", type=click.Choice(["watershed", "mutex"]), default=None,
              help="Fragments by seeded watershed [default], or by mutex watershed of long-range affinities "
                   "(offsets from the prediction's checkpoint).")
@click.option("--mutex-bias", type=float, default=None, help="Mutex watershed: affinities above this attract [0.5].")
@click.option("--fragment-threshold", type=float, default=None,
              help="Boundary probability below which a voxel seeds a fragment [default: tuned default].")
@click.option("--min-distance", type=click.IntRange(min=1), default=None, help="Seed window radius (voxels).")
@click.option("--min-size", type=click.IntRange(min=0), default=None, help="Smallest fragment kept (voxels).")
@click.option("--context", type=ZYX(int, minimum=0), default=None,
              help="Voxels Z,Y,X around a block for its hierarchical agglomeration [default: half a block, <= 64].")
@click.option("--quantile", type=float, default=None, help="Also store this quantile of each edge's affinities.")
@click.option("--block-size", type=INT_ZYX, default=None, help="Block core shape Z,Y,X of fragments and graph.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Local worker processes.")
@click.option("--cluster", default=None, help="Cluster profile: local, local-gpu, slurm or a YAML file.")
@click.option("--scheduler", default=None, help="Address of a running Dask scheduler to use instead.")
@click.option("--overwrite", is_flag=True, help="Replace outputs made with other parameters (otherwise a rerun resumes).")
@click.option("--json", "as_json", is_flag=True, help="Print the label images and segment counts as JSON.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars on stderr.")
def agglomerate(target: str, threshold: float | None, thresholds: tuple[float, ...] | None, score: str,
                two_d: bool | None, fragments_method: str | None, mutex_bias: float | None,
                fragment_threshold: float | None, min_distance: int | None,
                min_size: int | None, context: tuple[int, ...] | None, quantile: float | None,
                block_size: tuple[int, ...] | None, workers: int | None, cluster: str | None,
                scheduler: str | None, overwrite: bool, as_json: bool, progress: bool) -> None:
    """Agglomerate fragments into segments by hierarchical mean-affinity merging.

    TARGET is either a prediction image (from `emseg predict`): its fragments
    (TARGET/labels/fragments) and region graph are computed first (or resumed); or a fragments
    label image with its graph (e.g. OUT.zarr/labels/fragments), which is agglomerated again at
    other thresholds without recomputing the graph.  A prediction image whose graph is finished is
    agglomerated again too, unless fragment or graph options are given (then they are made again
    with those options, which needs --overwrite when they differ).  Segments go to OUT.zarr/labels/segments and
    labels/segments_<t> for each of --thresholds.
    """
    from emseg.config import AgglomerateOptions
    from emseg.io.lock import run_lock

    defaults = AgglomerateOptions()
    options = dict(threshold=defaults.threshold if threshold is None else threshold,
                   thresholds=tuple(thresholds or ()), score=score, overwrite=overwrite, progress=progress,
                   cluster=cluster, scheduler=scheduler, workers=workers)
    fragment_options = (two_d, fragments_method, mutex_bias, fragment_threshold, min_distance, min_size, context,
                        quantile, block_size)
    rebuild = any(v is not None for v in fragment_options)
    # the run lock of the image that receives the labels (the one `emseg segment` takes), so that an
    # agglomeration never runs beside another run on the same output
    image = Path(target).resolve()
    while image.parent.name == "labels" and image.parent.parent != image.parent:
        image = image.parent.parent
    with run_lock(image, "agglomerate"):
        text, report = _run(target, options, fragment_options, rebuild, two_d=two_d, fragments_method=fragments_method,
                            mutex_bias=mutex_bias, fragment_threshold=fragment_threshold, min_distance=min_distance,
                            min_size=min_size, context=context, quantile=quantile, block_size=block_size)
    if as_json:
        click.echo(json.dumps({"fragments": str(report.fragments_path), "n_fragments": report.n_fragments,
                               "score": report.score,
                               "segments": [{"threshold": t, "path": str(p), "n_segments": report.n_segments[t]}
                                            for t, p in sorted(report.segments.items())]}))
    else:
        click.echo(text)


def _run(target: str, options: dict[str, Any], fragment_options: tuple[Any, ...], rebuild: bool, *,
         two_d: bool | None, fragments_method: str | None, mutex_bias: float | None, fragment_threshold: float | None,
         min_distance: int | None, min_size: int | None, context: tuple[int, ...] | None, quantile: float | None,
         block_size: tuple[int, ...] | None) -> tuple[str, Any]:
    from emseg.agglomerate import agglomerate as run_agglomerate
    from emseg.agglomerate import is_fragments, segment_prediction
    from emseg.config import AgglomerateOptions
    from emseg.errors import ConfigError

    defaults = AgglomerateOptions()
    if is_fragments(Path(target)) and not (rebuild and is_fragments(Path(target) / "labels" / "fragments",
                                                                     image_only=True)):
        if rebuild:
            raise ConfigError(f"{target}: fragment and graph options (--2d/--3d, --fragment-threshold, --min-distance, "
                              "--min-size, --context, --quantile, --block-size) need the prediction image, not the "
                              "fragments")
        report = run_agglomerate(target, **options)  # type: ignore[arg-type]
        text = report.summary()
    else:
        if block_size is not None and len(block_size) == 1:
            block_size = block_size * 3
        fragments, graph, report = segment_prediction(
            target, mode="auto" if two_d is None else ("2d" if two_d else "3d"),
            fragment_threshold=defaults.fragment_threshold if fragment_threshold is None else fragment_threshold,
            min_distance=defaults.min_distance if min_distance is None else min_distance,
            min_size=defaults.min_size if min_size is None else min_size, seeds=defaults.seeds,
            fragments_method=fragments_method or defaults.fragments,  # type: ignore[arg-type]
            mutex_bias=defaults.mutex_bias if mutex_bias is None else mutex_bias,
            context=context, quantile=quantile, block_size=block_size, **options)  # type: ignore[arg-type]
        text = "\n".join([fragments.summary(), graph.summary(), report.summary()])
    return text, report
