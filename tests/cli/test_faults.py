"""Faults injected for real: disk full on a small tmpfs, SIGKILL mid-run, damaged data, open ports.

Each test asserts that nothing is lost (inputs byte-identical, finished work kept or redone to the
same bytes) and that the message is one clear ``Error:`` line with the right exit code.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from emseg.cli import cli
from emseg.engine.lock import lock_path, read_owner
from emseg.errors import EmsegError, IncompleteOutputError
from emseg.io import create_volume, mark_complete, open_volume
from tests.conftest import tree_digest
from tests.support import environment, invoke_on, small_tmpfs

EMSEG = str(Path(sys.executable).parent / "emseg")


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(("import", "export", "synth"))]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return errors[0]


def random_raw(tmp_path: Path, shape=(16, 256, 256)) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, shape, dtype=np.uint8)  # incompressible


# ---------------------------------------------------------------------------------------------
# disk full


@pytest.fixture
def full_disk(tmp_path: Path):
    with small_tmpfs(tmp_path / "small", "256k") as mount:
        if mount is None:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        yield mount


def test_disk_full_import(tmp_path: Path, full_disk: Path) -> None:
    tif = tmp_path / "raw.tif"
    tifffile.imwrite(tif, random_raw(tmp_path))
    before = tree_digest(tif)
    result = CliRunner().invoke(cli, ["import", str(tif), str(full_disk / "raw.zarr"), "--no-progress"])
    assert result.exit_code == 1, result.output
    line = one_error_line(result.stderr)
    assert "No space left on device" in line and str(full_disk) in line
    assert tree_digest(tif) == before
    with pytest.raises((IncompleteOutputError, EmsegError)):  # never mistaken for a finished import
        open_volume(full_disk / "raw.zarr")


def test_disk_full_synth(full_disk: Path) -> None:
    result = CliRunner().invoke(cli, ["synth", str(full_disk / "s.zarr"), "--shape", "32,128,128", "--no-progress"])
    assert result.exit_code != 0, result.output
    line = one_error_line(result.stderr)
    assert "No space left on device" in line and str(full_disk) in line
    with pytest.raises(EmsegError):
        open_volume(full_disk / "s.zarr")


@pytest.mark.parametrize("fmt", ["tiff", "precomputed"])
def test_disk_full_export(tmp_path: Path, full_disk: Path, fmt: str) -> None:
    raw = tmp_path / "raw.zarr"
    vol = create_volume(raw, shape=(16, 256, 256), dtype="uint8", chunks=(8, 128, 128), voxel_size=(40, 4, 4))
    vol.write(vol.roi, random_raw(tmp_path))
    mark_complete(raw)
    before = tree_digest(raw)
    out = full_disk / ("raw.tif" if fmt == "tiff" else "pc")
    result = CliRunner().invoke(cli, ["export", str(raw), str(out), "--format", fmt, "--no-progress"])
    assert result.exit_code != 0, result.output
    line = one_error_line(result.stderr)
    assert "No space left on device" in line, line
    assert tree_digest(raw) == before
    if fmt == "tiff":
        assert list(full_disk.iterdir()) == []  # no truncated TIFF (nor its partial file) left behind


def test_disk_full_pyramids_keep_level_0_and_resume(tmp_path: Path) -> None:
    from emseg.export.pyramid import build_pyramids

    with small_tmpfs(tmp_path / "small", "1200k") as mount:
        if mount is None:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        image = mount / "img.zarr"
        data = random_raw(tmp_path, (16, 256, 256))
        vol = create_volume(image, shape=data.shape, dtype="uint8", chunks=(8, 64, 64), voxel_size=(8, 8, 8))
        vol.write(vol.roi, data)
        mark_complete(image)
        filler = mount / "filler"
        free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
        filler.write_bytes(b"\0" * max(0, free - 20_000))  # leave room for a few chunks only
        with pytest.raises((EmsegError, OSError)) as err:
            build_pyramids(image, levels=2, progress=False)
        if isinstance(err.value, OSError) and not isinstance(err.value, EmsegError):
            assert err.value.errno == errno.ENOSPC
        np.testing.assert_array_equal(open_volume(image).read(vol.roi), data)  # level 0 intact
        filler.unlink()
        subprocess.run(["mount", "-o", "remount,size=8m", str(mount)], check=True)
        build_pyramids(image, levels=2, progress=False)
        assert len(open_volume(image).levels) > 1


@pytest.mark.slow
def test_disk_full_label_exits_3_and_resumes(tmp_path: Path, connection) -> None:
    """A transient failure (disk full on the workers) exits 3; after space is freed the rerun completes."""
    mask = np.zeros((16, 64, 64), np.uint8)
    mask[2:14, 5:30, 5:60] = 1
    mask[2:14, 35:60, 5:60] = 1
    src = tmp_path / "mask.zarr"
    vol = create_volume(src, shape=mask.shape, dtype="uint8", chunks=(8, 32, 32), voxel_size=(1, 1, 1))
    vol.write(vol.roi, mask)
    mark_complete(src)
    with small_tmpfs(tmp_path / "small", "96k") as mount:
        if mount is None:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        out = mount / "labels.zarr"
        args = ["label", str(src), "-o", str(out), "--block-size", "8,32,32", "--no-progress"]
        cmd = [EMSEG, *args, "--workers", "1"]
        filler = mount / "filler"
        free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
        filler.write_bytes(b"\0" * max(0, free - 40_000))
        first = subprocess.run(cmd, capture_output=True, text=True, env=environment(), timeout=300)
        assert first.returncode in (1, 3), first
        errors = [line for line in first.stderr.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and "No space left on device" in errors[0] and str(out) in errors[0], first.stderr
        assert "Traceback" not in first.stderr and "Compute Failed" not in first.stderr, first.stderr
        if first.returncode == 3:  # blocks failed: transient, the rerun resumes
            assert "rerun the same command" in errors[0]
        filler.unlink()
        subprocess.run(["mount", "-o", "remount,size=8m", str(mount)], check=True)
        second = invoke_on(connection, *args)  # the rerun, in this process
        assert second.exit_code == 0, second.output
        labels = open_volume(out).read(open_volume(out).roi)
        assert len(np.unique(labels)) == 3  # background and the two slabs


# ---------------------------------------------------------------------------------------------
# SIGKILL mid-run: the lock is taken over and the rerun gives the bytes of an uninterrupted run


def kill_when_running(cmd: list[str], out: Path, delay: float, until: Callable[[], bool] | None = None) -> None:
    """SIGKILL ``cmd`` ``delay`` s after it holds the output's lock (and, with ``until``, once that is true)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        owner = read_owner(lock_path(out))
        if owner is not None and owner.get("pid") == proc.pid and (until is None or until()):
            break
        if proc.poll() is not None:
            pytest.fail(f"{cmd} ended before it was killed")
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_synth_then_the_same_command_resumes(tmp_path: Path) -> None:
    """`emseg synth` is a run_blockwise stage: rerun without --overwrite, it writes only the missing blocks."""
    out, ref = tmp_path / "s.zarr", tmp_path / "ref.zarr"
    args = ["--shape", "64,256,256", "--chunks", "32,64,64", "--block-size", "32,64,64", "--no-progress"]
    cmd = [EMSEG, "synth", str(out), *args]
    kill_when_running(cmd, out, delay=0.0, until=lambda: any((out / "emseg_state").rglob("*c*")) if out.exists() else False)
    with pytest.raises(EmsegError):
        open_volume(out)  # half-written: refused
    rerun = CliRunner().invoke(cli, cmd[1:])  # the rerun, in this process
    assert rerun.exit_code == 0, rerun.output
    reference = CliRunner().invoke(cli, ["synth", str(ref), *args])  # the uninterrupted run, in-process
    assert reference.exit_code == 0, reference.output
    np.testing.assert_array_equal(image_bytes(out), image_bytes(ref))
    np.testing.assert_array_equal(image_bytes(out / "labels" / "ground_truth"), image_bytes(ref / "labels" / "ground_truth"))
    again = CliRunner().invoke(cli, cmd[1:])
    assert again.exit_code == 1 and "already exists" in again.stderr  # a finished one is not rewritten


