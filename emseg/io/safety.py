"""What ``--overwrite`` may delete: only something emseg itself wrote, never an input.

emseg recognises its own outputs by their metadata: an OME-Zarr group with ``emseg`` attributes
(every image :func:`emseg.io.create_volume` makes), a checkpoint directory (``config.json`` of
format ``emseg-checkpoint`` or a ``train_config.json``), a neuroglancer precomputed export (only
``image/`` and ``labels/<name>/`` layers with their ``info``), a TIFF or PNG whose ``Software``
tag is ``emseg``, or an empty folder.  Anything else is refused, with no hint to ``--overwrite``.

Inputs are protected by :func:`check_distinct`, which also follows the ``emseg.source`` that an
input records (``label -o raw.zarr`` on a prediction of ``raw.zarr`` is refused).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from emseg.io.location import Location, PathOrUrl, exists, is_url, location, remove_tree

SOFTWARE = "emseg"
"""The ``Software`` tag of the TIFF and PNG files emseg writes."""

_CHECKPOINT_FORMAT = "emseg-checkpoint"


def _json(path: Location) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def zarr_attrs(path: Location) -> dict[str, Any] | None:
    """The attributes of the zarr node at ``path`` (v3 ``zarr.json`` or v2 ``.zattrs``), or None."""
    meta = _json(path / "zarr.json")
    if isinstance(meta, dict):
        attrs = meta.get("attributes") or {}
        return attrs if isinstance(attrs, dict) else {}
    if (path / ".zgroup").is_file() or (path / ".zarray").is_file():
        attrs = _json(path / ".zattrs") or {}
        return attrs if isinstance(attrs, dict) else {}
    return None


def _is_precomputed(path: Path) -> bool:
    layers = [p for p in path.iterdir()]
    if not layers or any(p.name not in ("image", "labels") or not p.is_dir() for p in layers):
        return False
    found = []
    for top in layers:
        found += [top] if top.name == "image" else [p for p in top.iterdir()]
    for layer in found:
        info = _json(layer / "info") if layer.is_dir() else None
        if not isinstance(info, dict) or "scales" not in info or "data_type" not in info:
            return False
    return True


def _file_is_emseg(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(8)
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        from PIL import Image

        try:
            with Image.open(path) as img:
                return bool(img.info.get("Software") == SOFTWARE)
        except (OSError, ValueError):
            return False
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                return bool(tif.pages[0].software == SOFTWARE)  # type: ignore[union-attr]
        except (OSError, ValueError, IndexError, AttributeError, tifffile.TiffFileError):
            return False
    return False


def made_by_emseg(path: PathOrUrl) -> bool:
    """Whether ``path`` is something emseg wrote (or an empty folder), so ``--overwrite`` may remove it."""
    if is_url(path):  # object storage: nothing there, or an emseg zarr image
        if not exists(path):
            return True
        attrs = zarr_attrs(location(path))
        return attrs is not None and "emseg" in attrs
    p = Path(os.path.realpath(str(path)))  # a symlink is judged by what it points to: that is what gets written
    if not p.exists():
        return True
    try:
        if p.is_file():
            return _file_is_emseg(p)
        if not p.is_dir():
            return False
        if not any(p.iterdir()):
            return True
        attrs = zarr_attrs(p)
        if attrs is not None:
            return "emseg" in attrs
        config = _json(p / "config.json")
        if (isinstance(config, dict) and config.get("format") == _CHECKPOINT_FORMAT) or (p / "train_config.json").is_file():
            return True
        return _is_precomputed(p)
    except OSError:
        return False


def occupied(path: PathOrUrl) -> bool:
    """Whether something is at ``path`` (on object storage: anything but a run lock waiting there)."""
    if not is_url(path):
        p = Path(str(path))
        return p.exists() or p.is_symlink()
    from emseg.engine.objectlock import LOCK_NAME

    url = location(path)
    return exists(url) and any(p.name != LOCK_NAME for p in url.iterdir())


def overwrite_hint(path: PathOrUrl) -> str:
    """The end of an "already exists" message: --overwrite only where it would be allowed."""
    if made_by_emseg(path):
        return "pass --overwrite to replace it"
    return ("it was not made by emseg, and --overwrite replaces only emseg's own outputs: choose another "
            "output path, or move it away yourself")


def recorded_sources(path: str | os.PathLike[str], depth: int = 4) -> list[Path]:
    """The inputs that the emseg output at ``path`` records having been made from (transitively)."""
    found: list[Path] = []
    current = [Path(path)]
    for _ in range(depth):
        nxt: list[Path] = []
        for p in current:
            for node in (p, p.parent, p.parent.parent):  # the array, its image, a label image's image
                attrs = zarr_attrs(node) if node.is_dir() else None
                status = (attrs or {}).get("emseg")
                source = None
                if isinstance(status, dict):
                    params = status.get("params")
                    source = params.get("source") if isinstance(params, dict) else None
                    source = source if isinstance(source, str) and os.path.isabs(source) else status.get("source")
                if isinstance(source, str) and source:
                    src = Path(os.path.realpath(source))
                    if src not in found:
                        found.append(src)
                        nxt.append(src)
                    break
        current = nxt
        if not current:
            break
    return found


def _overlap(a: Any, b: Any) -> bool:
    """Whether two locations (paths or URLs, absolute) are the same or one lies inside the other."""
    sa, sb = str(a).rstrip("/"), str(b).rstrip("/")
    return sa == sb or sb.startswith(sa + "/") or sa.startswith(sb + "/")


def check_distinct(source: Any, output: Any) -> None:
    """Refuse an output that is, contains, or lies inside the input or an input the input was made from."""
    from emseg.errors import SameInputOutputError
    from emseg.io.location import absolute

    src = absolute(source)
    dst = absolute(output)
    if _overlap(src, dst):
        raise SameInputOutputError(f"output {output} would overwrite the input {source}; choose another output path")
    for upstream in (recorded_sources(src) if isinstance(src, Path) else []):
        if _overlap(upstream, dst):
            raise SameInputOutputError(f"output {output} would overwrite {upstream}, from which the input {source} "
                                       "was made; choose another output path")


def _check_not_inside_a_store(path: Path) -> None:
    """Refuse an output inside a zarr store (it would become a stray object of that store)."""
    from emseg.errors import SameInputOutputError

    for parent in Path(os.path.abspath(path)).parents:
        if any((parent / name).is_file() for name in ("zarr.json", ".zgroup", ".zarray")):
            raise SameInputOutputError(f"{path} lies inside the zarr store {parent}; write it beside the store instead")


def _check_replaceable(path: Location, overwrite: bool) -> None:
    """Refuse an existing ``path`` unless ``overwrite`` and emseg made it."""
    from emseg.errors import OutputExistsError

    if not overwrite or not made_by_emseg(path):
        raise OutputExistsError(f"{path} already exists; {overwrite_hint(path)}")


def prepare_output(path: PathOrUrl, *, overwrite: bool) -> Location:
    """Make sure ``path`` may be written: refuse an existing one unless ``overwrite`` (then remove it).

    ``overwrite`` removes only what emseg wrote itself (:func:`made_by_emseg`).  On object storage
    the run lock inside the output stays (:mod:`emseg.engine.objectlock`).  A local ``path`` is
    resolved first: through a symlink, the folder it points to is checked, removed and returned.
    """
    if is_url(path):
        from emseg.engine.objectlock import LOCK_NAME, check_writable

        url = location(path)
        check_writable(url)
        if occupied(url):
            _check_replaceable(url, overwrite)
            remove_tree(url, keep=(LOCK_NAME,))
        return url
    path = Path(os.path.realpath(str(path)))
    _check_not_inside_a_store(path)
    if path.exists():
        _check_replaceable(path, overwrite)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return path


def check_file_output(path: str | os.PathLike[str], inputs: list[Path], overwrite: bool) -> Path:
    """Refuse a file output inside an input, or an existing one without ``overwrite`` (or not emseg's)."""
    from emseg.errors import OutputExistsError

    out = Path(os.path.realpath(path))
    for source in inputs:
        check_distinct(source, out)
    _check_not_inside_a_store(out)
    if out.exists():
        if out.is_dir():
            raise OutputExistsError(f"{out} is a folder; give the path of a file")
        _check_replaceable(out, overwrite)
    return out
