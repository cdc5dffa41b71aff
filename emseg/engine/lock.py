"""Run locks: one emseg run per output at a time, also across the nodes of a shared filesystem.

A run that writes ``OUT`` first creates the lock file ``.OUT.emseg-lock`` beside it, holding the
owner's host, pid, process start time and command.  ``OUT`` is resolved first (symlinks followed), so
that two runs naming one output through different links take one lock.  The record is written in full
to a temporary file and then published with ``link`` (atomic and exclusive on local filesystems and
NFS v3+), so a lock file is never empty or half-written, not even when the disk fills up meanwhile.  While the run lasts a daemon thread touches the file every ``HEARTBEAT_S``
seconds.  A second run on the same output fails with :class:`~emseg.errors.OutputInUseError`
(or waits, ``wait_s``), before anything is read, created or deleted, so ``--overwrite`` of an
output in use is refused too.

The lock sits beside the output, not inside it, so that ``--overwrite`` (which removes the output)
cannot remove it.  A lock is stale, and is taken over with a warning, when its owner is a process
of this host that no longer exists (SIGKILL, crash), or when its heartbeat is older than
``STALE_S`` (an owner on another node that died).  Locks are re-entrant within a process, so that
``emseg segment`` can run predict and label on the output it holds.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from emseg.engine.owner import owner_record, process_start
from emseg.errors import OutputInUseError, storage_errors
from emseg.io.location import PathOrUrl

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
"""Seconds between two touches of a held lock file."""
STALE_S = 120.0
"""A lock whose heartbeat is older than this many seconds is taken over (its owner is gone)."""
SUFFIX = ".emseg-lock"

_held: dict[Path, _Held] = {}
_held_guard = threading.Lock()


UNREADABLE_S = 5.0
"""A lock file without a readable owner record older than this many seconds is taken over."""


def lock_path(output: str | os.PathLike[str]) -> Path:
    """The lock file of ``output`` (symlinks resolved): ``.<name>.emseg-lock`` in the same folder."""
    out = Path(os.path.realpath(output))
    return out.parent / f".{out.name}{SUFFIX}"


@dataclass
class _Held:
    path: Path
    token: str
    count: int
    stop: threading.Event
    thread: threading.Thread
    created_dirs: list[Path]


def read_owner(path: Path) -> dict[str, Any] | None:
    """The owner record of lock file ``path`` (``None`` if there is none or it is unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _heartbeat_age(path: Path) -> float | None:
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except OSError:
        return None


def is_stale(path: Path, owner: dict[str, Any] | None, stale_s: float = STALE_S) -> bool:
    """Whether the lock ``path`` belongs to a run that is gone."""
    age = _heartbeat_age(path)
    if age is None:
        return True  # vanished meanwhile
    if owner is None:
        # locks are published complete, so this is garbage (or an older emseg still writing it)
        return age > min(stale_s, UNREADABLE_S)
    if owner.get("host") == socket.gethostname():
        pid = owner.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # exists, other user
        started = owner.get("started")
        now_started = process_start(pid)
        if isinstance(started, (int, float)) and now_started is not None and abs(now_started - started) > 1.0:
            return True  # the pid was reused by another process
        return False
    return age > stale_s


def _describe(path: Path, output: Path, owner: dict[str, Any] | None) -> str:
    age = _heartbeat_age(path)
    if owner is None:
        who = "another emseg run"
    else:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner.get("since", 0))))
        who = (f"emseg {owner.get('command') or 'run'} (pid {owner.get('pid')} on {owner.get('host')}, "
               f"since {since}")
        who += f", heartbeat {age:.0f} s ago)" if age is not None else ")"
    return (f"{output} is in use by {who}; wait until it has finished, or, if that run is gone, "
            f"remove the lock file {path}")


