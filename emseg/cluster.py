"""Build the Dask client a run uses, from a cluster profile.

Profiles: ``local`` (default: a LocalCluster of CPU workers, or one worker per GPU when GPUs are
visible), ``local-gpu`` (one worker per visible GPU, pinned with ``CUDA_VISIBLE_DEVICES`` and
advertising the resource ``GPU=1``), ``slurm`` (dask-jobqueue), or a YAML file with the same
fields; ``scheduler`` joins an existing cluster instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from emseg.errors import ConfigError

log = logging.getLogger(__name__)

#: glibc malloc settings of every worker process emseg starts (local, local-gpu, SLURM).  glibc reads
#: them once, when the process starts, so they go into the nanny's pre-spawn environment.
#: distributed's default ``MALLOC_TRIM_THRESHOLD_=65536`` (``distributed.nanny.pre-spawn-environ``)
#: also turns off glibc's dynamic mmap threshold: every large torch buffer is then mmap'ed, handed
#: back to the OS after the layer and page-faulted in again by the next one (issue 15: forward
#: passes 2.7x slower than in a plain process).  Here the heap keeps what it frees, and buffers up to
#: 32 MiB (glibc's own ceiling for its dynamic threshold) come from the heap.
WORKER_MALLOC_ENV: dict[str, str] = {"MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}

#: Memory one CPU inference worker may need for a default block (model, raw block, float32 core,
#: activations of one batch of 1116x1116 tiles), bytes; bounds the number of workers on small-memory nodes.
WORKER_MEMORY = 2 << 30


class SlurmOptions(BaseModel):
    """dask-jobqueue ``SLURMCluster`` settings: worker jobs of one worker per GPU (or one CPU worker).

    See ``cluster/profiles/slurm.yaml`` for a documented example and ``cluster/README.md``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    queue: str | None = None
    """Partition (``#SBATCH -p``); default: the cluster's default partition."""
    account: str | None = None
    """Account to charge (``#SBATCH -A``)."""
    walltime: str = "01:00:00"
    """Wall-clock limit of each worker job, ``HH:MM:SS`` or ``D-HH:MM:SS``.  Workers retire a few
    minutes before it and adaptive scaling replaces them."""
    cores: int = Field(default=1, ge=1)
    """CPU cores per worker job (shared by its workers as threads)."""
    memory: str = "4GB"
    """Memory per worker job (Dask syntax: ``16GB``, ``64GiB``)."""
    gpus_per_job: int = Field(default=0, ge=0)
    """GPUs per worker job (``--gres=gpu:N``): the job then runs N workers, one pinned to each GPU,
    each advertising the Dask resource ``GPU=1``.  0: CPU-only workers."""
    job_extra_directives: tuple[str, ...] = ()
    """Extra ``#SBATCH`` lines, e.g. ``--constraint=a100`` or ``--qos=short``."""
    job_script_prologue: tuple[str, ...] = ()
    """Shell lines run in the job before the worker starts (``module load cuda``, ``source venv/bin/activate``)."""
    python: str | None = None
    """Python interpreter on the compute nodes that has emseg installed; default: the one running emseg."""
    interface: str | None = None
    """Network interface workers and scheduler talk on (``ib0``, ``lo`` on a single node).  The
    scheduler on the login node listens on it: choose the cluster-internal network, not a public one."""
    security: bool = False
    """TLS between scheduler, workers and client with temporary self-signed credentials
    (``distributed.Security.temporary()``): only holders of the run's key may connect.  The
    workers' copy of the credentials goes to ``log_directory`` (shared, readable by you only)."""
    minimum_jobs: int = Field(default=1, ge=0)
    """Adaptive scaling: fewest worker jobs kept while the run lasts."""
    maximum_jobs: int = Field(default=4, ge=1)
    """Adaptive scaling: most worker jobs at once."""
    log_directory: str | None = None
    """Where the worker jobs' logs go (shared filesystem); default ``~/.cache/emseg/slurm-logs``."""
    local_directory: str | None = None
    """Node-local scratch for the workers (e.g. ``$TMPDIR``); default: Dask's choice."""
    death_timeout: int = Field(default=120, ge=1)
    """Seconds a worker waits for a vanished scheduler before exiting (ends orphaned jobs), s."""
    start_timeout: float = Field(default=600, gt=0)
    """Seconds to wait for the first worker job to start (queue wait included) before failing."""

    @field_validator("walltime")
    @classmethod
    def _check_walltime(cls, value: str) -> str:
        from emseg.slurm import parse_walltime

        parse_walltime(value)  # ConfigError is a ValueError: pydantic reports it on this field
        return value

    @model_validator(mode="after")
    def _check_jobs(self) -> SlurmOptions:
        if self.minimum_jobs > self.maximum_jobs:
            raise ValueError(f"minimum_jobs ({self.minimum_jobs}) exceeds maximum_jobs ({self.maximum_jobs})")
        return self


