"""Where a volume lives: a local path, or a URL of object storage read through fsspec.

``s3://``, ``gs://`` (``gcs://``), ``http(s)://`` and ``file://`` are accepted wherever emseg takes
a volume path.  ``file://`` URLs become plain local paths; the others stay URLs and are opened with
the libraries' own configuration: s3fs/botocore take ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_PROFILE`` ..., gcsfs takes ``GOOGLE_APPLICATION_CREDENTIALS``; emseg adds nothing of its own.
A URL is kept as a :class:`upath.UPath` (``url / "0"``, ``.name``, ``.parent`` as for a
:class:`pathlib.Path`), and zarr opens it with the same string.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit

from upath import UPath

from emseg.errors import StorageError

if TYPE_CHECKING:
    import zarr

REMOTE_SCHEMES = ("s3", "gs", "gcs", "http", "https")
"""URL schemes read through fsspec (``file://`` is turned into a local path instead)."""
READ_ONLY_SCHEMES = ("http", "https")

Location = Path | UPath
"""A local path or a URL; both support ``/``, ``.name``, ``.parent`` and ``str()``."""


def scheme_of(path: str | os.PathLike[str]) -> str:
    """The URL scheme of ``path`` (``""`` for a local path, also for Windows drive letters)."""
    text = str(path)
    if "://" not in text:
        return ""
    scheme = text.split("://", 1)[0].lower()
    return scheme if scheme.isalnum() and len(scheme) > 1 else ""


def is_url(path: str | os.PathLike[str] | UPath) -> bool:
    """Whether ``path`` names object storage (``s3://``, ``gs://``, ``https://`` ...), not a local file."""
    if isinstance(path, UPath) and not isinstance(path, Path):
        return True
    return scheme_of(str(path)) in REMOTE_SCHEMES


def location(path: str | os.PathLike[str] | UPath) -> Location:
    """``path`` as a :class:`~pathlib.Path` (local, ``file://`` included) or a URL :class:`~upath.UPath`.

    Raises
    ------
    StorageError
        A URL scheme emseg cannot read (``ftp://`` ...).
    """
    if isinstance(path, UPath) and not isinstance(path, Path):
        return path
    text = os.fspath(path) if not isinstance(path, UPath) else str(path)
    scheme = scheme_of(text)
    if not scheme:
        return Path(text)
    if scheme == "file":
        return Path(unquote(urlsplit(text).path))
    if scheme not in REMOTE_SCHEMES:
        raise StorageError(f"{text}: unsupported URL scheme {scheme}://; emseg reads local paths, file://, "
                           f"{', '.join(s + '://' for s in REMOTE_SCHEMES)}")
    # no listings cache: other processes (the run's workers) write the same prefixes meanwhile
    return UPath(text.rstrip("/"), use_listings_cache=False)


def as_str(path: str | os.PathLike[str] | UPath) -> str:
    """The string zarr, fsspec and tensorstore take for ``path`` (a URL stays a URL)."""
    return str(location(path))


def absolute(path: str | os.PathLike[str] | UPath) -> Location:
    """``path`` made absolute (local: symlinks resolved); a URL is already absolute."""
    loc = location(path)
    # realpath: a link's target, and a symlink loop is left as it is instead of raising
    return Path(os.path.realpath(loc)) if isinstance(loc, Path) else loc


def read_only(path: str | os.PathLike[str] | UPath) -> bool:
    """Whether the storage at ``path`` cannot be written at all (``https://``)."""
    return scheme_of(str(path)) in READ_ONLY_SCHEMES


def filesystem(path: str | os.PathLike[str] | UPath) -> tuple[Any, str]:
    """The fsspec filesystem of ``path`` and the path inside it (local paths: the local filesystem)."""
    import fsspec.core

    loc = location(path)
    if isinstance(loc, Path):
        fs, inner = fsspec.core.url_to_fs(str(loc))
    else:
        fs, inner = fsspec.core.url_to_fs(str(loc), use_listings_cache=False)
    return fs, inner


def exists(path: str | os.PathLike[str] | UPath) -> bool:
    """Whether a file or a folder (an object or a prefix) exists at ``path``.

    Raises
    ------
    StorageError
        The storage cannot be reached or refuses access.
    """
    loc = location(path)
    if isinstance(loc, Path):
        return loc.exists() or loc.is_symlink()
    try:
        return bool(loc.exists())
    except (OSError, PermissionError) as e:
        raise StorageError(f"{loc}: cannot reach it: {describe(e)}") from e


def zarr_format_at(path: str | os.PathLike[str] | UPath) -> Literal[2, 3] | None:
    """The zarr format of the node stored at ``path``, from its metadata object; None where there is none.

    For ``zarr.open*(..., zarr_format=...)``: without it zarr probes every format's metadata objects,
    which on object storage is a request per probe and another listing per missing object (7-8 requests
    to open one group, 2-3 with the format given).
    """
    loc = location(path)
    if exists(loc / "zarr.json"):
        return 3
    if exists(loc / ".zgroup") or exists(loc / ".zarray"):
        return 2
    return None


def open_zarr(path: PathOrUrl, mode: Literal["r", "r+", "a"] = "r") -> zarr.Array[Any] | zarr.Group:
    """``zarr.open`` of the node at ``path`` in its stored format (:func:`zarr_format_at`)."""
    import zarr

    return zarr.open(str(path), mode=mode, zarr_format=zarr_format_at(path))


def open_zarr_group(path: PathOrUrl, mode: Literal["r", "r+", "a"] = "r") -> zarr.Group:
    """``zarr.open_group`` of the group at ``path`` in its stored format (:func:`zarr_format_at`)."""
    import zarr

    return zarr.open_group(str(path), mode=mode, zarr_format=zarr_format_at(path))


def open_zarr_array(path: PathOrUrl, mode: Literal["r", "r+", "a"] = "r") -> zarr.Array[Any]:
    """``zarr.open_array`` of the array at ``path`` in its stored format (:func:`zarr_format_at`)."""
    import zarr

    return zarr.open_array(str(path), mode=mode, zarr_format=zarr_format_at(path))


def describe(error: BaseException) -> str:
    """A one-line reason for a storage error (botocore/aiohttp messages are long and nested)."""
    text = str(error) or type(error).__name__
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


PathOrUrl = str | os.PathLike[str] | UPath
"""What emseg's functions take as a place: a path, a ``file://`` or object-storage URL, a Location."""


def is_dir(path: PathOrUrl) -> bool:
    """Whether ``path`` is a folder (for object storage: a prefix with objects under it)."""
    loc = location(path)
    try:
        return bool(loc.is_dir())
    except OSError as e:
        raise StorageError(f"{loc}: cannot reach it: {describe(e)}") from e


def read_bytes(path: PathOrUrl) -> bytes | None:
    """The bytes of the file or object at ``path``; None where there is none."""
    loc = location(path)
    try:
        return bytes(loc.read_bytes())
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def write_bytes(path: PathOrUrl, data: bytes) -> None:
    """Write a whole file or object atomically: a reader sees the old bytes or the new, never a part.

    Local files are written to a temporary name and renamed; an object store's PUT is atomic already
    (and there is no rename there).
    """
    loc = location(path)
    if isinstance(loc, Path):
        import tempfile

        loc.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=loc.parent, prefix=f".{loc.name}.", suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, loc)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    fs, inner = filesystem(loc)
    fs.pipe_file(inner, data)


