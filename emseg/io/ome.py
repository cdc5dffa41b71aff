"""OME-NGFF metadata: build and parse ``multiscales`` / ``image-label`` for NGFF 0.4 and 0.5.

NGFF 0.4 lives in zarr v2 groups with the keys at the top of ``.zattrs``; NGFF 0.5 lives in zarr v3
groups under ``attributes["ome"]``.  This module only turns dicts into dicts; it opens no store.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from emseg.errors import NotAVolumeError

SPACE_UNIT = "nanometer"


@dataclass(frozen=True)
class Multiscale:
    """The parts of an NGFF ``multiscales[0]`` entry emseg uses.

    ``scales`` and ``translations`` hold one list per dataset, one value per axis (channel axes
    included, as in the metadata).
    """

    axes: tuple[str, ...]
    axis_types: tuple[str, ...]
    paths: tuple[str, ...]
    scales: tuple[tuple[float, ...], ...]
    translations: tuple[tuple[float, ...], ...]
    version: str


def ngff_version(zarr_format: int) -> str:
    return "0.5" if zarr_format == 3 else "0.4"


def multiscales_attrs(
    *,
    axes: Sequence[str],
    levels: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    zarr_format: int,
    name: str = "",
) -> dict[str, Any]:
    """Group attributes for an image with ``levels`` = [(path, scale, translation), ...].

    ``scale`` and ``translation`` are per axis in ``axes`` order (1.0 / 0.0 on a channel axis).
    """
    version = ngff_version(zarr_format)
    axes_meta = [
        {"name": a, "type": "channel"} if a == "c" else {"name": a, "type": "space", "unit": SPACE_UNIT} for a in axes
    ]
    datasets = [
        {
            "path": path,
            "coordinateTransformations": [
                {"type": "scale", "scale": [float(s) for s in scale]},
                {"type": "translation", "translation": [float(t) for t in translation]},
            ],
        }
        for path, scale, translation in levels
    ]
    multiscale: dict[str, Any] = {"name": name, "axes": axes_meta, "datasets": datasets}
    if version == "0.4":
        multiscale["version"] = version
        return {"multiscales": [multiscale]}
    return {"ome": {"version": version, "multiscales": [multiscale]}}


def labels_group_attrs(names: Sequence[str], zarr_format: int) -> dict[str, Any]:
    """Attributes of the ``labels`` group that lists the label images."""
    if zarr_format == 2:
        return {"labels": list(names)}
    return {"ome": {"version": "0.5", "labels": list(names)}}


def image_label_attrs(zarr_format: int) -> dict[str, Any]:
    """The ``image-label`` entry of a label image (merged into its multiscales attributes)."""
    entry = {"source": {"image": "../../"}}
    if zarr_format == 2:
        return {"image-label": {"version": "0.4", **entry}}
    return {"image-label": entry}


def ome_attrs(attrs: Mapping[str, Any]) -> Mapping[str, Any]:
    """The dict holding NGFF keys: ``attrs["ome"]`` (0.5) or ``attrs`` itself (0.4)."""
    ome = attrs.get("ome")
    return ome if isinstance(ome, Mapping) else attrs


def parse_multiscale(attrs: Mapping[str, Any], where: str) -> Multiscale | None:
    """Parse ``multiscales[0]`` from group attributes; None if the group has none."""
    ome = ome_attrs(attrs)
    entries = ome.get("multiscales")
    if not entries:
        return None
    try:
        ms = entries[0]
        version = str(ome.get("version", ms.get("version", "0.4")))
        raw_axes = ms.get("axes") or [{"name": n} for n in "zyx"]
        axes = tuple(a["name"] if isinstance(a, Mapping) else str(a) for a in raw_axes)
        types = tuple(
            (a.get("type") if isinstance(a, Mapping) else None) or ("channel" if n == "c" else "space")
            for a, n in zip(raw_axes, axes)
        )
        paths, scales, translations = [], [], []
        for ds in ms["datasets"]:
            paths.append(str(ds["path"]))
            scale = [1.0] * len(axes)
            translation = [0.0] * len(axes)
            for tr in ds.get("coordinateTransformations", []):
                if tr.get("type") == "scale" and "scale" in tr:
                    scale = [float(v) for v in tr["scale"]]
                elif tr.get("type") == "translation" and "translation" in tr:
                    translation = [float(v) for v in tr["translation"]]
            scales.append(tuple(scale))
            translations.append(tuple(translation))
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise NotAVolumeError(f"{where}: malformed OME-Zarr multiscales metadata ({e!r})") from e
    for path, level_scale in zip(paths, scales):
        if not all(math.isfinite(v) and v > 0 for v in level_scale):
            raise NotAVolumeError(f"{where}: the voxel size (OME-Zarr scale) {list(level_scale)} of level {path} is not "
                                  "positive and finite; fix the metadata, or re-import the data with --voxel-size")
    return Multiscale(axes, types, tuple(paths), tuple(scales), tuple(translations), version)
