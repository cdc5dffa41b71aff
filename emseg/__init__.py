"""emseg: distributed segmentation of terabyte-scale electron-microscopy volumes."""

from emseg.errors import EmsegError
from emseg.geometry import Block, BlockGrid, Roi, plan_blocks

__version__ = "0.1.0"

__all__ = ["Block", "BlockGrid", "EmsegError", "Roi", "__version__", "plan_blocks"]
