"""From supervoxels to neurons: fragments -> region graph -> agglomeration -> relabel, blockwise.

Stages (each through :func:`emseg.engine.runner.run_blockwise`, each resumable):

1. **fragments** (:func:`make_fragments`): the seeded watershed of :func:`emseg.workflows.label.label`, with
   the fragments of every block kept apart (``merge_faces=False``): globally unique consecutive
   ids, block ``b`` holding ``offsets[b]+1 .. offsets[b+1]``, written to ``OUT/labels/fragments``.
2. **graph** (:func:`build_graph`): every block extracts the edges it owns (the pairs of touching
   voxels whose lower voxel lies in its core; since no fragment leaves its block, each edge is
   computed exactly once, complete) with contact area, affinity sum (exact mean affinity), an
   optional quantile, and the *hierarchical merge score*: waterz's mean-affinity agglomeration
   run over the block grown by ``context`` voxels, the score at which the edge's two fragments
   first shared a region.  Stored per block in ``fragments/graph/blocks/<id>.npz``.
3. **agglomerate** (:func:`agglomerate`), per threshold ``t``: the client streams the blocks'
   edges and unions those with ``score < t`` in a parent array over the fragment ids (memory
   O(fragments), no list of edges), then stores the fragment -> segment lookup (consecutive ids,
   numbered by smallest fragment) as a zarr array.  Several thresholds reuse the graph.
4. **relabel**: every block reads its fragments and the lookup's slice for its own id range and
   writes ``labels/segments`` (``labels/segments_<t>`` for extra thresholds).

Scores: ``score="hierarchical"`` (default) thresholds the merge scores of stage 2;
``score="mean"`` thresholds ``1 - mean affinity`` of each edge directly (exactly equal to doing
so on the whole volume as one block).

Inputs: a boundary map (1 channel, affinities ``1 - max(b_i, b_j)``) or affinities (channels
z, y, x first); see :mod:`emseg.ops.affinities`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import fastremap
import numpy as np
import numpy.typing as npt

from emseg.config import AgglomerateOptions, RunOptions
from emseg.engine.follow import Progress
from emseg.engine.runner import StageReport, WriteSpec, run_blockwise
from emseg.engine.runstate import OutputClaim, Scratch, fingerprint_of, record_complete
from emseg.errors import (
    ConfigError,
    GraphNotFoundError,
    InvalidDataError,
    NotAVolumeError,
    VolumeShapeError,
)
from emseg.geometry import ANISOTROPY_2D, Block, BlockGrid, Coordinate, Roi, as_coordinate, plan_blocks
from emseg.io import create_labels, open_volume, read_status
from emseg.io.edges import (
    lookup_attrs,
    lookup_path,
    open_lookup,
    read_block_edges,
    remove_graph,
    write_block_edges,
    write_lookup,
)
from emseg.io.location import Location, PathOrUrl, absolute, location
from emseg.io.safety import made_by_emseg
from emseg.ops.affinities import INPUT_KINDS, InputKind, prediction_affinities
from emseg.ops.agglomerate import UnionFind, consecutive_lookup, merge_scores
from emseg.ops.graph import block_edges, check_quantile

log = logging.getLogger(__name__)

Score = Literal["hierarchical", "mean"]
SCORES: tuple[str, ...] = ("hierarchical", "mean")
Mode = Literal["auto", "3d", "2d"]

FRAGMENTS_NAME = "fragments"
SEGMENTS_NAME = "segments"
GRAPH_KEY = "graph"
AGGLOMERATE_KEY = "agglomerate"
DEFAULT_THRESHOLD = AgglomerateOptions().threshold
"""Default agglomeration threshold (``score < t`` merges), chosen to hold across ISBI 2012 and gala
FIB-SEM (see :class:`emseg.config.AgglomerateOptions`); recipes carry values tuned for their data."""
FRAGMENT_THRESHOLD = AgglomerateOptions().fragment_threshold
"""Default boundary probability below which a voxel is interior (seeds of the fragments)."""

__all__ = [
    "AgglomerateReport",
    "DEFAULT_THRESHOLD",
    "FragmentsReport",
    "GraphReport",
    "SCORES",
    "Score",
    "agglomerate",
    "build_graph",
    "choose_mode",
    "graph_mode",
    "input_kind_of",
    "is_fragments",
    "make_fragments",
    "mutex_fragments_blockwise",
    "nearest_channels",
    "prediction_offsets",
    "segment_prediction",
    "segments_name",
]


# ---------------------------------------------------------------------------------------------
# choices from metadata


def choose_mode(voxel_size: Sequence[float]) -> Literal["3d", "2d"]:
    """Mode of the *fragments*: ``"2d"`` (per section) for strongly anisotropic voxels (z >= 2.5 x the
    in-plane size), else ``"3d"``.  The region graph and the agglomeration are 3-D unless asked
    otherwise (:func:`graph_mode`), so per-section fragments are linked across sections."""
    z, y, x = (float(v) for v in voxel_size)
    return "2d" if z >= ANISOTROPY_2D * min(y, x) else "3d"


def graph_mode(mode: Mode) -> Literal["3d", "2d"]:
    """Mode of the region graph and the agglomeration: ``"3d"`` (edges across sections, so that a neuron
    keeps one id through the stack) unless ``mode="2d"`` asks for per-section labels."""
    if mode not in ("auto", "3d", "2d"):
        raise ConfigError(f"mode must be 'auto', '3d' or '2d', got {mode!r}")
    return "2d" if mode == "2d" else "3d"


def links_sections(kind: str, mode: str, voxel_size: Sequence[float]) -> bool:
    """Whether a graph of ``mode`` (``"3d"``/``"2d"``, :func:`graph_mode`) links per-section fragments of a
    boundary prediction across sections: an anisotropic volume (:func:`choose_mode` says per-section
    fragments) in 3-D, where the affinity across sections comes from the boundary evidence of both."""
    return kind == "boundary" and mode == "3d" and choose_mode(voxel_size) == "2d"


def section_link_weight(opts: AgglomerateOptions, kind: str, mode: str, voxel_size: Sequence[float]) -> float:
    """The factor on affinities across sections: ``opts.section_link_weight`` where the graph
    :func:`links_sections`, else 1."""
    return float(opts.section_link_weight) if links_sections(kind, mode, voxel_size) else 1.0


def input_kind_of(pred_path: PathOrUrl, *, allow_incomplete: bool = False) -> InputKind:
    """``"affinities"`` when the prediction's recorded outputs are affinities, else ``"boundary"``."""
    pred = open_volume(pred_path, allow_incomplete=allow_incomplete)
    status = read_status(pred.image_path) if pred.image_path is not None else {}
    outputs = [str(o) for o in status.get("outputs") or []]
    if status.get("offsets") or (outputs and all(o.startswith("aff") for o in outputs)):
        if (pred.channels or 0) < 3:
            raise VolumeShapeError(f"{pred_path}: affinities need at least 3 channels (z, y, x), got "
                                   f"{pred.channels or 'none'}")
        return "affinities"
    return "boundary"


