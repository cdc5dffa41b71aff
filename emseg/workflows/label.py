"""Blockwise labelling: boundary predictions -> one globally consistent uint64 segmentation.

Three stages run through :func:`emseg.engine.runner.run_blockwise`; no step holds the whole volume:

1. ``label-fragments``: every block labels its core (``cc``: threshold + connected components of
   the core alone; ``watershed``: seeded watershed of core + halo, cropped to the core) with local
   ids ``1..count`` and writes its first and last section along each axis to small *face* arrays
   (for the watershed: only its interior voxels).  Watershed fragments are kept in a scratch
   array; ``cc`` fragments are cheap and deterministic, so stage 3 recomputes them instead of
   writing and reading them back.
2. ``label-faces``: every block compares its last sections with the first sections of the blocks
   above it (faces, and for 18/26-connectivity edges and corners) in global ids
   (``local + offset``, offsets = prefix sum of the counts) and returns the pairs that touch
   (``watershed``: pairs whose interior contact covers ``min_contact`` of the smaller face area),
   written to storage by the worker.  The client streams them through a compact 64-bit
   union-find (:func:`emseg.ops.stitch.resolve_merges_streamed`), never holding them all, and sends
   small relabel tables with the tasks (stores large ones).  With little face data
   (:data:`CLIENT_FACE_VOXELS`) the client runs this stage on its own threads: the work is less
   than a cluster stage's scheduling.
3. ``label-relabel``: every block maps its local ids to consecutive final ids ``1..N`` (uint64).
   ``cc`` blocks reuse the fragments their worker kept in memory from stage 1: both stages ask
   Dask to run a block on the same worker (a loose restriction; a block moved elsewhere is
   labelled again).

Output layout
-------------
* ``output`` is the prediction's own OME-Zarr image (what ``emseg segment`` does): the labels go
  to the label image ``output/labels/segments`` (level ``0``, uint64, ``image-label`` metadata).
* ``output`` is a new path: it becomes a uint64 OME-Zarr image (level ``output/0``).

:attr:`LabelReport.labels_path` names the label image in both cases.  Completion markers and
scratch arrays live in ``<label image>/emseg_state``; the scratch is removed when the run is
complete (``keep_fragments=True`` keeps the per-block fragments for inspection or agglomeration).
Rerunning the same command resumes; other parameters are refused unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from emseg.config import LabelOptions, RunOptions
from emseg.engine.follow import Progress
from emseg.engine.lock import locked
from emseg.engine.pairs import iter_pairs, write_pairs
from emseg.engine.runner import StageReport, WriteSpec, run_blockwise
from emseg.engine.runstate import OutputClaim, Scratch
from emseg.engine.scratch import Table, scratch_path, write_table
from emseg.errors import ConfigError, VolumeShapeError
from emseg.geometry import Block, BlockGrid, Coordinate, Roi, as_coordinate, plan_blocks
from emseg.io import (
    Volume,
    check_distinct,
    create_labels,
    create_volume,
    open_volume,
)
from emseg.io.location import Location, PathOrUrl, absolute, location
from emseg.ops import (
    RULES,
    WatershedParams,
    absorb_boundary_only,
    boundary_map,
    check_connectivity,
    check_threshold,
    foreground_mask,
    label_components,
    local_dtype,
    probability,
    watershed_fragments,
)
from emseg.ops.stitch import (
    block_relabel_table,
    crossing_shifts,
    offsets_from_counts,
    plane_pairs,
    relabel_block,
    resolve_merges_streamed,
    select_merges,
    to_global,
    unique_pairs,
)
from emseg.workflows.evaluate import evaluate_paths  # re-exported: evaluation I/O lives in emseg.workflows.evaluate

log = logging.getLogger(__name__)

Method = Literal["cc", "watershed"]
METHODS: tuple[str, ...] = ("cc", "watershed")
LABEL_NAME = "segments"
DEFAULT_BLOCK = 128
CC_BLOCK = 256
"""cc's default block edge: no halo and little compute per voxel, so fewer, larger blocks (fewer faces to
match, fewer tasks); 8x a watershed block's voxels, ~0.4 GB of worker memory at uint8 input."""
STATUS_KEY = "label"
FACES_STAGE = "label-faces"
CLIENT_FACE_VOXELS = 1 << 23
"""Up to this many face voxels, faces are matched on the client's threads instead of the cluster."""
INLINE_TABLE_BYTES = 1 << 26
"""Stitching tables travel with the block tasks while all their copies together stay below this."""
FRAGMENT_CACHE_FRACTION = 0.2
"""Share of a worker's memory limit that may hold ``cc`` fragments between stage 1 and stage 3."""

