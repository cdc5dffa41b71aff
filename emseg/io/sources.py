"""Image sources that are not zarr: TIFF stacks (one file, or a folder of slices), PNG slices, HDF5.

A source reads z-slabs on demand so that import never holds the whole volume.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from emseg.errors import InvalidDataError, NotAVolumeError, UnsupportedDtypeError, VolumeNotFoundError, VolumeShapeError
from emseg.io.volume import SUPPORTED_DTYPES, open_volume

SLICE_SUFFIXES = (".tif", ".tiff", ".png")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")


class Source(Protocol):
    """A 3-D ``(z, y, x)`` image readable one slab of sections at a time."""

    path: Path
    shape: tuple[int, int, int]
    dtype: np.dtype[Any]
    voxel_size: tuple[float, float, float] | None

    def read(self, z0: int, z1: int) -> npt.NDArray[Any]:
        """Sections ``z0 <= z < z1`` as an array ``(z1 - z0, y, x)``."""
        ...


@dataclass
class TiffSource:
    """A multi-page TIFF (or a single 2-D/3-D page), read page by page."""

    path: Path
    shape: tuple[int, int, int]
    dtype: np.dtype[Any]
    voxel_size: tuple[float, float, float] | None

    @classmethod
    def open(cls, path: Path) -> TiffSource:
        import tifffile

        try:
            with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape = tuple(int(s) for s in series.shape)
                dtype = np.dtype(series.dtype)
                voxel_size = _tiff_voxel_size(tif)
                others = [(tuple(int(n) for n in s.shape), str(s.dtype)) for s in tif.series[1:]]
                end = max((int(o) + int(n) for page in tif.pages  # type: ignore[union-attr]
                           for o, n in zip(page.dataoffsets, page.databytecounts)), default=0)  # type: ignore[union-attr]
                if series.dataoffset is not None:  # contiguous data (tifffile's own stacks): one extent
                    end = max(end, int(series.dataoffset) + int(series.nbytes))
                size = tif.filehandle.size
        except (tifffile.TiffFileError, ValueError, IndexError, KeyError, struct.error, EOFError) as e:
            raise NotAVolumeError(f"{path}: not a readable TIFF ({e})") from e
        if end > size:
            raise NotAVolumeError(f"{path}: truncated TIFF (its pages need {end} bytes, the file has {size}); "
                                  "copy it again or re-export it")
        if others:  # pages of another shape or dtype start a new series: importing series 0 would drop them
            raise VolumeShapeError(
                f"{path}: holds {len(others) + 1} image series of different shapes or dtypes ({shape} {dtype}, then "
                f"{', '.join(f'{s} {d}' for s, d in others[:3])}); emseg imports one (z, y, x) stack of equal "
                "sections: split the file, or make every page the same shape")
        if len(shape) == 2:
            shape = (1, *shape)
        if len(shape) != 3:
            raise VolumeShapeError(f"{path}: expected a grayscale (z, y, x) stack, got TIFF series of shape {shape}")
        return cls(path, shape, dtype, voxel_size)  # type: ignore[arg-type]

    def read(self, z0: int, z1: int) -> npt.NDArray[Any]:
        import tifffile

        try:
            with _quiet_tifffile(), tifffile.TiffFile(self.path) as tif:
                series = tif.series[0]
                if len(series.pages) == self.shape[0]:
                    # every page exists: the series has exactly shape[0] of them
                    data = np.stack([series.pages[z].asarray() for z in range(z0, z1)])  # type: ignore[union-attr]
                else:  # one page holds the whole volume
                    data = series.asarray()
                    data = data.reshape(self.shape)[z0:z1]
        except (tifffile.TiffFileError, ValueError, IndexError, KeyError, struct.error, EOFError) as e:
            raise InvalidDataError(f"{self.path}: sections {z0}-{z1 - 1} cannot be read ({e}); the file is damaged or "
                                   "truncated") from e
        return data.reshape((z1 - z0, *self.shape[1:]))


@contextlib.contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """tifffile logs what it then raises: the error that follows says it once."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _tiff_voxel_size(tif: Any) -> tuple[float, float, float] | None:
    """Voxel size in nm: emseg's own (``emseg export``) or ImageJ metadata, if present."""
    for shaped in tif.shaped_metadata or ():
        size = shaped.get("voxel_size_nm")
        if size is not None and len(size) == 3:
            return (float(size[0]), float(size[1]), float(size[2]))
    meta = tif.imagej_metadata or {}
    page = tif.pages[0]
    try:
        xres = page.tags["XResolution"].value
        yres = page.tags["YResolution"].value
    except KeyError:
        return None
    unit = str(meta.get("unit", "")).lower()
    scale = {"nm": 1.0, "nanometer": 1.0, "micron": 1000.0, "um": 1000.0, "\\u00b5m": 1000.0, "µm": 1000.0}.get(unit)
    if scale is None or not xres[0] or not yres[0]:
        return None
    y = yres[1] / yres[0] * scale
    x = xres[1] / xres[0] * scale
    z = float(meta.get("spacing", 1.0)) * scale
    return (z, y, x)