def _model_defaults(image: PathOrUrl) -> dict[str, float]:
    """The agglomeration settings (``threshold``, ``section_link_weight``) the checkpoint that predicted
    ``image`` was tuned with; empty when unknown."""
    from emseg.errors import CheckpointError
    from emseg.models import load_checkpoint_config

    try:
        checkpoint = read_status(image).get("checkpoint")
    except (OSError, ValueError):  # not a zarr group
        return {}
    if not checkpoint:
        return {}
    try:
        config = load_checkpoint_config(checkpoint)
    except (CheckpointError, OSError) as e:
        log.warning("%s: cannot read the agglomeration settings of the checkpoint that predicted it (%s)", image, e)
        return {}
    tuned = {"threshold": config.agglomeration_threshold, "section_link_weight": config.section_link_weight}
    return {k: v for k, v in tuned.items() if v is not None}


def with_model_settings(options: AgglomerateOptions, image: PathOrUrl,
                         given: Collection[str] = ()) -> AgglomerateOptions:
    """``options`` with the threshold and the section link weight the model that predicted ``image`` was
    tuned with (its config.json), except those in ``given`` (set by the user or the recipe); unchanged
    where the model names none: for `emseg segment` and `emseg agglomerate`."""
    tuned = {k: v for k, v in _model_defaults(image).items() if k not in given}
    if not tuned:
        return options
    log.info("agglomeration %s: the model's (its config.json)", ", ".join(f"{k} {v:g}" for k, v in tuned.items()))
    return options.model_copy(update=tuned)


def segments_name(threshold: float) -> str:
    """Name of the label image of an extra threshold: ``segments_0.50``."""
    text = f"{threshold:.2f}"
    return f"{SEGMENTS_NAME}_{text if float(text) == threshold else f'{threshold:.6g}'}"


# ---------------------------------------------------------------------------------------------
# reports


@dataclass(frozen=True)
class GraphReport:
    """What :func:`build_graph` did."""

    fragments_path: Location
    n_fragments: int
    n_edges: int
    blocks: int
    seconds: float
    stage: StageReport | None = field(default=None, repr=False)
    mode: str = "3d"
    """``"3d"``: edges across sections too (3-D segments); ``"2d"``: per-section segments."""

    def summary(self) -> str:
        across = "3-D, edges across sections" if self.mode == "3d" else "per section"
        return (f"{self.fragments_path}: region graph ({across}) of {self.n_fragments} fragments, "
                f"{self.n_edges} edges, {self.blocks} blocks in {self.seconds:.1f} s")


@dataclass(frozen=True)
class FragmentsReport:
    """What :func:`mutex_fragments_blockwise` did (the watershed's is a :class:`~emseg.workflows.label.LabelReport`)."""

    labels_path: Location
    method: str
    n_segments: int
    blocks: int
    seconds: float
    stages: tuple[StageReport, ...] = field(default=(), repr=False)

    def summary(self) -> str:
        return (f"{self.labels_path}: {self.n_segments} fragments (uint64, ids 1..{self.n_segments}) by {self.method}, "
                f"{self.blocks} blocks in {self.seconds:.1f} s")


@dataclass(frozen=True)
class AgglomerateReport:
    """What :func:`agglomerate` did.

    Attributes
    ----------
    fragments_path : Path
        The fragments label image.
    segments : dict float -> Path
        Label image written for each threshold (``labels/segments`` for ``threshold``).
    n_segments : dict float -> int
        Number of segments (ids ``1..n``) at each threshold.
    """

    fragments_path: Location
    threshold: float
    score: str
    n_fragments: int
    segments: dict[float, Location]
    n_segments: dict[float, int]
    seconds: float
    stages: tuple[StageReport, ...] = field(default=(), repr=False)
    seconds_global: float = 0.0

    @property
    def labels_path(self) -> Location:
        """The default label image (``labels/segments``)."""
        return self.segments[self.threshold]

    def summary(self) -> str:
        lines = [f"{self.segments[self.threshold]}: {self.n_segments[self.threshold]} segments from "
                 f"{self.n_fragments} fragments ({self.score} score < {self.threshold:g})"]
        for t, path in sorted(self.segments.items()):
            if path != self.segments[self.threshold]:
                lines.append(f"  threshold {t:g}: {self.n_segments[t]} segments -> {path}")
        lines.append(f"agglomeration: global step {self.seconds_global:.1f} s, total {self.seconds:.1f} s")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# stage 1: fragments


SECTION_BLOCK: Coordinate = (16, 1024, 1024)
"""Default block (z, y, x) of fragments and graph in the per-section (2-D) mode, before rounding to
whole chunks: about the voxels of a 256^3 block, spread in-plane so that a block's hierarchical
agglomeration sees whole cells.  With 256^2 blocks, large cells cut by block faces were merged on
partial contacts: on ISBI 2012 sections 16-19 (validation) the merge threshold's cliff came earlier
(adapted Rand error at thresholds 0.82-0.86: 0.116-0.121 with 256^2, 0.077-0.081 with 512^2 blocks;
at 0.70-0.80 and on ISBI 0-15 / vnc_sstem the two agree within 0.005)."""


