"""The U-Net weight map against the paper's formula, and the losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emseg.training import total_loss, weight_map, weighted_cross_entropy


def two_cells(gap: int) -> np.ndarray:
    """5 x (3 + gap + 3): cell 1 | ``gap`` background columns | cell 2."""
    labels = np.zeros((5, 6 + gap), np.uint32)
    labels[:, :3] = 1
    labels[:, 3 + gap :] = 2
    return labels


def test_weight_map_one_pixel_gap_matches_the_formula() -> None:
    labels = two_cells(gap=1)
    w = weight_map(labels, w0=10, sigma=5)
    f_bg = 5 / 35  # one background column of seven
    w_bg, w_cell = 0.5 / f_bg, 0.5 / (1 - f_bg)
    # the gap pixel is 1 px from each cell: d1 = d2 = 1
    assert w[2, 3] == pytest.approx(w_bg + 10 * math.exp(-((1 + 1) ** 2) / 50), rel=1e-6)
    # cell pixels only carry their class weight
    assert w[2, 0] == pytest.approx(w_cell, rel=1e-6)
    assert w[0, 6] == pytest.approx(w_cell, rel=1e-6)


def test_weight_map_wide_gap_uses_nearest_and_second_nearest_cell() -> None:
    labels = two_cells(gap=3)  # background columns 3, 4, 5
    w = weight_map(labels, w0=10, sigma=5, class_weights=(1.0, 1.0))
    assert w[1, 3] == pytest.approx(1 + 10 * math.exp(-((1 + 3) ** 2) / 50), rel=1e-6)  # d1 = 1, d2 = 3
    assert w[1, 4] == pytest.approx(1 + 10 * math.exp(-((2 + 2) ** 2) / 50), rel=1e-6)  # d1 = d2 = 2


def test_weight_map_has_no_border_term_with_a_single_cell() -> None:
    labels = np.zeros((8, 8), np.uint32)
    labels[2:6, 2:6] = 1
    w = weight_map(labels, class_weights=(2.0, 1.0))
    np.testing.assert_allclose(w, np.where(labels == 0, 2.0, 1.0))


def test_weight_map_rejects_3d() -> None:
    with pytest.raises(ValueError, match=r"one \(y, x\) section"):
        weight_map(np.zeros((2, 4, 4), np.uint32))


def test_one_channel_weighted_ce_equals_two_class_softmax_ce() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 1, 5, 5, generator=g)
    t = (torch.rand(2, 1, 5, 5, generator=g) > 0.5).float()
    w = torch.rand(2, 1, 5, 5, generator=g) * 3
    two_class = torch.cat([torch.zeros_like(z), z], dim=1)
    expected = (F.cross_entropy(two_class, t[:, 0].long(), reduction="none") * w[:, 0]).mean()
    torch.testing.assert_close(weighted_cross_entropy(z, t, w), expected)


def test_deep_supervision_averages_the_heads() -> None:
    t = torch.ones(1, 1, 4, 4)
    heads = [torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 2.0)]
    expected = (total_loss("bce-dice", heads[0], t, None) + total_loss("bce-dice", heads[1], t, None)) / 2
    torch.testing.assert_close(total_loss("bce-dice", heads, t, None), expected)
