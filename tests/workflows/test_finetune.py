"""`emseg finetune` and `emseg calibrate`: bad input fails in one line with nothing written; the written
checkpoint carries the threshold chosen on the labels, and `emseg segment --model CKPT` merges at it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from emseg.cli import cli
from emseg.io import open_volume, read_status
from emseg.workflows.agglomerate import segments_name
from emseg.workflows.finetune import holdout_split, load_labelled
from emseg.workflows.predict import BUNDLED

FIB3D = str(BUNDLED / "fib3d")
"""The 3-D model, named: its same-padded convolutions fit these small crops (the automatic choice, the
2-D model, needs 88 voxels of context in-plane)."""


@pytest.fixture
def gala_crop(shared_data: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A small FIB-SEM crop with 3-D instance labels (gala train), as TIFFs; its held-out quarter (x 156:208)
    is wider than the context of either bundled model."""
    raw = tmp_path / "raw.tif"
    labels = tmp_path / "labels.tif"
    tifffile.imwrite(raw, tifffile.imread(shared_data / "fib_gala" / "train-raw.tif")[:12, :64, :208])
    tifffile.imwrite(labels, tifffile.imread(shared_data / "fib_gala" / "train-labels.tif")[:12, :64, :208])
    return raw, labels


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def _nothing_written(out: Path) -> bool:
    return not out.exists() and not (out.parent / f".{out.name}.finetune").exists()


@pytest.mark.parametrize("command", ["finetune", "calibrate"])
def test_help_names_the_cluster_options(command: str) -> None:
    code, output = _invoke(command, "--help")
    assert code == 0 and "Usage:" in output
    assert "--workers" in output and "--scheduler ADDRESS" in output


def test_holdout_is_the_last_part_of_the_longest_axis_in_nm() -> None:
    assert holdout_split((50, 100, 200), (10, 10, 10), 0.25) == (2, 150)
    assert holdout_split((3, 500, 500), (40, 4, 4), 0.25) == (1, 375)  # a strip of every section
    assert holdout_split((40, 100, 100), (40, 4, 4), 0.25) == (0, 30)  # 1600 nm deep > 400 nm wide


