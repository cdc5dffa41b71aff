"""Run locks on object storage (``s3://``): conditional writes instead of ``O_EXCL`` and rename.

Object stores have no rename, no ``O_EXCL`` and no POSIX locks, but S3 (AWS since 2024, MinIO,
moto, Ceph RGW) makes a PUT conditional: ``If-None-Match: *`` succeeds only when the key does not
exist, ``If-Match: <etag>`` only when the object is still the one read.  The lock of ``OUT`` is the
object ``OUT/.emseg-lock``, *inside* the output, so that a run writes nothing outside the prefix it
names (``--overwrite`` clears the output around it, see :func:`emseg.io.location.remove_tree`).

- **take**: PUT the owner record (host, pid, command, a random token) with ``If-None-Match: *``.
  Exactly one of several concurrent runs gets it; the others get 412 and read the record.
- **heartbeat**: every ``HEARTBEAT_S`` the owner re-PUTs its record with ``If-Match`` on the ETag of
  its last write, so a lock taken over by someone else is never overwritten (the beat stops and
  warns).  The object's ``LastModified`` is the heartbeat, in the store's clock.
- **stale**: a lock whose heartbeat is older than ``STALE_S`` (by the store's clock: ``LastModified``
  against the ``Date`` of the same response, so the hosts' clocks do not matter), or whose owner
  is a process of this host that no longer exists, is taken over by a PUT with ``If-Match`` on the
  ETag that was read: of several breakers exactly one wins.
- **release**: the owner deletes the object if it still holds its token (read, compare, delete: a
  takeover between the read and the delete, possible only after ``STALE_S`` without heartbeats,
  would lose that newer lock).

Limits: needs a store that honours conditional PUTs (a store that ignores ``If-None-Match``
would let two runs in; S3, MinIO, moto and Ceph honour it).  ``gs://`` outputs are not written
(gcsfs offers generation preconditions, not wired here).  A run that stalls for more than
``STALE_S`` without heartbeats (a frozen host) can be taken over while it still writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

from emseg.engine.owner import owner_record
from emseg.errors import OutputInUseError, StorageError
from emseg.io.location import PathOrUrl, describe, filesystem, location, scheme_of

log = logging.getLogger(__name__)

LOCK_NAME = ".emseg-lock"
"""The lock object's name inside the output prefix."""
HEARTBEAT_S = 10.0
STALE_S = 120.0


@dataclass
class _Held:
    key: str
    token: str
    count: int
    etag: str
    stop: threading.Event
    thread: threading.Thread


_held: dict[str, _Held] = {}
_guard = threading.Lock()


def lock_url(output: PathOrUrl) -> str:
    """``OUT/.emseg-lock``: the lock object of the output ``OUT``."""
    return f"{str(location(output)).rstrip('/')}/{LOCK_NAME}"


def _client(url: str) -> tuple[Any, str, str]:
    if scheme_of(url) != "s3":
        raise StorageError(f"{url}: emseg writes outputs to local paths and s3:// (conditional writes guard "
                           f"the run lock); {scheme_of(url)}:// is read-only here")
    fs, inner = filesystem(url)
    bucket, _, key = inner.partition("/")
    return fs, bucket, key


def _error_code(error: BaseException) -> str:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    cause = error.__cause__ or error.__context__
    return _error_code(cause) if cause is not None and cause is not error else ""


def _call(fs: Any, method: str, url: str, **kwargs: Any) -> Any:
    """One S3 call; PreconditionFailed/NoSuchKey come back as ``None``, other failures as StorageError."""
    try:
        return fs.call_s3(method, **kwargs)
    except Exception as e:  # noqa: BLE001 - botocore/aiobotocore raise many types; sorted by code below
        code = _error_code(e)
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return None
        if code == "NoSuchBucket":
            raise StorageError(f"{url}: no such bucket: {describe(e)}") from e
        if code in ("AccessDenied", "403") and method == "put_object":
            raise StorageError(f"{url}: cannot write there ({describe(e)}): the bucket is read-only for these "
                               "credentials; choose another output or credentials that may write") from e
        if method != "put_object" and (code in ("NoSuchKey", "404") or isinstance(e, FileNotFoundError)):
            return None  # no lock object (a PUT never misses its key: there a 404 is a missing bucket)
        raise StorageError(f"{url}: cannot {'take the run lock' if method == 'put_object' else 'read the run lock'}"
                           f": {describe(e)}") from e


def _record(command: str, token: str) -> bytes:
    return json.dumps(owner_record(command, token)).encode()