class ClusterProfile(BaseModel):
    """Where a run's tasks execute."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["local", "local-gpu", "slurm"] = "local"
    """Cluster type."""
    workers: int | None = Field(default=None, ge=1)
    """Local worker processes (default: one per GPU, else the layout of :func:`default_layout`)."""
    threads_per_worker: int | None = Field(default=None, ge=1)
    """Threads (and torch threads) per worker (default: :func:`default_layout`: every core is used)."""
    memory_limit: str | None = None
    """Memory limit per local worker (Dask syntax, e.g. ``4GB``); default: share of the machine."""
    devices: tuple[int, ...] | None = None
    """GPU indices to use (local-gpu); default: all visible."""
    interface: str | None = None
    """Network interface the local scheduler, nannies and workers listen on (``eth0``, ``ib0``).
    Default: none, they listen on 127.0.0.1 only: Dask runs whatever task a peer sends, so nobody
    else on the network may reach them unless you ask for it."""
    slurm: SlurmOptions = SlurmOptions()
    """Settings for kind ``slurm``."""


BUILTIN = ("local", "local-gpu", "slurm")


def load_profile(name_or_path: str | os.PathLike[str] | None) -> ClusterProfile:
    """A built-in profile by name, or a YAML file of :class:`ClusterProfile` fields."""
    if name_or_path is None or str(name_or_path) in BUILTIN:
        return ClusterProfile(kind=str(name_or_path or "local"))  # type: ignore[arg-type]
    path = Path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"--cluster {name_or_path}: neither a profile name ({', '.join(BUILTIN)}) nor a YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
        return ClusterProfile.model_validate(data)
    except (yaml.YAMLError, ValidationError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: invalid cluster profile: {_first_error(e)}") from e


def _first_error(e: Exception) -> str:
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
    return str(e).splitlines()[0]


@dataclass(frozen=True)
class Layout:
    """Worker processes x threads (= torch threads) per worker of a local cluster."""

    workers: int
    threads_per_worker: int


def default_layout(cores: int | None = None, memory: int | None = None) -> Layout:
    """The CPU worker layout for ``cores`` cores and ``memory`` bytes (default: this machine).

    One single-threaded worker process per core (N x 1), as long as each gets
    :data:`WORKER_MEMORY`; otherwise fewer workers with more threads each.  N x 1 measured faster
    than 1 x N for the bundled 2-D U-Net in bf16 + channels_last, and it keeps every core busy in
    the labelling stages, which are single-threaded per block (``benchmarks/README.md``, issue 15).
    Override with ``--workers`` / the profile's ``workers`` and ``threads_per_worker``.
    """
    cores = max(1, cores if cores is not None else _cpu_count())
    memory = memory if memory is not None else _memory_bytes()
    workers = max(1, min(cores, memory // WORKER_MEMORY)) if memory else cores
    return Layout(workers, max(1, cores // workers))


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 0


def _layout(profile: ClusterProfile) -> Layout:
    """The profile's layout; unset fields from :func:`default_layout`."""
    cores = _cpu_count()
    if profile.workers and profile.threads_per_worker:
        return Layout(profile.workers, profile.threads_per_worker)
    if profile.threads_per_worker:
        return Layout(max(1, cores // profile.threads_per_worker), profile.threads_per_worker)
    if profile.workers:
        return Layout(profile.workers, max(1, cores // profile.workers))
    return default_layout(cores)


def _nanny_class() -> Any:
    """``distributed.Nanny`` whose worker processes start with :data:`WORKER_MALLOC_ENV`."""
    global _NANNY
    if _NANNY is None:
        from distributed import Nanny

        class TorchNanny(Nanny):  # type: ignore[misc]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                # after the config/environment merge: emseg's values win over distributed's defaults
                # (also OMP/MKL_NUM_THREADS=1, which would size torch's thread pool at 1 whatever the layout)
                threads = self.env.get("OMP_NUM_THREADS", str(self.nthreads))
                spawn = {**WORKER_MALLOC_ENV, **{f"{lib}_NUM_THREADS": threads for lib in ("OMP", "MKL", "OPENBLAS")}}
                self.pre_spawn_env.update(spawn)
                self.env.update(spawn)

        _NANNY = TorchNanny
    return _NANNY


_NANNY: Any = None


def _fast_exit_plugin() -> Any:
    """A worker plugin: once its worker has closed, the process ends without interpreter teardown.

    torch's teardown takes seconds on a busy machine, longer than the nanny's 4 s grace period, which
    then kills the process and logs "Worker process still alive after 4.0 seconds, killing".  All
    output is written (and synced by zarr) before a task returns, so nothing is lost.
    """
    from distributed.diagnostics.plugin import WorkerPlugin

    class FastExit(WorkerPlugin):  # type: ignore[misc]
        name = "emseg-fast-exit"

        def setup(self, worker: Any) -> None:
            import atexit

            atexit.register(_exit_now)

    return FastExit()


def _exit_now() -> None:
    """Last atexit handler of a worker process: flush the logs and streams, then end the process."""
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def _configure(client: Any) -> None:
    """What every cluster emseg starts gets: workers that exit at once when closed."""
    client.register_plugin(_fast_exit_plugin())


def _quiet_dask_logs() -> None:
    """Dask's own log lines only with ``-vv`` (root logger at DEBUG).

    Importing distributed sets its loggers to INFO (dask config ``logging``), after the CLI chose
    the levels, and the nannies log worker shutdowns as warnings: at default verbosity (and ``-v``,
    emseg's INFO) a run prints no ``distributed`` line; failed blocks are reported by emseg itself.
    """
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        return
    for name in ("distributed", "dask_jobqueue"):
        logger = logging.getLogger(name)
        if logger.level < logging.CRITICAL:  # a failed block's "Compute Failed" traceback is an ERROR line
            logger.setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class Connection:
    """An open client and the per-task resources its workers advertise."""

    client: Any
    resources: dict[str, float] | None
    threads_per_worker: int


def _attach(client: Any) -> Connection:
    """A Connection for a client whose cluster emseg did not start: GPU tasks if workers offer GPUs."""
    info = client.scheduler_info()
    has_gpu = any("GPU" in (w.get("resources") or {}) for w in info.get("workers", {}).values())
    return Connection(client, {"GPU": 1} if has_gpu else None, 1)


def visible_gpus() -> list[int]:
    """Indices of the CUDA devices this process can see (empty without torch.cuda)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return []
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


@contextlib.contextmanager
def connect(
    cluster: str | os.PathLike[str] | None = None,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    devices: Sequence[int] | None = None,
    client: Connection | Any = None,
) -> Iterator[Connection]:
    """Open a Dask client for a run and close what was started when the run ends.

    ``scheduler`` (an address) joins an existing cluster and leaves it running.  ``client`` (a
    :class:`Connection` or a bare ``distributed.Client``) is used as it is and left open: that is how
    ``emseg segment`` runs predict and label on one cluster.
    """
    from distributed import Client

    _quiet_dask_logs()
    if isinstance(client, Connection):
        yield client
        return
    if client is not None:
        yield _attach(client)
        return
    if scheduler is not None:
        joined = Client(scheduler)
        try:
            yield _attach(joined)
        finally:
            joined.close()
        return
    profile = load_profile(cluster)
    updates: dict[str, Any] = {}
    if workers is not None:
        updates["workers"] = workers
    if devices is not None:
        updates["devices"] = tuple(devices)
    profile = profile.model_copy(update=updates)
    if profile.kind == "slurm":
        from emseg.slurm import slurm_cluster

        with slurm_cluster(profile) as connection:
            _configure(connection.client)
            yield connection
        return
    gpus = list(profile.devices) if profile.devices is not None else visible_gpus()
    if profile.kind == "local-gpu" and not gpus:
        raise ConfigError("--cluster local-gpu: no CUDA device is visible; use --cluster local")
    if gpus:  # local or local-gpu: one pinned worker per GPU wherever GPUs are visible or named
        gpus = gpus[: profile.workers] if profile.workers else gpus
        threads = profile.threads_per_worker or max(1, _cpu_count() // len(gpus))
        cluster_obj = _gpu_cluster(gpus, profile, threads)
        resources: dict[str, float] | None = {"GPU": 1}
        log.info("local cluster: %d GPU worker(s) x %d thread(s)", len(gpus), threads)
    else:
        layout = _layout(profile)
        threads = layout.threads_per_worker
        cluster_obj = _cpu_cluster(profile, layout)
        resources = None
        log.info("local cluster: %d worker(s) x %d thread(s)", layout.workers, threads)
    with cluster_obj, Client(cluster_obj) as client:
        _configure(client)
        yield Connection(client, resources, threads)


def _silence() -> int:
    """Log level of the worker processes' own loggers (Dask's lines only with ``-vv``)."""
    return logging.DEBUG if logging.getLogger().getEffectiveLevel() <= logging.DEBUG else logging.CRITICAL


def _cpu_cluster(profile: ClusterProfile, layout: Layout) -> Any:
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=layout.workers,
        threads_per_worker=layout.threads_per_worker,
        processes=True,
        worker_class=_nanny_class(),
        silence_logs=_silence(),
        memory_limit=profile.memory_limit or "auto",
        dashboard_address=None,
        # no dashboard; its HTTP server (health checks) on a free port: the default 8787 warns when taken
        scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
        **_listen(profile),
        env={"OMP_NUM_THREADS": str(layout.threads_per_worker)},
    )


def _gpu_cluster(gpus: Sequence[int], profile: ClusterProfile, threads: int) -> Any:
    """One Nanny per GPU, pinned with CUDA_VISIBLE_DEVICES, advertising resource GPU=1."""
    from distributed import Scheduler, SpecCluster

    workers = {
        f"gpu-{gpu}": {
            "cls": _nanny_class(),
            "options": {
                "nthreads": threads,
                "resources": {"GPU": 1},
                "silence_logs": _silence(),
                "env": {"CUDA_VISIBLE_DEVICES": str(gpu), "OMP_NUM_THREADS": str(threads)},
                **({"memory_limit": profile.memory_limit} if profile.memory_limit else {}),
                **_listen(profile),
            },
        }
        for gpu in gpus
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard": False, "dashboard_address": "127.0.0.1:0",
                                               **_listen(profile)}}
    return SpecCluster(workers=workers, scheduler=scheduler, name="emseg-local-gpu")


def _listen(profile: ClusterProfile) -> dict[str, str]:
    """Where the local servers listen: the profile's ``interface``, else 127.0.0.1 only (closed by default)."""
    return {"interface": profile.interface} if profile.interface else {"host": "127.0.0.1"}
