"""The bundled models: trained (not random) weights, chosen per voxel size, small enough to ship."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from emseg.models import load_checkpoint
from emseg.models.zoo import BUNDLED_DIR, bundled_models, choose_bundled
from emseg.training.data import affinities_from_instances, affinity_mask
from emseg.training.loop import predict_volume


def test_bundled_package_data_is_small() -> None:
    total = sum(p.stat().st_size for p in BUNDLED_DIR.rglob("*") if p.is_file())
    assert total < 25 * 2**20, f"bundled model data is {total / 2**20:.1f} MiB"


def test_both_models_are_shipped_and_declared() -> None:
    models = {m.name: m for m in bundled_models()}
    assert set(models) == {"sstem2d", "fib3d"}
    assert models["sstem2d"].ndim == 2 and models["sstem2d"].outputs == ("membrane",)
    fib = models["fib3d"]
    assert fib.ndim == 3 and fib.outputs == ("aff_z", "aff_y", "aff_x") and fib.voxel_size_nm == (10.0, 10.0, 10.0)
    assert load_checkpoint(fib.path).config.offsets == ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
    assert all(m.figures for m in models.values())  # the card's figures travel in config.json


@pytest.mark.parametrize(
    ("voxel_size", "name", "warns"),
    [
        ((50.0, 4.0, 4.0), "sstem2d", False),   # ISBI 2012
        ((40.0, 4.0, 4.0), "sstem2d", False),   # CREMI
        ((10.0, 10.0, 10.0), "sstem2d", False),  # gala FIB-SEM: seen at 10 nm, near the 8 nm it runs at
        ((8.0, 8.0, 8.0), "sstem2d", False),     # FIB-SEM: the 2-D model per section, linked in 3-D
        ((12.0, 4.0, 4.0), "sstem2d", False),   # mildly anisotropic at the model's in-plane resolution
        ((50.0, 10.0, 10.0), "sstem2d", False),  # ssTEM at 10 nm in-plane: near 8 nm
        ((50.0, 2.0, 2.0), "sstem2d", False),   # 2 nm sections, downsampled 4x to 8 nm
        ((30.0, 30.0, 30.0), "sstem2d", True),  # far from both 4 and 8 nm (a warning)
        ((1.0, 1.0, 1.0), "sstem2d", True),     # what emseg records when the source had no voxel size
    ],
)
def test_choice_by_voxel_size(voxel_size: tuple[float, float, float], name: str, warns: bool) -> None:
    choice = choose_bundled(voxel_size)
    assert choice.model.name == name
    assert (choice.warning is not None) == warns
    assert name in choice.reason


def test_no_voxel_size_is_the_2d_default_without_warning() -> None:
    choice = choose_bundled(None)
    assert choice.model.name == "sstem2d" and choice.warning is None


def test_predict_plan_picks_and_reports_the_model(make_volume, caplog: pytest.LogCaptureFixture) -> None:
    from emseg.workflows.predict import default_checkpoint, plan_prediction

    iso = make_volume("iso.zarr", shape=(16, 64, 64), voxel_size=(10.0, 10.0, 10.0))
    ssTEM = make_volume("sstem.zarr", shape=(4, 96, 96), voxel_size=(50.0, 4.0, 4.0))
    plan = plan_prediction(iso)
    assert plan.checkpoint == BUNDLED_DIR and plan.outputs == ("membrane",)
    assert "bundled sstem2d" in plan.summary() and "near-isotropic" in plan.summary()
    plan = plan_prediction(ssTEM)
    assert plan.checkpoint == BUNDLED_DIR and "bundled sstem2d" in plan.summary()
    plan = plan_prediction(iso, model="fib3d")  # the 3-D model by its name
    assert plan.checkpoint == BUNDLED_DIR / "fib3d" and plan.outputs == ("aff_z", "aff_y", "aff_x")
    with caplog.at_level(logging.WARNING):
        assert default_checkpoint((30.0, 30.0, 30.0)) == BUNDLED_DIR
    assert "far" in caplog.text


def test_sstem2d_predicts_isbi_membranes(shared_data: Path) -> None:
    """Not random weights: on a held-out ISBI section the membrane probability matches the labels."""
    raw = tifffile.imread(shared_data / "isbi2012" / "train-volume.tif")[16:17, :256, :256]
    membrane = tifffile.imread(shared_data / "isbi2012" / "train-labels.tif")[16:17, :256, :256] == 0
    ckpt = load_checkpoint(choose_bundled((50.0, 4.0, 4.0)).model.path)
    norm = (ckpt.config.normalization.mean, ckpt.config.normalization.std)
    with torch.no_grad():
        prob = torch.sigmoid(predict_volume(ckpt.model, raw, norm, ndim=2))[0].numpy()
    corr = np.corrcoef(prob.ravel(), membrane.ravel())[0, 1]
    assert corr > 0.6, corr
    assert ((prob > 0.5) != membrane).mean() < 0.2


def test_fib3d_predicts_gala_affinities(shared_data: Path) -> None:
    """Not random weights: on the held-out raveler crop the affinities match the ground truth's."""
    raw = tifffile.imread(shared_data / "fib_gala" / "raveler-raw.tif")[:24, :64, :64]
    ids = tifffile.imread(shared_data / "fib_gala" / "raveler-labels.tif")[:24, :64, :64]
    ckpt = load_checkpoint(BUNDLED_DIR / "fib3d")
    norm = (ckpt.config.normalization.mean, ckpt.config.normalization.std)
    with torch.no_grad():
        affs = torch.sigmoid(predict_volume(ckpt.model, raw, norm, ndim=3)).numpy()
    target = affinities_from_instances(ids, 3)
    mask = affinity_mask(ids, 3) > 0
    corr = np.corrcoef(affs[mask], target[mask])[0, 1]
    assert corr > 0.3, corr
    # boundary pairs get lower affinity than pairs inside one cell, on every axis
    for c in range(3):
        inside, across = affs[c][mask[c] & (target[c] == 1)], affs[c][mask[c] & (target[c] == 0)]
        assert inside.mean() > across.mean() + 0.2, (c, inside.mean(), across.mean())
