"""The Python API: ``emseg.predict``, ``emseg.segment``, ``emseg.label``, ``emseg.agglomerate`` on paths *or* arrays.

Each function takes what the command of the same name takes, with the same option names and
meanings (``emseg predict --block-size 16,256,256`` is ``emseg.predict(..., block_size=(16, 256,
256))``), and one more kind of input:

* a **path** (an OME-Zarr image or zarr array): the command's run, on the cluster it names
  (``cluster``, ``scheduler``, ``workers``; default a local one), written to ``output``; returns the
  command's report.
* a **numpy array** ``(z, y, x)`` or ``(c, z, y, x)``: the same blockwise run (same blocks, halos,
  stitching) on a temporary OME-Zarr copy, on Dask in this process unless ``cluster`` or
  ``scheduler`` is given; returns numpy arrays.  Give ``voxel_size`` (nm, ``z, y, x``) where it
  matters (the label method's 2-D/3-D choice, a model trained at another resolution).
* a **dask array**: ``predict`` is lazy, one task per block of the command's block plan (the model's
  halo read from the mirrored input); ``label``, ``agglomerate`` and ``segment`` need the whole volume to stitch
  segment IDs, so they compute on call and return dask arrays reading the result store
  (``output``, or a temporary store removed when Python exits).

Array inputs never touch the caller's files unless ``output`` is given.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from emseg.config import LabelOptions, PredictOptions, RunOptions
from emseg.errors import ConfigError, VolumeShapeError

log = logging.getLogger(__name__)

__all__ = ["Segmentation", "agglomerate", "label", "predict", "segment"]

PathLike = str | os.PathLike[str]
_TEMP_DIRS: list[str] = []


class Segmentation(NamedTuple):
    """What :func:`segment` returns for an array: the prediction ``(c, z, y, x)`` and the segments ``(z, y, x)``."""

    prediction: Any
    segments: Any


# ---------------------------------------------------------------------------------------------
# helpers


def _kind(data: Any) -> Literal["path", "numpy", "dask"]:
    if isinstance(data, (str, os.PathLike)):
        return "path"
    if isinstance(data, np.ndarray):
        return "numpy"
    if type(data).__module__.startswith("dask.array") and hasattr(data, "chunks"):
        return "dask"
    raise ConfigError(f"expected a path, a numpy array or a dask array, got {type(data).__name__}")


def _check_array(data: Any) -> None:
    if data.ndim not in (3, 4):
        raise VolumeShapeError(f"expected a (z, y, x) or (c, z, y, x) array, got shape {tuple(data.shape)}")
    if 0 in data.shape:
        raise VolumeShapeError(f"expected a non-empty array, got shape {tuple(data.shape)}")


def _cleanup() -> None:
    for path in _TEMP_DIRS:
        shutil.rmtree(path, ignore_errors=True)


def _temp_dir(keep: bool) -> Path:
    """A scratch folder: removed at interpreter exit when ``keep`` (its arrays are returned lazily)."""
    path = tempfile.mkdtemp(prefix="emseg-")
    if keep:
        if not _TEMP_DIRS:
            atexit.register(_cleanup)
        _TEMP_DIRS.append(path)
    return Path(path)


def _chunks(shape: Sequence[int]) -> tuple[int, int, int]:
    z, y, x = shape[-3:]
    return (min(z, 16), min(y, 256), min(x, 256))


def _write_image(path: Path, data: Any, voxel_size: Sequence[float] | None) -> Path:
    """``data`` (numpy or dask, ``(z, y, x)`` or ``(c, z, y, x)``) as a complete OME-Zarr image."""
    from emseg.io import create_volume, mark_complete

    _check_array(data)
    spatial = tuple(int(s) for s in data.shape[-3:])
    chunks = _chunks(spatial)
    volume = create_volume(path, shape=spatial, dtype=np.dtype(data.dtype), chunks=chunks,
                           voxel_size=tuple(voxel_size) if voxel_size is not None else (1.0, 1.0, 1.0),
                           channels=int(data.shape[0]) if data.ndim == 4 else None)
    if isinstance(data, np.ndarray):
        volume.array[...] = data
    else:
        import dask.array as da

        da.store(data.rechunk(volume.array.chunks), volume.array, lock=False)  # type: ignore[arg-type]
    mark_complete(path)
    return path


def _read(path: Path, lazy: bool) -> Any:
    from emseg.io import open_volume

    array = open_volume(path).array
    if lazy:
        import dask.array as da

        return da.from_array(array, chunks=array.chunks)  # type: ignore[no-untyped-call]
    return np.asarray(array[...])


def _on_array(data: Any, voxel_size: Sequence[float] | None, run: RunOptions, *,
              name: str, keep: bool, job: Callable[[Path, Path, RunOptions], Sequence[Path]]) -> list[Any]:
    """A path-based run on an array: ``data`` is written to the temporary OME-Zarr image ``work/name``,
    ``job(image, work, where)`` runs on the caller's cluster (``where``: ``run``) or on one inside this
    process, and the images it returns are read (as dask arrays for a dask input).

    ``work`` is removed afterwards, unless ``keep`` (dask results read from it): then at interpreter exit.
    """
    _check_array(data)
    lazy = _kind(data) == "dask"
    work = _temp_dir(keep=keep)
    try:
        image = _write_image(work / name, data, voxel_size)
        with _scheduler(run) as where:
            results = job(image, work, where)
        return [_read(path, lazy) for path in results]
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _scheduler(run: RunOptions) -> Iterator[RunOptions]:
    """Where an array run goes: the caller's choice, else a Dask cluster inside this process."""
    if run.cluster is not None or run.scheduler is not None or run.client is not None:
        yield run
        return
    from distributed import LocalCluster

    from emseg.cluster.tls import quiet_scheduler_http

    # Threads in this process (inproc transport: only the scheduler's health check listens, on loopback).
    with quiet_scheduler_http(), LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None,  # type: ignore[no-untyped-call]
                      scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"}) as local:
        yield run.model_copy(update={"scheduler": local.scheduler_address})


