"""The contract every architecture fulfils: ``SegmentationModel`` and its geometry (``ModelSpec``).

A model declares its shape constraints instead of leaving them to the caller:

* ``input_multiple``: valid input sizes along an axis are spaced by this (the product of the pooling
  factors; 1 on axes that are never pooled).
* ``min_input_shape``, ``valid_input_shape(at_least)``, ``output_shape(input_shape)``.
* ``context``: per axis, ``(input - output) / 2`` for "valid" padding, 0 for "same".
* ``receptive_field``: per axis, the theoretical receptive field of one output voxel.
* ``halo``: what the inference adds on each side of a block: ``context`` for "valid" models,
  ``ceil(receptive_field / 2)`` for "same" models.

Tiling a "valid" model with ``halo = context`` is exact when the tiles' offsets are multiples of
``input_multiple``: the model is translation-equivariant only for such shifts (max-pooling phase).
Axis order is ``(z, y, x)`` in 3D and ``(y, x)`` in 2D; tensors are ``(b, c, [z,] y, x)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from emseg.errors import ConfigError, GeometryError

Padding = Literal["valid", "same"]
Shape = tuple[int, ...]

__all__ = ["ModelSpec", "Padding", "SegmentationModel"]

# valid sizes are searched up to this many voxels per axis
_SEARCH_LIMIT = 1 << 16


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model's geometry and size, as printed by ``emseg models``.

    Attributes
    ----------
    name : str
        Registry name (``MODELS`` key).
    ndim : int
        Spatial axes, 2 ``(y, x)`` or 3 ``(z, y, x)``.
    padding : {"valid", "same"}
        Convolution padding.
    parameters : int
        Number of trainable scalars.
    receptive_field : tuple of int
        Theoretical receptive field per axis, in voxels.
    input_multiple : tuple of int
        Valid input sizes are spaced by this, per axis.
    context : tuple of int
        ``(input - output) / 2`` per axis (0 for "same").
    halo : tuple of int
        Halo the inference adds on each side of a block, per axis, in voxels.
    min_input_shape : tuple of int
        Smallest valid input, per axis.
    input_shape : tuple of int
        Smallest valid input >= the requested one.
    output_shape : tuple of int
        Output shape for ``input_shape``.
    """

    name: str
    ndim: int
    padding: Padding
    parameters: int
    receptive_field: Shape
    input_multiple: Shape
    context: Shape
    halo: Shape
    min_input_shape: Shape
    input_shape: Shape
    output_shape: Shape


