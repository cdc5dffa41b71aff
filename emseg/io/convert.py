"""Import TIFF / PNG / HDF5 into OME-Zarr slab by slab, export OME-Zarr to TIFF, describe volumes."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from emseg.engine.lock import locked
from emseg.errors import VolumeShapeError
from emseg.geometry import Roi
from emseg.io.location import Location, PathOrUrl, absolute, filesystem, is_url, location, open_zarr_group
from emseg.io.sources import open_source
from emseg.io.volume import (
    check_distinct,
    create_volume,
    mark_complete,
    open_volume,
    prepare_output,
    read_status,
)

DEFAULT_CHUNKS = (32, 256, 256)


def default_chunks(shape: Sequence[int], chunks: Sequence[int] | None = None) -> tuple[int, ...]:
    """``chunks`` (default 32×256×256) clipped to the volume's shape."""
    return tuple(min(int(c), int(s)) for c, s in zip(chunks or DEFAULT_CHUNKS, shape, strict=True))


@dataclass(frozen=True)
class ImportReport:
    path: Location
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    voxel_size: tuple[float, ...]

    def summary(self) -> str:
        return (
            f"wrote {self.path}: shape {self.shape} {self.dtype}, chunks {self.chunks}, "
            f"voxel size {self.voxel_size} nm"
        )


@locked("output", "import")
def import_volume(
    source: str | os.PathLike[str],
    output: PathOrUrl,
    *,
    voxel_size: Sequence[float] | None = None,
    chunks: Sequence[int] | None = None,
    dataset: str | None = None,
    zarr_format: Literal[2, 3] = 3,
    overwrite: bool = False,
    progress: bool = True,
) -> ImportReport:
    """Convert a TIFF stack, folder of TIFF/PNG sections or HDF5 dataset into an OME-Zarr image.

    Reads and writes one slab of chunk-deep sections at a time, so memory stays at one slab.
    ``voxel_size`` (nm, z,y,x) defaults to the source's own metadata, else 1 nm.
    """
    from tqdm import tqdm

    check_distinct(source, output)
    src = open_source(source, dataset)
    size = tuple(float(v) for v in (voxel_size or src.voxel_size or (1.0, 1.0, 1.0)))
    if len(size) != 3:
        raise VolumeShapeError(f"--voxel-size needs 3 values (z, y, x), got {size}")
    if chunks is not None and len(chunks) != 3:
        if len(chunks) != 1:
            raise VolumeShapeError(f"--chunks needs 1 or 3 values (z, y, x), got {tuple(chunks)}")
        chunks = tuple(chunks) * 3
    chunk_shape = default_chunks(src.shape, chunks)
    volume = create_volume(output, shape=src.shape, dtype=src.dtype, chunks=chunk_shape, voxel_size=size,
                           zarr_format=zarr_format, name=location(source).stem, overwrite=overwrite)
    depth = chunk_shape[0]
    with tqdm(total=src.shape[0], desc="import", unit="section", file=sys.stderr, disable=not progress) as bar:
        for z0 in range(0, src.shape[0], depth):
            z1 = min(z0 + depth, src.shape[0])
            volume.write(Roi((z0, 0, 0), (z1 - z0, *src.shape[1:])), src.read(z0, z1))
            bar.update(z1 - z0)
    from emseg.engine.ledger import census_of

    # the chunk census lets every reader notice a chunk deleted or truncated later (check_census)
    mark_complete(output, source=str(absolute(source)), command="import",
                  census={volume.path.name: census_of(volume.path)})
    return ImportReport(location(output), src.shape, str(src.dtype), chunk_shape, size)


@locked("output", "export")
def export_tiff(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    level: int | str = 0,
    overwrite: bool = False,
    compression: str | None = "zlib",
    progress: bool = True,
) -> Path:
    """Write a volume to one multi-page TIFF, one section at a time (for volumes that fit a TIFF).

    The voxel size (nm) goes into the TIFF's JSON description and is read back by ``import``.
    """
    import tifffile
    from tqdm import tqdm

    check_distinct(source, output)
    volume = open_volume(source, level=level)
    prepare_output(output, overwrite=overwrite)
    shape = (volume.channels,) + volume.shape if volume.has_channels else volume.shape
    nbytes = int(np.prod(shape)) * volume.dtype.itemsize
    bar = tqdm(total=volume.shape[0], desc="export", unit="section", file=sys.stderr, disable=not progress)

    def sections() -> Iterator[npt.NDArray[Any]]:
        channels = range(volume.channels) if volume.has_channels else [None]
        for c in channels:
            for z in range(volume.shape[0]):
                section = volume.read(Roi((z, 0, 0), (1, *volume.shape[1:])))
                yield section[c, 0] if c is not None else section[0]
                bar.update(1 if c in (None, 0) else 0)

    from emseg.errors import storage_errors
    from emseg.io.safety import SOFTWARE

    partial = Path(output).with_name(f".{Path(output).name}.partial")
    try:
        with storage_errors(output, "write the TIFF"), tifffile.TiffWriter(partial, bigtiff=nbytes > 2**31 - 2**25) as tw:
            tw.write(sections(), shape=shape, dtype=volume.dtype, compression=compression, software=SOFTWARE,
                     metadata={"axes": "".join(volume.axes).upper(), "voxel_size_nm": list(volume.voxel_size)})
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)  # never leave a truncated TIFF behind
        bar.close()
    return Path(output)


