"""Training data: load raw + labels, derive instances/targets/weight maps, sample augmented patches.

Labels of every kind are first turned into *instances* ``(z, y, x) uint32`` with 0 = membrane or
unlabelled (see :class:`~emseg.training.config.DataSource` for the kinds).  Targets are derived from
the instances of each (augmented) patch:

* ``membrane``: 1 where the id is 0, or where a 4-connected in-plane neighbour has another non-zero
  id (touching cells: both sides of the contact are marked);
* ``mask``: 1 where the id is non-zero;
* ``affinities``: one channel per offset (default: the nearest neighbours ``(-1, 0, 0)``,
  ``(0, -1, 0)``, ``(0, 0, -1)`` in 3D, i.e. channels ``aff_z, aff_y, aff_x``): channel ``c`` at voxel
  ``p`` is 1 where ``p`` and ``p + offset_c`` hold the same non-zero id, else 0.  So
  ``aff_z[z, y, x]`` is the affinity of ``(z, y, x)`` and ``(z - 1, y, x)``.  A mask
  (:func:`affinity_mask`) leaves out of the loss the pairs whose both voxels are 0 (boundary or
  unlabelled: nothing is known about them) and the pairs whose partner lies outside the patch.
  Pairs of a cell voxel and a 0 voxel are kept, as affinity 0 (0 marks the thin boundaries of
  FIB-SEM instance labels such as gala's).

For ``membrane``/``mask`` targets with a 2D model, instances are per-section connected components
(2D); for 3D models they are 3D components (or the given ids).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from emseg.errors import InvalidDataError, UnsupportedDtypeError, VolumeNotFoundError, VolumeShapeError
from emseg.ops.metrics import instances_from_mask
from emseg.training import augment
from emseg.training.config import DataSource, TrainConfig
from emseg.training.losses import weight_map

log = logging.getLogger(__name__)

__all__ = [
    "Batch",
    "PreparedVolume",
    "affinities_from_instances",
    "affinity_mask",
    "balance_weights",
    "instances_from_labels",
    "load_source",
    "membrane_from_instances",
    "mirrored_window",
    "nearest_offsets",
    "parse_data_path",
    "sample_batch",
    "targets_from_instances",
    "widen_boundaries",
]

_SLICE = re.compile(r"^(?P<path>.*)\[(?P<z0>-?\d*):(?P<z1>-?\d*)\]$")


def parse_data_path(spec: str) -> tuple[Path, slice]:
    """``"a.tif[0:16]"`` -> (``Path("a.tif")``, ``slice(0, 16)``); no suffix selects every section."""
    m = _SLICE.match(spec)
    if m is None:
        return Path(spec), slice(None)
    return Path(m["path"]), slice(_int_or_none(m["z0"]), _int_or_none(m["z1"]))


def _int_or_none(text: str) -> int | None:
    return int(text) if text else None


def _load(spec: str) -> npt.NDArray[Any]:
    from emseg.io import load_array

    path, zslice = parse_data_path(spec)
    if not path.exists() and not any(p.suffix.lower() in (".h5", ".hdf5", ".hdf") and p.exists() for p in path.parents):
        raise VolumeNotFoundError(f"{path}: no such file or directory (training data)")
    array = load_array(path)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise VolumeShapeError(f"{spec}: expected a (z, y, x) volume, got shape {array.shape}")
    array = array[zslice]
    if array.shape[0] == 0:
        raise VolumeShapeError(f"{spec}: the section range selects no sections (volume has {len(array)})")
    return array


def instances_from_labels(
    labels: npt.NDArray[Any], kind: Literal["auto", "instances", "membrane-mask", "interior-mask"], *, per_section: bool
) -> tuple[npt.NDArray[np.uint32], str]:
    """Labels of any kind -> (instances ``uint32`` with 0 = membrane/unlabelled, resolved kind).

    Masks become connected components (4-connected per section when ``per_section``, else
    6-connected in 3D) of their interior.
    """
    if kind == "auto":
        values, counts = np.unique(labels, return_counts=True)
        if len(values) > 2:
            kind = "instances"
        elif len(values) == 2:
            # the rarer value is membrane: membranes cover well under half of an EM section
            rare = values[int(np.argmin(counts))]
            kind = "interior-mask" if rare == values[0] else "membrane-mask"
        else:
            raise InvalidDataError(
                f"cannot auto-detect the labels kind: the labels hold a single value {values.tolist()}; "
                "pass --labels-kind instances|membrane-mask|interior-mask"
            )
    if kind == "instances":
        if labels.dtype.kind == "f":
            raise UnsupportedDtypeError(f"instance labels must be integers, got {labels.dtype}")
        if per_section:
            # ids are only meaningful in-plane for 2D training: split ids disconnected in a section
            out = np.zeros(labels.shape, np.uint32)
            for z in range(labels.shape[0]):
                out[z] = _relabel_components(labels[z])
            return out, kind
        return labels.astype(np.uint32), kind
    # interior-mask: zero = membrane (ISBI 2012); membrane-mask: non-zero = membrane; the instances are
    # those emseg evaluate scores against (4-connected per section, or 6-connected in 3-D)
    return instances_from_mask(labels, kind, per_section=per_section).astype(np.uint32), kind


def _relabel_components(section: npt.NDArray[Any]) -> npt.NDArray[np.uint32]:
    from skimage.measure import label

    return np.asarray(label(section, background=0, connectivity=1), dtype=np.uint32)  # type: ignore[no-untyped-call]


def membrane_from_instances(instances: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.uint8]:
    """1 where the id is 0 or a 4-connected in-plane neighbour (last two axes) holds another non-zero id."""
    inst = instances
    m = inst == 0
    for axis in (-1, -2):
        a = np.moveaxis(inst, axis, 0)
        # only a change between two cells is a boundary; cells next to background stay cells
        d = (a[1:] != a[:-1]) & (a[1:] != 0) & (a[:-1] != 0)
        mm = np.moveaxis(m, axis, 0)
        mm[1:] |= d
        mm[:-1] |= d
    return np.asarray(m, dtype=np.uint8)


DENSE_BOUNDARY_NM = 12.0
"""Nanometres added on each side of the boundary between touching instances of dense labels: a membrane
is ~20-30 nm wide in ssTEM and FIB-SEM (on CREMI at 4 nm the bundled 2-D model's membrane probability
stays above 0.85 three pixels out from the boundary between two neuron ids)."""


def dense_boundary_width(voxel_size_nm: Sequence[float] | None) -> int:
    """In-plane pixels that :data:`DENSE_BOUNDARY_NM` spans (at least 1); 4 nm pixels without a voxel size."""
    pixel = float(voxel_size_nm[-1]) if voxel_size_nm else 4.0
    return max(1, round(DENSE_BOUNDARY_NM / pixel))


def widen_boundaries(instances: npt.NDArray[np.uint32], width: int) -> npt.NDArray[np.uint32]:
    """``instances`` with every in-plane boundary (see :func:`membrane_from_instances`) grown by ``width``
    pixels (4-connected, last two axes) and set to 0, so that the membrane target has a membrane's width."""
    if width <= 0:
        return instances
    from scipy import ndimage

    structure = np.zeros((3,) * instances.ndim, dtype=bool)
    structure[(1,) * (instances.ndim - 2)] = ndimage.generate_binary_structure(2, 1)
    boundary = ndimage.binary_dilation(membrane_from_instances(instances).astype(bool), structure, iterations=width)
    out = instances.copy()
    out[boundary] = 0
    return out


