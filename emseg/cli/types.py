"""Click parameter types shared by the commands."""

from __future__ import annotations

import math
from typing import Any

import click


class ZYX(click.ParamType):
    """A vector such as ``64,256,256`` (z, y, x); with ``axes=3`` a single value stands for all three.

    Malformed lists (wrong count, not numbers, NaN/inf, below the minimum) are usage errors naming
    the option: ``Error: Invalid value for '--block-size': expected 3 comma-separated values ...``.
    """

    name = "Z,Y,X"

    def __init__(self, kind: type = int, *, minimum: float | None = None, name: str = "Z,Y,X",
                 axes: int | None = None) -> None:
        self.kind = kind
        self.minimum = minimum
        self.name = name
        self.axes = axes  # exactly this many values (or one, repeated for every axis); None: any number

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[Any, ...]:
        if isinstance(value, tuple):
            return value
        try:
            pieces = str(value).replace("x", ",").split(",")
            if any(not v.strip() for v in pieces):
                raise ValueError(value)
            parts = tuple(self.kind(v) for v in pieces)
        except ValueError:
            self.fail(f"expected comma-separated {self.kind.__name__}s like 64,256,256, got {value!r}", param, ctx)
        if not parts:
            self.fail(f"expected comma-separated {self.kind.__name__}s like 64,256,256, got {value!r}", param, ctx)
        if any(not math.isfinite(p) for p in parts):
            self.fail(f"every value must be a finite number, got {value!r}", param, ctx)
        if any(not math.isfinite(p) for p in parts):
            self.fail(f"every value must be a finite number, got {value!r}", param, ctx)
        if self.axes is not None and len(parts) not in (1, self.axes):
            self.fail(f"expected {self.axes} comma-separated values {self.name} (or one for every axis), "
                      f"got {len(parts)}: {value!r}", param, ctx)
        if self.axes is not None and len(parts) == 1:
            parts = parts * self.axes
        if self.minimum is None and any(p <= 0 for p in parts):
            self.fail(f"every value must be positive, got {value!r}", param, ctx)
        if self.minimum is not None and any(p < self.minimum for p in parts):
            self.fail(f"every value must be at least {self.minimum}, got {value!r}", param, ctx)
        return parts


INT_ZYX = ZYX(int, axes=3)  # z, y, x: three values, or one for all three
FLOAT_ZYX = ZYX(float, axes=3)
SIZES = ZYX(int, name="N[,N[,N]]")  # one value per spatial axis of a 2-D or 3-D model
INDEX_LIST = ZYX(int, minimum=0, name="I,J,...")
