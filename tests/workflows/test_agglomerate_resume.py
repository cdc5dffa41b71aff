"""A real SIGKILL of `emseg agglomerate` in the graph or the agglomeration stage, then a rerun:
the labels are byte-identical to those of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from emseg.io import open_volume, read_status
from emseg.workflows.agglomerate import segment_prediction
from tests.conftest import write_prediction_at
from tests.support import cells, invoke_on

BLOCK = (4, 32, 32)
SHAPE = (8, 128, 128)
TOTAL = 2 * 4 * 4


def _args(pred: Path) -> list[str]:
    return ["agglomerate", str(pred), "--block-size", ",".join(map(str, BLOCK)), "--thresholds", "0.6",
            "--no-progress", "--json"]


def _command(pred: Path) -> list[str]:
    return [sys.executable, "-c", "from emseg.cli import main; main()", *_args(pred), "--workers", "1"]


def _count(path: Path, pattern: str) -> int:
    return sum(1 for p in path.rglob(pattern) if p.is_file()) if path.exists() else 0


def _progress(pred: Path, stage: str) -> int:
    if stage == "graph":
        return _count(pred / "labels" / "fragments" / "graph" / "blocks", "*.npz")
    return _count(pred / "labels" / "segments" / "0" / "c", "*")


@pytest.fixture(scope="module")
def boundary() -> np.ndarray:
    return cells(SHAPE, 80, seed=9)[1]


@pytest.fixture(scope="module")
def clean(boundary: np.ndarray, connection, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """The uninterrupted run on the same prediction and its report, made once (the tests only read it)."""
    pred = write_prediction_at(tmp_path_factory.mktemp("clean") / "clean.zarr", boundary, chunks=BLOCK)
    return pred, segment_prediction(pred, block_size=BLOCK, thresholds=(0.6,), progress=False, client=connection)[2]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["graph", "relabel"])
def test_sigkill_then_rerun_gives_byte_identical_labels(boundary: np.ndarray, clean: tuple[Path, Any], connection,
                                                        tmp_path: Path, stage: str) -> None:
    killed = write_prediction_at(tmp_path / "killed.zarr", boundary, chunks=BLOCK)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(_command(killed), start_new_session=True, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    seen = 0
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            seen = _progress(killed, stage)
            if seen >= 2:
                break
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    segments = killed / "labels" / "segments"
    if stage == "graph":
        assert 2 <= _progress(killed, stage) < TOTAL, "the graph stage was not caught mid-way"
        assert (read_status(killed / "labels" / "fragments").get("graph") or {}).get("status") != "complete"
    else:
        assert seen >= 2 and read_status(segments).get("status") != "complete", \
            "the relabel stage was not caught mid-way"

    rerun = invoke_on(connection, *_args(killed))  # the rerun: in this process, on the session's cluster
    assert rerun.exit_code == 0, rerun.output[-3000:]
    clean_pred, first = clean
    assert json.loads(rerun.stdout.splitlines()[-1])["n_fragments"] == first.n_fragments
    for name in ("fragments", "segments", "segments_0.60"):
        a = open_volume(killed / "labels" / name)
        b = open_volume(clean_pred / "labels" / name)
        assert a.dtype == b.dtype == np.uint64
        np.testing.assert_array_equal(a.read(a.roi), b.read(b.roi))
