"""Authentication of the Dask clusters emseg starts: TLS with credentials made for one run.

Dask runs whatever task a peer of the scheduler sends, as the user who started the cluster.  A
scheduler listening on 127.0.0.1 is reachable by every user of a shared login or compute node, so
loopback alone is no boundary.  Every cluster emseg starts (local, local-gpu, SLURM) therefore
requires mutual TLS with a key pair made for the run (:meth:`distributed.Security.temporary`): the
scheduler, workers, nannies and the client hold it, nobody else has it, and a connection without it
is refused during the TLS handshake.

The credentials live in memory.  Local worker processes receive them from their nanny through a
pipe; SLURM worker jobs read them from files (mode 0600) in a private directory (mode 0700) created
for the run in the profile's ``log_directory`` and removed when the run ends.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Routes of the scheduler's HTTP server in the clusters emseg starts: the health check only.
#: Distributed's default also serves worker logs, call stacks and task names (``/info``, ``/json``)
#: to anyone who can reach the port, without TLS or any other check.
SCHEDULER_HTTP_ROUTES = ["distributed.http.health"]


def temporary_security() -> Any:
    """A new ``distributed.Security`` with a self-signed key pair for one run (about 0.1-0.5 s)."""
    from distributed.security import Security

    return Security.temporary()


def cluster_security(enabled: bool) -> dict[str, Any]:
    """Keyword arguments for a cluster or server: ``security`` and ``protocol="tls://"``, or none."""
    if not enabled:
        return {}
    return {"security": temporary_security(), "protocol": "tls://"}


@contextlib.contextmanager
def private_directory(parent: Path) -> Iterator[Path]:
    """A directory only this user can read (mode 0700) inside ``parent``, removed on exit."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=".emseg-tls-", dir=parent))  # mkdtemp: mode 0700
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def quiet_scheduler_http() -> Iterator[None]:
    """Start schedulers inside with :data:`SCHEDULER_HTTP_ROUTES` (a health check, nothing else)."""
    import dask

    with dask.config.set({"distributed.scheduler.http.routes": SCHEDULER_HTTP_ROUTES}):
        yield
