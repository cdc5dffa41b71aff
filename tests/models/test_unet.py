"""U-Net: the paper's geometry, translation equivariance, blockwise tiling with halo = context."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from emseg.models import UNet, build


def test_paper_unet_has_23_conv_layers() -> None:
    model = build("unet", ndim=2, base_channels=64, depth=4, padding="valid")
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convs) == 23  # 18 3x3 convs, 4 up-convs, one 1x1
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in convs) == 4
    assert max(m.out_channels for m in convs) == 1024
    assert model.output_shape((572, 572)) == (388, 388)
    assert model.context == (92, 92) and model.input_multiple == (16, 16)


def test_paper_geometry_forward_572() -> None:
    model = build("unet", ndim=2, base_channels=1, depth=4, padding="valid").eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 572, 572)).shape == (1, 1, 388, 388)


@pytest.mark.parametrize("ndim", [2, 3])
def test_valid_unet_translation_equivariant(ndim: int) -> None:
    torch.manual_seed(0)
    model = build("unet", ndim=ndim, base_channels=2, depth=2, anisotropic_levels=1 if ndim == 3 else 0).eval()
    m = model.input_multiple
    shape = tuple(s + 2 * k for s, k in zip(model.min_input_shape, m, strict=True))
    x = torch.rand(1, 1, *shape)
    with torch.no_grad():
        whole = model(x)
        shifted = model(x[(..., *(slice(k, None) for k in m))])
    assert torch.allclose(whole[(..., *(slice(k, None) for k in m))], shifted, atol=1e-6)


def test_valid_unet_blockwise_equals_whole() -> None:
    """Tiles read with halo = context at offsets that are multiples of input_multiple reproduce the whole."""
    torch.manual_seed(0)
    model = build("unet", ndim=2, base_channels=2, depth=2).eval()
    (c, _), (m, _) = model.context, model.input_multiple
    core = 2 * m  # output tile size; the read tile is core + 2 * context
    assert model.output_shape((core + 2 * c,) * 2) == (core, core)
    x = torch.rand(1, 1, 3 * core + 2 * c, 2 * core + 2 * c)
    with torch.no_grad():
        whole = model(x)
        tiles = torch.zeros_like(whole)
        for i in range(3):
            for j in range(2):
                read = x[..., i * core : (i + 1) * core + 2 * c, j * core : (j + 1) * core + 2 * c]
                tiles[..., i * core : (i + 1) * core, j * core : (j + 1) * core] = model(read)
    assert torch.allclose(tiles, whole, atol=1e-6)


def test_receptive_field_bounds_measured_dependency() -> None:
    """Perturbing one input column changes only outputs within the declared receptive field."""
    torch.manual_seed(0)
    model = build("unet", ndim=2, base_channels=2, depth=2).eval()
    (rf, _), (c, _) = model.receptive_field, model.context
    n = model.min_input_shape[0] + 2 * model.input_multiple[0]
    x = torch.rand(1, 1, model.min_input_shape[0], n)
    reads: dict[int, list[int]] = {}
    with torch.no_grad():
        base = model(x)[0, 0]
        for j in range(n):
            xp = x.clone()
            xp[..., j] += 3.0 * torch.randn(xp.shape[2])
            changed = (model(xp)[0, 0] - base).abs().amax(dim=0) > 0
            for i in torch.nonzero(changed).flatten().tolist():
                reads.setdefault(i, []).append(j)
    widths = [max(js) - min(js) + 1 for js in reads.values()]
    assert max(widths) <= rf
    # outputs read their input around i + context (max-pool phase shifts it by < input_multiple)
    assert all(abs((min(js) + max(js)) / 2 - (i + c)) < model.input_multiple[0] for i, js in reads.items())


def test_dropout_sits_at_end_of_contracting_path() -> None:
    model = UNet(base_channels=2, depth=2, dropout=0.5)
    assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.5
