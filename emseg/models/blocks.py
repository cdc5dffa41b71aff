"""Layers shared by the architectures: n-dimensional convolution blocks, initialisation, cropping.

Every helper takes ``ndim`` (2 or 3 spatial axes) so that one architecture definition serves 2D
``(b, c, y, x)`` and 3D ``(b, c, z, y, x)`` tensors.  Kernel and pooling shapes are tuples, one int per
spatial axis, so anisotropic EM levels use ``(1, 3, 3)`` kernels and ``(1, 2, 2)`` pooling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

Shape = tuple[int, ...]

__all__ = [
    "ConvBlock",
    "ReceptiveField",
    "norm_layer",
    "bilinear_kernel",
    "center_crop",
    "conv",
    "conv_transpose",
    "init_he",
    "level_kernel",
    "level_pool",
    "max_pool",
    "upsampler",
]


def level_kernel(ndim: int, anisotropic: bool) -> Shape:
    """Convolution kernel of one level: ``(1, 3, 3)`` on anisotropic 3D levels, else 3 per axis."""
    return (1, 3, 3) if anisotropic else (3,) * ndim


def level_pool(ndim: int, anisotropic: bool) -> Shape:
    """Pooling factor below one level: ``(1, 2, 2)`` on anisotropic 3D levels, else 2 per axis."""
    return (1, 2, 2) if anisotropic else (2,) * ndim


def conv(ndim: int, cin: int, cout: int, kernel: Shape, *, same: bool, bias: bool = True) -> nn.Module:
    """``Conv2d``/``Conv3d`` with ``kernel``; ``same=True`` zero-pads by ``k // 2`` (kernels are odd)."""
    # Any: torch types kernel and padding as tuples of exactly 2 (Conv2d) or 3 (Conv3d) ints
    cls: Any = nn.Conv2d if ndim == 2 else nn.Conv3d
    padding = tuple(k // 2 for k in kernel) if same else 0
    return cls(cin, cout, kernel, padding=padding, bias=bias)


def conv_transpose(ndim: int, cin: int, cout: int, kernel: Shape, stride: Shape, padding: Shape | int = 0) -> nn.Module:
    """``ConvTranspose2d``/``ConvTranspose3d``."""
    cls: Any = nn.ConvTranspose2d if ndim == 2 else nn.ConvTranspose3d  # as in conv()
    return cls(cin, cout, kernel, stride=stride, padding=padding)


def norm_layer(ndim: int, channels: int, enabled: bool = True) -> nn.Module:
    """``BatchNorm2d``/``BatchNorm3d`` over ``channels``, or ``Identity`` where not ``enabled``."""
    if not enabled:
        return nn.Identity()
    return nn.BatchNorm2d(channels) if ndim == 2 else nn.BatchNorm3d(channels)


def max_pool(ndim: int, factor: Shape) -> nn.Module:
    """Non-overlapping max pooling by ``factor`` per axis."""
    cls = nn.MaxPool2d if ndim == 2 else nn.MaxPool3d
    return cls(kernel_size=factor, stride=factor)


class ConvBlock(nn.Sequential):
    """Convolution, optional batch norm, ReLU.

    Parameters
    ----------
    ndim : int
        Spatial axes, 2 or 3.
    cin, cout : int
        Input and output channels.
    kernel : tuple of int
        Kernel size per spatial axis (odd).
    same : bool
        Zero-pad so the spatial shape is kept (``True``) or shrink by ``k - 1`` ("valid", ``False``).
    batch_norm : bool
        Insert ``BatchNorm`` between the convolution and the ReLU (the convolution then has no bias).
    relu : bool
        End with a ReLU (``False`` for the last convolution of a residual block, summed before the ReLU).
    """

    def __init__(
        self, ndim: int, cin: int, cout: int, kernel: Shape, *, same: bool, batch_norm: bool, relu: bool = True
    ) -> None:
        layers: list[nn.Module] = [conv(ndim, cin, cout, kernel, same=same, bias=not batch_norm)]
        if batch_norm:
            layers.append(norm_layer(ndim, cout))
        if relu:
            layers.append(nn.ReLU(inplace=True))  # its input is this block's own fresh tensor
        super().__init__(*layers)


def init_he(module: nn.Module) -> None:
    """He initialisation (He et al. 2015), as in the U-Net paper: weights ~ N(0, sqrt(2 / N)).

    ``N`` is the number of incoming connections of one output unit: ``cin * prod(kernel)`` for a
    convolution and ``cin * prod(kernel) / prod(stride)`` for a transposed convolution.  Biases are
    zero; batch-norm scales one and shifts zero.  Apply with ``model.apply(init_he)``.

    Parameters on the meta device (a model built only to count its parameters) have no values to
    set and are left alone: drawing on meta tensors would import torch's compiler stack.
    """
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_meta:
        return
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        fan_in = module.in_channels // module.groups * math.prod(module.kernel_size)
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_in))
    elif isinstance(module, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
        taps = max(1, math.prod(module.kernel_size) // math.prod(module.stride))
        fan_in = module.in_channels // module.groups * taps
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_in))
    elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
        return
    else:
        return
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def bilinear_kernel(factor: Shape) -> torch.Tensor:
    """Separable (bi/tri)linear interpolation kernel of size ``2 * f`` (1 where ``f == 1``) per axis."""
    weights = torch.ones(())
    for f in factor:
        size = 2 * f if f > 1 else 1
        centre = (size - 1) / 2
        line = torch.tensor([1.0 - abs(i - centre) / f for i in range(size)])
        weights = weights[..., None] * line
    return weights


