"""Who holds a run lock: the record a lock file or lock object carries (host, pid, process start, command)."""

from __future__ import annotations

import os
import socket
import time
from typing import Any


def process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None when that cannot be told.

    With the pid it tells a live owner from a reused pid."""
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # noqa: BLE001 - any failure means "unknown"
        return None


def owner_record(command: str, token: str) -> dict[str, Any]:
    """This process as the owner of a lock taken for ``command``; ``token`` tells this hold from others."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": process_start(pid), "command": command,
            "since": time.time(), "token": token}
