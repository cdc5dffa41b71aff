"""Looking at outputs: a PNG montage of a few slices, and a neuroglancer link to the zarr stores.

``render_preview`` reads only the slices it shows (from a pyramid level near the display size when
the output has one).  ``neuroglancer_state`` describes raw, prediction and labels as neuroglancer
layers whose sources are URLs on a local static server; ``serve`` runs that server (CORS enabled,
bound to 127.0.0.1, serving only the stores being viewed).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import urllib.parse
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from emseg.io.lock import locked
from emseg.errors import ConfigError, NotAVolumeError, VolumeNotFoundError
from emseg.geometry import Roi
from emseg.io.pyramid import label_image_paths
from emseg.io.volume import Volume, open_volume, read_status

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_VIEWER",
    "PreviewSources",
    "ViewerState",
    "find_sources",
    "label_colors",
    "neuroglancer_state",
    "neuroglancer_url",
    "render_preview",
    "serve",
]

DEFAULT_VIEWER = "https://neuroglancer-demo.appspot.com"
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
    image = out.image_path
    labels = label_image_paths(image)
    preferred = [p for p in labels if p.name == "segments"] or labels
    label = preferred[0] if preferred else None
    raw: Path | None
    if not _is_prediction(out):
        raw = Path(raw_path) if raw_path is not None else image
        if raw_path is not None:
            open_volume(raw)  # fail early on a bad --raw
        return PreviewSources(raw, None, label)
    if raw_path is not None:
        raw = Path(raw_path)
        open_volume(raw)
    else:
        raw = _recorded_source(image)
    return PreviewSources(raw, image, label)


def _recorded_source(image: Path) -> Path | None:
    source = read_status(image).get("source")
    if not source:
        log.warning("%s records no raw source; pass --raw PATH to show the raw EM", image)
        return None
    for candidate in (Path(source), image.parent / source):
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
    from emseg.errors import OutputExistsError
    from emseg.io.safety import made_by_emseg, overwrite_hint
    from emseg.io.volume import check_distinct

    png = Path(png_path)
    for source in inputs:
        check_distinct(source, png)
    if png.exists() or png.is_symlink():
        if png.is_dir():
            raise OutputExistsError(f"{png} is a folder; give the path of a PNG file with -o")
        if not overwrite or not made_by_emseg(png):
            raise OutputExistsError(f"{png} already exists; {overwrite_hint(png)}")
    return png


# ---------------------------------------------------------------------------------------------
# neuroglancer


class ViewerState(NamedTuple):
    """A neuroglancer state and the local directories its URLs refer to (URL prefix -> directory)."""

    state: dict[str, Any]
    mounts: dict[str, Path]


def _zarr_scheme(image: Path) -> str:
    return "zarr3" if (image / "zarr.json").exists() else "zarr2"


def neuroglancer_state(
    out_path: str | os.PathLike[str],
    *,
    raw_path: str | os.PathLike[str] | None = None,
    base_url: str = "http://127.0.0.1:8000",
) -> ViewerState:
    """Neuroglancer layers for raw, prediction and labels, read from ``base_url``.

    Each store is mounted at ``base_url/<its directory name>/`` (made unique); :func:`serve`
    serves exactly these mounts.  Sources are ``zarr3://`` or ``zarr2://`` URLs of the OME-Zarr
    groups, so neuroglancer reads their multiscales (and every pyramid level).
    """
    sources = find_sources(out_path, raw_path)
    mounts: dict[str, Path] = {}
    roots: dict[Path, str] = {}

    def url_of(image: Path) -> str:
        # Mount the top OME-Zarr group (labels live inside it) once, under a unique name.
        top = image
        while top.parent.name == "labels":
            top = top.parent.parent
        top = top.resolve()
        if top not in roots:
            name = top.name
            i = 1
            while name in mounts:
                i += 1
                name = f"{top.name}-{i}"
            mounts[name] = top
            roots[top] = name
        rel = image.resolve().relative_to(top).as_posix()
        path = "/".join(p for p in (roots[top], "" if rel == "." else rel) if p)
        return f"{_zarr_scheme(image)}://{base_url.rstrip('/')}/{urllib.parse.quote(path)}/"

    reference = _reference(sources)
    layers: list[dict[str, Any]] = []
    if sources.raw is not None:
        layers.append({"type": "image", "name": "raw", "source": url_of(sources.raw)})
    if sources.prediction is not None:
        layers.append({
            "type": "image",
            "name": "prediction",
            "source": url_of(sources.prediction),
            "opacity": 0.5,
            "shader": "#uicontrol invlerp normalized\nvoid main() { emitRGB(vec3(normalized(), 0.0, normalized())); }",
            "visible": sources.raw is None,
        })
    if sources.labels is not None:
        layers.append({"type": "segmentation", "name": sources.labels.name, "source": url_of(sources.labels),
                       "selectedAlpha": 0.4})
    vs = reference.voxel_size
    state: dict[str, Any] = {
        "dimensions": {axis: [v * 1e-9, "m"] for axis, v in zip("zyx", vs)},
        "position": [o / v + s / 2 for o, v, s in zip(reference.offset_nm, vs, reference.shape)],
        "crossSectionScale": 1,
        "layers": layers,
        "selectedLayer": {"layer": layers[-1]["name"], "visible": True},
        "layout": "4panel",
    }
    return ViewerState(state, mounts)


def neuroglancer_url(state: dict[str, Any], viewer: str = DEFAULT_VIEWER) -> str:
    """A neuroglancer link carrying ``state`` in its fragment (``VIEWER/#!<json>``)."""
    text = json.dumps(state, separators=(",", ":"))
    return f"{viewer.rstrip('/')}/#!{urllib.parse.quote(text, safe='')}"


class _MountHandler(SimpleHTTPRequestHandler):
    """Static files from a few mounted directories, with CORS headers; no directory listings."""

    mounts: dict[str, Path] = {}

    def translate_path(self, path: str) -> str:
        parts = [p for p in urllib.parse.unquote(urllib.parse.urlsplit(path).path).split("/") if p]
        if not parts or parts[0] not in self.mounts or any(p in ("..", ".") for p in parts):
            return ""  # -> 404
        return str(self.mounts[parts[0]].joinpath(*parts[1:]))

    def list_directory(self, path: str | os.PathLike[str]) -> None:
        self.send_error(404, "No directory listings")
        return None

    def end_headers(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "*")
        super().end_headers()

    def do_OPTIONS(self) -> None:  # CORS preflight
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


def serve(mounts: dict[str, Path], *, port: int = 8000, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Start (in a daemon thread) a CORS-enabled static file server for ``mounts``.

    ``mounts`` maps a URL prefix to a directory (as in :class:`ViewerState`); nothing outside them is
    served.  ``port=0`` picks a free port (see ``server.server_address``).  Stop it with
    ``server.shutdown(); server.server_close()``.

    Raises
    ------
    ConfigError
        The port cannot be bound (in use, or privileged).
    """
    handler = type("MountHandler", (_MountHandler,), {"mounts": dict(mounts)})
    try:
        server = ThreadingHTTPServer((host, port), functools.partial(handler))
    except OSError as e:
        raise ConfigError(f"cannot serve on {host}:{port} ({e.strerror}); pick another port with --serve PORT") from e
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="emseg-view-server", daemon=True).start()
    return server
