"""DDP process setup: spawn ``nproc`` processes on this node, or join a group launched by SLURM/torchrun.

How the processes are found (first match wins):

* **torchrun** (``torch.distributed.run``): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT`` are set by the launcher.
* **SLURM** (``srun emseg train ...`` with ``--ntasks N``): ``SLURM_PROCID`` (rank),
  ``SLURM_NTASKS`` (world size), ``SLURM_LOCALID`` (local rank, picks the GPU).  ``MASTER_ADDR``
  and ``MASTER_PORT`` must be exported by the batch script, e.g.
  ``export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)`` and
  ``export MASTER_PORT=29500``; ``MASTER_PORT`` defaults to 29500.  ``--nproc`` is ignored.
* otherwise ``--nproc N`` > 1 spawns N processes here (``torch.multiprocessing.spawn``) that
  meet on ``127.0.0.1`` at a free port.

The backend is ``nccl`` when the run uses CUDA and ``gloo`` on CPU.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from emseg.errors import ConfigError

__all__ = ["DistInfo", "free_port", "launcher_env"]

Launcher = Literal["single", "spawn", "slurm", "torchrun"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the process group."""

    rank: int
    world_size: int
    local_rank: int
    launcher: Launcher

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launcher_env(environ: Mapping[str, str] | None = None) -> DistInfo | None:
    """The process group described by a torchrun or SLURM environment, or None (not launched so).

    A SLURM job step with a single task (``SLURM_NTASKS=1``) counts as not launched, so
    ``--nproc`` still works inside ``salloc``/``sbatch``.
    """
    env = os.environ if environ is None else environ
    try:
        if "RANK" in env and "WORLD_SIZE" in env:
            for key in ("MASTER_ADDR", "MASTER_PORT"):
                if key not in env:
                    raise ConfigError(f"torchrun-style launch (RANK/WORLD_SIZE set) but {key} is not set")
            return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")), "torchrun")
        if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
            if "MASTER_ADDR" not in env:
                raise ConfigError(
                    "running under srun with several tasks but MASTER_ADDR is not set; in the batch script run "
                    'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)'
                )
            return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0")), "slurm")
    except ValueError as e:
        raise ConfigError(f"malformed launcher environment variable: {e}") from e
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
