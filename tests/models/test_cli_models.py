"""``emseg models``."""

from __future__ import annotations

import json

from click.testing import CliRunner

from emseg.cli import cli


def test_help() -> None:
    result = CliRunner().invoke(cli, ["models", "--help"])
    assert result.exit_code == 0
    assert "--input-size" in result.output and "--json" in result.output


def test_table_2d() -> None:
    result = CliRunner().invoke(cli, ["models"])
    assert result.exit_code == 0, result.output
    lines = result.output.split("\n\n")[0].splitlines()  # the zoo table; the bundled models follow
    assert lines[0].split()[:3] == ["model", "padding", "params"]
    paper = next(line for line in lines if line.startswith("unet (paper)"))
    assert "31,030,593" in paper and "572x572" in paper and "388x388" in paper and "92x92" in paper
    assert {line.split()[0] for line in lines[1:]} == {"unet", "fusionnet", "unetpp", "fcn"}


def test_json_3d_rounds_up_input() -> None:
    result = CliRunner().invoke(cli, ["models", "--ndim", "3", "--input-size", "100", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["model"]: row for row in json.loads(result.output)}
    assert rows["fcn"]["input_shape"] == [128, 128, 128] == rows["fcn"]["output_shape"]
    assert rows["unet (paper)"]["input_shape"] == [188, 188, 188]
    assert rows["unet (paper)"]["output_shape"] == [4, 4, 4]


def test_bad_input_size() -> None:
    result = CliRunner().invoke(cli, ["models", "--input-size", "64,64,64"])
    assert result.exit_code == 2
    assert "expected 1 or 2 values" in result.output
    result = CliRunner().invoke(cli, ["models", "--input-size", "0"])
    assert result.exit_code == 2
