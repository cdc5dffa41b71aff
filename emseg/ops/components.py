"""Connected components of a foreground mask, in 3D or per 2D section (cc3d)."""

from __future__ import annotations

from typing import Any, Literal

import cc3d
import numpy as np
import numpy.typing as npt

from emseg.errors import ConfigError

Mode = Literal["3d", "2d"]
CONNECTIVITIES_3D = (6, 18, 26)
# 2D (per section) equivalent of a 3D connectivity: faces only -> 4, anything diagonal -> 8.
PLANAR = {6: 4, 18: 8, 26: 8, 4: 4, 8: 8}

__all__ = ["CONNECTIVITIES_3D", "Mode", "check_connectivity", "label_components", "local_dtype"]


def check_connectivity(connectivity: int, mode: Mode) -> int:
    """Validate ``connectivity`` for ``mode``: 6/18/26 in 3D; 6/26 (or 4/8) per section in 2D."""
    allowed = CONNECTIVITIES_3D if mode == "3d" else tuple(PLANAR)
    if mode not in ("3d", "2d"):
        raise ConfigError(f"mode must be '3d' or '2d', got {mode!r}")
    if connectivity not in allowed:
        raise ConfigError(f"connectivity must be one of {allowed} in {mode} mode, got {connectivity}")
    return int(connectivity)


def local_dtype(n_voxels: int) -> np.dtype[Any]:
    """Smallest dtype that can hold a label for every voxel of a block (uint32 unless huge)."""
    return np.dtype(np.uint32) if n_voxels < 2**32 - 1 else np.dtype(np.uint64)


def label_components(
    mask: npt.NDArray[np.bool_], *, connectivity: int = 6, mode: Mode = "3d"
) -> tuple[npt.NDArray[Any], int]:
    """Label the connected components of ``mask`` ``(z, y, x)``: ids ``1..n``, 0 = background.

    Parameters
    ----------
    mask : bool array (z, y, x)
        Foreground voxels.
    connectivity : {6, 18, 26}
        Voxel neighbourhood in 3D; in ``mode="2d"`` each section is labelled on its own with 4
        (for 6) or 8 (for 18/26) connectivity, and ids stay unique across sections.

    Returns
    -------
    labels : uint32 array (z, y, x) (uint64 for blocks of 2**32 voxels or more)
    n : int
        Number of components.
    """
    check_connectivity(connectivity, mode)
    dtype = local_dtype(mask.size)
    if mode == "3d":
        labels, n = cc3d.connected_components(mask, connectivity=connectivity, return_N=True, out_dtype=dtype)  # type: ignore[call-overload]
        return labels, int(n)
    out = np.zeros(mask.shape, dtype=dtype)
    total = 0
    for z in range(mask.shape[0]):
        section, n = cc3d.connected_components(mask[z], connectivity=PLANAR[connectivity], return_N=True,
                                               out_dtype=dtype)  # type: ignore[call-overload]
        if n:
            section[section != 0] += dtype.type(total)
            out[z] = section
            total += int(n)
    return out, total
