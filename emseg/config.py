"""Run options: one typed, frozen model per stage, and the pipeline recipes ``emseg segment --pipeline`` takes.

Every option of a stage is declared once, here, with its type, default and doc:

* the command line derives its flags from the fields (:func:`emseg.cli.options.option_flags`),
* a recipe (``pipelines/*.toml``) is validated against them (:func:`load_pipeline`),
* the Python API (``emseg.predict``, :func:`emseg.workflows.predict.predict`, :func:`emseg.workflows.label.label`, ...)
  takes the fields as keyword arguments (or a ready model) and builds the model with
  :meth:`Options.build`,
* the workers receive the resolved model by value, and a stage's resume fingerprint is the
  resolved model's dump (:meth:`Options.fingerprint`).

Adding an option to a stage is one field here; its CLI flag, recipe key and keyword follow.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import AfterValidator, AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.json_schema import JsonDict

from emseg.errors import ConfigError


def _broadcast(value: Any) -> Any:
    """One number stands for every axis (``block_size=64`` is ``(64, 64, 64)``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (value, value, value)
    return value


def _path_str(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


ZYX = tuple[int, int, int]
Shape = Annotated[tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]],
                  BeforeValidator(_broadcast)]
"""A positive extent in voxels (z, y, x); one number stands for all three axes."""
Margin = Annotated[tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]],
                   BeforeValidator(_broadcast)]
"""A non-negative margin in voxels (z, y, x); one number stands for all three axes."""
PathStr = Annotated[str, BeforeValidator(_path_str)]


def _merge_threshold(value: float) -> float:
    if not 0.0 < value < 1.0:
        raise ValueError(f"agglomeration thresholds must lie in (0, 1) (1 - mean affinity), got {value:g}")
    return value


MergeThreshold = Annotated[float, AfterValidator(_merge_threshold)]
"""An agglomeration threshold: an edge score ``1 - mean affinity`` in (0, 1)."""
PositiveVoxel = Annotated[float, Field(gt=0, allow_inf_nan=False)]
"""A voxel size along one axis, nanometres: positive and finite."""

NOT_FINGERPRINTED: JsonDict = {"fingerprint": False}
"""``json_schema_extra`` of a field that does not change the output (left out of the resume fingerprint)."""


class Options(BaseModel):
    """Base of the per-stage option models: frozen, unknown keys refused, field docs from docstrings."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, populate_by_name=True)

    @classmethod
    def build(cls, options: Options | None = None, /, **fields: Any) -> Self:
        """``options`` (default: the defaults) with ``fields`` replaced; ``None`` values are ignored.

        This is how the library functions take their options: ``predict(..., batch_size=8)`` and
        ``predict(..., PredictOptions(batch_size=8))`` are the same.

        Raises
        ------
        ConfigError
            An unknown option or a value out of range, named as on the command line (``--batch-size``).
        """
        data: dict[str, Any] = options.model_dump() if options is not None else {}
        names = cls._alias_names()  # checkpoint= replaces the model's "model", not a second key beside it
        data.update({names.get(k, k): v for k, v in fields.items() if v is not None})
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(describe_error(e, flags=True)) from e

    @classmethod
    def _alias_names(cls) -> dict[str, str]:
        """Other accepted names of fields (``checkpoint`` for ``model``) -> the field's name."""
        return {alias: name for name, f in cls.model_fields.items() if isinstance(f.validation_alias, AliasChoices)
                for alias in f.validation_alias.choices if isinstance(alias, str)}

    def fingerprint(self, *names: str) -> dict[str, Any]:
        """The fields that determine the output (JSON values): part of the stage's resume ``params``.

        ``names``: only these fields, for a stage that depends on some of the options alone (the
        region graph on ``context`` and ``quantile`` of :class:`AgglomerateOptions`).
        """
        fields = type(self).model_fields
        unknown = set(names) - set(fields)
        if unknown:
            raise KeyError(f"{type(self).__name__} has no fields {sorted(unknown)}")
        keep = set(names) or {name for name, f in fields.items() if f.json_schema_extra != NOT_FINGERPRINTED}
        return self.model_dump(mode="json", include=keep)


