"""emseg.cluster.slurm without a SLURM: profile validation, worker job settings, GPU pinning, sbatch rendering.

Not marked ``cluster``: these run everywhere.  The real-SLURM tests are in the other modules here.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from emseg.cluster import ClusterProfile, SlurmOptions, connect, load_profile
from emseg.cluster.slurm import SlurmError, cluster_kwargs, dask_setup, parse_walltime, render_training_script
from emseg.errors import ConfigError

PROFILES = Path(__file__).resolve().parents[2] / "cluster" / "profiles"


@pytest.mark.parametrize("name", ["local", "local-gpu", "slurm", "slurm-test"])
def test_shipped_profiles_load(name: str) -> None:
    profile = load_profile(PROFILES / f"{name}.yaml")
    assert profile.kind == ("slurm" if name.startswith("slurm") else name)


@pytest.mark.parametrize(("text", "seconds"), [("30", 1800), ("05:30", 330), ("01:00:00", 3600), ("2-00", 172800),
                                               ("1-02:03:04", 93784), ("1-02:03", 93780)])
def test_parse_walltime(text: str, seconds: int) -> None:
    assert parse_walltime(text) == seconds


def test_invalid_slurm_options_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("kind: slurm\nslurm:\n  walltime: one hour\n")
    with pytest.raises(ConfigError, match=r"slurm.walltime: Value error, walltime 'one hour': expected HH:MM:SS"):
        load_profile(path)
    path.write_text("kind: slurm\nslurm:\n  minimum_jobs: 5\n  maximum_jobs: 2\n")
    with pytest.raises(ConfigError, match=r"minimum_jobs \(5\) exceeds maximum_jobs \(2\)"):
        load_profile(path)
    path.write_text("kind: slurm\nslurm:\n  gres: gpu:1\n")
    with pytest.raises(ConfigError, match=r"slurm.gres: Extra inputs are not permitted"):
        load_profile(path)


def test_cpu_worker_job() -> None:
    kwargs = cluster_kwargs(ClusterProfile(kind="slurm", slurm=SlurmOptions(cores=4, walltime="00:05:00")), "emseg-ab")
    assert (kwargs["processes"], kwargs["cores"], kwargs["job_name"]) == (1, 4, "emseg-ab")
    assert kwargs["worker_extra_args"] == []  # no GPU resource, no --lifetime under 10 minutes
    assert kwargs["job_script_prologue"][0] == "export OMP_NUM_THREADS=4"
    assert kwargs["scheduler_options"] == {"dashboard": False, "dashboard_address": "127.0.0.1:0"}


def test_gpu_worker_job_one_worker_per_gpu() -> None:
    opts = SlurmOptions(gpus_per_job=4, cores=16, walltime="02:00:00", job_extra_directives=("--constraint=a100",))
    kwargs = cluster_kwargs(ClusterProfile(kind="slurm", slurm=opts), "emseg-ab")
    assert kwargs["processes"] == 4
    assert kwargs["job_extra_directives"] == ["--gres=gpu:4", "--constraint=a100"]
    assert kwargs["worker_extra_args"] == ["--resources", "GPU=1", "--preload", "emseg.cluster.slurm",
                                           "--lifetime", "6900s", "--lifetime-stagger", "150s"]
    assert kwargs["job_script_prologue"][0] == "export OMP_NUM_THREADS=4"


@pytest.mark.parametrize(("visible", "name", "pinned"), [("4,5,6", "SLURMCluster-3-1", "5"), ("0", "emseg-0", "0"),
                                                         ("2,3", "SLURMCluster-7-2", "2")])
def test_worker_preload_pins_one_gpu(monkeypatch: pytest.MonkeyPatch, visible: str, name: str, pinned: str) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    dask_setup(SimpleNamespace(name=name))
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == pinned


def test_training_script_one_task_per_gpu() -> None:
    profile = ClusterProfile(kind="slurm", slurm=SlurmOptions(queue="gpu", account="lab", cores=8, memory="64GB",
                                                              walltime="12:00:00", job_script_prologue=("module load cuda",),
                                                              python="/shared/venv/bin/python"))
    script = render_training_script(["--config", "run.toml", "-o", "my ckpt"], nodes=2, gpus_per_node=4, profile=profile)
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gres=gpu:4", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --time=12:00:00", "#SBATCH --mem=64000M",
                 "module load cuda", 'MASTER_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)'):
        assert line in script.splitlines(), line
    assert script.rstrip().endswith("/shared/venv/bin/emseg train --config run.toml -o 'my ckpt'")
    assert "@{" not in script
    cpu = render_training_script(["-o", "x"], profile=profile)
    assert "#SBATCH --ntasks-per-node=1" in cpu and "#SBATCH --gres" not in cpu


def test_training_script_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--nodes must be >= 1"):
        render_training_script([], nodes=0)
    bad = tmp_path / "t.sbatch"
    bad.write_text("#!/bin/bash\n@{directives}\nsrun @{command}\n")
    with pytest.raises(ConfigError, match=r"bad placeholder 'command'; the fields are @\{directives\}"):
        render_training_script([], template=bad)
    with pytest.raises(ConfigError, match="not found"):
        render_training_script([], template=tmp_path / "missing.sbatch")


def test_without_slurm_commands_the_error_says_where_to_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SlurmError, match=r"`sbatch` is not on PATH: --cluster slurm must run where"):
        with connect("slurm"):
            pass


def test_importing_dask_jobqueue_keeps_ctrl_c_a_keyboard_interrupt() -> None:
    """dask-jobqueue 0.9 sets SIGINT to sys.exit() on import (exit 0 on Ctrl-C); emseg undoes it."""
    import signal

    from emseg.cluster.slurm import _import_slurm_cluster

    _import_slurm_cluster()
    assert getattr(signal.getsignal(signal.SIGINT), "__module__", None) != "dask_jobqueue.runner"
