"""U-Net (Ronneberger, Fischer & Brox 2015), 2D and 3D, "valid" or "same" padding."""

from __future__ import annotations

import torch
from torch import nn

from emseg.errors import ConfigError
from emseg.models.base import Padding, SegmentationModel, check_anisotropy, check_int
from emseg.models.blocks import (
    ConvBlock,
    ReceptiveField,
    center_crop,
    conv,
    conv_transpose,
    init_he,
    level_kernel,
    level_pool,
    max_pool,
)

__all__ = ["UNet"]


class UNet(SegmentationModel):
    """U-Net: a contracting and an expansive path joined by crop-and-concat skips.

    Each level of the contracting path is two 3x3 convolutions with ReLU, then 2x2 max pooling;
    channels double per level.  Each level of the expansive path is a 2x2 up-convolution that halves
    the channels, concatenation with the (centre-cropped) contracting feature map, and two 3x3
    convolutions.  A final 1x1 convolution maps to ``out_channels`` logits.  With
    ``padding="valid"``, ``depth=4`` and ``base_channels=64`` this is the paper's network: 23
    convolutional layers, a 572x572 input gives a 388x388 output.

    Parameters
    ----------
    ndim : {2, 3}
        Spatial axes: input ``(b, c, y, x)`` or ``(b, c, z, y, x)``.
    in_channels, out_channels : int
        Input channels; output logit channels.
    base_channels : int
        Channels of the first level (64 in the paper); level ``i`` has ``base_channels * 2**i``.
    depth : int
        Number of pooling steps (4 in the paper).
    padding : {"valid", "same"}
        "valid" (paper): unpadded convolutions, the output is the input's centre shrunk by ``context``.
        "same": zero-padded convolutions, the output has the input's shape.
    batch_norm : bool
        Batch normalisation after every 3x3 convolution (not in the paper).
    dropout : float
        Dropout probability at the end of the contracting path (the paper uses drop-out there).
    anisotropic_levels : int
        3D only: the first ``anisotropic_levels`` levels use ``(1, 3, 3)`` kernels and ``(1, 2, 2)``
        pooling, for EM volumes whose z spacing is coarser than their (y, x) spacing.

    Notes
    -----
    Weights use He initialisation, ``N(0, sqrt(2 / N))`` with ``N`` the incoming connections of one unit.
    """

    name = "unet"

    def __init__(
        self,
        *,
        ndim: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 64,
        depth: int = 4,
        padding: Padding = "valid",
        batch_norm: bool = False,
        dropout: float = 0.0,
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
                "dropout": dropout,
                "anisotropic_levels": anisotropic_levels,
            }
        )
        check_int(self.name, "base_channels", base_channels, 1)
        check_int(self.name, "depth", depth, 1)
        check_anisotropy(self.name, ndim, anisotropic_levels, depth)
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"{self.name}: dropout must be a probability in [0, 1), got {dropout!r}")
        self.depth = depth
        same = padding == "same"
        self._kernels = tuple(level_kernel(ndim, i < anisotropic_levels) for i in range(depth + 1))
        self._pools = tuple(level_pool(ndim, i < anisotropic_levels) for i in range(depth))
        ch = [base_channels * 2**i for i in range(depth + 1)]

        def double_conv(cin: int, cout: int, level: int) -> nn.Sequential:
            k = self._kernels[level]
            return nn.Sequential(
                ConvBlock(ndim, cin, cout, k, same=same, batch_norm=batch_norm),
                ConvBlock(ndim, cout, cout, k, same=same, batch_norm=batch_norm),
            )

        self.down = nn.ModuleList(
            double_conv(in_channels if i == 0 else ch[i - 1], ch[i], i) for i in range(depth)
        )
        self.pools = nn.ModuleList(max_pool(ndim, self._pools[i]) for i in range(depth))
        self.bottom = double_conv(ch[depth - 1], ch[depth], depth)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.ups = nn.ModuleList(
            conv_transpose(ndim, ch[i + 1], ch[i], self._pools[i], self._pools[i]) for i in range(depth)
        )
        self.up = nn.ModuleList(double_conv(2 * ch[i], ch[i], i) for i in range(depth))
        self.head = conv(ndim, ch[0], out_channels, (1,) * ndim, same=True)
        self.apply(init_he)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(b, out_channels, *output_shape(x.shape[2:]))``."""
        self._check_input(x)
        skips = []
        for down, pool in zip(self.down, self.pools, strict=True):
            x = down(x)
            skips.append(x)
            x = pool(x)
        x = self.dropout(self.bottom(x))
        for i in reversed(range(self.depth)):
            x = self.ups[i](x)
            x = self.up[i](torch.cat([center_crop(skips[i], x.shape[2:]), x], dim=1))
        out: torch.Tensor = self.head(x)
        return out

    def _axis_output(self, n: int, axis: int) -> int | None:
        if self.padding == "same":
            return super()._axis_output(n, axis)
        for i in range(self.depth):
            n -= 2 * (self._kernels[i][axis] - 1)
            f = self._pools[i][axis]
            if n < 1 or n % f:
                return None
            n //= f
        n -= 2 * (self._kernels[self.depth][axis] - 1)
        if n < 1:
            return None
        for i in reversed(range(self.depth)):
            n = n * self._pools[i][axis] - 2 * (self._kernels[i][axis] - 1)
            if n < 1:
                return None
        return n

    def _axis_receptive_field(self, axis: int) -> int:
        rf = ReceptiveField()
        for i in range(self.depth):
            rf.conv(self._kernels[i][axis], 2)
            rf.pool(self._pools[i][axis])
        rf.conv(self._kernels[self.depth][axis], 2)
        for i in reversed(range(self.depth)):
            rf.up(self._pools[i][axis])
            rf.conv(self._kernels[i][axis], 2)
        return rf.size
