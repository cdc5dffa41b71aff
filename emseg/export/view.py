"""Neuroglancer for emseg outputs: a layer state, a locked-down store server, and an offline viewer.

``neuroglancer_state`` describes raw, prediction and labels as neuroglancer layers (physical units,
nanometres) whose sources are ``zarr3://``/``zarr2://`` URLs on a local store server.  ``serve`` runs
that server; ``start_viewer`` also starts the neuroglancer client that the ``neuroglancer`` Python
package ships (no internet needed) and points it at the store server.

What the store server exposes (``emseg view --serve`` is reachable by every local user and by every
web page the user's browser opens, so it is closed by default):

* only OME-Zarr images (checked when the server starts), and inside them only the group metadata
  and the arrays of their multiscale levels (and of their label images): no ``emseg_state``, no
  other files; with ``precomputed`` mounts, only the files of neuroglancer precomputed layers;
* never a file whose real path (symlinks resolved) lies outside its store;
* only to requests whose ``Host`` header names this machine's loopback (or a host allowed
  explicitly): a DNS-rebinding page cannot read the stores;
* cross-origin reads only for the viewer's own origin (no ``Access-Control-Allow-Origin: *``);
* bound to 127.0.0.1 unless another address is asked for.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import threading
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple

from emseg.errors import ConfigError, EmsegError, IncompleteOutputError, NotAVolumeError, VolumeNotFoundError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_VIEWER",
    "LOOPBACK_HOSTS",
    "LocalViewer",
    "Mount",
    "StoreServer",
    "ViewerState",
    "neuroglancer_state",
    "neuroglancer_url",
    "serve",
    "servable_files",
    "start_viewer",
]

DEFAULT_VIEWER = "https://neuroglancer-demo.appspot.com"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_GROUP_METADATA = ("zarr.json", ".zgroup", ".zattrs")
_ARRAY_METADATA = ("zarr.json", ".zarray", ".zattrs")


class ViewerState(NamedTuple):
    """A neuroglancer state and the local directories its URLs refer to (URL prefix -> directory)."""

    state: dict[str, Any]
    mounts: dict[str, Path]


# ---------------------------------------------------------------------------------------------
# the state


def _zarr_scheme(image: Path) -> str:
    return "zarr3" if (image / "zarr.json").exists() else "zarr2"


def _ome_image(path: Path | None, what: str) -> Path | None:
    """``path``'s OME-Zarr image group, or None (with a warning) when it is not one."""
    from emseg.io.volume import open_volume

    if path is None:
        return None
    try:
        volume = open_volume(path)
    except EmsegError as e:
        log.warning("not showing the %s: %s", what, e)
        return None
    if volume.image_path is None:
        log.warning("not showing the %s: %s is a bare zarr array, not an OME-Zarr image", what, path)
        return None
    return volume.image_path if isinstance(volume.image_path, Path) else None  # served from local files


