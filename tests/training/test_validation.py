"""Validation predicts through emseg.ops.inference (as ``emseg predict``) and scores with emseg.ops.metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage

from emseg.errors import ConfigError
from emseg.geometry import Roi
from emseg.io import create_volume
from emseg.models import build, load_checkpoint
from emseg.ops.inference import predict_array, predict_block
from emseg.ops.metrics import evaluate_sections, instances_from_mask, mean_scores
from emseg.ops.tiling import make_tiling
from emseg.training import membrane_scores, predict_volume, segments_from_membrane
from emseg.training.validation import validation_tiling


@pytest.mark.parametrize(("ndim", "padding", "shape"), [(2, "valid", (3, 70, 90)), (3, "same", (20, 40, 36))])
def test_predict_array_equals_predict_block_on_a_mirrored_volume(tmp_path: Path, ndim: int, padding: str,
                                                                   shape: tuple[int, int, int]) -> None:
    """In-memory mirroring = ``Volume.read(pad="reflect")``, what emseg predict's workers read."""
    torch.manual_seed(0)
    model = build("unet", ndim=ndim, in_channels=1, out_channels=2, base_channels=2, depth=2, padding=padding).eval()
    raw = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    volume = create_volume(tmp_path / "raw.zarr", shape=shape, dtype=np.uint8, chunks=(4, 32, 32), voxel_size=(1.0, 1.0, 1.0))
    volume.write(Roi((0, 0, 0), shape), raw)
    tiling = make_tiling(model, shape, tile_shape=(1, 32, 32) if ndim == 2 else (8, 16, 16))
    whole = Roi((0, 0, 0), shape)
    read = tiling.read_roi(whole)
    assert not Roi((0, 0, 0), shape).contains(read)  # the tiles reach past the borders: mirroring is exercised
    expected = predict_block(model, volume.read(read, pad="reflect"), raw_roi=read, write_roi=whole, tiling=tiling,
                             mean=0.4, std=0.2)
    got = predict_array(model, raw, tiling=tiling, mean=0.4, std=0.2)
    np.testing.assert_array_equal(got, expected)


def test_predict_volume_tta_averages_the_flipped_probabilities() -> None:
    """``predict_volume(tta=True)`` (what benchmarks/pixel_error.py --tta scores): the mean over the 4 in-plane
    flips of each flipped volume's sigmoid, flipped back; not the mean of logits, nor one pass."""
    torch.manual_seed(0)
    model = build("unet", ndim=2, in_channels=1, out_channels=1, base_channels=2, depth=2, padding="valid").eval()
    # one tile exactly (a multiple of the pooling): flipping a tile is flipping the volume.  On a larger
    # volume they differ, as a valid U-Net's output depends on the pooling grid's phase.
    raw = np.random.default_rng(1).integers(0, 256, (2, 72, 88), dtype=np.uint8)
    norm = (0.4, 0.2)
    flips = [(), (1,), (2,), (1, 2)]  # volume axes (y, x) = tensor dims 2, 3 of the (b, c, y, x) batch
    expected = np.mean([np.flip(torch.sigmoid(predict_volume(model, np.flip(raw, f).copy(), norm)).numpy(), [a + 1 for a in f])
                        for f in flips], axis=0)
    got = predict_volume(model, raw, norm, activation="sigmoid", tta=True).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    plain = torch.sigmoid(predict_volume(model, raw, norm)).numpy()
    assert np.abs(got - plain).max() > 1e-3  # the flips change the result: the check above can fail


def test_validation_prediction_matches_one_pass_per_section(shared_data: Path) -> None:
    """The bundled valid 2-D U-Net on ISBI sections larger than a CPU tile: the overlap-tile prediction of
    validation equals one mirrored whole-section pass, with the checkpoint's normalisation."""
    from emseg.workflows.predict import BUNDLED

    ckpt = load_checkpoint(BUNDLED)
    model = ckpt.model
    raw = tifffile.imread(shared_data / "isbi2012" / "train-volume.tif")[16:18, :, :]  # 512^2 and its 520 crop below
    raw = np.concatenate([raw, raw[:, :8]], axis=1)[:, :520, :300]  # 520 > the 512 CPU tile: two tiles along y
    mean, std = ckpt.config.normalization.mean, ckpt.config.normalization.std
    model.train()
    logits = predict_volume(model, raw, (mean, std), ndim=2)
    assert model.training  # left in the mode it was in
    assert validation_tiling(model, raw.shape, "cpu").grid_shape == (2, 2, 1)
    model.eval()
    context = tuple(model.context)
    for z in range(raw.shape[0]):
        want = model.valid_input_shape(tuple(s + 2 * c for s, c in zip(raw.shape[1:], context)))
        pad = [(c, w - s - c) for s, c, w in zip(raw.shape[1:], context, want)]
        x = (np.pad(raw[z], pad, mode="reflect").astype(np.float32) / 255 - mean) / std
        with torch.no_grad():
            one_pass = model(torch.from_numpy(x)[None, None])[0, :, : raw.shape[1], : raw.shape[2]]
        np.testing.assert_allclose(logits[:, z].numpy(), one_pass.numpy(), atol=2e-3)
    with pytest.raises(ConfigError, match="2-D model cannot predict with ndim=3"):
        predict_volume(model, raw, (mean, std), ndim=3)


