"""Stitching with more than a million face pairs: the client streams them, never holds them.

The mask is built so that pairs vastly outnumber fragments: each block is three sections, stripes
along x in its first, stripes along y in its last, nothing between.  Across every z-face the
y-stripes of the lower block cross every x-stripe of the upper one, so a face of 1024 x 1024
voxels gives 512 x 512 = 262,144 distinct pairs, 8 faces 2,097,152 pairs (32 MiB as uint64),
from only 9,216 fragments.  The labels must equal cc3d's; the client's peak traced memory
(tracemalloc: numpy buffers included) during the whole run must stay below half of what the
pairs alone take.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from emseg.engine.ledger import Ledger
from emseg.geometry import Roi
from emseg.io import create_volume, mark_complete, open_volume
from emseg.workflows.label import label

BLOCKS = 9
EDGE = 1024


def stripes(edge: int = EDGE, blocks: int = BLOCKS) -> np.ndarray:
    mask = np.zeros((3 * blocks, edge, edge), dtype=np.uint8)
    mask[0::3, :, 0::2] = 1  # first section of each block: stripes along y (one per even x)
    mask[2::3, 0::2, :] = 1  # last section: stripes along x (one per even y)
    return mask


@pytest.mark.slow
def test_two_million_face_pairs_are_streamed_and_labels_equal_cc3d(connection, tmp_path: Path) -> None:
    import cc3d

    mask = stripes()
    pred = tmp_path / "stripes.zarr"
    volume = create_volume(pred, shape=mask.shape, dtype="uint8", chunks=(3, 256, 256), voxel_size=(1, 1, 1))
    volume.write(volume.roi, mask)
    mark_complete(pred)
    out = tmp_path / "labels.zarr"
    tracemalloc.start()  # the session's cluster (2 worker processes): the client's memory is what is traced
    tracemalloc.reset_peak()
    report = label(pred, out, block_size=(3, EDGE, EDGE), client=connection, progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    faces = report.stages[1]
    n_pairs = int(faces.results.column("pairs").sum())
    assert n_pairs == (BLOCKS - 1) * (EDGE // 2) ** 2 >= 1_000_000
    pair_bytes = n_pairs * 16
    print(f"\n{n_pairs} face pairs ({pair_bytes / 2**20:.1f} MiB as uint64); client peak traced memory "
          f"during label(): {peak / 2**20:.1f} MiB")
    assert peak < pair_bytes / 2, f"the client held {peak / 2**20:.1f} MiB for {pair_bytes / 2**20:.1f} MiB of pairs"
    # nothing about the pairs went through the ledger either
    assert Ledger(out, "label-faces").path.exists()
    ledger_bytes = sum(f.stat().st_size for f in Ledger(out, "label-faces").path.rglob("*") if f.is_file())
    assert ledger_bytes < 10_000
    assert report.n_fragments == BLOCKS * EDGE
    labels = open_volume(out).read(Roi.from_shape(mask.shape))
    expected = cc3d.connected_components(mask, connectivity=6)
    assert report.n_segments == int(expected.max()) == (BLOCKS - 1) + EDGE
    # the same partition: one-to-one between our ids and cc3d's on the foreground
    pairs = np.unique(np.stack([labels[mask > 0], expected[mask > 0].astype(np.uint64)], axis=1), axis=0)
    assert len(pairs) == report.n_segments == len(np.unique(pairs[:, 0])) == len(np.unique(pairs[:, 1]))
    assert not labels[mask == 0].any()


@pytest.mark.parametrize("seed", range(6))
def test_streamed_union_find_equals_the_one_shot_one(seed: int) -> None:
    from emseg.ops.stitch import resolve_merges, resolve_merges_streamed

    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 5000))
    pairs = rng.integers(1, n + 1, size=(int(rng.integers(0, 6000)), 2)).astype(np.uint64)
    whole = resolve_merges(pairs, n)
    parts = np.array_split(pairs, int(rng.integers(1, 30)))
    streamed = resolve_merges_streamed(iter(parts), n, batch_pairs=int(rng.integers(1, 700)))
    np.testing.assert_array_equal(streamed.merged_ids, whole.merged_ids)
    np.testing.assert_array_equal(streamed.merged_final, whole.merged_final)
    assert streamed.n_segments == whole.n_segments


def test_streamed_union_find_keeps_64_bit_ids() -> None:
    from emseg.ops.stitch import resolve_merges_streamed

    big = np.uint64(2**63 + 11)
    pairs = [np.array([[big, big + np.uint64(5)]], dtype=np.uint64), np.array([[7, big + np.uint64(5)]], np.uint64)]
    table = resolve_merges_streamed(iter(pairs), 2**64 - 1, batch_pairs=1)
    np.testing.assert_array_equal(table.merged_ids, np.array([big, big + np.uint64(5)], dtype=np.uint64))
    np.testing.assert_array_equal(table.merged_final, np.array([7, 7], dtype=np.uint64))