def describe_error(error: ValidationError, *, flags: bool = False, where: str = "") -> str:
    """One line for the first error: the option (``--batch-size`` when ``flags``, else ``a.b``), what was wrong."""
    err = error.errors()[0]
    loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
    name = "--" + loc[-1].replace("_", "-") if flags and loc else ".".join(loc)
    ctx = err.get("ctx", {})
    kind = err["type"]
    if kind == "extra_forbidden":
        text = f"{name}: Extra inputs are not permitted (unknown option {loc[-1] if loc else ''!r})"
    elif kind == "literal_error":
        text = f"{name} must be one of {ctx.get('expected')}, got {err['input']!r}"
    elif kind == "greater_than_equal":
        text = f"{name} must be at least {ctx.get('ge')}, got {err['input']!r}"
    elif kind == "less_than_equal":
        text = f"{name} must be at most {ctx.get('le')}, got {err['input']!r}"
    elif kind in ("greater_than", "less_than"):
        bound = f"greater than {ctx.get('gt')}" if kind == "greater_than" else f"less than {ctx.get('lt')}"
        text = f"{name} must be {bound}, got {err['input']!r}"
    elif kind == "value_error":
        text = f"{name}: {ctx.get('error')}"
    else:
        text = f"{name}: {err['msg']}, got {err['input']!r}"
    return f"{where}: {text}" if where else text


# ---------------------------------------------------------------------------------------------
# run: where the blocks go and what happens to an existing output


class RunOptions(Options):
    """How a blockwise run is carried out (every blockwise command and library function): the cluster
    and what to do with an existing output.  None of them changes the output, so none is part of a
    resume fingerprint; the library functions take them as ``run=RunOptions(...)`` or as keywords
    (``predict(..., overwrite=True)``)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    cluster: PathStr | None = None
    """Cluster profile (local, local-gpu, slurm) or a profile YAML file  [default: local]."""
    scheduler: str | None = None
    """Address of a running Dask scheduler to use instead."""
    workers: int | None = Field(default=None, ge=1)
    """Local worker processes  [default: one per GPU, else one per core (memory permitting)]."""
    devices: tuple[int, ...] | None = None
    """GPU indices to use (one worker each)."""
    overwrite: bool = False
    """Replace an output made with other parameters (otherwise a rerun resumes)."""
    progress: bool = True
    """Progress bars on stderr."""
    overlap: bool = True
    """emseg segment: start each block's fragments as soon as the prediction blocks it reads are written,
    beside the prediction, instead of after all of it (same output)."""
    client: Any = None
    """An open cluster to run on instead (an emseg.cluster.Connection or a distributed.Client), e.g. to chain
    stages on one cluster; Python only.  Given, the cluster options above are not used."""

    @classmethod
    def build(cls, options: Options | None = None, /, **fields: Any) -> Self:
        """As :meth:`Options.build`, keeping ``client`` as it is (never dumped or copied)."""
        base = options if isinstance(options, cls) else cls()
        data = {name: getattr(base, name) for name in cls.model_fields}
        data.update({k: v for k, v in fields.items() if v is not None})
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(describe_error(e, flags=True)) from e

    @classmethod
    def take(cls, run: RunOptions | None, fields: dict[str, Any]) -> Self:
        """``run`` with the run options among a function's keywords ``fields`` (removed from it)."""
        return cls.build(run, **{k: fields.pop(k) for k in list(fields) if k in cls.model_fields})

    @property
    def where(self) -> dict[str, Any]:
        """The keywords of :func:`emseg.cluster.connect`: cluster, scheduler, workers, devices, client."""
        return {"cluster": self.cluster, "scheduler": self.scheduler, "workers": self.workers,
                "devices": self.devices, "client": self.client}


# ---------------------------------------------------------------------------------------------
# predict


