"""The real SLURM of ``cluster/slurm-up.sh`` (two compute nodes unless EMSEG_SLURM_NODES says otherwise), started once per session for ``cluster`` tests.

CI runs it for real (root, apt-get for the first install, ~5-15 s).  ``EMSEG_SKIP_SLURM=1`` skips
these tests on a machine where that is impossible.  A SLURM that was already up is left running.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
TEST_PROFILE = CLUSTER / "profiles" / "slurm-test.yaml"


def queue() -> list[str]:
    """``JOBID NAME STATE`` of every job in the dev cluster."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.split("\n")[:-1]


def wait_queue_empty(timeout: float = 30) -> list[str]:
    """Poll until no job is left (cancelled jobs linger a few seconds in COMPLETING); return what is left."""
    deadline = time.monotonic() + timeout
    while (left := queue()) and time.monotonic() < deadline:
        time.sleep(1)
    return left


@pytest.fixture(scope="session")
def slurm() -> Iterator[None]:
    """Start the dev SLURM (idempotent) and stop it at the end of the session if this started it."""
    if os.environ.get("EMSEG_SKIP_SLURM") == "1":
        pytest.skip("EMSEG_SKIP_SLURM=1: the real SLURM tests are skipped")
    up = subprocess.run([str(CLUSTER / "slurm-up.sh")], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                        timeout=600, check=False)
    if up.returncode != 0:
        pytest.fail(f"cluster/slurm-up.sh failed (exit {up.returncode}):\n{up.stdout}\n{up.stderr}")
    started_here = "already up" not in up.stderr
    assert wait_queue_empty(60) == [], "the dev cluster has jobs left from before this session"
    yield
    if started_here:
        down = subprocess.run([str(CLUSTER / "slurm-down.sh")], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=120, check=False)
        assert down.returncode == 0, f"cluster/slurm-down.sh failed:\n{down.stderr}"
