"""Kill a training run with SIGKILL, rerun with --resume: it continues from the last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from emseg.cli import cli
from emseg.training.state import latest_checkpoint, load_train_state
from tests.training.conftest import tiny_args


def test_resume_after_sigkill_continues_from_the_last_checkpoint(tmp_path: Path, isbi_crops: dict[str, Path]) -> None:
    out = tmp_path / "run"
    args = tiny_args(isbi_crops, out, "--steps", "100000", "--checkpoint-every", "3", "--val-every", "1000000", "--no-augment")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-c", "from emseg.cli import main; main()", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            latest = latest_checkpoint(out / "checkpoints")
            if latest is not None and load_train_state(latest)["step"] >= 6:
                break
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.2)
        else:
            raise AssertionError("no checkpoint at step >= 6 within 120 s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    latest = latest_checkpoint(out / "checkpoints")
    assert latest is not None
    killed_at = int(load_train_state(latest)["step"])
    assert killed_at >= 6 and killed_at % 3 == 0

    target = killed_at + 2
    resumed_args = tiny_args(isbi_crops, out, "--steps", str(target), "--checkpoint-every", "3", "--val-every", "1000000",
                             "--no-augment", "--resume", "--json")
    result = CliRunner().invoke(cli, resumed_args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["start_step"] == killed_at and report["steps"] == target
    assert load_train_state(latest_checkpoint(out / "checkpoints"))["step"] == target  # type: ignore[arg-type]
    # the training log continues without gaps or duplicates past the checkpoint
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for split in ("train", "val"):
        steps = [r["step"] for r in records if r["split"] == split]
        assert steps == sorted(set(steps)) and steps[-1] == target

    # and it equals an uninterrupted run to the same step (same batches, restored optimizer)
    straight = tmp_path / "straight"
    plain = tiny_args(isbi_crops, straight, "--steps", str(target), "--checkpoint-every", "3", "--val-every", "1000000", "--no-augment")
    assert CliRunner().invoke(cli, plain).exit_code == 0
    a = load_file(str(latest_checkpoint(out / "checkpoints") / "model.safetensors"))  # type: ignore[operator]
    b = load_file(str(latest_checkpoint(straight / "checkpoints") / "model.safetensors"))  # type: ignore[operator]
    for k in a:
        torch.testing.assert_close(a[k], b[k])
