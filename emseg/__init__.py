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
import sys
import types
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
# The API functions share their names with submodules: emseg/segment/ (the label compute) and the
# old module paths emseg.predict, emseg.label, emseg.agglomerate (aliases of emseg.workflows.*, kept
# importable): importing such a submodule must not replace the function.
_FUNCTIONS = frozenset({"agglomerate", "label", "predict", "segment"})

if TYPE_CHECKING:
    from emseg.api import Segmentation, agglomerate, label, predict, segment
    from emseg.errors import EmsegError
    from emseg.geometry import Block, BlockGrid, Roi, plan_blocks


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'emseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    if name not in _FUNCTIONS:
        globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FUNCTIONS and isinstance(value, types.ModuleType):
            return  # the submodule stays importable (sys.modules); emseg.<name> stays the function
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