@dataclass(frozen=True)
class LevelInfo:
    path: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    voxel_size: tuple[float, ...]


@dataclass(frozen=True)
class VolumeInfo:
    """What ``emseg info`` reports."""

    path: str
    kind: str
    zarr_format: int
    shape: tuple[int, ...]
    dtype: str
    axes: tuple[str, ...]
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    voxel_size: tuple[float, ...]
    offset_nm: tuple[float, ...]
    compressor: str
    size_on_disk: int
    levels: tuple[LevelInfo, ...]
    labels: tuple[str, ...]
    status: str | None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def summary(self) -> str:
        lines = [
            f"path:         {self.path}",
            f"kind:         {self.kind}" + (f" (zarr v{self.zarr_format})" if self.zarr_format else ""),
            f"shape:        {self.shape}  axes {''.join(self.axes)}",
            f"dtype:        {self.dtype}",
            f"chunks:       {self.chunks}" + (f"  shards {self.shards}" if self.shards else ""),
            f"voxel size:   {self.voxel_size} nm (z, y, x)",
            f"offset:       {self.offset_nm} nm",
            f"compressor:   {self.compressor}",
            f"size on disk: {_human(self.size_on_disk)}",
        ]
        if self.levels:
            lines.append(f"levels:       {len(self.levels)}")
            lines += [f"  {lv.path}: {lv.shape} chunks {lv.chunks} voxel {lv.voxel_size} nm" for lv in self.levels]
        if self.labels:
            lines.append(f"labels:       {', '.join(self.labels)}")
        if self.status:
            lines.append(f"emseg status: {self.status}")
        return "\n".join(lines)


def describe(path: PathOrUrl) -> VolumeInfo:
    """Shape, dtype, chunks, axes, voxel size, compressor, size on disk and levels of a volume."""
    volume = open_volume(path, allow_incomplete=True)
    array = volume.array
    compressors = getattr(array, "compressors", ()) or ()
    compressor = ", ".join(_codec_name(c) for c in compressors) or "none"
    levels: list[LevelInfo] = []
    labels: tuple[str, ...] = ()
    status = None
    if volume.image_path is not None:
        group = open_zarr_group(volume.image_path, mode="r")
        for i, level_path in enumerate(volume.levels):
            lv = open_volume(volume.image_path, level=i, allow_incomplete=True)
            levels.append(LevelInfo(level_path, tuple(lv.array.shape), tuple(lv.array.chunks),
                                    None if lv.array.shards is None else tuple(lv.array.shards), lv.voxel_size))
        if "labels" in group:
            ome = group["labels"].attrs.get("ome", group["labels"].attrs)
            labels = tuple(ome.get("labels", ()))
        status = read_status(volume.image_path).get("status")
    return VolumeInfo(
        path=str(path),
        kind=(f"{volume.format} volume (read with tensorstore)" if volume.format != "zarr"
              else "OME-Zarr image" if volume.image_path is not None else "zarr array"),
        zarr_format=int(array.metadata.zarr_format) if volume.format == "zarr" else 0,
        shape=tuple(int(s) for s in array.shape),
        dtype=str(volume.dtype),
        axes=volume.axes,
        chunks=tuple(int(c) for c in array.chunks),
        shards=None if getattr(array, "shards", None) is None else tuple(int(s) for s in array.shards),
        voxel_size=volume.voxel_size,
        offset_nm=volume.offset_nm,
        compressor=compressor,
        size_on_disk=_du(location(path)),
        levels=tuple(levels),
        labels=labels,
        status=status,
    )


def _codec_name(codec: Any) -> str:
    cfg = codec.to_dict() if hasattr(codec, "to_dict") else {}
    name = cfg.get("name") or cfg.get("id") or type(codec).__name__
    conf = cfg.get("configuration", cfg)
    detail = conf.get("cname") or conf.get("level") or conf.get("clevel")
    return f"{name}({detail})" if detail is not None else str(name)


def _du(path: Location) -> int:
    if is_url(path):
        fs, inner = filesystem(path)
        return int(fs.du(inner))
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"
