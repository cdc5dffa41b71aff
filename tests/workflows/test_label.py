"""emseg.label on a real LocalCluster: blockwise cc == cc3d of the whole volume, unique consecutive
uint64 ids, no watershed seams, 2D mode, the emseg-segment layout, resume and refusals."""

from __future__ import annotations

from pathlib import Path

import cc3d
import numpy as np
import pytest
import tifffile
from scipy import ndimage

from emseg.errors import ConfigError, OutputExistsError, ResumeMismatchError, SameInputOutputError
from emseg.io import open_volume, read_status
from emseg.ops.metrics import evaluate
from emseg.workflows.label import label
from tests.support import assert_consecutive_uint64, assert_same_partition, blob_mask

SHAPE = (24, 30, 36)


def read_labels(path: Path) -> np.ndarray:
    volume = open_volume(path)
    return volume.read(volume.roi)


@pytest.fixture(scope="module")
def mask() -> np.ndarray:
    return blob_mask(SHAPE, seed=7)


@pytest.mark.parametrize("block", [(8, 8, 8), (5, 16, 7), (24, 11, 36)])
@pytest.mark.parametrize("connectivity", [6, 26])
def test_cc_equals_cc3d_on_the_whole_volume(connection, write_zarr, tmp_path, mask, block, connectivity) -> None:
    # a boundary probability map: foreground (interior) is p < 0.5
    pred = write_zarr(np.where(mask, 40, 220).astype(np.uint8)[None])
    report = label(pred, tmp_path / "labels.zarr", connectivity=connectivity, block_size=block, client=connection,
                   progress=False)
    labels = read_labels(report.labels_path)
    expected, n = cc3d.connected_components(mask, connectivity=connectivity, return_N=True)
    assert_same_partition(labels, expected)
    assert report.n_segments == n
    assert_consecutive_uint64(labels, n)
    assert report.n_fragments > n > 0 and report.blocks > 1


@pytest.mark.parametrize(("faces_on_client", "tables_inline"), [(True, True), (False, False), (False, True)])
def test_cc_stitching_paths_equal_cc3d(connection, write_zarr, tmp_path, mask, monkeypatch, faces_on_client,
                                       tables_inline) -> None:
    """Faces matched on the client's threads or on the cluster; tables sent with the tasks or stored."""
    import importlib

    from emseg.engine.scratch import scratch_path

    module = importlib.import_module("emseg.workflows.label")
    monkeypatch.setattr(module, "CLIENT_FACE_VOXELS", 1 << 40 if faces_on_client else 0)
    monkeypatch.setattr(module, "INLINE_TABLE_BYTES", 1 << 40 if tables_inline else 0)
    pred = write_zarr(mask.astype(np.uint8))
    opened = module._volume.cache_info().misses  # face arrays the client itself opened
    report = label(pred, tmp_path / "labels.zarr", connectivity=26, block_size=(5, 16, 7), keep_fragments=True,
                   client=connection, progress=False)
    assert (module._volume.cache_info().misses > opened) == faces_on_client
    assert scratch_path(report.labels_path, "offsets").exists() != tables_inline
    expected, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
    labels = read_labels(report.labels_path)
    assert_same_partition(labels, expected)
    assert_consecutive_uint64(labels, n)




def test_unique_pairs_equals_numpy_row_unique() -> None:
    from emseg.ops.stitch import unique_pairs

    rng = np.random.default_rng(3)
    for low, span in [(1, 50), (2**40, 3000), (1, 2**40), (2**64 - 10, 10)]:
        pairs = (rng.integers(0, span, size=(5000, 2), dtype=np.uint64) + np.uint64(low)).astype(np.uint64)
        rows, counts = np.unique(pairs, axis=0, return_counts=True)
        got, got_counts = unique_pairs(pairs, counts=True)
        assert got.dtype == np.uint64 and np.array_equal(got, rows) and np.array_equal(got_counts, counts)
        assert np.array_equal(unique_pairs(pairs), rows)
    assert unique_pairs(np.zeros((0, 2), dtype=np.uint64)).shape == (0, 2)


@pytest.mark.parametrize("connectivity", [6, 26])
def test_cc_equals_cc3d_on_real_isbi_membranes(connection, write_zarr, tmp_path, shared_data, connectivity) -> None:
    interior = tifffile.imread(shared_data / "isbi2012" / "train-labels.tif")[:, :160, :200]  # 255 = interior
    pred = write_zarr(interior, chunks=(4, 32, 40))  # uint8 (z, y, x) mask: foreground = nonzero
    report = label(pred, tmp_path / "labels.zarr", connectivity=connectivity, block_size=(4, 64, 40),
                   client=connection, progress=False)
    expected, n = cc3d.connected_components(interior != 0, connectivity=connectivity, return_N=True)
    labels = read_labels(report.labels_path)
    assert_same_partition(labels, expected)
    assert_consecutive_uint64(labels, n)


