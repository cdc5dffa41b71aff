"""Outputs through symlinks, inputs of the wrong kind, ragged files, locks on a full disk.

Each case runs the real command on real stores: the output a symlink points to is what is checked,
locked and replaced; a store emseg did not make is never written, input or not.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner

from emseg.cli import cli
from emseg.engine.lock import acquire, lock_path, read_owner, release
from emseg.errors import OutputInUseError
from tests.conftest import tree_digest
from tests.support import environment, small_tmpfs


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def error_line(result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def foreign_store(path: Path, kind: str) -> Path:
    """A zarr store emseg did not make: a plain array, or an OME-Zarr image of another tool."""
    if kind == "array":
        zarr.create_array(str(path), shape=(8, 32, 32), chunks=(4, 16, 16), dtype="uint8")[:] = 7
    else:
        group = zarr.open_group(str(path), mode="w")
        group.attrs["ome"] = {"version": "0.5", "multiscales": [{
            "axes": [{"name": a, "type": "space"} for a in "zyx"],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1]}]}]}]}
        group.create_array("0", shape=(8, 32, 32), chunks=(4, 16, 16), dtype="uint8")[:] = 9
    return path


# ---------------------------------------------------------------------------------------------
# --overwrite through a symlink


@pytest.fixture(scope="module")
def em(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic EM volume large enough for the bundled 2-D model."""
    path = tmp_path_factory.mktemp("em") / "em.zarr"
    result = run("synth", path, "--shape", "4,128,128", "--voxel-size", "40,4,4", "--no-progress")
    assert result.exit_code == 0, result.output
    return path


@pytest.mark.parametrize("kind", ["array", "ome"])
@pytest.mark.parametrize("command", ["predict", "import", "synth"])
def test_overwrite_through_a_symlink_never_replaces_a_foreign_store(inputs, em: Path, tmp_path: Path, kind: str,
                                                                    command: str) -> None:
    target = foreign_store(tmp_path / "foreign.zarr", kind)
    link = tmp_path / "link.zarr"
    link.symlink_to(target.name)
    before = tree_digest(target)
    args = {"predict": ["predict", em, "-o", link],
            "import": ["import", inputs["tif"], link],
            "synth": ["synth", link, "--shape", "8,16,16"]}[command]
    line = error_line(run(*args, "--overwrite", "--no-progress"))
    assert str(target) in line and "not made by emseg" in line
    assert tree_digest(target) == before
    assert link.is_symlink()


def test_overwrite_through_a_symlink_replaces_emseg_output_where_it_lies(inputs, tmp_path: Path) -> None:
    real = tmp_path / "real.zarr"
    assert run("import", inputs["tif"], real, "--no-progress").exit_code == 0
    link = tmp_path / "link.zarr"
    link.symlink_to(real)
    result = run("import", inputs["tif"], link, "--overwrite", "--voxel-size", "2,2,2", "--no-progress")
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and link.resolve() == real
    assert json.loads((real / "zarr.json").read_text())["attributes"]["emseg"]["status"] == "complete"


# ---------------------------------------------------------------------------------------------
# run locks: one lock per output on disk, and whole or absent


def test_a_second_run_through_a_symlink_is_refused(inputs, tmp_path: Path) -> None:
    real = tmp_path / "out.zarr"
    link = tmp_path / "alias.zarr"
    link.symlink_to(real)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from emseg.engine.lock import acquire; acquire(sys.argv[1], 'import'); "
        "print('held', flush=True); time.sleep(60)"), str(real)], stdout=subprocess.PIPE, text=True,
        env=environment())
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert lock_path(link) == lock_path(real)
        with pytest.raises(OutputInUseError, match="in use by emseg import"):
            acquire(link, "predict")
        assert "in use by emseg import" in error_line(run("import", inputs["tif"], link, "--no-progress"))
        assert not real.exists()
    finally:
        holder.kill()
        holder.wait()


