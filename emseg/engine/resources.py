"""Resource guards: refuse a block, patch or output that cannot fit before anything is built.

A run that needs more memory per block than a worker has ends in a machine-wide OOM kill, long
after it started; these checks compare an estimate with the worker's limit first and fail with
one message naming both.
"""

from __future__ import annotations

import os
from typing import Any

from emseg.errors import ResourceLimitError


def _parse_bytes(text: str) -> int:
    from dask.utils import parse_bytes

    return int(parse_bytes(text))


def worker_memory(cluster: str | os.PathLike[str] | None = None, *, workers: int | None = None,
                  devices: Any = None, scheduler: str | None = None, client: Any = None) -> int | None:
    """Memory one worker of the run may use, bytes (None: unknown, e.g. a scheduler address).

    An open client is asked for its workers' limits; otherwise the profile's ``memory_limit`` (or
    the SLURM job's ``memory`` shared by its workers), else this machine's memory shared by the
    local workers, as Dask's ``memory_limit="auto"`` does.
    """
    import psutil

    if client is not None:
        inner = getattr(client, "client", client)
        try:
            limits = [int(w.get("memory_limit") or 0) for w in inner.scheduler_info()["workers"].values()]
        except Exception:  # noqa: BLE001 - a client we cannot ask: no check
            return None
        limits = [m for m in limits if m > 0]
        return min(limits) if limits else None
    if scheduler is not None:
        return None
    from emseg.cluster import load_profile

    profile = load_profile(cluster)
    if profile.kind == "slurm":
        return _parse_bytes(profile.slurm.memory) // max(1, profile.slurm.gpus_per_job)
    if profile.memory_limit:
        return _parse_bytes(profile.memory_limit)
    n = workers or profile.workers or (len(devices) if devices else None) or max(1, min(2, os.cpu_count() or 1))
    return int(psutil.virtual_memory().total) // n


def check_memory(need: int, limit: int | None, what: str, fix: str) -> None:
    """Raise :class:`ResourceLimitError` when ``need`` bytes exceed ``limit``."""
    if limit is not None and need > limit:
        raise ResourceLimitError(f"{what} needs about {_human(need)} but a worker has {_human(limit)}; {fix}")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"