def neuroglancer_state(
    out_path: str | os.PathLike[str],
    *,
    raw_path: str | os.PathLike[str] | None = None,
    base_url: str = "http://127.0.0.1:8000",
    precomputed: str | os.PathLike[str] | None = None,
    select: Sequence[int] = (),
) -> ViewerState:
    """Neuroglancer layers for raw, prediction and labels, read from ``base_url``.

    Each store is mounted at ``base_url/<its directory name>/`` (made unique); :func:`serve`
    serves exactly these mounts.  Sources are ``zarr3://`` or ``zarr2://`` URLs of the OME-Zarr
    groups, so neuroglancer reads their multiscales (every pyramid level) and their voxel sizes:
    the view is in physical units, nanometres, axes ``x, y, z``.  A raw source that is not an
    OME-Zarr image (a bare array, or a recorded path that is something else) is left out with a
    warning.

    Parameters
    ----------
    out_path : path
        An emseg output (``out.zarr``), a synthetic volume, or any OME-Zarr image.
    raw_path : path, optional
        The raw EM; default: the source recorded in ``out_path``.
    base_url : str
        Where the stores are (or will be) served.
    precomputed : path, optional
        A directory written by ``emseg export --format precomputed`` (with ``--mesh`` and/or
        ``--skeleton``): its ``labels/<name>`` layer adds meshes and skeletons to the segments.
    select : segment IDs
        Segments selected at start (their meshes and skeletons are drawn in the 3-D panel).
    """
    from emseg.export.preview import find_sources
    from emseg.io.volume import open_volume

    sources = find_sources(out_path, raw_path)
    raw = _ome_image(sources.raw, "raw EM")
    mounts: dict[str, Path] = {}
    roots: dict[Path, str] = {}
    base = base_url.rstrip("/")

    def mount(top: Path) -> str:
        top = top.resolve()
        if top not in roots:
            name = top.name
            i = 1
            while name in mounts:
                i += 1
                name = f"{top.name}-{i}"
            mounts[name] = top
            roots[top] = name
        return roots[top]

    def url_of(image: Path) -> str:
        # Mount the top OME-Zarr group (labels live inside it) once, under a unique name.
        top = image
        while top.parent.name == "labels":
            top = top.parent.parent
        name = mount(top)
        rel = image.resolve().relative_to(top.resolve()).as_posix()
        path = "/".join(p for p in (name, "" if rel == "." else rel) if p)
        return f"{_zarr_scheme(image)}://{base}/{urllib.parse.quote(path)}/"

    reference = open_volume(sources.prediction or sources.labels or sources.raw)  # type: ignore[arg-type]
    layers: list[dict[str, Any]] = []
    if raw is not None:
        layers.append({"type": "image", "name": "raw", "source": url_of(raw)})
    if sources.prediction is not None:
        layers.append({
            "type": "image",
            "name": "prediction",
            "source": url_of(sources.prediction),
            "opacity": 0.5,
            "shader": "#uicontrol invlerp normalized\nvoid main() { emitRGB(vec3(normalized(), 0.0, normalized())); }",
            "visible": raw is None,
        })
    if sources.labels is not None:
        segments: dict[str, Any] = {"type": "segmentation", "name": sources.labels.name,
                                    "source": url_of(sources.labels), "selectedAlpha": 0.4}
        if precomputed is not None:
            from emseg.export.precomputed import export_status

            if export_status(precomputed) == "incomplete":
                raise IncompleteOutputError(f"{precomputed} was left half-written by an interrupted export; rerun "
                                            "the emseg export command that made it to finish it")
            layer_dir = Path(precomputed) / "labels" / sources.labels.name
            if not (layer_dir / "info").is_file():
                raise VolumeNotFoundError(f"{precomputed}: no precomputed layer labels/{sources.labels.name} "
                                          "(write it with emseg export --format precomputed --mesh)")
            name = mount(Path(precomputed))
            pc_url = f"precomputed://{base}/{urllib.parse.quote(name)}/labels/{urllib.parse.quote(sources.labels.name)}"
            segments["source"] = [segments["source"], {"url": pc_url, "subsources": {"default": False}}]
        if select:
            segments["segments"] = [str(int(i)) for i in select]
        layers.append(segments)
    vs = reference.voxel_size
    # Axes x, y, z (neuroglancer's usual order: the first panel is the xy section).
    state: dict[str, Any] = {
        "dimensions": {axis: [vs[i] * 1e-9, "m"] for axis, i in zip("xyz", (2, 1, 0))},
        "position": [reference.offset_nm[i] / vs[i] + reference.shape[i] / 2 for i in (2, 1, 0)],
        "crossSectionScale": 1,
        "layers": layers,
        "selectedLayer": {"layer": layers[-1]["name"], "visible": False},
        "layout": "4panel",
    }
    return ViewerState(state, mounts)


def neuroglancer_url(state: dict[str, Any], viewer: str = DEFAULT_VIEWER) -> str:
    """A neuroglancer link carrying ``state`` in its fragment (``VIEWER/#!<json>``)."""
    text = json.dumps(state, separators=(",", ":"))
    return f"{viewer.rstrip('/')}/#!{urllib.parse.quote(text, safe='')}"


# ---------------------------------------------------------------------------------------------
# what may be served


@dataclass(frozen=True)
class Mount:
    """One served store: its real root, the files that may be read, and the directories whose files may."""

    root: Path
    files: frozenset[str] = field(default_factory=frozenset)
    trees: tuple[str, ...] = ()

    def allows(self, rel: str) -> bool:
        return rel in self.files or any(rel.startswith(tree + "/") for tree in self.trees)


