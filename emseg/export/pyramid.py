"""Multiscale pyramids: write OME-Zarr levels ``1..N`` next to level ``0``, block by block.

Images and predictions are mean-downsampled; label images (those under ``labels/`` or carrying
``image-label`` metadata) are mode-downsampled, so a coarse level holds only IDs of level 0.

Coordinate convention (the NGFF one): ``scale`` is the voxel size and ``translation`` the physical
position of the *centre* of voxel 0.  A level-``k`` voxel summarises ``f`` level-0 voxels per axis
(``f`` the cumulative factor), so its centre sits at the mean of theirs::

    scale_k       = voxel_size_0 * f
    translation_k = translation_0 + (f - 1) / 2 * voxel_size_0

Equivalently, the corner of voxel 0 is the same physical point at every level (the neuroglancer
precomputed convention), so the two formats agree.

Edges: a level's shape is ``ceil(shape / factor)``; a last, partial group of voxels is averaged (or
voted) over the voxels that exist.
"""

from __future__ import annotations

import functools
import logging
import math
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt
import zarr

from emseg.engine.ledger import STATE_GROUP, Ledger, WriteSpec
from emseg.engine.runstate import StageOutputs
from emseg.errors import ConfigError, NotAVolumeError
from emseg.geometry import Block, Coordinate, Roi, plan_blocks
from emseg.io.location import Location, PathOrUrl, location, open_zarr_group
from emseg.io.ome import parse_multiscale
from emseg.io.volume import Volume, is_label_image, label_image_paths, open_volume

log = logging.getLogger(__name__)

__all__ = [
    "PyramidLevel",
    "Pyramid",
    "build_pyramid",
    "build_pyramids",
    "choose_factors",
    "downsample_mean",
    "downsample_mode",
    "is_label_image",
    "label_image_paths",
]

Method = Literal["mean", "mode"]

# Stop adding levels once the in-plane extent of a level fits in this many voxels.
DEFAULT_MIN_EXTENT = 256
MAX_LEVELS = 16
# Target voxels per block of the coarse level (each block reads factor^3 times as many).
BLOCK_VOXELS = 1 << 18
# Source voxels one block of a pass reads at most (passes chain levels while a write unit fits).
PASS_READ_VOXELS = 1 << 24
# Output voxels per vectorised mode batch (temporaries: 64 bytes per output voxel).
MODE_BATCH = 1 << 18


class PyramidLevel(NamedTuple):
    """One level of a pyramid, spatial axes ``(z, y, x)``.

    ``shape`` in voxels; ``voxel_size`` and ``translation`` (centre of voxel 0) in nanometres;
    ``factor``: the cumulative downsampling factor relative to level 0.
    """

    path: str
    shape: Coordinate
    voxel_size: tuple[float, ...]
    translation: tuple[float, ...]
    factor: Coordinate


class Pyramid(NamedTuple):
    """What :func:`build_pyramid` wrote: every level including 0, and the method used."""

    image_path: Location
    method: Method
    levels: tuple[PyramidLevel, ...]


# ---------------------------------------------------------------------------------------------
# compute: numpy in, numpy out


def _pad_to_multiple(data: npt.NDArray[Any], factor: Sequence[int]) -> npt.NDArray[Any]:
    """Repeat the last voxel on each axis up to a multiple of ``factor``.

    For a factor of 2 this weights the lone voxel of a partial group exactly like a full group, so
    the mean and the mode of a padded group equal those of the voxels that exist.
    """
    lead = data.ndim - len(factor)
    pad = [(0, 0)] * lead + [(0, (-s) % f) for s, f in zip(data.shape[lead:], factor)]
    if not any(p for _, p in pad):
        return data
    return np.pad(data, pad, mode="edge")