__all__ = ["LabelReport", "METHODS", "Method", "default_block_shape", "evaluate_paths", "label"]


@dataclass(frozen=True)
class LabelReport:
    """What :func:`label` did.

    Attributes
    ----------
    labels_path : Path
        The label image written (an OME-Zarr image group; level ``0`` is the uint64 array).
    n_segments : int
        Number of segments; their ids are ``1..n_segments`` (0 = background).
    n_fragments : int
        Number of per-block fragments before stitching.
    n_merges : int
        Fragments merged into another across block faces.
    blocks : int
        Blocks in the grid.
    block_shape : Coordinate
        Core shape of a block, voxels (z, y, x).
    seconds : float
        Wall time of the three stages (cluster start-up excluded).
    stages : tuple of StageReport
    """

    labels_path: Location
    method: str
    n_segments: int
    n_fragments: int
    n_merges: int
    blocks: int
    block_shape: Coordinate
    seconds: float
    stages: tuple[StageReport, ...] = field(repr=False)

    def summary(self) -> str:
        computed = sum(s.computed for s in self.stages)
        resumed = "" if computed or not self.stages else " (all blocks already done)"
        return (
            f"{self.labels_path}: {self.n_segments} segments (uint64, ids 1..{self.n_segments}) by {self.method} "
            f"from {self.n_fragments} block fragments, {self.n_merges} merged across faces; "
            f"{self.blocks} blocks of {'x'.join(map(str, self.block_shape))} in {self.seconds:.1f} s{resumed}"
        )


@dataclass(frozen=True)
class _Job:
    """Everything a worker needs, sent by value with each task."""

    pred: str
    state: str
    labels: str
    grid: BlockGrid
    method: str
    rule: str
    threshold: float
    connectivity: int
    mode: str
    watershed: WatershedParams
    min_contact: float
    voxel_size: tuple[float, ...]
    face_axes: tuple[int, ...]
    fragment_dtype: str
    token: str
    affinities: bool = False
    """The prediction holds affinities (z, y, x first): the boundary map is 1 - their mean."""
    """Unique per :func:`label` call: workers reuse arrays they opened for the same call only."""
    tables: tuple[tuple[str, npt.NDArray[Any]], ...] = ()
    """Small stitching tables sent with the tasks (:func:`_with_tables`); larger ones are in scratch storage."""
    faces: tuple[tuple[int, npt.NDArray[Any]], ...] = ()
    """Face arrays (by axis) read whole, when the client matches the faces itself."""

    def match_connectivity(self) -> int:
        """Neighbourhood for face pairs: the labelling's own for cc, face contacts for watershed."""
        return self.connectivity if self.method == "cc" else 6


