"""Click parameter types shared by the commands."""

from __future__ import annotations

import math
from typing import Any

import click


class ZYX(click.ParamType):
    """A vector such as ``64,256,256`` (z, y, x) or a single value broadcast later; ints or floats."""

    name = "Z,Y,X"

    def __init__(self, kind: type = int, *, minimum: float | None = None, name: str = "Z,Y,X") -> None:
        self.kind = kind
        self.minimum = minimum
        self.name = name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[Any, ...]:
        if isinstance(value, tuple):
            return value
        try:
            parts = tuple(self.kind(v) for v in str(value).replace("x", ",").split(",") if v.strip())
        except ValueError:
            self.fail(f"expected comma-separated {self.kind.__name__}s like 64,256,256, got {value!r}", param, ctx)
        if not parts:
            self.fail(f"expected comma-separated {self.kind.__name__}s like 64,256,256, got {value!r}", param, ctx)
        if any(not math.isfinite(p) for p in parts):
            self.fail(f"every value must be a finite number, got {value!r}", param, ctx)
        if self.minimum is None and any(p <= 0 for p in parts):
            self.fail(f"every value must be positive, got {value!r}", param, ctx)
        if self.minimum is not None and any(p < self.minimum for p in parts):
            self.fail(f"every value must be at least {self.minimum}, got {value!r}", param, ctx)
        return parts


INT_ZYX = ZYX(int)
FLOAT_ZYX = ZYX(float)
INDEX_LIST = ZYX(int, minimum=0, name="I,J,...")