QUIET = RunOptions(progress=False)
"""The API's run options by default: as the commands', without progress bars."""


def _run_options(run: RunOptions | None, fields: dict[str, Any]) -> RunOptions:
    """``run`` (default :data:`QUIET`) with the run options among ``fields`` (removed from it)."""
    return RunOptions.take(run if run is not None else QUIET, fields)


def _need_output(output: PathLike | None, what: str) -> PathLike:
    if output is None:
        raise ConfigError(f"{what} of a path needs output=PATH (arrays in give arrays out)")
    return output


# ---------------------------------------------------------------------------------------------
# predict


def predict(
    volume: Any,
    output: PathLike | None = None,
    options: PredictOptions | None = None,
    *,
    run: RunOptions | None = None,
    voxel_size: Sequence[float] | None = None,
    zarr_format: int | None = None,
    **fields: Any,
) -> Any:
    """Membrane (boundary) probabilities of a model for every voxel, as ``emseg predict``.

    Parameters
    ----------
    volume : path, numpy array or dask array
        Raw EM, ``(z, y, x)`` or ``(c, z, y, x)``, uint8, uint16 or float.
    output : path, optional
        Output OME-Zarr image; required for a path, optional for an array.
    options, **fields
        :class:`emseg.config.PredictOptions`, or its fields as keywords, named as the command's
        options: ``model`` (checkpoint directory; default the bundled model for the voxel size),
        ``block_size``, ``tile_size``, ``halo``, ``chunks`` (voxels, ``z, y, x``), ``batch_size``,
        ``tta``, ``precision``, ``dtype``.
    run : RunOptions, optional
        ``cluster``, ``scheduler``, ``workers``, ``devices``, ``overwrite``, ``progress`` (default
        off here), ``client``: :class:`emseg.config.RunOptions`, or its fields among the keywords, as
        the command's options.
    voxel_size : (z, y, x) floats, optional
        Nanometres per voxel of an array input (a path carries its own).
    zarr_format
        As the command's option.

    Returns
    -------
    PredictReport for a path; a numpy array ``(c, z, y, x)`` of ``dtype`` for a numpy array
    (``uint8`` is ``round(255 p)``); a lazy dask array of the same for a dask array.
    """
    from emseg.workflows.predict import predict as run_predict

    run = _run_options(run, fields)
    options = PredictOptions.build(options, **fields)
    kind = _kind(volume)
    if kind == "path":
        return run_predict(volume, _need_output(output, "predict"), options, run=run, zarr_format=zarr_format)
    if kind == "dask" and output is None:
        _check_array(volume)
        return _predict_lazy(volume, voxel_size, options)

    def on_image(raw: Path, work: Path, where: RunOptions) -> list[Path]:
        out = Path(output) if output is not None else work / "prediction.zarr"
        run_predict(raw, out, options, run=where, zarr_format=zarr_format)
        return [out]

    return _on_array(volume, voxel_size, run, name="raw.zarr", keep=False, job=on_image)[0]


