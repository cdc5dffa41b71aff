"""Validation metrics of membrane predictions: Dice, IoU, pixel error, adapted Rand error.

All thresholds are ``prob > threshold`` = membrane.  Segments for the Rand error are the
4-connected components of non-membrane pixels of each section; membrane pixels are then given to
the nearest segment (``skimage.segmentation.expand_labels``), because ``adapted_rand_error``
would otherwise treat all predicted-membrane pixels as one giant segment.  The ground truth's
id 0 (membrane) is ignored, as in the ISBI 2012 challenge's foreground-restricted Rand score.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from scipy import ndimage

__all__ = ["SegmentationScores", "membrane_scores", "segments_from_membrane"]


class SegmentationScores(NamedTuple):
    """Scores of one or more sections (means over sections for the Rand error)."""

    dice: float
    """Dice of the thresholded membrane vs the true membrane."""
    iou: float
    """Intersection over union of the same."""
    pixel_error: float
    """Fraction of pixels whose thresholded membrane label is wrong."""
    adapted_rand_error: float
    """Mean over sections of skimage's adapted Rand error (1 - F-score of Rand precision/recall)."""


def segments_from_membrane(prob: npt.NDArray[np.floating[Any]], threshold: float = 0.5) -> npt.NDArray[np.uint32]:
    """Instances of one ``(y, x)`` section: components of ``prob <= threshold``, grown over the membrane."""
    from skimage.segmentation import expand_labels

    cc, n = ndimage.label(prob <= threshold)
    if n == 0:
        return np.zeros(prob.shape, np.uint32)
    return np.asarray(expand_labels(cc, distance=max(prob.shape)), dtype=np.uint32)  # type: ignore[no-untyped-call]


def membrane_scores(
    prob: npt.NDArray[np.floating[Any]],
    membrane: npt.NDArray[np.integer[Any]],
    instances: npt.NDArray[np.integer[Any]],
    threshold: float = 0.5,
) -> SegmentationScores:
    """Scores of membrane probabilities ``(z, y, x)`` against the true membrane and instances.

    ``instances`` are the true per-section cells (0 = membrane, ignored by the Rand error).
    """
    from skimage.metrics import adapted_rand_error

    pred = prob > threshold
    true = membrane.astype(bool)
    inter = float(np.logical_and(pred, true).sum())
    total = float(pred.sum() + true.sum())
    union = float(np.logical_or(pred, true).sum())
    dice = 2 * inter / total if total else 1.0
    iou = inter / union if union else 1.0
    pixel_error = float((pred != true).mean())
    errors = []
    for z in range(prob.shape[0]):
        if not instances[z].any():
            continue
        segments = segments_from_membrane(prob[z], threshold).astype(np.int64)
        error, _, _ = adapted_rand_error(instances[z].astype(np.int64), segments)  # type: ignore[no-untyped-call]
        errors.append(float(error))
    are = float(np.mean(errors)) if errors else float("nan")
    return SegmentationScores(dice=dice, iou=iou, pixel_error=pixel_error, adapted_rand_error=are)