def _try_create(path: Path, record: dict[str, Any]) -> bool:
    """Publish ``record`` as the lock file ``path`` unless one exists; False if one does.

    The record is written and synced to a temporary file first and then hard-linked into place, so
    the lock file appears whole or not at all (a full disk fails the write, before anything is
    published).  Filesystems without hard links fall back to ``O_EXCL`` creation.
    """
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, json.dumps(record).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            return _create_exclusive(path, record)
        return True
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _create_exclusive(path: Path, record: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()  # never leave an empty lock behind
        raise
    os.close(fd)
    return True


def _break_stale(path: Path, owner: dict[str, Any] | None) -> None:
    """Remove a stale lock, unless someone replaced it meanwhile (rename first: only one breaker wins)."""
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    moved = read_owner(aside)
    if owner is not None and moved is not None and moved.get("token") != owner.get("token"):
        # a fresh lock arrived between our read and the rename: put it back if we can
        with contextlib.suppress(OSError):
            os.link(aside, path)
    with contextlib.suppress(OSError):
        aside.unlink()
    log.warning("%s: took over the lock of a run that is gone (%s)", path,
                "unknown owner" if owner is None else f"pid {owner.get('pid')} on {owner.get('host')}")


def _beat(path: Path, token: str, stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        owner = read_owner(path)
        if owner is None or owner.get("token") != token:
            log.warning("%s: the run lock was taken by another process", path)
            return
        with contextlib.suppress(OSError):
            os.utime(path)


def acquire(output: PathOrUrl, command: str = "run", *, wait_s: float = 0.0,
            heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S) -> Path | str:
    """Take the run lock of ``output`` (re-entrant in a process); return the lock file's path.

    Raises
    ------
    OutputInUseError
        Another live run holds the lock (after waiting ``wait_s`` seconds).
    """
    from emseg.io.location import is_url

    if is_url(output):  # object storage: conditional writes instead of O_EXCL and rename
        from emseg.engine import objectlock

        return objectlock.acquire(output, command, wait_s=wait_s, heartbeat_s=heartbeat_s, stale_s=stale_s)
    path = lock_path(str(output))
    with _held_guard:
        held = _held.get(path)
        if held is not None:
            held.count += 1
            return path
    created: list[Path] = []
    parent = path.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    while True:
        if _try_create(path, owner_record(command, token)):
            break
        owner = read_owner(path)
        if is_stale(path, owner, stale_s):
            _break_stale(path, owner)
            continue
        if time.monotonic() >= deadline:
            for d in created:
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise OutputInUseError(_describe(path, Path(str(output)), owner))
        time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
    stop = threading.Event()
    thread = threading.Thread(target=_beat, args=(path, token, stop, heartbeat_s), daemon=True,
                              name=f"emseg-lock-{path.name}")
    thread.start()
    with _held_guard:
        _held[path] = _Held(path, token, 1, stop, thread, created)
    return path


def release(output: PathOrUrl) -> None:
    """Give back one hold of ``output``'s lock; the file goes with the last one."""
    from emseg.io.location import is_url

    if is_url(output):
        from emseg.engine import objectlock

        objectlock.release(output)
        return
    path = lock_path(str(output))
    with _held_guard:
        held = _held.get(path)
        if held is None:
            return
        held.count -= 1
        if held.count > 0:
            return
        del _held[path]
    held.stop.set()
    owner = read_owner(path)
    if owner is not None and owner.get("token") == held.token:
        with contextlib.suppress(OSError):
            path.unlink()
    for d in held.created_dirs:  # folders made only for the lock of a run that wrote nothing there
        with contextlib.suppress(OSError):
            d.rmdir()


@contextlib.contextmanager
def run_lock(output: PathOrUrl, command: str = "run", *, wait_s: float = 0.0) -> Iterator[Path | str]:
    """``with run_lock(out, "predict"):`` holds ``out``'s lock for the block; see :func:`acquire`."""
    path = acquire(output, command, wait_s=wait_s)
    try:
        yield path
    finally:
        release(output)


F = TypeVar("F", bound=Callable[..., Any])


def locked(argument: str, command: str) -> Callable[[F], F]:
    """Decorate a stage entry point so it holds the run lock of its output argument ``argument``.

    Nothing is locked when the call has ``dry_run=True`` (a dry run writes nothing).
    """

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            output = bound.arguments.get(argument)
            if output is None or bound.arguments.get("dry_run"):
                return fn(*args, **kwargs)
            # the output as it is on disk: a symlink's target is what gets checked, locked and written
            # (a URL is left as it is: object storage has no links)
            from emseg.io.location import is_url

            if not is_url(output):
                output = type(output)(os.path.realpath(output)) if isinstance(output, Path) else os.path.realpath(output)
            bound.arguments[argument] = output
            args, kwargs = bound.args, bound.kwargs
            # an OSError that lost its path (zarr's stores drop it) is reported against the output
            with run_lock(output, command), storage_errors(output, f"{command} into it"):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