class PredictOptions(Options):
    """How the network runs over the volume (``emseg predict``, the ``[predict]`` recipe section)."""

    model: PathStr | None = Field(default=None, validation_alias=AliasChoices("model", "checkpoint"),
                                  json_schema_extra=NOT_FINGERPRINTED)
    """Checkpoint directory (model.safetensors + config.json); default: the bundled model chosen by the
    volume's voxel size (2-D ssTEM membrane U-Net, or 3-D FIB-SEM affinity U-Net)."""
    block_size: Shape | None = Field(default=None, json_schema_extra=NOT_FINGERPRINTED)
    """Block core Z,Y,X in voxels: a multiple of the output chunks and of the tile; default 64,256,256 for
    3-D models, 4,512,512 for 2-D (rounded up to the tile; deeper, up to the input's z-chunk depth, while
    the volume keeps 32 blocks, so that each input chunk is decompressed once)."""
    downsample: int | None = Field(default=None, ge=1)
    """In-plane factor: the input is mean-downsampled by it in y and x before the model runs, and the
    prediction repeated back to the input's voxels (block, chunk, tile and halo sizes stay in the input's
    voxels; blocks and chunks a multiple of the factor in y and x); default: the
    model's ``run_voxel_size_nm`` over the volume's y/x voxel size, rounded, at least 1 (1 when either
    is unknown)."""
    tile_size: Shape | None = None
    """Tile core Z,Y,X fed to the model (rounded up to its input multiple); default 64,64,64 for 3-D models,
    1,512,512 for 2-D on a CPU, 1,1024,1024 on a GPU."""
    halo: Margin | None = None
    """Context Z,Y,X around each tile, 'same'-padded models only; default from the model's receptive field
    (smaller values blend tiles with a Gaussian)."""
    chunks: Shape | None = None
    """Output chunk shape Z,Y,X; default 64,128,128 (3-D models) or 4,256,256 (2-D), dividing the block."""
    batch_size: int | None = Field(default=None, ge=1)
    """Tiles per forward pass; default about 0.4 Mvoxel of model input on a CPU (one 2-D tile), 8 Mvoxel on a GPU."""
    tta: bool = False
    """Average over all flips of the spatial axes (4x the compute in 2-D, 8x in 3-D)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Arithmetic of the forward pass; auto: bf16 on GPUs and CPUs with native bf16 (AVX512-BF16, AMX),
    else fp32.  bf16 on a CPU also runs each convolution block (conv, batch norm, ReLU) as one oneDNN op."""
    dtype: Literal["uint8", "float16", "float32"] = "uint8"
    """Stored prediction: uint8 holds round(probability x 255); float16 or float32 the value itself."""


# ---------------------------------------------------------------------------------------------
# label


