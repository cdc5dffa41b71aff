"""Run emseg on a SLURM cluster: Dask workers as SLURM jobs, and DDP training as an sbatch job.

* :func:`slurm_cluster` starts a dask-jobqueue ``SLURMCluster`` from a profile's
  :class:`~emseg.cluster.profiles.SlurmOptions`, scales it adaptively between ``minimum_jobs`` and
  ``maximum_jobs`` worker jobs, and when the run ends (success, error, Ctrl-C, SIGTERM) closes it and
  cancels every job it submitted: all of them carry one job name unique to the run, and a final
  ``scancel --name`` catches any the cluster object lost track of.
* :func:`submit_training` renders the ``emseg/cluster/templates/train.sbatch`` template (or one like it) and submits them with
  ``sbatch``; inside, ``srun emseg train ...`` starts one DDP process per task.

With ``gpus_per_job: N`` each job requests ``--gres=gpu:N`` and runs N worker processes, each pinned
to one of the job's GPUs and advertising the Dask resource ``GPU=1``; tasks then ask for
``{"GPU": 1}`` so exactly one runs per GPU.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import re
import secrets
import shutil
import signal
import string
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from types import FrameType
from typing import Any

from emseg.cluster.profiles import WORKER_MALLOC_ENV, ClusterProfile, Connection, parse_walltime
from emseg.cluster.tls import cluster_security, private_directory, quiet_scheduler_http
from emseg.errors import ConfigError, SlurmError

log = logging.getLogger(__name__)

__all__ = ["SlurmError", "slurm_cluster", "submit_training", "render_training_script", "parse_walltime"]

#: Prefix of the job name of every worker job emseg submits (the rest is unique per run).
JOB_PREFIX = "emseg"


# -- helpers ------------------------------------------------------------------------------------


def _require(command: str) -> str:
    path = shutil.which(command)
    if path is None:
        raise SlurmError(
            f"`{command}` is not on PATH: --cluster slurm must run where SLURM's client commands are "
            "installed (a login node), or start a dev cluster with cluster/slurm-up.sh"
        )
    return path


def _run(argv: Sequence[str], *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a SLURM client command; stdin closed, output captured."""
    return subprocess.run(list(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout, check=False)


def _user() -> str:
    return getpass.getuser()


def jobs_named(name: str) -> dict[str, str]:
    """Job id -> state (with reason when pending) of this user's jobs called ``name``."""
    out = _run(["squeue", "-h", "--user", _user(), "--name", name, "-o", "%i %T %r"])
    if out.returncode != 0:
        log.warning("squeue failed: %s", out.stderr.strip())
        return {}
    jobs = {}
    for line in out.stdout.splitlines():
        job_id, state, reason = (line.split(None, 2) + ["", ""])[:3]
        jobs[job_id] = state if reason in ("", "None") else f"{state} ({reason})"
    return jobs


def cancel_jobs_named(name: str) -> None:
    """``scancel`` every job of this user called ``name`` (a no-op when there are none)."""
    try:
        out = _run(["scancel", "--user", _user(), "--name", name], timeout=30)
    except (OSError, subprocess.SubprocessError) as e:  # scancel missing or hanging: say so, keep going
        log.error("could not cancel jobs named %s: %s; cancel them with `scancel --name %s`", name, e, name)
        return
    if out.returncode != 0:
        log.error("scancel --name %s failed: %s", name, out.stderr.strip())


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _signals_raise_systemexit() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into SystemExit (SIGINT: KeyboardInterrupt) while inside, so ``finally`` blocks cancel the jobs.

    Only in the main thread (signal handlers cannot be installed elsewhere); the previous handlers
    are restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        _raise_for(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        yield
        # Python ignores an exception raised inside some callbacks: distributed's gc callback printed
        # "Exception ignored in ... KeyboardInterrupt" (or SystemExit) and the interrupted run went on
        # to exit 0.  A signal received is raised again here, once the body is left.
        if received:
            _raise_for(received[0])
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# -- Dask workers as SLURM jobs -----------------------------------------------------------------


def _import_slurm_cluster() -> Any:
    """``dask_jobqueue.SLURMCluster``, keeping Ctrl-C a KeyboardInterrupt.

    dask-jobqueue 0.9 replaces the SIGINT handler with ``sys.exit()`` when imported
    (dask/dask-jobqueue#696, fixed after 0.9 by #697): Ctrl-C would then end a run with exit
    status 0 and no message, as if it had succeeded.  Put back the handler that was there before
    (or Python's default one).
    """
    before = signal.getsignal(signal.SIGINT)
    from dask_jobqueue.slurm import SLURMCluster

    def theirs(handler: Any) -> bool:
        return getattr(handler, "__module__", None) == "dask_jobqueue.runner"

    if threading.current_thread() is threading.main_thread() and theirs(signal.getsignal(signal.SIGINT)):
        signal.signal(signal.SIGINT, signal.default_int_handler if theirs(before) or before is None else before)
    return SLURMCluster


def default_log_directory() -> Path:
    """Where worker job logs go when the profile sets none: ``~/.cache/emseg/slurm-logs``.

    Home directories are shared between login and compute nodes on most clusters.
    """
    return Path.home() / ".cache" / "emseg" / "slurm-logs"


def log_directory(profile: ClusterProfile) -> Path:
    """The worker jobs' log directory: the profile's, else :func:`default_log_directory`."""
    opts = profile.slurm
    return Path(opts.log_directory).expanduser() if opts.log_directory else default_log_directory()


def cluster_kwargs(profile: ClusterProfile, job_name: str, credentials: Path | None = None) -> dict[str, Any]:
    """``SLURMCluster`` keyword arguments for ``profile`` (one job: ``max(1, gpus_per_job)`` workers).

    With ``profile.security`` (the default) the cluster uses TLS with a key pair made here; the
    worker jobs read their copy from files that dask-jobqueue writes into ``credentials`` (a
    directory private to this user on a filesystem the compute nodes share, default the log
    directory).
    """
    opts = profile.slurm
    processes = max(1, opts.gpus_per_job)
    threads = max(1, opts.cores // processes)
    directives = list(opts.job_extra_directives)
    worker_args: list[str] = []
    if opts.gpus_per_job:
        directives.insert(0, f"--gres=gpu:{opts.gpus_per_job}")
        worker_args += ["--resources", "GPU=1"]
        if processes > 1:
            # dask_setup below pins one GPU per process (the preload runs this module on each worker)
            worker_args += ["--preload", "emseg.cluster.slurm"]
    # Retire workers gracefully before SLURM kills them at the walltime; adaptive scaling replaces them.
    seconds = parse_walltime(opts.walltime)
    if seconds >= 600:
        margin = min(300, seconds // 10)
        worker_args += ["--lifetime", f"{seconds - margin}s", "--lifetime-stagger", f"{margin // 2}s"]
    logs = log_directory(profile)
    tls = cluster_security(profile.security)
    if tls:
        tls["shared_temp_directory"] = str(credentials or logs)
    return {
        "queue": opts.queue,
        "account": opts.account,
        "walltime": opts.walltime,
        "cores": opts.cores,
        "processes": processes,
        "memory": opts.memory,
        "job_name": job_name,
        "job_extra_directives": directives,
        "worker_extra_args": worker_args,
        "interface": opts.interface,
        "log_directory": str(logs),
        "local_directory": opts.local_directory,
        "python": opts.python or sys.executable,
        "death_timeout": opts.death_timeout,
        "job_script_prologue": [f"export OMP_NUM_THREADS={threads}",
                                *(f"export {k}={v}" for k, v in WORKER_MALLOC_ENV.items()),  # see emseg.cluster.profiles
                                *opts.job_script_prologue],
        # no dashboard; the scheduler's health-check HTTP server on a free loopback port (the default
        # 8787 is often taken on a shared login node)
        "scheduler_options": {"dashboard": False, "dashboard_address": "127.0.0.1:0"},
        **tls,
    }


def dask_setup(worker: Any) -> None:
    """Worker preload (``--preload emseg.cluster.slurm``): pin worker ``NAME-i`` to the job's i-th GPU.

    SLURM exposes a job's GPUs in ``CUDA_VISIBLE_DEVICES``; each of the job's worker processes keeps
    one of them so tasks asking for ``{"GPU": 1}`` never share a device.  Runs before any task (and so
    before CUDA is initialised).
    """
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    suffix = str(worker.name).rsplit("-", 1)[-1]
    if visible and suffix.isdigit():
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[int(suffix) % len(visible)]


def _check_submittable(job_script: str) -> None:
    """``sbatch --test-only``: refuse early (bad partition, account, gres, memory) with SLURM's words."""
    out = subprocess.run(["sbatch", "--test-only"], input=job_script, capture_output=True, text=True, timeout=60, check=False)
    if out.returncode != 0:
        reason = " ".join(line.removeprefix("sbatch: error: ") for line in out.stderr.strip().splitlines()) or "no reason given"
        raise SlurmError(f"SLURM refuses the worker job of this profile: {reason}; fix the profile's slurm: section "
                         "(queue, account, cores, memory, gpus_per_job, job_extra_directives)")


def _wait_for_workers(client: Any, job_name: str, timeout: float, log_directory: str) -> None:
    """Block until one worker is connected, or raise SlurmError naming the jobs' states."""
    deadline = time.monotonic() + timeout
    while not client.scheduler_info().get("workers"):
        if time.monotonic() > deadline:
            states = jobs_named(job_name)
            listing = ", ".join(f"{j}: {s}" for j, s in sorted(states.items())) or "none in the queue"
            raise SlurmError(
                f"no SLURM worker started within {timeout:g} s (jobs named {job_name}: {listing}); "
                f"check `squeue --name {job_name}` and the job logs in {log_directory}, "
                "or raise slurm.start_timeout in the profile for busy queues"
            )
        time.sleep(0.5)


@contextlib.contextmanager
def slurm_cluster(profile: ClusterProfile) -> Iterator[Connection]:
    """Dask workers as SLURM jobs for the duration of a run.

    Parameters
    ----------
    profile : ClusterProfile
        Its ``slurm`` section sets the jobs (partition, account, walltime, cores, memory, GPUs,
        extra ``#SBATCH`` lines, adaptive range ``minimum_jobs``..``maximum_jobs``).

    Yields
    ------
    Connection
        The client; ``resources`` is ``{"GPU": 1}`` when the jobs have GPUs (so each task needs one),
        else None; ``threads_per_worker`` is ``cores // workers per job``.

    Raises
    ------
    SlurmError
        SLURM commands are missing, SLURM refuses the job (``sbatch --test-only``), or no worker
        connected within ``slurm.start_timeout`` seconds.

    Every job submitted is cancelled when the block is left, whichever way it is left.
    """
    from distributed import Client

    SLURMCluster = _import_slurm_cluster()
    for command in ("sbatch", "squeue", "scancel"):
        _require(command)
    opts = profile.slurm
    job_name = f"{JOB_PREFIX}-{secrets.token_hex(4)}"
    cluster = client = None
    with _signals_raise_systemexit(), private_directory(log_directory(profile)) as credentials:
        kwargs = cluster_kwargs(profile, job_name, credentials)
        try:
            with quiet_scheduler_http():
                try:
                    cluster = SLURMCluster(**kwargs)
                except BaseException as e:  # the half-built cluster's key files go before their directory
                    for frame, _ in traceback.walk_tb(e.__traceback__):
                        if isinstance(frame.f_locals.get("self"), SLURMCluster):
                            _delete_credential_files(frame.f_locals["self"])
                    raise
            log.info("SLURM worker job script:\n%s", cluster.job_script())
            _check_submittable(cluster.job_script())
            client = Client(cluster, security=kwargs.get("security"))  # type: ignore[no-untyped-call]
            cluster.adapt(minimum_jobs=opts.minimum_jobs, maximum_jobs=opts.maximum_jobs)
            log.info("waiting for a SLURM worker (jobs named %s, logs in %s)", job_name, kwargs["log_directory"])
            _wait_for_workers(client, job_name, opts.start_timeout, kwargs["log_directory"])
            resources = {"GPU": 1.0} if opts.gpus_per_job else None
            yield Connection(client, resources, max(1, opts.cores // kwargs["processes"]))
        finally:
            try:
                try:
                    if client is not None:
                        client.close(timeout=10)  # type: ignore[no-untyped-call]
                finally:
                    if cluster is not None:
                        try:
                            cluster.close(timeout=30)
                        finally:
                            _delete_credential_files(cluster)
            finally:  # runs even when a second Ctrl-C interrupts the closing above
                cancel_jobs_named(job_name)


def _delete_credential_files(cluster: Any) -> None:
    """Delete the workers' copy of the key pair now (dask-jobqueue holds them as temporary files
    deleted when the cluster object is collected; the private directory holding them goes next)."""
    import tempfile

    for value in list(vars(cluster).values()):
        if isinstance(value, tempfile._TemporaryFileWrapper):
            value.close()


# -- training as an sbatch job ------------------------------------------------------------------


def default_template() -> Traversable:
    """The sbatch template of DDP training shipped in the package: ``emseg/cluster/templates/train.sbatch``."""
    return files("emseg.cluster") / "templates" / "train.sbatch"


TRAIN_JOB_NAME = "emseg-train"


class _Template(string.Template):
    delimiter = "@"  # leaves the script's own $VARS alone: placeholders are @{name}


def render_training_script(
    train_argv: Sequence[str],
    *,
    nodes: int = 1,
    gpus_per_node: int = 0,
    tasks_per_node: int | None = None,
    profile: ClusterProfile | None = None,
    job_name: str = TRAIN_JOB_NAME,
    template: str | os.PathLike[str] | None = None,
    python: str | None = None,
) -> str:
    """The sbatch script that runs ``emseg train TRAIN_ARGV`` with one DDP process per task.

    ``tasks_per_node`` defaults to ``gpus_per_node`` (one process per GPU), or 1 without GPUs.
    Partition, account, walltime, cores per task, memory, extra directives and prologue come from
    ``profile.slurm``.  Placeholders in the template are ``@{name}``.
    """
    if nodes < 1 or gpus_per_node < 0 or (tasks_per_node is not None and tasks_per_node < 1):
        raise ConfigError(f"--nodes must be >= 1, --gpus-per-node >= 0 and tasks per node >= 1; got "
                          f"nodes={nodes}, gpus_per_node={gpus_per_node}, tasks_per_node={tasks_per_node}")
    tasks = tasks_per_node if tasks_per_node is not None else max(1, gpus_per_node)
    opts = (profile or ClusterProfile(kind="slurm")).slurm
    path: Path | Traversable = Path(template) if template is not None else default_template()
    if not path.is_file():
        raise ConfigError(f"sbatch template {path} not found; pass template= the path of an existing sbatch template")
    directives = [f"--nodes={nodes}", f"--ntasks-per-node={tasks}", f"--cpus-per-task={opts.cores}",
                  f"--time={opts.walltime}", f"--job-name={job_name}"]
    if opts.queue:
        directives.append(f"--partition={opts.queue}")
    if opts.account:
        directives.append(f"--account={opts.account}")
    if gpus_per_node:
        directives.append(f"--gres=gpu:{gpus_per_node}")
    directives.append(f"--mem={_slurm_memory(opts.memory)}")
    if opts.log_directory:
        logs = Path(opts.log_directory).expanduser()
        directives.append(f"--output={logs / '%x-%j.out'}")
    directives += list(opts.job_extra_directives)
    python_exe = python or opts.python or sys.executable
    # The `emseg` entry point installed beside that interpreter (same venv on the compute nodes).
    emseg_exe = str(Path(python_exe).parent / "emseg") if os.path.isabs(python_exe) else "emseg"
    command = " ".join(_shell_quote(a) for a in [emseg_exe, "train", *train_argv])
    try:
        return _Template(path.read_text()).substitute(
            directives="\n".join(f"#SBATCH {d}" for d in directives),
            prologue="\n".join(opts.job_script_prologue),
            threads=str(opts.cores),
            train_command=command,
        )
    except (KeyError, ValueError) as e:
        raise ConfigError(f"sbatch template {path}: bad placeholder {e}; the fields are @{{directives}}, "
                          "@{prologue}, @{threads} and @{train_command} (write @@ for a literal @)") from e


def _slurm_memory(memory: str) -> str:
    """Dask-style ``4GB``/``16GiB`` -> SLURM ``--mem`` megabytes (``4000M``)."""
    from dask.utils import parse_bytes

    try:
        return f"{max(1, parse_bytes(memory) // 10**6)}M"
    except ValueError as e:
        raise ConfigError(f"memory {memory!r}: expected e.g. 4GB or 16GiB") from e


def _shell_quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def submit_training(
    train_argv: Sequence[str],
    *,
    nodes: int = 1,
    gpus_per_node: int = 0,
    tasks_per_node: int | None = None,
    profile: ClusterProfile | None = None,
    wait: bool = True,
    timeout: float | None = None,
    template: str | os.PathLike[str] | None = None,
    script_path: str | os.PathLike[str] | None = None,
) -> int:
    """Submit ``emseg train TRAIN_ARGV`` as one sbatch job of ``nodes`` x ``tasks_per_node`` DDP processes.

    Parameters
    ----------
    train_argv : sequence of str
        Arguments of ``emseg train`` (without ``train``, ``--cluster``, ``--nodes``, ``--gpus-per-node``).
    nodes, gpus_per_node, tasks_per_node
        Job shape; ``tasks_per_node`` defaults to ``gpus_per_node`` (one process per GPU), else 1.
    profile : ClusterProfile, optional
        Partition, account, walltime, cores per task, memory, extra directives, prologue, log directory.
    wait : bool
        Block until the job ends; Ctrl-C (or SIGTERM) then cancels it.
    timeout : float, optional
        Seconds to wait before cancelling the job and raising SlurmError (default: no limit).
    script_path : path, optional
        Where to write the rendered script (default: next to the job logs).

    Returns
    -------
    int
        The SLURM job id.

    Raises
    ------
    SlurmError
        sbatch refused the job, the job failed (its state and log are named), or the wait timed out.
    """
    _require("sbatch")
    script = render_training_script(train_argv, nodes=nodes, gpus_per_node=gpus_per_node,
                                    tasks_per_node=tasks_per_node, profile=profile, template=template)
    opts = profile.slurm if profile is not None else None
    logs = Path(opts.log_directory).expanduser() if opts and opts.log_directory else default_log_directory()
    logs.mkdir(parents=True, exist_ok=True)
    path = Path(script_path) if script_path is not None else logs / f"emseg-train-{secrets.token_hex(4)}.sbatch"
    path.write_text(script)
    argv = ["sbatch", "--parsable"]
    if not any(line.startswith("#SBATCH --output") for line in script.splitlines()):
        argv.append(f"--output={logs / '%x-%j.out'}")  # same place and name as the profile's log_directory gives
    out = _run([*argv, str(path)])
    if out.returncode != 0:
        raise SlurmError(f"sbatch refused the training job ({path}): {out.stderr.strip() or out.stdout.strip()}")
    job_id = int(out.stdout.strip().split(";")[0])
    job_log = logs / f"{TRAIN_JOB_NAME}-{job_id}.out"
    log.info("submitted training job %d (script %s, log %s)", job_id, path, job_log)
    if wait:
        wait_for_job(job_id, timeout=timeout, log_hint=str(job_log))
    return job_id


TERMINAL_OK = {"COMPLETED"}
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "STAGE_OUT"}


def job_state(job_id: int) -> tuple[str, str] | None:
    """``(state, exit code)`` of a job (``RUNNING``, ``COMPLETED``, ``FAILED`` ...), None when unknown.

    Asks ``scontrol`` (jobs stay there ``MinJobAge`` seconds after they end), then ``sacct``
    where accounting is enabled.
    """
    out = _run(["scontrol", "show", "job", "-o", str(job_id)])
    state = re.search(r"\bJobState=(\S+)", out.stdout)
    code = re.search(r"\bExitCode=(\S+)", out.stdout)
    if out.returncode == 0 and state is not None:
        return state.group(1), code.group(1) if code else "?"
    if shutil.which("sacct") is None:
        return None
    out = _run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State,ExitCode"])
    line = out.stdout.strip().splitlines()[:1]
    if out.returncode != 0 or not line or "|" not in line[0]:
        return None
    acct_state, _, acct_code = line[0].partition("|")
    return acct_state.split()[0], acct_code


def wait_for_job(job_id: int, *, timeout: float | None = None, poll: float = 2.0, log_hint: str = "") -> None:
    """Wait until ``job_id`` ends; cancel it on Ctrl-C/SIGTERM or after ``timeout`` seconds.

    Raises
    ------
    SlurmError
        The job ended in a state other than COMPLETED, vanished without a known end, or timed out.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    see = f"; see its log {log_hint}" if log_hint else ""
    finished = False
    with _signals_raise_systemexit():
        try:
            last = None
            while True:
                found = job_state(job_id)
                state, code = found if found is not None else (None, "?")
                if state != last:
                    log.info("job %d: %s", job_id, state)
                    last = state
                if state is None:
                    finished = True
                    raise SlurmError(f"job {job_id} left the queue and SLURM keeps no record of how it ended{see}")
                if state in TERMINAL_OK:
                    finished = True
                    return
                if state not in ACTIVE:
                    finished = True
                    raise SlurmError(f"job {job_id} ended {state} (exit code {code}){see}")
                if deadline is not None and time.monotonic() > deadline:
                    raise SlurmError(f"job {job_id} did not finish within {timeout:g} s (last state {state}); it was cancelled")
                time.sleep(poll)
        finally:
            if not finished:
                _run(["scancel", str(job_id)], timeout=30)
