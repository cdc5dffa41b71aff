"""Every option of a training run: :class:`TrainConfig` (pydantic v2, frozen, no extra keys).

A run is one ``TrainConfig``.  ``emseg train --config run.toml`` reads a TOML or YAML file holding
the fields below at its top level (or under a ``[train]`` table); CLI flags override single fields.
The resolved config is written next to the checkpoint as ``train_config.json``.

Data paths may select z-sections with a ``[z0:z1]`` suffix, e.g. ``train-volume.tif[0:16]``
(python slice semantics, sections ``z0 <= z < z1``); HDF5 datasets are ``file.h5/dataset``.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from emseg.errors import ConfigError, VolumeNotFoundError

__all__ = ["DataSource", "LabelsKind", "TrainConfig", "load_train_config"]

LabelsKind = Literal["auto", "instances", "membrane-mask", "interior-mask"]
Target = Literal["membrane", "mask", "affinities"]
LossName = Literal["weighted-ce", "bce-dice", "bce"]
OptimizerName = Literal["sgd", "adam"]


class DataSource(BaseModel):
    """One raw volume and its labels, both ``(z, y, x)`` with the same shape."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    raw: str
    """Raw EM path (zarr, OME-Zarr, TIFF, ``file.h5/dataset``), optional ``[z0:z1]`` suffix; uint8 expected."""
    labels: str
    """Label path, same syntax and shape as ``raw``."""
    labels_kind: LabelsKind = "auto"
    """How to read ``labels``: ``instances`` (ids, 0 = boundary/unlabelled), ``membrane-mask``
    (non-zero = membrane), ``interior-mask`` (zero = membrane, e.g. ISBI 2012's 0/255) or ``auto``:
    more than two values -> instances; two values -> the rarer value is membrane (membranes cover
    well under half of an EM section)."""
    boundary_width: int | None = Field(None, ge=0, le=32)
    """Pixels by which the boundary between two touching instances is widened on each side, in-plane,
    to the width of a membrane in the image.  ``None``: 12 nm in pixels of ``voxel_size_nm`` (3 at 4 nm,
    1 at 10 nm) for dense instance labels without gaps (no 0 value, e.g. CREMI's neuron ids, whose
    boundaries are otherwise one pixel per cell where a membrane is several: a model fine-tuned on them
    unlearns membranes), 0 for every other kind."""


