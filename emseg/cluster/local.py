"""Local Dask clusters: CPU workers laid out over this machine's cores, or one worker per visible GPU.

Every worker process starts with :data:`~emseg.cluster.profiles.WORKER_MALLOC_ENV` and torch thread
counts matching its Dask threads.  :func:`emseg.cluster.connect` chooses between these and SLURM.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emseg.cluster.profiles import WORKER_MALLOC_ENV, WORKER_MEMORY, ClusterProfile, Connection
from emseg.cluster.tls import cluster_security, quiet_scheduler_http
from emseg.errors import ConfigError

log = logging.getLogger(__name__)

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
    the labelling stages, which are single-threaded per block (``benchmarks/README.md``).
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


def visible_gpus() -> list[int]:
    """Indices of the CUDA devices this process can see (empty without torch.cuda).

    Where Linux shows no GPU device node (NVIDIA's ``/dev/nvidia<N>``, ROCm's ``/dev/kfd``, WSL's
    ``/dev/dxg``) there is none to see, and torch is not imported to say so (seconds in every command
    that starts a cluster, also those that never use torch).
    """
    if _no_gpu_device_nodes():
        return []
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return []
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def _no_gpu_device_nodes() -> bool:
    dev = Path("/dev")
    if not sys.platform.startswith("linux") or not dev.is_dir():
        return False  # elsewhere torch is asked
    return not (any(dev.glob("nvidia[0-9]*")) or (dev / "kfd").exists() or (dev / "dxg").exists())


@contextlib.contextmanager
def local_cluster(profile: ClusterProfile) -> Iterator[Connection]:
    """A LocalCluster (CPU workers) or one pinned worker per GPU, and its client, for the duration of a run.

    GPUs are the profile's ``devices``, else every visible one; with GPUs (kind ``local`` or
    ``local-gpu``) each worker advertises ``GPU=1``.  Kind ``local-gpu`` without a GPU is a ConfigError.
    """
    from distributed import Client

    _quiet_distributed()
    gpus = list(profile.devices) if profile.devices is not None else visible_gpus()
    if profile.kind == "local-gpu" and not gpus:
        raise ConfigError("--cluster local-gpu: no CUDA device is visible; use --cluster local")
    tls = cluster_security(profile.security)
    with quiet_scheduler_http():
        if gpus:  # local or local-gpu: one pinned worker per GPU wherever GPUs are visible or named
            gpus = gpus[: profile.workers] if profile.workers else gpus
            threads = profile.threads_per_worker or max(1, _cpu_count() // len(gpus))
            cluster_obj = _gpu_cluster(gpus, profile, threads, tls)
            resources: dict[str, float] | None = {"GPU": 1}
            log.info("local cluster: %d GPU worker(s) x %d thread(s)", len(gpus), threads)
        else:
            layout = _layout(profile)
            threads = layout.threads_per_worker
            cluster_obj = _cpu_cluster(profile, layout, tls)
            resources = None
            log.info("local cluster: %d worker(s) x %d thread(s)", layout.workers, threads)
    log.debug("scheduler at %s", cluster_obj.scheduler_address)
    with cluster_obj, Client(cluster_obj, security=tls.get("security")) as client:
        yield Connection(client, resources, threads)


def _quiet_distributed() -> None:
    """Dask's own loggers at WARNING in this process unless the root logger shows DEBUG (``-vv``): importing
    distributed applies its logging config, which sets INFO on some of them after the CLI chose the level."""
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        return
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if (name == "distributed" or name.startswith("distributed.")) and isinstance(logger, logging.Logger):
            if logger.level != logging.NOTSET and logger.level < logging.WARNING:
                logger.setLevel(logging.WARNING)
    if logging.getLogger("distributed").getEffectiveLevel() < logging.WARNING:
        logging.getLogger("distributed").setLevel(logging.WARNING)


def _silence() -> int:
    """Log level of the worker processes' own loggers (Dask's lines only with ``-vv``)."""
    return logging.DEBUG if logging.getLogger().getEffectiveLevel() <= logging.DEBUG else logging.CRITICAL


def _cpu_cluster(profile: ClusterProfile, layout: Layout, tls: dict[str, Any]) -> Any:
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
        **tls,
        env={"OMP_NUM_THREADS": str(layout.threads_per_worker)},
    )


def _gpu_cluster(gpus: Sequence[int], profile: ClusterProfile, threads: int, tls: dict[str, Any]) -> Any:
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
                **tls,
            },
        }
        for gpu in gpus
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard": False, "dashboard_address": "127.0.0.1:0",
                                               **_listen(profile), **tls}}
    return SpecCluster(workers=workers, scheduler=scheduler, name="emseg-local-gpu", security=tls.get("security"))


def _listen(profile: ClusterProfile) -> dict[str, str]:
    """Where the local servers listen: the profile's ``interface``, else 127.0.0.1 only (closed by default)."""
    return {"interface": profile.interface} if profile.interface else {"host": "127.0.0.1"}
