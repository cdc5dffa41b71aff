"""From a prediction block to foreground and boundary maps: numpy in, numpy out.

Threshold semantics (the one rule every method uses)
----------------------------------------------------
A prediction voxel holds a *boundary* (membrane) probability ``p``: ``uint8`` values mean
``p = v / 255``, ``uint16`` ``p = v / 65535``, floats are taken as they are (expected in [0, 1]).

* ``rule="below"`` (predictions): foreground = ``p < threshold``; boundary map = ``p``.
* ``rule="above"`` (the map holds *interior* probability): foreground = ``p > threshold``;
  boundary map = ``1 - p``.
* ``rule="nonzero"`` (binary masks and label images): foreground = ``v != 0``; boundary map =
  ``1`` where ``v == 0`` and ``0`` elsewhere (the threshold is not used).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from emseg.errors import ConfigError, InvalidDataError

ForegroundRule = Literal["below", "above", "nonzero"]
RULES: tuple[str, ...] = ("below", "above", "nonzero")

__all__ = ["RULES", "ForegroundRule", "boundary_map", "check_threshold", "foreground_mask", "probability"]


def check_threshold(threshold: float) -> float:
    """A threshold must lie in (0, 1]: it is a probability."""
    value = float(threshold)
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"threshold must be a probability in (0, 1], got {threshold}")
    return value


def probability(data: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """Prediction values as probabilities (float32): ``uint8 / 255``, ``uint16 / 65535``, floats as is.

    Raises
    ------
    InvalidDataError
        If a float block holds NaN.
    """
    if data.dtype == np.uint8:
        return data.astype(np.float32) * np.float32(1 / 255)
    if data.dtype == np.uint16:
        return data.astype(np.float32) * np.float32(1 / 65535)
    if data.dtype == np.bool_:
        return data.astype(np.float32)
    out = data.astype(np.float32, copy=False)
    if np.issubdtype(data.dtype, np.floating) and np.isnan(out).any():
        raise InvalidDataError("the prediction holds NaN values; fix the prediction before labelling")
    return out


def foreground_mask(data: npt.NDArray[Any], *, threshold: float, rule: ForegroundRule) -> npt.NDArray[np.bool_]:
    """Foreground (object interior) voxels of a prediction block, by ``rule`` (see the module doc)."""
    if rule == "nonzero":
        return np.asarray(data != 0)
    if data.dtype == np.uint8:  # compare integers: no float copy of the block
        cut = threshold * 255
        return np.asarray(data < cut) if rule == "below" else np.asarray(data > cut)
    p = probability(data)
    if rule == "below":
        return np.asarray(p < threshold)
    if rule == "above":
        return np.asarray(p > threshold)
    raise ConfigError(f"foreground rule must be one of {RULES}, got {rule!r}")


def boundary_map(data: npt.NDArray[Any], *, rule: ForegroundRule) -> npt.NDArray[np.float32]:
    """Boundary probability in [0, 1] (float32) of a prediction block, by ``rule``."""
    if rule == "nonzero":
        return np.asarray(data == 0, dtype=np.float32)
    p = probability(data)
    if rule == "below":
        return p
    if rule == "above":
        return np.float32(1.0) - p
    raise ConfigError(f"foreground rule must be one of {RULES}, got {rule!r}")
