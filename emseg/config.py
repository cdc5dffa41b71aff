"""Run configuration: the pipeline recipes ``emseg segment --pipeline`` takes.

A recipe is a TOML file in ``pipelines/``; CLI flags override single fields.  The resolved
configuration is written into the output's attributes so a result says how it was made.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from emseg.errors import ConfigError

ZYX = tuple[int, int, int]


class PredictOptions(BaseModel):
    """How the network runs over the volume."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None
    """Checkpoint directory; None uses the model bundled with emseg (a 2-D membrane U-Net)."""
    block_size: ZYX | None = None
    """Core shape of one block in voxels (z, y, x); default chosen from the model and the chunks."""
    batch_size: int = Field(default=4, ge=1)
    """Tiles per forward pass."""
    tta: bool = False
    """Average over flips (8x the compute in 2-D, 16x in 3-D)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Arithmetic on the device (bf16/fp16 are for GPUs)."""
    dtype: Literal["uint8", "float16"] = "uint8"
    """Stored prediction: probability x 255 as uint8, or float16."""


class LabelOptions(BaseModel):
    """How the membrane prediction becomes segments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["cc", "watershed"] = "watershed"
    """Threshold + connected components, or seeded watershed of the boundary map."""
    mode: Literal["3d", "2d"] = "3d"
    """Label in 3-D, or each z-section on its own (anisotropic ssTEM)."""
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    """Boundary probability below which a voxel is inside a cell."""
    connectivity: Literal[6, 26] = 6
    """Voxel neighbourhood of connected components (4/8 in 2-D mode)."""
    min_size: int = Field(default=0, ge=0)
    """Fragments smaller than this (voxels) are merged into a neighbour (watershed) or dropped (cc)."""
    block_size: ZYX | None = None
    """Core shape of one labelling block in voxels (z, y, x); default from the output chunks."""


class PipelineConfig(BaseModel):
    """One ``pipelines/*.toml`` recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "default"
    """Short name of the recipe."""
    description: str = ""
    """What data the recipe is for and what it produces."""
    voxel_size: tuple[float, float, float] | None = None
    """Voxel size (nm, z, y, x) the recipe expects; a warning is logged when the input differs."""
    predict: PredictOptions = PredictOptions()
    """Network inference."""
    label: LabelOptions = LabelOptions()
    """Post-processing into segments."""


def load_pipeline(path: str | os.PathLike[str] | None, overrides: dict[str, dict[str, Any]] | None = None) -> PipelineConfig:
    """Read a recipe (or the defaults when ``path`` is None) and apply per-section overrides.

    ``overrides`` is ``{"predict": {"batch_size": 8}, "label": {...}}``; None values are ignored,
    so unset CLI flags keep the recipe's values.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--pipeline {path}: no such recipe file")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from e
    for section, values in (overrides or {}).items():
        merged = dict(data.get(section, {}))
        merged.update({k: v for k, v in values.items() if v is not None})
        data[section] = merged
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{path or 'pipeline options'}: {where}: {err['msg']}") from e