class LabelOptions(Options):
    """How a boundary prediction becomes segments (``emseg label``, :func:`emseg.workflows.label.label`)."""

    method: Literal["cc", "watershed"] = "cc"
    """cc: threshold + connected components; watershed: seeded watershed of the boundary map."""
    threshold: float = Field(default=0.5, gt=0.0, le=1.0)
    """Boundary probability below which a voxel is object interior."""
    foreground: Literal["auto", "below", "above", "nonzero"] = "auto"
    """Foreground rule: below = probability < threshold, above = > threshold, nonzero = value != 0; auto =
    below for predictions (channel axis or float), nonzero for integer (z,y,x) masks."""
    connectivity: Literal[6, 18, 26, 4, 8] = 6
    """Voxel neighbourhood of cc: 6, 18 or 26 in 3-D; 4 or 8 within a section (6 stands for 4, 18 and 26
    for 8)."""
    mode: Literal["3d", "2d"] = "3d"
    """Label in 3-D, or every z-section on its own (segments never continue along z)."""
    min_size: int = Field(default=0, ge=0)
    """watershed: segments smaller than this many voxels are merged into a neighbour (cc keeps every
    component).  Here the watershed's regions are the final segments, so a merge joins two objects:
    default 0, every region kept.  (:attr:`AgglomerateOptions.min_size` is the same rule applied to
    fragments that the agglomeration merges anyway, hence its larger default.)"""
    seeds: Literal["distance", "minima"] = "distance"
    """watershed seeds: maxima of the interior's distance transform, or minima of the boundary map."""
    min_distance: int = Field(default=3, ge=1)
    """watershed: radius in voxels (finest axis) of the window in which a seed is an extremum."""
    sigma: float = Field(default=0.0, ge=0.0)
    """watershed: Gaussian smoothing (voxels) of the boundary map before minima seeds (0: none)."""
    min_contact: float = Field(default=0.5, gt=0.0, le=1.0)
    """watershed: fragments meeting at a block face merge when their interior contact covers this
    fraction of the smaller one's face area."""
    block_size: Shape | None = Field(default=None, json_schema_extra=NOT_FINGERPRINTED)
    """Block core Z,Y,X in voxels; default about 256 per axis for cc, 128 for watershed, a multiple of the chunks."""

    #: The fields only the watershed uses: a cc run's output (and fingerprint) does not depend on them.
    WATERSHED_ONLY: ClassVar[frozenset[str]] = frozenset({"min_size", "seeds", "min_distance", "sigma", "min_contact"})

    def fingerprint(self, *names: str) -> dict[str, Any]:
        """As :meth:`Options.fingerprint`, without the watershed's fields for ``method="cc"``.  The block
        shape is recorded by the run as its layout (``block``), not as this option."""
        dump = super().fingerprint(*names)
        return {k: v for k, v in dump.items() if k not in self.WATERSHED_ONLY} if self.method == "cc" else dump


class SegmentLabelOptions(LabelOptions):
    """The ``[label]`` recipe section of ``emseg segment``: :class:`LabelOptions`, plus the agglomeration
    as a method (its default) and a mode chosen from the voxel size."""

    method: Literal["agglomerate", "cc", "watershed"] = "agglomerate"  # type: ignore[assignment]
    """agglomerate: watershed fragments, region graph and hierarchical agglomeration (the ``[agglomerate]``
    section); watershed: seeded watershed stitched across block faces; cc: threshold + connected components."""
    mode: Literal["auto", "3d", "2d"] = "auto"  # type: ignore[assignment]
    """Label in 3-D, or each z-section on its own (anisotropic ssTEM); auto: per section when the volume's
    z voxel size is at least 2.5x its y/x size, else 3-D."""

    def for_label(self, mode: Literal["3d", "2d"]) -> LabelOptions:
        """These options for :func:`emseg.workflows.label.label` (method cc or watershed), in ``mode``."""
        return LabelOptions.build(**{**self.model_dump(), "mode": mode})


# ---------------------------------------------------------------------------------------------
# agglomerate


