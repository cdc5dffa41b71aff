"""Meshes and skeletons of a label image as neuroglancer precomputed, blockwise and resumable.

Both are stages of :func:`emseg.engine.runner.run_blockwise` (on a cluster's workers, or threads here)
over blocks of the label image, each block read one voxel past its high faces
(:mod:`emseg.ops.mesh` computes; this module reads and writes):

``LAYER/mesh/``       multi-resolution meshes (``neuroglancer_multilod_draco``, sharded, as
                      igneous writes them): ``<shard>.shard`` files keyed by segment id, each
                      segment's draco-encoded octree levels of detail followed by its manifest;
                      ``<bbox>.spatial`` files (igneous's spatial index: segment id -> bounding box,
                      nm, for each block) and ``info`` (vertex quantization, transform voxels -> nm,
                      sharding, ``spatial_index``).
``LAYER/skeletons/``  precomputed skeletons (``neuroglancer_skeletons``, unsharded), vertices in nm,
                      attribute ``radius`` (float32): per-block TEASAR pieces (in
                      ``STATE/skeleton-pieces/``) merged per segment into ``<id>``.

Meshes are two blockwise stages: the workers mesh blocks (zmesh marching cubes, simplified
within about a voxel while the block faces are kept, so neighbouring pieces meet) into
``STATE/mesh-pieces/``, then build the segments of one shard each (pieces joined, simplified per
level, cut into octree cells, draco-encoded; :func:`emseg.ops.mesh.multires_mesh`) and write the shard.
The pieces are removed once every shard is written.  A block touching the volume's border is read
with one voxel of zeros beyond it, so that meshes are closed there (igneous's
``closed_dataset_edges``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emseg.engine.runstate import StageOutputs
from emseg.geometry import Block, Coordinate, Roi, plan_blocks
from emseg.io.location import absolute
from emseg.io.volume import Volume, open_volume

log = logging.getLogger(__name__)

__all__ = ["write_meshes", "write_skeletons"]

BLOCK_VOXELS = 1 << 21  # voxels per mesh / skeleton block (before the one-voxel overlap)
REDUCTION_FACTOR = 100  # block meshes simplified towards 1/100 of marching cubes' triangles, within about a voxel
MAX_SEGMENTS_PER_SHARD = 2048  # meshes built per shard task (more shards, more tasks)
IDENTITY = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]


@dataclass(frozen=True)
class _Job:
    """What a worker needs for one block (sent by value)."""

    source: str
    out: str
    resolution_xyz: tuple[float, ...]
    origin_nm_xyz: tuple[float, ...]
    token: str
    teasar: tuple[tuple[str, float], ...] = ()
    voxel_offset_xyz: tuple[int, ...] = (0, 0, 0)
    spatial_dir: str = ""


def _block_shape(volume: Volume) -> Coordinate:
    """Chunks doubled along x, y, z in turn (roughly cubic blocks) up to BLOCK_VOXELS."""
    block = list(volume.chunks)
    grown = True
    while grown:
        grown = False
        for axis in (2, 1, 0):
            if block[axis] < volume.shape[axis] and math.prod(block) * 2 <= BLOCK_VOXELS:
                block[axis] *= 2
                grown = True
    return tuple(min(b, s) for b, s in zip(block, volume.shape))


@functools.lru_cache(maxsize=8)
def _volume(path: str, token: str) -> Volume:
    return open_volume(path)


def _read(job: _Job, block: Block, *, close_borders: bool = False) -> tuple[Any, np.ndarray[Any, Any]]:
    volume = _volume(job.source, job.token)
    read_roi = block.write_roi.grow(0, 1)  # one voxel past the high faces
    if close_borders:  # and one voxel of zeros past the volume's borders
        read_roi = read_roi.grow([int(b == v) for b, v in zip(block.write_roi.begin, volume.roi.begin)], 0)
        data = volume.read(read_roi, pad="constant")
    else:
        read_roi = read_roi.intersect(volume.roi)
        data = volume.read(read_roi)
    origin = np.asarray(job.origin_nm_xyz) + np.asarray(read_roi.offset[::-1]) * np.asarray(job.resolution_xyz)
    return origin, data


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _save_pieces(path: Path, pieces: dict[int, bytes]) -> None:
    ids = np.array(sorted(pieces), dtype=np.uint64)
    blobs = [pieces[int(i)] for i in ids]
    offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.uint64)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp.npz")
    np.savez(tmp, ids=ids, offsets=offsets, data=np.frombuffer(b"".join(blobs), dtype=np.uint8))
    os.replace(tmp, path)


def _load_pieces(path: Path) -> dict[int, bytes]:
    with np.load(path, allow_pickle=False) as npz:
        ids, offsets, data = npz["ids"], npz["offsets"], npz["data"].tobytes()
    return {int(seg_id): data[int(offsets[k]): int(offsets[k + 1])] for k, seg_id in enumerate(ids)}


def _spatial_name(job: _Job, block: Block) -> str:
    """igneous's spatial index file of a block: its bounds in nm, ``x0-x1_y0-y1_z0-z1.spatial``."""
    res = job.resolution_xyz
    lo = [(v + b) * r for v, b, r in zip(job.voxel_offset_xyz, block.write_roi.begin[::-1], res)]
    hi = [(v + e) * r for v, e, r in zip(job.voxel_offset_xyz, block.write_roi.end[::-1], res)]
    return "_".join(f"{_num(a)}-{_num(b)}" for a, b in zip(lo, hi)) + ".spatial"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _mesh_task(job: _Job, block: Block) -> dict[str, int]:
    import zmesh

    from emseg.ops.mesh import mesh_block

    origin, labels = _read(job, block, close_borders=True)
    pieces = mesh_block(labels, resolution_xyz=job.resolution_xyz, origin_nm_xyz=origin,
                        reduction_factor=REDUCTION_FACTOR)
    bounds: dict[str, list[float]] = {}
    for seg_id, data in pieces.items():
        vertices = zmesh.Mesh.from_precomputed(data).vertices
        bounds[str(seg_id)] = [float(v) for v in (*vertices.min(axis=0), *vertices.max(axis=0))]
    _save_pieces(Path(job.out) / f"{block.block_id}.npz", pieces)
    _atomic_write(Path(job.spatial_dir) / _spatial_name(job, block), json.dumps(bounds).encode())
    return {"fragments": len(pieces)}


