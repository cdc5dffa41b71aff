"""--zarr-format 2|3 on the writers; by default an output follows its input's zarr format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from emseg.cli import cli
from emseg.io import create_volume, mark_complete, open_volume
from tests.support import scheduler_of

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "isbi2012" / "test-volume.tif"


def _format(path: Path) -> int:
    return int(open_volume(path).array.metadata.zarr_format)


@pytest.fixture
def prediction_v2(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    vol = create_volume(tmp_path / "pred.zarr", shape=(8, 64, 64), dtype=np.float32, chunks=(8, 32, 32),
                        voxel_size=(8.0, 8.0, 8.0), channels=1, zarr_format=2)
    vol.array[...] = (rng.random((1, 8, 64, 64)) > 0.7).astype(np.float32)
    mark_complete(tmp_path / "pred.zarr")
    return tmp_path / "pred.zarr"


@pytest.mark.parametrize(("option", "expected"), [([], 2), (["--zarr-format", "3"], 3), (["--zarr-format", "2"], 2)])
def test_label_output_format(prediction_v2: Path, scheduler: str, tmp_path: Path, option: list[str], expected: int):
    out = tmp_path / "labels.zarr"
    result = CliRunner().invoke(cli, ["label", str(prediction_v2), "-o", str(out), "--no-progress", "--scheduler",
                                      scheduler, *option])
    assert result.exit_code == 0, result.output
    assert _format(out) == expected
    assert (out / ("zarr.json" if expected == 3 else ".zattrs")).is_file()
    assert open_volume(out).array[...].max() >= 1


def test_labels_inside_a_v2_prediction_stay_v2(prediction_v2: Path, scheduler: str):
    result = CliRunner().invoke(cli, ["label", str(prediction_v2), "-o", str(prediction_v2), "--no-progress",
                                      "--scheduler", scheduler])
    assert result.exit_code == 0, result.output
    assert _format(prediction_v2 / "labels" / "segments") == 2


@pytest.mark.skipif(not DATA.exists(), reason=f"{DATA} not found (../shared/data)")
def test_predict_writes_the_asked_format(session_cluster, tmp_path: Path):
    import tifffile

    import emseg

    raw = np.asarray(tifffile.imread(DATA)[:1, :256, :256])
    vol = create_volume(tmp_path / "raw.zarr", shape=raw.shape, dtype=np.uint8, chunks=(1, 256, 256),
                        voxel_size=(50.0, 4.0, 4.0))
    vol.array[...] = raw
    mark_complete(tmp_path / "raw.zarr")
    emseg.predict(raw, tmp_path / "api.zarr", voxel_size=(50, 4, 4), zarr_format=2)
    assert _format(tmp_path / "api.zarr") == 2 and (tmp_path / "api.zarr" / ".zattrs").is_file()
    with scheduler_of(session_cluster) as scheduler:  # TLS settings for this run only (the API run above has none)
        result = CliRunner().invoke(cli, ["predict", str(tmp_path / "raw.zarr"), "-o", str(tmp_path / "p2.zarr"),
                                          "--zarr-format", "2", "--no-progress", "--scheduler", scheduler, "--json"])
    assert result.exit_code == 0, result.output
    assert _format(tmp_path / "p2.zarr") == 2 and _format(tmp_path / "raw.zarr") == 3
    assert open_volume(tmp_path / "p2.zarr").array.shape == (1, 1, 256, 256)
