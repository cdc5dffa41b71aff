"""``emseg train``: train a segmentation model (a thin layer over :func:`emseg.training.train`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from emseg.cli.types import SIZES

LABEL_KINDS = ["auto", "instances", "membrane-mask", "interior-mask"]

# CLI option name -> TrainConfig field, for the options that map one to one
_FIELDS = {
    "model": "model", "output": "output", "target": "target", "ndim": "ndim", "base_channels": "base_channels",
    "depth": "depth", "padding": "padding", "batch_norm": "batch_norm", "patch_shape": "patch_shape",
    "batch_size": "batch_size", "steps": "steps", "lr": "lr", "lr_schedule": "lr_schedule", "optimizer": "optimizer", "momentum": "momentum",
    "loss": "loss", "deep_supervision": "deep_supervision", "augment": "augment", "val_every": "val_every",
    "checkpoint_every": "checkpoint_every", "patience": "patience", "seed": "seed", "nproc": "nproc",
    "resume": "resume", "overwrite": "overwrite", "device": "device", "threads": "threads",
    "foreground_prob": "foreground_prob", "voxel_size": "voxel_size_nm", "precision": "precision",
    "channels_last": "channels_last", "init": "init", "elastic_sigma": "elastic_sigma",
    "isotropic": "isotropic", "log_every": "log_every", "defect_prob": "defect_prob", "time_limit": "time_limit_min",
    "select_by": "select_by", "keep_checkpoints": "keep_checkpoints", "affinity_balance": "affinity_balance",
}


@click.command()
@click.option("--raw", "raws", multiple=True, help="Training raw (zarr, OME-Zarr, TIFF, file.h5/dataset); a [z0:z1] suffix selects sections. Repeat for several volumes.")
@click.option("--labels", "labels", multiple=True, help="Labels of each --raw, in the same order.")
@click.option("--val-raw", "val_raws", multiple=True, help="Validation raw; repeatable like --raw.")
@click.option("--val-labels", "val_labels", multiple=True, help="Labels of each --val-raw.")
@click.option("--labels-kind", type=click.Choice(LABEL_KINDS), default="auto", show_default=True,
              help="instances (ids, 0 = boundary), membrane-mask (non-zero = membrane), interior-mask (0 = membrane, ISBI), "
                   "or auto: >2 values -> instances, else the rarer value is membrane.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="TOML/YAML file of TrainConfig fields; flags override it.")
@click.option("--model", help="Architecture name (emseg models). [default: unet]")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Checkpoint directory to write.")
@click.option("--target", type=click.Choice(["membrane", "mask", "affinities"]), help="What to learn. [default: membrane]")
@click.option("--ndim", type=click.IntRange(2, 3), help="2D (per section) or 3D model. [default: 2]")
@click.option("--base-channels", type=click.IntRange(min=1), help="Feature maps of the first level. [default: 16]")
@click.option("--depth", type=click.IntRange(min=1), help="Resolution levels. [default: 4]")
@click.option("--padding", type=click.Choice(["valid", "same"]), help="Convolution padding. [default: valid]")
@click.option("--batch-norm/--no-batch-norm", default=None, help="Batch normalisation. [default: off]")
@click.option("--patch-shape", type=SIZES, help="Requested input patch, e.g. 256,256 (2D) or 16,128,128. [default: 256,256]")
@click.option("--batch-size", type=click.IntRange(min=1), help="Global batch size. [default: 4]")
@click.option("--steps", type=click.IntRange(min=1), help="Total optimiser steps. [default: 1000]")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Learning rate. [default: 3e-4]")
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]),
              help="constant, or cosine decay to 1% of --lr at the last step. [default: constant]")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), help="sgd (momentum 0.99, U-Net) or adam (UNet++). [default: adam]")
@click.option("--momentum", type=click.FloatRange(0, 1, max_open=True), help="SGD momentum. [default: 0.99]")
@click.option("--loss", type=click.Choice(["weighted-ce", "bce-dice", "bce"]), help="Loss. [default: weighted-ce]")
@click.option("--deep-supervision/--no-deep-supervision", default=None, help="Loss over every UNet++ head.")
@click.option("--augment/--no-augment", default=None, help="On-the-fly augmentation. [default: on]")
@click.option("--foreground-prob", type=click.FloatRange(0, 1), help="Share of patches centred on foreground. [default: 0.5]")
@click.option("--val-every", type=click.IntRange(min=1), help="Validate every N steps. [default: 100]")
@click.option("--checkpoint-every", type=click.IntRange(min=1), help="Resumable checkpoint every N steps. [default: 100]")
@click.option("--patience", type=click.IntRange(min=0), help="Early stopping after N validations without improvement (0: off).")
@click.option("--seed", type=int, help="Seed of sampling, augmentation, initialisation. [default: 0]")
@click.option("--nproc", type=click.IntRange(min=1), help="DDP processes on this node (ignored under srun/torchrun). [default: 1]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="[default: auto]")
@click.option("--threads", type=click.IntRange(min=0), help="torch CPU threads per process (0: default).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), help="Forward/backward arithmetic: bf16 autocast or fp32; auto: bf16 on CUDA and on CPUs with native bf16, else fp32. [default: auto]")
@click.option("--channels-last/--no-channels-last", default=None, help="Channels-last memory format. [default: off]")
@click.option("--init", type=click.Path(exists=True), help="Checkpoint whose weights start the run (warm start, same architecture).")
@click.option("--elastic-sigma", type=click.FloatRange(min=0), help="Elastic deformation strength, voxels (0: off). [default: 10]")
@click.option("--isotropic/--anisotropic", default=None,
              help="Isotropic data (FIB-SEM): 3D models get random axis transposes (xy/xz/yz views) and a 3D elastic "
                   "field; 2D models sections of all three orientations. [default: anisotropic]")
@click.option("--affinity-offsets", help="Affinity target: partner offsets z,y,x separated by ';', e.g. "
              "'-1,0,0;0,-1,0;0,0,-1;-3,0,0;0,-9,0;0,0,-9'. [default: nearest neighbours]")
@click.option("--affinity-balance/--no-affinity-balance", default=None,
              help="Affinities: weight boundary and non-boundary pairs equally in the BCE. [default: on]")
@click.option("--defect-prob", type=click.FloatRange(0, 1), help="3D: probability per section of a missing or dark section. [default: 0.05]")
@click.option("--select-by", type=click.Choice(["loss", "adapted_rand_error", "pixel_error"]),
              help="Validation score that picks the best model. [default: loss]")
@click.option("--keep-checkpoints", type=click.IntRange(min=1), help="Resumable checkpoints kept. [default: 2]")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), help="Stop (with a checkpoint) after this many minutes.")
@click.option("--log-every", type=click.IntRange(min=1), help="Training-loss log line every N steps. [default: 10]")
@click.option("--voxel-size", type=click.Tuple([float, float, float]), help="Voxel size z y x in nm, recorded in the checkpoint.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in -o.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run in -o.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--cluster", help="A SLURM profile (slurm, or a profile YAML): submit the training as one sbatch job.")
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True, help="SLURM nodes (with --cluster).")
@click.option("--gpus-per-node", type=click.IntRange(min=0), default=0, show_default=True,
              help="GPUs per node, one DDP process each (with --cluster).")
@click.option("--tasks-per-node", type=click.IntRange(min=1),
              help="DDP processes per node (with --cluster; default: --gpus-per-node, else 1).")
@click.pass_context
def train(ctx: click.Context, /, raws: tuple[str, ...], labels: tuple[str, ...], val_raws: tuple[str, ...], val_labels: tuple[str, ...],
          labels_kind: str, config_file: str | None, as_json: bool, cluster: str | None, nodes: int,
          gpus_per_node: int, tasks_per_node: int | None, **options: Any) -> None:
    """Train a model on raw EM + labels and write a checkpoint directory.

    \b
    emseg train --raw isbi/train-volume.tif[0:16] --labels isbi/train-labels.tif[0:16] \\
                --val-raw isbi/train-volume.tif[16:20] --val-labels isbi/train-labels.tif[16:20] \\
                --model unet -o ckpt/ --steps 500
    """
    from emseg.errors import ConfigError
    from emseg.training import load_train_config
    from emseg.training import train as run_training

    overrides: dict[str, Any] = {}
    for name, value in options.items():
        if name == "affinity_offsets":
            continue
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT) and value is not None:
            overrides[_FIELDS[name]] = value
    for flag, what, raw_list, label_list in (("--raw", "train", raws, labels), ("--val-raw", "val", val_raws, val_labels)):
        if len(raw_list) != len(label_list):
            raise ConfigError(f"{flag} given {len(raw_list)} time(s) but its labels {len(label_list)} time(s); pass one labels path per raw path")
        if raw_list:
            overrides[what] = [{"raw": r, "labels": lab, "labels_kind": labels_kind} for r, lab in zip(raw_list, label_list, strict=True)]
    if config_file is None and "train" not in overrides:
        raise click.UsageError("give --raw and --labels (or --config FILE)")
    if config_file is None and "output" not in overrides:
        raise click.UsageError("give -o/--output (or --config FILE)")
    offsets = options.get("affinity_offsets")
    if offsets is not None:
        try:
            overrides["affinity_offsets"] = [[int(v) for v in part.split(",")] for part in offsets.split(";") if part.strip()]
        except ValueError as e:
            raise ConfigError(f"--affinity-offsets {offsets!r}: expected integers like '-1,0,0;0,-1,0' ({e})") from e
    cfg = load_train_config(config_file, overrides)
    if cluster is not None:
        _submit_to_slurm(cfg, cluster, nodes=nodes, gpus_per_node=gpus_per_node, tasks_per_node=tasks_per_node,
                         as_json=as_json)
        return
    report = run_training(cfg)
    if _rank() != 0:  # under srun/torchrun every process runs this command; one report is enough
        return
    if as_json:
        from dataclasses import asdict

        click.echo(json.dumps(asdict(report), indent=2))
    else:
        click.echo(report.summary())


def _rank() -> int:
    return int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0")))


def _submit_to_slurm(cfg: Any, cluster: str, *, nodes: int, gpus_per_node: int, tasks_per_node: int | None,
                     as_json: bool) -> None:
    """Run the resolved config as one sbatch job: ``srun emseg train --config`` on every task."""
    from emseg.cluster import load_profile, submit_training
    from emseg.errors import ConfigError

    profile = load_profile(cluster)
    if profile.kind != "slurm":
        raise ConfigError(f"--cluster {cluster}: training is submitted to SLURM only (kind slurm, got "
                          f"{profile.kind}); use --nproc N for processes on this machine")
    output = Path(cfg.output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    config_path = output.parent / f".{output.name}.train-config.json"  # beside the run, sent by value
    config_path.write_text(cfg.model_dump_json(indent=2))
    argv = ["--config", str(config_path)] + (["--json"] if as_json else [])
    job_id = submit_training(argv, nodes=nodes, gpus_per_node=gpus_per_node, tasks_per_node=tasks_per_node,
                             profile=profile)
    report = output / "train_report.json"
    click.echo(report.read_text() if as_json and report.is_file() else
               f"SLURM job {job_id} trained {output} ({nodes} node(s)); report in {report}")
