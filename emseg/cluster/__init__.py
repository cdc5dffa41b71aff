"""Where a run's tasks execute: cluster profiles, local Dask clusters, SLURM, and the client a run uses.

* :mod:`emseg.cluster.profiles`: :class:`ClusterProfile` (``local``, ``local-gpu``, ``slurm`` or a YAML
  file), :func:`load_profile`, the :class:`Connection` a run holds.  Data only, no Dask import.
* :mod:`emseg.cluster.local`: LocalCluster of CPU workers, or one pinned worker per GPU.
* :mod:`emseg.cluster.slurm`: Dask workers as SLURM jobs; DDP training as one sbatch job.
* :mod:`emseg.cluster.client`: :func:`connect`, which picks one of these (or joins a scheduler).

Imports point one way: ``client`` -> ``local``, ``slurm`` -> ``profiles``.
"""

from emseg.cluster.client import connect
from emseg.cluster.local import Layout, default_layout, local_cluster, visible_gpus
from emseg.cluster.profiles import (
    BUILTIN,
    WORKER_MALLOC_ENV,
    WORKER_MEMORY,
    ClusterProfile,
    Connection,
    SlurmOptions,
    load_profile,
    parse_walltime,
)
from emseg.cluster.slurm import render_training_script, slurm_cluster, submit_training

__all__ = [
    "BUILTIN",
    "WORKER_MALLOC_ENV",
    "WORKER_MEMORY",
    "ClusterProfile",
    "Connection",
    "Layout",
    "SlurmOptions",
    "connect",
    "default_layout",
    "load_profile",
    "local_cluster",
    "parse_walltime",
    "render_training_script",
    "slurm_cluster",
    "submit_training",
    "visible_gpus",
]
