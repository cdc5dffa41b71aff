"""Run configuration: the pipeline recipes ``emseg segment --pipeline`` takes.

A recipe is a TOML file in ``pipelines/``; CLI flags override single fields.  The resolved
configuration is written into the output's attributes so a result says how it was made.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from emseg.errors import ConfigError

ZYX = tuple[int, int, int]
PositiveVoxel = Annotated[float, Field(gt=0, allow_inf_nan=False)]
"""A voxel size along one axis, nanometres: positive and finite."""


class PredictOptions(BaseModel):
    """How the network runs over the volume."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None
    """Checkpoint directory; None uses the model bundled with emseg (a 2-D membrane U-Net)."""
    block_size: ZYX | None = None
    """Core shape of one block in voxels (z, y, x); default chosen from the model and the chunks."""
    batch_size: int | None = Field(default=None, ge=1)
    """Tiles per forward pass; default: about 1 Mvoxel of model input on a CPU, 8 on a GPU."""
    tta: bool = False
    """Average over flips (8x the compute in 2-D, 16x in 3-D)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Arithmetic on the device; auto: bf16 on GPUs and CPUs with native bf16 (AVX512-BF16, AMX), else fp32."""
    dtype: Literal["uint8", "float16"] = "uint8"
    """Stored prediction: probability x 255 as uint8, or float16."""


class LabelOptions(BaseModel):
    """How the membrane prediction becomes segments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["agglomerate", "cc", "watershed"] = "agglomerate"
    """``agglomerate``: watershed fragments, region graph and hierarchical agglomeration (the
    ``[agglomerate]`` section); ``watershed``: seeded watershed stitched across block faces;
    ``cc``: threshold + connected components."""
    mode: Literal["auto", "3d", "2d"] = "auto"
    """Label in 3-D, or each z-section on its own (anisotropic ssTEM); ``auto``: per section when
    the volume's z voxel size is at least 2.5x its y/x size, else 3-D."""
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    """Boundary probability below which a voxel is inside a cell."""
    connectivity: Literal[6, 26] = 6
    """Voxel neighbourhood of connected components (4/8 in 2-D mode)."""
    min_size: int = Field(default=0, ge=0)
    """Fragments smaller than this (voxels) are merged into a neighbour (watershed) or dropped (cc)."""
    block_size: ZYX | None = None
    """Core shape of one labelling block in voxels (z, y, x); default from the output chunks."""


class AgglomerateOptions(BaseModel):
    """Fragments -> region graph -> agglomeration (``label.method = "agglomerate"``).

    Threshold 0.8: one value that holds across the data we have, 2-D and 3-D, rather than the
    optimum of one set (adapted Rand error at 0.8 vs each set's own optimum: ISBI 2012 train 0-15
    0.049 vs 0.038 at 0.85; gala FIB-SEM train 0.103, its optimum; validation ISBI 16-19 0.041 and
    gala raveler 0.085, which were looked at when choosing it).  Tuned on ISBI 0-15 alone the rule
    "smallest threshold within 5% of the best" gives 0.84, which lies past a merge cliff on 16-19
    (0.119 there); below the optimum errors are splits, which are cheaper to proofread than merges.
    Fragment seeds 0.5 / 3 px; min_size 50 changed nothing but the fragment count.  See
    benchmarks/README_agglomeration.md.
    Recipes in ``pipelines/`` carry values tuned for their data.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float = Field(default=0.8, gt=0.0, lt=1.0)
    """Merge fragments whose edge score (``1 - mean affinity`` at the merge) is below this; written to
    ``labels/segments``."""
    thresholds: tuple[float, ...] = ()
    """Extra thresholds, each written to ``labels/segments_<t>`` (the graph is reused)."""
    score: Literal["hierarchical", "mean"] = "hierarchical"
    """``hierarchical``: waterz's mean-affinity merge score, decided per block plus context;
    ``mean``: the edge's own ``1 - mean affinity`` (exact on the graph)."""
    fragment_threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    """Boundary probability below which a voxel is interior (seeds of the fragments)."""
    seeds: Literal["distance", "minima"] = "distance"
    """Fragment seeds: maxima of the interior's distance transform, or minima of the boundary map."""
    min_distance: int = Field(default=3, ge=1)
    """Radius (voxels, finest axis) of the window in which a seed is a maximum."""
    min_size: int = Field(default=50, ge=0)
    """Fragments smaller than this (voxels) are merged into a neighbour."""
    context: ZYX | None = None
    """Voxels (z, y, x) added around a block for its hierarchical agglomeration; default half a
    block, at most 64 (0 along z per section)."""
    quantile: float | None = Field(default=None, ge=0.0, le=1.0)
    """Also store this quantile of each edge's contact affinities in the graph."""
    fragments: Literal["watershed", "mutex"] = "watershed"
    """Fragments by seeded watershed, or by mutex watershed of (long-range) affinities (the offsets
    recorded with the prediction's checkpoint)."""
    mutex_bias: float = Field(default=0.5, gt=0.0, lt=1.0)
    """Mutex watershed: nearest-neighbour affinities above this attract, below repel."""
    long_range_bias: float | None = Field(default=None, gt=0.0, lt=1.0)
    """Mutex watershed: the same for long-range offsets (default: ``mutex_bias``)."""


class PipelineConfig(BaseModel):
    """One ``pipelines/*.toml`` recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "default"
    """Short name of the recipe."""
    description: str = ""
    """What data the recipe is for and what it produces."""
    voxel_size: tuple[PositiveVoxel, PositiveVoxel, PositiveVoxel] | None = None
    """Voxel size (nm, z, y, x) the recipe expects; a warning is logged when the input differs."""
    predict: PredictOptions = PredictOptions()
    """Network inference."""
    label: LabelOptions = LabelOptions()
    """Post-processing into segments."""
    agglomerate: AgglomerateOptions = AgglomerateOptions()
    """Fragments, region graph and agglomeration (used when ``label.method = "agglomerate"``)."""


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
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
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
