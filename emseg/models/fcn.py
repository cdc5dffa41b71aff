"""FCN-8s (Long, Shelhamer & Darrell 2015), 2D and 3D; "same" padding only."""

from __future__ import annotations

from torch import Tensor, nn

from emseg.errors import ConfigError
from emseg.models.base import Padding, SegmentationModel, check_anisotropy, check_int
from emseg.models.blocks import (
    ConvBlock,
    ReceptiveField,
    conv,
    init_he,
    level_kernel,
    level_pool,
    max_pool,
    upsampler,
)

__all__ = ["FCN"]

# VGG-16: convolutions per level, five levels each ending in 2x pooling (strides 2 .. 32)
_VGG_CONVS = (2, 2, 3, 3, 3)
_LEVELS = len(_VGG_CONVS)


class FCN(SegmentationModel):
    """FCN-8s: a fully convolutional VGG-style encoder with learned upsampling and skip fusion.

    Five levels of 3x3 convolutions (2, 2, 3, 3, 3 of them) each followed by 2x max pooling (stride
    32 at the bottom), then two convolutions in place of VGG's fully connected layers and a 1x1 class
    score.  The stride-32 scores are upsampled 2x by a transposed convolution and summed with a 1x1
    score of the stride-16 pooling output, upsampled 2x again and summed with a score of the stride-8
    pooling output, then upsampled 8x to the input resolution.  Every upsampling is a learned
    transposed convolution initialised to bilinear interpolation; the skip scores start at zero, as in
    the paper.

    FCN is naturally "same"-padded (zero-padded convolutions instead of the paper's 100-pixel pad and
    crop): output shape == input shape for inputs that are multiples of ``input_multiple`` (32 per
    pooled axis), and context is zero.

    Parameters
    ----------
    ndim : {2, 3}
        Spatial axes.
    in_channels, out_channels : int
        Input channels; output logit (class) channels.
    base_channels : int
        Channels of the first level (64 in VGG-16), doubled per level up to ``8 * base_channels``.
    fc_channels : int or None
        Channels of the two "fully connected" convolutions (4096 in the paper); default
        ``16 * base_channels``.
    padding : {"same"}
        Only "same" is supported.
    batch_norm : bool
        Batch normalisation after the 3x3 convolutions (not in the paper).
    dropout : float
        Dropout after each "fully connected" convolution (0.5 in the paper).
    anisotropic_levels : int
        3D only: the first levels (at most 5) use ``(1, 3, 3)`` kernels and ``(1, 2, 2)`` pooling.
    """

    name = "fcn"

    def __init__(
        self,
        *,
        ndim: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 64,
        fc_channels: int | None = None,
        padding: Padding = "same",
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
                "fc_channels": fc_channels,
                "padding": padding,
                "batch_norm": batch_norm,
                "dropout": dropout,
                "anisotropic_levels": anisotropic_levels,
            }
        )
        if padding != "same":
            raise ConfigError(f"{self.name}: only padding='same' is supported, got {padding!r}; use 'unet' for 'valid'")
        check_int(self.name, "base_channels", base_channels, 1)
        fc = 16 * base_channels if fc_channels is None else check_int(self.name, "fc_channels", fc_channels, 1)
        check_anisotropy(self.name, ndim, anisotropic_levels, _LEVELS)
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"{self.name}: dropout must be a probability in [0, 1), got {dropout!r}")
        self._kernels = tuple(level_kernel(ndim, i < anisotropic_levels) for i in range(_LEVELS + 1))
        self._pools = tuple(level_pool(ndim, i < anisotropic_levels) for i in range(_LEVELS))
        ch = [base_channels * 2 ** min(i, 3) for i in range(_LEVELS)]
        levels: list[nn.Module] = []
        cin = in_channels
        for i, n in enumerate(_VGG_CONVS):
            layers: list[nn.Module] = []
            for _ in range(n):
                layers.append(ConvBlock(ndim, cin, ch[i], self._kernels[i], same=True, batch_norm=batch_norm))
                cin = ch[i]
            layers.append(max_pool(ndim, self._pools[i]))
            levels.append(nn.Sequential(*layers))
        self.levels = nn.ModuleList(levels)
        self.fc = nn.Sequential(
            conv(ndim, ch[-1], fc, self._kernels[_LEVELS], same=True),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            conv(ndim, fc, fc, (1,) * ndim, same=True),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
        )
        one = (1,) * ndim
        self.score_fr = conv(ndim, fc, out_channels, one, same=True)
        self.score_pool4 = conv(ndim, ch[3], out_channels, one, same=True)
        self.score_pool3 = conv(ndim, ch[2], out_channels, one, same=True)
        self.apply(init_he)
        for layer in (self.score_pool4, self.score_pool3):
            assert isinstance(layer.weight, nn.Parameter) and isinstance(layer.bias, nn.Parameter)
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self._up8 = tuple(a * b * c for a, b, c in zip(*self._pools[:3], strict=True))
        self.upscore2 = upsampler(ndim, out_channels, self._pools[4])
        self.upscore_pool4 = upsampler(ndim, out_channels, self._pools[3])
        self.upscore8 = upsampler(ndim, out_channels, self._up8)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(b, out_channels, *x.shape[2:])``."""
        self._check_input(x)
        pooled = []
        for level in self.levels:
            x = level(x)
            pooled.append(x)
        score = self.upscore2(self.score_fr(self.fc(x)))  # stride 16
        score = self.upscore_pool4(score + self.score_pool4(pooled[3]))  # stride 8
        out: Tensor = self.upscore8(score + self.score_pool3(pooled[2]))
        return out

    def _axis_receptive_field(self, axis: int) -> int:
        rf = ReceptiveField()
        for i, n in enumerate(_VGG_CONVS):
            rf.conv(self._kernels[i][axis], n)
            rf.pool(self._pools[i][axis])
        rf.conv(self._kernels[_LEVELS][axis])
        for f in (self._pools[4][axis], self._pools[3][axis], self._up8[axis]):
            rf.up(f, 2 * f if f > 1 else 1)
        return rf.size
