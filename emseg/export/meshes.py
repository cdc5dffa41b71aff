"""Meshes and skeletons of a label image as neuroglancer precomputed, blockwise and resumable.

Both are stages of :func:`emseg.engine.runner.run_blockwise` (on a cluster's workers, or threads here)
over blocks of the label image, each block read one voxel past its high faces
(:mod:`emseg.ops.mesh` computes; this module reads and writes):

``LAYER/mesh/``       legacy precomputed meshes (``neuroglancer_legacy_mesh``, unsharded, one level
                      of detail): ``<id>:0:<block id>`` fragments written by the workers, then one
                      ``<id>:0`` manifest per segment listing its fragments.
``LAYER/skeletons/``  precomputed skeletons (``neuroglancer_skeletons``, unsharded), vertices in nm,
                      attributes ``radius`` (float32) and ``vertex_types`` (uint8): per-block TEASAR
                      pieces (in ``STATE/skeleton-pieces/``) merged per segment into ``<id>``.

Format plan: the multi-resolution sharded mesh format (``neuroglancer_multilod_draco``, what
igneous writes for large volumes) is not written yet; the legacy format is what neuroglancer,
CloudVolume and igneous all read.  The step there is per-segment octree levels of detail from these
same block fragments (simplified with zmesh), draco-encoded, in shard files keyed by segment id;
only the stitching stage changes.
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
from emseg.geometry import Block, Coordinate, plan_blocks
from emseg.io.volume import Volume, open_volume

log = logging.getLogger(__name__)

__all__ = ["write_meshes", "write_skeletons"]

BLOCK_VOXELS = 1 << 21  # voxels per mesh / skeleton block (before the one-voxel overlap)
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


def _read(job: _Job, block: Block) -> tuple[Any, np.ndarray[Any, Any]]:
    volume = _volume(job.source, job.token)
    read_roi = block.write_roi.grow(0, 1).intersect(volume.roi)  # one voxel past the high faces
    origin = np.asarray(job.origin_nm_xyz) + np.asarray(read_roi.offset[::-1]) * np.asarray(job.resolution_xyz)
    return origin, volume.read(read_roi)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _mesh_task(job: _Job, block: Block) -> dict[str, int]:
    from emseg.ops.mesh import mesh_block

    origin, labels = _read(job, block)
    fragments = mesh_block(labels, resolution_xyz=job.resolution_xyz, origin_nm_xyz=origin)
    for seg_id, data in fragments.items():
        _atomic_write(Path(job.out) / f"{seg_id}:0:{block.block_id}", data)
    return {"fragments": len(fragments)}


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
         extra: dict[str, Any]) -> None:
    from emseg.engine.runner import run_blockwise

    grid = plan_blocks(volume.roi, _block_shape(volume), chunk_shape=None)
    params = {"source": str(Path(volume.path).resolve()), "resolution": list(job.resolution_xyz),
              "origin": list(job.origin_nm_xyz), "block": list(grid.block_shape), **extra}
    Path(job.out).mkdir(parents=True, exist_ok=True)
    # the pieces start over with the stage's records (those of another run are replaced)
    run_blockwise(client, stage=stage, grid=grid, fn=functools.partial(task, job), output=state_root, params=params,
                  overwrite=True, progress=progress, outputs=StageOutputs(functools.partial(_fresh_dir, Path(job.out))))


def _fresh_dir(path: Path) -> None:
    """An empty ``path``: the pieces an earlier run left there are removed."""
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
    """Legacy precomputed meshes of every segment of ``volume`` (a label image level) into ``layer/mesh``.

    Returns the number of segments meshed.  ``state_root`` holds the completion records (default:
    the layer); a rerun after an interruption meshes only the missing blocks.
    """
    layer_path = Path(layer)
    root = Path(state_root) if state_root is not None else layer_path
    resolution, origin = _geometry(volume)
    mesh_dir = layer_path / "mesh"
    job = _Job(str(volume.path), str(mesh_dir), resolution, origin, uuid.uuid4().hex)
    _run(_stage_name("mesh", layer_path, root), volume, job, _mesh_task, root, client, progress, {"kind": "mesh"})
    fragments: dict[int, list[str]] = defaultdict(list)
    for entry in os.scandir(mesh_dir):
        parts = entry.name.split(":")
        if len(parts) == 3 and not entry.name.startswith("."):
            fragments[int(parts[0])].append(entry.name)
    for seg_id, names in fragments.items():
        names.sort(key=lambda n: int(n.rsplit(":", 1)[1]))
        _atomic_write(mesh_dir / f"{seg_id}:0", json.dumps({"fragments": names}).encode())
    _atomic_write(mesh_dir / "info", json.dumps({"@type": "neuroglancer_legacy_mesh", "mip": 0}).encode())
    _update_info(layer_path, mesh="mesh")
    return len(fragments)


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
