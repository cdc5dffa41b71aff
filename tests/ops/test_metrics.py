"""emseg.ops.metrics agrees with skimage.metrics; evaluation of volumes on disk, slab by slab."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from skimage.metrics import adapted_rand_error, variation_of_information

from emseg.errors import VolumeShapeError
from emseg.ops.metrics import boundaries, evaluate, evaluate_slabs
from emseg.workflows.label import evaluate_paths


@pytest.fixture(scope="module")
def pair() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    gt = rng.integers(0, 6, size=(6, 20, 24)).repeat(2, axis=1).astype(np.uint64) + 100
    gt[:, :3] = 0  # unlabeled ground truth
    seg = gt.copy()
    seg[gt == 102] = 105  # a merge
    seg[2:, :, :12][seg[2:, :, :12] == 101] = 7  # a split
    seg[:, :, -2:] = 0
    return seg, gt


def test_scores_equal_skimage(pair) -> None:
    seg, gt = pair
    scores = evaluate(seg, gt)
    are, precision, recall = adapted_rand_error(gt, seg)
    split, merge = variation_of_information(gt, seg, ignore_labels=(0,))
    assert scores.adapted_rand_error == pytest.approx(are, rel=1e-12)
    assert (scores.rand_precision, scores.rand_recall) == pytest.approx((precision, recall), rel=1e-12)
    assert (scores.voi_split, scores.voi_merge) == pytest.approx((split, merge), rel=1e-9, abs=1e-12)
    assert scores.voi_split > 0 and scores.voi_merge > 0
    assert scores.pixel_error == pytest.approx(np.mean(boundaries(seg) != boundaries(gt)))
    fg_s, fg_g = seg != 0, gt != 0
    assert scores.iou == pytest.approx((fg_s & fg_g).sum() / (fg_s | fg_g).sum())
    assert scores.dice == pytest.approx(2 * (fg_s & fg_g).sum() / (fg_s.sum() + fg_g.sum()))


def test_slabs_add_up_to_the_whole(pair) -> None:
    seg, gt = pair
    whole = evaluate(seg, gt)
    slabbed = evaluate_slabs((seg[z:z + 2], gt[z:z + 2]) for z in range(0, seg.shape[0], 2))
    assert slabbed.as_dict() == pytest.approx(whole.as_dict())


def test_identical_segmentations_score_perfectly(pair) -> None:
    _, gt = pair
    scores = evaluate(gt, gt)
    assert scores.adapted_rand_error == pytest.approx(0) and scores.voi == pytest.approx(0)
    assert scores.pixel_error == 0 and scores.iou == 1 and scores.dice == 1


def test_real_cremi_labels_vs_a_relabelled_copy(shared_data, tmp_path) -> None:
    gt = tifffile.imread(shared_data / "cremi_b_crop" / "neuron_ids.tif")
    seg = (gt.astype(np.uint64) * 7 + 3) % 1000 + 1  # same partition, other ids
    tifffile.imwrite(tmp_path / "seg.tif", seg.astype(np.uint32))
    scores = evaluate_paths(tmp_path / "seg.tif", shared_data / "cremi_b_crop" / "neuron_ids.tif")
    assert scores.adapted_rand_error == pytest.approx(0, abs=1e-12) and scores.voi == pytest.approx(0, abs=1e-9)


def test_shape_mismatch_is_refused(pair, tmp_path) -> None:
    seg, gt = pair
    with pytest.raises(VolumeShapeError, match="differs from ground truth shape"):
        evaluate(seg[:2], gt)
    tifffile.imwrite(tmp_path / "a.tif", seg[:2].astype(np.uint32))
    tifffile.imwrite(tmp_path / "b.tif", gt.astype(np.uint32))
    with pytest.raises(VolumeShapeError, match="must cover the same voxels"):
        evaluate_paths(tmp_path / "a.tif", tmp_path / "b.tif")
