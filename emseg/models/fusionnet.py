"""FusionNet (Quan, Hildebrand & Jeong 2016), 2D and 3D; "same" padding only."""

from __future__ import annotations

import torch
from torch import nn

from emseg.errors import ConfigError
from emseg.models.base import Padding, SegmentationModel, check_anisotropy, check_int
from emseg.models.blocks import (
    ConvBlock,
    ReceptiveField,
    conv,
    conv_transpose,
    init_he,
    level_kernel,
    level_pool,
    max_pool,
    norm_layer,
)

__all__ = ["FusionNet"]

# convolutions per level: conv, residual block (3 convs), conv
_CONVS_PER_LEVEL = 5


class Residual(nn.Module):
    """Three convolutions whose output is summed with the block's input, then ReLU."""

    def __init__(self, ndim: int, channels: int, kernel: tuple[int, ...], batch_norm: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvBlock(ndim, channels, channels, kernel, same=True, batch_norm=batch_norm),
            ConvBlock(ndim, channels, channels, kernel, same=True, batch_norm=batch_norm),
            ConvBlock(ndim, channels, channels, kernel, same=True, batch_norm=batch_norm, relu=False),
        )
        self.relu = nn.ReLU(inplace=True)  # applied to the fresh sum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.relu(x + self.body(x))
        return out


def _level(ndim: int, cin: int, cout: int, kernel: tuple[int, ...], batch_norm: bool) -> nn.Sequential:
    return nn.Sequential(
        ConvBlock(ndim, cin, cout, kernel, same=True, batch_norm=batch_norm),
        Residual(ndim, cout, kernel, batch_norm),
        ConvBlock(ndim, cout, cout, kernel, same=True, batch_norm=batch_norm),
    )


class FusionNet(SegmentationModel):
    """FusionNet: an encoder-decoder with residual blocks and summation-based long skips.

    Every level is conv -> residual block (three convs plus the block input) -> conv, each conv
    followed by batch norm and ReLU.  The encoder max-pools between levels and doubles the channels;
    the decoder upsamples with a transposed convolution and *adds* (not concatenates) the encoder
    feature map of the same level.  A 1x1 convolution gives ``out_channels`` logits.

    FusionNet is naturally "same"-padded: the output has the input's shape, inputs must be multiples
    of ``input_multiple`` (``2**depth``), and ``context`` is zero.

    Parameters
    ----------
    ndim : {2, 3}
        Spatial axes.
    in_channels, out_channels : int
        Input channels; output logit channels.
    base_channels : int
        Channels of the first level (64 in the paper), doubled per level.
    depth : int
        Number of pooling steps (4 in the paper).
    padding : {"same"}
        Only "same" is supported.
    batch_norm : bool
        Batch normalisation after every convolution (as in the paper).
    anisotropic_levels : int
        3D only: the first levels use ``(1, 3, 3)`` kernels and ``(1, 2, 2)`` pooling.
    """

    name = "fusionnet"

    def __init__(
        self,
        *,
        ndim: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 64,
        depth: int = 4,
        padding: Padding = "same",
        batch_norm: bool = True,
        anisotropic_levels: int = 0,
    ) -> None:
        super().__init__(
            {
                "ndim": ndim,
                "in_channels": in_channels,
                "out_channels": out_channels,
                "base_channels": base_channels,
                "depth": depth,
                "padding": padding,
                "batch_norm": batch_norm,
                "anisotropic_levels": anisotropic_levels,
            }
        )
        if padding != "same":
            raise ConfigError(f"{self.name}: only padding='same' is supported, got {padding!r}; use 'unet' for 'valid'")
        check_int(self.name, "base_channels", base_channels, 1)
        check_int(self.name, "depth", depth, 1)
        check_anisotropy(self.name, ndim, anisotropic_levels, depth)
        self.depth = depth
        self._kernels = tuple(level_kernel(ndim, i < anisotropic_levels) for i in range(depth + 1))
        self._pools = tuple(level_pool(ndim, i < anisotropic_levels) for i in range(depth))
        ch = [base_channels * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList(
            _level(ndim, in_channels if i == 0 else ch[i - 1], ch[i], self._kernels[i], batch_norm)
            for i in range(depth)
        )
        self.pools = nn.ModuleList(max_pool(ndim, self._pools[i]) for i in range(depth))
        self.bridge = _level(ndim, ch[depth - 1], ch[depth], self._kernels[depth], batch_norm)
        self.ups = nn.ModuleList(
            nn.Sequential(
                conv_transpose(ndim, ch[i + 1], ch[i], self._pools[i], self._pools[i]),
                norm_layer(ndim, ch[i], batch_norm),
                nn.ReLU(inplace=True),
            )
            for i in range(depth)
        )
        self.up = nn.ModuleList(_level(ndim, ch[i], ch[i], self._kernels[i], batch_norm) for i in range(depth))
        self.head = conv(ndim, ch[0], out_channels, (1,) * ndim, same=True)
        self.apply(init_he)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(b, out_channels, *x.shape[2:])``."""
        self._check_input(x)
        skips = []
        for down, pool in zip(self.down, self.pools, strict=True):
            x = down(x)
            skips.append(x)
            x = pool(x)
        x = self.bridge(x)
        for i in reversed(range(self.depth)):
            x = self.up[i](self.ups[i](x) + skips[i])
        out: torch.Tensor = self.head(x)
        return out

    def _axis_receptive_field(self, axis: int) -> int:
        rf = ReceptiveField()
        for i in range(self.depth):
            rf.conv(self._kernels[i][axis], _CONVS_PER_LEVEL)
            rf.pool(self._pools[i][axis])
        rf.conv(self._kernels[self.depth][axis], _CONVS_PER_LEVEL)
        for i in reversed(range(self.depth)):
            rf.up(self._pools[i][axis])
            rf.conv(self._kernels[i][axis], _CONVS_PER_LEVEL)
        return rf.size
