"""emseg import / export / info on real EM, and the bad-input contract of each."""

import re
from pathlib import Path

import h5py
import numpy as np
import tifffile
import zarr
from click.testing import CliRunner
from ome_zarr_models import open_ome_zarr
from PIL import Image

from emseg.cli import cli
from emseg.geometry import Roi
from tests.conftest import tree_digest


def run(*args: str):
    return CliRunner().invoke(cli, [*args], catch_exceptions=False)


def assert_one_line_error(result, pattern: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    assert re.search(pattern, lines[0]), lines[0]


def test_isbi_import_info_export_roundtrip(tmp_path: Path, shared_data: Path) -> None:
    src = shared_data / "isbi2012" / "train-volume.tif"
    before = tree_digest(src)
    out = tmp_path / "OUT.zarr"
    result = run("import", str(src), str(out), "--voxel-size", "50,4,4", "--no-progress")
    assert result.exit_code == 0, result.output
    info = run("info", str(out))
    assert "(20, 512, 512)" in info.stdout and "uint8" in info.stdout and "(50.0, 4.0, 4.0)" in info.stdout
    import json

    as_json = json.loads(run("info", str(out), "--json").stdout)
    assert as_json["shape"] == [20, 512, 512] and as_json["voxel_size"] == [50.0, 4.0, 4.0]
    open_ome_zarr(zarr.open_group(str(out), mode="r"))  # validates as OME-Zarr 0.5
    back = tmp_path / "back.tif"
    assert run("export", str(out), str(back), "--no-progress").exit_code == 0
    assert np.array_equal(tifffile.imread(back), tifffile.imread(src))
    assert tree_digest(src) == before
    # the voxel size travels through the TIFF and back
    again = tmp_path / "again.zarr"
    assert run("import", str(back), str(again), "--no-progress").exit_code == 0
    assert json.loads(run("info", str(again), "--json").stdout)["voxel_size"] == [50.0, 4.0, 4.0]


def test_import_zarr_v2_png_folder_and_hdf5(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    data = rng.integers(0, 255, (5, 20, 24), dtype=np.uint8)
    folder = tmp_path / "slices"
    folder.mkdir()
    for z in range(5):  # natural order: 2 before 10
        Image.fromarray(data[z]).save(folder / f"s{[1, 2, 3, 10, 11][z]}.png")
    out = tmp_path / "png.zarr"
    assert run("import", str(folder), str(out), "--zarr-format", "2", "--chunks", "2,8,8", "--no-progress").exit_code == 0
    from emseg.io import open_volume

    volume = open_volume(out)
    assert volume.array.metadata.zarr_format == 2 and volume.chunks == (2, 8, 8)
    assert np.array_equal(volume.read(volume.roi), data)
    open_ome_zarr(zarr.open_group(str(out), mode="r"))  # validates as OME-Zarr 0.4
    h5 = tmp_path / "stack.h5"
    with h5py.File(h5, "w") as f:
        f.create_dataset("volumes/raw", data=data.astype(np.uint16))
    out_h5 = tmp_path / "h5.zarr"
    assert run("import", f"{h5}/volumes/raw", str(out_h5), "--no-progress").exit_code == 0
    assert np.array_equal(open_volume(out_h5).read(Roi.from_shape((5, 20, 24))), data.astype(np.uint16))


def test_bad_input_is_one_line_and_leaves_input_alone(tmp_path: Path, make_volume) -> None:
    vol = make_volume()
    before = tree_digest(vol)
    assert_one_line_error(run("info", str(tmp_path / "nope.zarr")), "no such file")
    (tmp_path / "notzarr").mkdir()
    assert_one_line_error(run("info", str(tmp_path / "notzarr")), "not a zarr")
    tifffile.imwrite(tmp_path / "4d.tif", np.zeros((2, 3, 8, 8), np.uint8), photometric="minisblack")
    assert_one_line_error(run("import", str(tmp_path / "4d.tif"), str(tmp_path / "x.zarr")), r"expected a grayscale \(z, y, x\)")
    zarr.create_array(str(tmp_path / "2d.zarr"), shape=(4, 4), dtype="uint8")
    assert_one_line_error(run("info", str(tmp_path / "2d.zarr")), "expected 3 spatial axes")
    tifffile.imwrite(tmp_path / "c.tif", np.zeros((2, 8, 8), np.complex64))
    assert_one_line_error(run("import", str(tmp_path / "c.tif"), str(tmp_path / "c.zarr")), "complex64")
    existing = make_volume("existing.zarr")
    tifffile.imwrite(tmp_path / "ok.tif", np.zeros((2, 8, 8), np.uint8))
    existing_before = tree_digest(existing)
    assert_one_line_error(run("import", str(tmp_path / "ok.tif"), str(existing)), "already exists; pass --overwrite")
    assert tree_digest(existing) == existing_before
    assert_one_line_error(run("export", str(vol), str(vol), "--format", "tiff"), "would overwrite the input")
    assert_one_line_error(run("export", str(vol), str(vol / "0" / "x.tif")), "would overwrite the input")
    assert_one_line_error(run("export", str(vol), str(tmp_path / "x.raw")), "--format")
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "c.zarr").exists()
    assert tree_digest(vol) == before


def test_help_of_each_command() -> None:
    for command in ("info", "import", "export"):
        result = run(command, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output
    assert "import" in run("--help").output
