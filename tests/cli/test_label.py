"""``emseg label`` and ``emseg evaluate`` through click's CliRunner."""

from __future__ import annotations

import json

import numpy as np
import tifffile
from click.testing import CliRunner

from emseg.cli import cli
from tests.support import blob_mask


def test_help() -> None:
    runner = CliRunner()
    for command in ("label", "evaluate"):
        result = runner.invoke(cli, [command, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output


def test_label_then_evaluate(write_zarr, scheduler, tmp_path) -> None:
    mask = blob_mask((8, 24, 24), seed=2)
    pred = write_zarr(np.where(mask, 0, 255).astype(np.uint8)[None])
    out = tmp_path / "labels.zarr"
    runner = CliRunner()
    result = runner.invoke(cli, ["label", str(pred), "-o", str(out), "--block-size", "8,16,16", "--scheduler", scheduler,
                                 "--connectivity", "26", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "segments (uint64" in result.output
    result = runner.invoke(cli, ["evaluate", str(out), str(out), "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert scores["adapted_rand_error"] == 0 and scores["iou"] == 1


def test_bad_input_is_one_error_line(tmp_path) -> None:
    runner = CliRunner()
    (tmp_path / "empty").mkdir()
    result = runner.invoke(cli, ["label", str(tmp_path / "empty"), "-o", str(tmp_path / "o.zarr")])
    assert result.exit_code == 1
    assert result.output.count("Error:") == 1 and "not a zarr array or OME-Zarr image" in result.output
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((2, 4, 4), np.uint8))
    tifffile.imwrite(tmp_path / "b.tif", np.zeros((3, 4, 4), np.uint8))
    result = runner.invoke(cli, ["evaluate", str(tmp_path / "a.tif"), str(tmp_path / "b.tif")])
    assert result.exit_code == 1 and result.output.count("Error:") == 1 and "same voxels" in result.output
    result = runner.invoke(cli, ["label", str(tmp_path / "empty"), "-o", "x", "--block-size", "1,2"])
    assert result.exit_code == 2