def _predict_lazy(volume: Any, voxel_size: Sequence[float] | None, options: PredictOptions) -> Any:
    """One dask task per block of the run's block plan: read the block's tiles (mirrored), run the model."""
    import dask.array as da
    from dask.delayed import delayed

    from emseg.io import create_volume, mark_complete
    from emseg.workflows.predict import PredictConfig, plan_prediction

    shape = tuple(int(s) for s in volume.shape[-3:])
    channels = int(volume.shape[0]) if volume.ndim == 4 else None
    work = _temp_dir(keep=False)
    try:  # the plan validates the options exactly as a run does; it reads only the metadata
        create_volume(work / "shape.zarr", shape=shape, dtype=np.dtype(volume.dtype), chunks=_chunks(shape),
                      voxel_size=tuple(voxel_size) if voxel_size is not None else (1.0, 1.0, 1.0), channels=channels)
        mark_complete(work / "shape.zarr")
        plan = plan_prediction(work / "shape.zarr", options)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    config = PredictConfig(
        input="<dask array>", output="<dask array>", checkpoint=str(plan.checkpoint.resolve()),
        checkpoint_mtime_ns=(plan.checkpoint / "model.safetensors").stat().st_mtime_ns, tiling=plan.tiling,
        options=plan.options, threads=max(1, min(2, os.cpu_count() or 1)),
    )
    data = volume if volume.ndim == 4 else volume[None]
    reads = [block.read_roi for block in plan.grid]
    lo = [max(0, -min(r.begin[a] for r in reads)) for a in range(3)]
    hi = [max(0, max(r.end[a] for r in reads) - shape[a]) for a in range(3)]
    padded = da.pad(data, [(0, 0)] + list(zip(lo, hi)), mode="reflect") if any(lo + hi) else data
    out_dtype = np.dtype(plan.dtype)
    grid = plan.grid.grid_shape
    nested: Any = np.empty(grid, dtype=object)
    for block, read in zip(plan.grid, reads):
        index = tuple(slice(b + o, e + o) for b, e, o in zip(read.begin, read.end, lo))
        task = delayed(_predict_block, pure=True)(config, padded[(slice(None), *index)], read, block.write_roi,
                                                       channels is not None)
        nested[block.block_index] = da.from_delayed(  # type: ignore[no-untyped-call]
            task, (plan.out_channels, *block.write_roi.shape), out_dtype)
    return da.block(nested.tolist())  # type: ignore[no-untyped-call]


def _predict_block(config: Any, raw: npt.NDArray[Any], read_roi: Any, write_roi: Any, has_channels: bool) -> Any:
    from emseg.workflows.predict import compute_block

    return compute_block(config, raw if has_channels else raw[0], read_roi, write_roi)


# ---------------------------------------------------------------------------------------------
# label


def label(
    prediction: Any,
    output: PathLike | None = None,
    options: LabelOptions | None = None,
    *,
    run: RunOptions | None = None,
    voxel_size: Sequence[float] | None = None,
    zarr_format: int | None = None,
    **fields: Any,
) -> Any:
    """Globally consistent uint64 segment IDs from a boundary prediction, as ``emseg label``.

    Parameters
    ----------
    prediction : path, numpy array or dask array
        ``(c, z, y, x)`` with channel 0 the boundary probability (uint8 ``255 p`` or float), or a
        ``(z, y, x)`` probability map or mask.
    output : path, optional
        Where the labels go (required for a path input: a new OME-Zarr image, or the prediction's
        own image for ``labels/segments``).
    options, **fields
        :class:`emseg.config.LabelOptions`, or its fields as keywords, named as the command's options
        (``method``, ``threshold``, ``foreground``, ``connectivity``, ``min_size``, ``seeds``,
        ``min_distance``, ``block_size`` ...; ``mode="2d"`` is ``--2d``).
    run, voxel_size, zarr_format
        See :func:`predict`.

    Returns
    -------
    LabelReport for a path; for an array, ``(z, y, x)`` uint64 IDs ``1..n`` (0 = background) as
    numpy, or as a dask array over the result store for a dask input.
    """
    from emseg.workflows.label import label as run_label

    run = _run_options(run, fields)
    options = LabelOptions.build(options, **fields)
    kind = _kind(prediction)
    if kind == "path":
        return run_label(prediction, _need_output(output, "label"), options, run=run, zarr_format=zarr_format)

    def on_image(pred: Path, work: Path, where: RunOptions) -> list[Path]:
        target = Path(output) if output is not None else pred
        run_label(pred, target, options, run=where, zarr_format=zarr_format)
        return [target if output is not None else pred / "labels" / "segments"]

    return _on_array(prediction, voxel_size, run, name="prediction.zarr",
                     keep=kind == "dask" and output is None, job=on_image)[0]