class SegmentationModel(nn.Module):
    """Base class of every architecture in :data:`emseg.models.MODELS`.

    Subclasses set ``name``, call ``super().__init__(config)`` with their complete keyword arguments,
    set ``_pools`` (the pooling factor below each level, one tuple per level) and implement
    ``forward``, ``_axis_receptive_field`` and, for "valid" padding, ``_axis_output``.

    Attributes
    ----------
    ndim : int
        Spatial axes: 2 (input ``(b, c, y, x)``) or 3 (input ``(b, c, z, y, x)``).
    in_channels, out_channels : int
        Input channels and output channels (logits, one per output class/map).
    padding : {"valid", "same"}
        "valid" shrinks the output by ``context`` on each side; "same" keeps the input shape.
    """

    name: ClassVar[str] = ""
    ndim: int
    in_channels: int
    out_channels: int
    padding: Padding
    _pools: tuple[Shape, ...]

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        self._config: dict[str, Any] = {"name": self.name, **config}
        ndim = config["ndim"]
        if ndim not in (2, 3):
            raise ConfigError(f"{self.name}: ndim must be 2 (y, x) or 3 (z, y, x), got {ndim!r}")
        for key in ("in_channels", "out_channels"):
            value = config[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{self.name}: {key} must be a positive int, got {value!r}")
        padding = config.get("padding", "same")
        if padding not in ("valid", "same"):
            raise ConfigError(f"{self.name}: padding must be 'valid' or 'same', got {padding!r}")
        self.ndim = ndim
        self.in_channels = config["in_channels"]
        self.out_channels = config["out_channels"]
        self.padding = padding

    # ------------------------------------------------------------------ config
    @property
    def config(self) -> dict[str, Any]:
        """JSON-able keyword arguments, with ``"name"``, such that ``build(**config)`` rebuilds the model."""
        return copy.deepcopy(self._config)

    # ---------------------------------------------------------------- geometry
    @property
    def input_multiple(self) -> Shape:
        """Per axis, the spacing of valid input sizes: the product of the pooling factors."""
        return tuple(math.prod(p[a] for p in self._pools) for a in range(self.ndim))

    @property
    def min_input_shape(self) -> Shape:
        """Smallest valid input shape, per axis."""
        return tuple(self._first_valid(1, a) for a in range(self.ndim))

    def output_shape(self, input_shape: Sequence[int]) -> Shape:
        """Output spatial shape for a spatial ``input_shape``.

        Raises
        ------
        GeometryError
            If ``input_shape`` has the wrong length or is not a valid input size; the message names
            the nearest valid sizes.
        """
        shape = self._as_shape(input_shape)
        out = []
        for axis, n in enumerate(shape):
            m = self._axis_output(n, axis)
            if m is None:
                lower = [k for k in range(n - 1, 0, -1) if self._axis_output(k, axis) is not None][:1]
                upper = self._first_valid(n, axis)
                nearest = " or ".join(str(v) for v in [*lower, upper])
                raise GeometryError(
                    f"{self.name}: input shape {shape} is not valid: size {n} along axis {axis} "
                    f"(valid sizes are spaced by {self.input_multiple[axis]}, the smallest is "
                    f"{self.min_input_shape[axis]}); use {nearest} (see valid_input_shape())"
                )
            out.append(m)
        return tuple(out)

    def valid_input_shape(self, at_least: Sequence[int]) -> Shape:
        """Smallest valid input shape that is ``>= at_least`` on every axis."""
        shape = self._as_shape(at_least)
        return tuple(self._first_valid(n, a) for a, n in enumerate(shape))

    @property
    def context(self) -> Shape:
        """Per axis, ``(input - output) / 2`` for "valid" padding; zeros for "same" padding."""
        if self.padding == "same":
            return (0,) * self.ndim
        inp = self.min_input_shape
        out = self.output_shape(inp)
        assert all((i - o) % 2 == 0 for i, o in zip(inp, out, strict=True))
        return tuple((i - o) // 2 for i, o in zip(inp, out, strict=True))

    @property
    def receptive_field(self) -> Shape:
        """Per axis, the theoretical receptive field of one output voxel, in input voxels.

        Computed with the standard recursion along the deepest path (input -> bottleneck -> output).
        Skip connections that join at another max-pool phase can widen the measured support a little
        beyond it (a depth-3 valid U-Net reads up to 100 voxels where this says 96; depth 1 and 2 are
        exact).  Tiling "valid" models uses ``context``, which is exact for aligned tiles.
        """
        return tuple(self._axis_receptive_field(a) for a in range(self.ndim))

    @property
    def halo(self) -> Shape:
        """Halo for blockwise inference: ``context`` ("valid") or ``ceil(receptive_field / 2)`` ("same")."""
        if self.padding == "valid":
            return self.context
        return tuple(-(-r // 2) for r in self.receptive_field)

    def spec(self, input_shape: Sequence[int] | None = None) -> ModelSpec:
        """Geometry summary; ``input_shape`` is rounded up to a valid shape (default: the smallest)."""
        inp = self.min_input_shape if input_shape is None else self.valid_input_shape(input_shape)
        return ModelSpec(
            name=self.name,
            ndim=self.ndim,
            padding=self.padding,
            parameters=sum(p.numel() for p in self.parameters() if p.requires_grad),
            receptive_field=self.receptive_field,
            input_multiple=self.input_multiple,
            context=self.context,
            halo=self.halo,
            min_input_shape=self.min_input_shape,
            input_shape=inp,
            output_shape=self.output_shape(inp),
        )

    # ------------------------------------------------------------ for subclasses
    def _axis_output(self, n: int, axis: int) -> int | None:
        """Output size along ``axis`` for input size ``n``, or ``None`` where ``n`` is invalid.

        The default serves "same"-padded encoder-decoders: sizes must be positive multiples of
        ``input_multiple``, and the output keeps the input size.
        """
        m = self.input_multiple[axis]
        return n if n >= m and n % m == 0 else None

    def _axis_receptive_field(self, axis: int) -> int:
        raise NotImplementedError

    def _check_input(self, x: torch.Tensor) -> None:
        """Raise ``GeometryError`` unless ``x`` is ``(b, in_channels, *valid spatial shape)``."""
        if x.dim() != self.ndim + 2 or x.shape[1] != self.in_channels:
            axes = "(b, c, y, x)" if self.ndim == 2 else "(b, c, z, y, x)"
            raise GeometryError(
                f"{self.name}: expected a tensor {axes} with c={self.in_channels}, got shape {tuple(x.shape)}"
            )
        self.output_shape(tuple(x.shape[2:]))

    def _as_shape(self, shape: Sequence[int]) -> Shape:
        values = tuple(int(v) for v in shape)
        if len(values) != self.ndim:
            raise GeometryError(f"{self.name}: expected {self.ndim} spatial sizes, got {len(values)}: {values}")
        if any(v < 1 for v in values):
            raise GeometryError(f"{self.name}: spatial sizes must be positive, got {values}")
        return values

    def _first_valid(self, start: int, axis: int) -> int:
        for n in range(max(1, start), _SEARCH_LIMIT):
            if self._axis_output(n, axis) is not None:
                return n
        raise GeometryError(f"{self.name}: no valid input size >= {start} along axis {axis} below {_SEARCH_LIMIT}")


def check_int(name: str, key: str, value: object, minimum: int) -> int:
    """Return ``value`` if it is an int ``>= minimum``, else raise ``ConfigError``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name}: {key} must be an int >= {minimum}, got {value!r}")
    return value


def check_anisotropy(name: str, ndim: int, anisotropic_levels: int, levels: int) -> int:
    """Validate ``anisotropic_levels``: 3D only, at most the number of pooling ``levels``."""
    check_int(name, "anisotropic_levels", anisotropic_levels, 0)
    if anisotropic_levels and ndim != 3:
        raise ConfigError(f"{name}: anisotropic_levels needs ndim=3 (z is the anisotropic axis), got ndim={ndim}")
    if anisotropic_levels > levels:
        raise ConfigError(f"{name}: anisotropic_levels={anisotropic_levels} exceeds the {levels} pooling levels")
    return anisotropic_levels