def _metadata(root: Path, rel: str, names: Sequence[str]) -> set[str]:
    prefix = f"{rel}/" if rel else ""
    return {prefix + n for n in names if (root / prefix / n).is_file()}


def _image_entries(root: Path, image: Path) -> tuple[set[str], list[str]]:
    """The metadata files and level-array directories of one OME-Zarr image (relative to ``root``)."""
    from emseg.io.volume import open_volume

    volume = open_volume(image)
    if volume.image_path is None or volume.image_path.resolve() != image.resolve():
        raise NotAVolumeError(f"{image}: not an OME-Zarr image; only OME-Zarr images are served")
    rel = image.resolve().relative_to(root).as_posix()
    rel = "" if rel == "." else rel
    files = _metadata(root, rel, _GROUP_METADATA)
    trees: list[str] = []
    for level in volume.levels:
        level_rel = f"{rel}/{level}" if rel else level
        files |= _metadata(root, level_rel, _ARRAY_METADATA)
        trees.append(level_rel)
    return files, trees


def _precomputed_entries(root: Path) -> tuple[set[str], list[str]]:
    """The layers of a precomputed export (``image/``, ``labels/<name>/``): info files, scales, meshes, skeletons."""
    from emseg.export.precomputed import export_status

    if export_status(root) == "incomplete":  # never served as if it were finished
        raise IncompleteOutputError(f"{root} was left half-written by an interrupted export; rerun the emseg export "
                                    "command that made it to finish it")
    files: set[str] = set()
    trees: list[str] = []
    layers = [root / "image"] + sorted((root / "labels").glob("*")) if (root / "labels").is_dir() else [root / "image"]
    for layer in layers:
        if not (layer / "info").is_file():
            continue
        rel = layer.resolve().relative_to(root).as_posix()
        try:
            info = json.loads((layer / "info").read_text())
        except (OSError, ValueError) as e:
            raise NotAVolumeError(f"{layer}/info: not a neuroglancer precomputed info file ({e})") from e
        if not isinstance(info, dict) or info.get("type") not in ("image", "segmentation"):
            raise NotAVolumeError(f"{layer}/info: not a neuroglancer precomputed image or segmentation layer")
        files.add(f"{rel}/info")
        trees += [f"{rel}/{s['key']}" for s in info.get("scales", []) if isinstance(s, dict) and "key" in s]
        for key in ("mesh", "skeletons"):
            if isinstance(info.get(key), str) and "/" not in info[key] and info[key] not in ("", ".", ".."):
                trees.append(f"{rel}/{info[key]}")
    if not files:
        raise NotAVolumeError(f"{root}: no neuroglancer precomputed layers (image/, labels/<name>/)")
    return files, trees


def servable_files(root: str | os.PathLike[str]) -> Mount:
    """What :func:`serve` may send from ``root``: an OME-Zarr image or a precomputed export.

    For an OME-Zarr image: its group metadata, the arrays of its multiscale levels, the ``labels``
    group metadata and, the same way, each label image.  For a precomputed export (a directory
    with ``image/info`` or ``labels/<name>/info``): the info files and the files under each
    scale, ``mesh`` and ``skeletons`` directory.  Nothing else.

    Raises
    ------
    VolumeNotFoundError, NotAVolumeError
        ``root`` is neither.
    """
    from emseg.io.volume import label_image_paths

    path = Path(root)
    if not path.is_dir():
        raise VolumeNotFoundError(f"{path}: no such directory; only OME-Zarr images are served")
    real = path.resolve()
    if (real / "image" / "info").is_file() or (real / "labels").is_dir() and any(
            (p / "info").is_file() for p in (real / "labels").glob("*")):
        files, trees = _precomputed_entries(real)
        return Mount(real, frozenset(files), tuple(trees))
    files, trees = _image_entries(real, real)
    labels = label_image_paths(real)
    if labels:
        files |= _metadata(real, "labels", _GROUP_METADATA)
    for label in labels:
        label_files, label_trees = _image_entries(real, label)
        files |= label_files
        trees += label_trees
    return Mount(real, frozenset(files), tuple(trees))


# ---------------------------------------------------------------------------------------------
# the store server


