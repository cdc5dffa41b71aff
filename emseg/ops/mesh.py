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

Vertices are in nanometres, axes ``x, y, z`` (neuroglancer's model space): voxel ``(i, j, k)``
has its centre at ``origin_nm + ((k, j, i) + 0.5) * resolution`` (kimimaro's and zmesh's
voxel-centred convention shifted by half a voxel, as neuroglancer draws voxels).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_TEASAR",
    "decode_skeleton",
    "encode_skeleton",
    "merge_skeletons",
    "mesh_block",
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
) -> dict[int, bytes]:
    """Legacy precomputed mesh fragments of every non-zero label of one block.

    Parameters
    ----------
    labels_zyx : ndarray (z, y, x), integer
        The block's labels (read one voxel past its high faces).
    resolution_xyz : (x, y, z) floats
        Voxel size, nm.
    origin_nm_xyz : (x, y, z) floats
        Position, nm, of the corner of the block's first voxel.

    Returns
    -------
    dict
        label id -> fragment bytes (``uint32 n_vertices, float32 vertices[n][3], uint32 faces[m][3]``).
    """
    from zmesh import Mesher

    mesher = Mesher(tuple(float(r) for r in resolution_xyz))
    mesher.mesh(_xyz(labels_zyx))
    shift = np.asarray(origin_nm_xyz, dtype=np.float64) + 0.5 * np.asarray(resolution_xyz, dtype=np.float64)
    fragments: dict[int, bytes] = {}
    for seg_id in mesher.ids():
        if seg_id == 0:
            continue
        m = mesher.get(int(seg_id), normals=False, voxel_centered=True)
        mesher.erase(seg_id)
        if len(m.faces) == 0:
            continue
        m.vertices = (m.vertices + shift).astype(np.float32)
        fragments[int(seg_id)] = m.to_precomputed()
    mesher.clear()
    return fragments


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
