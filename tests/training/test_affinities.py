"""The affinity target, its loss mask, the masked losses, 3D isotropic augmentation and bf16 training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner

from emseg.cli import cli
from emseg.errors import ConfigError
from emseg.training import augment
from emseg.training.config import TrainConfig, load_train_config
from emseg.training.data import affinities_from_instances, affinity_mask, nearest_offsets, targets_from_instances
from emseg.training.losses import bce_dice_loss, masked_bce, total_loss


def test_nearest_affinities_follow_the_waterz_convention() -> None:
    # aff_d[p] is the affinity of p and p - e_d: 1 for the same non-zero id, else 0
    inst = np.array([[[1, 1, 2, 2], [1, 1, 0, 2]], [[1, 3, 3, 2], [1, 1, 0, 0]]], dtype=np.uint32)  # (2, 2, 4)
    affs = affinities_from_instances(inst, 3)
    assert affs.shape == (3, 2, 2, 4) and affs.dtype == np.float32
    z, y, x = affs
    np.testing.assert_array_equal(z[0], 0)  # no z-1 neighbour
    np.testing.assert_array_equal(z[1], [[1, 0, 0, 1], [1, 1, 0, 0]])
    np.testing.assert_array_equal(y[:, 0], 0)
    np.testing.assert_array_equal(y[:, 1], [[1, 1, 0, 1], [1, 0, 0, 0]])
    np.testing.assert_array_equal(x[..., 0], 0)
    np.testing.assert_array_equal(x[0, 0], [0, 1, 0, 1])
    np.testing.assert_array_equal(x[1, 0], [0, 0, 1, 0])
    # the generic target function gives the same with the default (nearest) offsets
    np.testing.assert_array_equal(targets_from_instances(inst, "affinities", 3), affs)
    assert nearest_offsets(3) == ((-1, 0, 0), (0, -1, 0), (0, 0, -1))


def test_mask_leaves_out_unknown_pairs_only() -> None:
    inst = np.array([[[0, 0, 5, 5, 0, 7]]], dtype=np.uint32)  # one row along x
    mask = affinity_mask(inst, 3)
    # x: pair (0,0) unknown, (0,5) boundary -> kept with affinity 0, (5,5) kept, (5,0) kept, (0,7) kept; x=0 has no partner
    np.testing.assert_array_equal(mask[2, 0, 0], [0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(affinities_from_instances(inst, 3)[2, 0, 0], [0, 0, 0, 1, 0, 0])
    # z and y: no partner inside a 1 x 1 x 6 array
    assert mask[0].sum() == 0 and mask[1].sum() == 0


def test_long_range_offsets() -> None:
    inst = np.zeros((1, 1, 8), np.uint32)
    inst[..., :5] = 3
    inst[..., 5:] = 4
    affs = affinities_from_instances(inst, 3, [(0, 0, -3)])
    np.testing.assert_array_equal(affs[0, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(affinity_mask(inst, 3, [(0, 0, -3)])[0, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="must have 3 values"):
        affinities_from_instances(inst, 3, [(0, -3)])


def test_masked_losses_ignore_masked_voxels() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, 6, generator=gen)
    target = (torch.rand(2, 3, 4, 5, 6, generator=gen) > 0.5).float()
    mask = (torch.rand(2, 3, 4, 5, 6, generator=gen) > 0.3).float()
    changed = logits + 100.0 * (1 - mask) * torch.randn(logits.shape, generator=gen)
    for fn in (masked_bce, bce_dice_loss):
        assert torch.allclose(fn(logits, target, mask), fn(changed, target, mask), atol=1e-6)
        assert not torch.allclose(fn(logits, target), fn(changed, target))
    # a mask of ones is the unmasked loss
    ones = torch.ones_like(mask)
    assert torch.allclose(masked_bce(logits, target, ones), masked_bce(logits, target), atol=1e-6)
    assert torch.allclose(total_loss("bce-dice", logits, target, ones), bce_dice_loss(logits, target), atol=1e-6)


def test_transposes_and_3d_elastic_keep_labels_aligned() -> None:
    rng = np.random.default_rng(1)
    inst = np.zeros((12, 12, 12), np.uint32)
    inst[:, :, 6:] = 2
    inst[:, :, :6] = 1
    raw = (inst * 100).astype(np.float32)
    seen = set()
    for seed in range(12):
        r, i = augment.transpose_axes([raw, inst], np.random.default_rng(seed))
        np.testing.assert_array_equal(r, (i * 100).astype(np.float32))
        seen.add(int(np.argmax([np.any(np.diff(i.astype(int), axis=a)) for a in range(3)])))
    assert seen == {0, 1, 2}  # the boundary plane was seen in every orientation
    field = augment.elastic_field((12, 12, 12), rng, sigma=2.0, grid=3)
    assert field.shape == (3, 12, 12, 12) and np.abs(field).max() > 0.1
    r = augment.deform(raw, field, order=0)
    i = augment.deform(inst, field, order=0)
    np.testing.assert_array_equal(r, (i * 100).astype(np.float32))
    assert set(np.unique(i)) == {1, 2}


def test_config_defaults_and_checks() -> None:
    cfg = TrainConfig(train=[{"raw": "a.tif", "labels": "b.tif"}], output="x")
    assert cfg.precision == "auto" and cfg.channels_last is False  # the measured-fastest setting per machine
    aff = TrainConfig(train=[{"raw": "a.tif", "labels": "b.tif"}], output="x", ndim=3, patch_shape=(8, 8, 8),
                      target="affinities", loss="bce-dice", affinity_offsets=[(-1, 0, 0), (0, 0, -4)])
    assert aff.out_channels == 2
    with pytest.raises(ConfigError, match="affinity offset"):
        load_train_config(None, {"train": [{"raw": "a", "labels": "b"}], "output": "x", "ndim": 3,
                                 "patch_shape": (8, 8, 8), "target": "affinities", "loss": "bce",
                                 "affinity_offsets": [(0, 0, 0)]})
    with pytest.raises(ConfigError, match="select_by"):
        load_train_config(None, {"train": [{"raw": "a", "labels": "b"}], "output": "x", "target": "affinities",
                                 "loss": "bce", "select_by": "adapted_rand_error"})


@pytest.fixture(scope="module")
def fib_crop(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 16 x 32 x 32 crop of the gala FIB-SEM train volume (instance labels, 0 = boundary)."""
    out = tmp_path_factory.mktemp("fib")
    raw = tifffile.imread(shared_data / "fib_gala" / "train-raw.tif")[:16, :32, :32]
    labels = tifffile.imread(shared_data / "fib_gala" / "train-labels.tif")[:16, :32, :32]
    tifffile.imwrite(out / "raw.tif", np.ascontiguousarray(raw))
    tifffile.imwrite(out / "labels.tif", np.ascontiguousarray(labels))
    return {"raw": out / "raw.tif", "labels": out / "labels.tif"}


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_3d_affinity_training_writes_a_declared_checkpoint(fib_crop: dict[str, Path], tmp_path: Path, precision: str) -> None:
    out = tmp_path / "ckpt"
    result = CliRunner().invoke(cli, [
        "train", "--raw", str(fib_crop["raw"]), "--labels", str(fib_crop["labels"]), "--labels-kind", "instances",
        "--ndim", "3", "--isotropic", "--target", "affinities", "--loss", "bce-dice", "--base-channels", "2",
        "--depth", "1", "--padding", "same", "--patch-shape", "8,8,8", "--batch-size", "2", "--steps", "3",
        "--elastic-sigma", "1", "--precision", precision, "--affinity-offsets", "-1,0,0;0,-1,0;0,0,-1;0,0,-3",
        "--threads", "1", "--voxel-size", "10", "10", "10", "-o", str(out)])
    assert result.exit_code == 0, result.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["outputs"] == ["aff_z", "aff_y", "aff_x", "aff_z0_y0_x3"]
    assert cfg["offsets"] == [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, 0, -3]]
    assert cfg["model"]["ndim"] == 3 and cfg["voxel_size_nm"] == [10.0, 10.0, 10.0]
    assert cfg["provenance"]["train_config"]["precision"] == precision
    from emseg.models import load_checkpoint

    model = load_checkpoint(out).model
    assert all(p.dtype == torch.float32 for p in model.parameters())  # bf16 is autocast only