def image_bytes(path: Path) -> np.ndarray:
    vol = open_volume(path)
    return vol.read(vol.roi)


SHAPE = (64, 512, 512)
"""Big enough that an import or export is still going when it is killed, even on a quiet machine."""


@pytest.fixture(scope="module")
def tif_and_raw(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A TIFF of :data:`SHAPE` and its import, made once: the tests below only read them (and check that)."""
    folder = tmp_path_factory.mktemp("inputs")
    tif = folder / "raw.tif"
    tifffile.imwrite(tif, random_raw(folder, SHAPE))
    raw = folder / "raw.zarr"
    result = CliRunner().invoke(cli, ["import", str(tif), str(raw), "--chunks", "4,128,128", "--no-progress"])
    assert result.exit_code == 0, result.output
    return tif, raw


@pytest.mark.slow
@pytest.mark.parametrize("command", ["synth", "import", "export"])
def test_sigkill_then_rerun(tmp_path: Path, tif_and_raw: tuple[Path, Path], command: str) -> None:
    tif, raw = tif_and_raw
    shape = SHAPE
    inputs = {p: tree_digest(p) for p in (tif, raw)}
    out = tmp_path / {"synth": "s.zarr", "import": "i.zarr", "export": "e.tif"}[command]
    cmd = {"synth": [EMSEG, "synth", str(out), "--shape", "64,256,256", "--chunks", "32,64,64"],
           "import": [EMSEG, "import", str(tif), str(out), "--chunks", "2,64,64"],
           "export": [EMSEG, "export", str(raw), str(out)]}[command] + ["--no-progress"]
    kill_when_running(cmd, out, delay=0.1)
    assert {p: tree_digest(p) for p in inputs} == inputs
    if out.exists() and out.is_dir():  # a half-written store is refused, never read as finished
        with pytest.raises(EmsegError):
            open_volume(out)
    if command == "export":
        assert not out.exists() or tifffile.imread(out).shape == shape
    rerun = CliRunner().invoke(cli, cmd[1:] + (["--overwrite"] if out.exists() else []))  # in this process
    assert rerun.exit_code == 0, rerun.output  # the dead run's lock is taken over
    assert not lock_path(out).exists()
    if command == "synth":
        ref = tmp_path / "ref.zarr"  # the uninterrupted run, in-process
        reference = CliRunner().invoke(cli, ["synth", str(ref), "--shape", "64,256,256", "--chunks", "32,64,64",
                                             "--no-progress"])
        assert reference.exit_code == 0, reference.output
        np.testing.assert_array_equal(image_bytes(out), image_bytes(ref))
    elif command == "import":
        np.testing.assert_array_equal(image_bytes(out), tifffile.imread(tif))
    else:
        np.testing.assert_array_equal(tifffile.imread(out), tifffile.imread(tif))


@pytest.mark.slow
def test_sigkill_label_then_resume(tmp_path: Path, connection) -> None:
    rng = np.random.default_rng(3)
    pred = (rng.random((16, 128, 128)) > 0.3).astype(np.uint8)  # 2 x 4 x 4 blocks of 8,32,32
    src = tmp_path / "mask.zarr"
    vol = create_volume(src, shape=pred.shape, dtype="uint8", chunks=(8, 32, 32), voxel_size=(1, 1, 1))
    vol.write(vol.roi, pred)
    mark_complete(src)
    before = tree_digest(src)
    out = tmp_path / "labels.zarr"
    args = ["label", str(src), "-o", str(out), "--block-size", "8,32,32", "--no-progress"]
    cmd = [EMSEG, *args, "--workers", "1"]
    # killed as soon as the first block records exist (mid-run, whatever the machine's speed)
    kill_when_running(cmd, out, delay=0.0, until=lambda: any((out / "emseg_state").rglob("*c*")) if out.exists() else False)
    assert tree_digest(src) == before
    rerun = invoke_on(connection, *args)  # the rerun, in this process
    assert rerun.exit_code == 0, rerun.output
    import cc3d

    expected = cc3d.connected_components(pred, connectivity=6)
    got = image_bytes(out)
    assert len(np.unique(got)) == len(np.unique(expected))
    pairs = np.unique(np.stack([got.ravel(), expected.ravel()]), axis=1)
    assert pairs.shape[1] == len(np.unique(expected))  # one-to-one: the same partition


# ---------------------------------------------------------------------------------------------
# damaged data: exit 1, one line, no Dask tracebacks, no rerun advice


@pytest.mark.slow
def test_label_on_nan_prediction_exits_1(tmp_path: Path) -> None:
    src = tmp_path / "nan.zarr"
    data = np.full((1, 8, 32, 32), 0.2, np.float32)
    data[0, 3, 5, 5] = np.nan
    vol = create_volume(src, shape=(8, 32, 32), dtype="float32", chunks=(4, 16, 16), voxel_size=(1, 1, 1), channels=1)
    vol.write(vol.roi, data)
    mark_complete(src)
    result = subprocess.run([EMSEG, "label", str(src), "-o", str(tmp_path / "l.zarr"), "--workers", "1",
                             "--no-progress"], capture_output=True, text=True, env=environment(), timeout=300)
    assert result.returncode == 1, result
    line = one_error_line(result.stderr)
    assert "NaN" in line and "rerun" not in line, line


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["damaged chunk", "NaN"])
def test_predict_on_bad_data_exits_1_without_tracebacks(tmp_path: Path, damage: str) -> None:
    raw = tmp_path / "raw.zarr"
    dtype = "uint8" if damage == "damaged chunk" else "float32"
    vol = create_volume(raw, shape=(2, 256, 256), dtype=dtype, chunks=(1, 256, 256), voxel_size=(50, 4, 4))
    data = random_raw(tmp_path, (2, 256, 256)).astype(dtype)
    if damage == "NaN":
        data /= 255  # float EM is taken as 0-1: only the NaN is wrong with it
        data[1, 100, 100] = np.nan
    vol.write(vol.roi, data)
    mark_complete(raw)
    if damage == "damaged chunk":
        chunk = next(f for f in sorted((raw / "0").rglob("*")) if f.is_file() and f.name != "zarr.json")
        # garbage where the blosc frame was (a truncated frame of incompressible data decodes silently
        # as garbage: catching that needs the ledger's checksums, not the codec)
        chunk.write_bytes(b"\x02\x01garbage" * 7)
    before = tree_digest(raw)
    result = subprocess.run([EMSEG, "predict", str(raw), "-o", str(tmp_path / "p.zarr"), "--block-size", "1,256,256",
                             "--workers", "1", "--no-progress"], capture_output=True, text=True, env=environment(),
                            timeout=300)
    assert result.returncode == 1, result
    line = one_error_line(result.stderr)
    assert ("damaged" if damage == "damaged chunk" else "NaN") in line, line
    assert str(raw) in line and "rerun the same command" not in line, line
    assert tree_digest(raw) == before


# ---------------------------------------------------------------------------------------------
# closed by default


def listeners(pid: int) -> set[str]:
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    pids = {p.pid for p in procs}
    return {c.laddr.ip for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in pids}


@pytest.mark.slow
def test_gpu_profile_servers_listen_on_localhost_only(tmp_path: Path) -> None:
    """A run of several workers (``devices:`` where CUDA devices exist, else two CPU worker processes:
    devices that are not there are refused) opens no port beyond 127.0.0.1."""
    import torch

    profile = tmp_path / "gpus.yaml"
    gpus = torch.cuda.device_count()
    profile.write_text("kind: local\ndevices: [0, 1]\n" if gpus >= 2 else "kind: local\nworkers: 2\n")
    raw = tmp_path / "raw.zarr"
    vol = create_volume(raw, shape=(2, 256, 256), dtype="uint8", chunks=(1, 256, 256), voxel_size=(50, 4, 4))
    vol.write(vol.roi, random_raw(tmp_path, (2, 256, 256)))  # a block for each of the two workers
    mark_complete(raw)
    proc = subprocess.Popen([EMSEG, "predict", str(raw), "-o", str(tmp_path / "p.zarr"), "--block-size", "1,256,256",
                             "--cluster", str(profile), "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environment())
    seen: set[str] = set()
    servers = 0
    try:
        while proc.poll() is None:
            try:
                found = listeners(proc.pid)
            except Exception:  # noqa: BLE001 - processes come and go while we look
                found = set()
            seen |= found
            servers = max(servers, len(found))
            time.sleep(0.1)
    finally:
        proc.kill() if proc.poll() is None else None
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert seen, "no listening socket seen: the probe did not observe the run"
    assert seen <= {"127.0.0.1"}, f"servers listen on {seen}"


def test_profile_interface_and_slurm_tls() -> None:
    from emseg.cluster import ClusterProfile, SlurmOptions
    from emseg.cluster.local import _listen
    from emseg.cluster.slurm import cluster_kwargs

    assert _listen(ClusterProfile()) == {"host": "127.0.0.1"}
    assert _listen(ClusterProfile(interface="eth0")) == {"interface": "eth0"}
    plain = cluster_kwargs(ClusterProfile(kind="slurm", security=False), "emseg-test")
    assert "security" not in plain
    tls = cluster_kwargs(ClusterProfile(kind="slurm", slurm=SlurmOptions(interface="ib0")), "emseg-test")
    assert tls["protocol"] == "tls://" and tls["interface"] == "ib0"
    assert tls["security"].require_encryption and tls["security"].tls_scheduler_cert