def _fill(folder: Path) -> Path:
    """Fill the filesystem of ``folder`` to the last byte; returns the filler file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for size in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_disk_full_while_taking_the_lock_leaves_no_lock(inputs, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "full", "64k") as disk:
        if disk is None:
            pytest.skip("cannot mount a tmpfs here (needs root and mount)")
        out = disk / "out.zarr"
        filler = _fill(disk)
        with pytest.raises(OSError) as caught:
            acquire(out, "import")
        assert caught.value.errno == errno.ENOSPC
        assert not lock_path(out).exists()
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no temporary file left either
        line = error_line(run("import", inputs["tif"], out, "--no-progress"))
        assert "No space left" in line and "in use" not in line
        filler.unlink()
        result = run("import", inputs["tif"], out, "--no-progress")  # at once, not after the stale timeout
        assert result.exit_code == 0, result.output


def test_an_empty_lock_file_is_taken_over(tmp_path: Path) -> None:
    """An empty lock (what a full disk left behind before locks were published whole) does not block for minutes."""
    out = tmp_path / "out.zarr"
    lock = lock_path(out)
    lock.write_bytes(b"")
    then = time.time() - 10
    os.utime(lock, (then, then))
    acquire(out, "predict")
    try:
        assert read_owner(lock)["pid"] == os.getpid()
    finally:
        release(out)


# ---------------------------------------------------------------------------------------------
# inputs of the wrong kind, or damaged


def test_agglomerate_refuses_raw_em_and_leaves_it_untouched(inputs) -> None:
    before = tree_digest(inputs["raw"])
    line = error_line(run("agglomerate", inputs["raw"], "--no-progress"))
    assert "not a prediction" in line
    assert tree_digest(inputs["raw"]) == before
    assert not (inputs["raw"] / "labels" / "fragments").exists()


def test_agglomerate_refuses_a_prediction_emseg_did_not_make(tmp_path: Path) -> None:
    pred = tmp_path / "theirs.zarr"
    group = zarr.open_group(str(pred), mode="w")
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": "c", "type": "channel"}] + [{"name": a, "type": "space"} for a in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1, 1]}]}]}]}
    group.create_array("0", shape=(1, 8, 32, 32), chunks=(1, 4, 16, 16), dtype="uint8")[:] = 100
    before = tree_digest(pred)
    assert "not made by emseg" in error_line(run("agglomerate", pred, "--no-progress"))
    assert tree_digest(pred) == before


def test_import_refuses_a_ragged_tiff(tmp_path: Path) -> None:
    ragged = tmp_path / "ragged.tif"
    with tifffile.TiffWriter(ragged) as tif:
        tif.write(np.ones((128, 128), np.uint8))
        tif.write(np.ones((64, 64), np.uint8))
    line = error_line(run("import", ragged, tmp_path / "r.zarr", "--no-progress"))
    assert "2 image series" in line and "(64, 64)" in line
    assert not (tmp_path / "r.zarr").exists()


def test_import_refuses_truncated_tiff_and_empty_hdf5(tmp_path: Path) -> None:
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, np.random.default_rng(0).integers(0, 255, (8, 64, 64), dtype=np.uint8))
    trunc = tmp_path / "trunc.tif"
    trunc.write_bytes(full.read_bytes()[:20000])
    assert "truncated TIFF" in error_line(run("import", trunc, tmp_path / "t.zarr", "--no-progress"))
    empty = tmp_path / "empty.h5"
    with h5py.File(empty, "w") as f:
        f["d"] = np.zeros((0, 5, 5), np.uint8)
    assert "empty" in error_line(run("import", empty, tmp_path / "e.zarr", "--no-progress"))


# ---------------------------------------------------------------------------------------------
# integrity: --verify never reports clean while damage is on disk, and a rerun repairs it


def test_verify_keeps_reporting_damage_until_a_rerun_repairs_it(tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    synth = ["synth", out, "--shape", "16,64,64", "--chunks", "8,32,32", "--block-size", "8,32,32", "--no-progress"]
    assert run(*synth).exit_code == 0
    chunk = out / "0" / "c" / "1" / "0" / "1"
    good = chunk.read_bytes()
    stat = chunk.stat()
    chunk.write_bytes(bytes(reversed(good)))  # same size, other bytes, the old time: a stat cannot see it
    os.utime(chunk, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert "damaged" in error_line(run("info", out, "--verify"))
    second = error_line(run("info", out, "--verify"))  # the garbage is still there: never "all match"
    assert "not done" in second
    result = run(*synth)  # the rerun recomputes the marked blocks
    assert result.exit_code == 0, result.output
    assert chunk.read_bytes() == good
    result = run("info", out, "--verify")
    assert result.exit_code == 0 and "all chunks match" in result.stderr, result.output


def test_a_damaged_prediction_chunk_points_agglomerate_to_verify(write_prediction, scheduler) -> None:
    rng = np.random.default_rng(0)
    pred = write_prediction(rng.random((8, 32, 32)).astype(np.float32), chunks=(4, 16, 16))
    chunk = pred / "0" / "c" / "0" / "1" / "0" / "1"
    data = bytearray(chunk.read_bytes())
    data[4:8] = b"\xf0\xff\xff\xff"  # same size; the header's size < 0
    chunk.write_bytes(bytes(data))
    line = error_line(run("agglomerate", pred, "--no-progress", "--scheduler", scheduler))
    assert "damaged" in line and f"emseg info --verify {pred}" in line, line
    assert "rerun the same command" not in line  # it would fail again: the input must be repaired first


def test_verify_an_output_holding_a_run_scratch(tmp_path: Path) -> None:
    from emseg.engine.scratch import require_scratch

    out = tmp_path / "s.zarr"
    assert run("synth", out, "--shape", "8,32,32", "--no-progress").exit_code == 0
    require_scratch(out, "fragments", shape=(8, 32, 32), dtype="uint64", chunks=(8, 32, 32))
    result = run("info", out, "--verify")
    assert result.exit_code == 0, result.output
    assert "all chunks match" in result.stderr


# ---------------------------------------------------------------------------------------------
# cluster options that cannot work are refused up front


def test_bad_interface_and_scheduler_are_one_error_line(em: Path, tmp_path: Path) -> None:
    profile = tmp_path / "if.yaml"
    profile.write_text("kind: local\nworkers: 1\ninterface: nosuchif0\n")
    line = error_line(run("predict", em, "-o", tmp_path / "a.zarr", "--cluster", profile, "--no-progress"))
    assert "nosuchif0" in line and "does not exist" in line
    line = error_line(run("predict", em, "-o", tmp_path / "b.zarr", "--scheduler", "not a url", "--no-progress"))
    assert "not a scheduler address" in line
    assert not (tmp_path / "a.zarr").exists()


# ---------------------------------------------------------------------------------------------
# an imported volume carries a chunk census; an interrupted precomputed export is never taken as finished


def test_a_chunk_deleted_from_an_imported_volume_is_refused(inputs, tmp_path: Path) -> None:
    out = tmp_path / "i.zarr"
    assert run("import", inputs["tif"], out, "--chunks", "4,16,16", "--no-progress").exit_code == 0
    chunks = sorted(p for p in (out / "0").rglob("*") if p.is_file() and p.name != "zarr.json")
    assert len(chunks) == 8
    chunks[3].unlink()  # read as zeros by zarr: the census is what notices
    assert "chunks were deleted" in error_line(run("export", out, tmp_path / "e.tif", "--no-progress"))
    assert "chunks were deleted" in error_line(run("segment", out, "-o", tmp_path / "s.zarr", "--dry-run"))
    assert not (tmp_path / "e.tif").exists()


def test_an_interrupted_precomputed_export_is_flagged_and_not_served(tmp_path: Path) -> None:
    from tests.cli.test_faults import EMSEG, kill_when_running

    image = tmp_path / "s.zarr"
    assert run("synth", image, "--shape", "32,256,256", "--chunks", "16,64,64", "--no-progress").exit_code == 0
    pc = tmp_path / "pc"
    cmd = [EMSEG, "export", str(image), str(pc), "--format", "precomputed", "--mesh", "--no-progress"]
    kill_when_running(cmd, pc, delay=0.0, until=lambda: (pc / "image" / "info").exists())
    result = run("info", pc)
    assert result.exit_code == 0, result.output
    assert "emseg status: incomplete" in result.stdout and "interrupted" in result.stderr
    assert "interrupted export" in error_line(run("view", image, "--precomputed", pc, "--public"))
    (pc / "labels").mkdir(exist_ok=True)
    stray = pc / "labels" / ".0:0.1a2b3c4d.tmp"  # what a kill between write and rename leaves
    stray.write_bytes(b"\0" * 4096)
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=environment(), timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert not [p for p in pc.rglob("*") if ".tmp" in p.name]
    result = run("info", pc)
    assert "emseg status: complete" in result.stdout and "interrupted" not in result.stderr
    assert run("view", image, "--precomputed", pc, "--public").exit_code == 0


# ---------------------------------------------------------------------------------------------
# CLI conventions: usage errors, progress bars, environment variables


@pytest.mark.parametrize("args", [["predict", "--nope"], ["nosuch"], ["--bad"], ["synth", "x.zarr", "--shape", "1,2"],
                                  ["synth"], ["label", "p.zarr", "-o", "l.zarr", "--connectivity", "7"]])
def test_usage_errors_are_one_line_and_exit_2(args: list[str]) -> None:
    result = run(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "--help" in lines[0], result.stderr


def test_progress_bars_only_on_a_terminal_unless_asked(tmp_path: Path) -> None:
    quiet = run("synth", tmp_path / "a.zarr", "--shape", "8,16,16")  # CliRunner's stderr is no terminal
    assert quiet.exit_code == 0 and "\r" not in quiet.stderr and "block/s" not in quiet.stderr
    shown = run("synth", tmp_path / "b.zarr", "--shape", "8,16,16", "--progress")
    assert shown.exit_code == 0 and "block/s" in shown.stderr


def test_one_progress_flag_on_every_command_with_a_bar() -> None:
    from emseg.cli import cli as group

    for name in ("import", "export", "synth", "predict", "label", "segment", "agglomerate"):
        command = group.get_command(click_context(), name)
        flags = [p for p in command.params if "--progress" in p.opts or "--no-progress" in p.opts
                 or "--no-progress" in getattr(p, "secondary_opts", [])]
        assert len(flags) == 1 and flags[0].opts == ["--progress"] and flags[0].secondary_opts == ["--no-progress"], name


def click_context():
    import click

    return click.Context(cli)


def test_options_from_environment_variables_as_the_readme_says(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "EMSEG_<COMMAND>_<OPTION>" in readme and "exit code 2 for a usage error" in readme
    result = CliRunner().invoke(cli, ["synth", str(tmp_path / "e.zarr")], env={"EMSEG_SYNTH_SHAPE": "8,16,16",
                                                                                 "EMSEG_SYNTH_SEED": "3"})
    assert result.exit_code == 0, result.output
    assert zarr.open_array(str(tmp_path / "e.zarr" / "0")).shape == (8, 16, 16)


# ---------------------------------------------------------------------------------------------
# silent wrong results become refusals


def test_a_checkpoint_with_nan_weights_is_refused(em: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.numpy import load_file, save_file

    bundled = Path(__file__).resolve().parents[2] / "emseg" / "models" / "bundled"
    ckpt = tmp_path / "nan_ckpt"
    ckpt.mkdir()
    shutil.copy(bundled / "config.json", ckpt / "config.json")
    weights = load_file(str(bundled / "model.safetensors"))
    name = next(k for k, v in weights.items() if v.dtype.kind == "f" and v.size > 1)
    weights[name] = np.full_like(weights[name], np.nan)
    save_file(weights, str(ckpt / "model.safetensors"))
    line = error_line(run("predict", em, "-o", tmp_path / "p.zarr", "--model", ckpt, "--no-progress"))
    assert "NaN" in line and name in line
    assert not (tmp_path / "p.zarr").exists()


def test_devices_this_machine_does_not_have_are_refused(em: Path, tmp_path: Path) -> None:
    from emseg.cluster.local import visible_gpus

    missing = max(visible_gpus(), default=-1) + 5
    line = error_line(run("predict", em, "-o", tmp_path / "p.zarr", "--devices", str(missing), "--no-progress"))
    assert f"no CUDA device [{missing}]" in line


def test_a_voxel_size_of_zero_in_the_metadata_is_refused(inputs) -> None:
    assert "not positive and finite" in error_line(run("info", inputs["bad_scale"]))


def test_a_zarr_v2_output_keeps_its_state_in_zarr_v2(tmp_path: Path) -> None:
    """A v3 ``zarr.json`` beside ``.zgroup`` made every reader of a v2 output warn."""
    from emseg.engine.ledger import Ledger
    from emseg.engine.scratch import require_scratch
    from emseg.io import create_volume

    out = tmp_path / "v2.zarr"
    create_volume(out, shape=(8, 16, 16), dtype="uint8", chunks=(8, 16, 16), voxel_size=(1, 1, 1), zarr_format=2)
    require_scratch(out, "fragments", shape=(8, 16, 16), dtype="uint64", chunks=(8, 16, 16))
    Ledger(out, "label").create(4, "f", {})
    assert not list(out.rglob("zarr.json"))
    zarr.open_group(str(out / "emseg_state"), mode="r")  # no ZarrUserWarning (warnings are errors here)