def test_init_warm_starts_and_refuses_other_architectures(fib_crop: dict[str, Path], tmp_path: Path) -> None:
    base = ["train", "--raw", str(fib_crop["raw"]), "--labels", str(fib_crop["labels"]), "--labels-kind", "instances",
            "--ndim", "3", "--target", "affinities", "--loss", "bce", "--padding", "same", "--patch-shape", "8,8,8",
            "--batch-size", "1", "--steps", "1", "--threads", "1", "--no-augment"]
    first = tmp_path / "a"
    assert CliRunner().invoke(cli, [*base, "--base-channels", "2", "--depth", "1", "-o", str(first)]).exit_code == 0
    # --steps 1 with lr 1e-12: the warm-started weights stay (almost) those of --init; on other sections the
    # run keeps the normalization the weights were trained with
    second = tmp_path / "b"
    other = [str(fib_crop["raw"]) + "[8:16]" if a == str(fib_crop["raw"]) else
             str(fib_crop["labels"]) + "[8:16]" if a == str(fib_crop["labels"]) else a for a in base]
    r = CliRunner().invoke(cli, [*other, "--base-channels", "2", "--depth", "1", "--lr", "1e-12", "--init", str(first),
                                 "-o", str(second)])
    assert r.exit_code == 0, r.output
    from emseg.models import load_checkpoint

    a, b = load_checkpoint(first).model.state_dict(), load_checkpoint(second).model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert load_checkpoint(second).config.normalization == load_checkpoint(first).config.normalization
    plain = CliRunner().invoke(cli, [*other, "--base-channels", "2", "--depth", "1", "-o", str(tmp_path / "d")])
    assert load_checkpoint(tmp_path / "d").config.normalization != load_checkpoint(first).config.normalization, plain.output
    r = CliRunner().invoke(cli, [*base, "--base-channels", "3", "--depth", "1", "--init", str(first), "-o", str(tmp_path / "c")])
    assert r.exit_code == 1 and "do not fit the configured model" in r.output


def test_balance_weights_equalise_the_classes() -> None:
    from emseg.training.data import balance_weights

    target = np.array([[1, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1]], np.float32)
    mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 0, 1, 1, 1]], np.float32)
    w = balance_weights(target, mask)
    np.testing.assert_allclose(w[0], [0.625, 0.625, 0.625, 2.5, 0.625, 0])  # each class sums to 2.5 = n / 2
    np.testing.assert_array_equal(w[1], mask[1])  # one class only: the mask unchanged
    # bce-dice: weights scale the BCE, the Dice sees the binary mask
    logits = torch.zeros(1, 2, 6)
    t = torch.from_numpy(target)[None]
    assert torch.isfinite(bce_dice_loss(logits, t, torch.from_numpy(w)[None]))


def test_auto_precision_is_bf16_only_where_the_cpu_computes_it() -> None:
    import torch

    from emseg.ops.inference import cpu_has_native_bf16
    from emseg.training.loop import resolved_precision

    cfg = TrainConfig(train=[{"raw": "a.tif", "labels": "b.tif"}], output="x")
    assert resolved_precision(cfg, torch.device("cpu")) == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolved_precision(cfg.model_copy(update={"precision": "bf16"}), torch.device("cpu")) == "bf16"
