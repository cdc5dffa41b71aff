"""Checkpoints: safetensors weights plus a JSON config.  Loading never unpickles anything.

Layout::

    CKPT/
      model.safetensors   state_dict (safetensors.torch.save_file)
      config.json         {"format": "emseg-checkpoint", "version": 1, "model": {"name": ..., build kwargs},
                           "outputs": [...], "activation": ..., "normalization": {"mean", "std"},
                           "voxel_size_nm": [...] | null, "provenance": {...}}

Input normalisation: raw ``uint8`` voxels are divided by 255 to ``float32`` in ``[0, 1]``, then
``(x - mean) / std``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from emseg.errors import CheckpointError, ConfigError, VolumeNotFoundError
from emseg.models.base import SegmentationModel
from emseg.models.registry import build

__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "WEIGHTS_NAME",
    "Checkpoint",
    "CheckpointConfig",
    "Normalization",
    "load_checkpoint",
    "load_checkpoint_config",
    "save_checkpoint",
]

FORMAT: Final = "emseg-checkpoint"
VERSION: Final = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
Activation = Literal["sigmoid", "softmax", "none"]

# a safetensors header longer than this is not a real one
_MAX_HEADER = 100 * 1024 * 1024
_PICKLE_HINT = (
    "pickled checkpoints (torch.save / .pt / .pth / .ckpt) are refused because loading them would run "
    "arbitrary code; convert it once in a trusted environment with "
    "safetensors.torch.save_file(state_dict, 'model.safetensors') and write the config.json that "
    "emseg.models.save_checkpoint() writes"
)


class Normalization(BaseModel):
    """Input normalisation: uint8 / 255 -> float32 in [0, 1], then ``(x - mean) / std``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: float = 0.5
    """Subtracted after scaling to [0, 1]."""
    std: float = Field(0.5, gt=0)
    """Divides after subtracting ``mean``; positive."""


class CheckpointConfig(BaseModel):
    """The parsed ``config.json`` of a checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["emseg-checkpoint"] = FORMAT
    """Always ``"emseg-checkpoint"``."""
    version: Literal[1] = VERSION
    """Format version."""
    model: dict[str, Any]
    """Registry ``name`` plus build keyword arguments: ``build(**model)`` rebuilds the architecture."""
    outputs: tuple[str, ...]
    """What each output channel means, e.g. ``("membrane",)`` or ``("aff_z", "aff_y", "aff_x")``."""
    activation: Activation = "sigmoid"
    """Turns the logits into the outputs: per channel ``sigmoid``, ``softmax`` over channels, or ``none``."""
    normalization: Normalization = Normalization()
    """How raw input is normalised before the forward pass."""
    voxel_size_nm: tuple[float, ...] | None = None
    """Voxel size the model was trained at, nanometres, axis order (z, y, x); ``None`` if unknown."""
    run_voxel_size_nm: float | None = Field(default=None, gt=0.0)
    """In-plane (y, x) voxel size, nanometres, the model runs at: ``emseg predict`` mean-downsamples a volume
    with finer sections by the nearest integer factor before the model sees it, and repeats the
    prediction back to the volume's voxels (:attr:`emseg.config.PredictOptions.downsample`).  ``None``:
    the volume's own voxels."""
    offsets: tuple[tuple[int, ...], ...] | None = None
    """Affinity models: the partner offset of each output channel, voxels, axis order (z, y, x):
    channel ``c`` at voxel ``p`` is the affinity of ``p`` and ``p + offsets[c]`` (so ``(-1, 0, 0)`` is
    ``aff_z``: the voxel and its z-1 neighbour).  ``None`` for non-affinity outputs."""
    agglomeration_threshold: float | None = Field(default=None, gt=0.0, lt=1.0)
    """Merge threshold this model's outputs were tuned for (the model card says on what data).
    ``emseg segment`` and ``emseg agglomerate`` merge at it when neither a flag nor the recipe sets
    ``threshold`` (:func:`emseg.workflows.agglomerate.with_model_settings`); ``None``: the
    agglomeration's own default."""
    section_link_weight: float | None = Field(default=None, gt=0.0, le=1.0)
    """The factor on this model's boundary evidence across sections of an anisotropic volume that the
    agglomeration was tuned with (:attr:`emseg.config.AgglomerateOptions.section_link_weight`, used like
    ``agglomeration_threshold``); ``None``: the agglomeration's own default."""
    provenance: dict[str, Any] = Field(default_factory=dict)
    """Free-form training provenance: data, command, steps, metrics, ..."""


