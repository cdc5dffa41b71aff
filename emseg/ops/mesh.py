"""Meshes (zmesh) and skeletons (kimimaro) of one block of labels, and their stitching: numpy in, numpy out.

Blocks are cut as for every other stage; each is read one voxel past its high faces so that the
pieces of neighbouring blocks meet on a shared plane:

* meshes: marching cubes of each label in the block; the fragments of a segment touch along the
  block faces, and neuroglancer (legacy format) or CloudVolume draw/concatenate them;
* skeletons: TEASAR (kimimaro) per block with ``fix_borders``: a skeleton that leaves a block ends at
  the centroid of its cross-section on the shared plane, and the neighbour's starts at the same
  point, so :func:`merge_skeletons` joins them by merging coincident vertices (and cuts the loops
  that overlapping pieces may close: kimimaro's own ``postprocess`` drops every edge of such
  skeletons in kimimaro 5.8, so it is not used).

Vertices are in nanometres, axes ``x, y, z`` (neuroglancer's model space), voxel ``(i, j, k)``
spanning ``origin_nm + (k, j, i) * resolution`` to ``origin_nm + (k + 1, j + 1, i + 1) * resolution``
as neuroglancer draws voxels: a mesh surface runs along the faces of its segment's voxels
(zmesh's ``voxel_centered=True`` output is already in this convention) and a skeleton vertex sits
at a voxel centre (kimimaro's voxel-index vertices shifted by half a voxel).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_TEASAR",
    "MultiresMesh",
    "decode_skeleton",
    "encode_skeleton",
    "merge_skeletons",
    "mesh_block",
    "multires_mesh",
    "skeletonize_block",
]

# kimimaro's TEASAR parameters (nm where they are lengths): scale/const of the invalidation ball.
DEFAULT_TEASAR: dict[str, float] = {"scale": 1.5, "const": 300.0, "pdrf_scale": 100000, "pdrf_exponent": 4}


def _xyz(labels_zyx: npt.NDArray[Any]) -> npt.NDArray[Any]:
    return np.asfortranarray(labels_zyx.transpose(2, 1, 0))


def mesh_block(
    labels_zyx: npt.NDArray[Any],
    *,
    resolution_xyz: Sequence[float],
    origin_nm_xyz: Sequence[float],
    reduction_factor: int = 0,
) -> dict[int, bytes]:
    """Mesh fragments (legacy precomputed encoding) of every non-zero label of one block.

    Parameters
    ----------
    labels_zyx : ndarray (z, y, x), integer
        The block's labels (read one voxel past its high faces).
    resolution_xyz : (x, y, z) floats
        Voxel size, nm.
    origin_nm_xyz : (x, y, z) floats
        Position, nm, of the corner of the block's first voxel.
    reduction_factor : int
        Simplify each fragment to about 1/``reduction_factor`` of its triangles (zmesh), moving no
        vertex by more than about one voxel and none on the block's faces, so that the fragments of
        neighbouring blocks still meet; 0 keeps marching cubes' triangles.

    Returns
    -------
    dict
        label id -> fragment bytes (``uint32 n_vertices, float32 vertices[n][3], uint32 faces[m][3]``).
    """
    from zmesh import Mesher

    mesher = Mesher(tuple(float(r) for r in resolution_xyz))
    mesher.mesh(_xyz(labels_zyx))
    shift = np.asarray(origin_nm_xyz, dtype=np.float64)  # zmesh's voxel_centered output starts at the corner
    fragments: dict[int, bytes] = {}
    for seg_id in mesher.ids():
        if seg_id == 0:
            continue
        m = mesher.get(int(seg_id), normals=False, reduction_factor=reduction_factor, voxel_centered=True)
        mesher.erase(seg_id)
        if len(m.faces) == 0:
            continue
        m.vertices = (m.vertices + shift).astype(np.float32)
        fragments[int(seg_id)] = m.to_precomputed()
    mesher.clear()
    return fragments


class MultiresMesh(NamedTuple):
    """One segment's multi-resolution mesh (``neuroglancer_multilod_draco``).

    ``fragments`` are the draco-encoded octree nodes, level 0 first, in the manifest's order, and
    ``manifest`` the binary manifest; in a shard they are stored back to back, ``fragments``
    first, and the minishard index points at the manifest.
    """

    fragments: bytes
    manifest: bytes
    lods: int


# Multi-resolution meshes: a segment gets one more level of detail each time its largest extent
# doubles past MIN_CHUNK_NM (up to MAX_LODS); each level has about half the triangles of the one below.
MIN_CHUNK_NM = 256.0
MAX_LODS = 5
QUANTIZATION_BITS = 16


def _zorder(position: Sequence[int]) -> int:
    """Morton code of an octree node's (x, y, z) grid position (x in the lowest bit)."""
    code = 0
    for bit in range(21):
        for axis in range(3):
            code |= ((int(position[axis]) >> bit) & 1) << (3 * bit + axis)
    return code


