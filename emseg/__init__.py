"""emseg: distributed segmentation of terabyte-scale electron-microscopy volumes.

The Python API (paths, numpy or dask arrays in; see :mod:`emseg.api` and the README)::

    import emseg
    probabilities = emseg.predict(raw)                        # (c, z, y, x) uint8, 255 = membrane
    segments = emseg.label(probabilities, voxel_size=(50, 4, 4))
    prediction, segments = emseg.segment(raw, voxel_size=(50, 4, 4))
    segments = emseg.agglomerate(probabilities, voxel_size=(50, 4, 4), threshold=0.8)

Names are imported on first use, so ``import emseg`` stays fast (no torch, no dask).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Block",
    "BlockGrid",
    "EmsegError",
    "Roi",
    "Segmentation",
    "__version__",
    "agglomerate",
    "label",
    "plan_blocks",
    "predict",
    "segment",
]

# public name -> module that defines it
_LAZY = {
    "Block": "emseg.geometry",
    "BlockGrid": "emseg.geometry",
    "Roi": "emseg.geometry",
    "plan_blocks": "emseg.geometry",
    "EmsegError": "emseg.errors",
    "Segmentation": "emseg.api",
    "agglomerate": "emseg.api",
    "label": "emseg.api",
    "predict": "emseg.api",
    "segment": "emseg.api",
}

if TYPE_CHECKING:
    from emseg.api import Segmentation, agglomerate, label, predict, segment
    from emseg.errors import EmsegError
    from emseg.geometry import Block, BlockGrid, Roi, plan_blocks


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'emseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

