"""Every error emseg raises on purpose derives from :class:`EmsegError`.

The CLI turns an ``EmsegError`` into one ``Error: <message>`` line on stderr and exit code 1;
anything else is a bug and keeps its traceback.  Subclasses also inherit the closest builtin so
callers may catch either (``except FileNotFoundError`` still works).

A message states what was expected, what was received and, where one exists, the fix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from os import PathLike
from typing import Any


class EmsegError(Exception):
    """Base class of every error emseg raises deliberately."""

    exit_code = 1


class VolumeNotFoundError(EmsegError, FileNotFoundError):
    """A path that should hold a volume (or TIFF, HDF5, checkpoint ...) does not exist."""


class NotAVolumeError(EmsegError, ValueError):
    """A path exists but is not a readable zarr array / OME-Zarr image / image file."""


class VolumeShapeError(EmsegError, ValueError):
    """A volume has the wrong number of axes or a shape that cannot be processed."""


class UnsupportedDtypeError(EmsegError, TypeError):
    """A volume's dtype is not one emseg can process."""


class OutputExistsError(EmsegError, FileExistsError):
    """The output already exists and ``--overwrite`` was not given."""


class SameInputOutputError(EmsegError, ValueError):
    """The output path would overwrite (or sit inside) the input."""


class IncompleteOutputError(EmsegError, RuntimeError):
    """A volume was opened that an interrupted run left half-written."""


class ConfigError(EmsegError, ValueError):
    """A configuration file, option or combination of options is invalid."""


class CheckpointError(EmsegError, ValueError):
    """A model checkpoint is missing, malformed or unsafe to load."""


class GeometryError(EmsegError, ValueError):
    """A block size, halo or region does not fit the volume, the model or the storage chunks."""


class InvalidDataError(EmsegError, ValueError):
    """The data values themselves are unusable (NaNs in float input, unreadable chunks...)."""


class ResumeMismatchError(EmsegError, RuntimeError):
    """An output holds a run with other parameters; rerun with ``--overwrite`` to replace it."""

    @classmethod
    def between(cls, where: object, what: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> ResumeMismatchError:
        """The error for ``where`` holding ``what`` made with ``old`` parameters instead of ``new``."""
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return cls(f"{where}: holds {what} made with other parameters (differs in: "
                   f"{', '.join(changed) or 'layout'}); pass --overwrite to replace it")


class GraphNotFoundError(EmsegError, FileNotFoundError):
    """A fragments volume has no (finished) region graph to agglomerate."""


class RunIncompleteError(EmsegError, RuntimeError):
    """Some blocks failed; the finished ones are kept and a rerun resumes."""

    exit_code = 3


class SlurmError(EmsegError, RuntimeError):
    """SLURM refused a job, no worker started in time, or a submitted job failed."""


class OutputInUseError(EmsegError, RuntimeError):
    """Another emseg run holds the output's run lock."""


class ResourceLimitError(EmsegError, MemoryError):
    """A block, patch, model or output would need more memory (or disk) than the worker has."""


class StorageError(EmsegError, OSError):
    """Reading or writing a path failed (permissions, disk full, read-only filesystem ...)."""


@contextlib.contextmanager
def storage_errors(path: str | PathLike[str], what: str) -> Iterator[None]:
    """Re-raise an OSError without a path (zarr's stores drop it) as a StorageError naming ``path``."""
    try:
        yield
    except EmsegError:
        raise  # already says what went wrong (VolumeNotFoundError is an OSError without a filename too)
    except OSError as e:
        if e.filename is not None:
            raise
        reason = e.strerror or str(e) or type(e).__name__
        err = StorageError(f"{path}: cannot {what}: {reason}")
        err.errno = e.errno
        raise err from e