def test_cc_equals_cc3d_on_real_fib_labels(connection, write_zarr, tmp_path, shared_data) -> None:
    gt = tifffile.imread(shared_data / "fib_gala" / "train-labels.tif")
    pred = write_zarr((gt == 0).astype(np.float32), chunks=(16, 32, 32))  # float boundary map
    report = label(pred, tmp_path / "labels.zarr", connectivity=26, block_size=(16, 32, 64), client=connection,
                   progress=False)
    expected, n = cc3d.connected_components(gt != 0, connectivity=26, return_N=True)
    assert_same_partition(read_labels(report.labels_path), expected)
    assert report.n_segments == n


def test_cc_2d_labels_each_section(connection, write_zarr, tmp_path, mask) -> None:
    pred = write_zarr(mask.astype(np.uint8), chunks=(4, 8, 8))
    report = label(pred, tmp_path / "labels.zarr", connectivity=26, mode="2d", block_size=(4, 8, 16),
                   client=connection, progress=False)
    labels = read_labels(report.labels_path)
    expected = np.zeros(SHAPE, dtype=np.uint64)
    for z in range(SHAPE[0]):
        section, n = cc3d.connected_components(mask[z], connectivity=8, return_N=True)
        expected[z] = np.where(section > 0, section.astype(np.uint64) + expected.max(), 0)
    assert_same_partition(labels, expected)
    assert_consecutive_uint64(labels, report.n_segments)


