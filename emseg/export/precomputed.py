"""Export OME-Zarr images and label images as neuroglancer precomputed layers (via tensorstore).

Layout of the destination (a directory of layers, one per OME-Zarr image)::

    DST/
      image/              the source image: "image" layer, raw encoding, one scale per level
      labels/<name>/      each label image: "segmentation" layer, compressed_segmentation
        mesh/             optional multi-resolution sharded meshes (zmesh, draco; see emseg.export.meshes)
        skeletons/        optional skeletons (kimimaro), one per segment

Axes: precomputed stores ``(x, y, z, channel)``; OME-Zarr ``([c,] z, y, x)`` is transposed on write.
Resolution is the OME voxel size in nanometres.  Every multiscale level becomes a scale, and
``voxel_offset = round(translation_0 / resolution)``: the OME position of level-0 voxel 0 is taken as
the precomputed corner of voxel 0 at every scale (emseg's pyramids keep corners aligned, see
:mod:`emseg.export.pyramid`).

The info files and chunk encodings are written by tensorstore; only the ``mesh`` and
``skeletons`` keys of the info are added here.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt
import zarr

from emseg.engine.lock import locked
from emseg.engine.runstate import OutputClaim
from emseg.errors import ConfigError, InvalidDataError, NotAVolumeError, UnsupportedDtypeError
from emseg.geometry import Block, Coordinate, plan_blocks
from emseg.io.location import open_zarr_group
from emseg.io.safety import check_distinct
from emseg.io.volume import Volume, is_label_image, label_image_paths, open_volume, prepare_output

log = logging.getLogger(__name__)

__all__ = ["ExportReport", "ExportedLayer", "export_precomputed", "export_layer", "open_precomputed"]

LayerType = Literal["image", "segmentation"]
# Voxels per write block (a multiple of the precomputed chunk).
BLOCK_VOXELS = 1 << 22
# (z, y, x) cap on the precomputed chunk taken from the zarr chunks: 64^3 like igneous, so that
# igneous downsampling adds mips down to one chunk (256x256 chunks of a 512x512 section gave one)
MAX_CHUNK = (64, 64, 64)
# Scales of at least SHARD_MIN_BYTES (uncompressed) are sharded (neuroglancer_uint64_sharded_v1, as
# igneous shards images): shards of about SHARD_BYTES uncompressed instead of one file per chunk.
SHARD_MIN_BYTES = 1 << 30
SHARD_BYTES = 1 << 30
IMAGE_DTYPES = {"uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "float32"}


class ExportedLayer(NamedTuple):
    """One precomputed layer written by :func:`export_precomputed`."""

    path: Path
    type: LayerType
    data_type: str
    scales: int
    meshes: int
    skeletons: int = 0


class ExportReport(NamedTuple):
    """What :func:`export_precomputed` wrote."""

    dst: Path
    layers: tuple[ExportedLayer, ...]

    def summary(self) -> str:
        lines = [f"wrote {len(self.layers)} precomputed layer(s) to {self.dst}"]
        for layer in self.layers:
            extra = f", {layer.meshes} meshes" if layer.meshes else ""
            extra += f", {layer.skeletons} skeletons" if layer.skeletons else ""
            lines.append(
                f"  precomputed://file://{layer.path.resolve()}  ({layer.type}, {layer.data_type}, "
                f"{layer.scales} scale(s){extra})"
            )
        return "\n".join(lines)


def _ts() -> Any:
    import tensorstore

    return tensorstore


@locked("dst", "export")
def export_precomputed(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    overwrite: bool,
    mesh: bool = False,
    skeleton: bool = False,
    progress: bool = True,
    client: Any = None,
) -> ExportReport:
    """Write an OME-Zarr image and its label images as neuroglancer precomputed layers.

    Parameters
    ----------
    src : path
        An OME-Zarr image (``out.zarr``: the image becomes ``DST/image`` and every label image
        ``DST/labels/<name>``) or one label image (``out.zarr/labels/segments``).
    dst : path
        Directory to create (see the module docstring for its layout).
    overwrite : bool
        Replace an existing ``dst``.
    mesh : bool
        Also write multi-resolution sharded meshes (zmesh, draco) for segmentation layers, from
        their finest scale, blockwise (:func:`emseg.export.meshes.write_meshes`).
    skeleton : bool
        Also write skeletons (kimimaro TEASAR) for segmentation layers, blockwise and merged per
        segment (:func:`emseg.export.meshes.write_skeletons`).
    progress : bool
        Progress bars on stderr.
    client : distributed.Client or emseg.cluster.Connection, optional
        Write on this cluster's workers (default: threads in this process).  Either way every
        scale is a resumable blockwise stage: rerunning an interrupted export (same source and
        options, no ``overwrite``) writes only the blocks that are missing.

    Raises
    ------
    VolumeNotFoundError, NotAVolumeError
        ``src`` is not an OME-Zarr image.
    OutputExistsError, SameInputOutputError
        ``dst`` exists (without ``overwrite``) or overlaps ``src``.
    UnsupportedDtypeError, InvalidDataError
        Data precomputed cannot hold (e.g. negative label IDs).
    ConfigError
        ``mesh`` or ``skeleton`` asked for but zmesh or kimimaro is not installed.
    """
    src_path = Path(src)
    base = open_volume(src_path)  # raises VolumeNotFoundError / NotAVolumeError / IncompleteOutputError
    if base.image_path is None:
        raise NotAVolumeError(f"{src_path}: expected an OME-Zarr image group, got a bare zarr array")
    image_path = base.image_path
    if mesh:
        for module, package in (("zmesh", "zmesh"), ("DracoPy", "DracoPy"), ("cloudvolume", "cloud-volume")):
            _require(module, "meshes", package)
    if skeleton:
        _require("kimimaro", "skeletons", "kimimaro")
    check_distinct(image_path, dst)
    dst_path = Path(dst)

    def create(record: dict[str, Any]) -> None:
        prepare_output(dst_path, overwrite=overwrite)
        zarr.open_group(str(dst_path), mode="w")  # the claim records the run in it, status incomplete

    # an unfinished export of the same source and options resumes; anything else is replaced or refused
    claim = OutputClaim(dst_path, {"source": str(image_path.resolve()), "mesh": bool(mesh), "skeleton": bool(skeleton)},
                        kind="export", what="an earlier export", create=create, key="export", overwrite=overwrite,
                        once=True)
    claim.ensure()
    if not claim.started_over:
        remove_partial_files(dst_path)
    layers: list[ExportedLayer] = []
    if is_label_image(image_path):
        jobs = [(image_path, dst_path / "labels" / image_path.name, "segmentation")]
    else:
        jobs = [(image_path, dst_path / "image", "image")]
        jobs += [(p, dst_path / "labels" / p.name, "segmentation") for p in label_image_paths(image_path)]
    for path, out, kind in jobs:
        layers.append(
            export_layer(path, out, layer_type=kind, mesh=mesh and kind == "segmentation",  # type: ignore[arg-type]
                         skeleton=skeleton and kind == "segmentation", progress=progress, client=client,
                         state_root=dst_path)
        )
    claim.complete()
    return ExportReport(dst_path, tuple(layers))


_PARTIAL = re.compile(r"^\..+\.tmp(\.npz)?$")
"""Files written before their atomic rename (``.<name>.<hex>.tmp``): what a killed writer leaves."""


def remove_partial_files(root: Path) -> int:
    """Delete the temporary files a killed export left under ``root`` (resuming it); returns how many."""
    removed = 0
    for folder, _, files in os.walk(root):
        for name in files:
            if _PARTIAL.match(name):
                with contextlib.suppress(FileNotFoundError):
                    (Path(folder) / name).unlink()
                    removed += 1
    if removed:
        log.info("%s: removed %d partial files of the interrupted export", root, removed)
    return removed


def export_status(path: str | os.PathLike[str]) -> str | None:
    """``"complete"`` or ``"incomplete"`` for a precomputed export made by emseg (its folder, or a layer
    in it); None for a layer emseg did not export."""
    from emseg.engine.runstate import record_complete
    from emseg.io.safety import zarr_attrs

    here = Path(path)
    for root in (here, here.parent, here.parent.parent):  # DST, DST/image, DST/labels/<name>
        status = ((zarr_attrs(root) if root.is_dir() else None) or {}).get("emseg")
        if isinstance(status, dict) and isinstance(status.get("export"), dict):
            return "complete" if record_complete(status) else "incomplete"
    return None


def _require(module: str, what: str, package: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{what} need the optional package {package}; pip install 'emseg[mesh]', or drop the option")


def _levels(image_path: Path) -> list[Volume]:
    first = open_volume(image_path, level=0)
    return [first] + [open_volume(image_path, level=name) for name in first.levels[1:]]


def _chunk_size(volume: Volume) -> Coordinate:
    return tuple(min(c, m, s) for c, m, s in zip(volume.chunks, MAX_CHUNK, volume.shape))


def _data_type(dtype: np.dtype[Any], layer_type: LayerType, where: Path) -> np.dtype[Any]:
    if layer_type == "segmentation":
        if not np.issubdtype(dtype, np.integer) and dtype != np.bool_:
            raise UnsupportedDtypeError(f"{where}: segmentation layers need integer labels, got {dtype}")
        small = dtype == np.bool_ or (np.issubdtype(dtype, np.unsignedinteger) and dtype.itemsize <= 4)
        return np.dtype(np.uint32 if small else np.uint64)
    if dtype == np.bool_:
        return np.dtype(np.uint8)
    if np.issubdtype(dtype, np.floating):
        return np.dtype(np.float32)  # precomputed has no float16/float64
    if dtype.name in IMAGE_DTYPES:
        return dtype
    raise UnsupportedDtypeError(f"{where}: precomputed image layers cannot hold {dtype}; convert to uint64 or float32")


def _to_xyzc(data: npt.NDArray[Any], has_channels: bool, dtype: np.dtype[Any], where: Path) -> npt.NDArray[Any]:
    if np.issubdtype(data.dtype, np.signedinteger) and np.issubdtype(dtype, np.unsignedinteger):
        if data.size and data.min() < 0:
            raise InvalidDataError(f"{where}: negative label IDs cannot be stored in a segmentation layer")
    arr = data if has_channels else data[None]
    return np.asarray(arr.transpose(3, 2, 1, 0).astype(dtype, copy=False))


def _block_of(volume: Volume, chunk: Coordinate) -> Coordinate:
    """Write block: whole precomputed chunks, about BLOCK_VOXELS voxels."""
    block = list(chunk)
    for axis in (2, 1, 0):
        while block[axis] < volume.shape[axis] and math.prod(block) * 2 <= BLOCK_VOXELS:
            block[axis] *= 2
    return tuple(block)


def export_layer(
    image_path: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    layer_type: LayerType,
    mesh: bool = False,
    skeleton: bool = False,
    progress: bool = True,
    client: Any = None,
    state_root: str | os.PathLike[str] | None = None,
) -> ExportedLayer:
    """Write one OME-Zarr image (every multiscale level) as one precomputed layer at ``dst``.

    Each scale is a stage of :func:`emseg.engine.runner.run_blockwise` (on ``client``'s workers, or on
    threads here): blocks of whole precomputed chunks, completion records in ``state_root``
    (default: the layer itself), so an interrupted export resumes where it stopped.
    """
    from emseg.engine.runner import run_blockwise

    ts = _ts()
    path = Path(image_path)
    dst_path = Path(dst)
    root = Path(state_root) if state_root is not None else dst_path
    open_zarr_group(root, mode="a")  # the records' group (neuroglancer ignores it)
    try:
        layer_name = str(dst_path.resolve().relative_to(root.resolve())).replace("/", "-")
    except ValueError:
        layer_name = dst_path.name
    layer_name = layer_name if layer_name not in ("", ".") else "layer"
    levels = _levels(path)
    base = levels[0]
    dtype = _data_type(base.dtype, layer_type, base.path)
    channels = base.channels or 1
    if layer_type == "segmentation" and channels != 1:
        raise NotAVolumeError(f"{path}: a label image has one channel, got {channels}")
    origin = base.offset_nm
    for index, volume in enumerate(levels):
        resolution = [float(v) for v in reversed(volume.voxel_size)]
        offset_zyx = [round(o / v) for o, v in zip(origin, volume.voxel_size)]
        scale: dict[str, Any] = {
            "key": "_".join(f"{r:g}" for r in resolution),
            "size": list(reversed(volume.shape)),
            "resolution": resolution,
            "voxel_offset": list(reversed(offset_zyx)),
            "chunk_size": list(reversed(_chunk_size(volume))),
            "encoding": "compressed_segmentation" if layer_type == "segmentation" else "raw",
        }
        if layer_type == "segmentation":
            scale["compressed_segmentation_block_size"] = [8, 8, 8]
        chunk = _chunk_size(volume)
        block = _block_of(volume, chunk)
        unit = chunk
        if math.prod(volume.shape) * dtype.itemsize * channels >= SHARD_MIN_BYTES:
            scale["sharding"], shard = _sharding(volume, chunk, scale["encoding"], dtype, channels)
            # whole shards per block (a shard file is written by one worker), at least BLOCK_VOXELS
            block, unit = tuple(min(-(-max(b, s) // s) * s, v) for b, s, v in zip(block, shard, volume.shape)), shard
        spec = {
            "driver": "neuroglancer_precomputed",
            "kvstore": {"driver": "file", "path": str(dst_path.resolve())},
            "multiscale_metadata": {"type": layer_type, "data_type": dtype.name, "num_channels": channels},
            "scale_metadata": scale,
            "create": True,
            "open": True,
        }
        ts.open(spec).result()  # writes (or checks) the info file's scale
        grid = plan_blocks(volume.roi, block, chunk_shape=tuple(min(u, v) for u, v in zip(unit, volume.shape)))
        job = _ExportJob(str(volume.path), volume.has_channels, str(dst_path.resolve()), index, dtype.name,
                         uuid.uuid4().hex, "sharding" in scale)
        params = {"source": str(Path(volume.path).resolve()), "scale": scale, "data_type": dtype.name,
                  "layer": layer_type}
        # records of another export are replaced (the scale is written over); matching ones resume
        run_blockwise(client, stage=f"export-{layer_name}-{index}", grid=grid,
                      fn=functools.partial(_export_block, job), output=root, params=params, overwrite=True,
                      progress=progress)
    _integral_resolutions(dst_path)
    from emseg.export.meshes import write_meshes, write_skeletons

    meshes = write_meshes(base, dst_path, state_root=root, client=client, progress=progress) if mesh else 0
    skeletons = (write_skeletons(base, dst_path, state_root=root, client=client, progress=progress)
                 if skeleton else 0)
    log.info("%s -> %s (%d scales)", path, dst_path, len(levels))
    return ExportedLayer(dst_path, layer_type, dtype.name, len(levels), meshes, skeletons)


def _integral_resolutions(layer: Path) -> None:
    """Whole-nanometre resolutions as JSON integers in the info (tensorstore writes ``8.0``).

    CloudVolume and igneous name the scales they add ``"_".join(map(str, resolution))``: with
    integers, igneous's new mips are keyed ``16_16_50`` like emseg's own (``8_8_50``), not
    ``16.0_16.0_50.0``.
    """
    info_path = layer / "info"
    info = json.loads(info_path.read_text())
    for scale in info.get("scales", []):
        scale["resolution"] = [int(r) if float(r).is_integer() else r for r in scale["resolution"]]
    tmp = info_path.with_name(".info.tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, info_path)


@dataclass(frozen=True)
class _ExportJob:
    """What a worker needs to write blocks of one scale (sent by value)."""

    source: str
    has_channels: bool
    layer: str
    scale_index: int
    data_type: str
    token: str
    sharded: bool = False


@functools.lru_cache(maxsize=16)
def _scale_store(layer: str, scale_index: int, token: str) -> Any:
    """One scale of a precomputed layer opened by a worker for the export ``token``, indexed from 0."""
    ts = _ts()
    store = open_precomputed(layer, scale_index=scale_index)
    return store[ts.d["x", "y", "z"].translate_to[0, 0, 0]]


@functools.lru_cache(maxsize=16)
def _source(path: str, token: str) -> Volume:
    return open_volume(path, allow_incomplete=True)


def _export_block(job: _ExportJob, block: Block) -> dict[str, int]:
    """Copy one block (whole precomputed chunks) of a level into its scale."""
    volume = _source(job.source, job.token)
    roi = block.write_roi
    data = _to_xyzc(volume.read(roi), job.has_channels, np.dtype(job.data_type), volume.path)
    (z0, y0, x0), (z1, y1, x1) = roi.begin, roi.end
    store = _scale_store(job.layer, job.scale_index, job.token)
    if not job.sharded:
        store[x0:x1, y0:y1, z0:z1, :].write(data).result()
        return {"voxels": roi.size}
    txn = _ts().Transaction()  # the block's whole shards, each written once
    store.with_transaction(txn)[x0:x1, y0:y1, z0:z1, :].write(data).result()
    txn.commit_async().result()
    return {"voxels": roi.size}


def _sharding(volume: Volume, chunk: Coordinate, encoding: str, dtype: np.dtype[Any],
              channels: int) -> tuple[dict[str, Any], Coordinate]:
    """Sharding of a scale as igneous computes it (cloud-volume), and the shard's shape (z, y, x voxels)."""
    from cloudvolume.datasource.precomputed.sharding import compute_shard_params_for_image, image_shard_shape_from_spec

    size, chunk_xyz = tuple(volume.shape[::-1]), tuple(chunk[::-1])
    spec = compute_shard_params_for_image(size, chunk_xyz, encoding, dtype,
                                          uncompressed_shard_bytesize=SHARD_BYTES // max(channels, 1))
    sharding = {k: (int(v) if isinstance(v, (int, np.integer)) else v) for k, v in spec.to_dict().items()}
    shard = image_shard_shape_from_spec(sharding, size, chunk_xyz)
    return sharding, tuple(int(v) for v in shard[::-1])


def open_precomputed(path: str | os.PathLike[str], *, scale_index: int = 0) -> Any:
    """Open one scale of a precomputed layer with tensorstore (axes ``x, y, z, channel``)."""
    return _ts().open(
        {"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(Path(path).resolve())},
         "scale_index": scale_index, "open": True,
         # every chunk on disk, zeros too: CloudVolume and igneous take a missing chunk for an error
         "store_data_equal_to_fill_value": True}
    ).result()