class Checkpoint(NamedTuple):
    """A loaded checkpoint: the model (eval mode, CPU) and its config."""

    model: SegmentationModel
    config: CheckpointConfig


def save_checkpoint(
    model: SegmentationModel,
    path: str | Path,
    *,
    outputs: Sequence[str] = ("membrane",),
    activation: Activation = "sigmoid",
    normalization: Mapping[str, float] | Normalization | None = None,
    voxel_size_nm: Sequence[float] | None = None,
    offsets: Sequence[Sequence[int]] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` to the checkpoint directory ``path`` (created; existing files are replaced).

    Parameters
    ----------
    model : SegmentationModel
        Any registered architecture; its ``config`` is stored so it can be rebuilt.
    path : str or Path
        Checkpoint directory.
    outputs : sequence of str
        Meaning of each output channel; length ``model.out_channels``.
    activation : {"sigmoid", "softmax", "none"}
        How logits become outputs.
    normalization : mapping or Normalization, optional
        ``{"mean": float, "std": float}`` applied after scaling uint8 input to [0, 1];
        default mean 0.5, std 0.5.
    voxel_size_nm : sequence of float, optional
        Training voxel size in nm, (z, y, x) or (y, x).
    offsets : sequence of int sequences, optional
        Affinity models: each channel's partner offset, (z, y, x) voxels; one per output.
    provenance : mapping, optional
        JSON-able training provenance (data, command, steps, metrics ...).

    Returns
    -------
    Path
        The checkpoint directory.

    Raises
    ------
    ConfigError
        ``outputs`` does not match ``model.out_channels``, or a field is invalid / not JSON-able.
    """
    outputs = tuple(outputs)
    if len(outputs) != model.out_channels:
        raise ConfigError(
            f"outputs names {len(outputs)} channel(s) {outputs} but the model has out_channels={model.out_channels}"
        )
    if offsets is not None and len(offsets) != len(outputs):
        raise ConfigError(f"offsets names {len(offsets)} channel(s) but the model has {len(outputs)} output(s)")
    try:
        config = CheckpointConfig(
            model=model.config,
            outputs=outputs,
            activation=activation,
            normalization=Normalization.model_validate(
                normalization if not isinstance(normalization, Normalization) else normalization.model_dump()
            )
            if normalization is not None
            else Normalization(),
            voxel_size_nm=None if voxel_size_nm is None else tuple(float(v) for v in voxel_size_nm),
            offsets=None if offsets is None else tuple(tuple(int(v) for v in o) for o in offsets),
            provenance=dict(provenance or {}),
        )
        text = json.dumps(config.model_dump(mode="json"), indent=2, allow_nan=False)
    except (ValidationError, TypeError, ValueError) as e:
        raise ConfigError(f"invalid checkpoint metadata: {e}") from e
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": FORMAT})
    (directory / CONFIG_NAME).write_text(text + "\n")
    return directory


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint directory (or its ``model.safetensors``) into a model in eval mode on the CPU.

    Only safetensors and JSON are read; nothing is unpickled.

    Raises
    ------
    CheckpointError
        The path does not exist (also a ``FileNotFoundError``), the weights are not a safetensors file
        (a pickle / ``torch.save`` file is refused), the config is missing or invalid, or config and
        weights disagree.
    """
    given = Path(path)
    if not given.exists():
        raise _NotFound(f"checkpoint not found: {given}")
    if given.is_dir():
        directory, weights = given, given / WEIGHTS_NAME
        if not weights.is_file():
            pickles = sorted(p.name for p in given.iterdir() if p.suffix in {".pt", ".pth", ".ckpt", ".bin", ".pkl"})
            found = f" (found {', '.join(pickles)}: {_PICKLE_HINT})" if pickles else ""
            raise CheckpointError(f"{given}: no {WEIGHTS_NAME} in the checkpoint directory{found}")
    else:
        directory, weights = given.parent, given
    _check_safetensors(weights)
    config = _read_config(directory / CONFIG_NAME)
    _check_model_size(config, directory / CONFIG_NAME, weights)
    try:
        model = build(**config.model)
    except ConfigError as e:
        raise CheckpointError(f"{directory / CONFIG_NAME}: the model config cannot be built: {e}") from e
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: unreadable safetensors file: {e}") from e
    if len(config.outputs) != model.out_channels:
        raise CheckpointError(
            f"{directory / CONFIG_NAME}: outputs {config.outputs} name {len(config.outputs)} channel(s) "
            f"but the model has out_channels={model.out_channels}"
        )
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        details = "; ".join(
            f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise CheckpointError(f"{weights}: weights do not match the config's {config.model.get('name')!r} model ({details})")
    import torch

    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:  # NaN/inf weights predict a constant: refused rather than segmented into nonsense
        raise CheckpointError(f"{weights}: weights hold NaN or infinite values ({', '.join(bad[:5])}"
                              f"{' ...' if len(bad) > 5 else ''}); the training diverged or the file is damaged")
    model.load_state_dict(state)
    return Checkpoint(model=model.eval(), config=config)


def load_checkpoint_config(path: str | Path) -> CheckpointConfig:
    """The ``config.json`` of a checkpoint directory (or of its ``model.safetensors``'s directory),
    without the weights.  Raises :class:`~emseg.errors.CheckpointError` as :func:`load_checkpoint`."""
    given = Path(path)
    return _read_config((given if given.is_dir() else given.parent) / CONFIG_NAME)


def _check_model_size(config: CheckpointConfig, where: Path, weights: Path) -> None:
    """Count the config's parameters on the meta device (nothing allocated) before building for real.

    Refuses a config whose float32 weights would not fit in the memory available now, or whose
    parameters the weights file cannot hold: a hostile or mistyped ``base_channels`` fails here with
    one message instead of exhausting the machine's memory.
    """
    import psutil
    import torch

    from emseg.errors import ResourceLimitError

    try:
        with torch.device("meta"):
            meta = build(**config.model)
    except ConfigError as e:
        raise CheckpointError(f"{where}: the model config cannot be built: {e}") from e
    params = sum(p.numel() for p in meta.parameters())
    need = params * 4
    available = psutil.virtual_memory().available
    if need > available:
        raise ResourceLimitError(
            f"{where}: the model ({config.model.get('name')}, base_channels {config.model.get('base_channels')}, "
            f"depth {config.model.get('depth')}) has {params:,} parameters, {need / 2**30:.1f} GiB as float32, "
            f"but {available / 2**30:.1f} GiB is available"
        )
    size = weights.stat().st_size
    if need > 2 * size + (1 << 20):  # fp16 weights are half the size; the header is small
        raise CheckpointError(
            f"{where}: the config describes {params:,} parameters ({need / 2**20:.0f} MiB as float32) but "
            f"{weights} holds only {size / 2**20:.1f} MiB; config and weights do not belong together"
        )


class _NotFound(CheckpointError, VolumeNotFoundError):
    """A checkpoint path that does not exist (catchable as ``FileNotFoundError`` too)."""


def _check_safetensors(weights: Path) -> None:
    """Refuse anything whose bytes are not a safetensors header (pickles, zip archives, ...)."""
    with weights.open("rb") as f:
        head = f.read(9)
        if len(head) >= 8:
            (length,) = struct.unpack("<Q", head[:8])
            if 2 <= length <= _MAX_HEADER and head[8:9] == b"{":
                try:
                    json.loads(head[8:] + f.read(length - 1))
                    return
                except ValueError:
                    pass
    kind = "a pickle" if head[:1] == b"\x80" else "a torch.save zip archive" if head[:2] == b"PK" else "not safetensors"
    raise CheckpointError(f"{weights}: this file is {kind}, not a safetensors file; {_PICKLE_HINT}")


def _read_config(path: Path) -> CheckpointConfig:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing checkpoint config; a checkpoint is a directory with "
                              f"{WEIGHTS_NAME} and {CONFIG_NAME} (write both with save_checkpoint())")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{path}: expected \"format\": \"{FORMAT}\", got {found!r}")
    try:
        return CheckpointConfig.model_validate(raw)
    except ValidationError as e:
        raise CheckpointError(f"{path}: invalid checkpoint config: {e}") from e