@pytest.mark.parametrize("command", ["finetune", "calibrate"])
def test_bad_input_is_one_error_line_and_writes_nothing(command: str, gala_crop: tuple[Path, Path],
                                                        tmp_path: Path) -> None:
    raw, labels = gala_crop
    out = tmp_path / "ckpt"
    other = tmp_path / "other.tif"
    tifffile.imwrite(other, tifffile.imread(labels)[:, :32])
    single = tmp_path / "single.tif"
    tifffile.imwrite(single, np.full((12, 64, 208), 7, np.uint16))
    before = tifffile.imread(labels).copy()
    cases = {
        "labels of another shape": (["--labels", str(other)], "shape"),
        "one id": (["--labels", str(single)], "single"),
        "slice outside the volume": (["--raw", f"{raw}[4:16]", "--labels", f"{labels}[4:16]"], "outside"),
        "no voxel size": (["--voxel-size", None], "voxel size"),
    }
    for name, (change, word) in cases.items():
        args = {"--raw": str(raw), "--labels": str(labels), "--voxel-size": "10,10,10", "--model": FIB3D}
        for flag, value in zip(change[::2], change[1::2], strict=True):
            args[flag] = value
        argv = [command, "-o", str(out)] + [v for k, val in args.items() if val is not None for v in (k, val)]
        code, output = _invoke(*argv)
        assert code != 0, name
        errors = [line for line in output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and word in errors[0], (name, output)
        assert "Traceback" not in output
        assert _nothing_written(out), name
    assert np.array_equal(tifffile.imread(labels), before)  # the input is never modified


def test_load_labelled_reads_zarr_voxel_size_and_slices(make_volume, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    raw = make_volume("raw.zarr", shape=(6, 16, 16), voxel_size=(40.0, 4.0, 4.0))
    labels = tmp_path / "labels.tif"
    tifffile.imwrite(labels, np.arange(6 * 16 * 16, dtype=np.uint16).reshape(6, 16, 16) % 5)
    vol = load_labelled(f"{raw}[1:4]", f"{labels}[1:4]")
    assert vol.raw.shape == (3, 16, 16) and vol.voxel_size == (40.0, 4.0, 4.0)


def test_time_limit_too_small_for_one_validation(gala_crop: tuple[Path, Path], scheduler: str,
                                                 tmp_path: Path) -> None:
    raw, labels = gala_crop
    out = tmp_path / "ckpt"
    code, output = _invoke("finetune", "--raw", str(raw), "--labels", str(labels), "--voxel-size", "10,10,10",
                           "--model", FIB3D, "-o", str(out), "--time-limit", "0.05", "--no-progress",
                           "--scheduler", scheduler)
    assert code != 0
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--time-limit" in errors[0] and "too small" in errors[0], output
    assert _nothing_written(out)


def _segment(volume: Path, out: Path, address: str, *flags: str) -> tuple[float, np.ndarray]:
    code, output = _invoke("segment", str(volume), "-o", str(out), "--scheduler", address, "--no-progress", *flags)
    assert code == 0, output
    segments = open_volume(out / "labels" / "segments")
    return float(read_status(out)["pipeline"]["agglomerate"]["threshold"]), segments.read(segments.roi)


def test_calibrated_checkpoint_carries_its_threshold_and_segment_uses_it(gala_crop: tuple[Path, Path],
                                                                          scheduler: str, tmp_path: Path) -> None:
    raw, labels = gala_crop
    out = tmp_path / "ckpt"
    code, output = _invoke("calibrate", "--raw", str(raw), "--labels", str(labels), "--voxel-size", "10,10,10",
                           "--model", FIB3D, "-o", str(out), "--json", "--scheduler", scheduler)
    assert code == 0, output
    report = json.loads(output.splitlines()[-1])
    chosen = report["after"]["threshold"]
    # the threshold written: lowest ARE + VOI with one sweep step of margin against merges (the worse of
    # its own score and the next threshold's above it), ties toward the lower threshold
    sums = {r["threshold"]: r["sum"] for r in report["sweep"]}
    ordered = sorted(sums)
    margin = {t: max(sums[t], sums[u]) for t, u in zip(ordered, ordered[1:])} | {ordered[-1]: sums[ordered[-1]]}
    assert chosen == min(ordered, key=lambda t: (margin[t], t))
    assert report["after"]["sum"] == sums[chosen]
    config = json.loads((out / "config.json").read_text())
    assert config["agglomeration_threshold"] == chosen
    assert config["provenance"]["calibration"]["chosen"]["threshold"] == chosen

    volume = tmp_path / "vol.zarr"
    assert _invoke("import", str(raw), str(volume), "--voxel-size", "10,10,10", "--no-progress")[0] == 0
    used, own = _segment(volume, tmp_path / "own.zarr", scheduler, "--model", str(out))
    assert used == chosen
    # merged at the checkpoint's threshold, not only recorded: the same graph agglomerated again with that
    # threshold as an extra one (beside another, as the main) gives the same labels
    other = 0.9 if chosen != 0.9 else 0.5
    code, output = _invoke("agglomerate", str(tmp_path / "own.zarr"), "--threshold", f"{other}",
                           "--thresholds", f"{chosen}", "--overwrite", "--scheduler", scheduler, "--no-progress")
    assert code == 0, output
    named = open_volume(tmp_path / "own.zarr" / "labels" / segments_name(chosen))
    assert np.array_equal(own, named.read(named.roi))


@pytest.mark.slow
@pytest.mark.timeout(2400)  # three pipeline runs and two training steps; minutes on a loaded machine
def test_finetune_writes_a_checkpoint_with_the_threshold_it_chose(gala_crop: tuple[Path, Path], scheduler: str,
                                                                  tmp_path: Path) -> None:
    raw, labels = gala_crop
    out = tmp_path / "ckpt"
    code, output = _invoke("finetune", "--raw", str(raw), "--labels", str(labels), "--voxel-size", "10,10,10",
                           "--model", FIB3D, "-o", str(out), "--time-limit", "30", "--max-steps", "2",
                           "--patch-shape", "24,24,24",
                           "--threads", "1",
                           "--no-progress", "--json", "--scheduler", scheduler)
    assert code == 0, output
    report = json.loads(output.splitlines()[-1])
    config = json.loads((out / "config.json").read_text())
    assert config["agglomeration_threshold"] == report["after"]["threshold"]
    assert config["provenance"]["train_config"]["isotropic"] is True  # 10 nm FIB-SEM: seen in every orientation
    # the starting model is a candidate: the weights kept score no worse than it by the measure that compares
    # checkpoints (ARE + VOI at the chosen threshold with its one-step margin; the plain sums may rank them
    # the other way)
    margins = {v["name"]: v["chosen_margin_sum"] for v in report["validations"]}
    assert margins[report["chosen"]] == min(margins.values()) <= margins["bundled"]
    chosen = next(v for v in report["validations"] if v["name"] == report["chosen"])
    assert report["after"]["sum"] == chosen["chosen_sum"] and report["after"]["threshold"] == chosen["chosen_threshold"]
    assert report["steps"] == 2 and [v["name"] for v in report["validations"]] == ["bundled", "step-2"]
    assert not (tmp_path / ".ckpt.finetune").exists()  # the work directory is gone once the output is in place

    volume = tmp_path / "vol.zarr"
    assert _invoke("import", str(raw), str(volume), "--voxel-size", "10,10,10", "--no-progress")[0] == 0
    used, _ = _segment(volume, tmp_path / "seg.zarr", scheduler, "--model", str(out))
    assert used == report["after"]["threshold"]