def _group_voxels(data: npt.NDArray[Any], factor: Sequence[int]) -> npt.NDArray[Any]:
    """``(..., Z, Y, X)`` -> ``(..., Z/fz, Y/fy, X/fx, fz*fy*fx)``: each output voxel's inputs last."""
    lead = data.ndim - len(factor)
    data = _pad_to_multiple(data, factor)
    split: list[int] = list(data.shape[:lead])
    for s, f in zip(data.shape[lead:], factor):
        split += [s // f, f]
    grouped = data.reshape(split)
    n = len(factor)
    coarse_axes = [lead + 2 * i for i in range(n)]
    fine_axes = [lead + 2 * i + 1 for i in range(n)]
    grouped = grouped.transpose(list(range(lead)) + coarse_axes + fine_axes)
    return grouped.reshape(grouped.shape[: lead + n] + (math.prod(factor),))


def _check_factor(factor: Sequence[int], ndim: int) -> Coordinate:
    fac = tuple(int(f) for f in factor)
    if len(fac) != ndim or any(f not in (1, 2) for f in fac):
        raise ConfigError(f"downsampling factors must be 1 or 2 on each of the {ndim} axes (z, y, x), got {tuple(factor)}")
    return fac


def downsample_mean(data: npt.NDArray[Any], factor: Sequence[int]) -> npt.NDArray[Any]:
    """Mean of each ``factor`` group of voxels over the last 3 axes (leading axes, e.g. channels, kept).

    Parameters
    ----------
    data : ndarray, shape ``([c,] z, y, x)``
        Any numeric dtype.
    factor : Coordinate
        ``(fz, fy, fx)``, each 1 or 2.

    Returns
    -------
    ndarray, shape ``([c,] ceil(z/fz), ceil(y/fy), ceil(x/fx))``, same dtype
        Integers are rounded half to even and stay within the dtype's range.
    """
    fac = _check_factor(factor, 3)
    grouped = _group_voxels(np.asarray(data), fac)
    if data.dtype == np.bool_:
        return np.asarray(grouped.mean(axis=-1, dtype=np.float32) >= 0.5)
    if np.issubdtype(data.dtype, np.floating):
        return np.asarray(grouped.mean(axis=-1, dtype=np.float64).astype(data.dtype))
    return np.asarray(np.rint(grouped.mean(axis=-1, dtype=np.float64)).astype(data.dtype))


def downsample_mode(labels: npt.NDArray[Any], factor: Sequence[int]) -> npt.NDArray[Any]:
    """Most frequent label of each ``factor`` group of voxels (2x2x2, 1x2x2 ...).

    Ties go to the smallest non-zero label; background ``0`` wins only when it is strictly the most
    frequent.  (So a thin process keeps its ID where it shares a group with background.)  Every output
    ID occurs in the input group it came from.

    Parameters
    ----------
    labels : ndarray, shape ``(z, y, x)``, integer dtype
    factor : Coordinate
        ``(fz, fy, fx)``, each 1 or 2.

    Returns
    -------
    ndarray, shape ``(ceil(z/fz), ceil(y/fy), ceil(x/fx))``, same dtype
    """
    fac = _check_factor(factor, labels.ndim)
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise ConfigError(f"mode downsampling needs integer labels, got dtype {labels.dtype}; use method='mean'")
    grouped = _group_voxels(np.asarray(labels), fac)
    k = grouped.shape[-1]
    if k == 1:
        return np.ascontiguousarray(grouped[..., 0])
    flat = grouped.reshape(-1, k)
    out = np.empty(flat.shape[0], dtype=flat.dtype)
    for start in range(0, flat.shape[0], MODE_BATCH):  # bounds the k*k temporaries
        out[start : start + MODE_BATCH] = _mode_rows(flat[start : start + MODE_BATCH])
    return out.reshape(grouped.shape[:-1])


def _mode_rows(rows: npt.NDArray[Any]) -> npt.NDArray[Any]:
    # counts[i, j] = how often rows[i, j] occurs in row i: k*k compares per output voxel, k <= 8.
    counts = (rows[:, :, None] == rows[:, None, :]).sum(axis=2, dtype=np.uint8)
    winners = (counts == counts.max(axis=1, keepdims=True)) & (rows != 0)
    # Smallest among the tied non-zero labels; rows with none (all-background winners) get 0.
    fill = True if rows.dtype == np.bool_ else np.iinfo(rows.dtype).max
    smallest = np.where(winners, rows, fill).min(axis=1)
    return np.where(winners.any(axis=1), smallest, np.zeros((), dtype=rows.dtype))


def choose_factors(voxel_size: Sequence[float]) -> Coordinate:
    """Downsampling factor for the next level: halve z only when its voxel size is within 2x of y, x.

    ``(40, 4, 4)`` nm gives ``(1, 2, 2)``; ``(8, 8, 8)`` and ``(12, 8, 8)`` give ``(2, 2, 2)``.  Applied
    per level, anisotropic data becomes isotropic after a few in-plane levels and then shrinks on
    every axis.
    """
    z, y, x = (float(v) for v in voxel_size)
    return (2 if z <= 2.0 * min(y, x) else 1, 2, 2)


# ---------------------------------------------------------------------------------------------
# I/O


def _plan_levels(
    shape: Coordinate,
    voxel_size: tuple[float, ...],
    levels: int | None,
    factors: Sequence[int] | None,
) -> list[tuple[Coordinate, Coordinate, tuple[float, ...]]]:
    """[(factor from the previous level, shape, voxel size)] for levels 1..N."""
    if levels is not None and not 0 <= levels <= MAX_LEVELS:
        raise ConfigError(f"levels must be between 0 and {MAX_LEVELS}, got {levels}")
    fixed = None if factors is None else _check_factor(factors, 3)
    out: list[tuple[Coordinate, Coordinate, tuple[float, ...]]] = []
    cur_shape, cur_vs = shape, voxel_size
    while len(out) < (levels if levels is not None else MAX_LEVELS):
        if levels is None and max(cur_shape[1:]) <= DEFAULT_MIN_EXTENT:
            break
        factor = fixed or choose_factors(cur_vs)
        if all(s == 1 for s, f in zip(cur_shape, factor) if f > 1):
            if levels is None:
                break
            raise ConfigError(
                f"cannot make {levels} levels from shape {shape}: level {len(out)} is already "
                f"{cur_shape}; ask for at most {len(out)} levels"
            )
        cur_shape = tuple(-(-s // f) for s, f in zip(cur_shape, factor))
        cur_vs = tuple(v * f for v, f in zip(cur_vs, factor))
        out.append((factor, cur_shape, cur_vs))
    return out


def _block_shape(unit: Coordinate, shape: Coordinate, budget: int = BLOCK_VOXELS) -> Coordinate:
    """A multiple of the write unit holding about ``budget`` voxels (grown x, then y, then z)."""
    block = list(unit)
    for axis in (2, 1, 0):
        while block[axis] < shape[axis] and math.prod(block) * 2 <= budget:
            block[axis] *= 2
    return tuple(block)


def _create_level(group: zarr.Group, name: str, source: Volume, shape: Coordinate) -> zarr.Array[Any]:
    src = source.array
    lead = (source.channels,) if source.has_channels else ()
    kwargs: dict[str, Any] = {
        "shape": lead + shape,
        "dtype": src.dtype,
        "chunks": tuple(int(c) for c in src.chunks),
        "fill_value": 0,
        "compressors": src.compressors,
    }
    if src.shards is not None:
        kwargs["shards"] = tuple(int(s) for s in src.shards)
    if group.metadata.zarr_format == 3:
        kwargs["dimension_names"] = source.axes
    if name in group:
        del group[name]
    return group.create_array(name, **kwargs)


def _passes(unit: Coordinate, factors: Sequence[Coordinate]) -> list[tuple[int, int]]:
    """Levels ``[(first, last)]`` (1-based) computed together from one read of level ``first - 1``.

    A pass grows while one write unit of its coarsest level reads at most ``PASS_READ_VOXELS``.
    """
    passes: list[tuple[int, int]] = []
    level = 1
    while level <= len(factors):
        last = level
        cum = tuple(factors[level - 1])
        while last < len(factors):
            nxt = tuple(c * f for c, f in zip(cum, factors[last]))
            if math.prod(u * c for u, c in zip(unit, nxt)) > PASS_READ_VOXELS:
                break
            cum, last = nxt, last + 1
        passes.append((level, last))
        level = last + 1
    return passes


@dataclass(frozen=True)
class _PassJob:
    """What a worker needs for one block of one pass (sent by value)."""

    image: str
    names: tuple[str, ...]
    """Level arrays: the pass's source level first, then each level it writes."""
    factors: tuple[Coordinate, ...]
    """Factor of each written level relative to the one before it."""
    shapes: tuple[Coordinate, ...]
    """Spatial shape of every level in ``names``."""
    method: str
    token: str


@functools.lru_cache(maxsize=32)
def _level(path: str, mode: Literal["r", "r+"], token: str) -> Volume:
    """A level array a worker opened for the pass ``token``."""
    return open_volume(path, mode=mode, allow_incomplete=True)


def _pyramid_block(job: _PassJob, block: Block) -> dict[str, int]:
    """One block of a pass: read the source region once, write every level of the pass."""
    func: Callable[[npt.NDArray[Any], Sequence[int]], npt.NDArray[Any]]
    func = downsample_mode if job.method == "mode" else downsample_mean
    regions = [block.write_roi]  # coarsest first
    for factor, shape in zip(reversed(job.factors), reversed(job.shapes[:-1])):
        finer = regions[-1]
        regions.append(Roi(tuple(o * f for o, f in zip(finer.offset, factor)),
                           tuple(s * f for s, f in zip(finer.shape, factor))).intersect(Roi.from_shape(shape)))
    regions.reverse()  # regions[k]: the block's region in level names[k]
    source = _level(str(Path(job.image) / job.names[0]), "r", job.token)
    data = source.read(regions[0])
    for k, factor in enumerate(job.factors, start=1):
        if source.has_channels and job.method == "mode":
            data = np.stack([func(c, factor) for c in data])
        else:
            data = func(data, factor)
        _level(str(Path(job.image) / job.names[k]), "r+", job.token).write(regions[k], data)
    return {"voxels": int(regions[-1].size)}


def _level_matches(group: zarr.Group, name: str, source: Volume, shape: Coordinate) -> bool:
    """Whether ``group[name]`` is a level array this pyramid would create (kept when resuming)."""
    if name not in group:
        return False
    array = group[name]
    lead = (source.channels,) if source.has_channels else ()
    return (isinstance(array, zarr.Array) and tuple(array.shape) == lead + tuple(shape)
            and array.dtype == source.array.dtype and tuple(array.chunks) == tuple(source.array.chunks))


def _levels_match(group: zarr.Group, levels: Sequence[tuple[str, Coordinate]], source: Volume) -> bool:
    return all(_level_matches(group, name, source, shape) for name, shape in levels)


def _create_levels(group: zarr.Group, levels: Sequence[tuple[str, Coordinate]], base: Volume) -> None:
    for name, shape in levels:
        _create_level(group, name, base, shape)


def _drop_stale_stages(path: Location, keep: set[str]) -> None:
    """Forget the completion records of pyramid passes that the current plan does not have."""
    state = path / STATE_GROUP
    if not state.is_dir():
        return
    for entry in state.iterdir():
        if entry.name.startswith("pyramid-") and entry.name not in keep:
            Ledger(path, entry.name).clear()


def _multiscale_dict(attrs: dict[str, Any]) -> dict[str, Any]:
    """The mutable ``multiscales[0]`` entry inside a copy of the group attributes."""
    ome = attrs["ome"] if isinstance(attrs.get("ome"), dict) else attrs
    ms: dict[str, Any] = ome["multiscales"][0]
    return ms


def build_pyramid(
    image_path: PathOrUrl,
    *,
    levels: int | None = None,
    factors: Sequence[int] | None = None,
    method: Method | None = None,
    progress: bool = True,
    allow_incomplete: bool = False,
    client: Any = None,
) -> Pyramid:
    """Write levels ``1..N`` of an OME-Zarr image from its level 0, block by block.

    Levels are written in passes (:func:`_passes`): each block of a pass reads its region of the
    pass's source level once and writes it downsampled at every level of the pass.  Each pass is
    a stage of :func:`emseg.engine.runner.run_blockwise` (on ``client``'s workers, or on threads in this
    process without one) with its completion records in the image, so a killed build resumes;
    levels are listed in the multiscales metadata only once all are written.  Existing levels
    other than 0 are replaced unless they hold this very pyramid (resume).  Arrays ``"1"``..``"N"`` go next to ``"0"`` with the
    same chunks, shards and compressor, and the group's ``multiscales`` lists them with their scale
    and translation (see the module docstring for the convention).

    Parameters
    ----------
    image_path : path
        An OME-Zarr image (``out.zarr``) or label image (``out.zarr/labels/segments``).
    levels : int, optional
        Levels to add.  Default: until the y, x extent fits in 256 voxels.
    factors : Coordinate, optional
        ``(fz, fy, fx)`` per level, each 1 or 2.  Default: chosen per level from the voxel size with
        :func:`choose_factors` (z halved only once within 2x of the in-plane size).
    method : "mean" or "mode", optional
        Default: ``"mode"`` for label images, ``"mean"`` otherwise.
    progress : bool
        Show a progress bar on stderr.
    allow_incomplete : bool
        Build on an image still marked incomplete (a run that adds its pyramid before finishing).
    client : distributed.Client or emseg.cluster.Connection, optional
        Run the passes on this cluster (``emseg segment`` passes its own).

    Returns
    -------
    Pyramid
        All levels, 0 included, with shape ``(z, y, x)`` in voxels and voxel size in nm.

    Raises
    ------
    VolumeNotFoundError, NotAVolumeError
        ``image_path`` is not an OME-Zarr image.
    ConfigError
        Bad ``levels``, ``factors`` or ``method`` (e.g. mode on float data).
    """
    client = getattr(client, "client", client)  # a Connection or a bare Client
    path = location(image_path)
    base, path = _level0(path, allow_incomplete)
    if method is None:
        method = "mode" if is_label_image(path) and np.issubdtype(base.dtype, np.integer) else "mean"
    if method not in ("mean", "mode"):
        raise ConfigError(f"method must be 'mean' or 'mode', got {method!r}")
    if method == "mode" and not (np.issubdtype(base.dtype, np.integer) or base.dtype == np.bool_):
        raise ConfigError(f"{path}: mode downsampling needs integer labels, got dtype {base.dtype}; use method='mean'")
    plan = _plan_levels(base.shape, base.voxel_size, levels, factors)

    group = open_zarr_group(path, mode="a")
    attrs = dict(group.attrs)
    multiscale = parse_multiscale(attrs, str(path))
    assert multiscale is not None  # open_volume found it
    level0_path = multiscale.paths[0]
    names = [level0_path] + [str(i) if str(i) != level0_path else f"s{i}" for i in range(1, len(plan) + 1)]
    for stale in set(multiscale.paths[1:]) - set(names):
        if stale in group:
            del group[stale]

    spatial = [i for i, t in enumerate(multiscale.axis_types) if t == "space"]
    scale0 = multiscale.scales[0]
    translation0 = multiscale.translations[0]
    result = [PyramidLevel(level0_path, base.shape, base.voxel_size, base.offset_nm, (1, 1, 1))]
    datasets = [_dataset(level0_path, scale0, translation0)]
    shapes = [base.shape] + [shape for _, shape, _ in plan]
    cumulative: Coordinate = (1, 1, 1)
    for index, (factor, shape, _) in enumerate(plan, start=1):
        cumulative = tuple(c * f for c, f in zip(cumulative, factor))
        scale = list(scale0)
        translation = list(translation0)
        for axis, cum in zip(spatial, cumulative):
            scale[axis] = scale0[axis] * cum
            translation[axis] = translation0[axis] + (cum - 1) / 2 * scale0[axis]
        result.append(PyramidLevel(names[index], shape, tuple(scale[i] for i in spatial),
                                   tuple(translation[i] for i in spatial), cumulative))
        datasets.append(_dataset(names[index], scale, translation))

    from emseg.engine.runner import run_blockwise

    passes = _passes(base.write_unit, [f for f, _, _ in plan])
    stages = {f"pyramid-{first}-{last}" for first, last in passes}
    _drop_stale_stages(path, stages)
    source = base
    for first, last in passes:
        stage = f"pyramid-{first}-{last}"
        level_names = tuple(names[first - 1: last + 1])
        pass_shapes = tuple(shapes[first - 1: last + 1])
        pass_factors = tuple(plan[i - 1][0] for i in range(first, last + 1))
        unit = base.write_unit
        coarse = pass_shapes[-1]
        reads = math.prod(math.prod(f) for f in pass_factors)  # source voxels per coarse voxel
        block = _block_shape(unit, coarse, max(math.prod(unit), PASS_READ_VOXELS // reads))
        grid = plan_blocks(Roi.from_shape(coarse), block, chunk_shape=unit)
        params = {"levels": list(level_names), "factors": [list(f) for f in pass_factors],
                  "shapes": [list(x) for x in pass_shapes], "method": method, "dtype": str(base.dtype)}
        made = list(zip(level_names[1:], pass_shapes[1:]))
        levels_out = StageOutputs(  # the pass's levels start over with its records, and resume only while intact
            create=functools.partial(_create_levels, group, made, base),
            intact=functools.partial(_levels_match, group, made, source))
        scales = []
        for k in range(1, len(level_names)):
            rest = pass_factors[k:]
            scales.append(tuple(math.prod(f[a] for f in rest) for a in range(3)))
        job = _PassJob(str(path), level_names, pass_factors, pass_shapes, method, uuid.uuid4().hex)
        run_blockwise(client, stage=stage, grid=grid, fn=functools.partial(_pyramid_block, job), output=path,
                      params=params, overwrite=True, progress=progress, outputs=levels_out,
                      writes=[WriteSpec(str(path / name), scale) for name, scale in zip(level_names[1:], scales)])
        log.info("%s: levels %s written", path, ", ".join(level_names[1:]))

    attrs = dict(group.attrs)  # re-read: nothing else may have changed, but keep what is there
    ms = _multiscale_dict(attrs)
    ms["datasets"] = datasets
    ms["type"] = method
    ms["metadata"] = {
        "description": f"{method} downsampling, blockwise",
        "method": f"emseg.io.pyramid.downsample_{method}",  # the name recorded in existing outputs (emseg.export.pyramid)
        "kwargs": {"factors": [list(factor) for factor, _, _ in plan]},
    }
    group.attrs.put(attrs)
    return Pyramid(path, method, tuple(result))


def _dataset(path: str, scale: Sequence[float], translation: Sequence[float]) -> dict[str, Any]:
    return {
        "path": path,
        "coordinateTransformations": [
            {"type": "scale", "scale": [float(s) for s in scale]},
            {"type": "translation", "translation": [float(t) for t in translation]},
        ],
    }


def _level0(path: PathOrUrl, allow_incomplete: bool) -> tuple[Volume, Location]:
    """Level 0 of the OME-Zarr image at ``path``, and the image's path (a bare array has no pyramid)."""
    base = open_volume(path, level=0, allow_incomplete=allow_incomplete)
    if base.image_path is None:
        raise NotAVolumeError(f"{path}: a pyramid needs an OME-Zarr image group (with multiscales), not a bare array")
    return base, base.image_path


def build_pyramids(
    image_path: PathOrUrl,
    *,
    levels: int | None = None,
    progress: bool = True,
    allow_incomplete: bool = False,
    client: Any = None,
) -> list[Pyramid]:
    """:func:`build_pyramid` for an image (mean) and each of its label images (mode).

    The label images get the same number of levels as the image, so the two stay aligned.  With
    ``client`` (a Dask client or :class:`emseg.cluster.Connection`) the passes run on its workers.
    """
    client = getattr(client, "client", client)  # a Connection or a bare Client
    base, image = _level0(image_path, allow_incomplete)
    # the label images share the image's voxel size, so choose_factors picks the same factors per level
    count = len(_plan_levels(base.shape, base.voxel_size, levels, None))
    builds = [functools.partial(build_pyramid, image, levels=levels, progress=progress,
                                allow_incomplete=allow_incomplete, client=client)]
    builds += [functools.partial(build_pyramid, path, levels=count, progress=progress, client=client)
               for path in label_image_paths(image)]
    if client is None or len(builds) == 1:
        return [build() for build in builds]
    # each image's passes are a few large blocks: side by side, the images keep every worker busy
    # (each writes only its own group's metadata)
    with ThreadPoolExecutor(max_workers=len(builds), thread_name_prefix="emseg-pyramid") as pool:
        futures = [pool.submit(build) for build in builds]
        return [future.result() for future in futures]