@dataclass(frozen=True)
class _ShardJob:
    """What a worker needs to write one mesh shard (sent by value)."""

    pieces: str
    mesh_dir: str
    resolution_xyz: tuple[float, ...]
    sharding: tuple[tuple[str, Any], ...]
    shards: tuple[str, ...]


def _shard_task(job: _ShardJob, block: Block) -> dict[str, int]:
    """Build the multi-resolution meshes of the segments of one shard and write the shard file."""
    from cloudvolume.datasource.precomputed.sharding import ShardingSpecification, synthesize_shard_file

    from emseg.ops.mesh import multires_mesh

    shard = job.shards[block.block_id]
    members = json.loads((Path(job.pieces) / "shards" / f"{shard}.json").read_text())
    files: dict[int, dict[int, bytes]] = {}
    data: dict[int, bytes] = {}
    offsets: dict[int, int] = {}
    for seg_id_text, block_ids in sorted(members.items(), key=lambda kv: int(kv[0])):
        seg_id = int(seg_id_text)
        pieces = []
        for block_id in block_ids:
            if block_id not in files:
                files[block_id] = _load_pieces(Path(job.pieces) / f"{block_id}.npz")
            pieces.append(files[block_id][seg_id])
        mesh = multires_mesh(pieces, resolution_xyz=job.resolution_xyz)
        if mesh is None or not mesh.fragments:
            continue
        data[seg_id] = mesh.fragments + mesh.manifest
        offsets[seg_id] = len(mesh.manifest)
    if not data:
        return {"segments": 0}
    spec = ShardingSpecification.from_dict(dict(job.sharding))
    _atomic_write(Path(job.mesh_dir) / f"{shard}.shard", synthesize_shard_file(spec, data, offsets))
    return {"segments": len(data)}