def cells(shape, n_cells: int, seed: int, membrane: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Voronoi cells (ground truth) and a boundary map: 1 on a thin membrane between cells, 0 inside."""
    rng = np.random.default_rng(seed)
    points = rng.uniform(0, 1, size=(n_cells, 3)) * np.array(shape)
    grid = np.stack(np.meshgrid(*(np.arange(s) + 0.5 for s in shape), indexing="ij"), axis=-1)
    gt = np.argmin(((grid[..., None, :] - points) ** 2).sum(-1), axis=-1).astype(np.uint64) + 1
    edges = np.zeros(shape, dtype=bool)
    for axis in range(3):
        diff = np.diff(gt, axis=axis) != 0
        lo = [slice(None)] * 3
        lo[axis] = slice(0, -1)
        edges[tuple(lo)] |= diff
    boundary = ndimage.binary_dilation(edges, iterations=membrane - 1) if membrane > 1 else edges
    return gt, boundary.astype(np.float32)


def seams(labels: np.ndarray, gt: np.ndarray, interior: np.ndarray, block) -> list[tuple[int, int]]:
    """Pairs of segments inside one ground-truth cell that meet mostly across block faces.

    Over-segmentation inside a block (two fragments of a cell split by the watershed) meets within
    blocks; a seam is a split whose contact surface lies on the faces between blocks.
    """
    found: dict[tuple[int, int], list[int]] = {}
    for axis in range(3):
        lo = [slice(None)] * 3
        up = [slice(None)] * 3
        lo[axis], up[axis] = slice(0, -1), slice(1, None)
        a, b = labels[tuple(lo)], labels[tuple(up)]
        keep = (a != b) & (gt[tuple(lo)] == gt[tuple(up)]) & interior[tuple(lo)] & interior[tuple(up)]
        position = np.nonzero(keep)[axis] + 1  # index of the upper voxel along the axis
        on_face = position % block[axis] == 0
        for s1, s2, face in zip(a[keep], b[keep], on_face):
            counts = found.setdefault((min(int(s1), int(s2)), max(int(s1), int(s2))), [0, 0])
            counts[0 if face else 1] += 1
    return [pair for pair, (face, inner) in found.items() if face >= 4 and face >= inner]


@pytest.mark.parametrize(("noise", "seeds", "sigma", "min_distance", "max_error"), [
    (0.0, "minima", 0.0, 2, 1e-9),  # one low-boundary plateau per cell: the exact partition
    (0.1, "minima", 2.0, 3, 0.01),
    (0.1, "distance", 0.0, 2, 0.01),
])
def test_watershed_has_no_seams_at_block_faces(connection, write_zarr, tmp_path, noise, seeds, sigma, min_distance,
                                               max_error) -> None:
    shape, block = (32, 40, 40), (8, 10, 10)  # 4 x 4 x 4 blocks; 10 cells of ~20 voxels cross many faces
    gt, boundary = cells(shape, 10, seed=3)
    pred = boundary * (1 - noise) + np.random.default_rng(0).uniform(0, noise, shape)
    path = write_zarr(pred.astype(np.float32)[None], chunks=(8, 10, 10))
    report = label(path, tmp_path / "ws.zarr", method="watershed", seeds=seeds, sigma=sigma,
                   min_distance=min_distance, min_size=30, block_size=block, client=connection, progress=False)
    labels = read_labels(report.labels_path)
    interior = boundary < 0.5
    assert seams(labels, gt, interior, block) == []
    assert_consecutive_uint64(labels, report.n_segments)
    scores = evaluate(labels * interior, gt * interior)
    assert scores.voi_merge < 1e-9  # no cell merged with another through its membrane
    assert scores.adapted_rand_error <= max_error
    if noise == 0:
        assert report.n_segments == 10


def test_watershed_2d_mode_never_joins_sections(connection, write_zarr, tmp_path) -> None:
    gt, boundary = cells((6, 40, 40), 6, seed=5)
    pred = write_zarr((boundary * 255).astype(np.uint8)[None], chunks=(6, 10, 10))
    report = label(pred, tmp_path / "ws2d.zarr", method="watershed", mode="2d", seeds="minima",
                   block_size=(6, 10, 10), client=connection, progress=False)
    labels = read_labels(report.labels_path)
    for z in range(1, 6):
        assert not set(np.unique(labels[z])) & set(np.unique(labels[z - 1]))
    interior = boundary < 0.5
    assert seams(labels, gt, interior, (6, 10, 10)) == []


def test_segment_layout_resume_and_refusals(connection, write_zarr, tmp_path, mask) -> None:
    pred = write_zarr(np.where(mask, 0, 255).astype(np.uint8)[None], chunks=(8, 8, 8))
    first = label(pred, pred, block_size=8, client=connection, progress=False)  # `emseg segment` layout
    assert first.labels_path == pred / "labels" / "segments"
    volume = open_volume(pred / "labels" / "segments")
    assert volume.dtype == np.uint64 and volume.path == pred / "labels" / "segments" / "0"
    assert read_status(first.labels_path)["status"] == "complete"
    assert not (first.labels_path / "emseg_state" / "scratch").exists()
    again = label(pred, pred, block_size=8, client=connection, progress=False)
    assert sum(stage.computed for stage in again.stages) == 0 and again.n_segments == first.n_segments
    with pytest.raises(ResumeMismatchError, match=r"differs in: connectivity\); pass --overwrite"):
        label(pred, pred, block_size=8, connectivity=26, client=connection, progress=False)
    redo = label(pred, pred, block_size=8, connectivity=26, overwrite=True, client=connection, progress=False)
    assert redo.stages[0].computed == redo.blocks


def test_cc_workers_reuse_their_fragments_then_drop_them_and_an_interrupted_run_resumes(connection, write_zarr,
                                                                                        tmp_path, mask) -> None:
    """One run checked for fragment reuse, then interrupted (its records half forgotten) and resumed."""
    import importlib

    from emseg.engine.ledger import Ledger

    module = importlib.import_module("emseg.workflows.label")
    pred = write_zarr(mask.astype(np.uint8))
    out = tmp_path / "labels.zarr"
    done = label(pred, out, block_size=8, client=connection, progress=False)
    # 60 blocks on 2 workers: some stage-3 blocks land on the worker that labelled them in stage 1
    assert done.stages[-1].results.column("reused").sum() > 0
    assert_same_partition(read_labels(done.labels_path), cc3d.connected_components(mask, connectivity=6))

    kept = connection.client.run(lambda: importlib.import_module("emseg.workflows.label")._FRAGMENTS.nbytes)
    assert len(kept) == 2 and sum(kept.values()) == 0  # dropped when the run ended
    assert module._FRAGMENTS.nbytes == 0  # the client keeps none (it is no worker)

    # forget the last stage of half the blocks and mark the output incomplete, as a killed run leaves it
    ledger = Ledger(out, "label-relabel")
    import zarr

    markers = zarr.open_array(str(ledger.path), mode="r+")
    markers[: done.blocks // 2] = ""
    zarr.open_group(str(out), mode="a").attrs["emseg"] = {**read_status(out), "status": "incomplete"}
    with pytest.raises(Exception, match="half-written"):
        open_volume(out)
    resumed = label(pred, out, block_size=8, client=connection, progress=False)
    assert resumed.stages[-1].computed == done.blocks // 2 and resumed.stages[0].computed == 0
    assert_same_partition(read_labels(out), cc3d.connected_components(mask, connectivity=6))


def test_refusals(connection, write_zarr, tmp_path, mask) -> None:
    pred = write_zarr(mask.astype(np.uint8))
    with pytest.raises(ConfigError, match="method must be one of"):
        label(pred, tmp_path / "o.zarr", method="agglomerate", client=connection)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="connectivity must be one of"):
        label(pred, tmp_path / "o.zarr", connectivity=8, client=connection)
    with pytest.raises(SameInputOutputError, match="would overwrite the input"):
        label(pred, pred / "0", client=connection)
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputExistsError, match="not an emseg label output; pass --overwrite"):
        label(pred, tmp_path / "taken", client=connection)


def test_cc_default_blocks_are_256_and_larger_than_watershed_blocks(connection, write_zarr, tmp_path) -> None:
    """cc has no halo: its default block (~256 per axis) holds 4x the in-plane area of watershed's (~128)."""
    from emseg.workflows.label import DEFAULT_BLOCK, default_block_shape

    mask = np.zeros((8, 512, 512), dtype=np.uint8)
    mask[:, 100:400, 100:400] = 255
    pred = write_zarr(mask, chunks=(8, 64, 64))
    report = label(pred, tmp_path / "labels.zarr", method="cc", client=connection, progress=False)
    assert report.block_shape == (8, 256, 256) and report.blocks == 4 and report.n_segments == 1
    assert default_block_shape(mask.shape, (8, 64, 64), DEFAULT_BLOCK)[1:] == (128, 128)  # watershed, clipped later