def multires_mesh(
    pieces: Iterable[bytes],
    *,
    resolution_xyz: Sequence[float],
    min_chunk_nm: float | None = None,
    max_lods: int | None = None,
    quantization_bits: int = QUANTIZATION_BITS,
    compression_level: int = 7,
) -> MultiresMesh | None:
    """The multi-resolution mesh of one segment from its block fragments (:func:`mesh_block`).

    The fragments are joined (their vertices on shared block faces coincide), then simplified
    level by level (zmesh's quadric simplification, half the triangles per level) and cut into an
    octree of ``chunk * 2**lod`` cells, each cell draco-encoded with integer positions of
    ``quantization_bits`` bits, as igneous does.  Stored model coordinates are voxels of the
    finest scale (the mesh info's ``transform`` scales them to nm).

    The segment gets one level more each time its largest extent doubles past ``min_chunk_nm``
    (default :data:`MIN_CHUNK_NM`), up to ``max_lods`` (default :data:`MAX_LODS`).  Returns None
    when the segment has no triangles.
    """
    import DracoPy
    import zmesh

    resolution = np.asarray(resolution_xyz, dtype=np.float64)
    parts = [zmesh.Mesh.from_precomputed(p) for p in pieces]
    parts = [p for p in parts if len(p.faces)]
    if not parts:
        return None
    mesh = zmesh.Mesh.concatenate(*parts).consolidate()
    if len(mesh.faces) == 0:
        return None
    mesh.vertices = (mesh.vertices.astype(np.float64) / resolution).astype(np.float32)  # nm -> voxels
    extent_nm = (mesh.vertices.max(axis=0) - mesh.vertices.min(axis=0)) * resolution
    lods = 1 + int(max(0.0, np.floor(np.log2(max(float(extent_nm.max()), 1e-9) / (min_chunk_nm or MIN_CHUNK_NM)))))
    lods = max(1, min(lods, max_lods or MAX_LODS))

    levels = [mesh]
    for lod in range(1, lods):
        target = max(int(len(mesh.faces) / 2**lod), 4)
        levels.append(zmesh.simplify_fqmr(levels[-1], target_count=target, preserve_border=False))
    levels = [level for level in levels if len(level.faces)]
    lods = len(levels)
    grid_origin = np.floor(np.min([lv.vertices.min(axis=0) for lv in levels], axis=0))
    grid_end = np.ceil(np.max([lv.vertices.max(axis=0) for lv in levels], axis=0))
    chunk = np.maximum(np.ceil((grid_end - grid_origin) / 2 ** (lods - 1)), 1.0)
    scale = float(2**quantization_bits - 1)

    nodes: list[dict[tuple[int, int, int], Any]] = []
    for lod, level in enumerate(levels):
        if lod == lods - 1:
            nodes.append({(0, 0, 0): level})
        else:
            grid = zmesh.chunk_mesh(level, (chunk * 2**lod).tolist(), tuple(grid_origin.tolist()))
            nodes.append({(int(k[0]), int(k[1]), int(k[2])): m for k, m in grid.items() if len(m.faces)})
    for lod in range(lods - 1):  # neuroglancer descends from the top: every node's parent is listed (empty if need be)
        for x, y, z in list(nodes[lod]):
            nodes[lod + 1].setdefault((x >> 1, y >> 1, z >> 1), None)

    positions: list[npt.NDArray[np.uint32]] = []
    sizes: list[list[int]] = []
    blobs: list[bytes] = []
    for lod in range(lods):
        cell = chunk * 2**lod
        order = sorted(nodes[lod], key=_zorder)
        lod_sizes: list[int] = []
        for node in order:
            sub = nodes[lod][node]
            data = b""
            if sub is not None:
                local = (sub.vertices.astype(np.float64) - grid_origin) / cell - np.asarray(node, dtype=np.float64)
                quantized = np.clip(np.round(local * scale), 0, scale).astype(np.uint32)
                try:
                    data = bytes(DracoPy.encode(quantized, sub.faces, quantization_bits=quantization_bits,
                                                compression_level=compression_level, create_metadata=True))
                except DracoPy.EncodingFailedException:
                    data = b""
            lod_sizes.append(len(data))
            blobs.append(data)
        positions.append(np.asarray(order, dtype=np.uint32).reshape(-1, 3))
        sizes.append(lod_sizes)

    header = [np.asarray(chunk, "<f4").tobytes(), np.asarray(grid_origin, "<f4").tobytes(),
              np.uint32(lods).astype("<u4").tobytes(), np.asarray([2.0**i for i in range(lods)], "<f4").tobytes(),
              np.zeros((lods, 3), "<f4").tobytes(), np.asarray([len(s) for s in sizes], "<u4").tobytes()]
    for pos, lod_sizes in zip(positions, sizes):
        header.append(np.ascontiguousarray(pos.T).astype("<u4").tobytes())  # all x, then all y, then all z
        header.append(np.asarray(lod_sizes, "<u4").tobytes())
    return MultiresMesh(b"".join(blobs), b"".join(header), lods)