def nearest_offsets(ndim: int) -> tuple[tuple[int, ...], ...]:
    """The nearest-neighbour affinity offsets of ``ndim`` axes: ``((-1, 0, 0), (0, -1, 0), (0, 0, -1))`` in 3D."""
    return tuple(tuple(-1 if i == a else 0 for i in range(ndim)) for a in range(ndim))


def _pair_views(shape: Sequence[int], offset: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices ``(here, there)`` of the voxels ``p`` whose partner ``p + offset`` is inside ``shape``."""
    here, there = [], []
    for o, n in zip(offset, shape, strict=True):
        if o >= 0:
            here.append(slice(0, max(n - o, 0)))
            there.append(slice(o, n))
        else:
            here.append(slice(-o, n))
            there.append(slice(0, max(n + o, 0)))
    return tuple(here), tuple(there)


def _offsets_for(instances: npt.NDArray[Any], ndim: int, offsets: Sequence[Sequence[int]] | None) -> list[tuple[int, ...]]:
    """Offsets over every axis of ``instances`` (2D offsets get a leading 0 for the section axis)."""
    offs = [tuple(int(v) for v in o) for o in (offsets if offsets is not None else nearest_offsets(ndim))]
    for o in offs:
        if len(o) != ndim:
            raise ValueError(f"affinity offset {o} must have {ndim} values for a {ndim}D model")
    return [(0,) * (instances.ndim - ndim) + o for o in offs]


def affinities_from_instances(
    instances: npt.NDArray[np.integer[Any]], ndim: int, offsets: Sequence[Sequence[int]] | None = None
) -> npt.NDArray[np.float32]:
    """Affinities ``(c, *spatial)``: 1 where a voxel and its partner at ``offsets[c]`` share a non-zero id.

    Partners outside the array count as 0 (see :func:`affinity_mask`, which masks them out).
    """
    channels = []
    for o in _offsets_for(instances, ndim, offsets):
        here, there = _pair_views(instances.shape, o)
        aff = np.zeros(instances.shape, np.float32)
        a, b = instances[here], instances[there]
        aff[here] = (a == b) & (a != 0)
        channels.append(aff)
    return np.stack(channels)


def affinity_mask(
    instances: npt.NDArray[np.integer[Any]], ndim: int, offsets: Sequence[Sequence[int]] | None = None
) -> npt.NDArray[np.float32]:
    """Loss mask of :func:`affinities_from_instances`: 1 where the pair is known.

    0 where the partner lies outside the array, or where both voxels are 0 (boundary / unlabelled).
    """
    channels = []
    for o in _offsets_for(instances, ndim, offsets):
        here, there = _pair_views(instances.shape, o)
        m = np.zeros(instances.shape, np.float32)
        m[here] = (instances[here] != 0) | (instances[there] != 0)
        channels.append(m)
    return np.stack(channels)


def balance_weights(target: npt.NDArray[np.float32], mask: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Per channel, ``mask`` reweighted so that target-0 and target-1 voxels carry equal total weight.

    The mean weight over the masked voxels stays 1; a channel holding one class keeps its mask.
    """
    out = np.array(mask, dtype=np.float32, copy=True)
    for c in range(target.shape[0]):
        m = mask[c] > 0
        n = int(m.sum())
        ones = int((m & (target[c] > 0.5)).sum())
        if n == 0 or ones in (0, n):
            continue
        out[c] = np.where(target[c] > 0.5, 0.5 * n / ones, 0.5 * n / (n - ones)) * m
    return out


def targets_from_instances(
    instances: npt.NDArray[np.integer[Any]], target: str, ndim: int, offsets: Sequence[Sequence[int]] | None = None
) -> npt.NDArray[np.float32]:
    """Target channels ``(c, *spatial)`` of one patch's instances (see the module docstring)."""
    if target == "membrane":
        return np.asarray(membrane_from_instances(instances)[None], dtype=np.float32)
    if target == "mask":
        return np.asarray((instances != 0)[None], dtype=np.float32)
    return affinities_from_instances(instances, ndim, offsets)


@dataclass
class PreparedVolume:
    """One loaded source: raw ``uint8 (z, y, x)``, instances, optional per-section weight map.

    ``view_weights``: 2D models on isotropic data, which see sections of every orientation: the weight
    maps of the sections along y and along x (each in the volume's ``(z, y, x)`` layout)."""

    name: str
    raw: npt.NDArray[np.uint8]
    instances: npt.NDArray[np.uint32]
    weights: npt.NDArray[np.float32] | None
    labels_kind: str
    view_weights: tuple[npt.NDArray[np.float32], ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.raw.shape)


def load_source(source: DataSource, cfg: TrainConfig) -> PreparedVolume:
    """Load raw + labels, check them, derive instances and (for ``weighted-ce``) the weight map."""
    raw = _load(source.raw)
    labels = _load(source.labels)
    if raw.shape != labels.shape:
        raise VolumeShapeError(f"raw {source.raw} has shape {raw.shape} but labels {source.labels} have {labels.shape}; they must match")
    if raw.dtype != np.uint8:
        raise UnsupportedDtypeError(f"{source.raw}: training expects uint8 raw (scaled by 1/255), got {raw.dtype}; convert it first")
    per_section = cfg.ndim == 2 and not cfg.isotropic  # sections of every orientation need 3-D components
    instances, kind = instances_from_labels(labels, source.labels_kind, per_section=per_section)
    width = source.boundary_width
    if width is None:
        width = dense_boundary_width(cfg.voxel_size_nm) if kind == "instances" and not (instances == 0).any() else 0
    instances = widen_boundaries(instances, width)
    weights = None
    view_weights: tuple[npt.NDArray[np.float32], ...] = ()
    if cfg.loss == "weighted-ce":
        def maps(axis: int) -> npt.NDArray[np.float32]:
            sections = [weight_map(np.take(instances, i, axis=axis), w0=cfg.w0, sigma=cfg.sigma)
                        for i in range(instances.shape[axis])]
            return np.stack(sections, axis=axis)

        weights = maps(0)
        if cfg.ndim == 2 and cfg.isotropic:
            view_weights = (maps(1), maps(2))
    log.info("loaded %s: shape %s, labels %s, %d%% membrane", source.raw, raw.shape, kind, round(100 * float((instances == 0).mean())))
    return PreparedVolume(name=source.raw, raw=raw, instances=instances, weights=weights, labels_kind=kind,
                          view_weights=view_weights)


@dataclass
class Batch:
    """Model input ``(b, 1, *in)`` normalised, targets ``(b, c, *out)``, weights ``(b, 1, *out)`` or None."""

    raw: npt.NDArray[np.float32]
    target: npt.NDArray[np.float32]
    weight: npt.NDArray[np.float32] | None


def mirrored_window(array: npt.NDArray[Any], offset: Sequence[int], shape: Sequence[int]) -> npt.NDArray[Any]:
    """``array[offset : offset + shape]`` with mirroring wherever the window leaves the array."""
    index = []
    for o, s, n in zip(offset, shape, array.shape, strict=True):
        i = np.arange(o, o + s)
        if n == 1:
            i = np.zeros_like(i)
        else:
            period = 2 * (n - 1)
            i = np.abs(np.mod(i, period))
            i = np.where(i >= n, period - i, i)
        index.append(i)
    return array[np.ix_(*index)]


def sample_patch(
    volumes: Sequence[PreparedVolume],
    cfg: TrainConfig,
    input_shape: Sequence[int],
    output_shape: Sequence[int],
    rng: np.random.Generator,
    normalization: tuple[float, float],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
    """One augmented sample: raw ``(1, *in)``, target ``(c, *out)``, weight ``(1, *out)`` (weight map),
    ``(c, *out)`` (affinity mask) or None."""
    # every source is equally likely (a small volume is not drowned by a large one), then any voxel
    vol = volumes[int(rng.integers(len(volumes)))]
    ndim = cfg.ndim
    spatial_in = tuple(input_shape)
    spatial_out = tuple(output_shape)
    # 2D models sample one section: treat the patch as (1, y, x)
    full_in = (1, *spatial_in) if ndim == 2 else spatial_in
    full_out = (1, *spatial_out) if ndim == 2 else spatial_out
    volume_raw, volume_instances, volume_weights = vol.raw, vol.instances, vol.weights
    if ndim == 2 and cfg.isotropic:
        # isotropic data seen by a 2D model: a section along z, y or x (xy, xz or yz)
        axis = int(rng.integers(3))
        if axis:
            volume_raw = np.moveaxis(vol.raw, axis, 0)
            volume_instances = np.moveaxis(vol.instances, axis, 0)
            if vol.weights is not None:
                volume_weights = np.moveaxis(vol.view_weights[axis - 1], axis, 0)
    shape = volume_raw.shape

    center = tuple(int(rng.integers(s)) for s in shape)
    if rng.random() < cfg.foreground_prob:
        for _ in range(20):
            c = tuple(int(rng.integers(s)) for s in shape)
            is_membrane = volume_instances[c] == 0
            if is_membrane == (cfg.target == "membrane"):
                center = c
                break
    out_offset = [
        int(np.clip(c - o // 2, 0, max(s - o, 0))) if s >= o else c - o // 2
        for c, o, s in zip(center, full_out, shape, strict=True)
    ]
    context = [(i - o) // 2 for i, o in zip(full_in, full_out, strict=True)]
    margin = [0] * 3
    elastic = cfg.augment and cfg.elastic_sigma > 0
    # isotropic 3D: a 3D displacement field; 2D models and anisotropic 3D: one in-plane field
    elastic_3d = ndim == 3 and cfg.isotropic
    if elastic:
        m = int(np.ceil(3 * cfg.elastic_sigma))
        margin = [m if elastic_3d else 0, m, m]
    read_offset = [o - c - m for o, c, m in zip(out_offset, context, margin, strict=True)]
    read_shape = [i + 2 * m for i, m in zip(full_in, margin, strict=True)]

    raw: npt.NDArray[Any] = mirrored_window(volume_raw, read_offset, read_shape).astype(np.float32) / 255.0
    inst = mirrored_window(volume_instances, read_offset, read_shape)
    weight: npt.NDArray[Any] | None = (mirrored_window(volume_weights, read_offset, read_shape)
                                       if volume_weights is not None else None)

    if elastic:
        field_shape = read_shape if elastic_3d else read_shape[1:]
        field = augment.elastic_field(field_shape, rng, sigma=cfg.elastic_sigma, grid=cfg.elastic_grid)
        raw = augment.deform(raw, field, order=1)
        inst = augment.deform(inst, field, order=0)
        if weight is not None:
            weight = augment.deform(weight, field, order=1)
        crop = tuple(slice(m, m + i) for m, i in zip(margin, full_in, strict=True))
        raw, inst = raw[crop], inst[crop]
        weight = weight[crop] if weight is not None else None
    if cfg.augment:
        arrays: list[npt.NDArray[Any]] = [raw, inst] + ([weight] if weight is not None else [])
        if ndim == 3 and cfg.isotropic:
            arrays = augment.transpose_axes(arrays, rng)
        arrays = augment.flip_rotate(arrays, rng, ndim=ndim)
        raw, inst = arrays[0], arrays[1]
        weight = arrays[2] if weight is not None else None
        if cfg.intensity:
            raw = augment.intensity(np.asarray(raw, dtype=np.float32), rng)
        if ndim == 3 and cfg.defect_prob > 0:
            raw = augment.section_defects(np.asarray(raw, dtype=np.float32), rng, prob=cfg.defect_prob)

    out_crop = tuple(slice(c, c + o) for c, o in zip(context, full_out, strict=True))
    target = targets_from_instances(inst, cfg.target, ndim, cfg.affinity_offsets)
    # targets are computed on the input window (neighbours known) and cropped to the output
    target = target[(slice(None), *out_crop)]
    if weight is not None:
        weight = weight[out_crop]
    elif cfg.target == "affinities":
        weight = affinity_mask(inst, ndim, cfg.affinity_offsets)[(slice(None), *out_crop)]
        if cfg.affinity_balance:
            weight = balance_weights(target, weight)
    mean, std = normalization
    raw = (raw - mean) / std
    if weight is not None and weight.ndim == 3:  # a weight map (z, y, x), not per-channel masks
        weight = weight[None]
    if ndim == 2:
        raw, target = raw[0], target[:, 0]
        weight = weight[:, 0] if weight is not None else None
    return (
        raw[None].astype(np.float32),
        np.ascontiguousarray(target, dtype=np.float32),
        np.ascontiguousarray(weight, dtype=np.float32) if weight is not None else None,
    )


def sample_batch(
    volumes: Sequence[PreparedVolume],
    cfg: TrainConfig,
    input_shape: Sequence[int],
    output_shape: Sequence[int],
    *,
    step: int,
    rank: int,
    world_size: int,
    normalization: tuple[float, float],
) -> Batch:
    """This rank's share of the global batch of ``step``.

    Sample ``i`` of the global batch (``0 <= i < batch_size``) is drawn from its own generator seeded
    by ``(seed, step, i)``; rank ``r`` takes samples ``r, r + world_size, ...``.  The global batch is
    thus identical for any number of processes, and a resumed run draws what it would have drawn.
    """
    samples = [
        sample_patch(volumes, cfg, input_shape, output_shape, np.random.default_rng([cfg.seed, step, i]), normalization)
        for i in range(rank, cfg.batch_size, world_size)
    ]
    raw = np.stack([s[0] for s in samples])
    target = np.stack([s[1] for s in samples])
    weight = np.stack([s[2] for s in samples]) if samples[0][2] is not None else None  # type: ignore[misc]
    return Batch(raw=raw, target=target, weight=weight)


def normalization_of(volumes: Sequence[PreparedVolume]) -> tuple[float, float]:
    """Mean and standard deviation of the raw scaled to [0, 1], over every training voxel."""
    total = sum(v.raw.size for v in volumes)
    mean = sum(float(v.raw.astype(np.float64).sum()) for v in volumes) / (255.0 * total)
    sq = sum(float(np.square(v.raw.astype(np.float64) / 255.0).sum()) for v in volumes) / total
    std = max(float(np.sqrt(max(sq - mean**2, 0.0))), 1e-6)
    return mean, std