@dataclass
class SliceFolderSource:
    """A folder of 2-D TIFF or PNG sections, ordered by the numbers in their names."""

    path: Path
    files: tuple[Path, ...]
    shape: tuple[int, int, int]
    dtype: np.dtype[Any]
    voxel_size: tuple[float, float, float] | None = None

    @classmethod
    def open(cls, path: Path) -> SliceFolderSource:
        files = sorted((f for f in path.iterdir() if f.suffix.lower() in SLICE_SUFFIXES), key=_natural_key)
        if not files:
            raise NotAVolumeError(f"{path}: a folder without .tif/.tiff/.png sections")
        first = _read_slice(files[0])
        if first.ndim != 2:
            raise VolumeShapeError(f"{files[0]}: expected a 2-D grayscale section, got shape {first.shape}")
        return cls(path, tuple(files), (len(files), *first.shape), first.dtype)  # type: ignore[arg-type]

    def read(self, z0: int, z1: int) -> npt.NDArray[Any]:
        out = np.empty((z1 - z0, *self.shape[1:]), dtype=self.dtype)
        for i, f in enumerate(self.files[z0:z1]):
            section = _read_slice(f)
            if section.shape != self.shape[1:] or section.dtype != self.dtype:
                raise VolumeShapeError(
                    f"{f}: section of shape {section.shape} {section.dtype} differs from the first "
                    f"({self.shape[1:]} {self.dtype})"
                )
            out[i] = section
        return out


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _read_slice(path: Path) -> npt.NDArray[Any]:
    if path.suffix.lower() == ".png":
        from PIL import Image

        with Image.open(path) as img:
            if img.mode not in ("L", "I;16", "I;16B", "I", "F"):
                raise VolumeShapeError(f"{path}: expected a grayscale PNG, got mode {img.mode}")
            return np.asarray(img)
    import tifffile

    return np.asarray(tifffile.imread(path))


@dataclass
class Hdf5Source:
    """One 3-D dataset of an HDF5 file (``file.h5/group/dataset`` or ``--dataset``)."""

    path: Path
    dataset: str
    shape: tuple[int, int, int]
    dtype: np.dtype[Any]
    voxel_size: tuple[float, float, float] | None = None

    @classmethod
    def open(cls, path: Path, dataset: str | None) -> Hdf5Source:
        import h5py

        try:
            with h5py.File(path, "r") as f:
                if dataset is None:
                    names: list[str] = []
                    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
                    if len(names) != 1:
                        raise NotAVolumeError(
                            f"{path}: holds {len(names)} datasets {names[:10]}; name one as {path}/<dataset>"
                        )
                    dataset = names[0]
                if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
                    raise NotAVolumeError(f"{path}: no dataset {dataset!r}")
                ds = f[dataset]
                shape = tuple(int(s) for s in ds.shape)
                dtype = np.dtype(ds.dtype)
                res = ds.attrs.get("resolution")
        except OSError as e:
            raise NotAVolumeError(f"{path}: not a readable HDF5 file ({e})") from e
        if len(shape) != 3:
            raise VolumeShapeError(f"{path}/{dataset}: expected 3 axes (z, y, x), got shape {shape}")
        voxel_size = tuple(float(v) for v in res) if res is not None and len(res) == 3 else None
        return cls(path, dataset, shape, dtype, voxel_size)  # type: ignore[arg-type]

    def read(self, z0: int, z1: int) -> npt.NDArray[Any]:
        import h5py

        with h5py.File(self.path, "r") as f:
            return np.asarray(f[self.dataset][z0:z1])