def section_block_shape(chunks: Sequence[int]) -> Coordinate:
    """:data:`SECTION_BLOCK` in whole ``chunks`` (z, y, x) of the prediction; a z chunk deeper than
    its 16 sections shrinks the in-plane side to keep the block's voxels (never below one chunk)."""
    from emseg.workflows.label import default_block_shape

    depth = default_block_shape(chunks, chunks, SECTION_BLOCK)[0]
    side = min(SECTION_BLOCK[1], int((math.prod(SECTION_BLOCK) / depth) ** 0.5))
    return default_block_shape(chunks, chunks, (depth, side, side))


def make_fragments(
    pred_path: PathOrUrl,
    output: PathOrUrl | None = None,
    options: AgglomerateOptions | None = None,
    *,
    mode: Mode = "auto",
    input_kind: InputKind | Literal["auto"] = "auto",
    block_size: int | Sequence[int] | None = None,
    run: RunOptions | None = None,
    follows: Progress | None = None,
    **fields: Any,
) -> Any:
    """Per-block watershed fragments of a prediction, written to ``labels/fragments``.

    ``output`` defaults to the prediction's own image (``PRED/labels/fragments``).  The fragments
    follow ``options`` (:class:`emseg.config.AgglomerateOptions`, ``**fields`` replace single ones):
    ``fragment_threshold``, ``seeds``, ``min_distance``, ``min_size``; see :func:`emseg.workflows.label.label`
    for the others.  ``follows``: the prediction is still being written (see
    :func:`emseg.workflows.label.label`).  Returns its :class:`~emseg.workflows.label.LabelReport`.
    """
    from emseg.workflows.label import label

    run = RunOptions.take(run, fields)
    opts = AgglomerateOptions.build(options, **fields)
    pred = open_volume(pred_path, allow_incomplete=follows is not None)
    kind = input_kind_of(pred_path) if input_kind == "auto" else input_kind
    resolved = choose_mode(pred.voxel_size) if mode == "auto" else mode
    if block_size is None and resolved == "2d":
        block_size = section_block_shape(pred.chunks)
    out = location(output) if output is not None else (pred.image_path or location(pred_path))
    return label(pred_path, out, method="watershed", threshold=opts.fragment_threshold, mode=resolved,
                 seeds=opts.seeds, min_distance=opts.min_distance, min_size=opts.min_size, block_size=block_size,
                 run=run, merge_faces=False, name=FRAGMENTS_NAME, input_kind=kind, follows=follows)


def prediction_offsets(pred_path: PathOrUrl) -> tuple[Coordinate, ...] | None:
    """The affinity offsets of a prediction: its recorded ``offsets``, else those of the checkpoint
    that made it (``config.json``), else the nearest neighbours for 3 ``aff*`` outputs; None if unknown."""
    import json

    pred = open_volume(pred_path)
    status = read_status(pred.image_path) if pred.image_path is not None else {}
    offsets = status.get("offsets")
    if not offsets and status.get("checkpoint"):
        config = Path(str(status["checkpoint"])) / "config.json"
        if config.is_file():
            offsets = json.loads(config.read_text()).get("offsets")
    if not offsets and input_kind_of(pred_path) == "affinities" and (pred.channels or 0) == 3:
        offsets = [(-1, 0, 0), (0, -1, 0), (0, 0, -1)]
    return tuple(tuple(int(v) for v in o) for o in offsets) if offsets else None  # type: ignore[misc]


@dataclass(frozen=True)
class _MutexJob:
    pred: str
    fragments: str
    state: str
    grid: BlockGrid
    offsets: tuple[Coordinate, ...]
    bias: float
    long_range_bias: float | None
    mode: str
    dtype: str


def mutex_fragments_blockwise(
    pred_path: PathOrUrl,
    output: PathOrUrl | None = None,
    options: AgglomerateOptions | None = None,
    *,
    offsets: Sequence[Sequence[int]] | None = None,
    mode: Mode = "auto",
    block_size: int | Sequence[int] | None = None,
    run: RunOptions | None = None,
    **fields: Any,
) -> FragmentsReport:
    """Per-block mutex watershed fragments (mwatershed) of an affinity prediction with long-range
    channels, written to ``labels/fragments`` like :func:`make_fragments` (ids unique, consecutive,
    each fragment inside one block), ready for :func:`build_graph` and :func:`agglomerate`.
    ``options.mutex_bias`` and ``options.long_range_bias`` (or as ``**fields``) set the biases.

    Every block runs the mutex watershed over its core plus the longest offset, keeps its core and
    numbers its fragments; a prefix sum of the counts makes the ids global.

    Raises
    ------
    ConfigError (offsets unknown or not fitting the channels), VolumeShapeError, ResumeMismatchError,
    OutputExistsError, RunIncompleteError
    """
    from emseg.engine.scratch import scratch_path, write_table
    from emseg.ops.mutex import check_offsets, offsets_halo
    from emseg.ops.stitch import offsets_from_counts
    from emseg.workflows.label import default_block_shape

    run = RunOptions.take(run, fields)
    opts = AgglomerateOptions.build(options, **fields)
    bias, long_range_bias = opts.mutex_bias, opts.long_range_bias

    pred = open_volume(pred_path)
    if not pred.has_channels:
        raise VolumeShapeError(f"{pred_path}: the mutex watershed needs affinities (c, z, y, x), got axes {pred.axes}")
    found = offsets if offsets is not None else prediction_offsets(pred_path)
    if found is None:
        raise ConfigError(f"{pred_path}: no affinity offsets recorded in the prediction or its checkpoint; pass them")
    offs = check_offsets(found, pred.channels or 0)
    resolved = choose_mode(pred.voxel_size) if mode == "auto" else mode
    image = pred.image_path if output is None else location(output)
    if image is None:
        raise NotAVolumeError(f"{pred_path}: pass an output image for the fragments")
    label_root = image / "labels" / FRAGMENTS_NAME
    if block_size is not None:
        block = as_coordinate(block_size, 3)
    else:
        block = section_block_shape(pred.chunks) if resolved == "2d" else default_block_shape(pred.shape, pred.chunks)
    block = tuple(min(b, s) for b, s in zip(block, pred.shape))
    chunks = tuple(c if b % c == 0 else b for b, c in zip(block, pred.chunks))
    halo = offsets_halo(offs, resolved)  # type: ignore[arg-type]
    grid = plan_blocks(Roi.from_shape(pred.shape), block, halo, chunk_shape=chunks)
    params: dict[str, Any] = {"method": "mutex", "prediction": str(absolute(pred.path)),
                              "offsets": [list(o) for o in offs], "mode": resolved, "block": list(grid.block_shape),
                              "shape": list(pred.shape), "merge_faces": False,
                              **opts.fingerprint("mutex_bias", "long_range_bias")}
    dtype = str(np.dtype(np.uint32) if int(np.prod(grid.block_shape)) < 2**32 - 1 else np.dtype(np.uint64))
    claim = OutputClaim(label_root, params, kind="fragments output", what="fragments", key="label",
                        create=lambda record: create_labels(image, FRAGMENTS_NAME, dtype=np.uint64, chunks=chunks),
                        overwrite=run.overwrite, scratch=[Scratch.of("mutex", pred.shape, dtype, chunks)])
    claim.check()  # refused before a cluster starts
    job = _MutexJob(pred=str(pred.path), fragments=str(label_root / "0"), state=str(label_root), grid=grid,
                    offsets=offs, bias=float(bias), long_range_bias=long_range_bias, mode=resolved, dtype=dtype)
    from emseg.cluster import connect

    start = time.perf_counter()
    with connect(**run.where) as connection:
        run_stage = functools.partial(run_blockwise, connection.client, grid=grid, output=label_root, params=params,
                                      overwrite=run.overwrite, progress=run.progress, claim=claim)
        first = run_stage(stage="fragments-mutex", fn=functools.partial(_mutex_block, job))
        counts = [int(first.results[b]["count"]) for b in range(len(grid))]
        starts = offsets_from_counts(counts)
        write_table(label_root, "mutex_offsets", starts)
        second = run_stage(stage="fragments-offset", fn=functools.partial(
            _offset_block, str(label_root), str(scratch_path(label_root, "mutex")), job.fragments))
    n = int(starts[-1])
    claim.complete(n_segments=n)
    report = FragmentsReport(label_root, "mutex watershed", n, len(grid), time.perf_counter() - start, (first, second))
    log.info("%s", report.summary())
    return report


