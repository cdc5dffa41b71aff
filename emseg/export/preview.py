"""Looking at outputs: a PNG montage of a few slices (neuroglancer lives in :mod:`emseg.export.view`).

``render_preview`` reads only the slices it shows (from a pyramid level near the display size when
the output has one).  ``find_sources`` finds the raw, prediction and label images of an output.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from emseg.engine.lock import locked
from emseg.errors import ConfigError, NotAVolumeError, VolumeNotFoundError, VolumeShapeError
from emseg.geometry import Roi
from emseg.io.location import local_path
from emseg.io.volume import Volume, label_image_paths, open_volume, read_status

log = logging.getLogger(__name__)

__all__ = ["PreviewSources", "find_sources", "label_colors", "recorded_source", "render_preview"]

MAX_PANEL = 512  # pixels: longest side of one montage panel


class PreviewSources(NamedTuple):
    """The OME-Zarr images behind an output: any of them may be missing (None)."""

    raw: Path | None
    prediction: Path | None
    labels: Path | None


# ---------------------------------------------------------------------------------------------
# finding raw / prediction / labels


def _reference(sources: PreviewSources) -> Volume:
    """The volume whose grid the views follow: the output (prediction, labels), else the raw."""
    path = sources.prediction or sources.labels or sources.raw
    assert path is not None  # find_sources always returns at least the image it opened
    return open_volume(path)


def _is_prediction(volume: Volume) -> bool:
    return volume.has_channels or np.issubdtype(volume.dtype, np.floating)


def _check_same_grid(raw_path: Path, out: Any) -> None:
    """Refuse a ``--raw`` whose voxels are not those of the output (it would be shown misaligned)."""
    raw = open_volume(raw_path)
    if tuple(raw.shape[-3:]) != tuple(out.shape[-3:]):
        raise VolumeShapeError(f"--raw {raw_path}: shape {tuple(raw.shape[-3:])} (z, y, x) differs from the output's "
                               f"{tuple(out.shape[-3:])}; pass the raw EM the output was made from")


def find_sources(out_path: str | os.PathLike[str], raw_path: str | os.PathLike[str] | None = None) -> PreviewSources:
    """Raw, prediction and label images of an emseg output (or of a synthetic / raw volume).

    * ``out.zarr`` from ``emseg segment``: prediction at level 0 (axes ``c, z, y, x``), labels at
      ``labels/segments``, raw at ``attrs["emseg"]["source"]`` unless ``raw_path`` is given.
    * an image without a channel axis (``emseg synth``, raw EM): it is the raw, its first label
      image (``labels/ground_truth``) the labels.

    Raises
    ------
    VolumeNotFoundError, NotAVolumeError
        ``out_path`` (or ``raw_path``) is not an OME-Zarr image.
    """
    out = open_volume(out_path)
    if out.image_path is None:
        raise NotAVolumeError(f"{out_path}: expected an OME-Zarr image (e.g. out.zarr), got a bare zarr array")
    image = local_path(out.image_path, "a preview")
    labels = label_image_paths(image)
    preferred = [p for p in labels if p.name == "segments"] or labels
    label = preferred[0] if preferred else None
    raw: Path | None
    if not _is_prediction(out):
        raw = Path(raw_path) if raw_path is not None else image
        if raw_path is not None:
            _check_same_grid(raw, out)  # fail early on a bad --raw
        return PreviewSources(raw, None, label)
    if raw_path is not None:
        raw = Path(raw_path)
        _check_same_grid(raw, out)
    else:
        raw = recorded_source(image)
    return PreviewSources(raw, image, label)


def recorded_source(image: str | os.PathLike[str]) -> Path | None:
    """The raw source an emseg output records (``attrs["emseg"]["source"]``), as an existing path.

    emseg records it as an absolute path.  Outputs written before that may hold a path relative
    to the folder the command ran in: it is looked up relative to the output's folder and each of
    that folder's parents (``demo/isbi.zarr`` recorded for ``demo/isbi_seg.zarr`` is found from any
    working directory), then relative to the working directory.  None when nothing is recorded.

    Raises
    ------
    VolumeNotFoundError
        A source is recorded but no candidate exists.
    """
    image = Path(image)
    source = read_status(image).get("source")
    if not source:
        log.warning("%s records no raw source; pass --raw PATH to show the raw EM", image)
        return None
    recorded = Path(str(source))
    if recorded.is_absolute():
        candidates = [recorded]
    else:
        here = image.resolve().parent
        candidates = [folder / recorded for folder in (here, *here.parents)] + [recorded.resolve()]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise VolumeNotFoundError(
        f"{image}: the raw source recorded in its attributes, {source}, does not exist; pass --raw PATH"
    )


# ---------------------------------------------------------------------------------------------
# PNG montage


def label_colors(labels: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.uint8]:
    """A random-looking but fixed RGB colour per label ID (a hash of the ID); 0 is black.

    Returns an array of shape ``labels.shape + (3,)``, uint8.
    """
    x = labels.astype(np.uint64, copy=True)
    # splitmix64 finaliser, wrapping uint64 arithmetic
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    channels = np.stack([(x >> np.uint64(s)) & np.uint64(0xFF) for s in (0, 8, 16)], axis=-1).astype(np.uint16)
    rgb: npt.NDArray[np.uint8] = (55 + channels * 200 // 255).astype(np.uint8)  # never too dark to tell from 0
    rgb[labels == 0] = 0
    return rgb


def _pick_level(path: Path, max_px: int) -> Volume:
    """The finest level whose y, x extent fits in ``max_px`` (the coarsest one if none does)."""
    base = open_volume(path)
    chosen = base
    for name in base.levels[1:]:
        if max(chosen.shape[1:]) <= max_px:
            break
        chosen = open_volume(path, level=name)
    return chosen


def _read_slice(volume: Volume, z_nm: float, extent: tuple[tuple[float, float], ...]) -> npt.NDArray[Any]:
    """The z section nearest ``z_nm`` over the physical ``(y, x)`` extent ``[(begin, end)]``, in nm."""
    vs, off = volume.voxel_size, volume.offset_nm
    z = int(np.clip(round((z_nm - off[0]) / vs[0]), 0, volume.shape[0] - 1))
    begin = [z]
    end = [z + 1]
    for axis, (lo, hi) in zip((1, 2), extent):
        # voxel i covers [off + (i - 1/2) vs, off + (i + 1/2) vs)
        b = int(np.clip(np.floor((lo - off[axis]) / vs[axis] + 0.5), 0, volume.shape[axis] - 1))
        e = int(np.clip(np.floor((hi - off[axis]) / vs[axis] + 0.5), b + 1, volume.shape[axis]))
        begin.append(b)
        end.append(e)
    data = volume.read(Roi.from_bounds(begin, end))
    return np.asarray(data[0, 0] if volume.has_channels else data[0])  # channel 0


def _to_gray(data: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    if data.dtype == np.uint8:
        return data
    values = data.astype(np.float32)
    if np.issubdtype(data.dtype, np.floating) and np.nanmin(values, initial=0) >= 0 and np.nanmax(values, initial=0) <= 1:
        lo, hi = 0.0, 1.0  # probabilities
    else:
        lo, hi = float(np.nanmin(values, initial=0)), float(np.nanmax(values, initial=1))
    scaled = (np.nan_to_num(values, nan=lo) - lo) / max(hi - lo, 1e-12)
    return np.asarray(np.clip(scaled * 255 + 0.5, 0, 255).astype(np.uint8))


@locked("png_path", "preview")
def render_preview(
    out_path: str | os.PathLike[str],
    *,
    raw_path: str | os.PathLike[str] | None = None,
    slices: int = 3,
    png_path: str | os.PathLike[str],
    max_panel: int = MAX_PANEL,
    overwrite: bool = False,
) -> Path:
    """Write a PNG montage: one row per z slice, columns raw | prediction | labels.

    Slices are evenly spaced through the output's z range.  The prediction shows channel 0 (the
    membrane probability) in grey; labels get a fixed random colour per ID with background 0 black.
    Only the shown slices are read, from the pyramid level nearest ``max_panel`` pixels.

    Parameters
    ----------
    out_path : path
        An emseg output (``out.zarr``), a synthetic volume, or any OME-Zarr image.
    raw_path : path, optional
        The raw EM (OME-Zarr image); default: the source recorded in ``out_path``'s attributes.
    slices : int
        Number of rows (z sections), at least 1.
    png_path : path
        The PNG to write (parent directories are created).
    max_panel : int
        Longest side of one panel, pixels.

    Returns
    -------
    Path
        ``png_path``.

    Raises
    ------
    VolumeNotFoundError, NotAVolumeError
        A missing or unreadable input.
    ConfigError
        ``slices`` < 1.
    """
    from PIL import Image, ImageDraw

    if slices < 1:
        raise ConfigError(f"slices must be at least 1, got {slices}")
    sources = find_sources(out_path, raw_path)
    png = _check_png_output(png_path, [Path(out_path), *(p for p in sources if p is not None)], overwrite)
    reference = _reference(sources)
    columns = [(name, p) for name, p in zip(("raw", "prediction", "labels"), sources) if p is not None]
    volumes = {name: _pick_level(p, max_panel) for name, p in columns}

    vs, off, shape = reference.voxel_size, reference.offset_nm, reference.shape
    extent = tuple((off[a] - vs[a] / 2, off[a] + (shape[a] - 0.5) * vs[a]) for a in (1, 2))
    n = min(slices, shape[0])
    z_indices = [int(round(z)) for z in np.linspace(0, shape[0] - 1, n + 2)[1:-1]] if n < shape[0] else list(range(n))
    scale = max_panel / max(shape[1], shape[2])  # small volumes are enlarged too
    panel = (max(1, round(shape[2] * scale)), max(1, round(shape[1] * scale)))
    header, gap = 18, 4
    width = len(columns) * panel[0] + (len(columns) + 1) * gap
    height = header + n * (panel[1] + gap) + gap
    canvas = Image.new("RGB", (width, height), (32, 32, 32))
    draw = ImageDraw.Draw(canvas)
    for col, (name, _) in enumerate(columns):
        draw.text((gap + col * (panel[0] + gap) + 2, 3), name, fill=(230, 230, 230))
    for row, z in enumerate(z_indices):
        z_nm = off[0] + z * vs[0]
        top = header + row * (panel[1] + gap)
        for col, (name, _) in enumerate(columns):
            data = _read_slice(volumes[name], z_nm, extent)
            if name == "labels":
                img = Image.fromarray(label_colors(data)).resize(panel, Image.Resampling.NEAREST)
            else:
                img = Image.fromarray(_to_gray(data)).convert("RGB").resize(panel, Image.Resampling.BILINEAR)
            left = gap + col * (panel[0] + gap)
            canvas.paste(img, (left, top))
        draw.text((gap + 3, top + 2), f"z={z}", fill=(255, 255, 0))
    from PIL.PngImagePlugin import PngInfo

    from emseg.io.safety import SOFTWARE

    info = PngInfo()
    info.add_text("Software", SOFTWARE)
    png.parent.mkdir(parents=True, exist_ok=True)
    partial = png.with_name(f".{png.name}.partial")
    try:
        canvas.save(partial, format="PNG", pnginfo=info)
        os.replace(partial, png)  # never a truncated PNG in place of a good one
    finally:
        partial.unlink(missing_ok=True)
    return png


def _check_png_output(png_path: str | os.PathLike[str], inputs: list[Path], overwrite: bool) -> Path:
    """Refuse a PNG path inside an input, or an existing file without ``overwrite`` (or not emseg's)."""
    from emseg.io.safety import check_file_output

    return check_file_output(png_path, inputs, overwrite)
