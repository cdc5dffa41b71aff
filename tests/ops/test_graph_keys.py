"""The region graph's pair sort: every path of :func:`emseg.ops.graph.block_edges` (ids packed with the affinity
bits into one sorted key, ids ranked first, the indirect sort where neither fits) against a plain reference."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from emseg.ops.graph import block_edges


def reference(frag: np.ndarray, affs: np.ndarray, quantile: float) -> dict[tuple[int, int], tuple[int, float, float]]:
    """(u, v) -> (contact area, affinity sum, quantile) from a loop over every pair of neighbouring voxels."""
    found: dict[tuple[int, int], list[float]] = defaultdict(list)
    for d in range(3):
        step = [0, 0, 0]
        step[d] = 1
        for p in np.ndindex(*frag.shape):
            q = tuple(i + s for i, s in zip(p, step))
            if q[d] >= frag.shape[d]:
                continue
            a, b = int(frag[p]), int(frag[q])
            if a != b and a and b:
                found[(min(a, b), max(a, b))].append(float(affs[d][q]))
    out = {}
    for pair, values in found.items():
        values.sort()
        out[pair] = (len(values), sum(values), float(np.quantile(np.float32(values), quantile)))
    return out


def ids_of(case: str, rng: np.random.Generator) -> np.ndarray:
    if case == "near":  # one block's ids: offsets from the lowest, packed with the affinity bits
        return rng.integers(0, 40, (3, 9, 11)).astype(np.uint64)
    if case == "far":  # ids of two distant blocks: ranked, then packed
        frag = rng.integers(0, 40, (3, 9, 11)).astype(np.uint64)
        return frag + (frag > 20) * np.uint64(2**40)
    # more distinct ids than a 32-bit pair key tells apart: the indirect sort
    return (rng.permutation(2 * 120 * 300) + 8).astype(np.uint64).reshape(2, 120, 300)


@pytest.mark.parametrize("case", ["near", "far", "many"])
@pytest.mark.parametrize("values", ["plain", "signed zeros", "negative"])
def test_block_edges_equal_a_loop_over_every_pair(case: str, values: str) -> None:
    rng = np.random.default_rng(len(case) + len(values))
    frag = ids_of(case, rng)
    frag[frag == 7] = 0
    affs = (np.round(rng.random((3, *frag.shape)) * 8) / 8).astype(np.float32)  # ties within an edge
    if values == "signed zeros":
        affs[affs == 0] = -0.0
    if values == "negative":
        affs[0, 0, 0, 1] = -0.25
    edges = block_edges(frag, affs, frag.shape, quantile=0.25)
    expected = reference(frag, affs, 0.25) if case != "many" else None
    pairs = list(zip(edges.u.tolist(), edges.v.tolist()))
    assert pairs == sorted(pairs) and len(set(pairs)) == len(pairs)
    if expected is None:  # every voxel its own id: each pair touches once
        assert len(pairs) == 2 * 120 * 299 + 2 * 119 * 300 + 120 * 300
        assert (edges.area == 1).all()
        return
    assert sorted(expected) == pairs
    assert edges.area.tolist() == [expected[p][0] for p in pairs]
    np.testing.assert_allclose(edges.aff_sum, [expected[p][1] for p in pairs], rtol=1e-12)
    np.testing.assert_allclose(edges.quantile, [expected[p][2] for p in pairs], rtol=1e-6)