def _mutex_block(job: _MutexJob, block: Block) -> dict[str, Any]:
    from emseg.engine.scratch import scratch_path
    from emseg.ops.mutex import mutex_fragments
    from emseg.ops.threshold import probability

    data = open_volume(job.pred, allow_incomplete=True).read(block.read_roi, pad="reflect")
    affs = probability(data[: len(job.offsets)])
    labels, _ = mutex_fragments(affs, job.offsets, bias=job.bias, long_range_bias=job.long_range_bias,
                                mode=job.mode)  # type: ignore[arg-type]
    core = np.ascontiguousarray(labels[block.write_roi.relative_to(block.read_roi).to_slices()])
    core, remap = fastremap.renumber(core, preserve_zero=True, in_place=True)
    count = int(max(remap.values())) if remap else 0
    open_volume(str(scratch_path(job.state, "mutex")), mode="r+", allow_incomplete=True).write(
        block.write_roi, core.astype(job.dtype, copy=False))
    return {"count": count}


def _offset_block(state: str, scratch: str, fragments: str, block: Block) -> dict[str, Any]:
    from emseg.engine.scratch import read_table

    start = int(read_table(state, "mutex_offsets", block.block_id, block.block_id + 1)[0])
    local = open_volume(scratch, allow_incomplete=True).read(block.write_roi).astype(np.uint64)
    local[local != 0] += np.uint64(start)
    open_volume(fragments, mode="r+", allow_incomplete=True).write(block.write_roi, local)
    return {"max_id": int(local.max()) if local.size else 0}


# ---------------------------------------------------------------------------------------------
# stage 2: region graph


@dataclass(frozen=True)
class _GraphJob:
    pred: str
    fragments: str
    state: str
    grid: BlockGrid
    kind: str
    mode: str
    context: Coordinate
    quantile: float | None
    hierarchical: bool
    channels: tuple[int, ...] = (0, 1, 2)
    """Affinities: the channels holding the z, y, x nearest-neighbour affinities."""
    section_link_weight: float = 1.0
    """Factor on the affinities across sections (:attr:`AgglomerateOptions.section_link_weight`)."""


def nearest_channels(offsets: Sequence[Sequence[int]] | None) -> tuple[int, int, int]:
    """Channels of the offsets (-1, 0, 0), (0, -1, 0), (0, 0, -1) (waterz's z, y, x); (0, 1, 2) if unknown."""
    if not offsets:
        return (0, 1, 2)
    wanted = [(-1, 0, 0), (0, -1, 0), (0, 0, -1)]
    found = [tuple(int(v) for v in o) for o in offsets]
    if all(w in found for w in wanted):
        return tuple(found.index(w) for w in wanted)  # type: ignore[return-value]
    log.warning("affinity offsets %s lack the nearest neighbours (-1,0,0), (0,-1,0), (0,0,-1); "
                "taking channels 0, 1, 2 as z, y, x", found)
    return (0, 1, 2)


def _fragments_image(path: PathOrUrl) -> tuple[Any, Location]:
    """The fragments volume and its image group (where status, graph and markers live)."""
    path = location(path)
    if path.is_dir() and (path / "labels" / FRAGMENTS_NAME).is_dir() and not is_fragments(path, image_only=True):
        path = path / "labels" / FRAGMENTS_NAME
    volume = open_volume(path)
    if volume.has_channels:
        raise VolumeShapeError(f"{path}: fragments are a label volume (z, y, x), got axes {volume.axes}; "
                               "pass the fragments label image, e.g. OUT.zarr/labels/fragments")
    if not np.issubdtype(volume.dtype, np.integer):
        raise NotAVolumeError(f"{path}: fragments must hold integer ids, got {volume.dtype}")
    return volume, (volume.image_path or volume.path)


def is_fragments(path: PathOrUrl, *, image_only: bool = False) -> bool:
    """Whether ``path`` is a fragments label image (per-block fragments, or one with a graph) or,
    unless ``image_only``, an image holding ``labels/fragments`` with a finished region graph."""
    path = location(path)
    if not image_only and (path / "labels" / FRAGMENTS_NAME).is_dir():
        inner = path / "labels" / FRAGMENTS_NAME
        graph = _status(inner).get(GRAPH_KEY)
        if is_fragments(inner, image_only=True) and isinstance(graph, dict) and record_complete(graph):
            return True
    status = _status(path)
    params = (status.get("label") or {}).get("params") or {}
    return isinstance(status.get(GRAPH_KEY), dict) or (isinstance(params, dict) and params.get("merge_faces") is False)