class AgglomerateOptions(Options):
    """Fragments -> region graph -> agglomeration (``emseg agglomerate``, ``label.method = "agglomerate"``).

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

    threshold: MergeThreshold = 0.8
    """Merge fragments whose edge score (1 - mean affinity at the merge) is below this; written to
    labels/segments."""
    thresholds: tuple[MergeThreshold, ...] = ()
    """Extra thresholds, e.g. 0.3,0.5,0.7: one label image labels/segments_<t> each (the graph is reused)."""
    score: Literal["hierarchical", "mean"] = "hierarchical"
    """hierarchical: waterz's mean-affinity merge score, decided per block plus context; mean: the edge's
    own 1 - mean affinity (exactly blockwise = whole volume)."""
    fragment_threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    """Boundary probability below which a voxel is interior (seeds of the fragments)."""
    seeds: Literal["distance", "minima"] = "distance"
    """Fragment seeds: maxima of the interior's distance transform, or minima of the boundary map."""
    min_distance: int = Field(default=3, ge=1)
    """Radius (voxels, finest axis) of the window in which a seed is a maximum."""
    min_size: int = Field(default=50, ge=0)
    """Fragments smaller than this (voxels) are merged into a neighbour.  The rule of
    :attr:`LabelOptions.min_size`, but on an over-segmentation that the agglomeration merges further:
    it only shrinks the region graph, hence a default of 50 where ``emseg label`` keeps every region."""
    context: Margin | None = None
    """Voxels Z,Y,X added around a block for its hierarchical agglomeration; default half a block, at most
    64 (0 along z per section)."""
    quantile: float | None = Field(default=None, ge=0.0, le=1.0)
    """Also store this quantile of each edge's contact affinities in the graph."""
    section_link_weight: float = Field(default=0.5, gt=0.0, le=1.0)
    """Anisotropic volumes with a boundary prediction: the affinity across two sections (taken from the
    boundary evidence of both) is weighted by this before the graph is scored, so that a contact across
    sections must be clearer than one within a section to merge.  A 2-D model never saw the tissue
    between two sections 40-50 nm apart: with 1.0, thin neurites that overlap from one section to the
    next merge cells of one section through their neighbours (see ``benchmarks/README_loo.md``).
    Affinity models and isotropic volumes are not weighted.  Unset, the predicting model's own
    (``section_link_weight`` in its config.json) is used where it has one."""
    fragments: Literal["watershed", "mutex"] = Field(
        default="watershed", validation_alias=AliasChoices("fragments", "fragments_method"))
    """Fragments by seeded watershed, or by mutex watershed of (long-range) affinities (the offsets
    recorded with the prediction's checkpoint)."""
    mutex_bias: float = Field(default=0.5, gt=0.0, lt=1.0)
    """Mutex watershed: nearest-neighbour affinities above this attract, below repel."""
    long_range_bias: float | None = Field(default=None, gt=0.0, lt=1.0)
    """Mutex watershed: the same for long-range offsets (default: mutex_bias)."""

    #: The fields of the last stage alone (re-agglomerating a finished graph); the others make fragments
    #: and graph.
    AGGLOMERATION_ONLY: ClassVar[frozenset[str]] = frozenset({"threshold", "thresholds", "score"})


# ---------------------------------------------------------------------------------------------
# recipes


class PipelineConfig(BaseModel):
    """One ``pipelines/*.toml`` recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    name: str = "default"
    """Short name of the recipe."""
    description: str = ""
    """What data the recipe is for and what it produces."""
    voxel_size: tuple[PositiveVoxel, PositiveVoxel, PositiveVoxel] | None = None
    """Voxel size (nm, z, y, x) the recipe expects; a warning is logged when the input differs."""
    predict: PredictOptions = PredictOptions()
    """Network inference."""
    label: SegmentLabelOptions = SegmentLabelOptions()
    """Post-processing into segments."""
    agglomerate: AgglomerateOptions = AgglomerateOptions()
    """Fragments, region graph and agglomeration (used when ``label.method = "agglomerate"``)."""


def segment_overrides(*, method: str | None = None, threshold: float | None = None, merge_threshold: float | None = None,
                      thresholds: tuple[float, ...] | None = None, mode: str | None = None, min_size: int | None = None,
                      **predict: Any) -> dict[str, dict[str, Any]]:
    """The recipe overrides of ``emseg segment``'s options (and ``emseg.segment``'s keywords).

    Every :class:`PredictOptions` field overrides ``[predict]``; ``threshold`` and ``min_size`` mean
    the same for ``[label]`` and for the fragments of ``[agglomerate]``; ``merge_threshold`` and
    ``thresholds`` are the agglomeration's.  None keeps the recipe's value.
    """
    return {
        "predict": predict,
        "label": {"method": method, "threshold": threshold, "min_size": min_size, "mode": mode},
        "agglomerate": {"threshold": merge_threshold, "thresholds": thresholds, "fragment_threshold": threshold,
                        "min_size": min_size},
    }


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
        raise ConfigError(describe_error(e, where=str(path or "pipeline options"))) from e
