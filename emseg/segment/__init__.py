"""Per-block postprocessing of predictions into label fragments: numpy in, numpy out.

No paths, stores or clients here (see :mod:`emseg.label` for the blockwise orchestration and
:mod:`emseg.segment.stitch` for making block labels globally consistent).
"""

from emseg.segment.components import CONNECTIVITIES_3D, Mode, check_connectivity, label_components, local_dtype
from emseg.segment.threshold import RULES, ForegroundRule, boundary_map, check_threshold, foreground_mask, probability
from emseg.segment.watershed import (
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
