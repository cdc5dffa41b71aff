"""Compute parts of the agglomeration: affinities, region graph, merge scores, union-find (no cluster)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import waterz
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from skimage.segmentation import watershed

from emseg.ops.affinities import affinities_from_boundary, boundary_from_affinities, prediction_affinities
from emseg.ops.agglomerate import UnionFind, consecutive_lookup, merge_scores, quiet_stdout
from emseg.ops.graph import block_edges, edge_union
from tests.support import cells


def _fragments(boundary: np.ndarray, seed_below: float = 0.15) -> np.ndarray:
    from skimage.measure import label

    seeds = label(boundary < seed_below, connectivity=1)
    return watershed(boundary, seeds).astype(np.uint64)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a.ravel(), b.ravel()], axis=1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def test_affinities_from_boundary_by_hand() -> None:
    b = np.array([[[0.0, 0.2, 0.9, 0.1]]], dtype=np.float32)  # (1, 1, 4)
    affs = affinities_from_boundary(b)
    np.testing.assert_allclose(affs[2, 0, 0], [0.0, 0.8, 0.1, 0.1], rtol=1e-6)
    assert not affs[0].any() and not affs[1].any()
    stack = np.stack([b[0], b[0]])  # two sections
    assert affinities_from_boundary(stack)[0, 1].any() and not affinities_from_boundary(stack, mode="2d")[0].any()
    np.testing.assert_allclose(boundary_from_affinities(np.ones((3, 2, 2, 2), np.float32)), 0.0)
    with pytest.raises(Exception, match="at least 3 channels"):
        prediction_affinities(np.zeros((2, 2, 2, 2), np.uint8), "affinities")


def test_region_graph_equals_waterz_rag_and_blocks_own_each_edge_once() -> None:
    _, boundary = cells((6, 40, 48), 30, seed=1)
    affs = affinities_from_boundary(boundary)
    whole_frag = _fragments(boundary)
    # waterz's region graph (no merge below threshold 0): an independent reference of edges and means
    with quiet_stdout():
        _, rag = next(waterz.agglomerate(affs, [0.0], fragments=whole_frag.copy(), return_region_graph=True))
    ref = {(min(e["u"], e["v"]), max(e["u"], e["v"])): e["score"] for e in rag if e["u"] and e["v"]}
    edges = block_edges(whole_frag, affs, whole_frag.shape)
    assert {(int(u), int(v)) for u, v in zip(edges.u, edges.v)} == set(ref)
    for u, v, s in zip(edges.u, edges.v, edges.score):
        assert s == pytest.approx(ref[(int(u), int(v))], abs=1e-5)

    # per-block fragments (unique ids, not crossing faces): blocks own disjoint, complete edge sets
    block = (3, 16, 16)
    frag = np.zeros_like(whole_frag)
    offset = 0
    for z, y, x in itertools.product(*(range(0, s, b) for s, b in zip(frag.shape, block))):
        sl = (slice(z, z + block[0]), slice(y, y + block[1]), slice(x, x + block[2]))
        local = _fragments(boundary[sl])
        frag[sl] = local + offset
        offset += int(local.max())
    parts = []
    for z, y, x in itertools.product(*(range(0, s, b) for s, b in zip(frag.shape, block))):
        core = tuple(min(b, s - o) for b, s, o in zip(block, frag.shape, (z, y, x)))
        ext = tuple(slice(o, min(o + c + 1, s)) for o, c, s in zip((z, y, x), core, frag.shape))
        parts.append(block_edges(frag[ext], affs[(slice(None), *ext)], core, quantile=0.5))
    union = edge_union(parts)
    keys = np.stack([union.u, union.v], axis=1)
    assert len(np.unique(keys, axis=0)) == len(keys)  # no edge computed twice
    whole = block_edges(frag, affs, frag.shape, quantile=0.5)
    np.testing.assert_array_equal(union.u, whole.u)
    np.testing.assert_array_equal(union.v, whole.v)
    np.testing.assert_array_equal(union.area, whole.area)
    np.testing.assert_array_equal(union.aff_sum, whole.aff_sum)
    np.testing.assert_array_equal(union.quantile, whole.quantile)
    assert not block_edges(frag, affs, frag.shape, mode="2d").area.sum() == whole.area.sum()


@pytest.mark.parametrize("seed", [0, 3])
def test_merge_scores_reproduce_waterz_at_every_threshold(seed: int) -> None:
    _, boundary = cells((4, 48, 48), 25, seed=seed)
    affs = affinities_from_boundary(boundary)
    frag = _fragments(boundary)
    edges = block_edges(frag, affs, frag.shape)
    scores = merge_scores(frag, affs, edges.u, edges.v)
    assert ((scores >= 0) & (scores <= 1)).all()
    thresholds = [0.2, 0.4, 0.6, 0.8]
    with quiet_stdout():
        references = [s.copy() for s in waterz.agglomerate(affs, list(thresholds), fragments=frag.copy())]
    for t, ref in zip(thresholds, references):
        uf = UnionFind(int(frag.max()))
        keep = scores < t
        uf.union(edges.u[keep], edges.v[keep])
        lookup, n = consecutive_lookup(uf.roots())
        assert _same_partition(lookup[frag], ref)
        assert n == len(np.unique(ref))


def test_union_find_matches_connected_components_in_any_order() -> None:
    rng = np.random.default_rng(0)
    n = 5000
    u = rng.integers(1, n + 1, 4000)
    v = rng.integers(1, n + 1, 4000)
    graph = sparse.coo_array((np.ones(len(u)), (u, v)), shape=(n + 1, n + 1))
    _, component = connected_components(graph, directed=False)
    results = []
    for order in (np.arange(len(u)), rng.permutation(len(u))):
        uf = UnionFind(n)
        for chunk in np.array_split(order, 7):  # streamed in pieces, as block files are
            uf.union(u[chunk], v[chunk])
        lookup, count = consecutive_lookup(uf.roots())
        results.append(lookup)
        assert _same_partition(lookup[1:], component[1:])
        assert count == len(np.unique(component[1:]))
        assert lookup[0] == 0 and set(np.unique(lookup[1:])) == set(range(1, count + 1))
    np.testing.assert_array_equal(results[0], results[1])  # independent of the order of the edges


def test_quiet_stdout_hides_waterz_progress(capfd) -> None:
    _, boundary = cells((2, 24, 24), 6, seed=5)
    affs = affinities_from_boundary(boundary)
    frag = _fragments(boundary)
    edges = block_edges(frag, affs, frag.shape)
    merge_scores(frag, affs, edges.u, edges.v)
    out, _ = capfd.readouterr()
    assert out == ""


def _long_range_affinities(gt: np.ndarray, offsets, noise: float, seed: int) -> np.ndarray:
    """Affinity of p and p + o for every offset o: 1 inside a cell, 0 across, plus noise; 0 outside."""
    rng = np.random.default_rng(seed)
    affs = np.zeros((len(offsets), *gt.shape), np.float32)
    for c, o in enumerate(offsets):
        src = tuple(slice(max(0, -d), s - max(0, d)) for d, s in zip(o, gt.shape))
        dst = tuple(slice(max(0, d), s - max(0, -d)) for d, s in zip(o, gt.shape))
        affs[c][src] = gt[src] == gt[dst]
    return np.clip(affs + rng.normal(0, noise, affs.shape).astype(np.float32), 0, 1)


OFFSETS = ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (-2, 0, 0), (0, -5, 0), (0, 0, -5))


def test_mutex_watershed_recovers_cells_from_long_range_affinities() -> None:
    from emseg.ops.mutex import check_offsets, mutex_fragments, offsets_halo

    gt, _ = cells((6, 40, 40), 12, seed=8)
    affs = _long_range_affinities(gt, OFFSETS, noise=0.0, seed=0)
    labels, n = mutex_fragments(affs, OFFSETS)
    assert _same_partition(labels, gt) and n == len(np.unique(gt))
    # in 2-D mode no segment spans two sections
    labels2d, _ = mutex_fragments(affs, OFFSETS, mode="2d")
    for z in range(labels2d.shape[0] - 1):
        assert not set(np.unique(labels2d[z])) & set(np.unique(labels2d[z + 1]))
    assert offsets_halo(check_offsets(OFFSETS, 6)) == (3, 6, 6)
    with pytest.raises(Exception, match="offsets"):
        check_offsets(OFFSETS, 3)
