"""``emseg predict`` through click, and a real SIGKILL of a running prediction followed by a resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from emseg.cli import cli
from emseg.engine.ledger import Ledger
from emseg.io import open_volume
from tests.conftest import tree_digest
from tests.support import invoke_on, scheduler_of, smooth_volume


def run(*args: str):
    return CliRunner().invoke(cli, ["predict", *args], catch_exceptions=False)


def test_help() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for option in ("--model", "--block-size", "--halo", "--batch-size", "--tta", "--precision", "--workers",
                   "--devices", "--cluster", "--scheduler", "--dry-run", "--overwrite", "--dtype"):
        assert option in result.output


def test_dry_run_prints_the_plan_and_writes_nothing(checkpoints, write_volume, tmp_path) -> None:
    source = write_volume(smooth_volume((4, 64, 64)))
    out = tmp_path / "out.zarr"
    result = run(str(source), "-o", str(out), "--model", str(checkpoints(2)), "--tile-size", "1,32,32",
                 "--block-size", "2,64,32", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "blocks     4 of 2x64x32" in result.output and "halo       0x20x20" in result.output
    assert not out.exists()

def test_a_voxel_size_far_from_the_bundled_models_is_one_warning(tmp_path) -> None:
    volume = tmp_path / "fib.zarr"
    assert CliRunner().invoke(cli, ["synth", str(volume), "--shape", "8,128,128", "--voxel-size", "30,30,30",
                                    "--no-progress"]).exit_code == 0
    run = subprocess.run([sys.executable, "-c", "from emseg.cli import main; main()", "segment", str(volume), "-o",
                          str(tmp_path / "out.zarr"), "--dry-run"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert run.returncode == 0, run.stderr[-2000:]
    warnings = [line for line in run.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "far (>1.5x" in warnings[0], warnings  # said once, by the model choice


@pytest.mark.parametrize(
    ("make", "options", "message"),
    [
        ("two_channels", [], r"has 2 channel\(s\) but the model"),
        ("plain", ["--tile-size", "1,32,32", "--block-size", "1,16,16"], "smaller than the model's tile core"),
        ("thin", ["--model-3d"], "too small for the model"),
        ("nan", ["--scheduler"], "NaN/inf voxel"),  # read on a worker of the session's cluster
        ("plain", ["--devices", "x"], None),
    ],
)
def test_bad_input_is_one_error_line(checkpoints, write_volume, tmp_path, cluster2, make, options, message) -> None:
    data = {"two_channels": np.stack([smooth_volume((2, 32, 32))] * 2), "plain": smooth_volume((2, 32, 32)),
            "thin": smooth_volume((4, 32, 32)), "nan": smooth_volume((2, 32, 32), dtype="float32")}[make]
    if make == "nan":
        data[0, 3, 3] = np.nan
    source = write_volume(data)
    before = tree_digest(source)
    model = checkpoints(3) if "--model-3d" in options else checkpoints(2)
    options = [o for o in options if o != "--model-3d"]
    with scheduler_of(cluster2) as address:
        options = [a for o in options for a in ((o, address) if o == "--scheduler" else (o,))]
        result = run(str(source), "-o", str(tmp_path / "out.zarr"), "--model", str(model), "--no-progress", *options)
    if message is None:  # a usage error
        assert result.exit_code == 2 and "--devices" in result.output
    else:
        assert result.exit_code == 1, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "Traceback" not in result.output
        assert __import__("re").search(message, errors[0])
    assert tree_digest(source) == before


def _args(source: Path, out: Path, model: Path) -> list[str]:
    return ["predict", str(source), "-o", str(out), "--model", str(model), "--block-size", "8,32,32",
            "--tile-size", "8,16,16", "--chunks", "8,32,32", "--no-progress", "--json"]


def _command(source: Path, out: Path, model: Path) -> list[str]:
    return [sys.executable, "-c", "from emseg.cli import main; main()", *_args(source, out, model), "--workers", "1"]


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_completes_bit_identically(checkpoints, write_volume, tmp_path, cluster2) -> None:
    source = write_volume(smooth_volume((40, 64, 64), seed=7), chunks=(8, 32, 32))
    model = checkpoints(3, padding="same")
    killed, clean = tmp_path / "killed.zarr", tmp_path / "clean.zarr"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(_command(source, killed, model), start_new_session=True, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = 5 * 2 * 2
    done: dict[int, object] = {}
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            if (killed / "emseg_state" / "predict" / "zarr.json").exists():
                done = Ledger(killed, "predict").done()
                if len(done) >= 3:
                    break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = Ledger(killed, "predict").done()
    assert 3 <= len(done) < total, f"the run was not caught mid-way ({len(done)} of {total} blocks done)"
    rerun = invoke_on(cluster2, *_args(source, killed, model))  # the resume: in this process
    assert rerun.exit_code == 0, rerun.output[-2000:]
    report = __import__("json").loads(rerun.stdout.strip().splitlines()[-1])
    assert (report["computed"], report["skipped"]) == (total - len(done), len(done))
    from emseg.workflows.predict import predict

    predict(source, clean, checkpoint=model, block_size=(8, 32, 32), tile_size=(8, 16, 16), chunks=(8, 32, 32),
            client=cluster2, progress=False)
    np.testing.assert_array_equal(open_volume(killed).array[:], open_volume(clean).array[:])
