"""`emseg segment` end to end on the real ISBI 2012 test volume with the bundled model."""

from __future__ import annotations

from pathlib import Path

import fastremap
import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr_models import open_ome_zarr

from emseg.cli import cli
from emseg.io import open_volume, read_status
from emseg.workflows.segment import default_output

PIPELINE = Path(__file__).resolve().parents[2] / "pipelines" / "isbi2012.toml"


@pytest.mark.slow
def test_segment_isbi_test_volume(shared_data: Path, cluster2, tmp_path: Path) -> None:
    """The README's demo on the first 8 of the ISBI 2012 test volume's 30 sections (the whole volume is
    the same run, 4 times longer), on the session's cluster."""
    import tifffile

    from tests.support import scheduler_of

    runner = CliRunner()
    crop = tmp_path / "isbi-0-8.tif"
    tifffile.imwrite(crop, tifffile.imread(shared_data / "isbi2012" / "test-volume.tif")[:8])
    volume = tmp_path / "isbi.zarr"
    result = runner.invoke(cli, ["import", str(crop), str(volume), "--voxel-size", "50,4,4", "--no-progress"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with scheduler_of(cluster2) as address:
        result = runner.invoke(cli, ["segment", str(volume), "--pipeline", str(PIPELINE), "--scheduler", address,
                                     "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = default_output(volume)
    assert out == tmp_path / "isbi_seg.zarr"

    # layout: prediction at OUT/0, uint64 labels at OUT/labels/segments/0, both finished
    prediction = open_volume(out)
    assert prediction.path == out / "0" and prediction.axes == ("c", "z", "y", "x")
    assert prediction.shape == (8, 512, 512) and prediction.voxel_size == (50.0, 4.0, 4.0)
    segments = open_volume(out / "labels" / "segments")
    assert segments.path == out / "labels" / "segments" / "0" and segments.dtype == np.uint64
    assert read_status(out)["pipeline"]["name"] == "isbi2012"

    # readable by ome-zarr tooling: the validator and ome-zarr-py's reader
    open_ome_zarr(zarr.open_group(str(out), mode="r"))
    open_ome_zarr(zarr.open_group(str(out / "labels" / "segments"), mode="r"))
    specs = [sorted(type(s).__name__ for s in node.specs) for node in Reader(parse_url(str(out)))()]
    assert ["Multiscales"] in specs and ["Label", "Multiscales"] in specs

    # IDs consecutive from 1; a membrane prediction of real EM gives many cells per section
    labels = segments.read(segments.roi)
    ids = fastremap.unique(labels)
    ids = ids[ids > 0]
    assert np.array_equal(ids, np.arange(1, len(ids) + 1, dtype=np.uint64))
    assert len(ids) > 8 * 50
    membrane = prediction.read(prediction.roi)[0] > 127
    assert 0.1 < membrane.mean() < 0.6  # membranes are a minority of pixels, but present

    # a rerun resumes: nothing is computed again
    with scheduler_of(cluster2) as address:
        rerun = runner.invoke(cli, ["segment", str(volume), "--pipeline", str(PIPELINE), "--scheduler", address,
                                    "--no-progress"], catch_exceptions=False)
    # 8 sections in the default 2-D blocks of 4 sections: 2 blocks
    assert rerun.exit_code == 0 and "(0 computed, 2 already done)" in rerun.stdout, rerun.output


def test_segment_help_and_bad_input(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["segment", "--help"]).exit_code == 0
    result = runner.invoke(cli, ["segment", str(tmp_path / "missing.zarr")])
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and len(result.stderr.splitlines()) == 1
    bad = tmp_path / "bad.toml"
    bad.write_text("[label]\nmethod = 'magic'\n")
    result = runner.invoke(cli, ["segment", str(tmp_path / "missing.zarr"), "--pipeline", str(bad)])
    assert result.exit_code == 1 and "label.method" in result.stderr


def test_fragments_beside_the_prediction_give_the_segments_of_one_stage_after_another(checkpoints, write_volume,
                                                                                       cluster2, tmp_path: Path) -> None:
    """Many prediction blocks and fragment blocks whose halos reach into their neighbours, in 3-D:
    overlapping the stages changes when blocks run, never what they write."""
    from tests.support import scheduler_of, smooth_volume

    volume = write_volume(smooth_volume((24, 96, 96)), chunks=(8, 48, 48), voxel_size=(8.0, 8.0, 8.0))
    recipe = tmp_path / "small.toml"
    recipe.write_text('[predict]\ntile_size = [8, 48, 48]\nblock_size = [8, 48, 48]\n'
                      '[label]\nblock_size = [8, 48, 48]\n')  # 12 blocks each; a fragment block's halo reads 4-8
    runner = CliRunner()
    outputs = {}
    for flag in ("--overlap", "--no-overlap"):
        out = tmp_path / f"seg{flag}.zarr"
        with scheduler_of(cluster2) as address:
            result = runner.invoke(cli, ["segment", str(volume), "-o", str(out), "--pipeline", str(recipe), "--model",
                                         str(checkpoints(3)), "--scheduler", address, "--no-progress", flag],
                                   catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert ("side by side" in result.output) == (flag == "--overlap"), result.output
        outputs[flag] = out
    for name in ("0", "labels/fragments/0", "labels/segments/0"):
        together, apart = (open_volume(outputs[f] / name, allow_incomplete=False) for f in outputs)
        np.testing.assert_array_equal(together.read(together.roi), apart.read(apart.roi), err_msg=name)
    fragments = open_volume(outputs["--overlap"] / "labels" / "fragments").read(open_volume(volume).roi)
    assert len(fastremap.unique(fragments)) > 20  # the prediction was read: real fragments, not one flooded block