# ---------------------------------------------------------------------------------------------
# segment


def segment(
    volume: Any,
    output: PathLike | None = None,
    *,
    pipeline: PathLike | None = None,
    run: RunOptions | None = None,
    voxel_size: Sequence[float] | None = None,
    zarr_format: int | None = None,
    **overrides: Any,
) -> Any:
    """Predict and label in one run, as ``emseg segment`` (a ``pipeline`` recipe plus overrides).

    Parameters
    ----------
    volume : path, numpy array or dask array
        Raw EM, ``(z, y, x)`` (or ``(c, z, y, x)``).
    output : path, optional
        Output OME-Zarr (default for a path: ``<volume stem>_seg.zarr`` beside it).
    pipeline : path, optional
        A recipe (``pipelines/isbi2012.toml``); the other options override its fields, None keeps them.
    **overrides
        As the command's options (:func:`emseg.config.segment_overrides`): every
        :class:`~emseg.config.PredictOptions` field (``model``, ``block_size``, ``batch_size``, ...),
        and ``method``, ``threshold``, ``merge_threshold``, ``thresholds``, ``mode`` (``"2d"`` is
        ``--2d``), ``min_size``; None keeps the recipe's value.
    run, voxel_size, zarr_format
        See :func:`predict`.

    Returns
    -------
    SegmentReport for a path; :class:`Segmentation` ``(prediction, segments)`` for an array: numpy
    arrays for numpy input, dask arrays over the result store for dask input.
    """
    from emseg.config import load_pipeline, segment_overrides
    from emseg.workflows.segment import segment as run_segment

    run = _run_options(run, overrides)
    config = load_pipeline(pipeline, segment_overrides(**overrides))
    kind = _kind(volume)

    def segment_run(raw: PathLike, out: PathLike | None, where: RunOptions) -> Any:
        return run_segment(raw, out, config, run=where, zarr_format=zarr_format)

    if kind == "path":
        return segment_run(volume, output, run)

    def on_image(raw: Path, work: Path, where: RunOptions) -> list[Path]:
        out = Path(output) if output is not None else work / "segmented.zarr"
        segment_run(raw, out, where)
        return [out, out / "labels" / "segments"]

    return Segmentation(*_on_array(volume, voxel_size, run, name="raw.zarr",
                                   keep=kind == "dask" and output is None, job=on_image))


# ---------------------------------------------------------------------------------------------
# agglomerate


def agglomerate(
    prediction: Any,
    *,
    run: RunOptions | None = None,
    voxel_size: Sequence[float] | None = None,
    **options: Any,
) -> Any:
    """Fragments, region graph and agglomerated segments of a boundary prediction (or affinities).

    The run of ``emseg agglomerate`` (:func:`emseg.workflows.agglomerate.agglomerate_target`): per-block
    watershed fragments, their region graph with merge scores, and the segments of every edge
    scored below ``threshold`` (default: the predicting model's ``agglomeration_threshold``), under
    the output's run lock.

    Parameters
    ----------
    prediction : path, numpy array or dask array
        ``(c, z, y, x)``: channel 0 the boundary probability (uint8 ``255 p`` or float), or
        affinities (channels z, y, x first).  A path's labels go into its own image
        (``labels/fragments``, ``labels/segments``).
    run, voxel_size
        See :func:`predict`.
    **options
        The keyword options of :func:`emseg.workflows.agglomerate.agglomerate_target`, named as there
        (``threshold``, ``thresholds``, ``score``, ``fragment_threshold``, ``seeds``,
        ``min_distance``, ``min_size``, ``mode``, ``block_size``, ``context`` ...).

    Returns
    -------
    For a path, the (fragments, graph, agglomeration) reports (fragments and graph ``None`` when a
    fragments image is agglomerated again); for an array, the ``(z, y, x)``
    uint64 segments ``1..n`` as numpy, or as a dask array over the result store for a dask input.
    """
    from emseg.workflows.agglomerate import agglomerate_target

    run = _run_options(run, options)
    kind = _kind(prediction)
    if kind == "path":
        return agglomerate_target(prediction, run=run, **options)
    _check_array(prediction)
    if prediction.ndim == 3:
        prediction = prediction[None]

    def on_image(pred: Path, work: Path, where: RunOptions) -> list[Path]:
        agglomerate_target(pred, run=where, **options)
        return [pred / "labels" / "segments"]

    return _on_array(prediction, voxel_size, run, name="prediction.zarr", keep=kind == "dask",
                     job=on_image)[0]
