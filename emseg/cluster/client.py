"""Open the Dask client a run uses, from a cluster profile, a scheduler address or a client given.

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
from typing import Any

from emseg.cluster.local import local_cluster
from emseg.cluster.profiles import Connection, load_profile
from emseg.cluster.slurm import slurm_cluster
from emseg.errors import ConfigError

log = logging.getLogger(__name__)


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


def _attach(client: Any) -> Connection:
    """A Connection for a client whose cluster emseg did not start: GPU tasks if workers offer GPUs."""
    info = client.scheduler_info()
    has_gpu = any("GPU" in (w.get("resources") or {}) for w in info.get("workers", {}).values())
    return Connection(client, {"GPU": 1} if has_gpu else None, 1)


def _join(address: str) -> Any:
    """A client of the scheduler at ``address``; a ConfigError when it is no address or does not answer."""
    from distributed import Client
    from distributed.comm import resolve_address

    try:
        resolve_address(address)
    except (ValueError, OSError) as e:
        raise ConfigError(f"--scheduler {address!r} is not a scheduler address ({e}); expected e.g. "
                          "tcp://10.0.0.5:8786") from e
    try:
        return Client(address)
    except (OSError, TimeoutError) as e:
        raise ConfigError(f"--scheduler {address}: no Dask scheduler answered ({e}); is it running?") from e
    except TypeError as e:  # distributed: a tls:// address without an SSL context
        if address.startswith("tls://"):
            raise ConfigError(f"--scheduler {address}: a TLS scheduler needs this client's TLS credentials in the "
                              "Dask configuration (distributed.comm.tls.ca-file, client.cert, client.key)") from e
        raise


MIN_WORKER_MEMORY = 256 * 2**20
"""Bytes below which a worker process (python, numpy, dask) cannot even start its first task."""


def _check_worker_memory(profile: Any) -> None:
    """Refuse a local cluster whose workers would each get too little memory (thousands of workers,
    ``memory_limit: 1MB``) before any process starts, instead of a hang or a closed connection."""
    import psutil
    from dask.utils import format_bytes, parse_bytes

    from emseg.errors import ResourceLimitError

    if profile.memory_limit:
        per_worker = int(parse_bytes(profile.memory_limit))
    else:
        n = profile.workers or (len(profile.devices) if profile.devices else 1)
        per_worker = int(psutil.virtual_memory().total) // max(1, n)
    if per_worker < MIN_WORKER_MEMORY:
        raise ResourceLimitError(f"a Dask worker process needs about {format_bytes(MIN_WORKER_MEMORY)} but a worker "
                                 f"would have {format_bytes(per_worker)}; use fewer --workers, or a larger "
                                 "memory_limit in the cluster profile")


def _check_devices(devices: Sequence[int] | None) -> None:
    """Refuse GPUs (``--devices``) this machine does not have, instead of running on the CPU unasked."""
    if devices is None:
        return
    from emseg.cluster.local import visible_gpus

    visible = visible_gpus()
    missing = [d for d in devices if d not in visible]
    if missing:
        raise ConfigError(f"--devices {','.join(map(str, devices))}: no CUDA device {missing} on this machine "
                          f"(visible: {visible or 'none'}); leave --devices out to run on the CPU")


def _check_interface(interface: str | None) -> None:
    """Refuse a profile's network ``interface`` that this machine does not have (before anything starts)."""
    if not interface:
        return
    import psutil

    known = sorted(psutil.net_if_addrs())
    if interface not in known:
        raise ConfigError(f"cluster profile: network interface {interface!r} does not exist on this machine; "
                          f"it has {', '.join(known)}")


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

    _quiet_dask_logs()
    if isinstance(client, Connection):
        yield client
        return
    if client is not None:
        yield _attach(client)
        return
    if scheduler is not None:
        joined = _join(scheduler)
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
    _check_interface(profile.interface)
    if profile.kind != "slurm":
        _check_worker_memory(profile)
        _check_devices(profile.devices)
    cluster_cm = slurm_cluster(profile) if profile.kind == "slurm" else local_cluster(profile)
    with cluster_cm as connection:
        _configure(connection.client)
        yield connection
