"""Moved to :mod:`emseg.export.preview` (issue 12).  Old imports keep working, private names and the
neuroglancer helpers that moved earlier to :mod:`emseg.export.view` included."""

from typing import Any

from emseg.export import preview as _preview
from emseg.export.preview import *  # noqa: F403  (the public names, for type checkers)


def __getattr__(name: str) -> Any:
    if name in ("DEFAULT_VIEWER", "ViewerState", "neuroglancer_state", "neuroglancer_url", "serve"):
        from emseg.export import view

        return getattr(view, name)
    return getattr(_preview, name)