def stat_of(path: PathOrUrl) -> tuple[int, str] | None:
    """Size in bytes and last-modification stamp of the file or object at ``path`` (None where there is
    none).  The stamp is the modification time in nanoseconds for a file, the store's own time (or
    ``""`` where it gives none) for an object."""
    loc = location(path)
    if isinstance(loc, Path):
        try:
            st = os.stat(loc)
        except FileNotFoundError:
            return None
        return st.st_size, str(st.st_mtime_ns)
    fs, inner = filesystem(loc)
    try:
        info = fs.info(inner)
    except FileNotFoundError:
        return None
    stamp = next((info[k] for k in ("mtime", "LastModified", "updated", "last_modified") if info.get(k)), "")
    return int(info.get("size") or 0), str(stamp)


def remove_tree(path: PathOrUrl, *, keep: tuple[str, ...] = ()) -> None:
    """Delete the folder (or prefix) ``path`` and everything below it, except the names in ``keep``
    directly inside it (an object store's run lock lives inside the output it guards)."""
    import shutil

    loc = location(path)
    if isinstance(loc, Path):
        if not keep:
            shutil.rmtree(loc, ignore_errors=True)
            return
        if loc.is_dir():
            for child in loc.iterdir():
                if child.name not in keep:
                    shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        return
    fs, inner = filesystem(loc)
    inner = inner.rstrip("/")
    kept = {f"{inner}/{k}" for k in keep}
    try:
        found = [p for p in fs.find(inner) if p not in kept]
    except FileNotFoundError:
        return
    if found:
        fs.rm(found)
    fs.invalidate_cache(inner)


def local_path(path: PathOrUrl, what: str) -> Path:
    """``path`` as a local :class:`~pathlib.Path`; a URL is refused (``what`` needs local files)."""
    loc = location(path)
    if not isinstance(loc, Path):
        raise StorageError(f"{loc}: {what} works on local files; copy the output from object storage first")
    return loc
