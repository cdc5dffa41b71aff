"""Validation during training: the package's own inference and scores.

The validation volumes are predicted as ``emseg predict`` predicts them, in this process on the
training device and without Dask: :func:`emseg.ops.tiling.make_tiling`'s overlap-tile grid (2-D
models on a CPU: tiles of :data:`~emseg.ops.tiling.DEFAULT_TILE_2D_CPU`), mirrored beyond the borders,
:func:`emseg.ops.inference.normalize` with the run's mean/std (those written to the checkpoint's
``config.json``), run by :func:`emseg.ops.inference.predict_array` in float32.

Scores (lower is better except Dice/IoU), by target:

* every target: ``loss``, the training loss over whole sections (2-D) or the whole volume (3-D);
* ``membrane``/``mask``: the membrane is ``prob > 0.5`` (``mask``: ``1 - prob``).

  - ``dice``, ``iou``, ``pixel_error``: of that membrane against the true membrane
    (:func:`~emseg.training.data.membrane_from_instances`), over every validation pixel;
  - ``adapted_rand_error`` (:mod:`emseg.ops.metrics`): segments are the connected components of the
    non-membrane (4-connected per section for 2-D models, 6-connected for 3-D ones), grown over the
    membrane (``skimage.segmentation.expand_labels``: else all membrane would be one segment).  The
    ground truth is that of ``emseg evaluate``: for 2-D models and for binary-mask labels the
    4-connected interior components of each section, scored per section (mean over the sections
    holding ground truth); for 3-D models with instance labels the ids, scored as one volume;

* ``affinities``: the loss only (``select_by`` must then be ``loss``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from emseg.errors import ConfigError
from emseg.ops.components import label_components
from emseg.ops.inference import Activation, predict_array
from emseg.ops.metrics import Scores, evaluate, evaluate_sections, mean_scores
from emseg.ops.tiling import DEFAULT_TILE_2D_CPU, Tiling, default_batch_size, make_tiling
from emseg.training.config import TrainConfig
from emseg.training.data import PreparedVolume, affinity_mask, targets_from_instances
from emseg.training.losses import total_loss

__all__ = [
    "SegmentationScores",
    "membrane_scores",
    "predict_volume",
    "segments_from_membrane",
    "validate",
    "validation_tiling",
]

class SegmentationScores(NamedTuple):
    """Validation scores of membrane probabilities (see the module docstring)."""

    dice: float
    """Dice of the thresholded membrane vs the true membrane."""
    iou: float
    """Intersection over union of the same."""
    pixel_error: float
    """Fraction of pixels whose thresholded membrane label is wrong."""
    adapted_rand_error: float
    """Adapted Rand error of :mod:`emseg.ops.metrics` (mean over sections when scored per section)."""


# ------------------------------------------------------------------------------------ inference
def validation_tiling(model: Any, shape: Sequence[int], device_type: str) -> Tiling:
    """The tiling ``emseg predict`` uses for ``model`` on a volume of ``shape`` on this kind of device."""
    tile = DEFAULT_TILE_2D_CPU if int(model.ndim) == 2 and device_type != "cuda" else None
    return make_tiling(model, tuple(shape), tile_shape=tile)


def predict_volume(
    model: nn.Module, raw: npt.NDArray[Any], normalization: tuple[float, float], *, ndim: int | None = None,
    activation: Activation = "none", tta: bool = False,
) -> torch.Tensor:
    """Logits (or with ``activation``, probabilities) ``(c, z, y, x)`` float32 of a whole ``(z, y, x)`` volume,
    tiled and mirrored as ``emseg predict`` does.

    Runs on the model's device in float32 and leaves the model in the mode (train/eval) it was in.
    ``ndim``, when given, must be the model's (2: per section, 3: in 3-D).  ``activation`` and ``tta``
    as in :func:`emseg.ops.inference.predict_block` (``tta`` averages after the activation, as
    ``emseg predict --tta`` does).
    """
    if ndim is not None and ndim != int(model.ndim):  # type: ignore[arg-type]
        raise ConfigError(f"a {int(model.ndim)}-D model cannot predict with ndim={ndim}")  # type: ignore[arg-type]
    device_type = next(model.parameters()).device.type
    tiling = validation_tiling(model, raw.shape, device_type)
    was_training = model.training
    model.eval()
    try:
        logits = predict_array(model, raw, tiling=tiling, mean=normalization[0], std=normalization[1],
                               activation=activation, tta=tta,
                               batch_size=default_batch_size(tiling, device_type, math.prod(tiling.grid_shape)),
                               precision="fp32")
    finally:
        model.train(was_training)
    return torch.from_numpy(logits)


# ---------------------------------------------------------------------------------------- scores
def segments_from_membrane(
    prob: npt.NDArray[np.floating[Any]], threshold: float = 0.5, *, per_section: bool = True
) -> npt.NDArray[np.uint32]:
    """Segments of membrane probabilities ``(z, y, x)``: components of ``prob <= threshold``, grown over the membrane.

    ``per_section``: 4-connected components of each section, grown in-plane; else 6-connected in 3-D.
    """
    from skimage.segmentation import expand_labels

    labels, n = label_components(prob <= threshold, connectivity=6, mode="2d" if per_section else "3d")
    labels = labels.astype(np.uint32, copy=False)
    if n == 0:
        return labels
    if not per_section:
        return np.asarray(expand_labels(labels, distance=max(prob.shape)), dtype=np.uint32)  # type: ignore[no-untyped-call]
    out = np.empty_like(labels)
    for z in range(labels.shape[0]):
        out[z] = expand_labels(labels[z], distance=max(prob.shape[1:]))  # type: ignore[no-untyped-call]
    return out


def _rand_scores(prob: npt.NDArray[np.floating[Any]], instances: npt.NDArray[np.integer[Any]],
                 threshold: float, per_section: bool) -> list[Scores]:
    """:mod:`emseg.ops.metrics` scores of the segments of ``prob``: one per section, or one for the volume."""
    segments = segments_from_membrane(prob, threshold, per_section=per_section)
    if per_section:
        return evaluate_sections(segments, instances)
    return [evaluate(segments, instances)]


def membrane_scores(
    prob: npt.NDArray[np.floating[Any]],
    membrane: npt.NDArray[np.integer[Any]],
    instances: npt.NDArray[np.integer[Any]],
    threshold: float = 0.5,
    *,
    per_section: bool = True,
) -> SegmentationScores:
    """Scores of membrane probabilities ``(z, y, x)`` against the true membrane and instances (0 = ignored).

    ``per_section``: the Rand error is the mean over sections holding ground truth (``instances``
    per section), else that of the volume.
    """
    pixels = _PixelCounts()
    pixels.add(prob > threshold, membrane.astype(bool))
    are = mean_scores(_rand_scores(prob, instances, threshold, per_section)).adapted_rand_error
    return SegmentationScores(*pixels.scores(), adapted_rand_error=are)


class _PixelCounts:
    """Counts of a thresholded membrane against the true one, summed over volumes."""

    def __init__(self) -> None:
        self.both = self.pred = self.true = self.wrong = self.total = 0

    def add(self, pred: npt.NDArray[np.bool_], true: npt.NDArray[np.bool_]) -> None:
        self.both += int(np.count_nonzero(pred & true))
        self.pred += int(np.count_nonzero(pred))
        self.true += int(np.count_nonzero(true))
        self.wrong += int(np.count_nonzero(pred != true))
        self.total += pred.size

    def scores(self) -> tuple[float, float, float]:
        """(dice, iou, pixel error); Dice and IoU are 1 when both are empty."""
        union = self.pred + self.true - self.both
        dice = 2 * self.both / (self.pred + self.true) if self.pred + self.true else 1.0
        iou = self.both / union if union else 1.0
        return dice, iou, self.wrong / self.total if self.total else float("nan")


# ------------------------------------------------------------------------------------ validation
def _scored_per_section(cfg: TrainConfig, vol: PreparedVolume) -> bool:
    return cfg.ndim == 2 or vol.labels_kind != "instances"


@torch.no_grad()
def validate(
    model: nn.Module, volumes: Sequence[PreparedVolume], cfg: TrainConfig, normalization: tuple[float, float]
) -> dict[str, float]:
    """Validation loss of ``model`` (unwrapped, on the training device) over ``volumes``, plus the
    membrane/mask scores (see the module docstring): ``{"loss", ["dice", "iou", "pixel_error",
    "adapted_rand_error"]}``."""
    offsets = cfg.affinity_offsets
    losses: list[float] = []
    pixels = _PixelCounts()
    rand: list[Scores] = []
    for vol in volumes:
        logits = predict_volume(model, vol.raw, normalization)
        if cfg.ndim == 2:
            targets = np.stack([targets_from_instances(section, cfg.target, 2, offsets) for section in vol.instances], axis=1)
        else:
            targets = targets_from_instances(vol.instances, cfg.target, 3, offsets)
        weight = torch.from_numpy(vol.weights)[None] if vol.weights is not None else None
        if cfg.target == "affinities":
            if cfg.ndim == 2:
                mask = np.stack([affinity_mask(section, 2, offsets) for section in vol.instances], axis=1)
            else:
                mask = affinity_mask(vol.instances, 3, offsets)
            weight = torch.from_numpy(mask)

        def as_batch(t: torch.Tensor) -> torch.Tensor:  # (c, z, y, x) -> sections (z, c, y, x) or (1, c, z, y, x)
            return t.transpose(0, 1) if cfg.ndim == 2 else t[None]

        target = torch.from_numpy(targets)
        losses.append(float(total_loss(cfg.loss, as_batch(logits), as_batch(target), None if weight is None else as_batch(weight))))
        if cfg.target in ("membrane", "mask"):
            prob = torch.sigmoid(logits[0]).numpy()
            membrane = targets[0] if cfg.target == "membrane" else 1.0 - targets[0]
            prob = prob if cfg.target == "membrane" else 1.0 - prob
            pixels.add(prob > 0.5, membrane.astype(bool))
            per_section = _scored_per_section(cfg, vol)
            if per_section and cfg.ndim == 3:  # the interior components of each section (emseg evaluate)
                truth = label_components(vol.instances != 0, connectivity=6, mode="2d")[0]
            else:
                truth = vol.instances
            rand += _rand_scores(prob, truth, 0.5, per_section)
    scores = {"loss": float(np.mean(losses))}
    if rand:
        dice, iou, pixel_error = pixels.scores()
        scores.update(dice=dice, iou=iou, pixel_error=pixel_error, adapted_rand_error=mean_scores(rand).adapted_rand_error)
    return scores
