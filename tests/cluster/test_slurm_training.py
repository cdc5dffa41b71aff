"""DDP training as one sbatch job (cluster/train.sbatch): 2 srun tasks on the dev SLURM, one checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from emseg.cluster import load_profile
from emseg.cluster.slurm import SlurmError, submit_training

from .conftest import TEST_PROFILE, queue, wait_queue_empty

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("slurm")]


@pytest.fixture(scope="module")
def crops(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """4 sections x 96 x 96 of ISBI 2012 train (raw, labels 0 = membrane)."""
    out = tmp_path_factory.mktemp("isbi")
    for name, file in (("raw", "train-volume.tif"), ("labels", "train-labels.tif")):
        data = tifffile.imread(shared_data / "isbi2012" / file)[:4, 100:196, 100:196]
        tifffile.imwrite(out / f"{name}.tif", np.ascontiguousarray(data), photometric="minisblack")
    return {"raw": out / "raw.tif", "labels": out / "labels.tif"}


def tiny_args(crops: dict[str, Path], out: Path) -> list[str]:
    return ["--raw", f"{crops['raw']}[0:3]", "--labels", f"{crops['labels']}[0:3]",
            "--val-raw", f"{crops['raw']}[3:4]", "--val-labels", f"{crops['labels']}[3:4]",
            "--base-channels", "4", "--depth", "2", "--patch-shape", "48,48", "--batch-size", "2",
            "--steps", "4", "--val-every", "2", "--checkpoint-every", "4", "--threads", "1", "-o", str(out), "--json"]


def test_two_task_ddp_job_writes_one_checkpoint(crops, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    job_id = submit_training(tiny_args(crops, out), nodes=1, tasks_per_node=2, profile=load_profile(TEST_PROFILE),
                             script_path=tmp_path / "train.sbatch", timeout=240)
    report = json.loads((out / "train_report.json").read_text())
    assert (report["world_size"], report["steps"]) == (2, 4)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000004"]
    assert (out / "model.safetensors").is_file()
    script = (tmp_path / "train.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "exec srun" in script
    log = Path(yaml.safe_load(TEST_PROFILE.read_text())["slurm"]["log_directory"]) / f"emseg-train-{job_id}.out"
    assert f"job {job_id} on" in log.read_text() and "2 task(s)" in log.read_text()
    assert wait_queue_empty() == []


def test_train_cli_submits_to_slurm(crops, tmp_path: Path, monkeypatch) -> None:
    from click.testing import CliRunner

    from emseg.cli import cli

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "cli-ckpt"
    result = CliRunner().invoke(cli, ["train", *tiny_args(crops, out), "--cluster", str(TEST_PROFILE),
                                      "--tasks-per-node", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["world_size"], report["steps"]) == (2, 4)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000004"]
    assert wait_queue_empty() == []


def test_failed_training_job_is_reported_with_its_log(tmp_path: Path) -> None:
    args = ["--raw", str(tmp_path / "missing.tif"), "--labels", str(tmp_path / "missing.tif"), "-o", str(tmp_path / "o")]
    with pytest.raises(SlurmError, match=r"job \d+ ended FAILED \(exit code \d+:\d+\); see its log .*emseg-train-\d+\.out"):
        submit_training(args, nodes=1, tasks_per_node=2, profile=load_profile(TEST_PROFILE), timeout=120)
    assert wait_queue_empty() == []


def test_training_job_that_outlives_the_timeout_is_cancelled(tmp_path: Path) -> None:
    data = yaml.safe_load(TEST_PROFILE.read_text())
    data["slurm"]["job_extra_directives"] = ["--begin=now+3600"]  # stays PENDING
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump(data))
    with pytest.raises(SlurmError, match=r"did not finish within 3 s \(last state PENDING\); it was cancelled"):
        submit_training(["--help"], profile=load_profile(profile), timeout=3)
    assert queue() == [] or wait_queue_empty() == []