def _skeleton_task(job: _Job, block: Block) -> dict[str, int]:
    from emseg.ops.mesh import encode_skeleton, skeletonize_block

    origin, labels = _read(job, block)
    pieces = skeletonize_block(labels, resolution_xyz=job.resolution_xyz, origin_nm_xyz=origin,
                               teasar=dict(job.teasar) or None)
    ids = np.array(sorted(pieces), dtype=np.uint64)
    blobs = [encode_skeleton(pieces[int(i)]) for i in ids]
    offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.uint64)
    path = Path(job.out) / f"{block.block_id}.npz"
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp.npz")
    np.savez(tmp, ids=ids, offsets=offsets, data=np.frombuffer(b"".join(blobs), dtype=np.uint8))
    os.replace(tmp, path)
    return {"skeletons": len(ids)}


def _geometry(volume: Volume) -> tuple[tuple[float, ...], tuple[float, ...]]:
    resolution = tuple(float(v) for v in reversed(volume.voxel_size))
    # The precomputed layer's corner: voxel_offset * resolution (see emseg.export.precomputed).
    origin = tuple(round(o / v) * v for o, v in reversed(list(zip(volume.offset_nm, volume.voxel_size))))
    return resolution, origin


def _run(stage: str, volume: Volume, job: _Job, task: Any, state_root: Path, client: Any, progress: bool,
         extra: dict[str, Any], fresh: tuple[Path, ...] = ()) -> None:
    from emseg.engine.runner import run_blockwise

    grid = plan_blocks(volume.roi, _block_shape(volume), chunk_shape=None)
    params = {"source": str(absolute(volume.path)), "resolution": list(job.resolution_xyz),
              "origin": list(job.origin_nm_xyz), "block": list(grid.block_shape), **extra}
    Path(job.out).mkdir(parents=True, exist_ok=True)
    # the pieces (and ``fresh`` folders) start over with the stage's records (those of another run
    # are replaced); the records are kept only while the pieces are there
    dirs = (Path(job.out), *fresh)
    run_blockwise(client, stage=stage, grid=grid, fn=functools.partial(task, job), output=state_root, params=params,
                  overwrite=True, progress=progress,
                  outputs=StageOutputs(functools.partial(_fresh_dirs, dirs), functools.partial(Path(job.out).is_dir)))


def _fresh_dirs(paths: tuple[Path, ...]) -> None:
    """Empty folders at ``paths``: the pieces an earlier run left there are removed."""
    for path in paths:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)


def _update_info(layer: Path, **keys: Any) -> None:
    info_path = layer / "info"
    info = json.loads(info_path.read_text())
    info.update(keys)
    _atomic_write(info_path, json.dumps(info).encode())


def _stage_name(kind: str, layer: Path, state_root: Path) -> str:
    try:
        name = str(layer.resolve().relative_to(state_root.resolve())).replace("/", "-")
    except ValueError:
        name = layer.name
    return f"{kind}-{name if name not in ('', '.') else 'layer'}"


