"""The models shipped with emseg (``emseg/models/bundled``) and the choice between them by voxel size.

Two bundled checkpoints::

    bundled/            sstem2d: 2-D membrane U-Net, run per section at 8 nm in-plane (trained at 4
                        and 8 nm; finer sections are downsampled to it): ssTEM (ISBI 2012, VNC,
                        CREMI-like) and isotropic FIB-SEM; output "membrane"
    bundled/fib3d/      fib3d: 3-D affinity U-Net trained on one FIB-SEM crop (~10 nm); outputs
                        "aff_z", "aff_y", "aff_x" (see its MODEL_CARD.md for the convention)

:func:`choose_bundled` picks the 2-D model for every volume: on the leave-one-dataset-out table
(``benchmarks/loo_table.py``) it transfers to data it never saw, on anisotropic and isotropic volumes,
where ``fib3d`` has only been measured on crops of its own training volume and merges the whole of
FIB-SEM volumes from other labs.  ``fib3d`` stays available by name (``--model fib3d``).  A voxel size
of exactly 1 nm on every axis is what emseg records when the source had none; it is treated as
unknown, with a warning.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emseg.geometry import ANISOTROPY_2D, downsample_factor

log = logging.getLogger(__name__)

__all__ = ["ANISOTROPY_2D", "BUNDLED_DIR", "BundledChoice", "BundledModel", "bundled_models", "bundled_path",
           "choose_bundled"]

BUNDLED_DIR = Path(__file__).parent / "bundled"
FAR_FACTOR = 1.5
"""A volume whose in-plane (2-D model) or any (3-D model) spacing differs from the model's training
resolution by more than this factor gets a warning."""


@dataclass(frozen=True)
class BundledModel:
    """One shipped checkpoint."""

    name: str
    """Short name: ``sstem2d`` or ``fib3d``."""
    path: Path
    """Checkpoint directory (``model.safetensors`` + ``config.json`` + ``MODEL_CARD.md``)."""
    ndim: int
    """2 (per-section) or 3."""
    outputs: tuple[str, ...]
    """Output channel names."""
    voxel_size_nm: tuple[float, ...] | None
    """Training voxel size, (z, y, x) nm."""
    run_voxel_size_nm: float | None
    """The in-plane voxel size it runs at (finer sections are downsampled to it), nm; ``None``: the volume's."""
    figures: dict[str, Any]
    """The model card's headline figures (``config.json`` provenance ``card``), e.g. validation scores."""

    @property
    def installed(self) -> bool:
        return (self.path / "model.safetensors").is_file() and (self.path / "config.json").is_file()


@dataclass(frozen=True)
class BundledChoice:
    """The model :func:`choose_bundled` picked, and why."""

    model: BundledModel
    reason: str
    """One line: the voxel size, its anisotropy and the rule applied."""
    warning: str | None = None
    """Set when the volume's voxel size is far from the model's training resolution (or unknown)."""


_LAYOUT = (("sstem2d", BUNDLED_DIR), ("fib3d", BUNDLED_DIR / "fib3d"))


def bundled_models(root: Path | None = None) -> list[BundledModel]:
    """The installed bundled models (those whose files exist), 2-D first."""
    found = []
    for name, path in _LAYOUT:
        if root is not None:
            path = root / path.relative_to(BUNDLED_DIR)
        cfg_path = path / "config.json"
        if not ((path / "model.safetensors").is_file() and cfg_path.is_file()):
            continue
        cfg = json.loads(cfg_path.read_text())
        vs = cfg.get("voxel_size_nm")
        found.append(BundledModel(
            name=name, path=path, ndim=int(cfg["model"]["ndim"]), outputs=tuple(cfg["outputs"]),
            voxel_size_nm=None if vs is None else tuple(float(v) for v in vs),
            run_voxel_size_nm=cfg.get("run_voxel_size_nm"),
            figures=dict(cfg.get("provenance", {}).get("card", {})),
        ))
    return found


def choose_bundled(voxel_size: Sequence[float] | None, root: Path | None = None) -> BundledChoice:
    """Pick the bundled model for a volume of ``voxel_size`` ``(z, y, x)`` nm (``None``: unknown).

    Raises
    ------
    ConfigError
        No bundled model is installed.
    """
    from emseg.errors import ConfigError

    models = {m.name: m for m in bundled_models(root)}
    if not models:
        raise ConfigError("no --model given and no bundled model installed")
    if voxel_size is None or len(voxel_size) != 3 or all(float(v) == 1.0 for v in voxel_size):
        model = models.get("sstem2d") or next(iter(models.values()))
        if voxel_size is None:  # the caller did not say: the historical default, no warning
            return BundledChoice(model, f"no voxel size given: the default {model.name} model")
        return BundledChoice(model, f"voxel size unknown: the default {model.name} model",
                             "the volume records no voxel size (1 nm); pass --model, or import it with "
                             "--voxel-size so that the model matching its resolution is chosen")
    z, y, x = (float(v) for v in voxel_size)
    anisotropy = z / min(y, x)
    want = "sstem2d"
    kind = "serial sections" if anisotropy >= ANISOTROPY_2D else "near-isotropic: sections linked in 3-D"
    rule = f"voxel size {z:g},{y:g},{x:g} nm, z/xy {anisotropy:.2f} ({kind}): {want}"
    wanted = models.get(want)
    if wanted is None:
        model = next(iter(models.values()))
        rule += f" is not installed, using {model.name}"
    else:
        model = wanted
    return BundledChoice(model, rule, _resolution_warning(model, (z, y, x)))


def bundled_path(name: str, root: Path | None = None) -> Path | None:
    """The directory of the bundled model called ``name`` (``sstem2d``, ``fib3d``), or ``None``."""
    for model in bundled_models(root):
        if model.name == name:
            return model.path
    return None


def _resolution_warning(model: BundledModel, voxel_size: tuple[float, float, float]) -> str | None:
    if model.voxel_size_nm is None:
        return None
    axes = (1, 2) if model.ndim == 2 else (0, 1, 2)
    trained = model.voxel_size_nm[-3:]
    factor = downsample_factor(None, model.run_voxel_size_nm, voxel_size)
    seen = (voxel_size[0], voxel_size[1] * factor, voxel_size[2] * factor)  # what the model sees
    scales = [trained] + ([(trained[0], model.run_voxel_size_nm, model.run_voxel_size_nm)]
                          if model.run_voxel_size_nm is not None else [])
    far = [a for a in axes if not any(1 / FAR_FACTOR <= seen[a] / at[a] <= FAR_FACTOR for at in scales)]
    if not far:
        return None
    have = ",".join(f"{v:g}" for v in voxel_size)
    was = " and ".join(",".join(f"{v:g}" for v in at) for at in scales)
    return (f"voxel size {have} nm is far (>{FAR_FACTOR:g}x on axes {''.join('zyx'[a] for a in far)}) from the "
            f"{model.name} model's training resolution {was} nm; results may be poor: resample the volume "
            "or train a model at its resolution (emseg train)")
