"""UNet++ (Zhou, Siddiquee, Tajbakhsh & Liang 2018), 2D and 3D; "same" padding only."""

from __future__ import annotations

from typing import Literal

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
)

__all__ = ["UNetPlusPlus"]

Mode = Literal["accurate", "fast"]


class UNetPlusPlus(SegmentationModel):
    r"""UNet++: a U-Net whose skips are nested, dense convolution pathways, with deep supervision.

    Node :math:`X^{i,j}` (level ``i``, column ``j``) is two 3x3 convolutions (``H``) of

    * ``i``-th encoder level, :math:`X^{i,0} = H(\mathrm{pool}(X^{i-1,0}))`;
    * :math:`X^{i,j} = H([X^{i,0}, \dots, X^{i,j-1}, U(X^{i+1,j-1})])` for ``j >= 1``, where ``U`` is
      a transposed convolution.

    A 1x1 head on each of :math:`X^{0,1}, \dots, X^{0,depth}` gives deep supervision
    (:meth:`forward_heads`).  ``mode="accurate"`` returns the mean of the heads' logits;
    ``mode="fast"`` prunes the network to the nodes that :math:`X^{0,level}` needs (``i + j <= level``)
    and returns that one head: fewer parameters and FLOPs, and a smaller ``input_multiple``
    (``2**level``).  :meth:`prune` turns a trained accurate model into a fast one with the same weights,
    so ``model.prune(L)(x)`` equals ``model.forward_heads(x)[L - 1]``.

    UNet++ is naturally "same"-padded: output shape == input shape, context is zero.

    Parameters
    ----------
    ndim : {2, 3}
        Spatial axes.
    in_channels, out_channels : int
        Input channels; output logit channels.
    base_channels : int
        Channels at level 0 (32 in the paper), doubled per level.
    depth : int
        Pooling steps of the full model (4 in the paper).
    mode : {"accurate", "fast"}
        Average all heads, or keep only head ``level``.
    level : int or None
        Fast mode: the head to keep, ``1 <= level <= depth`` (default ``depth``).  Must be ``None``
        in accurate mode.
    padding : {"same"}
        Only "same" is supported.
    batch_norm : bool
        Batch normalisation after every 3x3 convolution.
    anisotropic_levels : int
        3D only: the first levels use ``(1, 3, 3)`` kernels and ``(1, 2, 2)`` pooling.
    """

    name = "unetpp"

    def __init__(
        self,
        *,
        ndim: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 32,
        depth: int = 4,
        mode: Mode = "accurate",
        level: int | None = None,
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
                "mode": mode,
                "level": level,
                "padding": padding,
                "batch_norm": batch_norm,
                "anisotropic_levels": anisotropic_levels,
            }
        )
        if padding != "same":
            raise ConfigError(f"{self.name}: only padding='same' is supported, got {padding!r}; use 'unet' for 'valid'")
        check_int(self.name, "base_channels", base_channels, 1)
        check_int(self.name, "depth", depth, 1)
        if mode == "accurate":
            if level is not None:
                raise ConfigError(f"{self.name}: level={level!r} selects a head in mode='fast'; leave it unset in 'accurate'")
            top = depth
        elif mode == "fast":
            top = depth if level is None else check_int(self.name, "level", level, 1)
            if top > depth:
                raise ConfigError(f"{self.name}: level must be between 1 and depth={depth}, got {level!r}")
        else:
            raise ConfigError(f"{self.name}: mode must be 'accurate' or 'fast', got {mode!r}")
        check_anisotropy(self.name, ndim, anisotropic_levels, depth)
        self.depth = depth
        self.mode: Mode = mode
        self.level = top
        self.heads_used = tuple(range(1, depth + 1)) if mode == "accurate" else (top,)
        self._kernels = tuple(level_kernel(ndim, i < anisotropic_levels) for i in range(top + 1))
        self._pools = tuple(level_pool(ndim, i < anisotropic_levels) for i in range(top))
        ch = [base_channels * 2**i for i in range(top + 1)]

        def node(cin: int, cout: int, i: int) -> nn.Sequential:
            k = self._kernels[i]
            return nn.Sequential(
                ConvBlock(ndim, cin, cout, k, same=True, batch_norm=batch_norm),
                ConvBlock(ndim, cout, cout, k, same=True, batch_norm=batch_norm),
            )

        # keys shared between accurate and fast models, so prune() can copy weights by name
        self.nodes = nn.ModuleDict()
        self.ups = nn.ModuleDict()
        for i in range(top + 1):
            cin = in_channels if i == 0 else ch[i - 1]
            self.nodes[f"x{i}_0"] = node(cin, ch[i], i)
        for j in range(1, top + 1):
            for i in range(top + 1 - j):
                self.ups[f"x{i + 1}_{j - 1}"] = conv_transpose(ndim, ch[i + 1], ch[i], self._pools[i], self._pools[i])
                self.nodes[f"x{i}_{j}"] = node((j + 1) * ch[i], ch[i], i)
        self.pools = nn.ModuleList(max_pool(ndim, p) for p in self._pools)
        self.heads = nn.ModuleDict(
            {f"x0_{j}": conv(ndim, ch[0], out_channels, (1,) * ndim, same=True) for j in self.heads_used}
        )
        self.apply(init_he)

    def forward_heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of each deep-supervision head, in order :math:`X^{0,1}, X^{0,2}, \\dots` (fast: one)."""
        self._check_input(x)
        top = self.level
        feats: dict[tuple[int, int], torch.Tensor] = {}
        for i in range(top + 1):
            inp = x if i == 0 else self.pools[i - 1](feats[i - 1, 0])
            feats[i, 0] = self.nodes[f"x{i}_0"](inp)
        for j in range(1, top + 1):
            for i in range(top + 1 - j):
                up = self.ups[f"x{i + 1}_{j - 1}"](feats[i + 1, j - 1])
                feats[i, j] = self.nodes[f"x{i}_{j}"](torch.cat([*(feats[i, k] for k in range(j)), up], dim=1))
        return [self.heads[f"x0_{j}"](feats[0, j]) for j in self.heads_used]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(b, out_channels, *x.shape[2:])``: the mean of the heads (fast mode: the one head)."""
        heads = self.forward_heads(x)
        if len(heads) == 1:
            return heads[0]
        return torch.stack(heads).mean(dim=0)

    def prune(self, level: int) -> UNetPlusPlus:
        """A fast-mode model keeping head ``level``, sharing this model's (copied) weights."""
        config = {k: v for k, v in self.config.items() if k != "name"}
        config.update(mode="fast", level=level)
        fast = UNetPlusPlus(**config)
        state = self.state_dict()
        fast.load_state_dict({k: state[k] for k in fast.state_dict()})
        return fast.train(self.training)

    def _axis_receptive_field(self, axis: int) -> int:
        # the deepest path, X^{top,0} up to X^{0,top}, is a U-Net of depth `top`
        rf = ReceptiveField()
        for i in range(self.level):
            rf.conv(self._kernels[i][axis], 2)
            rf.pool(self._pools[i][axis])
        rf.conv(self._kernels[self.level][axis], 2)
        for i in reversed(range(self.level)):
            rf.up(self._pools[i][axis])
            rf.conv(self._kernels[i][axis], 2)
        return rf.size
