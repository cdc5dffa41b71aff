"""Resumable training checkpoints: model + optimizer + loop state, no pickle anywhere.

Layout of one checkpoint (written to ``checkpoints/.tmp-step-N`` then renamed with
``os.replace``, so a killed run leaves either the whole checkpoint or none)::

    checkpoints/step-00000200/
        model.safetensors, config.json     # emseg.models.save_checkpoint: loadable on its own
        optimizer.safetensors              # every tensor of optimizer.state_dict()["state"]
        optimizer.json                     # param_groups and non-tensor state entries
        state.json                         # step, best validation loss, early-stopping counter ...
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from emseg.errors import CheckpointError

log = logging.getLogger(__name__)

__all__ = ["latest_checkpoint", "load_optimizer", "load_train_state", "save_optimizer", "write_atomic_dir"]

_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def save_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Write ``optimizer.safetensors`` + ``optimizer.json`` into ``directory``."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entries in sd["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    save_file(tensors, str(directory / "optimizer.safetensors"))
    (directory / "optimizer.json").write_text(json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}, indent=1))


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Restore what :func:`save_optimizer` wrote into ``optimizer`` (same parameters, same order)."""
    try:
        meta = json.loads((directory / "optimizer.json").read_text())
        tensors = load_file(str(directory / "optimizer.safetensors"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory}: cannot read the optimizer state ({e}); restart without --resume") from e
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{directory}: the optimizer state does not fit this model/optimizer ({e})") from e


def write_atomic_dir(final: Path, fill: Any) -> None:
    """Create ``final`` by filling a temporary sibling with ``fill(tmp_dir)`` and renaming it."""
    tmp = final.parent / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The complete checkpoint with the highest step in ``checkpoints/``, or None."""
    if not checkpoints.is_dir():
        return None
    found = [(int(m[1]), p) for p in checkpoints.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "state.json").exists()]
    return max(found)[1] if found else None


def load_train_state(directory: Path) -> dict[str, Any]:
    """The loop state (``state.json``) of one checkpoint."""
    try:
        state: dict[str, Any] = json.loads((directory / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory}: unreadable state.json ({e}); delete this checkpoint directory") from e
    return state


def prune(checkpoints: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints, and leftover temporary directories."""
    found = sorted((int(m[1]), p) for p in checkpoints.iterdir() if (m := _STEP_DIR.match(p.name)))
    for _, path in found[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