@dataclass
class VolumeSource:
    """A volume :func:`emseg.io.open_volume` reads (zarr, precomputed, N5, local or at a URL), by slabs."""

    path: Any
    volume: Any
    shape: tuple[int, int, int]
    dtype: np.dtype[Any]
    voxel_size: tuple[float, float, float] | None

    def read(self, z0: int, z1: int) -> npt.NDArray[Any]:
        from emseg.geometry import Roi

        return np.asarray(self.volume.read(Roi((z0, 0, 0), (z1 - z0, *self.shape[1:]))))


def _volume_source(path: Any) -> VolumeSource:
    volume = open_volume(path)
    if volume.has_channels:
        raise VolumeShapeError(f"{path}: import takes a grayscale (z, y, x) volume; this one has channels {volume.axes}")
    return VolumeSource(volume.path, volume, volume.shape, volume.dtype, volume.voxel_size)  # type: ignore[arg-type]


def _is_volume_store(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("zarr.json", ".zarray", ".zgroup", "info",
                                                                 "attributes.json"))


def open_source(path: str | os.PathLike[str], dataset: str | None = None) -> Source:
    """Open a TIFF file, a folder of TIFF/PNG sections, an HDF5 dataset, or any volume
    :func:`emseg.io.open_volume` reads (zarr, precomputed, N5, also at a URL) for slab reading.

    ``path`` may name the dataset inside an HDF5 file: ``stack.h5/volumes/raw``.
    """
    from emseg.io.location import is_url

    if is_url(path) or str(path).startswith("file://"):
        return _volume_source(path)
    path = Path(path)
    if _is_volume_store(path):
        return _volume_source(path)
    h5_file, inner = _split_hdf5(path)
    if h5_file is not None:
        source: Source = Hdf5Source.open(h5_file, dataset or inner)
    elif not path.exists():
        raise VolumeNotFoundError(f"{path}: no such file or directory")
    elif path.is_dir():
        source = SliceFolderSource.open(path)
    elif path.suffix.lower() in (".tif", ".tiff"):
        source = TiffSource.open(path)
    elif path.suffix.lower() == ".png":
        source = SliceFolderSource(path, (path,), (1, *_read_slice(path).shape), _read_slice(path).dtype)  # type: ignore[arg-type]
    else:
        raise NotAVolumeError(f"{path}: unknown image format; expected .tif/.tiff, .png, .h5/.hdf5 or a folder of sections")
    if 0 in source.shape:
        raise VolumeShapeError(f"{path}: the image is empty (shape {source.shape}); expected at least one voxel per axis")
    if source.dtype not in SUPPORTED_DTYPES or source.dtype == np.bool_:
        raise UnsupportedDtypeError(f"{path}: dtype {source.dtype} is not supported; expected an integer or float grayscale image")
    return source


def _split_hdf5(path: Path) -> tuple[Path | None, str | None]:
    """``a.h5/b/c`` -> (``a.h5``, ``b/c``); (None, None) when no part of the path is an HDF5 file."""
    parts = path.parts
    for i in range(len(parts), 0, -1):
        candidate = Path(*parts[:i])
        if candidate.suffix.lower() in HDF5_SUFFIXES:
            if not candidate.exists():
                raise VolumeNotFoundError(f"{candidate}: no such file")
            inner = "/".join(parts[i:]) or None
            return candidate, inner
    return None, None


def load_array(path: str | os.PathLike[str], *, dataset: str | None = None) -> npt.NDArray[Any]:
    """Read a whole (small) ``(z, y, x)`` volume into memory: zarr / OME-Zarr, TIFF, PNG, HDF5.

    For training data and tests; large volumes are processed blockwise instead.
    """
    path = Path(path)
    if _is_zarr(path):
        volume = open_volume(path)
        return volume.read(volume.roi)
    source = open_source(path, dataset)
    return source.read(0, source.shape[0])


def _is_zarr(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("zarr.json", ".zarray", ".zgroup"))