def skeletonize_block(
    labels_zyx: npt.NDArray[Any],
    *,
    resolution_xyz: Sequence[float],
    origin_nm_xyz: Sequence[float],
    teasar: dict[str, float] | None = None,
    dust_threshold: int = 0,
) -> dict[int, Any]:
    """TEASAR skeletons (kimimaro) of every non-zero label of one block, vertices in nm.

    ``dust_threshold``: labels with fewer voxels in the block are skipped (0 keeps all, so that a
    segment cut by a block face keeps both pieces).  Returns label id -> ``osteoid.Skeleton``.
    """
    import kimimaro

    if not labels_zyx.any():
        return {}
    skeletons: dict[int, Any] = kimimaro.skeletonize(
        _xyz(labels_zyx), teasar_params=dict(teasar or DEFAULT_TEASAR),
        anisotropy=tuple(float(r) for r in resolution_xyz), dust_threshold=dust_threshold, fix_borders=True,
        fix_branching=True, progress=False, parallel=1,
    )
    shift = np.asarray(origin_nm_xyz, dtype=np.float64) + 0.5 * np.asarray(resolution_xyz, dtype=np.float64)
    for skeleton in skeletons.values():
        skeleton.vertices = (skeleton.vertices + shift).astype(np.float32)
    return {int(k): v for k, v in skeletons.items()}


def merge_skeletons(pieces: Iterable[Any], *, dust_threshold: float = 0.0) -> Any:
    """One skeleton from the pieces of one segment in neighbouring blocks.

    Pieces are concatenated and vertices that coincide (the shared border points) merged; where
    overlapping pieces close a loop, the loop is cut by keeping the minimum spanning forest of the
    edge lengths (a skeleton is a tree); components shorter than ``dust_threshold`` nm are dropped.
    """
    from osteoid import Skeleton
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components, minimum_spanning_tree

    parts = [p for p in pieces if len(p.vertices)]
    if not parts:
        return Skeleton()
    merged = Skeleton.simple_merge(parts).consolidate()
    n = len(merged.vertices)
    edges = np.asarray(merged.edges, dtype=np.int64).reshape(-1, 2)
    if len(edges):
        lengths = np.linalg.norm(merged.vertices[edges[:, 0]] - merged.vertices[edges[:, 1]], axis=1)
        graph = coo_matrix((np.maximum(lengths, 1e-6), (edges[:, 0], edges[:, 1])), shape=(n, n))
        tree = minimum_spanning_tree(graph).tocoo()
        merged.edges = np.stack([tree.row, tree.col], axis=1).astype(np.uint32)
    if dust_threshold > 0 and len(merged.edges):
        edges = np.asarray(merged.edges, dtype=np.int64)
        count, component = connected_components(coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])),
                                                            shape=(n, n)), directed=False)
        lengths = np.linalg.norm(merged.vertices[edges[:, 0]] - merged.vertices[edges[:, 1]], axis=1)
        cable = np.bincount(component[edges[:, 0]], weights=lengths, minlength=count)
        keep = cable[component] >= dust_threshold
        merged = merged.crop_vertices(keep) if hasattr(merged, "crop_vertices") else _keep(merged, keep)
    return merged.consolidate()


def _keep(skeleton: Any, keep: npt.NDArray[np.bool_]) -> Any:
    """``skeleton`` restricted to the vertices where ``keep`` (edges between kept vertices only)."""
    index = np.cumsum(keep) - 1
    edges = np.asarray(skeleton.edges, dtype=np.int64)
    edges = edges[keep[edges[:, 0]] & keep[edges[:, 1]]]
    out = skeleton.clone()
    out.vertices = skeleton.vertices[keep]
    out.edges = index[edges].astype(np.uint32)
    out.radius = skeleton.radius[keep]
    if getattr(skeleton, "vertex_types", None) is not None:
        out.vertex_types = skeleton.vertex_types[keep]
    return out


def encode_skeleton(skeleton: Any) -> bytes:
    """The precomputed encoding (``uint32 nv, ne; float32 vertices[nv][3]; uint32 edges[ne][2]; float32 radius[nv]``).

    Only the radius is kept as a vertex attribute: neuroglancer's WebGL cannot hold kimimaro's
    uint8 ``vertex_types``.
    """
    skeleton = skeleton.clone()
    skeleton.extra_attributes = list(SKELETON_ATTRIBUTES)
    data: bytes = skeleton.to_precomputed()
    return data


def decode_skeleton(data: bytes, segid: int = 0) -> Any:
    """The inverse of :func:`encode_skeleton`."""
    from osteoid import Skeleton

    return Skeleton.from_precomputed(data, segid=segid, vertex_attributes=SKELETON_ATTRIBUTES)


SKELETON_ATTRIBUTES: list[dict[str, Any]] = [
    {"id": "radius", "data_type": "float32", "num_components": 1},
]
