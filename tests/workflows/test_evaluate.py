"""emseg.workflows.evaluate / ``emseg evaluate``: the ground-truth definition, threshold sweeps, the PNG curve.

Real files on disk (TIFF and OME-Zarr), real ISBI 2012 / VNC labels, numbers checked against
skimage.metrics computed here section by section.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image
from skimage.measure import label as sk_label
from skimage.metrics import adapted_rand_error, variation_of_information

from emseg.cli import cli
from emseg.errors import ConfigError, VolumeShapeError
from emseg.ops.metrics import detect_gt_kind, instances_from_mask
from emseg.workflows.evaluate import evaluate_paths, evaluate_sweep, find_segmentations, plot_sweep
from tests.conftest import tree_digest

CROP = (slice(16, 20), slice(0, 192), slice(0, 256))  # ISBI 2012 train sections 16-19, a corner


@pytest.fixture(scope="module")
def isbi_gt(shared_data) -> np.ndarray:
    return tifffile.imread(shared_data / "isbi2012" / "train-labels.tif")[CROP]  # 0 = membrane, 255 = interior


def imwrite(path: Path, data: np.ndarray) -> None:
    tifffile.imwrite(path, data, photometric="minisblack")  # (4, y, x) is not RGBA


def cells_of(mask: np.ndarray) -> np.ndarray:
    """The definition, written independently with skimage: 4-connected interior components per section."""
    return np.stack([sk_label(s != 0, connectivity=1) for s in mask]).astype(np.uint64)


def imperfect(cells: np.ndarray, seed: int, merges: int, splits: int) -> np.ndarray:
    """A segmentation of every voxel (membrane included) with merged cell pairs and cells cut in two.

    Ids are the same numbers in every section (1, 2, ...): scored as one volume they would merge
    unrelated cells of different sections; scored per section they must not.
    """
    from skimage.segmentation import expand_labels

    rng = np.random.default_rng(seed)
    seg = np.stack([expand_labels(c, distance=10) for c in cells]).astype(np.uint64)
    for z in range(seg.shape[0]):
        ids = rng.choice(np.unique(seg[z][seg[z] > 0]), size=2 * merges + splits, replace=False)
        for a, b in ids[:2 * merges].reshape(-1, 2):
            seg[z][seg[z] == b] = a
        for c in ids[2 * merges:]:
            ys, xs = np.nonzero(seg[z] == c)
            cut = (seg[z] == c) & (np.arange(seg.shape[2])[None, :] > np.median(xs))
            seg[z][cut] = 10_000 + c
    return seg


def expected(seg: np.ndarray, cells: np.ndarray) -> dict[str, float]:
    """Mean over sections of skimage's scores (ground-truth 0 ignored)."""
    are, split, merge = [], [], []
    for z in range(seg.shape[0]):
        are.append(adapted_rand_error(cells[z], seg[z])[0])
        s, m = variation_of_information(cells[z], seg[z], ignore_labels=(0,))
        split.append(s)
        merge.append(m)
    return {"adapted_rand_error": float(np.mean(are)), "voi_split": float(np.mean(split)),
            "voi_merge": float(np.mean(merge))}


def write_run(path: Path, labels: dict[str, tuple[np.ndarray, float | None]]) -> Path:
    """An emseg-style run output: an OME-Zarr image with one label image per entry (threshold in its status)."""
    from emseg.io import create_labels, create_volume, mark_complete

    first = next(iter(labels.values()))[0]
    image = create_volume(path, shape=first.shape, dtype=np.float32, chunks=(2, 64, 64), voxel_size=(50.0, 4.0, 4.0))
    image.write(image.roi, np.zeros(first.shape, np.float32))
    mark_complete(path)
    for name, (data, threshold) in labels.items():
        volume = create_labels(path, name, chunks=(2, 64, 64))
        volume.write(volume.roi, data.astype(np.uint64))
        extra = {} if threshold is None else {"threshold": threshold}
        mark_complete(path / "labels" / name, **extra)
    return path


