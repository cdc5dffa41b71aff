"""Every command: --json; malformed coordinate lists are one Error line naming the option."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from emseg.cli import COMMANDS, cli
from emseg.cli.types import FLOAT_ZYX, INT_ZYX


def test_every_command_has_json():
    runner = CliRunner()
    for name in COMMANDS:
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, name
        assert "--json" in result.output, f"emseg {name} has no --json"


@pytest.mark.parametrize(("args", "option"), [
    (["segment", "VOL", "--block-size", "1,2"], "--block-size"),
    (["predict", "VOL", "-o", "OUT", "--block-size", "1,2,3,4"], "--block-size"),
    (["predict", "VOL", "-o", "OUT", "--tile-size", ",,"], "--tile-size"),
    (["predict", "VOL", "-o", "OUT", "--halo", "1;2;3"], "--halo"),
    (["label", "PRED", "-o", "OUT", "--block-size", "4,x"], "--block-size"),
    (["synth", "OUT", "--shape", "10,nan,10"], "--shape"),
    (["synth", "OUT", "--shape", "10,10,10", "--chunks", "0,8,8"], "--chunks"),
    (["import", "SRC", "OUT", "--voxel-size", "nan,4,4"], "--voxel-size"),
    (["import", "SRC", "OUT", "--voxel-size", "inf"], "--voxel-size"),
    (["import", "SRC", "OUT", "--chunks", "8,8"], "--chunks"),
])
def test_malformed_coordinate_lists(args: list[str], option: str, tmp_path: Path):
    existing = tmp_path / "in.zarr"
    existing.mkdir()
    args = [str(existing) if a in ("VOL", "PRED", "SRC") else (str(tmp_path / "o.zarr") if a == "OUT" else a)
            for a in args]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and option in errors[0], result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o.zarr").exists()


def test_one_value_stands_for_every_axis():
    assert INT_ZYX.convert("64", None, None) == (64, 64, 64)
    assert INT_ZYX.convert("16,256,256", None, None) == (16, 256, 256)
    assert INT_ZYX.convert("16x256x256", None, None) == (16, 256, 256)
    assert FLOAT_ZYX.convert("50,4,4", None, None) == (50.0, 4.0, 4.0)


def test_json_outputs_parse(scheduler: str, tmp_path: Path):
    runner = CliRunner()
    synth = runner.invoke(cli, ["synth", str(tmp_path / "s.zarr"), "--shape", "16,32,32", "--chunks", "16,32,32",
                                "--no-progress", "--json"])
    assert synth.exit_code == 0, synth.output
    assert json.loads(synth.stdout)["shape"] == [16, 32, 32]
    export = runner.invoke(cli, ["export", str(tmp_path / "s.zarr"), str(tmp_path / "pc"), "--format", "precomputed",
                                 "--no-progress", "--json"])
    assert export.exit_code == 0, export.output
    layers = json.loads(export.stdout)["layers"]
    assert [layer["type"] for layer in layers] == ["image", "segmentation"]
    preview = runner.invoke(cli, ["preview", str(tmp_path / "s.zarr"), "-o", str(tmp_path / "p.png"), "--json"])
    assert preview.exit_code == 0, preview.output
    assert json.loads(preview.stdout)["path"] == str(tmp_path / "p.png")
    label = runner.invoke(cli, ["label", str(tmp_path / "s.zarr" / "labels" / "ground_truth" / "0"), "-o",
                                str(tmp_path / "l.zarr"), "--foreground", "nonzero", "--no-progress", "--json",
                                "--scheduler", scheduler])
    assert label.exit_code == 0, label.output
    assert json.loads(label.stdout.strip().splitlines()[-1])["n_segments"] >= 1