def _read(fs: Any, bucket: str, key: str, url: str) -> tuple[dict[str, Any] | None, str, float] | None:
    """(owner record, etag, heartbeat age in s by the store's clock), or None when there is no lock."""
    response = _call(fs, "get_object", url, Bucket=bucket, Key=key)
    if response is None:
        return None
    body = response["Body"]
    data = _read_body(fs, body)
    try:
        owner = json.loads(data)
    except (ValueError, TypeError):
        owner = None
    modified: datetime = response["LastModified"]
    date = (response.get("ResponseMetadata", {}).get("HTTPHeaders", {}) or {}).get("date")
    now = parsedate_to_datetime(date) if date else datetime.now(modified.tzinfo)
    return (owner if isinstance(owner, dict) else None), str(response["ETag"]), (now - modified).total_seconds()


def _read_body(fs: Any, body: Any) -> bytes:
    from fsspec.asyn import sync

    async def read() -> bytes:
        async with body as stream:
            return bytes(await stream.read())

    return bytes(sync(fs.loop, read))


def _stale(owner: dict[str, Any] | None, age: float, stale_s: float) -> bool:
    if owner is not None and owner.get("host") == socket.gethostname():
        pid = owner.get("pid")
        if isinstance(pid, int) and pid > 0:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True  # its owner on this host was killed (SIGKILL, crash)
            except PermissionError:
                pass
    return age > stale_s


def _describe(url: str, output: PathOrUrl, owner: dict[str, Any] | None, age: float) -> str:
    who = "another emseg run" if owner is None else (
        f"emseg {owner.get('command') or 'run'} (pid {owner.get('pid')} on {owner.get('host')}, heartbeat "
        f"{age:.0f} s ago)")
    return (f"{output} is in use by {who}; wait until it has finished, or, if that run is gone, delete the lock "
            f"object {url}")


def acquire(output: PathOrUrl, command: str = "run", *, wait_s: float = 0.0, heartbeat_s: float = HEARTBEAT_S,
            stale_s: float = STALE_S) -> str:
    """Take the run lock of the object-storage output ``output`` (re-entrant in a process)."""
    url = lock_url(output)
    with _guard:
        held = _held.get(url)
        if held is not None:
            held.count += 1
            return url
    fs, bucket, key = _client(url)
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    while True:
        made = _call(fs, "put_object", url, Bucket=bucket, Key=key, Body=_record(command, token), IfNoneMatch="*")
        if made is not None:
            etag = str(made["ETag"])
            break
        found = _read(fs, bucket, key, url)
        if found is None:
            continue  # released meanwhile
        owner, etag_seen, age = found
        if _stale(owner, age, stale_s):
            taken = _call(fs, "put_object", url, Bucket=bucket, Key=key, Body=_record(command, token),
                          IfMatch=etag_seen)
            if taken is not None:
                log.warning("%s: took over the lock of a run that is gone (%s)", url,
                            "unknown owner" if owner is None else f"pid {owner.get('pid')} on {owner.get('host')}")
                etag = str(taken["ETag"])
                break
            continue
        if time.monotonic() >= deadline:
            raise OutputInUseError(_describe(url, output, owner, age))
        time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
    stop = threading.Event()
    held = _Held(url, token, 1, etag, stop, threading.Thread())
    held.thread = threading.Thread(target=_beat, args=(held, command, heartbeat_s), daemon=True,
                                   name="emseg-object-lock")
    held.thread.start()
    with _guard:
        _held[url] = held
    return url


def _beat(held: _Held, command: str, interval: float) -> None:
    fs, bucket, key = _client(held.key)
    while not held.stop.wait(interval):
        try:
            done = _call(fs, "put_object", held.key, Bucket=bucket, Key=key, Body=_record(command, held.token),
                         IfMatch=held.etag)
        except StorageError as e:
            log.warning("%s: heartbeat failed: %s", held.key, e)
            continue
        if done is None:
            log.warning("%s: the run lock was taken by another process", held.key)
            return
        held.etag = str(done["ETag"])


def release(output: PathOrUrl) -> None:
    """Give back one hold of the lock; the object is deleted with the last one (if still ours)."""
    url = lock_url(output)
    with _guard:
        held = _held.get(url)
        if held is None:
            return
        held.count -= 1
        if held.count > 0:
            return
        del _held[url]
    held.stop.set()
    held.thread.join(timeout=5)
    fs, bucket, key = _client(url)
    with contextlib.suppress(StorageError):
        found = _read(fs, bucket, key, url)
        if found is not None and found[0] is not None and found[0].get("token") == held.token:
            _call(fs, "delete_object", url, Bucket=bucket, Key=key)


def check_writable(output: PathOrUrl) -> None:
    """Refuse an output URL that emseg cannot write with a safe run lock (anything but ``s3://``)."""
    _client(lock_url(output))
