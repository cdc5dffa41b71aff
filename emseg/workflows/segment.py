"""``emseg segment``: predict and label in one run on one cluster.

Output layout (an OME-Zarr image group)::

    OUT.zarr/0, 1, ...             the prediction, axes (c, z, y, x), a multiscale pyramid
    OUT.zarr/labels/segments/0, 1, ...  uint64 segment IDs (mode-downsampled levels), image-label metadata
    OUT.zarr/labels/fragments/...  (label.method = "agglomerate", the default) the per-block watershed
                                   fragments and their region graph; labels/segments_<t> for extra
                                   thresholds
    OUT.zarr/emseg_state/...       completion markers (a rerun resumes)
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from emseg.config import PipelineConfig, RunOptions
from emseg.engine.follow import Progress
from emseg.io import check_distinct, open_volume, update_status
from emseg.io.location import Location, PathOrUrl, absolute, location

log = logging.getLogger(__name__)


def default_output(volume: PathOrUrl | Location) -> Location:
    """``<volume stem>_seg.zarr`` beside the input (for a URL: under the same prefix)."""
    path = location(volume)
    name = path.name[: -len(".zarr")] if path.name.endswith(".zarr") else path.stem
    return path.parent / f"{name}_seg.zarr"


@dataclass(frozen=True)
class StageTime:
    """Wall-clock time of one stage of a run, its throughput over the volume and its share of the run.

    Attributes
    ----------
    stage : str
        ``predict``, ``fragments``, ``graph``, ``agglomerate`` (the global merge on the client),
        ``relabel``, ``label`` (any other label method), ``pyramid``, or ``other`` (cluster start,
        checks, metadata: the run's time no stage accounts for).
    seconds : float
        Wall-clock seconds of the stage.
    voxels : int
        Voxels of the volume (z * y * x) the stage covers.
    voxels_per_second, voxels_per_second_per_core : float
        ``voxels / seconds``, and that over the cores (worker threads) of the cluster.
    share : float
        ``seconds`` over the run's wall-clock time.
    """

    stage: str
    seconds: float
    voxels: int
    voxels_per_second: float
    voxels_per_second_per_core: float
    share: float


def stage_times(seconds: dict[str, float], voxels: int, cores: int, wall: float) -> tuple[StageTime, ...]:
    """:class:`StageTime` of each named stage (in the given order), plus ``other``: ``wall`` minus their sum."""
    timed = dict(seconds)
    timed["other"] = max(0.0, wall - sum(seconds.values()))
    out = []
    for stage, s in timed.items():
        rate = voxels / s if s > 0 else float("nan")
        out.append(StageTime(stage, round(s, 3), voxels, rate, rate / max(cores, 1), s / wall if wall > 0 else float("nan")))
    return tuple(out)


def format_stage_times(stages: tuple[StageTime, ...], cores: int) -> str:
    """A small table: seconds, Mvoxel/s (all cores and per core) and share of the run, per stage."""
    lines = [f"{'stage':<12} {'seconds':>8} {'Mvoxel/s':>9} {'per core':>9} {'share':>6}   ({cores} cores)"]
    for t in stages:
        rate = f"{t.voxels_per_second / 1e6:9.2f}" if t.stage != "other" else f"{'':>9}"
        per_core = f"{t.voxels_per_second_per_core / 1e6:9.2f}" if t.stage != "other" else f"{'':>9}"
        lines.append(f"{t.stage:<12} {t.seconds:8.1f} {rate} {per_core} {100 * t.share:5.1f}%")
    return "\n".join(lines)


@dataclass(frozen=True)
class SegmentReport:
    """What ``emseg segment`` did: the stage reports, and the time per stage (:class:`StageTime`)."""

    output: Location
    predict: Any
    label: Any
    findings: tuple[Any, ...] = ()
    """Degenerate properties of the result (:func:`emseg.workflows.diagnose.diagnose`), empty when none."""
    seconds: float = 0.0
    """Wall-clock seconds of the whole run (lock to metadata)."""
    cores: int = 0
    """Worker threads of the cluster the run used."""
    stages: tuple[StageTime, ...] = ()
    overlapped: bool = False
    """The fragments ran beside the prediction (:attr:`~emseg.config.RunOptions.overlap`): their
    seconds overlap, and the stages add up to more than the run."""

    def summary(self) -> str:
        lines = [self.predict.summary(), self.label.summary()]
        if self.stages:
            summed = sum(t.seconds for t in self.stages)
            beside = (f"; predict and fragments ran side by side, the stages add up to {summed:.1f} s"
                      if self.overlapped else "")
            lines.append(f"time per stage ({self.seconds:.1f} s in all{beside}):")
            lines.append(format_stage_times(self.stages, self.cores))
        lines.append(f"wrote {self.output} (prediction at 0, segments at labels/segments)")
        lines += [f"WARNING: {f.message}" for f in self.findings]
        return "\n".join(lines)


@dataclass(frozen=True)
class AgglomerationSteps:
    """The three reports of ``label.method = "agglomerate"``: fragments, graph, agglomeration."""

    fragments: Any
    graph: Any
    agglomerate: Any

    @property
    def n_segments(self) -> int:
        return int(self.agglomerate.n_segments[self.agglomerate.threshold])

    def seconds(self) -> dict[str, float]:
        """Wall-clock seconds of the fragments, graph, agglomerate (global merge) and relabel stages."""
        merge = float(self.agglomerate.seconds_global)
        return {"fragments": float(self.fragments.seconds), "graph": float(self.graph.seconds),
                "agglomerate": merge, "relabel": max(0.0, float(self.agglomerate.seconds) - merge)}

    def summary(self) -> str:
        return "\n".join([self.fragments.summary(), self.graph.summary(), self.agglomerate.summary()])


def segment(
    volume: PathOrUrl,
    output: PathOrUrl | None,
    config: PipelineConfig,
    *,
    run: RunOptions | None = None,
    dry_run: bool = False,
    zarr_format: int | None = None,
    voxel_size: Sequence[float] | None = None,
    **fields: Any,
) -> SegmentReport | Any:
    """Predict membranes over ``volume`` and label them into segments, writing one OME-Zarr output.

    ``run`` (:class:`~emseg.config.RunOptions`, or its fields as keywords: ``overwrite=True``) says
    where the blocks run and what happens to an existing output; every stage runs on its one
    cluster.  Returns the prediction plan instead when ``dry_run``.  ``zarr_format`` (2 or 3) of
    the output: default the input's; the label images inside it follow.  ``voxel_size`` (nm,
    ``z, y, x``) replaces the input's metadata (``--voxel-size``).
    """
    from emseg.cluster import connect
    from emseg.export.pyramid import build_pyramids
    from emseg.workflows.agglomerate import choose_mode, segment_prediction, with_model_settings
    from emseg.workflows.label import label

    run = RunOptions.build(run, **fields)  # an unknown keyword: ConfigError naming it
    out = absolute(output if output is not None else default_output(volume))  # local: a link's target
    check_distinct(volume, out)
    source = open_volume(volume, voxel_size=voxel_size)
    if config.voxel_size is not None and tuple(config.voxel_size) != tuple(source.voxel_size):
        log.warning("%s: voxel size %s nm differs from the %s recipe's %s nm", volume, source.voxel_size,
                    config.name, config.voxel_size)
    p, lab, agg = config.predict, config.label, config.agglomerate
    # plain labels (watershed, cc) follow the voxel size; the agglomeration links per-section
    # fragments across sections unless per-section labels (mode 2d) are asked for
    mode = choose_mode(source.voxel_size) if lab.mode == "auto" else lab.mode
    if dry_run:
        from emseg.workflows.predict import plan_prediction

        return plan_prediction(volume, p, voxel_size=voxel_size)  # no model: predict picks the bundled model from the voxel size
    if p.model is not None:  # a checkpoint named by the user is refused before a cluster starts
        from emseg.models import load_checkpoint
        from emseg.workflows.predict.plan import model_path

        load_checkpoint(model_path(p.model))
    from emseg.engine.lock import run_lock

    start = time.perf_counter()
    # the prediction's module imports torch (seconds): on a thread of its own while the lock is taken
    # and the cluster starts, which leave this process waiting on the workers
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emseg-import")
    importing = pool.submit(importlib.import_module, "emseg.workflows.predict")
    pool.shutdown(wait=False)
    seconds: dict[str, float] = {}
    # the fragments follow the prediction block by block (mutex fragments read it whole)
    overlap = run.overlap and lab.method == "agglomerate" and agg.fragments != "mutex"
    with run_lock(out, "segment"):
        with connect(**run.where) as connection:
            cores = _cores(connection)
            on = run.model_copy(update={"client": connection})  # every stage on this one cluster
            predicting = functools.partial(importing.result().predict, volume, out, p, run=on, zarr_format=zarr_format,
                                           voxel_size=voxel_size)
            labelled: Any
            if lab.method == "agglomerate":
                follow = Progress("predict") if overlap else None
                with _beside(predicting, follow) as prediction:
                    if follow is not None:
                        follow.wait_started()  # the prediction's image exists, with its model recorded
                    agg = with_model_settings(agg, out, agg.model_fields_set)  # unless a flag or the recipe set them
                    config = config.model_copy(update={"agglomerate": agg})
                    labelled = AgglomerationSteps(*segment_prediction(out, agg, mode=lab.mode,
                                                                      block_size=lab.block_size, run=on,
                                                                      follows=follow))
                predicted, seconds["predict"] = prediction.report, prediction.seconds
                seconds.update(labelled.seconds())
            else:
                t0 = time.perf_counter()
                predicted = predicting()
                seconds["predict"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                labelled = label(out, out, lab.for_label(mode), run=on)
                seconds["label"] = time.perf_counter() - t0
            # on the run's workers, resumable like the other stages
            t0 = time.perf_counter()
            build_pyramids(out, progress=run.progress, client=connection)
            seconds["pyramid"] = time.perf_counter() - t0
        update_status(out, pipeline=config.model_dump(mode="json"))
    findings: tuple[Any, ...] = ()
    if isinstance(labelled, AgglomerationSteps):
        from emseg.workflows.agglomerate import graph_mode, input_kind_of, links_sections
        from emseg.workflows.diagnose import diagnose

        agg_report = labelled.agglomerate
        kind = input_kind_of(out)
        findings = diagnose(out, agg_report.labels_path, n_fragments=agg_report.n_fragments,
                            n_segments=labelled.n_segments, threshold=agg_report.threshold,
                            boundary_kind=kind == "boundary",
                            linked_sections=links_sections(kind, graph_mode(lab.mode), source.voxel_size))
    wall = time.perf_counter() - start
    voxels = int(np.prod(source.shape))
    return SegmentReport(out, predicted, labelled, findings, wall, cores, stage_times(seconds, voxels, cores, wall),
                         overlap)


@dataclass
class _Prediction:
    report: Any = None
    seconds: float = 0.0


@contextlib.contextmanager
def _beside(predicting: Callable[..., Any], follow: Progress | None) -> Iterator[_Prediction]:
    """Run ``predicting()`` (:func:`emseg.workflows.predict.predict`) in a thread beside the body,
    posting its blocks to ``follow``; or, without ``follow``, before the body.

    The prediction's own error wins over the body's (a body waiting for blocks that never came
    fails because of it); either way the prediction has ended when this returns.
    """
    done = _Prediction()

    def run() -> None:
        t0 = time.perf_counter()
        try:
            done.report = predicting(posts=follow)
        except BaseException as e:
            if follow is not None:
                follow.end(e)
            raise
        finally:
            done.seconds = time.perf_counter() - t0
        if follow is not None:
            follow.end()

    if follow is None:
        run()
        yield done
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emseg-predict")
    future = pool.submit(run)
    try:
        yield done
    except BaseException:
        error = future.exception() if future.done() or not _interrupted() else None
        pool.shutdown(wait=False)
        if error is not None:
            raise error from None
        raise
    future.result()
    pool.shutdown()


def _interrupted() -> bool:
    """Whether the exception being handled is Ctrl-C or an exit (nothing to wait for then)."""
    return isinstance(sys.exc_info()[1], (KeyboardInterrupt, SystemExit))


def _cores(connection: Any) -> int:
    """Worker threads of the cluster (0 when the client cannot say)."""
    try:
        return int(sum(connection.client.nthreads().values()))
    except Exception:  # noqa: BLE001 - a client without nthreads(): the report says 0 cores
        return 0