def default_block_shape(shape: Sequence[int], chunks: Sequence[int],
                        target: int | Sequence[int] = DEFAULT_BLOCK) -> Coordinate:
    """About ``target`` voxels per axis (one value, or one per axis), a multiple of the chunks (clipped
    to the volume later)."""
    targets = as_coordinate(target, len(chunks))
    return tuple(max(c, (t // c) * c) for c, t, s in zip(chunks, targets, shape))


def _resolve_rule(foreground: str, dtype: np.dtype[Any], has_channels: bool) -> str:
    if foreground != "auto":
        if foreground not in RULES:
            raise ConfigError(f"foreground must be 'auto' or one of {RULES}, got {foreground!r}")
        return foreground
    if has_channels or np.issubdtype(dtype, np.floating):
        return "below"
    return "nonzero"


@locked("output_path", "label")
def label(
    pred_path: PathOrUrl,
    output_path: PathOrUrl,
    options: LabelOptions | None = None,
    *,
    run: RunOptions | None = None,
    keep_fragments: bool = False,
    merge_faces: bool = True,
    name: str = LABEL_NAME,
    input_kind: Literal["boundary", "affinities"] = "boundary",
    zarr_format: int | None = None,
    follows: Progress | None = None,
    **fields: Any,
) -> LabelReport:
    """Label a boundary prediction blockwise on a Dask cluster.

    Parameters
    ----------
    pred_path : path
        OME-Zarr image with axes ``(c, z, y, x)`` (channel 0 = boundary probability, uint8 ``p*255``
        or float in [0, 1]) or a plain ``(z, y, x)`` array (probability map, binary mask, labels).
    output_path : path
        The prediction's own image group (labels go to ``labels/segments``) or a new path (a uint64
        OME-Zarr image).  See the module docstring.
    options : LabelOptions, optional
        The labelling options (:class:`emseg.config.LabelOptions`: ``method``, ``threshold``,
        ``foreground``, ``connectivity``, ``mode``, ``min_size``, ``seeds``, ``min_distance``,
        ``sigma``, ``min_contact``, ``block_size``); ``**fields`` replace single ones.  ``cc``
        equals (up to id order) ``cc3d.connected_components`` of the whole volume; ``watershed``
        stitches seeded-watershed fragments across block faces.
    merge_faces : bool
        False: keep every block's fragments apart (no face stage): each segment lies inside one
        block and block ``b`` holds the consecutive ids ``offsets[b]+1 .. offsets[b+1]`` (the
        fragments of :mod:`emseg.workflows.agglomerate`).
    name : str
        Name of the label image when ``output`` is the prediction's own image.
    input_kind : {"boundary", "affinities"}
        ``affinities``: channels 0..2 are z, y, x affinities; the boundary map is ``1 - mean`` of
        them (``y, x`` only in 2D mode).
    run : RunOptions, optional
        ``overwrite``, ``progress`` and where the blocks run (:class:`~emseg.config.RunOptions`; its
        fields may also be given among ``**fields``): ``run.client`` an open client (e.g. ``emseg
        segment`` chaining predict and label), otherwise a cluster is started from ``cluster`` /
        ``scheduler`` / ``workers`` and closed afterwards.
    zarr_format : {2, 3}, optional
        Zarr format of a new label image (3: OME-NGFF 0.5, 2: 0.4); default: the prediction's.  Labels
        written into the prediction's own image follow that image.
    follows : Progress, optional
        The prediction is still being written by a stage in another thread of this process: each
        block's first stage starts once the prediction blocks it reads are written
        (:mod:`emseg.engine.follow`).  Only for ``merge_faces=False`` (fragments).

    Raises
    ------
    ConfigError, VolumeNotFoundError, NotAVolumeError, VolumeShapeError, OutputExistsError,
    SameInputOutputError, ResumeMismatchError, RunIncompleteError
    """
    run = RunOptions.take(run, fields)
    opts = LabelOptions.build(options, **fields)
    method, threshold, connectivity, mode, foreground = (opts.method, opts.threshold, opts.connectivity, opts.mode,
                                                         opts.foreground)
    min_size, seeds, min_distance, sigma, min_contact = (opts.min_size, opts.seeds, opts.min_distance, opts.sigma,
                                                         opts.min_contact)
    block_size = opts.block_size
    check_threshold(threshold)
    check_connectivity(connectivity, mode)
    if not 0.0 < min_contact <= 1.0:
        raise ConfigError(f"min_contact must be a fraction in (0, 1], got {min_contact}")
    ws = WatershedParams(threshold=threshold, seeds=seeds, min_distance=min_distance, min_size=min_size, sigma=sigma)
    if follows is not None and merge_faces:
        raise ConfigError("label: following a running prediction needs merge_faces=False (fragments only)")
    pred = open_volume(pred_path, allow_incomplete=follows is not None)
    rule = _resolve_rule(foreground, pred.dtype, pred.has_channels)
    output = location(output_path)
    in_image = pred.image_path is not None and output.resolve() == pred.image_path.resolve()
    if not in_image:
        check_distinct(pred_path, output)
    label_root = output / "labels" / name if in_image else output

    shape = pred.shape
    if block_size is None:
        block = default_block_shape(shape, pred.chunks, CC_BLOCK if method == "cc" else DEFAULT_BLOCK)
    else:
        block = as_coordinate(block_size, 3)
    if any(b <= 0 for b in block):
        raise ConfigError(f"block size must be positive on every axis, got {block}")
    block = tuple(min(b, s) for b, s in zip(block, shape))
    chunks = tuple(c if b % c == 0 else b for b, c in zip(block, pred.chunks))
    halo = ws.halo(mode, pred.voxel_size) if method == "watershed" else (0, 0, 0)
    grid = plan_blocks(Roi.from_shape(shape), block, halo, chunk_shape=chunks)
    from emseg.engine.resources import check_memory, worker_memory

    read_voxels = int(np.prod([b + 2 * h for b, h in zip(grid.block_shape, halo)]))
    # prediction + float boundary map + mask + local and global ids (+ watershed's distance map and queue)
    per_voxel = pred.dtype.itemsize * (pred.channels or 1) + 4 + 1 + 8 + 8 + (16 if method == "watershed" else 0)
    check_memory(read_voxels * per_voxel, worker_memory(**run.where),
                 f"a {method} block of {'x'.join(map(str, grid.block_shape))} voxels",
                 "use a smaller --block-size, or workers with more memory")
    # what determines the labels: the options (every default resolved) and the layout they run on
    params: dict[str, Any] = {
        "prediction": str(absolute(pred.path)), "shape": list(shape), "block": list(grid.block_shape),
        **opts.model_copy(update={"foreground": rule}).fingerprint(),
    }
    if not merge_faces:
        params["merge_faces"] = False
    if input_kind == "affinities":
        if not pred.has_channels or (pred.channels or 0) < 3:
            raise VolumeShapeError(f"{pred_path}: affinities need at least 3 channels (z, y, x), got axes "
                                   f"{pred.axes} and shape {pred.array.shape}")
        params["input_kind"] = input_kind
    if zarr_format not in (None, 2, 3):
        raise ConfigError(f"--zarr-format must be 2 or 3, got {zarr_format!r}")
    face_axes = tuple(a for a in range(3) if merge_faces and grid.grid_shape[a] > 1
                      and not (mode == "2d" and a == 0))
    job = _Job(pred=str(pred.path), state=str(label_root), labels=str(label_root / "0"), grid=grid, method=method,
               rule=rule, threshold=float(threshold), connectivity=int(connectivity), mode=mode, watershed=ws,
               min_contact=float(min_contact), voxel_size=tuple(pred.voxel_size), face_axes=face_axes,
               fragment_dtype=str(local_dtype(int(np.prod(grid.block_shape)))), token=uuid.uuid4().hex,
               affinities=input_kind == "affinities")
    claim = _label_claim(job, output, label_root, in_image=in_image, chunks=chunks, params=params,
                         overwrite=run.overwrite, voxel_size=pred.voxel_size, offset_nm=pred.offset_nm, name=name,
                         zarr_format=int(pred.array.metadata.zarr_format) if zarr_format is None else zarr_format)
    claim.check()  # refused before a cluster starts

    start = time.perf_counter()
    from emseg.cluster import connect

    with connect(**run.where) as connection, \
            _fragments_forgotten(connection.client, job.token):
        run_stage = functools.partial(run_blockwise, client=connection.client, grid=grid, output=label_root,
                                      params=params, overwrite=run.overwrite, progress=run.progress, claim=claim)
        # cc: a block's relabelling goes back to the worker that kept its fragments from stage 1
        place = _placement(connection.client) if method == "cc" else None
        fragments = run_stage(stage="label-fragments", fn=functools.partial(_fragment_block, job), placement=place,
                              follows=follows)
        offsets = offsets_from_counts(fragments.results.column("count"))
        job = _with_tables(job, offsets=offsets)
        stages = [fragments]
        with_pairs = np.zeros(0, dtype=np.int64)
        if face_axes:
            # little face data: match on the client's threads, where the work costs less than a
            # cluster stage's scheduling (same records, same stored pairs)
            on_client = _face_voxels(grid, face_axes) <= CLIENT_FACE_VOXELS
            face_job = _with_faces(job) if on_client else job
            faces = run_stage(stage=FACES_STAGE, fn=functools.partial(_faces_block, face_job),
                        client=None if on_client else connection.client)
            del face_job  # the face arrays in memory
            stages.append(faces)
            with_pairs = np.flatnonzero(faces.results.column("pairs") > 0)
        n_fragments = int(offsets[-1])
        # workers wrote the pairs to storage: stream them through a compact union-find
        merges = resolve_merges_streamed(iter_pairs(label_root, FACES_STAGE, with_pairs), n_fragments)
        # per block (offset, first merged index); merged ids interleaved with their final ids
        starts = np.searchsorted(merges.merged_ids, offsets, side="right").astype(np.uint64)
        job = _with_tables(job, blocks=np.stack([offsets, starts], axis=1),
                           merged=np.stack([merges.merged_ids, merges.merged_final], axis=1))
        # a rerun re-checks the written label chunks and recomputes blocks whose chunks went missing
        # (watershed needs its fragments for that, gone once a run completed: trust the records then)
        can_redo = method == "cc" or scratch_path(label_root, "fragments").exists()
        stages.append(run_stage(stage="label-relabel", fn=functools.partial(_relabel_block, job),
                          writes=[WriteSpec(job.labels)], verify="sizes" if can_redo else "none",
                          placement=place))
    seconds = time.perf_counter() - start
    report = LabelReport(label_root, method, merges.n_segments, n_fragments, len(merges.merged_ids), len(grid),
                         grid.block_shape, seconds, tuple(stages))
    claim.complete(keep_scratch=keep_fragments, n_segments=merges.n_segments)
    log.info("%s", report.summary())
    return report


def _label_claim(
    job: _Job,
    output: Location,
    label_root: Location,
    *,
    in_image: bool,
    chunks: Coordinate,
    params: dict[str, Any],
    overwrite: bool,
    voxel_size: Sequence[float],
    offset_nm: Sequence[float],
    name: str = LABEL_NAME,
    zarr_format: int = 3,
) -> OutputClaim:
    """The label image: a new image ``output``, or ``name`` in the prediction's own image, resumed
    when it holds a run with the same parameters (:mod:`emseg.engine.runstate`), with the run's scratch."""
    shape = job.grid.total_roi.shape

    def create(record: dict[str, Any]) -> None:
        if in_image:
            create_labels(output, name, dtype=np.uint64, chunks=chunks)
        else:
            create_volume(output, shape=shape, dtype=np.uint64, chunks=chunks, voxel_size=voxel_size,
                          offset_nm=offset_nm, overwrite=overwrite, name=name, extra_attrs=record,
                          zarr_format=zarr_format)  # type: ignore[arg-type]

    def validate(path: Location) -> None:
        volume = open_volume(path, allow_incomplete=True)
        if volume.shape != shape:
            raise VolumeShapeError(f"{path}: shape {volume.shape} differs from the prediction's {shape}; "
                                   "pass --overwrite to replace it")

    scratch = [Scratch.of(f"faces_{axis}", _face_shape(shape, job.grid, axis), job.fragment_dtype,
                          _face_chunks(job.grid.block_shape, axis)) for axis in job.face_axes]
    if job.method != "cc":  # cc fragments are recomputed in the last stage, not stored
        scratch.insert(0, Scratch.of("fragments", shape, job.fragment_dtype, chunks))
    return OutputClaim(label_root, params, kind="label output", what="labels", create=create, key=STATUS_KEY,
                       others=None if in_image else "a raw image or a prediction", overwrite=overwrite,
                       scratch=scratch, validate=validate)


def _face_voxels(grid: BlockGrid, face_axes: Sequence[int]) -> int:
    """Voxels of the face sections the face stage compares (two sections per inner boundary)."""
    shape = grid.total_roi.shape
    return sum(2 * (grid.grid_shape[a] - 1) * int(np.prod(shape)) // shape[a] for a in face_axes)


def _with_faces(job: _Job) -> _Job:
    """``job`` holding its face arrays in memory (each read in one call), for matching on the client."""
    return dataclasses.replace(job, faces=tuple(
        (axis, (volume := _volume(str(scratch_path(job.state, f"faces_{axis}")), "r", job.token)).read(volume.roi))
        for axis in job.face_axes))


def _face_sections(job: _Job, axis: int, roi: Roi) -> npt.NDArray[Any]:
    for key, data in job.faces:
        if key == axis:
            return data[roi.to_slices()]
    return _volume(str(scratch_path(job.state, f"faces_{axis}")), "r", job.token).read(roi)


def _face_shape(shape: Coordinate, grid: BlockGrid, axis: int) -> Coordinate:
    return tuple(2 * grid.grid_shape[a] if a == axis else s for a, s in enumerate(shape))


def _face_chunks(block: Coordinate, axis: int) -> Coordinate:
    """A block's first and last section share one chunk: one write per axis."""
    return tuple(2 if a == axis else b for a, b in enumerate(block))


# ---------------------------------------------------------------------------------------------
# worker side: one function per stage, each a function of one Block


@functools.lru_cache(maxsize=32)
def _volume(path: str, mode: Literal["r", "r+"], token: str) -> Volume:
    """Arrays a worker process opened for the run ``token`` (opening costs more than a small read)."""
    return open_volume(path, mode=mode, allow_incomplete=True)


@functools.lru_cache(maxsize=32)
def _table(state: str, name: str, token: str) -> Table:
    return Table(state, name)


def _with_tables(job: _Job, **tables: npt.NDArray[Any]) -> _Job:
    """``job`` carrying the small ``tables`` itself; the others are written to scratch storage.

    A table goes with the tasks when its copies (one per block task) stay within
    :data:`INLINE_TABLE_BYTES`: that spares every task a storage read, and the client the writes.
    """
    inline = []
    for name, data in tables.items():
        data = np.ascontiguousarray(data).reshape(-1)
        if data.nbytes * len(job.grid) <= INLINE_TABLE_BYTES:
            inline.append((name, data))
        else:
            write_table(job.state, name, data)
    kept = tuple((name, data) for name, data in job.tables if name not in tables)
    return dataclasses.replace(job, tables=kept + tuple(inline))


def _table_of(job: _Job, name: str) -> Table | npt.NDArray[Any]:
    """A stitching table: ``table[i:j]`` reads entries (``_table_at`` picks scattered ones)."""
    for key, data in job.tables:
        if key == name:
            return data
    return _table(job.state, name, job.token)


def _table_at(job: _Job, name: str, indices: Sequence[int]) -> npt.NDArray[Any]:
    table = _table_of(job, name)
    return table[np.asarray(indices, dtype=np.int64)] if isinstance(table, np.ndarray) else table.at(indices)


class _FragmentCache:
    """``cc`` fragments a worker labelled in stage 1, kept in its memory for stage 3 of the same run.

    Bounded by :data:`FRAGMENT_CACHE_FRACTION` of the worker's memory limit; a block relabelled by
    another worker, or not kept, is labelled again (it is deterministic).  Entries of other runs are
    dropped when a run starts keeping, and :func:`_forget_fragments` empties the cache at the end.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.token = ""
        self.blocks: dict[int, npt.NDArray[Any]] = {}
        self.nbytes = 0

    def keep(self, token: str, block_id: int, local: npt.NDArray[Any]) -> None:
        budget = _cache_budget()
        with self.lock:
            if token != self.token:
                self.token, self.blocks, self.nbytes = token, {}, 0
            if self.nbytes + local.nbytes <= budget:
                self.blocks[block_id] = local
                self.nbytes += local.nbytes

    def take(self, token: str, block_id: int) -> npt.NDArray[Any] | None:
        with self.lock:
            if token != self.token:
                return None
            local = self.blocks.pop(block_id, None)
            if local is not None:
                self.nbytes -= local.nbytes
            return local

    def forget(self, token: str | None = None) -> None:
        with self.lock:
            if token is None or token == self.token:
                self.token, self.blocks, self.nbytes = "", {}, 0


_FRAGMENTS = _FragmentCache()


def _cache_budget() -> int:
    """Bytes of fragments a worker may keep between stages (none outside a Dask worker)."""
    try:
        from distributed import get_worker

        limit = get_worker().memory_manager.memory_limit
    except (ImportError, ValueError, AttributeError):
        return 0
    return int(FRAGMENT_CACHE_FRACTION * limit) if limit else 0


def _placement(client: Any) -> Callable[[int], list[str] | None] | None:
    """Ledger chunk -> its worker, round robin over the workers present, the same in every stage."""
    try:
        workers = sorted(client.nthreads())
    except Exception:  # noqa: BLE001 - a client that cannot list its workers: let Dask place the tasks
        return None
    if len(workers) < 2:
        return None
    return lambda chunk: [workers[chunk % len(workers)]]


def _forget_fragments(token: str) -> None:
    _FRAGMENTS.forget(token)


@contextlib.contextmanager
def _fragments_forgotten(client: Any, token: str) -> Iterator[None]:
    """On leaving (also on errors), the workers drop the fragments they kept for the run ``token``."""
    try:
        yield
    finally:
        try:
            client.run(_forget_fragments, token)
        except Exception:  # noqa: BLE001 - a client without run() or gone workers: nothing left to free
            log.debug("could not ask the workers to drop kept fragments", exc_info=True)


def _section_roi(roi: Roi, axis: int, row: int, rows: int = 1) -> Roi:
    """``roi`` with ``axis`` replaced by ``rows`` indices from ``row`` (sections of a face array)."""
    return Roi(tuple(row if a == axis else o for a, o in enumerate(roi.offset)),
               tuple(rows if a == axis else s for a, s in enumerate(roi.shape)))


def _read_prediction(job: _Job, roi: Roi) -> npt.NDArray[Any]:
    pred = _volume(job.pred, "r", job.token)
    data = pred.read(roi, pad="reflect")
    if job.affinities:
        from emseg.ops.affinities import boundary_from_affinities

        return boundary_from_affinities(probability(data[:3]), mode=job.mode)  # type: ignore[arg-type]
    return data[0] if pred.has_channels else data


def _cc_block(job: _Job, block: Block) -> tuple[npt.NDArray[Any], int]:
    """Connected components of a block's core alone (local ids)."""
    data = _read_prediction(job, block.write_roi)
    mask = foreground_mask(data, threshold=job.threshold, rule=job.rule)  # type: ignore[arg-type]
    return label_components(mask, connectivity=job.connectivity, mode=job.mode)  # type: ignore[arg-type]


def _fragment_block(job: _Job, block: Block) -> dict[str, int]:
    """Stage 1: label one block's core with local ids, write its face sections (and watershed fragments)."""
    mode: Any = job.mode
    if job.method == "cc":
        # cc is cheap and deterministic: stage 3 reuses it from this worker's memory when it gets
        # the same block, and recomputes it otherwise, instead of storing the fragments
        local, count = _cc_block(job, block)
        if count:  # stage 3 skips blocks without fragments
            _FRAGMENTS.keep(job.token, block.block_id, local)
        faces = local
    else:
        core = block.write_roi.relative_to(block.read_roi).to_slices()
        boundary = boundary_map(_read_prediction(job, block.read_roi), rule=job.rule)  # type: ignore[arg-type]
        fragments, _ = watershed_fragments(boundary, job.watershed, mode=mode, voxel_size=job.voxel_size)
        core_boundary = np.ascontiguousarray(boundary[core])
        local, count = absorb_boundary_only(np.ascontiguousarray(fragments[core]), core_boundary, job.threshold,
                                            mode=mode)
        faces = local * (core_boundary < job.threshold)
        local = local.astype(job.fragment_dtype, copy=False)
        _volume(str(scratch_path(job.state, "fragments")), "r+", job.token).write(block.write_roi, local)
    for axis in job.face_axes:
        array = _volume(str(scratch_path(job.state, f"faces_{axis}")), "r+", job.token)
        sections = np.take(faces, [0, -1], axis=axis).astype(job.fragment_dtype, copy=False)
        array.write(_section_roi(block.write_roi, axis, 2 * block.block_index[axis], 2), sections)
    return {"count": int(count)}


def _faces_block(job: _Job, block: Block) -> dict[str, int]:
    """Stage 2: pairs of global ids touching across this block's upper faces (and edges, corners).

    The pairs go to storage (:mod:`emseg.engine.pairs`), not back to the client; the result is their number.
    """
    grid = job.grid
    total = grid.total_roi
    found: list[npt.NDArray[np.uint64]] = []
    for axis in job.face_axes:
        i = block.block_index[axis]
        if i + 1 >= grid.grid_shape[axis]:
            continue
        shifts = crossing_shifts(axis, job.match_connectivity(), job.mode)
        others = [a for a in range(3) if a != axis]
        reach = [any(s[k] for s in shifts) for k in range(2)]
        begin = list(block.write_roi.begin)
        end = list(block.write_roi.end)
        for k, a in enumerate(others):  # one voxel into the next block: edges and corners
            if reach[k] and end[a] < total.end[a]:
                end[a] += 1
        plane = Roi.from_bounds(begin, end)
        # the last sections of the lower blocks, the first of the upper ones
        sections = _face_sections(job, axis, _section_roi(plane, axis, 2 * i + 1, 2))
        lower, upper = np.take(sections, 0, axis=axis), np.take(sections, 1, axis=axis)
        splits = [block.write_roi.shape[a] for a in others]
        # the (up to) 2 x 2 blocks each section spans, below and above the boundary
        ids: list[int] = []
        for step in (0, 1):
            for d0 in (0, 1):
                for d1 in (0, 1):
                    index = list(block.block_index)
                    index[axis] += step
                    index[others[0]] += d0
                    index[others[1]] += d1
                    inside = all(x < g for x, g in zip(index, grid.grid_shape))
                    ids.append(grid.block_at(index).block_id if inside else 0)
        offsets = _table_at(job, "offsets", ids).astype(np.uint64).reshape(2, 2, 2)
        lower_g = to_global(lower, splits, offsets[0])
        upper_g = to_global(upper, splits, offsets[1])
        pairs, contacts = plane_pairs(lower_g, upper_g, shifts)
        if job.method == "watershed":
            pairs = select_merges(pairs, contacts, lower_g, upper_g, min_fraction=job.min_contact)
        found.append(pairs)
    result = unique_pairs(np.concatenate(found)) if found else np.zeros((0, 2), dtype=np.uint64)
    return {"pairs": write_pairs(job.state, FACES_STAGE, block.block_id, result)}


def _relabel_block(job: _Job, block: Block) -> dict[str, float]:
    """Stage 3: local ids -> consecutive final ids, written as uint64."""
    start = time.perf_counter()
    entries = _table_of(job, "blocks")[2 * block.block_id: 2 * block.block_id + 4]
    offset, first, stop, last = (int(v) for v in entries)
    labels = _volume(job.labels, "r+", job.token)
    if stop == offset:  # no fragment: background only.  Nothing to read or label; zarr stores no all-zero chunk
        t1 = time.perf_counter()
        labels.write(block.write_roi, np.zeros(block.write_roi.shape, dtype=np.uint64))
        return {"segments_max": 0, "seconds": round(time.perf_counter() - start, 4),
                "write_seconds": round(time.perf_counter() - t1, 4), "reused": 0}
    kept = _FRAGMENTS.take(job.token, block.block_id) if job.method == "cc" else None
    if kept is not None:
        local = kept
    elif job.method == "cc":
        local, _ = _cc_block(job, block)
    else:
        local = _volume(str(scratch_path(job.state, "fragments")), "r", job.token).read(block.write_roi)
    merged = _table_of(job, "merged")[2 * first: 2 * last].astype(np.uint64)
    table = block_relabel_table(offset, stop - offset, first, merged[0::2], merged[1::2])
    t1 = time.perf_counter()
    labels.write(block.write_roi, relabel_block(local, table))
    return {"segments_max": int(table.max()) if len(table) else 0, "seconds": round(time.perf_counter() - start, 4),
            "write_seconds": round(time.perf_counter() - t1, 4), "reused": int(kept is not None)}
