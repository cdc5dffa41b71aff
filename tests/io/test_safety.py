"""Output safety case by case: safe --overwrite, validation, resource guards, clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner
from PIL import Image

from emseg.cli import cli
from emseg.io import open_volume
from tests.conftest import tree_digest


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def error_line(result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


# ---------------------------------------------------------------------------------------------
# --overwrite deletes only what emseg made, never an input


def test_train_overwrite_of_the_folder_holding_the_data_is_refused(inputs, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    tifffile.imwrite(data / "raw.tif", np.zeros((2, 96, 96), np.uint8))
    tifffile.imwrite(data / "labels.tif", np.ones((2, 96, 96), np.uint8))
    before = tree_digest(data)
    line = error_line(run("train", "--raw", data / "raw.tif", "--labels", data / "labels.tif", "-o", data,
                          "--overwrite", "--steps", "1"))
    assert "would overwrite the training input" in line
    assert tree_digest(data) == before


@pytest.mark.parametrize("command", ["import", "synth"])
def test_overwrite_refuses_a_folder_emseg_did_not_make(inputs, tmp_path: Path, command: str) -> None:
    for target in (tmp_path / "thesis", tmp_path / "plain.zarr"):
        if target.name == "thesis":
            target.mkdir()
            (target / "chapter1.txt").write_text("years of work")
        else:
            zarr.create_array(str(target), shape=(4, 4, 4), dtype="uint8")  # zarr, but not emseg's
        before = tree_digest(target)
        args = (["import", inputs["tif"], target] if command == "import" else ["synth", target, "--shape", "8,16,16"])
        line = error_line(run(*args, "--overwrite", "--no-progress"))
        assert "not made by emseg" in line and "pass --overwrite" not in line
        assert tree_digest(target) == before


def test_overwrite_replaces_emseg_output(inputs, tmp_path: Path) -> None:
    out = tmp_path / "i.zarr"
    assert run("import", inputs["tif"], out, "--no-progress").exit_code == 0
    assert "pass --overwrite" in error_line(run("import", inputs["tif"], out, "--no-progress"))
    assert run("import", inputs["tif"], out, "--overwrite", "--voxel-size", "2,2,2", "--no-progress").exit_code == 0
    assert open_volume(out).voxel_size == (2.0, 2.0, 2.0)


def test_preview_refuses_inputs_and_existing_files(inputs, tmp_path: Path) -> None:
    raw, pred = inputs["raw"], inputs["pred"]
    before = tree_digest(raw)
    assert "would overwrite" in error_line(run("preview", pred, "-o", raw / "zarr.json", "--overwrite"))
    assert tree_digest(raw) == before
    png = tmp_path / "p.png"
    assert run("preview", pred, "-o", png).exit_code == 0
    assert Image.open(png).info.get("Software") == "emseg"
    assert "pass --overwrite" in error_line(run("preview", pred, "-o", png))
    assert run("preview", pred, "-o", png, "--overwrite").exit_code == 0
    theirs = tmp_path / "holiday.png"
    Image.new("RGB", (4, 4)).save(theirs)
    before = theirs.read_bytes()
    assert "not made by emseg" in error_line(run("preview", pred, "-o", theirs, "--overwrite"))
    assert theirs.read_bytes() == before


def test_label_onto_the_raw_image_never_suggests_overwrite(inputs) -> None:
    raw, pred = inputs["raw"], inputs["pred"]
    before = tree_digest(raw)
    for flags in ([], ["--overwrite"]):
        line = error_line(run("label", pred, "-o", raw, *flags))
        assert "from which the input" in line and "--overwrite" not in line
    assert tree_digest(raw) == before
    # an emseg image of another kind is never replaced, recorded as a source or not
    other = inputs["seg"]
    before = tree_digest(other)
    for args in (["label", pred, "-o", other],):
        for flags in ([], ["--overwrite"]):
            line = error_line(run(*args, *flags, "--no-progress"))
            assert "but another emseg image" in line and "--overwrite" not in line, line
    assert tree_digest(other) == before


# ---------------------------------------------------------------------------------------------
# validation


def test_voxel_sizes_must_be_positive_and_finite(inputs, tmp_path: Path) -> None:
    nan = run("import", inputs["tif"], tmp_path / "n.zarr", "--voxel-size", "nan,4,4")
    assert "finite" in error_line(nan, code=2) and not (tmp_path / "n.zarr").exists()
    recipe = error_line(run("segment", inputs["raw"], "-o", tmp_path / "s.zarr", "--pipeline", inputs["bad_voxel_toml"]))
    assert re.search(r"voxel_size must be greater than 0(\.0)?, got 0\b", recipe), recipe
    train = error_line(run("train", "--raw", inputs["raw"], "--labels", inputs["seg"], "-o", tmp_path / "ck",
                           "--voxel-size", "-1", "4", "4"))
    assert "voxel_size" in train and not (tmp_path / "ck").exists()


@pytest.mark.parametrize("kind", ["binary_toml", "binary_yaml", "binary_json"])
def test_binary_config_files(inputs, tmp_path: Path, kind: str) -> None:
    assert "cannot parse config" in error_line(run("train", "--config", inputs[kind]))
    if kind == "binary_toml":
        assert "not valid TOML" in error_line(run("segment", inputs["raw"], "-o", tmp_path / "s.zarr", "--pipeline",
                                                  inputs[kind]))
    if kind == "binary_yaml":
        assert "invalid cluster profile" in error_line(run("predict", inputs["raw"], "-o", tmp_path / "p.zarr",
                                                           "--cluster", inputs[kind]))


def test_degenerate_and_unusual_volumes(inputs, tmp_path: Path) -> None:
    for args in (["export", inputs["empty"], tmp_path / "e.tif"], ["label", inputs["empty"], "-o", tmp_path / "l.zarr"],
                 ["info", inputs["empty"]]):
        assert "empty axis" in error_line(run(*args))
    line = error_line(run("export", inputs["corrupt"], tmp_path / "c.tif"))
    assert "damaged" in line and str(inputs["corrupt"]) in line
    assert not (tmp_path / "c.tif").exists()
    # int64 TIFF (tifffile's 'q' dtype) imports; nothing is left behind by refused imports
    assert run("import", inputs["int64_tif"], tmp_path / "i64.zarr", "--no-progress").exit_code == 0
    np.testing.assert_array_equal(open_volume(tmp_path / "i64.zarr").read(open_volume(tmp_path / "i64.zarr").roi),
                                  tifffile.imread(inputs["int64_tif"]))
    assert "complex64" in error_line(run("import", inputs["complex_tif"], tmp_path / "c.zarr"))
    assert not (tmp_path / "c.zarr").exists()


# ---------------------------------------------------------------------------------------------
# resource guards: one Error line with the estimate and the limit, before anything is built


def test_huge_checkpoint_config_is_refused_before_building(inputs, tmp_path: Path) -> None:
    line = error_line(run("predict", inputs["raw"], "-o", tmp_path / "p.zarr", "--model", inputs["ckpt_huge"]))
    assert re.search(r"has [\d,]+ parameters, [\d.]+ GiB as float32, but [\d.]+ GiB is available", line), line
    assert not (tmp_path / "p.zarr").exists()


def test_huge_training_patch_is_refused(inputs, tmp_path: Path) -> None:
    line = error_line(run("train", "--raw", inputs["raw"], "--labels", inputs["seg"], "-o", tmp_path / "ck",
                          "--patch-shape", "4096,4096"))
    assert re.search(r"needs about [\d.]+ GiB .* but [\d.]+ GiB is available", line), line
    assert not (tmp_path / "ck").exists()


def test_tiny_label_blocks_are_refused(inputs, tmp_path: Path) -> None:
    line = error_line(run("label", inputs["big"], "-o", tmp_path / "l.zarr", "--block-size", "1,1,1"))
    assert "blocks, more than the 1,000,000" in line
    line = error_line(run("label", inputs["big"], "-o", tmp_path / "l.zarr", "--block-size", "4096,8192,8192"))
    assert re.search(r"needs about [\d.]+ TiB but a worker has [\d.]+ GiB", line), line
    assert not (tmp_path / "l.zarr").exists()


def test_synth_asks_before_writing_petabytes(tmp_path: Path) -> None:
    line = error_line(run("synth", tmp_path / "s.zarr", "--shape", "100000,100000,100000"))
    assert "8.0 PiB" in line and "--yes" in line
    assert not (tmp_path / "s.zarr").exists()


def test_os_errors_become_one_line() -> None:
    import errno

    from emseg.cli import describe_os_error

    text = describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/data/out.zarr/0/c/0/0/0"))
    assert text.startswith("/data/out.zarr/0/c/0/0/0: No space left on device; free some space")
    assert describe_os_error(PermissionError(errno.EACCES, "Permission denied", "/x")).startswith("/x: Permission denied")