class TrainConfig(BaseModel):
    """A training run.  Shapes are in voxels, axis order ``(z, y, x)`` (``(y, x)`` for 2D models)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # data -------------------------------------------------------------------------------------
    train: tuple[DataSource, ...] = Field(min_length=1)
    """Training sources (at least one)."""
    val: tuple[DataSource, ...] = ()
    """Validation sources; whole sections (2D) or volumes (3D) are predicted.  Empty: no validation."""
    target: Target = "membrane"
    """What the model learns: ``membrane`` (1 channel, 1 = membrane/boundary), ``mask`` (1 channel,
    1 = labelled interior) or ``affinities`` (one channel per axis, nearest-neighbour affinities)."""
    foreground_prob: float = Field(0.5, ge=0.0, le=1.0)
    """Probability that a patch is centred on a foreground voxel (membrane for ``membrane``,
    interior otherwise) rather than anywhere: foreground-aware sampling."""

    # model ------------------------------------------------------------------------------------
    model: str = "unet"
    """Architecture name in :data:`emseg.models.MODELS`."""
    ndim: Literal[2, 3] = 2
    """Spatial dimensions of the model; 2D models train on single z-sections."""
    base_channels: int = Field(16, ge=1)
    """Feature maps of the first level."""
    depth: int = Field(4, ge=1)
    """Resolution levels of the model."""
    padding: Literal["valid", "same"] = "valid"
    """Convolution padding: ``valid`` (the U-Net paper; exact overlap-tile inference) or ``same``."""
    batch_norm: bool = False
    """Batch normalisation after each convolution."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout probability at the bottleneck."""

    # patches and augmentation -----------------------------------------------------------------
    patch_shape: tuple[int, ...] = (256, 256)
    """Requested model input shape per patch, voxels; raised to the next shape the model accepts."""
    batch_size: int = Field(4, ge=1)
    """Global batch size, split evenly over the DDP processes."""
    augment: bool = True
    """Apply the augmentations below on the fly (off: plain crops)."""
    elastic_sigma: float = Field(10.0, ge=0.0)
    """Standard deviation of the coarse grid's random displacements, voxels (U-Net paper: 10)."""
    elastic_grid: int = Field(3, ge=2)
    """Control points per axis of the coarse displacement grid (U-Net paper: 3)."""
    intensity: bool = True
    """Random contrast, brightness, gamma and Gaussian noise on the raw."""
    isotropic: bool = False
    """The data is (near-)isotropic (FIB-SEM).  3D models: augment with random axis transposes (xy, xz and
    yz orientations) and a 3D elastic field instead of an in-plane one; 2D models: sample sections of all
    three orientations (xy, xz, yz), not only xy."""
    affinity_offsets: tuple[tuple[int, ...], ...] | None = None
    """``affinities`` target: the offset of each channel's partner voxel, ``(z, y, x)`` (``(y, x)`` in
    2D), e.g. ``[[-1,0,0],[0,-1,0],[0,0,-1],[-3,0,0],[0,-9,0],[0,0,-9]]`` for long-range channels.
    Default: the nearest neighbours, channels ``aff_z, aff_y, aff_x``."""
    affinity_balance: bool = True
    """``affinities`` target: weight each patch's pairs so that affinity-0 (boundary) and affinity-1
    pairs carry equal total weight in the BCE (per channel; boundaries are ~10% of the pairs)."""
    defect_prob: float = Field(0.05, ge=0.0, le=1.0)
    """3D only: probability per section of a missing (black) or dark section."""

    # loss and optimiser -----------------------------------------------------------------------
    loss: LossName = "weighted-ce"
    """``weighted-ce``: pixel-wise (softmax/sigmoid) cross-entropy with the U-Net weight map;
    ``bce-dice``: BCE + soft Dice (UNet++); ``bce``: plain BCE."""
    w0: float = Field(10.0, ge=0.0)
    """Weight-map border term amplitude (U-Net paper: 10)."""
    sigma: float = Field(5.0, gt=0.0)
    """Weight-map border term width, pixels (U-Net paper: 5)."""
    deep_supervision: bool = False
    """Average the loss over every head of ``forward_heads`` (UNet++)."""
    optimizer: OptimizerName = "adam"
    """``sgd`` (momentum below; U-Net paper) or ``adam`` (UNet++)."""
    lr: float = Field(3e-4, gt=0.0)
    """Learning rate."""
    momentum: float = Field(0.99, ge=0.0, lt=1.0)
    """SGD momentum (U-Net paper: 0.99)."""
    weight_decay: float = Field(0.0, ge=0.0)
    """L2 weight decay."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """``constant``: ``lr`` at every step; ``cosine``: ``lr`` decayed along a half cosine to 1% of it at
    ``steps`` (a function of the step and ``steps`` alone, so a resumed run continues the same curve)."""

    # schedule ---------------------------------------------------------------------------------
    steps: int = Field(1000, ge=1)
    """Optimiser steps in total (a resumed run continues up to this count)."""
    val_every: int = Field(100, ge=1)
    """Validate every this many steps (and at the last step)."""
    checkpoint_every: int = Field(100, ge=1)
    """Write a resumable checkpoint every this many steps (and at the last step)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Resumable checkpoints kept in ``checkpoints/`` (oldest deleted first)."""
    select_by: Literal["loss", "adapted_rand_error", "pixel_error"] = "loss"
    """Validation score (lower is better) that picks the model kept at the output's top level and
    drives ``patience``: the validation loss, or (membrane/mask targets) the adapted Rand error or
    pixel error of :func:`emseg.training.validation.validate`."""
    patience: int = Field(0, ge=0)
    """Early stopping: stop after this many validations without a lower ``select_by`` score (0: never)."""
    time_limit_min: float | None = Field(None, gt=0)
    """Stop after this many minutes of wall time (checkpoint written, reported as an early stop);
    ``None``: run all ``steps``.  For CPU runs with a fixed time budget."""
    log_every: int = Field(10, ge=1)
    """Write a training-loss line to ``metrics.jsonl`` every this many steps."""

    # run --------------------------------------------------------------------------------------
    output: str
    """Checkpoint directory: ``model.safetensors`` + ``config.json`` (best model), ``checkpoints/``,
    ``metrics.jsonl``, ``curves.png``, ``train_config.json``."""
    seed: int = 0
    """Seed of patch sampling, augmentation and initialisation; a run is reproducible from it."""
    resume: bool = False
    """Continue from the newest checkpoint in ``output/checkpoints``."""
    overwrite: bool = False
    """Delete an existing run in ``output`` instead of refusing to start."""
    nproc: int = Field(1, ge=1)
    """DDP processes to spawn on this node (gloo on CPU, nccl on GPU).  Ignored when launched by
    SLURM (``srun``) or torchrun, which start the processes themselves."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: CUDA when available."""
    threads: int = Field(0, ge=0)
    """torch CPU threads per process (0: torch's default)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Arithmetic of the forward/backward pass: ``bf16`` autocast (weights, optimiser and loss stay
    float32; 1.7x the patches/s of fp32 on 2 CPU cores with avx512_bf16, same validation scores within
    noise) or plain ``fp32``.  ``auto``: bf16 on CUDA and on CPUs that compute bf16 natively, fp32 on
    the others, where bf16 is emulated (a U-Net step 15-20x slower than fp32 on an AVX2-only CPU)."""
    channels_last: bool = False
    """Channels-last memory format for the model and input (measured slower on CPU for these models)."""
    init: str | None = None
    """Checkpoint directory whose weights initialise the model (warm start; same architecture).  The
    optimiser starts fresh; unlike ``resume`` this begins a new run at step 0."""
    voxel_size_nm: tuple[Annotated[float, Field(gt=0, allow_inf_nan=False)], ...] | None = None
    """Voxel size of the training data, nanometres (positive, finite), recorded in the checkpoint."""

    @field_validator("patch_shape")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(s <= 0 for s in v):
            raise ValueError(f"patch_shape must hold positive ints, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if len(self.patch_shape) != self.ndim:
            raise ValueError(f"patch_shape {self.patch_shape} must have {self.ndim} values for a {self.ndim}D model")
        if self.batch_size % self.nproc:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of nproc {self.nproc}")
        if self.affinity_offsets is not None:
            if self.target != "affinities":
                raise ValueError("affinity_offsets needs target 'affinities'")
            for o in self.affinity_offsets:
                if len(o) != self.ndim or not any(o):
                    raise ValueError(f"affinity offset {list(o)} must have {self.ndim} values, not all 0")
        if self.select_by != "loss" and self.target == "affinities":
            raise ValueError(f"select_by {self.select_by!r} needs a membrane or mask target; use 'loss' for affinities")
        if self.target == "affinities" and self.loss == "weighted-ce":
            raise ValueError("loss 'weighted-ce' needs a membrane or mask target; use --loss bce-dice for affinities")
        return self

    @property
    def out_channels(self) -> int:
        """Model output channels implied by ``target``."""
        if self.target != "affinities":
            return 1
        return len(self.affinity_offsets) if self.affinity_offsets is not None else self.ndim

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2)


def _read_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise VolumeNotFoundError(f"{path}: config file not found")
    import yaml

    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"{path}: expected a .toml, .yaml/.yml or .json config file")
    try:
        if suffix == ".toml":
            data: Any = tomllib.loads(path.read_text())
        elif suffix == ".json":
            data = json.loads(path.read_text())
        else:
            data = yaml.safe_load(path.read_text()) or {}
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot parse config: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of options at the top level, got {type(data).__name__}")
    if "train" in data and isinstance(data["train"], dict):
        data = data["train"]
    return dict(data)


def load_train_config(path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Build a :class:`TrainConfig` from an optional TOML/YAML/JSON file plus field overrides.

    Raises
    ------
    ConfigError
        Unknown field, wrong type or inconsistent values; the message names the field.
    """
    data: dict[str, Any] = _read_file(Path(path)) if path is not None else {}
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"invalid training config: {problems}") from e