def write_meshes(
    volume: Volume,
    layer: str | os.PathLike[str],
    *,
    state_root: str | os.PathLike[str] | None = None,
    client: Any = None,
    progress: bool = True,
) -> int:
    """Multi-resolution sharded meshes of every segment of ``volume`` (a label image level) into ``layer/mesh``.

    Returns the number of segments meshed.  ``state_root`` holds the completion records and the
    block pieces (default: the layer); a rerun after an interruption meshes only the missing
    blocks and writes only the missing shards.
    """
    from cloudvolume.datasource.precomputed.sharding import ShardingSpecification, compute_shard_params_for_hashed

    from emseg.ops.mesh import QUANTIZATION_BITS

    layer_path = Path(layer)
    root = Path(state_root) if state_root is not None else layer_path
    resolution, origin = _geometry(volume)
    voxel_offset = tuple(round(o / r) for o, r in zip(origin, resolution))
    mesh_dir = layer_path / "mesh"
    stage = _stage_name("mesh", layer_path, root)
    pieces_dir = root / "mesh-pieces" / stage
    mesh_dir.mkdir(parents=True, exist_ok=True)
    job = _Job(str(volume.path), str(pieces_dir), resolution, origin, uuid.uuid4().hex,
               voxel_offset_xyz=voxel_offset, spatial_dir=str(mesh_dir))
    block_shape = _block_shape(volume)
    _run(stage, volume, job, _mesh_task, root, client, progress,
         {"kind": "mesh", "reduction": REDUCTION_FACTOR, "closed_borders": True}, fresh=(mesh_dir,))

    members: dict[int, list[int]] = defaultdict(list)
    for path in sorted(pieces_dir.glob("*.npz"), key=lambda p: int(p.stem)):
        with np.load(path, allow_pickle=False) as npz:
            for seg_id in npz["ids"]:
                members[int(seg_id)].append(int(path.stem))
    shard_bits, minishard_bits, preshift_bits = compute_shard_params_for_hashed(
        len(members), min_shards=max(1, math.ceil(len(members) / MAX_SEGMENTS_PER_SHARD)))
    spec = ShardingSpecification(type="neuroglancer_uint64_sharded_v1", preshift_bits=preshift_bits,
                                 hash="murmurhash3_x86_128", minishard_bits=minishard_bits, shard_bits=shard_bits,
                                 minishard_index_encoding="gzip", data_encoding="raw")
    sharding = {k: (int(v) if isinstance(v, (int, np.integer)) else v) for k, v in spec.to_dict().items()}
    by_shard: dict[str, dict[str, list[int]]] = defaultdict(dict)
    for seg_id, block_ids in members.items():
        by_shard[spec.compute_shard_location(seg_id).shard_number][str(seg_id)] = block_ids
    (pieces_dir / "shards").mkdir(exist_ok=True)
    for shard, segments in by_shard.items():
        _atomic_write(pieces_dir / "shards" / f"{shard}.json", json.dumps(segments).encode())
    shards = tuple(sorted(by_shard))
    res = [int(r) if float(r).is_integer() else r for r in resolution]  # as the layer's info (CloudVolume names
    # the spatial index files with the precision of these numbers: 4.0 would ask for "0.0-128.0_..." files)
    info = {
        "@type": "neuroglancer_multilod_draco",
        "vertex_quantization_bits": QUANTIZATION_BITS,
        "transform": [res[0], 0, 0, 0, 0, res[1], 0, 0, 0, 0, res[2], 0],
        "lod_scale_multiplier": 1.0,
        "sharding": sharding,
        "mip": 0,
        "chunk_size": list(block_shape[::-1]),
        "spatial_index": {"resolution": res, "chunk_size": [b * r for b, r in zip(block_shape[::-1], res)]},
    }
    if shards:
        from emseg.engine.runner import run_blockwise

        shard_job = _ShardJob(str(pieces_dir), str(mesh_dir), resolution, tuple(sorted(sharding.items())), shards)
        grid = plan_blocks(Roi((0, 0, 0), (1, 1, len(shards))), (1, 1, 1), chunk_shape=None)
        run_blockwise(client, stage=f"{stage}-shards", grid=grid, fn=functools.partial(_shard_task, shard_job),
                      output=root, params={"kind": "mesh-shards", "pieces": stage, "sharding": sharding,
                                           "shards": list(shards)},
                      overwrite=True, progress=progress)
    _atomic_write(mesh_dir / "info", json.dumps(info).encode())
    _update_info(layer_path, mesh="mesh")
    shutil.rmtree(pieces_dir, ignore_errors=True)
    return len(members)


