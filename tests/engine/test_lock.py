"""Run locks: a second run on an output in use fails clearly, also with --overwrite; dead owners are taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from emseg.cli import cli
from emseg.engine.lock import acquire, is_stale, lock_path, read_owner, release, run_lock
from emseg.errors import OutputInUseError
from emseg.io import open_volume
from tests.support import environment

EMSEG = [str(Path(sys.executable).parent / "emseg")]


def test_lock_is_exclusive_reentrant_and_released(tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    path = acquire(out, "predict")
    assert path == lock_path(out) and path.name == ".out.zarr.emseg-lock"
    owner = read_owner(path)
    assert owner is not None and owner["pid"] == os.getpid() and owner["command"] == "predict"
    with run_lock(out, "label"):  # re-entrant: segment runs predict and label under its own lock
        assert path.exists()
    assert path.exists()
    release(out)
    assert not path.exists()


def hold_lock(out: Path, command: str) -> subprocess.Popen[str]:
    """Another process that holds ``out``'s run lock as ``emseg COMMAND`` (returns once it holds it)."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from emseg.engine.lock import acquire; acquire(sys.argv[1], sys.argv[2]); "
        "print('held', flush=True); time.sleep(60)"), str(out), command], stdout=subprocess.PIPE, text=True,
        env=environment())
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_lock_held_by_live_process_refuses(tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    holder = hold_lock(out, "synth")
    try:
        with pytest.raises(OutputInUseError, match=rf"in use by emseg synth \(pid {holder.pid} on .*remove the lock file"):
            acquire(out, "predict")
        # the same for an owner on another node whose heartbeat is fresh
        assert not is_stale(lock_path(out), {**read_owner(lock_path(out)), "host": "elsewhere"})
    finally:
        holder.kill()
        holder.wait()
    # the owner is gone (SIGKILL): its lock is stale and is taken over
    assert is_stale(lock_path(out), read_owner(lock_path(out)))
    with run_lock(out, "predict") as path:
        assert read_owner(path)["pid"] == os.getpid()


def test_stale_heartbeat_of_another_host_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    path = lock_path(out)
    path.write_text(json.dumps({"host": "node-that-died", "pid": 1, "command": "label", "since": 0, "token": "x"}))
    assert not is_stale(path, read_owner(path))  # fresh heartbeat: alive as far as we can tell
    old = time.time() - 3600
    os.utime(path, (old, old))
    assert is_stale(path, read_owner(path))
    with run_lock(out, "label"):
        assert read_owner(path)["host"] != "node-that-died"
    assert not path.exists()


def test_heartbeat_touches_the_lock(tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    path = acquire(out, "x")
    try:
        from emseg.engine import lock as lock_module

        held = lock_module._held[path]
        old = time.time() - 100
        os.utime(path, (old, old))
        held.stop.set()  # restart the beat with a short interval
        held.thread.join()
        import threading

        stop = threading.Event()
        thread = threading.Thread(target=lock_module._beat, args=(path, held.token, stop, 0.05), daemon=True)
        thread.start()
        time.sleep(0.3)
        stop.set()
        thread.join()
        assert time.time() - path.stat().st_mtime < 5
    finally:
        release(out)


def _wait_for_lock(out: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        owner = read_owner(lock_path(out))
        if owner is not None and owner.get("pid") == proc.pid:
            return
        if proc.poll() is not None:
            pytest.fail(f"the first run ended before taking its lock: {proc.communicate()}")
        time.sleep(0.05)
    pytest.fail("the first run never took its lock")


@pytest.mark.slow
def test_concurrent_run_and_overwrite_race(tmp_path: Path) -> None:
    """Run B on the output of running run A: refused, with and without --overwrite; A's result is whole."""
    out = tmp_path / "vol.zarr"
    synth = [*EMSEG, "synth", str(out), "--shape", "96,256,256", "--seed", "4", "--no-progress"]
    first = subprocess.Popen(synth, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())
    _wait_for_lock(out, first)
    others = [subprocess.Popen([*synth[:-3], "--seed", "5", *flags, "--no-progress"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=environment())
              for flags in ([], ["--overwrite"])]
    for proc in others:
        proc.wait(timeout=120)
    assert first.poll() is None, "the first run ended before the others tried: enlarge its volume"
    second, race = (subprocess.CompletedProcess(p.args, p.returncode, *p.communicate()) for p in others)
    assert first.wait(timeout=300) == 0, first.communicate()
    for result in (second, race):
        assert result.returncode == 1, result
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
        assert f"in use by emseg synth (pid {first.pid}" in lines[0]
    # A's output is complete and is exactly what seed 4 gives alone
    alone = tmp_path / "alone.zarr"  # made in this process
    assert CliRunner().invoke(cli, ["synth", str(alone), "--shape", "96,256,256", "--seed", "4", "--no-progress"]).exit_code == 0
    np.testing.assert_array_equal(open_volume(out).read(open_volume(out).roi), open_volume(alone).read(open_volume(alone).roi))
    assert not lock_path(out).exists()


def test_agglomerate_refuses_an_output_in_use(tmp_path: Path) -> None:
    """`emseg agglomerate OUT/labels/fragments` takes the lock of OUT, the image `emseg segment` locks."""
    out = tmp_path / "out.zarr"
    holder = hold_lock(out, "segment")
    try:
        run = subprocess.run([*EMSEG, "agglomerate", str(out / "labels" / "fragments"), "--thresholds", "0.5",
                              "--no-progress"], capture_output=True, text=True, env=environment())
        errors = [line for line in run.stderr.splitlines() if line.startswith("Error:")]
        assert run.returncode == 1 and len(errors) == 1 and "Traceback" not in run.stderr, run.stderr
        assert f"in use by emseg segment (pid {holder.pid}" in errors[0]
    finally:
        holder.kill()
        holder.wait()
