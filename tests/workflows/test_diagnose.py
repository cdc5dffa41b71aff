"""Degenerate results are reported (text and --json) with their likely cause: unit checks of the rules,
and a real `emseg segment` run on a volume built to be degenerate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from emseg.cli import cli
from emseg.workflows.diagnose import diagnose_arrays
from tests.support import scheduler_of


def _cells(shape: tuple[int, int, int], side: int) -> np.ndarray:
    z, y, x = np.indices(shape)
    return (1 + (y // side) * (shape[2] // side + 1) + x // side).astype(np.uint64)


def test_a_healthy_segmentation_has_no_findings() -> None:
    seg = _cells((4, 64, 64), 16)
    boundary = np.zeros(seg.shape, np.float32)
    boundary[:, ::16] = boundary[:, :, ::16] = 1.0
    assert diagnose_arrays(seg, boundary, n_fragments=200, n_segments=16, threshold=0.8) == ()


def test_one_segment_holding_the_volume_is_reported() -> None:
    seg = np.ones((4, 64, 64), np.uint64)
    seg[:, :4, :4] = 2
    (finding,) = diagnose_arrays(seg, None, n_fragments=500, n_segments=2, threshold=0.85)
    assert finding.code == "one-segment" and finding.value > 0.9
    assert "of the volume" in finding.message and "likely cause" in finding.message and "try:" in finding.message
    assert "section_link_weight" not in finding.message
    (linked,) = diagnose_arrays(seg, None, n_fragments=500, n_segments=2, threshold=0.85, linked_sections=True)
    assert "section_link_weight" in linked.message and "--2d" in linked.message  # serial sections in 3-D


def test_nothing_merged_is_reported() -> None:
    seg = _cells((2, 64, 64), 8)
    codes = [f.code for f in diagnose_arrays(seg, None, n_fragments=100, n_segments=98, threshold=0.3)]
    assert codes == ["nothing-merged"]


@pytest.mark.parametrize(("share", "code"), [(0.0, "no-boundaries"), (0.9, "boundaries-everywhere")])
def test_boundary_share_outside_the_calibrated_range_is_reported(share: float, code: str) -> None:
    boundary = np.zeros((2, 50, 50), np.float32)
    boundary.reshape(-1)[: int(share * boundary.size)] = 1.0
    seg = _cells((2, 50, 50), 10)
    assert [f.code for f in diagnose_arrays(seg, boundary, n_fragments=5, n_segments=5, threshold=0.8)] == [code]


@pytest.mark.slow
def test_segment_reports_a_degenerate_result(shared_data: Path, connection, tmp_path: Path) -> None:
    """Real ISBI EM with its contrast squeezed to 3 grey levels: the bundled model sees no membranes
    and the run says so, in the text report and in --json, with exit code 0."""
    raw = tifffile.imread(shared_data / "isbi2012" / "train-volume.tif")[:2, :256, :256]
    flat = (120 + raw.astype(np.float32) / 255 * 3).astype(np.uint8)
    tifffile.imwrite(tmp_path / "flat.tif", flat)
    runner = CliRunner()
    volume = tmp_path / "flat.zarr"
    result = runner.invoke(cli, ["import", str(tmp_path / "flat.tif"), str(volume), "--voxel-size", "50,4,4",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    with scheduler_of(connection) as address:  # the session's cluster: none started for each run
        result = runner.invoke(cli, ["segment", str(volume), "--scheduler", address, "--no-progress", "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout.strip().splitlines()[-1])
        codes = {f["code"] for f in report["findings"]}
        assert codes & {"one-segment", "no-boundaries"}, report["findings"]
        text = runner.invoke(cli, ["segment", str(volume), "--scheduler", address, "--no-progress"])
    assert text.exit_code == 0 and "WARNING: " in text.stdout


@pytest.mark.slow
def test_one_segment_on_serial_sections_names_the_links_across_sections(shared_data: Path, connection,
                                                                        tmp_path: Path) -> None:
    """Real ISBI sections merged on purpose (a recipe's threshold of 0.99): on serial sections in 3-D the finding
    names the links across sections as a cause; on the same sections imported as isotropic it does not."""
    raw = tifffile.imread(shared_data / "isbi2012" / "train-volume.tif")[:3, :192, :192]
    tifffile.imwrite(tmp_path / "em.tif", raw, photometric="minisblack")
    recipe = tmp_path / "merge_all.toml"
    recipe.write_text('name = "merge_all"\n[agglomerate]\nthreshold = 0.99\n')
    runner = CliRunner()
    messages = {}
    for name, voxel_size in (("serial", "50,4,4"), ("isotropic", "4,4,4")):
        volume = tmp_path / f"{name}.zarr"
        assert runner.invoke(cli, ["import", str(tmp_path / "em.tif"), str(volume), "--voxel-size", voxel_size,
                                   "--no-progress"]).exit_code == 0
        with scheduler_of(connection) as address:
            result = runner.invoke(cli, ["segment", str(volume), "--pipeline", str(recipe), "--scheduler", address,
                                         "--no-progress", "--json"])
        assert result.exit_code == 0, result.output
        findings = json.loads(result.stdout.strip().splitlines()[-1])["findings"]
        messages[name] = next(f["message"] for f in findings if f["code"] == "one-segment")
    assert "section_link_weight" in messages["serial"] and "--2d" in messages["serial"]
    assert "section_link_weight" not in messages["isotropic"]