def write_skeletons(
    volume: Volume,
    layer: str | os.PathLike[str],
    *,
    state_root: str | os.PathLike[str] | None = None,
    client: Any = None,
    progress: bool = True,
    teasar: dict[str, float] | None = None,
    dust_threshold: float = 0.0,
) -> int:
    """Precomputed skeletons (kimimaro TEASAR) of every segment of ``volume`` into ``layer/skeletons``.

    Blocks are skeletonized on the workers; the pieces of each segment are then merged at their
    shared border points (:func:`emseg.ops.mesh.merge_skeletons`; components shorter than
    ``dust_threshold`` nm are dropped).  Returns the number of skeletons written.
    """
    from emseg.ops.mesh import SKELETON_ATTRIBUTES, decode_skeleton, encode_skeleton, merge_skeletons

    layer_path = Path(layer)
    root = Path(state_root) if state_root is not None else layer_path
    resolution, origin = _geometry(volume)
    stage = _stage_name("skeleton", layer_path, root)
    pieces_dir = root / "skeleton-pieces" / stage
    job = _Job(str(volume.path), str(pieces_dir), resolution, origin, uuid.uuid4().hex,
               tuple(sorted((teasar or {}).items())))
    _run(stage, volume, job, _skeleton_task, root, client, progress, {"kind": "skeleton", "teasar": teasar or {}})
    pieces: dict[int, list[Any]] = defaultdict(list)
    for path in sorted(pieces_dir.glob("*.npz")):
        with np.load(path, allow_pickle=False) as npz:
            ids, offsets, data = npz["ids"], npz["offsets"], npz["data"].tobytes()
        for k, seg_id in enumerate(ids):
            pieces[int(seg_id)].append(decode_skeleton(data[int(offsets[k]) : int(offsets[k + 1])], int(seg_id)))
    out = layer_path / "skeletons"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    written = 0
    for seg_id, parts in sorted(pieces.items()):
        skeleton = merge_skeletons(parts, dust_threshold=dust_threshold)
        if len(skeleton.vertices) == 0:
            continue
        (out / str(seg_id)).write_bytes(encode_skeleton(skeleton))
        written += 1
    (out / "info").write_text(json.dumps({
        "@type": "neuroglancer_skeletons", "transform": IDENTITY, "vertex_attributes": SKELETON_ATTRIBUTES,
        "mip": 0,  # no "sharding": null (neuroglancer refuses a null; absent means unsharded)
    }))
    _update_info(layer_path, skeletons="skeletons")
    return written


def describe_precomputed(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What ``emseg info`` shows for a precomputed layer or export directory (None: it is neither).

    A layer (a directory with a precomputed ``info``): type, data type, channels, scales (key,
    size, resolution nm, chunk size, encoding), meshes and skeletons.  An export directory
    (``image/``, ``labels/<name>/``): the same for each of its layers.
    """
    root = Path(path)

    def layer(folder: Path) -> dict[str, Any] | None:
        try:
            info = json.loads((folder / "info").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(info, dict) or info.get("@type", "neuroglancer_multiscale_volume") != \
                "neuroglancer_multiscale_volume" or "scales" not in info:
            return None
        scales = [{"key": s.get("key"), "size": s.get("size"), "resolution": s.get("resolution"),
                   "chunk_size": (s.get("chunk_sizes") or [None])[0], "encoding": s.get("encoding"),
                   "sharded": bool(s.get("sharding"))} for s in info["scales"]]
        return {"path": str(folder), "kind": "neuroglancer precomputed", "type": info.get("type"),
                "data_type": info.get("data_type"), "num_channels": info.get("num_channels"), "scales": scales,
                "mesh": info.get("mesh"), "skeletons": info.get("skeletons")}

    if (root / "info").is_file():
        return layer(root)
    candidates = [root / "image", *sorted((root / "labels").glob("*"))] if (root / "labels").is_dir() else [
        root / "image"]
    layers = [found for found in (layer(c) for c in candidates if (c / "info").is_file()) if found]
    return {"path": str(root), "kind": "neuroglancer precomputed export", "layers": layers} if layers else None


def precomputed_summary(description: dict[str, Any]) -> str:
    """Text lines for :func:`describe_precomputed`'s result."""
    if "layers" in description:
        return "\n\n".join([f"path:       {description['path']} ({description['kind']}, "
                            f"{len(description['layers'])} layer(s))"]
                           + [precomputed_summary(lay) for lay in description["layers"]])
    lines = [f"path:       {description['path']}",
             f"kind:       {description['kind']} {description['type']} layer",
             f"dtype:      {description['data_type']} x {description['num_channels']} channel(s)"]
    for s in description["scales"]:
        lines.append(f"scale {s['key']}: size {s['size']} (x, y, z), resolution {s['resolution']} nm, "
                     f"chunks {s['chunk_size']}, {s['encoding']}{', sharded' if s['sharded'] else ''}")
    if description.get("mesh"):
        lines.append(f"meshes:     {description['mesh']}/")
    if description.get("skeletons"):
        lines.append(f"skeletons:  {description['skeletons']}/")
    return "\n".join(lines)
