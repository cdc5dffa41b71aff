"""The compute: numpy in, numpy out; no paths, stores or clients (the workflows in :mod:`emseg.workflows`
read, write and run these blockwise).

* :mod:`emseg.ops.inference`: tiled model inference of one block.
* :mod:`emseg.ops.threshold`, :mod:`emseg.ops.components`, :mod:`emseg.ops.watershed`: per-block label
  fragments (re-exported here); :mod:`emseg.ops.stitch` makes block labels globally consistent.
* :mod:`emseg.ops.affinities`, :mod:`emseg.ops.graph`, :mod:`emseg.ops.agglomerate`, :mod:`emseg.ops.mutex`:
  region graphs and their agglomeration.
* :mod:`emseg.ops.metrics`: Rand and VI scores; :mod:`emseg.ops.mesh`: meshes and skeletons of one block.
"""

from emseg.ops.components import CONNECTIVITIES_3D, Mode, check_connectivity, label_components, local_dtype
from emseg.ops.threshold import RULES, ForegroundRule, boundary_map, check_threshold, foreground_mask, probability
from emseg.ops.watershed import (
    SEED_METHODS,
    SeedMethod,
    WatershedParams,
    absorb_boundary_only,
    filter_small,
    find_seeds,
    watershed_fragments,
)

__all__ = [
    "CONNECTIVITIES_3D",
    "RULES",
    "SEED_METHODS",
    "ForegroundRule",
    "Mode",
    "SeedMethod",
    "WatershedParams",
    "absorb_boundary_only",
    "boundary_map",
    "check_connectivity",
    "check_threshold",
    "filter_small",
    "find_seeds",
    "foreground_mask",
    "label_components",
    "local_dtype",
    "probability",
    "watershed_fragments",
]