def test_rand_error_is_emseg_evaluates_on_isbi_masks(shared_data: Path) -> None:
    """Per-section scores against the 4-connected interior components of the ISBI mask, as emseg evaluate."""
    labels = tifffile.imread(shared_data / "isbi2012" / "train-labels.tif")[16:18, :128, :128]
    truth = instances_from_mask(labels, "interior-mask", per_section=True)
    membrane = labels == 0
    prob = ndimage.gaussian_filter(membrane.astype(np.float32), (0, 3, 3))  # blurred: thin membranes open
    s = membrane_scores(prob, membrane.astype(np.uint8), truth, 0.6)
    segments = segments_from_membrane(prob, 0.6)
    expected = mean_scores(evaluate_sections(segments, truth)).adapted_rand_error
    assert s.adapted_rand_error == pytest.approx(expected) and 0.05 < s.adapted_rand_error < 1
    assert s.pixel_error == pytest.approx(float(((prob > 0.6) != membrane).mean()))
    # skimage's adapted Rand error of each section agrees (the convention emseg.ops.metrics follows)
    from skimage.metrics import adapted_rand_error

    per = [adapted_rand_error(truth[z].astype(np.int64), segments[z].astype(np.int64))[0] for z in range(2)]
    assert s.adapted_rand_error == pytest.approx(float(np.mean(per)), abs=1e-9)
    assert segments.min() > 0  # membrane pixels are given to the nearest segment


def test_3d_validation_scores_instances_as_a_volume_and_masks_per_section(shared_data: Path, tmp_path: Path) -> None:
    """3-D membrane model: instance labels are scored as one volume, mask labels per section (emseg evaluate)."""
    from emseg.ops.metrics import evaluate
    from emseg.training import DataSource, TrainConfig, validate
    from emseg.training.data import load_source

    raw = tifffile.imread(shared_data / "fib_gala" / "train-raw.tif")[:12, :40, :40]
    ids = tifffile.imread(shared_data / "fib_gala" / "train-labels.tif")[:12, :40, :40]
    mask = np.where(tifffile.imread(shared_data / "isbi2012" / "train-labels.tif")[:12, :40, :40] > 0, 255, 0).astype(np.uint8)
    for name, array in (("raw", raw), ("ids", ids), ("mask", mask)):
        tifffile.imwrite(tmp_path / f"{name}.tif", np.ascontiguousarray(array))
    torch.manual_seed(0)
    model = build("unet", ndim=3, in_channels=1, out_channels=1, base_channels=2, depth=1, padding="same")
    norm = (0.5, 0.2)
    for labels, kind in (("ids", "instances"), ("mask", "interior-mask")):
        cfg = TrainConfig(train=[DataSource(raw=str(tmp_path / "raw.tif"), labels=str(tmp_path / f"{labels}.tif"))],
                          val=[DataSource(raw=str(tmp_path / "raw.tif"), labels=str(tmp_path / f"{labels}.tif"), labels_kind=kind)],
                          ndim=3, patch_shape=(8, 16, 16), padding="same", base_channels=2, depth=1,
                          output=str(tmp_path / "out"))
        vol = load_source(cfg.val[0], cfg)
        scores = validate(model, [vol], cfg, norm)
        assert set(scores) == {"loss", "dice", "iou", "pixel_error", "adapted_rand_error"}
        prob = torch.sigmoid(predict_volume(model, vol.raw, norm))[0].numpy()
        if kind == "instances":
            expected = evaluate(segments_from_membrane(prob, per_section=False), vol.instances).adapted_rand_error
        else:
            truth = instances_from_mask(mask, "interior-mask", per_section=True)
            expected = mean_scores(evaluate_sections(segments_from_membrane(prob), truth)).adapted_rand_error
        assert scores["adapted_rand_error"] == pytest.approx(expected), kind
        assert np.isfinite(scores["adapted_rand_error"]) and 0 <= scores["pixel_error"] <= 1
