"""Volumes in the field's other formats, read through tensorstore: neuroglancer precomputed and N5.

zarr-python reads neither, so these are opened with tensorstore (the reader Google's and Janelia's
tools use), which reads precomputed layers unsharded and sharded (``sharding`` in the ``info``),
N5 datasets with any of their codecs, and both from local folders, ``gs://``, ``s3://`` and
``http(s)://``.  The store is presented like a read-only zarr array in emseg's axis order
``([c,] z, y, x)``: :class:`TensorStoreArray` has the ``shape``, ``dtype``, ``chunks`` and
``__getitem__`` that :class:`emseg.io.volume.Volume` uses.

- **precomputed**: axes ``x, y, z, channel`` in the store, voxel size from ``scales[level].resolution``
  and offset ``voxel_offset * resolution`` (nm); ``level`` picks the scale (index or its ``key``).
- **N5**: ``dimensions`` are listed fastest first (``x, y, z``) as the N5 format and its Java tools
  write them (an ``axes`` attribute, if present, names them); voxel size from ``resolution`` or
  ``pixelResolution.dimensions`` (``x, y, z``), offset from ``offset`` (nm, ``x, y, z``; funlib's
  convention).  A group with ``s0, s1, ...`` datasets (n5-viewer multiscale) opens at ``s<level>``.

For ``s3://`` tensorstore does not read ``AWS_ENDPOINT_URL`` itself; it is passed on as the kvstore's
``endpoint`` so that one setting serves zarr (botocore) and tensorstore alike.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from emseg.errors import NotAVolumeError, StorageError, VolumeShapeError
from emseg.io.location import Location, describe, is_url, location

Format = Literal["precomputed", "n5"]


@dataclass
class TensorStoreArray:
    """A read-only tensorstore view with the array interface :class:`~emseg.io.volume.Volume` uses."""

    store: Any
    chunks: tuple[int, ...]
    format: Format
    attrs: dict[str, Any] = field(default_factory=dict)
    shards: None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.store.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(self.store.dtype.numpy_dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key: Any) -> npt.NDArray[Any]:
        return np.asarray(self.store[key].read().result())

    def __setitem__(self, key: Any, value: Any) -> None:
        raise StorageError(f"a {self.format} volume is read-only in emseg; write the output as OME-Zarr")


@dataclass(frozen=True)
class Opened:
    """What :func:`open_tensorstore` found: the array in ``([c,] z, y, x)`` order and its geometry (nm)."""

    array: TensorStoreArray
    axes: tuple[str, ...]
    voxel_size: tuple[float, float, float]
    offset_nm: tuple[float, float, float]
    levels: tuple[str, ...]
    level_path: str


def _read_json(loc: Location, name: str) -> Any:
    """``loc/name`` parsed as JSON, or None where there is no such file (local or remote)."""
    target = loc / name
    try:
        if isinstance(target, os.PathLike) and not is_url(target):
            if not os.path.isfile(target):
                return None
        text = target.read_text()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        return None
    except OSError as e:
        raise StorageError(f"{target}: cannot read it: {describe(e)}") from e
    try:
        return json.loads(text)
    except ValueError:
        return None


def detect(loc: Location) -> tuple[Format, Any] | None:
    """``("precomputed", info)`` or ``("n5", attributes)`` when ``loc`` is such a volume, else None."""
    info = _read_json(loc, "info")
    if isinstance(info, dict) and "scales" in info and "data_type" in info:
        return "precomputed", info
    attrs = _read_json(loc, "attributes.json")
    if isinstance(attrs, dict) and ("dimensions" in attrs or "n5" in attrs or _n5_scales(loc, attrs)):
        return "n5", attrs
    return None


def _n5_scales(loc: Location, attrs: dict[str, Any]) -> list[str]:
    scales = attrs.get("scales")
    if isinstance(scales, list) and scales:
        return [f"s{i}" for i in range(len(scales))]
    found = []
    for i in range(32):
        sub = _read_json(loc / f"s{i}", "attributes.json")
        if not isinstance(sub, dict) or "dimensions" not in sub:
            break
        found.append(f"s{i}")
    return found


def kvstore_spec(loc: Location) -> dict[str, Any] | str:
    """The tensorstore kvstore of a folder or URL (with ``AWS_ENDPOINT_URL`` for ``s3://``)."""
    if not is_url(loc):
        return {"driver": "file", "path": str(loc) + "/"}
    url = str(loc).rstrip("/") + "/"
    scheme = url.split("://", 1)[0].lower()
    if scheme == "gcs":
        url = "gs://" + url.split("://", 1)[1]
    if scheme == "s3":
        bucket, _, path = url[len("s3://"):].partition("/")
        spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": path}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            spec["endpoint"] = endpoint
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            spec["aws_region"] = region
        return spec
    return url


def _open(spec: dict[str, Any], where: Location) -> Any:
    import tensorstore as ts

    try:
        return ts.open(spec, read=True).result()
    except ValueError as e:  # tensorstore reports missing/malformed data and unreachable stores as ValueError
        raise NotAVolumeError(f"{where}: tensorstore cannot open it as {spec['driver']}: {describe(e)}") from e


def open_tensorstore(path: str | os.PathLike[str] | Location, kind: Format, meta: Any, level: int | str = 0) -> Opened:
    """Open a precomputed layer or an N5 dataset found by :func:`detect` (``meta``: its info/attributes)."""
    loc = location(path)
    if kind == "precomputed":
        return _open_precomputed(loc, meta, level)
    return _open_n5(loc, meta, level)


def _pick(levels: list[str], level: int | str, where: Location) -> int:
    if isinstance(level, int) and 0 <= level < len(levels):
        return level
    if str(level) in levels:
        return levels.index(str(level))
    raise NotAVolumeError(f"{where}: no scale level {level!r}; levels are {levels}")


def _open_precomputed(loc: Location, info: dict[str, Any], level: int | str) -> Opened:
    import tensorstore as ts

    scales = info.get("scales") or []
    keys = [str(s.get("key", i)) for i, s in enumerate(scales)]
    index = _pick(keys, level, loc)
    scale = scales[index]
    store = _open({"driver": "neuroglancer_precomputed", "kvstore": kvstore_spec(loc), "scale_index": index}, loc)
    store = store[ts.d[:].translate_to[0]]
    channels = int(info.get("num_channels", 1))
    if channels == 1:
        store = store[..., 0]
    store = store.T  # (x, y, z[, c]) -> ([c,] z, y, x)
    chunk_xyz = (scale.get("chunk_sizes") or [[64, 64, 64]])[0]
    chunks = ((channels,) if channels > 1 else ()) + tuple(int(c) for c in reversed(chunk_xyz))
    resolution = [float(v) for v in scale["resolution"]]
    offset_vox = [float(v) for v in scale.get("voxel_offset", (0, 0, 0))]
    voxel_size = (resolution[2], resolution[1], resolution[0])
    offset = (offset_vox[2] * resolution[2], offset_vox[1] * resolution[1], offset_vox[0] * resolution[0])
    axes = (("c",) if channels > 1 else ()) + ("z", "y", "x")
    array = TensorStoreArray(store, chunks, "precomputed", {"type": info.get("type")})
    return Opened(array, axes, voxel_size, offset, tuple(keys), keys[index])


def _xyz(values: Any) -> tuple[float, float, float] | None:
    if isinstance(values, list) and len(values) == 3 and all(isinstance(v, (int, float)) for v in values):
        return (float(values[2]), float(values[1]), float(values[0]))
    return None


def _open_n5(loc: Location, attrs: dict[str, Any], level: int | str) -> Opened:
    levels: tuple[str, ...] = ()
    level_path = ""
    group_attrs: dict[str, Any] = {}
    if "dimensions" not in attrs:  # a multiscale group: s0, s1, ...
        found = _n5_scales(loc, attrs)
        if not found:
            raise NotAVolumeError(f"{loc}: an N5 group without datasets s0, s1, ...; pass {loc}/<dataset>")
        index = _pick(found, level if not isinstance(level, str) or not level.isdigit() else int(level), loc)
        group_attrs, levels, level_path = attrs, tuple(found), found[index]
        loc = loc / found[index]
        attrs = _read_json(loc, "attributes.json") or {}
    store = _open({"driver": "n5", "kvstore": kvstore_spec(loc)}, loc)
    names = attrs.get("axes")
    ndim = store.rank
    if isinstance(names, list) and len(names) == ndim and all(isinstance(n, str) for n in names):
        lowered = [n.lower() for n in names]
    else:
        lowered = ["x", "y", "z", "c"][:ndim] if ndim <= 4 else []
    wanted = [a for a in ("c", "z", "y", "x") if a in lowered]
    if ndim not in (3, 4) or sorted(wanted) != sorted(lowered):
        raise VolumeShapeError(f"{loc}: an N5 dataset of {ndim} dimensions {names or ''}; emseg reads x, y, z "
                               "(and an optional channel dimension)")
    store = store.transpose([lowered.index(a) for a in wanted])
    block = [int(b) for b in attrs.get("blockSize", store.chunk_layout.read_chunk.shape)]
    chunks = tuple(block[lowered.index(a)] for a in wanted)
    res = _xyz(attrs.get("resolution")) or _xyz((attrs.get("pixelResolution") or {}).get("dimensions")) \
        or _xyz(group_attrs.get("resolution")) or (1.0, 1.0, 1.0)
    offset = _xyz(attrs.get("offset")) or (0.0, 0.0, 0.0)
    if levels and isinstance(attrs.get("downsamplingFactors"), list):
        factors = _xyz(attrs["downsamplingFactors"])
        if factors and not _xyz(attrs.get("resolution")):
            res = (res[0] * factors[0], res[1] * factors[1], res[2] * factors[2])
    axes = tuple(wanted)
    array = TensorStoreArray(store, chunks, "n5", {})
    return Opened(array, axes, res, offset, levels, level_path)