def upsampler(ndim: int, channels: int, factor: Shape) -> nn.Module:
    """Learned upsampling by ``factor`` (transposed convolution), initialised to bilinear interpolation.

    Kernel ``2 f`` with stride ``f`` and padding ``f / 2`` maps ``n`` to exactly ``n * f`` (``f`` even or 1).
    Channel ``i`` maps to channel ``i`` only at initialisation.
    """
    kernel = tuple(2 * f if f > 1 else 1 for f in factor)
    padding = tuple(f // 2 if f > 1 else 0 for f in factor)
    layer = conv_transpose(ndim, channels, channels, kernel, factor, padding)
    with torch.no_grad():
        assert isinstance(layer.weight, torch.Tensor)
        layer.weight.zero_()
        for c in range(channels):
            layer.weight[c, c].copy_(bilinear_kernel(factor))
        if isinstance(layer.bias, torch.Tensor):
            layer.bias.zero_()
    return layer


def center_crop(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Crop the spatial axes of ``x`` (``b, c, *spatial``) to ``shape`` around the centre."""
    spatial = x.shape[2:]
    assert all(s >= t and (s - t) % 2 == 0 for s, t in zip(spatial, shape, strict=True)), (spatial, shape)
    index = tuple(slice((s - t) // 2, (s - t) // 2 + t) for s, t in zip(spatial, shape, strict=True))
    return x[(slice(None), slice(None), *index)]


class ReceptiveField:
    """Accumulates the theoretical receptive field along one axis of the deepest path.

    Standard recursion (Araujo et al. 2019, "Computing receptive fields of convolutional neural
    networks"): each layer adds ``(taps - 1) * jump``, where ``jump`` is the input-voxel spacing of the
    layer's input units and ``taps`` the number of input units one output unit reads.
    """

    def __init__(self) -> None:
        self.size = 1
        self.jump = 1

    def conv(self, kernel: int, repeat: int = 1) -> None:
        """``repeat`` stride-1 convolutions with ``kernel`` taps."""
        self.size += repeat * (kernel - 1) * self.jump

    def pool(self, factor: int) -> None:
        """Non-overlapping pooling (kernel == stride == ``factor``)."""
        self.size += (factor - 1) * self.jump
        self.jump *= factor

    def up(self, factor: int, kernel: int | None = None) -> None:
        """Transposed convolution with stride ``factor``; one output reads ``ceil(kernel / factor)`` inputs."""
        taps = -(-(kernel if kernel is not None else factor) // factor)
        self.size += (taps - 1) * self.jump
        self.jump //= factor
