"""``emseg train`` through click: help, errors, a short real run, config files."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from emseg.cli import cli
from tests.training.conftest import tiny_args


def test_help() -> None:
    result = CliRunner().invoke(cli, ["train", "--help"])
    assert result.exit_code == 0
    assert "--raw" in result.output and "--resume" in result.output and "--nproc" in result.output


def test_missing_raw_is_one_error_line(tmp_path: Path, isbi_crops: dict[str, Path]) -> None:
    result = CliRunner().invoke(cli, ["train", "--raw", str(tmp_path / "nope.tif"), "--labels", str(isbi_crops["labels"]), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "nope.tif" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing written for a run that cannot start


def test_unpaired_labels_is_an_error(tmp_path: Path, isbi_crops: dict[str, Path]) -> None:
    result = CliRunner().invoke(cli, ["train", "--raw", str(isbi_crops["raw"]), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "labels" in result.output


def test_missing_output_is_a_usage_error(isbi_crops: dict[str, Path]) -> None:
    result = CliRunner().invoke(cli, ["train", "--raw", str(isbi_crops["raw"]), "--labels", str(isbi_crops["labels"])])
    assert result.exit_code == 2


def test_shape_mismatch_is_an_error(tmp_path: Path, isbi_crops: dict[str, Path]) -> None:
    result = CliRunner().invoke(cli, ["train", "--raw", f"{isbi_crops['raw']}[0:2]", "--labels", f"{isbi_crops['labels']}[0:3]", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "must match" in result.output


def test_short_run_writes_a_loadable_checkpoint(tmp_path: Path, isbi_crops: dict[str, Path]) -> None:
    from emseg.models import load_checkpoint

    out = tmp_path / "ckpt"
    args = tiny_args(isbi_crops, out, "--steps", "4", "--val-every", "2", "--checkpoint-every", "2", "--json")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["steps"] == 4 and report["best_step"] in (2, 4)
    ckpt = load_checkpoint(out)
    assert ckpt.config.outputs == ("membrane",) and ckpt.config.activation == "sigmoid"
    assert ckpt.config.model["name"] == "unet" and ckpt.config.model["depth"] == 2
    assert 0.2 < ckpt.config.normalization.mean < 0.8
    for name in ("metrics.jsonl", "curves.png", "train_config.json", "train_report.json"):
        assert (out / name).exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in val] == [2, 4]
    assert {"loss", "dice", "iou", "pixel_error", "adapted_rand_error"} <= set(val[0])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    # a second run into the same directory refuses without --resume/--overwrite
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "--resume" in again.output


def test_config_file_with_cli_override(tmp_path: Path, isbi_crops: dict[str, Path]) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        f"""
base_channels = 4
depth = 2
patch_shape = [48, 48]
batch_size = 1
steps = 50
threads = 1
output = "{tmp_path / 'from_file'}"

[[train]]
raw = "{isbi_crops['raw']}[0:2]"
labels = "{isbi_crops['labels']}[0:2]"
labels_kind = "interior-mask"
"""
    )
    result = CliRunner().invoke(cli, ["train", "--config", str(config), "--steps", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["steps"] == 1
    resolved = json.loads((tmp_path / "from_file" / "train_config.json").read_text())
    assert resolved["steps"] == 1 and resolved["base_channels"] == 4 and resolved["train"][0]["labels_kind"] == "interior-mask"


def test_unknown_config_key_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("output: o\nlearning_rate: 0.1\ntrain: [{raw: a.tif, labels: b.tif}]\n")
    result = CliRunner().invoke(cli, ["train", "--config", str(config)])
    assert result.exit_code == 1
    assert "learning_rate" in result.output


def test_a_hundred_and_fifty_steps_lower_the_validation_loss(tmp_path: Path, isbi_crops: dict[str, Path]) -> None:
    out = tmp_path / "ckpt"
    args = tiny_args(isbi_crops, out, "--steps", "150", "--val-every", "50", "--lr", "3e-3", "--no-augment", "--json")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    val = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in val if r["split"] == "val"]
    assert losses[-1] < losses[0]


def test_unetpp_deep_supervision_run(tmp_path: Path, isbi_crops: dict[str, Path]) -> None:
    out = tmp_path / "pp"
    args = tiny_args(isbi_crops, out, "--model", "unetpp", "--padding", "same", "--deep-supervision", "--loss", "bce-dice",
                     "--batch-norm", "--steps", "2", "--patch-shape", "32,32", "--json")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["best_val"]["dice"] >= 0


def test_3d_affinities_run(tmp_path: Path) -> None:
    import numpy as np
    import tifffile

    from emseg.models import load_checkpoint

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(1, 17, dtype=np.uint32).reshape(4, 4), 8, 0).repeat(8, 1)[None].repeat(6, 0)
    raw = np.where(np.pad(labels[:, 1:, 1:] != labels[:, :-1, :-1], ((0, 0), (1, 0), (1, 0))), 200, 60)
    raw = (raw + rng.integers(0, 20, raw.shape)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "r.tif", raw, photometric="minisblack")
    tifffile.imwrite(tmp_path / "l.tif", labels, photometric="minisblack")
    out = tmp_path / "aff"
    result = CliRunner().invoke(cli, [
        "train", "--raw", str(tmp_path / "r.tif"), "--labels", str(tmp_path / "l.tif"), "--labels-kind", "instances",
        "--val-raw", str(tmp_path / "r.tif"), "--val-labels", str(tmp_path / "l.tif"),
        "--ndim", "3", "--target", "affinities", "--loss", "bce-dice", "--padding", "same", "--base-channels", "2",
        "--depth", "1", "--patch-shape", "4,16,16", "--batch-size", "1", "--steps", "2", "--threads", "1", "-o", str(out),
    ])
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(out)
    assert ckpt.config.outputs == ("aff_z", "aff_y", "aff_x") and ckpt.model.ndim == 3


def test_early_stopping_when_validation_loss_stops_falling(tmp_path: Path, isbi_crops: dict[str, Path]) -> None:
    # lr 1e-30: the weights cannot change in float32, so the validation loss never gets lower
    args = tiny_args(isbi_crops, tmp_path / "es", "--optimizer", "sgd", "--lr", "1e-30", "--steps", "20",
                     "--val-every", "1", "--patience", "2", "--no-augment", "--json")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["stopped_early"] and report["steps"] == 3 and report["best_step"] == 1
    assert [p.name for p in (tmp_path / "es" / "checkpoints").iterdir()][-1] == "step-00000003"


def test_cluster_must_be_a_slurm_profile(tmp_path: Path, isbi_crops: dict[str, Path]) -> None:
    out = tmp_path / "ckpt"
    result = CliRunner().invoke(cli, tiny_args(isbi_crops, out, "--cluster", "local"))
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "Error: --cluster local: training is submitted to SLURM only (kind slurm, got local); "
        "use --nproc N for processes on this machine"]
    assert not out.exists()
