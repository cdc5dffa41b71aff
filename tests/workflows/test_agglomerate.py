"""Blockwise agglomeration on a real LocalCluster: equal to the whole volume, thresholds, errors, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from skimage.metrics import variation_of_information

from emseg.cli import cli
from emseg.config import AgglomerateOptions
from emseg.errors import ConfigError, GraphNotFoundError, VolumeShapeError
from emseg.io import open_volume, read_status
from emseg.io.edges import read_block_edges
from emseg.ops.affinities import prediction_affinities
from emseg.ops.agglomerate import UnionFind, consecutive_lookup
from emseg.ops.graph import block_edges
from emseg.workflows.agglomerate import agglomerate, build_graph, make_fragments, segment_prediction
from tests.conftest import tree_digest
from tests.support import cells, scheduler_of

SHAPE = (16, 48, 64)


def _read(path: Path) -> np.ndarray:
    volume = open_volume(path)
    return volume.read(volume.roi)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a.ravel(), b.ravel()], axis=1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


@pytest.fixture
def prediction(write_prediction) -> Path:
    _, boundary = cells(SHAPE, 40, seed=2)
    return write_prediction(boundary)


def test_threshold_on_graph_equals_whole_volume_and_each_edge_is_computed_once(prediction, connection) -> None:
    thresholds = (0.3, 0.5, 0.7)
    _, graph, report = segment_prediction(prediction, block_size=(8, 16, 16), threshold=0.5, thresholds=thresholds,
                                          score="mean", progress=False, client=connection)
    frag_path = prediction / "labels" / "fragments"
    fragments = _read(frag_path)
    assert graph.blocks == 2 * 3 * 4 and graph.n_fragments == int(fragments.max())
    # every fragment lies inside one block
    ids = np.unique(fragments)
    assert ids[0] != 0 and np.array_equal(ids, np.arange(1, len(ids) + 1))

    # the whole volume as one block: the same fragments, one region graph, one union-find
    data = open_volume(prediction).read(open_volume(prediction).roi)
    affs = prediction_affinities(data, "boundary")
    whole = block_edges(fragments, affs, fragments.shape)
    stored = [read_block_edges(frag_path, b) for b in range(graph.blocks)]
    u = np.concatenate([s["u"] for s in stored])
    v = np.concatenate([s["v"] for s in stored])
    order = np.lexsort((v, u))
    keys = np.stack([u[order], v[order]], axis=1)
    assert len(np.unique(keys, axis=0)) == len(keys) == len(whole) == graph.n_edges  # each edge exactly once
    np.testing.assert_array_equal(keys, np.stack([whole.u, whole.v], axis=1))
    np.testing.assert_array_equal(np.concatenate([s["area"] for s in stored])[order], whole.area)
    for t in thresholds:
        uf = UnionFind(int(fragments.max()))
        keep = whole.mean_affinity > 1 - t  # score = 1 - mean affinity < t
        uf.union(whole.u[keep], whole.v[keep])
        lookup, n = consecutive_lookup(uf.roots())
        blockwise = _read(report.segments[t])
        np.testing.assert_array_equal(blockwise, lookup[fragments])  # exactly, ids included
        assert report.n_segments[t] == n
        assert read_status(report.segments[t])["threshold"] == t
    assert report.segments[0.5] == prediction / "labels" / "segments"
    assert report.segments[0.3] == prediction / "labels" / "segments_0.30"
    assert report.n_segments[0.3] > report.n_segments[0.5] > report.n_segments[0.7]

    # several thresholds later reuse the graph: no graph block is computed again
    again = agglomerate(frag_path, threshold=0.5, thresholds=(0.6,), score="mean", progress=False, client=connection)
    assert (prediction / "labels" / "segments_0.60").is_dir() and again.n_segments[0.6] <= report.n_segments[0.5]


def test_hierarchical_merging_is_invariant_to_block_size(write_prediction, connection) -> None:
    """Stated tolerance: at the working threshold (0.5 here) the segmentation of blocks down to
    8x16x16 voxels (cells ~25 voxels across, context 8x16x16) is within 0.15 bits VOI (split +
    merge) of the whole volume as one block.  (Per-block fragments cut cells at block faces; at
    low thresholds, before those cuts are merged, the difference is larger.)"""
    gt, boundary = cells(SHAPE, 15, seed=4, blur=0.5)
    results = {}
    for block in ((16, 48, 64), (16, 24, 32), (8, 24, 32), (8, 16, 16)):
        pred = write_prediction(boundary, name=f"pred_{block[0]}_{block[2]}.zarr")
        _, _, report = segment_prediction(pred, block_size=block, threshold=0.5, context=(8, 16, 16),
                                          progress=False, client=connection)
        results[block] = _read(report.labels_path)
    whole = results[(16, 48, 64)]
    split, merge = variation_of_information(gt, whole)
    assert split + merge < 0.3  # the agglomeration finds the cells
    for block, seg in results.items():
        split, merge = variation_of_information(whole, seg)
        assert split + merge < 0.15, (block, split, merge)
    assert not np.array_equal(results[(8, 16, 16)], whole)  # different fragments, same cells


def test_affinity_input_and_2d_mode(write_prediction, connection) -> None:
    gt, boundary = cells((4, 48, 48), 20, seed=6)
    affs = prediction_affinities(boundary, "boundary")
    pred = write_prediction(affs, outputs=("aff_z", "aff_y", "aff_x"))
    _, graph, report = segment_prediction(pred, mode="2d", block_size=(4, 16, 16), threshold=0.5, progress=False,
                                          client=connection)
    assert read_status(prediction_frag := pred / "labels" / "fragments")["graph"]["params"]["kind"] == "affinities"
    seg = _read(report.labels_path)
    fragments = _read(prediction_frag)
    for z in range(seg.shape[0] - 1):  # per section: no segment continues along z
        assert not set(np.unique(seg[z])) & set(np.unique(seg[z + 1]))
    assert len(np.unique(seg)) < len(np.unique(fragments))


def test_2d_mode_default_blocks_hold_whole_sections(write_prediction, connection) -> None:
    """Per-section agglomeration gets in-plane blocks of up to 1024 voxels (the 3-D default, 128 here,
    would cut this 2 x 320 x 320 prediction's sections into 9 blocks each)."""
    _, boundary = cells((2, 320, 320), 30, seed=7)
    pred = write_prediction(boundary, chunks=(2, 64, 64), voxel_size=(50.0, 4.0, 4.0))
    _, graph, _ = segment_prediction(pred, threshold=0.5, progress=False, client=connection)
    status = read_status(pred / "labels" / "fragments")
    assert status["label"]["params"]["mode"] == "2d"
    assert status["label"]["params"]["block"] == [2, 320, 320]
    assert status["graph"]["params"]["block"] == [2, 320, 320]


def test_bad_input_is_one_clear_error(prediction, write_prediction, connection, tmp_path) -> None:
    make_fragments(prediction, block_size=(8, 16, 16), progress=False, client=connection)
    frag_path = prediction / "labels" / "fragments"
    with pytest.raises(GraphNotFoundError, match="no region graph"):
        agglomerate(frag_path, progress=False, client=connection)
    build_graph(prediction, frag_path, progress=False, client=connection)
    for bad in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(ConfigError, match=r"thresholds must lie in \(0, 1\)"):
            agglomerate(frag_path, threshold=0.5, thresholds=(bad,), progress=False, client=connection)
    two = write_prediction(np.zeros((2, 8, 16, 16), np.float32), name="two.zarr", outputs=("aff_y", "aff_x"))
    with pytest.raises(VolumeShapeError, match="at least 3 channels"):
        segment_prediction(two, input_kind="affinities", progress=False, client=connection)

    runner = CliRunner()
    before = tree_digest(prediction)
    cases = [
        ([str(frag_path), "--thresholds", "0.2,1.3"], r"thresholds must lie in \(0, 1\)"),
        ([str(frag_path), "--threshold", "0"], r"thresholds must lie in \(0, 1\)"),
        ([str(two), "--thresholds", "0.5"], r"affinities need at least 3 channels"),
        ([str(prediction / "labels" / "nothing")], r"no such|not found|does not exist"),
    ]
    for args, message in cases:
        with scheduler_of(connection) as address:
            result = runner.invoke(cli, ["agglomerate", *args, "--no-progress", "--scheduler", address])
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("Error: ") and len(result.stderr.splitlines()) == 1, result.stderr
        assert __import__("re").search(message, result.stderr), result.stderr
    assert tree_digest(prediction) == before  # refused runs write nothing


def test_fragments_without_graph_via_cli(prediction, connection) -> None:
    make_fragments(prediction, block_size=(8, 16, 16), progress=False, client=connection)
    with scheduler_of(connection) as address:
        result = CliRunner().invoke(cli, ["agglomerate", str(prediction / "labels" / "fragments"), "--no-progress",
                                          "--scheduler", address])
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and "no region graph" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_cli_help_and_json_run(prediction, connection) -> None:
    with scheduler_of(connection) as address:
        _cli_help_and_json_run(prediction, address)


def _cli_help_and_json_run(prediction: Path, address: str) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["agglomerate", "--help"]).exit_code == 0
    result = runner.invoke(cli, ["agglomerate", str(prediction), "--block-size", "8,24,32", "--thresholds",
                                 "0.4,0.6", "--json", "--no-progress", "--scheduler", address], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert [s["threshold"] for s in report["segments"]] == sorted([0.4, 0.6, AgglomerateOptions().threshold])
    assert all(Path(s["path"]).is_dir() for s in report["segments"])
    # the fragments with their graph: agglomerated again at another threshold, graph reused
    result = runner.invoke(cli, ["agglomerate", str(prediction / "labels" / "fragments"), "--threshold", "0.7",
                                 "--no-progress", "--scheduler", address],
                           catch_exceptions=False)
    assert result.exit_code == 1 and "other parameters" in result.stderr  # labels/segments holds the default
    result = runner.invoke(cli, ["agglomerate", str(prediction), "--threshold", "0.7", "--overwrite",
                                 "--no-progress", "--scheduler", address],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert read_status(prediction / "labels" / "segments")["threshold"] == 0.7


def test_mutex_watershed_fragments_then_agglomeration(write_prediction, connection) -> None:
    from emseg.io import update_status
    from tests.ops.test_agglomerate import OFFSETS, _long_range_affinities

    gt, _ = cells(SHAPE, 15, seed=4, blur=0.5)
    affs = _long_range_affinities(gt, OFFSETS, noise=0.15, seed=1)
    pred = write_prediction(affs, outputs=tuple(f"aff_{i}" for i in range(len(OFFSETS))))
    update_status(pred, offsets=[list(o) for o in OFFSETS])
    fragments, graph, report = segment_prediction(pred, fragments_method="mutex", block_size=(8, 24, 32),
                                                  threshold=0.5, progress=False, client=connection)
    frag = _read(pred / "labels" / "fragments")
    ids = np.unique(frag)
    assert np.array_equal(ids, np.arange(1, fragments.n_segments + 1))
    assert graph.n_fragments == fragments.n_segments
    seg = _read(report.labels_path)
    frag_voi = sum(variation_of_information(gt, frag))
    seg_voi = sum(variation_of_information(gt, seg))
    assert seg_voi < frag_voi  # cells cut at block faces are joined again
    assert seg_voi < 0.3


def test_nearest_neighbour_channels_are_found_by_offset() -> None:
    from emseg.workflows.agglomerate import nearest_channels

    assert nearest_channels(None) == (0, 1, 2)
    assert nearest_channels([(0, 0, -1), (-3, 0, 0), (0, -1, 0), (-1, 0, 0)]) == (3, 2, 0)


def test_links_across_sections_of_an_anisotropic_volume_are_weighted(write_prediction, connection) -> None:
    """Per-section fragments of a serial-section volume: the graph's edges across sections carry the
    affinity weighted by ``section_link_weight``, the edges within a section as predicted; an isotropic
    volume is not weighted."""
    _, boundary = cells(SHAPE, 40, seed=2)
    edges = {}
    for name, voxel_size, weight in (("aniso", (40.0, 4.0, 4.0), 0.5), ("one", (40.0, 4.0, 4.0), 1.0),
                                     ("iso", (8.0, 8.0, 8.0), 0.5)):
        pred = write_prediction(boundary, name=f"{name}.zarr", voxel_size=voxel_size)
        make_fragments(pred, block_size=(8, 16, 16), mode="2d", progress=False, client=connection)
        graph = build_graph(pred, pred / "labels" / "fragments", section_link_weight=weight, score="mean",
                            progress=False, client=connection)
        assert graph.mode == "3d"
        fragments = _read(pred / "labels" / "fragments")
        stored = [read_block_edges(pred / "labels" / "fragments", b) for b in range(graph.blocks)]
        u, v = (np.concatenate([s[k] for s in stored]) for k in ("u", "v"))
        mean = np.concatenate([s["aff_sum"] / s["area"] for s in stored])
        z_of = {int(i): int(np.flatnonzero((fragments == i).any(axis=(1, 2)))[0]) for i in np.unique(fragments) if i}
        across = np.array([z_of[int(a)] != z_of[int(b)] for a, b in zip(u, v)])
        assert across.any() and (~across).any()
        edges[name] = (across, mean)
    (across, weighted), (_, plain), (_, iso) = edges["aniso"], edges["one"], edges["iso"]
    np.testing.assert_allclose(weighted[across], 0.5 * plain[across], rtol=1e-5)
    np.testing.assert_allclose(weighted[~across], plain[~across], rtol=1e-6)
    np.testing.assert_allclose(iso, plain, rtol=1e-6)
