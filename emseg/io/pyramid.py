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

import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt
import zarr

from emseg.errors import ConfigError, NotAVolumeError
from emseg.geometry import Coordinate, Roi, plan_blocks
from emseg.io.ome import ome_attrs, parse_multiscale
from emseg.io.volume import Volume, open_volume

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

    image_path: Path
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


def is_label_image(image_path: str | os.PathLike[str]) -> bool:
    """Whether an OME-Zarr image is a label image (``image-label`` metadata or under ``labels/``)."""
    path = Path(image_path)
    try:
        group = zarr.open_group(str(path), mode="r")
    except (zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError, FileNotFoundError, ValueError):
        return False
    return "image-label" in ome_attrs(group.attrs) or path.parent.name == "labels"


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


def _block_shape(unit: Coordinate, shape: Coordinate) -> Coordinate:
    """A multiple of the write unit holding about BLOCK_VOXELS voxels (grown x, then y, then z)."""
    block = list(unit)
    for axis in (2, 1, 0):
        while block[axis] < shape[axis] and math.prod(block) * 2 <= BLOCK_VOXELS:
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


def _downsample_level(
    source: Volume,
    target: Volume,
    factor: Coordinate,
    method: Method,
    progress: bool,
    label: str,
) -> None:
    grid = plan_blocks(target.roi, _block_shape(target.write_unit, target.shape), chunk_shape=target.write_unit)
    func: Callable[[npt.NDArray[Any], Sequence[int]], npt.NDArray[Any]]
    func = downsample_mode if method == "mode" else downsample_mean

    def one(write_roi: Roi) -> None:
        src_roi = Roi(
            tuple(o * f for o, f in zip(write_roi.offset, factor)),
            tuple(s * f for s, f in zip(write_roi.shape, factor)),
        ).intersect(source.roi)
        data = source.read(src_roi)
        if source.has_channels:
            out = np.stack([func(c, factor) for c in data]) if method == "mode" else func(data, factor)
        else:
            out = func(data, factor)
        target.write(write_roi, out)

    rois = [block.write_roi for block in grid]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        results = pool.map(one, rois)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(rois), desc=label, unit="block")
        for _ in results:
            pass


def _multiscale_dict(attrs: dict[str, Any]) -> dict[str, Any]:
    """The mutable ``multiscales[0]`` entry inside a copy of the group attributes."""
    ome = attrs["ome"] if isinstance(attrs.get("ome"), dict) else attrs
    ms: dict[str, Any] = ome["multiscales"][0]
    return ms


def build_pyramid(
    image_path: str | os.PathLike[str],
    *,
    levels: int | None = None,
    factors: Sequence[int] | None = None,
    method: Method | None = None,
    progress: bool = True,
    allow_incomplete: bool = False,
) -> Pyramid:
    """Write levels ``1..N`` of an OME-Zarr image from its level 0, block by block.

    Existing levels other than 0 are replaced.  Arrays ``"1"``..``"N"`` go next to ``"0"`` with the
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
    path = Path(image_path)
    base = open_volume(path, level=0, allow_incomplete=allow_incomplete)
    if base.image_path is None:
        raise NotAVolumeError(f"{path}: a pyramid needs an OME-Zarr image group (with multiscales), not a bare array")
    path = base.image_path
    if method is None:
        method = "mode" if is_label_image(path) and np.issubdtype(base.dtype, np.integer) else "mean"
    if method not in ("mean", "mode"):
        raise ConfigError(f"method must be 'mean' or 'mode', got {method!r}")
    if method == "mode" and not (np.issubdtype(base.dtype, np.integer) or base.dtype == np.bool_):
        raise ConfigError(f"{path}: mode downsampling needs integer labels, got dtype {base.dtype}; use method='mean'")
    plan = _plan_levels(base.shape, base.voxel_size, levels, factors)

    group = zarr.open_group(str(path), mode="a")
    attrs = dict(group.attrs)
    multiscale = parse_multiscale(attrs, str(path))
    assert multiscale is not None  # open_volume found it
    level0_path = multiscale.paths[0]
    for stale in multiscale.paths[1:]:
        if stale in group:
            del group[stale]

    spatial = [i for i, t in enumerate(multiscale.axis_types) if t == "space"]
    scale0 = multiscale.scales[0]
    translation0 = multiscale.translations[0]
    result = [PyramidLevel(level0_path, base.shape, base.voxel_size, base.offset_nm, (1, 1, 1))]
    datasets = [_dataset(level0_path, scale0, translation0)]
    source = base
    cumulative: Coordinate = (1, 1, 1)
    for index, (factor, shape, voxel_size) in enumerate(plan, start=1):
        name = str(index) if str(index) != level0_path else f"s{index}"
        array = _create_level(group, name, source, shape)
        cumulative = tuple(c * f for c, f in zip(cumulative, factor))
        scale = list(scale0)
        translation = list(translation0)
        for axis, cum in zip(spatial, cumulative):
            scale[axis] = scale0[axis] * cum
            translation[axis] = translation0[axis] + (cum - 1) / 2 * scale0[axis]
        target = Volume(path / name, array, source.axes, tuple(scale[i] for i in spatial),
                        tuple(translation[i] for i in spatial), path, ())
        _downsample_level(source, target, factor, method, progress, f"{path.name} level {index}")
        log.info("%s: level %s %s at %s nm", path, name, shape, target.voxel_size)
        result.append(PyramidLevel(name, shape, target.voxel_size, target.offset_nm, cumulative))
        datasets.append(_dataset(name, scale, translation))
        source = target

    attrs = dict(group.attrs)  # re-read: nothing else may have changed, but keep what is there
    ms = _multiscale_dict(attrs)
    ms["datasets"] = datasets
    ms["type"] = method
    ms["metadata"] = {
        "description": f"{method} downsampling, blockwise",
        "method": f"emseg.io.pyramid.downsample_{method}",
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


def label_image_paths(image_path: str | os.PathLike[str]) -> list[Path]:
    """The label images listed in an OME-Zarr image's ``labels`` group (``[]`` when it has none)."""
    labels = Path(image_path) / "labels"
    if not labels.is_dir():
        return []
    try:
        group = zarr.open_group(str(labels), mode="r")
    except (zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError, ValueError):
        return []
    names = ome_attrs(group.attrs).get("labels") or []
    return [labels / str(n) for n in names if (labels / str(n)).is_dir()]


def build_pyramids(
    image_path: str | os.PathLike[str],
    *,
    levels: int | None = None,
    progress: bool = True,
    allow_incomplete: bool = False,
) -> list[Pyramid]:
    """:func:`build_pyramid` for an image (mean) and each of its label images (mode).

    The label images get the same number of levels as the image, so the two stay aligned.
    """
    image = build_pyramid(image_path, levels=levels, progress=progress, allow_incomplete=allow_incomplete)
    out = [image]
    for label_path in label_image_paths(image.image_path):
        # Same voxel size and level count, so choose_factors picks the same factors per level.
        out.append(build_pyramid(label_path, levels=len(image.levels) - 1, progress=progress))
    return out