def _host_name(host_header: str) -> str:
    """``"127.0.0.1:8000"`` -> ``"127.0.0.1"``, ``"[::1]:80"`` -> ``"::1"``."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``Range: bytes=a-b`` (one range, ``a-``, ``-n`` too) -> ``(start, stop)``; None: send the whole file."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[len("bytes="):].strip().partition("-")
    try:
        if first == "":
            return max(size - int(last), 0), size
        start = int(first)
        stop = min(int(last) + 1, size) if last else size
    except ValueError:
        return None
    return min(start, size), stop


class _StoreHandler(SimpleHTTPRequestHandler):
    """Static files of a few checked mounts; GET/HEAD only, Host checked, CORS for listed origins."""

    mounts: dict[str, Mount] = {}
    allowed_hosts: frozenset[str] = frozenset()
    allowed_origins: frozenset[str] = frozenset()

    def _host_ok(self) -> bool:
        host = self.headers.get("Host")
        if host is None or _host_name(host) not in self.allowed_hosts:
            self.send_error(403, "Host not allowed")
            return False
        return True

    def do_GET(self) -> None:
        if self._host_ok():
            super().do_GET()

    def do_HEAD(self) -> None:
        if self._host_ok():
            super().do_HEAD()

    def do_OPTIONS(self) -> None:  # CORS preflight
        if self._host_ok():
            self.send_response(204)
            self.end_headers()

    def translate_path(self, path: str) -> str:
        raw = urllib.parse.unquote(urllib.parse.urlsplit(path).path)
        parts = raw.split("/")[1:]
        if (len(parts) < 2 or parts[0] not in self.mounts or "\\" in raw or "\0" in raw
                or any(p in ("", ".", "..") for p in parts)):
            return ""  # -> 404
        mount = self.mounts[parts[0]]
        rel = "/".join(parts[1:])
        if not mount.allows(rel):
            return ""
        real = os.path.realpath(mount.root.joinpath(*parts[1:]))
        if os.path.commonpath([real, str(mount.root)]) != str(mount.root) or not os.path.isfile(real):
            return ""  # a symlink out of the store, or not a plain file
        return real

    def send_head(self) -> Any:
        path = self.translate_path(self.path)
        if not path:
            self.send_error(404, "File not found")
            return None
        byte_range = _byte_range(self.headers.get("Range"), os.path.getsize(path))
        if byte_range is None:
            return super().send_head()
        # one range of a file (sharded precomputed layers are read so: shard index, minishard index, chunk)
        start, stop = byte_range
        if start >= stop:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{os.path.getsize(path)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(stop - start)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{os.path.getsize(path)}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        return io.BytesIO(data)

    def list_directory(self, path: str | os.PathLike[str]) -> None:
        self.send_error(404, "No directory listings")
        return None

    def end_headers(self) -> None:
        origin = self.headers.get("Origin")
        if origin is not None and origin in self.allowed_origins:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
            self.send_header("Access-Control-Allow-Headers", "Range, Content-Type")
            self.send_header("Access-Control-Expose-Headers", "Content-Range, Content-Length")
            self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Vary", "Origin")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


class StoreServer(ThreadingHTTPServer):
    """The running store server (a daemon thread); ``url`` is its base URL, ``close()`` stops it."""

    url: str

    def close(self) -> None:
        self.shutdown()
        self.server_close()

    def __enter__(self) -> StoreServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    mounts: dict[str, Path],
    *,
    port: int = 8000,
    host: str = "127.0.0.1",
    allowed_origins: Iterable[str] = (),
    allowed_hosts: Iterable[str] = (),
) -> StoreServer:
    """Start (in a daemon thread) a static file server for the OME-Zarr images in ``mounts``.

    ``mounts`` maps a URL prefix to a directory (as in :class:`ViewerState`).  Each must be an
    OME-Zarr image (or a precomputed export); only the files listed by :func:`servable_files` are
    sent, never through a symlink that leaves the store.  Requests must name a loopback host
    (``127.0.0.1``, ``localhost``, ``::1``), ``host`` itself, or one of ``allowed_hosts`` in their
    ``Host`` header; cross-origin reads are allowed for ``allowed_origins`` only (exact
    ``scheme://host:port`` strings).  ``port=0`` picks a free port (see ``server.url``).  Stop
    it with ``server.close()``.

    Raises
    ------
    VolumeNotFoundError, NotAVolumeError
        A mount that is not an OME-Zarr image or precomputed export.
    ConfigError
        The port cannot be bound (in use, or privileged), or a wildcard origin.
    """
    checked = {name: servable_files(path) for name, path in mounts.items()}
    origins = frozenset(allowed_origins)
    if any("*" in o for o in origins):
        raise ConfigError("wildcard CORS origins are refused; name the viewer's origin, e.g. http://127.0.0.1:8080")
    hosts = set(LOOPBACK_HOSTS) | {h.lower() for h in allowed_hosts}
    if host not in ("", "0.0.0.0", "::"):
        hosts.add(host.lower())
    handler = type("StoreHandler", (_StoreHandler,), {
        "mounts": checked, "allowed_hosts": frozenset(hosts), "allowed_origins": origins})
    try:
        server = StoreServer((host, port), functools.partial(handler))
    except OSError as e:
        raise ConfigError(f"cannot serve on {host}:{port} ({e.strerror}); pick another port with --serve PORT") from e
    server.daemon_threads = True
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else ("[::1]" if host == "::" else host)
    shown = f"[{shown}]" if ":" in shown and not shown.startswith("[") else shown
    server.url = f"http://{shown}:{server.server_address[1]}"
    if not _is_loopback(host):
        log.warning("serving on %s: reachable from other machines; only Host names %s are answered",
                    host, sorted(hosts))
    threading.Thread(target=server.serve_forever, name="emseg-view-server", daemon=True).start()
    return server


# ---------------------------------------------------------------------------------------------
# the offline viewer


@dataclass
class LocalViewer:
    """A running offline viewer: the neuroglancer client and the store server, both local."""

    url: str
    data_url: str
    state: dict[str, Any]
    store: StoreServer
    viewer: Any

    def close(self) -> None:
        import neuroglancer

        self.store.close()
        neuroglancer.stop()

    def __enter__(self) -> LocalViewer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_viewer(
    out_path: str | os.PathLike[str],
    *,
    raw_path: str | os.PathLike[str] | None = None,
    precomputed: str | os.PathLike[str] | None = None,
    select: Sequence[int] = (),
    port: int = 0,
    viewer_port: int = 0,
    host: str = "127.0.0.1",
    allowed_hosts: Iterable[str] = (),
) -> LocalViewer:
    """Serve ``out_path`` (raw, prediction, segments) and neuroglancer's bundled client, offline.

    The client comes from the ``neuroglancer`` Python package (its own server, on ``host`` and
    ``viewer_port``); the stores from :func:`serve` on ``host`` and ``port``, readable by that
    client's origin only.  Open ``.url`` in a browser; ``.close()`` stops both servers.

    Raises
    ------
    ConfigError
        The ``neuroglancer`` package is missing, or a port cannot be bound.
    VolumeNotFoundError, NotAVolumeError
        ``out_path``, ``raw_path`` or ``precomputed`` are not what they should be.
    """
    try:
        import neuroglancer
    except ImportError as e:
        raise ConfigError("the offline viewer needs the neuroglancer package (an emseg dependency): "
                          "pip install neuroglancer; or use --public for the demo site") from e

    probe = neuroglancer_state(out_path, raw_path=raw_path, precomputed=precomputed, select=select)  # validate first
    neuroglancer.set_server_bind_address(host, viewer_port)
    viewer = neuroglancer.Viewer()
    try:
        url = viewer.get_viewer_url()
    except OSError as e:
        raise ConfigError(f"cannot serve the viewer on {host}:{viewer_port} ({e.strerror}); "
                          "pick another port with --viewer-port") from e
    viewer_port_bound = urllib.parse.urlsplit(url).port
    origins = {f"http://{h}:{viewer_port_bound}" for h in ("127.0.0.1", "localhost", "[::1]", host)}
    origins |= {f"http://{h}:{viewer_port_bound}" for h in allowed_hosts}
    origins.add(f"{urllib.parse.urlsplit(url).scheme}://{urllib.parse.urlsplit(url).netloc}")
    try:
        store = serve(probe.mounts, port=port, host=host, allowed_origins=origins, allowed_hosts=allowed_hosts)
    except EmsegError:
        neuroglancer.stop()
        raise
    view = neuroglancer_state(out_path, raw_path=raw_path, precomputed=precomputed, select=select, base_url=store.url)
    viewer.set_state(neuroglancer.ViewerState(view.state))
    return LocalViewer(url, store.url, view.state, store, viewer)