def test_isbi_mask_ground_truth_is_scored_per_section(isbi_gt, tmp_path) -> None:
    gt_path = tmp_path / "gt.tif"
    imwrite(gt_path, isbi_gt)
    cells = cells_of(isbi_gt)
    seg = imperfect(cells, seed=1, merges=3, splits=2)
    run = write_run(tmp_path / "run.zarr", {"segments": (seg, None)})
    before = tree_digest(gt_path), tree_digest(run)

    scores = evaluate_paths(run / "labels" / "segments", gt_path)
    want = expected(seg, cells)
    assert scores.adapted_rand_error == pytest.approx(want["adapted_rand_error"], rel=1e-9)
    assert scores.voi_split == pytest.approx(want["voi_split"], rel=1e-9)
    assert scores.voi_merge == pytest.approx(want["voi_merge"], rel=1e-9)
    assert 0.01 < scores.adapted_rand_error < 0.5 and scores.voi_split > 0 and scores.voi_merge > 0
    # the same numbers through the CLI, auto-detected as an interior mask
    result = CliRunner().invoke(cli, ["evaluate", str(run / "labels" / "segments"), str(gt_path), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["gt_kind"] == "interior-mask" and out["mode"] == "section" and len(out["sections"]) == 4
    assert out["adapted_rand_error"] == pytest.approx(want["adapted_rand_error"], rel=1e-9)
    assert [s["adapted_rand_error"] for s in out["sections"]] == pytest.approx(
        [adapted_rand_error(cells[z], seg[z])[0] for z in range(4)], rel=1e-9)
    assert (tree_digest(gt_path), tree_digest(run)) == before  # inputs untouched


def test_perfect_segmentation_scores_zero_only_with_the_definition(isbi_gt, tmp_path) -> None:
    gt_path = tmp_path / "gt.tif"
    imwrite(gt_path, isbi_gt)
    seg_path = tmp_path / "seg.tif"
    imwrite(seg_path, cells_of(isbi_gt).astype(np.uint32))
    scores = evaluate_paths(seg_path, gt_path)
    assert scores.adapted_rand_error == 0 and scores.voi == 0
    # read as instance ids, the mask is one giant cell (255) and the perfect answer looks terrible
    naive = evaluate_paths(seg_path, gt_path, gt_kind="instances")
    assert naive.adapted_rand_error > 0.8
    # 3-D (volume) scoring of a mask: 6-connected components, as skimage labels them
    vol = evaluate_paths(seg_path, gt_path, mode="volume")
    gt3 = sk_label(isbi_gt != 0, connectivity=1)
    seg = cells_of(isbi_gt)
    assert vol.adapted_rand_error == pytest.approx(adapted_rand_error(gt3, seg)[0], rel=1e-9)


def test_membrane_mask_is_detected_and_inverted(shared_data, tmp_path) -> None:
    membranes = tifffile.imread(shared_data / "vnc_sstem" / "membranes.tif")[:3, :200, :200]  # 1 = membrane
    imwrite(tmp_path / "membranes.tif", membranes)
    imwrite(tmp_path / "interior.tif", ((membranes == 0) * 255).astype(np.uint8))
    cells = instances_from_mask(membranes, "membrane-mask", per_section=True)
    seg = imperfect(cells, seed=2, merges=2, splits=2)
    imwrite(tmp_path / "seg.tif", seg.astype(np.uint32))
    report = evaluate_sweep([tmp_path / "seg.tif"], tmp_path / "membranes.tif")
    assert report.gt_kind == "membrane-mask" and report.mode == "section"
    assert report.results[0].scores.adapted_rand_error == pytest.approx(
        expected(seg, cells_of((membranes == 0).astype(np.uint8)))["adapted_rand_error"], rel=1e-9)
    inverted = evaluate_paths(tmp_path / "seg.tif", tmp_path / "interior.tif")
    assert inverted == report.results[0].scores


def test_detect_gt_kind() -> None:
    assert detect_gt_kind({0: 22, 255: 78}) == "interior-mask"
    assert detect_gt_kind({0: 80, 1: 20}) == "membrane-mask"
    assert detect_gt_kind({0: 80, 7: 20}) == "instances"  # not a mask value set: ids
    assert detect_gt_kind({1: 5, 2: 5, 3: 5}) == "instances"
    assert detect_gt_kind({255: 10}) == "instances"


def test_threshold_sweep_of_a_run(isbi_gt, tmp_path) -> None:
    gt_path = tmp_path / "gt.tif"
    imwrite(gt_path, isbi_gt)
    cells = cells_of(isbi_gt)
    # more merging with the threshold; the fragments split cells
    segs = {"fragments": (imperfect(cells, seed=3, merges=0, splits=8), None),
            "segments_0.7": (imperfect(cells, seed=3, merges=8, splits=0), 0.7),
            "segments_0.3": (imperfect(cells, seed=3, merges=0, splits=2), 0.3),
            "segments_0.5": (imperfect(cells, seed=3, merges=2, splits=1), 0.5)}
    run = write_run(tmp_path / "run.zarr", segs)
    found = find_segmentations([run])
    assert [(s.name, s.threshold) for s in found] == [
        ("labels/fragments", None), ("labels/segments_0.3", 0.3), ("labels/segments_0.5", 0.5),
        ("labels/segments_0.7", 0.7)]
    report = evaluate_sweep([run], gt_path)
    for e in report.results:
        want = expected(segs[e.segmentation.path.name][0], cells)
        assert e.scores.voi_merge == pytest.approx(want["voi_merge"], rel=1e-9)
        assert e.scores.adapted_rand_error == pytest.approx(want["adapted_rand_error"], rel=1e-9)
    best = report.best()
    s = best.scores
    assert all(s.adapted_rand_error + s.voi <= e.scores.adapted_rand_error + e.scores.voi for e in report.results)

    png = tmp_path / "curve.png"
    result = CliRunner().invoke(cli, ["evaluate", str(run), str(gt_path), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["threshold", "segmentation", "ARE"]
    assert [ln.split()[0] for ln in lines[2:6]] == ["-", "0.3", "0.5", "0.7"]
    assert f"lowest ARE + VOI: {best.segmentation.name}" in result.output
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 600 and len(np.unique(np.asarray(im.convert("L")))) > 10

    # several label paths instead of a run: one row each, the same scores
    result = CliRunner().invoke(cli, ["evaluate", str(run / "labels" / "segments_0.3"),
                                      str(run / "labels" / "segments_0.7"), str(gt_path), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["results"]
    assert [r["threshold"] for r in rows] == [0.3, 0.7]
    assert rows[1]["voi_merge"] == pytest.approx(report.results[3].scores.voi_merge)


def test_plot_of_label_paths_without_thresholds(isbi_gt, tmp_path) -> None:
    imwrite(tmp_path / "gt.tif", isbi_gt)
    imwrite(tmp_path / "a.tif", cells_of(isbi_gt).astype(np.uint32))
    report = evaluate_sweep([tmp_path / "a.tif"], tmp_path / "gt.tif")
    out = plot_sweep(report, tmp_path / "p.png")
    with Image.open(out) as im:
        assert im.format == "PNG"


def test_bad_input(isbi_gt, tmp_path) -> None:
    imwrite(tmp_path / "gt.tif", isbi_gt)
    imwrite(tmp_path / "small.tif", cells_of(isbi_gt)[:2].astype(np.uint32))
    with pytest.raises(VolumeShapeError, match="must cover the same voxels"):
        evaluate_paths(tmp_path / "small.tif", tmp_path / "gt.tif")
    with pytest.raises(ConfigError, match="gt_kind must be"):
        evaluate_paths(tmp_path / "small.tif", tmp_path / "gt.tif", gt_kind="cells")  # type: ignore[arg-type]
    runner = CliRunner()
    result = runner.invoke(cli, ["evaluate", str(tmp_path / "small.tif"), str(tmp_path / "gt.tif")])
    assert result.exit_code == 1 and result.output.count("Error:") == 1 and "Traceback" not in result.output
    result = runner.invoke(cli, ["evaluate", str(tmp_path / "gt.tif"), str(tmp_path / "gt.tif"), "--gt-kind", "x"])
    assert result.exit_code == 2
    result = runner.invoke(cli, ["evaluate", str(tmp_path / "gt.tif")])  # GT missing
    assert result.exit_code == 2
    # a run output with several label images is not one segmentation
    run = write_run(tmp_path / "run.zarr", {"a": (cells_of(isbi_gt), 0.3), "b": (cells_of(isbi_gt), 0.5)})
    with pytest.raises(ConfigError, match="holds 2 label images"):
        evaluate_paths(run, tmp_path / "gt.tif")


def test_help() -> None:
    result = CliRunner().invoke(cli, ["evaluate", "--help"])
    assert result.exit_code == 0 and "--gt-kind" in result.output and "--plot" in result.output


def test_sweep_of_a_real_agglomeration_run(scheduler, tmp_path) -> None:
    """`emseg agglomerate --thresholds` on a boundary map of Voronoi cells, then `emseg evaluate RUN GT`."""
    from scipy import ndimage
    from scipy.spatial import cKDTree
    from skimage.segmentation import find_boundaries

    from emseg.io import create_volume, mark_complete

    shape = (8, 48, 64)
    rng = np.random.default_rng(5)
    points = rng.uniform(0, 1, size=(40, 3)) * np.asarray(shape)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    gt = (cKDTree(points).query(grid + 0.5)[1].reshape(shape) + 1).astype(np.uint32)
    membrane = find_boundaries(gt, mode="inner").astype(np.float32)
    boundary = np.clip(ndimage.gaussian_filter(membrane, 0.8) * 1.8 + rng.normal(0, 0.1, size=shape), 0, 1)
    pred = create_volume(tmp_path / "pred.zarr", shape=shape, dtype=np.uint8, chunks=(8, 16, 16),
                         voxel_size=(1.0, 1.0, 1.0), channels=1)
    pred.write(pred.roi, np.round(boundary * 255).astype(np.uint8)[None])
    mark_complete(tmp_path / "pred.zarr")
    imwrite(tmp_path / "gt.tif", gt)
    runner = CliRunner()
    result = runner.invoke(cli, ["agglomerate", str(tmp_path / "pred.zarr"), "--block-size", "8,16,32",
                                 "--threshold", "0.5", "--thresholds", "0.2,0.8", "--scheduler", scheduler, "--no-progress"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["evaluate", str(tmp_path / "pred.zarr"), str(tmp_path / "gt.tif"), "--json",
                                 "--plot", str(tmp_path / "curve.png")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["gt_kind"] == "instances" and report["mode"] == "volume"
    rows = report["results"]
    assert [(r["segmentation"], r["threshold"]) for r in rows] == [
        ("labels/fragments", None), ("labels/segments_0.20", 0.2), ("labels/segments", 0.5),
        ("labels/segments_0.80", 0.8)]
    # a higher threshold only merges: segments fall, VOI merge rises, VOI split falls
    swept = rows[1:]
    assert [r["segments"] for r in swept] == sorted((r["segments"] for r in swept), reverse=True)
    assert [r["voi_merge"] for r in swept] == sorted(r["voi_merge"] for r in swept)
    assert [r["voi_split"] for r in swept] == sorted((r["voi_split"] for r in swept), reverse=True)
    assert rows[0]["segments"] > swept[0]["segments"] and swept[0]["voi_split"] > swept[-1]["voi_split"]
    from emseg.io import open_volume

    seg = open_volume(tmp_path / "pred.zarr" / "labels" / "segments").read(pred.roi)
    assert rows[2]["adapted_rand_error"] == pytest.approx(adapted_rand_error(gt, seg)[0], rel=1e-9)
    assert (tmp_path / "curve.png").stat().st_size > 10_000

    # the graph rebuilt with other blocks: the sweep's images of the old graph are no longer the run's
    result = runner.invoke(cli, ["agglomerate", str(tmp_path / "pred.zarr"), "--block-size", "8,32,32",
                                 "--threshold", "0.5", "--overwrite", "--scheduler", scheduler, "--no-progress"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["evaluate", str(tmp_path / "pred.zarr"), str(tmp_path / "gt.tif"), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert [(r["segmentation"], r["threshold"]) for r in rows] == [("labels/fragments", None),
                                                                    ("labels/segments", 0.5)]
    assert not (tmp_path / "pred.zarr" / "labels" / "segments_0.20").exists()  # removed with the old graph
    labels_attrs = json.loads((tmp_path / "pred.zarr" / "labels" / "zarr.json").read_text())["attributes"]
    assert "segments_0.80" not in labels_attrs["ome"]["labels"]


def test_section_mode_for_2d_segmentations_of_3d_ids(shared_data, tmp_path) -> None:
    """CREMI's 3-D neuron ids against a 2-D pipeline's output (ids not linked across sections)."""
    gt = tifffile.imread(shared_data / "cremi_b_crop" / "neuron_ids.tif")[:, :200, :200]
    seg = (gt.astype(np.uint32) + 1000 * np.arange(len(gt), dtype=np.uint32)[:, None, None])  # new ids per section
    imwrite(tmp_path / "gt.tif", gt)
    imwrite(tmp_path / "seg.tif", seg)
    per_section = evaluate_paths(tmp_path / "seg.tif", tmp_path / "gt.tif", mode="section")
    assert per_section.adapted_rand_error == pytest.approx(0, abs=1e-12)
    volume = evaluate_paths(tmp_path / "seg.tif", tmp_path / "gt.tif")  # auto: instances, as one volume
    want = adapted_rand_error(gt.astype(np.int64), seg.astype(np.int64))[0]
    assert volume.adapted_rand_error == pytest.approx(want, rel=1e-9) and volume.adapted_rand_error > 0.1
