"""``emseg segment --cluster <slurm profile>`` end to end on the dev SLURM: same bytes as the local run,
no job left behind after success, failure or Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from emseg.cli import cli
from tests.support import invoke_on

from .conftest import TEST_PROFILE, queue, wait_queue_empty

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("slurm")]

EMSEG = [sys.executable, "-c", "from emseg.cli import main; main()"]
SHAPE, BLOCK = "16,128,128", "4,128,128"  # 4 blocks


def emseg(*args: str, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([*EMSEG, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=240,
                         check=False, **kwargs)  # type: ignore[call-overload]
    if check and out.returncode != 0:
        pytest.fail(f"emseg {' '.join(args)} exited {out.returncode}:\n{out.stderr[-3000:]}")
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A synthetic EM volume and a seeded (untrained) tiny 2-D U-Net checkpoint."""
    import torch

    from emseg.models import build
    from emseg.models.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("segment")
    made = CliRunner().invoke(cli, ["synth", "--shape", SHAPE, "--voxel-size", "40,4,4", "--chunks", "8,64,64",
                                    "--block-size", "16,128,128", "--no-progress", str(root / "vol.zarr")])
    assert made.exit_code == 0, made.output  # in this process: only an input
    torch.manual_seed(0)
    model = build("unet", ndim=2, in_channels=1, out_channels=1, base_channels=4, depth=2, padding="valid",
                  batch_norm=False, dropout=0.0)
    save_checkpoint(model, root / "model", normalization={"mean": 0.6, "std": 0.15})
    return root / "vol.zarr", root / "model"


def arrays(path: Path) -> dict[str, np.ndarray]:
    names = ("0", "labels/fragments/0", "labels/segments/0")
    return {name: np.asarray(zarr.open_array(str(path / name), mode="r")[...]) for name in names}


def test_segment_on_slurm_is_bit_identical_to_local(inputs, connection, tmp_path: Path) -> None:
    volume, model = inputs
    # per-section labels (--2d): the untrained model's flat prediction would link into one 3-D segment
    common = ["segment", str(volume), "--model", str(model), "--block-size", BLOCK, "--no-progress", "--2d"]
    local_run = invoke_on(connection, *common, "-o", str(tmp_path / "local.zarr"))  # on the session's local cluster
    assert local_run.exit_code == 0, local_run.output[-3000:]
    run = emseg(*common, "-o", str(tmp_path / "slurm.zarr"), "--cluster", str(TEST_PROFILE))
    assert "4 blocks (4 computed" in run.stdout
    local, slurm = arrays(tmp_path / "local.zarr"), arrays(tmp_path / "slurm.zarr")
    # The untrained model's flat prediction agglomerates to about one segment per section, so the
    # fragments (the watershed stage, also compared below) show that a real labelling was compared.
    assert len(np.unique(local["labels/fragments/0"])) > 100  # a real labelling, not a constant
    assert len(np.unique(local["labels/segments/0"])) >= 16
    for name in local:
        assert local[name].dtype == slurm[name].dtype and local[name].tobytes() == slurm[name].tobytes(), name
    assert wait_queue_empty() == []


def test_failed_run_leaves_no_job(inputs, tmp_path: Path) -> None:
    volume, model = inputs
    run = emseg("segment", str(volume), "--model", str(model), "--block-size", "4,32,32", "--no-progress",
                "-o", str(tmp_path / "out.zarr"), "--cluster", str(TEST_PROFILE), check=False)
    assert run.returncode == 1 and "Error: block shape" in run.stderr
    assert wait_queue_empty() == []


@pytest.mark.parametrize(("sig", "status", "message"), [(signal.SIGINT, 1, "Aborted!"), (signal.SIGTERM, 128 + 15, "")],
                         ids=["ctrl-c", "sigterm"])
def test_interrupted_run_leaves_no_job(inputs, tmp_path: Path, sig: int, status: int, message: str) -> None:
    volume, model = inputs
    proc = subprocess.Popen([*EMSEG, "segment", str(volume), "--model", str(model), "--block-size", BLOCK, "--no-progress",
                             "-o", str(tmp_path / "out.zarr"), "--cluster", str(TEST_PROFILE)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(line.endswith("RUNNING") for line in queue()):
            assert proc.poll() is None and time.monotonic() < deadline, "no worker job started"
            time.sleep(0.5)
        time.sleep(2)  # the worker connects and takes blocks
        os.kill(proc.pid, sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == status and message in stderr, f"exit {proc.returncode}: {stderr[-2000:]}"
    assert wait_queue_empty() == [], stderr[-2000:]
