"""Losing a worker mid-run on the two-node dev SLURM: ``emseg segment --cluster <profile>`` still ends
with the same bytes as a local run.

Two worker jobs, one per node (``--exclusive``), run the segmentation.  While blocks are being
computed one of them is lost:

* its SLURM job is cancelled (``scancel``): what a preemption, a walltime kill or a failed node does
  to a worker job;
* its worker process is killed by the kernel's OOM killer: the test moves that process into a memory
  cgroup of its own (a child of its current one) that admits 2 MiB of new memory, so the worker's
  next allocations exceed it and the kernel kills it (``memory.oom_control`` counts the kill).  Where no memory cgroup can be made the
  worker is killed with SIGKILL instead, which the test says.

Either way the run must finish with exit 0 (Dask reschedules the lost worker's blocks, the nanny or
adaptive scaling brings a worker back), or exit 3 with a rerun that resumes; the output must be
byte-identical to the local run's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner

from emseg.cli import cli
from tests.support import invoke_on

from .conftest import TEST_PROFILE, wait_queue_empty

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("slurm")]

EMSEG = [sys.executable, "-c", "from emseg.cli import main; main()"]
SHAPE, BLOCK = "16,128,128", "2,128,128"  # 8 prediction blocks, one SLURM worker job per node
ARRAYS = ("0", "labels/fragments/0", "labels/segments/0")


def emseg(*args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([*EMSEG, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout,
                         check=False)
    if check and out.returncode != 0:
        pytest.fail(f"emseg {' '.join(args)} exited {out.returncode}:\n{out.stderr[-3000:]}")
    return out


def arrays(path: Path) -> dict[str, bytes]:
    return {name: np.asarray(zarr.open_array(str(path / name), mode="r")[...]).tobytes() for name in ARRAYS}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, connection) -> tuple[list[str], dict[str, bytes]]:
    """The segment command's arguments (synthetic EM, a seeded tiny 2-D U-Net) and the local run's output."""
    import torch

    from emseg.models import build
    from emseg.models.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("node-loss")
    made = CliRunner().invoke(cli, ["synth", "--shape", SHAPE, "--voxel-size", "40,4,4", "--chunks", "2,128,128",
                                    "--no-progress", str(root / "vol.zarr")])
    assert made.exit_code == 0, made.output  # in this process: only an input
    torch.manual_seed(0)
    model = build("unet", ndim=2, in_channels=1, out_channels=1, base_channels=4, depth=2, padding="valid",
                  batch_norm=False, dropout=0.0)
    save_checkpoint(model, root / "model", normalization={"mean": 0.6, "std": 0.15})
    args = ["segment", str(root / "vol.zarr"), "--model", str(root / "model"), "--block-size", BLOCK, "--no-progress"]
    local = invoke_on(connection, *args, "-o", str(root / "local.zarr"))  # the reference, on the session's cluster
    assert local.exit_code == 0, local.output[-3000:]
    return args, arrays(root / "local.zarr")


def two_node_profile(tmp_path: Path) -> tuple[Path, Path]:
    """The dev profile with two worker jobs, each alone on its node; its job log directory."""
    data = yaml.safe_load(TEST_PROFILE.read_text())
    logs = tmp_path / "jobs"
    data["slurm"].update(minimum_jobs=2, maximum_jobs=2, job_extra_directives=["--exclusive"], log_directory=str(logs))
    path = tmp_path / "two-nodes.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, logs


def worker_jobs() -> dict[str, str]:
    """Job id -> node of the RUNNING emseg worker jobs."""
    out = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i %j %N"], capture_output=True, text=True, check=True,
                         timeout=30)
    return {job: node for job, name, node in (line.split() for line in out.stdout.splitlines()) if name.startswith("emseg-")}


def registered(logs: Path, job: str) -> bool:
    """The job's Dask worker has joined the run's scheduler (its log says so)."""
    return any("Registered to:" in f.read_text(errors="replace") for f in logs.glob(f"*-{job}.err"))


def run_losing_a_worker(inputs, tmp_path: Path, lose: Callable[[str], str]) -> tuple[str, str]:
    """Run segment on two nodes; once both workers have joined and blocks are written, ``lose`` the
    job on the second node (it returns how).  Returns (how, the run's outcome)."""
    args, reference = inputs
    profile, logs = two_node_profile(tmp_path)
    out = tmp_path / "slurm.zarr"
    env = dict(os.environ, DASK_DISTRIBUTED__DEPLOY__LOST_WORKER_TIMEOUT="3s")  # replace a lost job after 3 s, not 15
    proc = subprocess.Popen([*EMSEG, *args, "-o", str(out), "--cluster", str(profile)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lost: list[str] = []
    seen: dict[str, str] = {}

    def watch() -> None:
        while proc.poll() is None and not lost:
            jobs = worker_jobs()
            seen.update(jobs)
            written = [p for p in out.glob("0/c/**/*") if p.is_file()]  # prediction chunks
            if len(set(jobs.values())) == 2 and written and all(registered(logs, job) for job in jobs):
                victim = max(jobs, key=lambda job: jobs[job])  # the job on the second node
                lost.append(f"job {victim} on {jobs[victim]}: " + lose(victim))
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
        watcher.join(timeout=30)
    assert lost, f"the run (exit {proc.returncode}) ended before a worker could be lost; jobs seen {seen}:\n{stderr[-2000:]}"
    outcome = f"exit {proc.returncode}"
    if proc.returncode == 3:  # blocks failed after their retries: the rerun resumes
        rerun = emseg(*args, "-o", str(out), "--cluster", str(profile), check=False)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        outcome += ", rerun exit 0"
    else:
        assert proc.returncode == 0, f"{lost[0]}; exit {proc.returncode}:\n{stderr[-3000:]}"
    assert "segments" in stdout or outcome != "exit 0"
    assert arrays(out) == reference, f"{lost[0]}: the output differs from the local run's"
    assert wait_queue_empty(60) == []
    print(f"{lost[0]}; jobs seen {seen}; {outcome}")
    return lost[0], outcome


def test_cancelled_worker_job_mid_run(inputs, tmp_path: Path) -> None:
    def cancel(job: str) -> str:
        subprocess.run(["scancel", job], check=True, timeout=30)
        return "scancel"

    run_losing_a_worker(inputs, tmp_path, cancel)


# -- the OOM killer ------------------------------------------------------------------------------


def worker_process(job: str) -> int:
    """PID of the Dask worker process (the nanny's child) of SLURM job ``job``."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if "distributed.cli.dask_worker" in cmdline and proc.environ().get("SLURM_JOB_ID") == job:
                children = [c for c in proc.children() if "spawn_main" in " ".join(c.cmdline())]
                if children:
                    return children[0].pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no Dask worker process found for job {job}")


def memory_cgroup(pid: int) -> Path | None:
    """The cgroup v1 memory directory of ``pid``, if there is one this process may write to."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            directory = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            return directory if os.access(directory, os.W_OK) else None
    return None


def oom_kill(pid: int) -> str:
    """Have the kernel's OOM killer end ``pid``: move it into a child memory cgroup that admits only
    :data:`CAGE` bytes of new memory, and wait for the kill.  SIGKILL where no memory cgroup can be made."""
    parent = memory_cgroup(pid)
    if parent is None:
        os.kill(pid, signal.SIGKILL)
        return "SIGKILL (no writable memory cgroup here: a real OOM kill cannot be provoked)"
    cage = parent / f"emseg-oom-{pid}"
    cage.mkdir()
    try:
        # What the process already uses stays charged where it was: the cage limits what it allocates next.
        (cage / "memory.limit_in_bytes").write_text(str(CAGE))
        (cage / "cgroup.procs").write_text(str(pid))
        deadline = time.monotonic() + 120
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        control = dict(line.split() for line in (cage / "memory.oom_control").read_text().splitlines())
        assert int(control.get("oom_kill", 0)) >= 1, f"worker {pid} was not OOM-killed within 120 s: {control}"
        return f"OOM-killed by the kernel (memory cgroup admitting {CAGE >> 20} MiB more, oom_kill={control['oom_kill']})"
    finally:
        for _ in range(150):  # a cgroup can be removed once its last process is gone
            try:
                cage.rmdir()
                break
            except OSError:
                time.sleep(0.2)


CAGE = 2 << 20


def test_worker_killed_by_the_oom_killer_mid_run(inputs, tmp_path: Path) -> None:
    run_losing_a_worker(inputs, tmp_path, lambda job: oom_kill(worker_process(job)))
