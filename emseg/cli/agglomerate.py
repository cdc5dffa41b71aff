"""``emseg agglomerate``: fragments -> region graph -> agglomerated segments, one label image per threshold."""

from __future__ import annotations

import json
from typing import Any, Literal

import click

from emseg.cli.options import cluster_options, field_option, mode_option, option_flags, output_options, pop_fields
from emseg.cli.types import INT_ZYX
from emseg.config import AgglomerateOptions, RunOptions


@click.command()
@click.argument("target", type=click.Path(path_type=str))
@field_option(AgglomerateOptions, "threshold", show_default=False,
              help="Merge fragments whose edge score (1 - mean affinity at the merge) is below this; written to "
                   "labels/segments  [default: the predicting model's agglomeration_threshold, else 0.8].")
@option_flags(AgglomerateOptions, exclude=("threshold",))
@mode_option(help="Fragments and graph per section (per-section labels), or both in 3-D  [default: 3-D segments; "
                   "fragments per section when z >= 2.5 x the y/x voxel size, linked across sections by the graph].")
@click.option("--block-size", type=INT_ZYX, default=None, help="Block core shape Z,Y,X of fragments and graph.")
@cluster_options(devices=False)
@output_options(zarr_format=None)
def agglomerate(target: str, mode: Literal["2d", "3d"] | None, block_size: tuple[int, int, int] | None, as_json: bool,
                **fields: Any) -> None:
    """Agglomerate fragments into segments by hierarchical mean-affinity merging.

    TARGET is either a prediction image (from `emseg predict`): its fragments
    (TARGET/labels/fragments) and region graph are computed first (or resumed); or a fragments
    label image with its graph (e.g. OUT.zarr/labels/fragments), which is agglomerated again at
    other thresholds without recomputing the graph.  A prediction image whose graph is finished is
    agglomerated again too, unless fragment or graph options are given (then they are made again
    with those options, which needs --overwrite when they differ).  Segments go to OUT.zarr/labels/segments and
    labels/segments_<t> for each of --thresholds.  Without --threshold, the threshold is the
    predicting model's own (`agglomeration_threshold` in its config.json, as `emseg segment` uses it),
    else 0.8.
    """
    from emseg.workflows.agglomerate import agglomerate_target

    run = RunOptions.build(**pop_fields(fields, RunOptions))
    fragments, graph, report = agglomerate_target(target, mode=mode or "auto", block_size=block_size, run=run,
                                                  **pop_fields(fields, AgglomerateOptions))
    text = "\n".join(r.summary() for r in (fragments, graph, report) if r is not None)
    if as_json:
        click.echo(json.dumps({"fragments": str(report.fragments_path), "n_fragments": report.n_fragments,
                               "score": report.score,
                               "segments": [{"threshold": t, "path": str(p), "n_segments": report.n_segments[t]}
                                            for t, p in sorted(report.segments.items())]}))
    else:
        click.echo(text)