def _status(path: Location) -> dict[str, Any]:
    if not any((path / f).exists() for f in ("zarr.json", ".zattrs", ".zgroup")):
        return {}
    try:
        return read_status(path)
    except (FileNotFoundError, ValueError, KeyError):
        return {}


def _fragment_grid(frag: Any, image: Location, block_size: int | Sequence[int] | None) -> tuple[BlockGrid, int]:
    """The block grid the fragments were made on, and the number of fragments."""
    status = read_status(image)
    label_status = status.get("label") or {}
    params = label_status.get("params") or {}
    if block_size is None:
        if params.get("merge_faces") is not False or "block" not in params:
            raise ConfigError(f"{image}: not per-block fragments made by emseg (make_fragments / emseg segment); "
                              "for other fragments pass the block size they were made with")
        block_size = params["block"]
    block = as_coordinate(block_size, 3)
    grid = plan_blocks(Roi.from_shape(frag.shape), block, 0)
    n = label_status.get("n_segments")
    return grid, int(n) if n is not None else -1


def build_graph(
    pred_path: PathOrUrl,
    fragments_path: PathOrUrl,
    options: AgglomerateOptions | None = None,
    *,
    mode: Mode = "auto",
    input_kind: InputKind | Literal["auto"] = "auto",
    hierarchical: bool = True,
    block_size: int | Sequence[int] | None = None,
    run: RunOptions | None = None,
    **fields: Any,
) -> GraphReport:
    """Extract the region graph of per-block fragments blockwise (stage 2, see the module doc).

    Parameters
    ----------
    pred_path : path
        The prediction: boundary map (channel 0) or affinities (channels z, y, x first).
    fragments_path : path
        Per-block fragments (:func:`make_fragments`), or the image holding ``labels/fragments``.
    options : AgglomerateOptions, optional
        ``context`` (voxels added on each side of a block for the hierarchical agglomeration;
        default half the block, at most 64, 0 along z in 2D mode) and ``quantile`` (also store this
        quantile of each edge's contact affinities); ``**fields`` replace single ones.
    mode : {"auto", "3d", "2d"}
        ``"2d"``: no edges across sections; ``"auto"`` and ``"3d"``: edges across sections too, also
        between per-section fragments of an anisotropic volume (:func:`graph_mode`).
    hierarchical : bool
        Compute the hierarchical merge scores (waterz); without them only ``score="mean"`` works.
    block_size : (z, y, x), optional
        Block shape of fragments not made by emseg (each fragment must lie inside one block).
    run : RunOptions, optional
        ``overwrite``, ``progress`` and where the blocks run (:class:`emseg.config.RunOptions`), or its
        fields among the keywords (``overwrite=True``); the same in every function of this module.

    Raises
    ------
    ConfigError, VolumeShapeError, VolumeNotFoundError, ResumeMismatchError, RunIncompleteError,
    InvalidDataError (a fragment crosses a block face)
    """
    run = RunOptions.take(run, fields)
    opts = AgglomerateOptions.build(options, **fields)
    context = opts.context
    quantile = check_quantile(opts.quantile)
    frag, image = _fragments_image(fragments_path)
    pred = open_volume(pred_path)
    if pred.shape != frag.shape:
        raise VolumeShapeError(f"prediction {pred_path} has shape {pred.shape} but fragments {image} have "
                               f"{frag.shape}; they must cover the same voxels")
    kind = input_kind_of(pred_path) if input_kind == "auto" else input_kind
    if kind not in INPUT_KINDS:
        raise ConfigError(f"input_kind must be 'auto' or one of {INPUT_KINDS}, got {kind!r}")
    if kind == "affinities" and (pred.channels or 0) < 3:
        raise VolumeShapeError(f"{pred_path}: affinities need at least 3 channels (z, y, x), got "
                               f"{pred.channels or 'none'}")
    resolved = graph_mode(mode)
    grid, n_fragments = _fragment_grid(frag, image, block_size)
    if context is None:
        ctx = tuple(min(64, b // 2) for b in grid.block_shape)
    else:
        ctx = as_coordinate(context, 3)
        if any(c < 0 for c in ctx):
            raise ConfigError(f"context must be non-negative voxels, got {ctx}")
    if resolved == "2d":
        ctx = (0, *ctx[1:])
    frag_status = read_status(image).get("label") or {}
    params: dict[str, Any] = {
        "prediction": str(absolute(pred.path)), "fragments": frag_status.get("fingerprint", str(frag.path)),
        "kind": kind, "mode": resolved, "hierarchical": hierarchical, "block": list(grid.block_shape),
        **opts.model_copy(update={"context": ctx, "quantile": quantile}).fingerprint("context", "quantile"),
    }
    channels = nearest_channels(prediction_offsets(pred_path)) if kind == "affinities" else (0, 1, 2)
    if channels != (0, 1, 2):
        params["channels"] = list(channels)
    weight = section_link_weight(opts, kind, resolved, pred.voxel_size)
    if weight != 1.0:
        params["section_link_weight"] = weight
    fingerprint = fingerprint_of(params)

    def reset(record: dict[str, Any]) -> None:  # a graph of other parameters goes, with what was made from it
        remove_graph(image)
        _remove_agglomerations(image, keep=fingerprint)

    claim = OutputClaim(image, params, kind="region graph", what="a region graph", key=GRAPH_KEY, create=reset,
                        within=True, overwrite=run.overwrite)
    claim.check()  # refused before a cluster starts
    job = _GraphJob(pred=str(pred.path), fragments=str(frag.path), state=str(image), grid=grid, kind=kind,
                    mode=resolved, context=ctx, quantile=quantile, hierarchical=hierarchical, channels=channels,
                    section_link_weight=weight)
    from emseg.cluster import connect

    start = time.perf_counter()
    with connect(**run.where) as connection:
        stage = run_blockwise(connection.client, stage="graph", grid=grid, fn=functools.partial(_graph_block, job),
                              output=image, params=params, overwrite=run.overwrite, progress=run.progress, claim=claim)
    n_edges = int(sum(int(stage.results[b]["edges"]) for b in range(len(grid))))
    if n_fragments < 0:
        n_fragments = max((int(stage.results[b]["max_id"]) for b in range(len(grid))), default=0)
    claim.complete(n_edges=n_edges, n_fragments=n_fragments, blocks=len(grid))
    report = GraphReport(image, n_fragments, n_edges, len(grid), time.perf_counter() - start, stage, mode=resolved)
    log.info("%s", report.summary())
    return report


def _graph_block(job: _GraphJob, block: Block) -> dict[str, Any]:
    """Stage 2 on one block: the edges it owns, with their scores, written to its own file."""
    start = time.perf_counter()
    total = job.grid.total_roi
    core = block.write_roi
    ext = Roi.from_bounds(core.begin, tuple(min(e + 1, t) for e, t in zip(core.end, total.end)))
    ctx = core.grow(job.context, job.context).intersect(total)
    frag_vol = open_volume(job.fragments, allow_incomplete=True)
    pred_vol = open_volume(job.pred, allow_incomplete=True)
    region = ctx if job.hierarchical else ext
    fragments = frag_vol.read(region)
    data = pred_vol.read(region)
    if job.kind == "affinities":
        data = data[list(job.channels)]
    affs = prediction_affinities(data, job.kind, mode=job.mode)  # type: ignore[arg-type]
    if job.section_link_weight != 1.0:
        affs[0] *= np.float32(job.section_link_weight)
    inner = ext.relative_to(region).to_slices()
    frag_ext = np.ascontiguousarray(fragments[inner])
    _check_inside(frag_ext, core.shape, block.block_id)
    edges = block_edges(frag_ext, np.ascontiguousarray(affs[(slice(None), *inner)]), core.shape,
                        mode=job.mode, quantile=job.quantile)  # type: ignore[arg-type]
    if job.hierarchical and len(edges):
        edges = edges.with_score(merge_scores(fragments, affs, edges.u, edges.v))
    write_block_edges(job.state, block.block_id, edges.as_arrays())
    core_ids = frag_ext[tuple(slice(0, c) for c in core.shape)]
    return {"edges": len(edges), "max_id": int(core_ids.max()) if core_ids.size else 0,
            "seconds": round(time.perf_counter() - start, 4)}


def _check_inside(fragments: npt.NDArray[Any], core_shape: Coordinate, block_id: int) -> None:
    """Every fragment of the core must end at the core's faces (fragments not merged across blocks)."""
    for d in range(3):
        if fragments.shape[d] == core_shape[d]:
            continue
        last = [slice(0, c) for c in core_shape]
        nxt = list(last)
        last[d] = slice(core_shape[d] - 1, core_shape[d])
        nxt[d] = slice(core_shape[d], core_shape[d] + 1)
        a, b = fragments[tuple(last)], fragments[tuple(nxt)]
        if ((a == b) & (a != 0)).any():
            raise InvalidDataError(f"block {block_id}: fragment {int(a[(a == b) & (a != 0)][0])} crosses the "
                                   f"block face along axis {'zyx'[d]}; the region graph needs per-block fragments "
                                   "(emseg make_fragments / label merge_faces=False) on the same block grid")


# ---------------------------------------------------------------------------------------------
# stages 3 and 4: global agglomeration and relabel


@dataclass(frozen=True)
class _RelabelJob:
    fragments: str
    labels: str
    lookup: str


def _graph_status(image: Location) -> dict[str, Any]:
    graph = read_status(image).get(GRAPH_KEY)
    if not isinstance(graph, dict) or not record_complete(graph):
        what = "an unfinished region graph" if isinstance(graph, dict) else "no region graph"
        raise GraphNotFoundError(f"{image}: fragments with {what}; build it with `emseg agglomerate PRED` "
                                 "on the prediction (or emseg.workflows.agglomerate.build_graph) first")
    return graph


def global_lookups(
    image: PathOrUrl, thresholds: Sequence[float], *, score: Score = "hierarchical",
    n_fragments: int, n_blocks: int,
) -> dict[float, tuple[npt.NDArray[np.uint64], int]]:
    """Fragment -> segment lookups (and segment counts) for ascending ``thresholds``: one streaming
    pass over the blocks' edge files per threshold, unions onto one parent array (O(fragments))."""
    uf = UnionFind(n_fragments)
    out: dict[float, tuple[npt.NDArray[np.uint64], int]] = {}
    below = -np.inf
    for t in sorted(set(thresholds)):
        for b in range(n_blocks):
            if score == "mean":
                e = read_block_edges(image, b, ("u", "v", "aff_sum", "area"))
                s = 1.0 - e["aff_sum"] / np.maximum(e["area"], 1)
            else:
                e = read_block_edges(image, b, ("u", "v", "score"))
                s = e["score"]
            keep = (s < t) & (s >= below)
            if keep.any():
                if int(e["v"][keep].max()) > n_fragments:
                    raise InvalidDataError(f"{image}: block {b}'s graph names fragment {int(e['v'][keep].max())} "
                                           f"but there are {n_fragments}; rebuild the graph")
                uf.union(e["u"][keep], e["v"][keep])
        below = t
        out[t] = consecutive_lookup(uf.roots())
    return out


def agglomerate(
    fragments_path: PathOrUrl,
    options: AgglomerateOptions | None = None,
    *,
    output: PathOrUrl | None = None,
    run: RunOptions | None = None,
    **fields: Any,
) -> AgglomerateReport:
    """Merge fragments whose edge score is below a threshold; write one label image per threshold.

    Parameters
    ----------
    fragments_path : path
        Fragments with a finished region graph (:func:`build_graph`): ``OUT.zarr/labels/fragments``,
        or ``OUT.zarr`` itself.
    options : AgglomerateOptions, optional
        ``threshold`` (in (0, 1), written to ``labels/segments``: edges with ``score < threshold``
        are merged), ``thresholds`` (extra ones, each written to ``labels/segments_<t>``, e.g.
        ``segments_0.50``) and ``score`` (the hierarchical merge score, waterz with context, or
        ``1 - mean affinity`` of the edge); ``**fields`` replace single ones.
    output : path, optional
        The OME-Zarr image that receives the label images (default: the image holding the
        fragments, or the fragments image itself when it is not a label image).
    run : RunOptions, optional
        See :func:`build_graph`.

    Returns
    -------
    AgglomerateReport
        ``segments[t]`` is the label image of threshold ``t`` (uint64, ids ``1..n_segments[t]``).

    Raises
    ------
    ConfigError (thresholds out of range, unknown score), GraphNotFoundError, ResumeMismatchError,
    OutputExistsError, RunIncompleteError
    """
    run = RunOptions.take(run, fields)
    opts = AgglomerateOptions.build(options, **fields)
    score = opts.score
    threshold, extra = float(opts.threshold), tuple(float(t) for t in opts.thresholds)  # validated by the options
    if score not in SCORES:
        raise ConfigError(f"score must be one of {SCORES}, got {score!r}")
    frag, image = _fragments_image(fragments_path)
    graph = _graph_status(image)
    if score == "hierarchical" and not graph.get("params", {}).get("hierarchical", True):
        raise ConfigError(f"{image}: its graph has no hierarchical merge scores; use score='mean' or rebuild "
                          "the graph with hierarchical=True")
    n_fragments, n_blocks = int(graph["n_fragments"]), int(graph["blocks"])
    if output is not None:
        target = location(output)
    elif image.parent.name == "labels":
        target = image.parent.parent
    else:
        target = image
    names = {threshold: SEGMENTS_NAME, **{t: segments_name(t) for t in extra if t != threshold}}
    names[threshold] = SEGMENTS_NAME
    wanted = sorted(set(names))

    def claim_of(t: float) -> OutputClaim:
        """Label image of threshold ``t`` in ``target``, resumed when a run with these parameters left it."""
        params = {"graph": graph["fingerprint"],
                  **opts.model_copy(update={"threshold": t}).fingerprint("threshold", "score")}
        return OutputClaim(target / "labels" / names[t], params,
                           kind="agglomeration", what="segments", key=AGGLOMERATE_KEY, overwrite=run.overwrite,
                           create=lambda record: create_labels(target, names[t], dtype=np.uint64, chunks=frag.chunks))

    claims = {t: claim_of(t) for t in wanted}
    for claim in claims.values():  # refuse before any work when an output holds something else
        claim.check()
    start = time.perf_counter()
    # stage 3: lookups (reused when a resumed run finds them finished)
    lookups: dict[float, Location] = {}
    counts: dict[float, int] = {}
    missing = []
    for t in wanted:
        path = lookup_path(image, f"{score}_{t:.6g}")
        lookups[t] = path
        attrs = lookup_attrs(path)
        if attrs.get("graph") == graph["fingerprint"] and record_complete(attrs):
            counts[t] = int(attrs["n_segments"])
        else:
            missing.append(t)
    t0 = time.perf_counter()
    if missing:
        for t, (lookup, n) in global_lookups(image, missing, score=score, n_fragments=n_fragments,
                                             n_blocks=n_blocks).items():
            write_lookup(lookups[t], lookup, attrs={"graph": graph["fingerprint"], "threshold": t, "score": score,
                                                    "n_segments": n, "status": "complete"})
            counts[t] = n
    seconds_global = time.perf_counter() - t0

    # stage 4: relabel, one label image per threshold
    grid = plan_blocks(Roi.from_shape(frag.shape), as_coordinate(graph["params"]["block"], 3), 0)
    stages: list[StageReport] = []
    segments: dict[float, Location] = {}
    from emseg.cluster import connect

    with connect(**run.where) as connection:
        for t in wanted:
            claim = claims[t]
            job = _RelabelJob(fragments=str(frag.path), labels=str(claim.path / "0"), lookup=str(lookups[t]))
            stages.append(run_blockwise(connection.client, stage="agglomerate-relabel", grid=grid,
                                        fn=functools.partial(_relabel_block, job), output=claim.path,
                                        params=claim.params, overwrite=run.overwrite, progress=run.progress, claim=claim,
                                        writes=[WriteSpec(job.labels)]))  # records its chunks (integrity)
            claim.complete(attrs={"threshold": t}, n_segments=counts[t])
            segments[t] = claim.path
    report = AgglomerateReport(image, threshold, score, n_fragments, segments, counts,
                               time.perf_counter() - start, tuple(stages), seconds_global)
    log.info("%s", report.summary())
    return report


def _remove_agglomerations(fragments: Location, *, keep: str) -> None:
    """Delete the label images beside ``fragments`` agglomerated from a region graph other than
    ``keep``: a rebuilt graph makes them another run's output."""
    from emseg.io.volume import label_image_paths, remove_label_image

    image = fragments.parent.parent
    for path in label_image_paths(image):
        graph = read_status(path).get("agglomerate", {}).get("params", {}).get("graph")
        if isinstance(graph, str) and graph != keep:
            log.info("%s: removed, agglomerated from the replaced region graph %s", path, graph)
            remove_label_image(image, path.name)


def _relabel_block(job: _RelabelJob, block: Block) -> dict[str, Any]:
    """Stage 4 on one block: fragment ids -> segment ids through the lookup's slice for this block."""
    fragments = open_volume(job.fragments, allow_incomplete=True).read(block.write_roi)
    out = np.zeros(fragments.shape, dtype=np.uint64)
    present = fragments != 0
    if present.any():
        ids = fragments[present]
        lo, hi = int(ids.min()), int(ids.max())
        table = np.asarray(open_lookup(job.lookup)[lo: hi + 1], dtype=np.uint64)
        out[present] = table[(ids - lo).astype(np.int64)]
    open_volume(job.labels, mode="r+", allow_incomplete=True).write(block.write_roi, out)
    return {"segments_max": int(out.max()) if out.size else 0}


# ---------------------------------------------------------------------------------------------
# all stages


def segment_prediction(
    pred_path: PathOrUrl,
    options: AgglomerateOptions | None = None,
    *,
    mode: Mode = "auto",
    input_kind: InputKind | Literal["auto"] = "auto",
    offsets: Sequence[Sequence[int]] | None = None,
    block_size: int | Sequence[int] | None = None,
    run: RunOptions | None = None,
    follows: Progress | None = None,
    **fields: Any,
) -> tuple[Any, GraphReport, AgglomerateReport]:
    """Fragments, region graph and agglomeration of a prediction image, in ``PRED/labels/``.

    ``options`` (:class:`emseg.config.AgglomerateOptions`; ``**fields`` replace single ones, e.g.
    ``threshold=0.7``) choose the fragments, the graph and the merging; ``mode``, ``block_size``
    and ``run`` (:class:`~emseg.config.RunOptions`, or its fields as keywords) are those of
    :func:`make_fragments` and :func:`build_graph`.

    ``fragments_method="mutex"`` makes the fragments by a per-block mutex watershed of the
    affinities and their long-range ``offsets`` (default: those recorded with the prediction or its
    checkpoint; :func:`mutex_fragments_blockwise`) instead of the seeded watershed.

    ``follows``: the prediction is still being written by ``emseg predict`` in another thread of this
    process (:mod:`emseg.engine.follow`): each block's fragments start once the prediction blocks
    they read are written, and the graph once the whole prediction is.

    Returns the fragments' :class:`~emseg.workflows.label.LabelReport`, the :class:`GraphReport` and the
    :class:`AgglomerateReport`.
    """
    run = RunOptions.take(run, fields)
    opts = AgglomerateOptions.build(options, **fields)
    check_quantile(opts.quantile)
    if follows is not None and opts.fragments == "mutex":  # mutex fragments read the prediction whole
        follows.wait_ended()
        follows = None
    pred = open_volume(pred_path, allow_incomplete=follows is not None)
    if not pred.has_channels and np.issubdtype(pred.dtype, np.integer) and pred.dtype.itemsize >= 4:
        raise GraphNotFoundError(f"{pred_path}: a label volume ({pred.dtype}) without a region graph; pass the "
                                 "prediction image (fragments and graph are computed from it) or fragments made "
                                 "by emseg with their graph")
    if pred.image_path is None:
        raise NotAVolumeError(f"{pred_path}: agglomeration writes label images into the prediction's OME-Zarr "
                              "image; pass an image made by emseg predict")
    if not pred.has_channels:
        raise NotAVolumeError(f"{pred_path}: not a prediction (no channel axis; raw EM or a single image?); "
                              "agglomeration needs the output of emseg predict (or emseg segment)")
    if not made_by_emseg(pred.image_path):
        raise NotAVolumeError(f"{pred.image_path}: not made by emseg, and agglomeration writes label images into it; "
                              "run emseg predict and pass its output")
    kind = input_kind_of(pred_path, allow_incomplete=follows is not None) if input_kind == "auto" else input_kind
    # fragments per section on anisotropic volumes (auto) or when asked (2d); the graph links them
    # across sections unless per-section labels are asked for
    fragment_mode = choose_mode(pred.voxel_size) if mode == "auto" else mode
    from emseg.cluster import connect

    with connect(**run.where) as connection:
        on = run.model_copy(update={"client": connection})  # every stage on this one cluster
        if opts.fragments == "mutex":
            fragments = mutex_fragments_blockwise(pred_path, pred.image_path, opts, offsets=offsets,
                                                  mode=fragment_mode, block_size=block_size, run=on)
        else:
            fragments = make_fragments(pred_path, pred.image_path, opts, mode=fragment_mode, input_kind=kind,
                                       block_size=block_size, run=on, follows=follows)
            if follows is not None:
                follows.wait_ended()  # the graph reads the finished prediction
        frag_path = pred.image_path / "labels" / FRAGMENTS_NAME
        graph = build_graph(pred_path, frag_path, opts, mode=graph_mode(mode), input_kind=kind, run=on)
        result = agglomerate(frag_path, opts, run=on)
    return fragments, graph, result


def agglomerate_target(
    target: PathOrUrl,
    options: AgglomerateOptions | None = None,
    *,
    mode: Mode = "auto",
    block_size: int | Sequence[int] | None = None,
    input_kind: InputKind | Literal["auto"] = "auto",
    offsets: Sequence[Sequence[int]] | None = None,
    run: RunOptions | None = None,
    **fields: Any,
) -> tuple[Any, GraphReport | None, AgglomerateReport]:
    """What ``emseg agglomerate TARGET`` runs, and ``emseg.agglomerate(path)`` with it.

    ``target`` is a prediction image (its fragments and region graph are made first, or resumed:
    :func:`segment_prediction`) or a fragments label image with its graph (agglomerated again:
    :func:`agglomerate`; fragment or graph options then need the prediction image).  The run holds
    the run lock of the image that receives the labels, the lock ``emseg segment`` takes, and merges
    at the predicting model's ``agglomeration_threshold`` unless a threshold is given.

    Returns the fragments' and the graph's reports (``None`` when only agglomerated again) and the
    :class:`AgglomerateReport`.
    """
    from emseg.engine.lock import run_lock

    run = RunOptions.take(run, fields)
    given = {k for k, v in fields.items() if v is not None} | (options.model_fields_set if options else set())
    opts = AgglomerateOptions.build(options, **fields)
    rebuild = mode != "auto" or block_size is not None or bool(given - AgglomerateOptions.AGGLOMERATION_ONLY)
    image = Path(os.path.realpath(str(target)))  # realpath: a symlink loop stays a path that does not exist
    while image.parent.name == "labels" and image.parent.parent != image.parent:
        image = image.parent.parent
    opts = with_model_settings(opts, image, given)  # the predicting model's own, as `emseg segment` uses them
    with run_lock(image, "agglomerate"):
        if is_fragments(location(target)) and not (rebuild and is_fragments(location(target) / "labels" / FRAGMENTS_NAME,
                                                                         image_only=True)):
            if rebuild:
                flags = [f for f in AgglomerateOptions.model_fields if f not in AgglomerateOptions.AGGLOMERATION_ONLY]
                raise ConfigError(f"{target}: fragment and graph options (--2d/--3d, --block-size, "
                                  f"{', '.join('--' + f.replace('_', '-') for f in flags)}) need the prediction "
                                  "image, not the fragments")
            return None, None, agglomerate(target, threshold=opts.threshold, thresholds=opts.thresholds,
                                           score=opts.score, run=run)
        return segment_prediction(target, opts, mode=mode, block_size=block_size, input_kind=input_kind,
                                  offsets=offsets, run=run)
