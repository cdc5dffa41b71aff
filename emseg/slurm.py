"""Former home of :mod:`emseg.cluster.slurm`; kept so ``from emseg.slurm import ...`` and the SLURM
workers' ``--preload emseg.slurm`` (which runs :func:`dask_setup`) keep working."""

from emseg.cluster.slurm import (
    JOB_PREFIX,
    TRAIN_JOB_NAME,
    SlurmError,
    _import_slurm_cluster,
    cancel_jobs_named,
    cluster_kwargs,
    dask_setup,
    default_log_directory,
    default_template,
    job_state,
    jobs_named,
    parse_walltime,
    render_training_script,
    slurm_cluster,
    submit_training,
    wait_for_job,
)

__all__ = [
    "JOB_PREFIX",
    "TRAIN_JOB_NAME",
    "SlurmError",
    "_import_slurm_cluster",
    "cancel_jobs_named",
    "cluster_kwargs",
    "dask_setup",
    "default_log_directory",
    "default_template",
    "job_state",
    "jobs_named",
    "parse_walltime",
    "render_training_script",
    "slurm_cluster",
    "submit_training",
    "wait_for_job",
]
