"""Losses and the U-Net paper's weight map.

The weight map (Ronneberger et al. 2015, eq. 2)::

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

``w_c`` balances the class frequencies (here ``1 / (2 f_class)`` so that both classes carry equal
total weight and the mean weight of a balanced image is 1); ``d1``/``d2`` are the distances to the
border of the nearest and second-nearest cell.  The border term is added on background (membrane,
id 0) pixels only, where separation borders lie, and only where two cells are within reach.  It is
computed once per whole label section, so patch borders never create false cell borders, the image
edge is not treated as a cell border, and augmentation deforms the precomputed map with the labels.

For a one-channel model the paper's pixel-wise two-class softmax cross-entropy over logits
``(0, z)`` is exactly the sigmoid binary cross-entropy of ``z``; :func:`weighted_cross_entropy`
uses that identity and the class-index form for more channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = ["bce_dice_loss", "masked_bce", "soft_dice_loss", "total_loss", "weight_map", "weighted_cross_entropy"]


def weight_map(
    instances: npt.NDArray[np.integer[Any]],
    *,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: tuple[float, float] | None = None,
) -> npt.NDArray[np.float32]:
    """The U-Net weight map of one 2D instance section ``(y, x)`` (0 = background/membrane).

    Parameters
    ----------
    instances : (y, x) integer array
        Cell ids; 0 is the background between cells.
    w0, sigma : float
        Border term amplitude and width (pixels); the paper uses 10 and 5.
    class_weights : (background, cell), optional
        ``w_c`` per class; default ``1 / (2 * frequency)`` of each class in this section.

    Returns
    -------
    (y, x) float32
    """
    if instances.ndim != 2:
        raise ValueError(f"weight_map expects one (y, x) section, got shape {instances.shape}")
    background = instances == 0
    if class_weights is None:
        f_bg = float(background.mean())
        if 0.0 < f_bg < 1.0:
            class_weights = (0.5 / f_bg, 0.5 / (1.0 - f_bg))
        else:
            class_weights = (1.0, 1.0)
    w = np.where(background, class_weights[0], class_weights[1]).astype(np.float32)
    if w0 == 0 or not background.any():
        return w

    # beyond this distance sum the border term is below 1e-4 * w0: ignore cells farther away
    reach = int(np.ceil(sigma * np.sqrt(2 * np.log(1e4))))
    d1 = np.full(instances.shape, np.inf, np.float32)
    d2 = np.full(instances.shape, np.inf, np.float32)
    boxes = ndimage.find_objects(instances.astype(np.int64))
    for index, box in enumerate(boxes):
        if box is None:
            continue
        cell_id = index + 1
        grown = tuple(slice(max(s.start - reach, 0), min(s.stop + reach, n)) for s, n in zip(box, instances.shape, strict=True))
        crop = instances[grown]
        dist = ndimage.distance_transform_edt(crop != cell_id).astype(np.float32)
        a, b = d1[grown], d2[grown]
        d2[grown] = np.where(dist < a, a, np.minimum(b, dist))
        d1[grown] = np.minimum(a, dist)
    border = background & np.isfinite(d2)
    w[border] += (w0 * np.exp(-((d1[border] + d2[border]) ** 2) / (2 * sigma**2))).astype(np.float32)
    return w


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over voxels of ``w(x) * CE(x)``; logits/target ``(b, c, ...)``, weight ``(b, 1, ...)``.

    One channel: sigmoid BCE (== two-class softmax CE).  Several channels: softmax CE with the
    target's argmax as the class.
    """
    if logits.shape[1] == 1:
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    else:
        ce = F.cross_entropy(logits, target.argmax(1), reduction="none")[:, None]
    if weight is not None:
        ce = ce * weight
    return ce.mean()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 - soft Dice of sigmoid(logits) and target, per channel over batch and space, averaged.

    ``mask`` (broadcastable to ``logits``, 0/1): only voxels where it is 1 count.
    """
    prob = torch.sigmoid(logits)
    if mask is not None:
        prob, target = prob * mask, target * mask
    dims = [0, *range(2, logits.ndim)]
    inter = (prob * target).sum(dims)
    denom = prob.sum(dims) + target.sum(dims)
    return (1.0 - (2.0 * inter + eps) / (denom + eps)).mean()


def masked_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sigmoid BCE averaged over the voxels where ``mask`` is non-zero (all voxels without a mask).

    ``mask`` may be a 0/1 mask or non-negative weights: the result is ``sum(w * bce) / sum(w)``.
    """
    if mask is None:
        return F.binary_cross_entropy_with_logits(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    mask = mask.expand_as(bce)
    return (bce * mask).sum() / mask.sum().clamp_min(1.0)


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """UNet++'s loss: BCE + soft Dice over the voxels where ``mask`` is non-zero (all without a mask).

    ``mask`` may hold weights (e.g. class balancing): they weight the BCE; the Dice uses ``mask > 0``.
    """
    return masked_bce(logits, target, mask) + soft_dice_loss(logits, target, mask=None if mask is None else (mask > 0).to(logits.dtype))


def total_loss(
    name: str, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor, weight: torch.Tensor | None
) -> torch.Tensor:
    """``name`` loss of one output, or the mean over deep-supervision heads when given a sequence.

    ``weight``: the U-Net weight map for ``weighted-ce``; for ``bce``/``bce-dice`` a loss mask
    (e.g. :func:`emseg.training.data.affinity_mask`), or None.
    """
    heads = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    losses = []
    for logits in heads:
        if name == "weighted-ce":
            losses.append(weighted_cross_entropy(logits, target, weight))
        elif name == "bce-dice":
            losses.append(bce_dice_loss(logits, target, weight))
        elif name == "bce":
            losses.append(masked_bce(logits, target, weight))
        else:
            raise ValueError(f"unknown loss {name!r}")
    return torch.stack(losses).mean()
