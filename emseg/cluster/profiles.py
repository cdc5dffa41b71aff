"""Cluster profiles: where a run's tasks execute (local, local-gpu, slurm or a YAML file), and the open connection.

Pure data and validation: no Dask import, so :mod:`emseg.cluster.local` and :mod:`emseg.cluster.slurm`
both build on it without importing each other.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from emseg.errors import ConfigError

#: glibc malloc settings of every worker process emseg starts (local, local-gpu, SLURM).  glibc reads
#: them once, when the process starts, so they go into the nanny's pre-spawn environment.
#: distributed's default ``MALLOC_TRIM_THRESHOLD_=65536`` (``distributed.nanny.pre-spawn-environ``)
#: also turns off glibc's dynamic mmap threshold: every large torch buffer is then mmap'ed, handed
#: back to the OS after the layer and page-faulted in again by the next one (forward
#: passes measured 2.7x slower than in a plain process).  Here the heap keeps what it frees, and buffers up to
#: 32 MiB (glibc's own ceiling for its dynamic threshold) come from the heap.
WORKER_MALLOC_ENV: dict[str, str] = {"MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}

#: Memory one CPU inference worker may need for a default block (model, raw block, float32 core,
#: activations of one batch of 1116x1116 tiles), bytes; bounds the number of workers on small-memory nodes.
WORKER_MEMORY = 2 << 30


def parse_walltime(walltime: str) -> int:
    """Seconds in a SLURM time limit: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM[:SS]``.

    Raises
    ------
    ConfigError
        The string is not one of these forms.
    """
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", walltime.strip())
    if not m:
        raise ConfigError(f"walltime {walltime!r}: expected HH:MM:SS, MM:SS, MM or D-HH:MM:SS")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        return int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if c is not None:
        return int(a) * 3600 + int(b) * 60 + int(c)
    if b is not None:
        return int(a) * 60 + int(b)
    return int(a) * 60


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
    security: bool = True
    """Mutual TLS between client, scheduler, nannies and workers with credentials made for the run
    (``distributed.Security.temporary()``, :mod:`emseg.cluster.tls`): nobody else on the machine or
    the network can join the cluster or run code on its workers.  ``false`` only where every user who
    can reach the listening ports may act as you (a single-user machine)."""
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
class Connection:
    """An open client and the per-task resources its workers advertise."""

    client: Any
    resources: dict[str, float] | None
    threads_per_worker: int


