"""The training loop: ``train(cfg) -> TrainReport`` (single process, spawned DDP, or SLURM/torchrun).

Output directory (``cfg.output``)::

    model.safetensors, config.json   best model so far (lowest validation loss; the last one without
                                     validation): emseg.models.load_checkpoint(output) loads it
    checkpoints/step-N/              resumable checkpoints (see emseg.training.state)
    metrics.jsonl                    one JSON object per line: {"step", "split": "train"|"val", ...}
    curves.png                       loss and validation metric curves
    train_config.json                the resolved TrainConfig
    train_report.json                the TrainReport of the finished run

Only rank 0 validates and writes; every rank draws its share of the same global batch (see
:func:`emseg.training.data.sample_batch`), and DDP averages the gradients.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from emseg.errors import CheckpointError, ConfigError, OutputExistsError
from emseg.training import state as ckpt_state
from emseg.training.config import TrainConfig
from emseg.training.data import load_source, nearest_offsets, normalization_of, sample_batch
from emseg.training.distributed import DistInfo, free_port, launcher_env
from emseg.training.losses import total_loss
from emseg.training.validation import predict_volume, validate

log = logging.getLogger(__name__)

__all__ = ["TrainReport", "predict_volume", "train"]


@dataclass(frozen=True)
class TrainReport:
    """What a finished (or early-stopped) run did."""

    output: str
    """The checkpoint directory (best model at its top level)."""
    start_step: int
    """Step the run started after (0, or the resumed checkpoint's step)."""
    steps: int
    """Last step trained."""
    world_size: int
    """DDP processes."""
    stopped_early: bool
    """Early stopping ended the run before ``cfg.steps``."""
    final_train_loss: float | None
    """Mean training loss of the last logged steps (all ranks)."""
    best_step: int | None
    """Step of the best validation score (``select_by``; the model at the output's top level)."""
    best_val: dict[str, float] = field(default_factory=dict)
    """Validation loss and scores at ``best_step``."""
    seconds: float = 0.0
    """Wall time of this invocation."""

    def summary(self) -> str:
        line = f"trained steps {self.start_step + 1}..{self.steps} on {self.world_size} process(es) in {self.seconds:.0f} s"
        if self.stopped_early:
            line += " (stopped early)"
        if self.final_train_loss is not None:
            line += f"; train loss {self.final_train_loss:.4f}"
        if self.best_val:
            scores = ", ".join(f"{k} {v:.4f}" for k, v in self.best_val.items())
            line += f"; best validation at step {self.best_step}: {scores}"
        return line + f"\ncheckpoint: {self.output}"


# ------------------------------------------------------------------------------------------ API
def train(cfg: TrainConfig) -> TrainReport:
    """Train a model as configured; the single entry point of :mod:`emseg.training`.

    Launch: under torchrun/SLURM (see :mod:`emseg.training.distributed`) this process is one rank;
    otherwise ``cfg.nproc`` processes are spawned here (``nproc == 1``: trains in this process).

    Raises
    ------
    OutputExistsError
        ``cfg.output`` holds a run and neither ``resume`` nor ``overwrite`` is set.
    VolumeNotFoundError, VolumeShapeError, UnsupportedDtypeError, ConfigError, CheckpointError
        Unusable data, options or checkpoint.
    """
    started = time.time()
    env = launcher_env()
    # missing inputs fail before the output is touched or processes are spawned
    _check_sources(cfg)
    check_training_memory(cfg)
    from emseg.engine.lock import run_lock

    if env is None:
        with run_lock(cfg.output, "train"):  # one run per output directory
            _prepare_output(cfg)
            if cfg.nproc == 1:
                return _run(cfg, DistInfo(0, 1, 0, "single"), started)
            port = free_port()
            from torch.multiprocessing.spawn import spawn

            spawn(_spawned, args=(cfg, port), nprocs=cfg.nproc, join=True)  # type: ignore[no-untyped-call]
            return _read_report(Path(cfg.output))
    if env.is_main:  # under srun/torchrun the main rank holds the lock for all ranks
        with run_lock(cfg.output, "train"):
            _prepare_output(cfg)
            return _run(cfg, env, started)
    return _run(cfg, env, started)


def check_training_memory(cfg: TrainConfig, available: int | None = None) -> int:
    """Estimate the peak bytes one training process needs and refuse more than this machine has.

    Counts the parameters on the ``meta`` device (nothing is allocated) at 16 bytes each (weights,
    gradients, two Adam moments) plus the activations kept for the backward pass (about 16 feature
    maps of the first level's width per input voxel, float32).  Returns the estimate in bytes.

    Raises
    ------
    ResourceLimitError
        The estimate exceeds ``available`` (default: the memory available now).
    """
    import psutil

    from emseg.errors import ResourceLimitError

    with torch.device("meta"):
        model = _build_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    per_process = max(1, cfg.batch_size // max(1, cfg.nproc))
    try:
        input_shape = tuple(_unwrap(model).valid_input_shape(tuple(cfg.patch_shape)))
    except Exception:  # noqa: BLE001 - the real build reports a bad shape with its own message
        input_shape = tuple(cfg.patch_shape)
    activations = per_process * math.prod(input_shape) * cfg.base_channels * 16 * 4
    need = params * 16 + activations
    limit = psutil.virtual_memory().available if available is None else available
    if need > limit:
        raise ResourceLimitError(
            f"training {cfg.model} (base_channels {cfg.base_channels}, depth {cfg.depth}) on patches "
            f"{'x'.join(map(str, input_shape))} x {per_process} per process needs about {need / 2**30:.1f} GiB "
            f"({params:,} parameters, activations {activations / 2**30:.1f} GiB) but {limit / 2**30:.1f} GiB is "
            "available; use a smaller --patch-shape, --batch-size or --base-channels"
        )
    return need


# ---------------------------------------------------------------------------------- processes
def _spawned(index: int, cfg: TrainConfig, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    _run(cfg, DistInfo(index, cfg.nproc, index, "spawn"), time.time())


def _check_sources(cfg: TrainConfig) -> None:
    from emseg.errors import VolumeNotFoundError
    from emseg.training.data import parse_data_path

    for source in (*cfg.train, *cfg.val):
        for spec in (source.raw, source.labels):
            path, _ = parse_data_path(spec)
            if not path.exists() and not any(p.suffix.lower() in (".h5", ".hdf5", ".hdf") and p.exists() for p in path.parents):
                raise VolumeNotFoundError(f"{path}: no such file or directory (training data)")


def _check_not_input(cfg: TrainConfig, out: Path) -> None:
    """Refuse an output directory that is, holds or lies inside a training input."""
    from emseg.errors import SameInputOutputError
    from emseg.training.data import parse_data_path

    specs = [s for source in (*cfg.train, *cfg.val) for s in (source.raw, source.labels)]
    paths = [parse_data_path(s)[0] for s in specs] + ([Path(cfg.init)] if cfg.init else [])
    dst = out.resolve()
    for path in paths:
        src = path.resolve()
        if src == dst or dst in src.parents or src in dst.parents:
            raise SameInputOutputError(f"-o {out} would overwrite the training input {path}; choose another output directory")


def _prepare_output(cfg: TrainConfig) -> None:
    from emseg.io.safety import made_by_emseg, overwrite_hint

    out = Path(os.path.realpath(cfg.output))  # through a symlink: the directory it points to
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a directory; choose another -o")
    _check_not_input(cfg, out)
    # a directory holding only train_config.json is a run that failed before its first step
    has_run = out.is_dir() and any(p.name != "train_config.json" for p in out.iterdir())
    if has_run and not made_by_emseg(out):
        raise OutputExistsError(f"{out}: already exists and is not an emseg checkpoint directory; {overwrite_hint(out)}")
    if has_run and not cfg.resume:
        if not cfg.overwrite:
            raise OutputExistsError(f"{out}: already holds a training run; pass --resume to continue it or --overwrite to replace it")
        shutil.rmtree(out)
    if cfg.resume and ckpt_state.latest_checkpoint(out / "checkpoints") is None:
        log.warning("--resume: no checkpoint in %s, starting from step 0", out / "checkpoints")
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(cfg.to_json() + "\n")


def _read_report(out: Path) -> TrainReport:
    try:
        return TrainReport(**json.loads((out / "train_report.json").read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{out}: the training processes ended without a train_report.json ({e})") from e


# --------------------------------------------------------------------------------------- model
class _TrainModule(nn.Module):
    """What DDP wraps: forward returns the logits, or every head's logits with deep supervision."""

    def __init__(self, model: nn.Module, deep_supervision: bool) -> None:
        super().__init__()
        self.model = model
        self.deep_supervision = deep_supervision

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.deep_supervision:
            heads: list[torch.Tensor] = self.model.forward_heads(x)  # type: ignore[operator]
            return heads
        out: torch.Tensor = self.model(x)
        return out


def _unwrap(model: nn.Module) -> Any:
    while hasattr(model, "module") or isinstance(model, _TrainModule):
        model = model.module if hasattr(model, "module") else model.model  # type: ignore[assignment]
    return model


def _build_model(cfg: TrainConfig) -> Any:
    from emseg.models import MODELS, build

    if cfg.model not in MODELS:
        raise ConfigError(f"unknown model {cfg.model!r}; choose one of {', '.join(MODELS)}")
    kwargs: dict[str, Any] = dict(
        ndim=cfg.ndim, in_channels=1, out_channels=cfg.out_channels, base_channels=cfg.base_channels,
        depth=cfg.depth, padding=cfg.padding, batch_norm=cfg.batch_norm, dropout=cfg.dropout,
    )
    accepted = inspect.signature(MODELS[cfg.model].__init__).parameters
    if "depth" not in accepted:  # FCN-8s: a fixed VGG-style depth
        kwargs.pop("depth")
    if "dropout" not in accepted:
        if cfg.dropout:
            raise ConfigError(f"model {cfg.model!r} has no dropout option; leave dropout at 0")
        kwargs.pop("dropout")
    if cfg.deep_supervision and not hasattr(MODELS[cfg.model], "forward_heads"):
        raise ConfigError(f"deep supervision needs a model with several heads (unetpp), not {cfg.model!r}")
    return build(cfg.model, **kwargs)


def _offsets(cfg: TrainConfig) -> tuple[tuple[int, ...], ...] | None:
    if cfg.target != "affinities":
        return None
    return cfg.affinity_offsets if cfg.affinity_offsets is not None else nearest_offsets(cfg.ndim)


def _outputs(cfg: TrainConfig) -> tuple[str, ...]:
    """Channel names: ``aff_z, aff_y, aff_x`` for the nearest neighbours, ``aff_z3`` for ``(-3, 0, 0)``."""
    offsets = _offsets(cfg)
    if offsets is not None:
        axes = "zyx"[-cfg.ndim :]
        names = []
        for o in offsets:
            nonzero = [(a, v) for a, v in zip(axes, o, strict=True) if v]
            if len(nonzero) == 1 and nonzero[0][1] == -1:
                names.append(f"aff_{nonzero[0][0]}")
            else:
                names.append("aff_" + "_".join(f"{a}{-v}" for a, v in zip(axes, o, strict=True)))
        return tuple(names)
    return ("membrane",) if cfg.target == "membrane" else ("mask",)


# ---------------------------------------------------------------------------------------- loop
def _run(cfg: TrainConfig, dist_info: DistInfo, started: float) -> TrainReport:
    import torch.distributed as dist

    world = dist_info.world_size
    rank = dist_info.rank
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{dist_info.local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif world > 1 and not use_cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // min(world, os.cpu_count() or 1)))
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    try:
        return _loop(cfg, dist_info, device, started)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimiser step ``step`` (1-based) under ``cfg.lr_schedule``."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    done = min(max(step - 1, 0) / max(cfg.steps - 1, 1), 1.0)
    floor = 0.01 * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * done))


def _loop(cfg: TrainConfig, dist_info: DistInfo, device: torch.device, started: float) -> TrainReport:
    import torch.distributed as dist

    world, rank, main = dist_info.world_size, dist_info.rank, dist_info.is_main
    out = Path(cfg.output)
    torch.manual_seed(cfg.seed)
    volumes = [load_source(s, cfg) for s in cfg.train]
    val_volumes = [load_source(s, cfg) for s in cfg.val] if main else []
    model = _build_model(cfg).to(device)
    input_shape = model.valid_input_shape(cfg.patch_shape)
    output_shape = model.output_shape(input_shape)
    params = model.parameters()
    optimizer: torch.optim.Optimizer
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    loop_state: dict[str, Any] = {"step": 0, "best_val_loss": None, "best_step": None, "best_val": {}, "bad_validations": 0}
    normalization = normalization_of(volumes)
    latest = ckpt_state.latest_checkpoint(out / "checkpoints") if cfg.resume else None
    if latest is not None:
        from emseg.models import load_checkpoint

        loaded = load_checkpoint(latest)
        try:
            model.load_state_dict(loaded.model.state_dict())
        except RuntimeError as e:
            raise CheckpointError(f"{latest}: weights do not fit the configured model ({e}); resume with the same model options") from e
        ckpt_state.load_optimizer(optimizer, latest)
        loop_state.update(ckpt_state.load_train_state(latest))
        normalization = (loaded.config.normalization.mean, loaded.config.normalization.std)
        if main:
            log.info("resuming from %s (step %d)", latest, loop_state["step"])
            _truncate_metrics(out / "metrics.jsonl", loop_state["step"])
    if cfg.init is not None and latest is None:
        # the warm-started weights expect their own input scaling: train, validate and save with it
        normalization = _load_init(model, cfg.init)
        if main:
            log.info("weights initialised from %s (its normalization %.4f/%.4f)", cfg.init, *normalization)
    if cfg.channels_last:
        model = model.to(memory_format=_channels_last(cfg.ndim))
    start_step = int(loop_state["step"])
    if main:
        log.info(
            "training %s: input %s -> output %s, %d step(s) from %d, batch %d on %d process(es), normalization %.4f/%.4f",
            cfg.model, input_shape, output_shape, cfg.steps - start_step, start_step, cfg.batch_size, world, *normalization,
        )

    module: nn.Module = _TrainModule(model, cfg.deep_supervision)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        module = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    module.train()

    recent: list[float] = []
    final_train_loss: float | None = None
    stopped_early = False
    step = start_step
    t_last = time.time()
    for step in range(start_step + 1, cfg.steps + 1):
        batch = sample_batch(
            volumes, cfg, input_shape, output_shape, step=step, rank=rank, world_size=world, normalization=normalization
        )
        x = torch.from_numpy(batch.raw).to(device)
        target = torch.from_numpy(batch.target).to(device)
        weight = torch.from_numpy(batch.weight).to(device) if batch.weight is not None else None
        if cfg.channels_last:
            x = x.contiguous(memory_format=_channels_last(cfg.ndim))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(cfg, device):
            outputs = module(x)
        # the loss (sigmoid, BCE, Dice sums) is computed in float32 whatever the forward's precision
        outputs = outputs.float() if isinstance(outputs, torch.Tensor) else [o.float() for o in outputs]
        loss = total_loss(cfg.loss, outputs, target, weight)
        if not torch.isfinite(loss):
            raise ConfigError(f"the training loss became {loss.item()} at step {step}; lower --lr")
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        recent.append(float(loss.detach()))

        if step % cfg.log_every == 0 or step == cfg.steps:
            mean_loss = torch.tensor([float(np.mean(recent))], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(mean_loss)
                mean_loss /= world
            final_train_loss = float(mean_loss.item())
            now = time.time()
            if main:
                seconds = (now - t_last) / len(recent)
                _append_metrics(out, {"step": step, "split": "train", "loss": final_train_loss, "seconds_per_step": seconds})
                log.info("step %d: train loss %.4f (%.2f s/step)", step, final_train_loss, seconds)
            recent, t_last = [], now

        validating = bool(cfg.val) and (step % cfg.val_every == 0 or step == cfg.steps)
        stop = torch.zeros(1)
        improved = False
        if validating and main:
            scores = validate(model, val_volumes, cfg, normalization)
            _append_metrics(out, {"step": step, "split": "val", **scores})
            log.info("step %d: validation %s", step, ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
            best = loop_state["best_val_loss"]  # the best select_by score so far (the loss by default)
            if best is None or scores[cfg.select_by] < best:
                loop_state.update(best_val_loss=scores[cfg.select_by], best_step=step, best_val=scores, bad_validations=0)
                improved = True
            else:
                loop_state["bad_validations"] += 1
                if cfg.patience and loop_state["bad_validations"] >= cfg.patience:
                    stop[0] = 1
        if validating and world > 1:
            dist.broadcast(stop, src=0)
        if cfg.time_limit_min is not None and time.time() - started > 60.0 * cfg.time_limit_min:
            stop[0] = 1  # every rank measures its own clock; rank 0's decision is broadcast below
            if main:
                log.info("time limit of %g min reached at step %d", cfg.time_limit_min, step)
        if cfg.time_limit_min is not None and world > 1:
            dist.broadcast(stop, src=0)
        stopped_early = bool(stop[0])
        checkpoint = step % cfg.checkpoint_every == 0 or step == cfg.steps or stopped_early
        if main and (improved or (not cfg.val and checkpoint)):
            _save_model(model, out, cfg, normalization, step, loop_state)
        if checkpoint:
            loop_state["step"] = step
            if main:
                _save_resumable(model, optimizer, out, cfg, normalization, dict(loop_state))
                _plot_curves(out)
            if world > 1:
                dist.barrier()
        if stopped_early:
            if main and cfg.patience and loop_state["bad_validations"] >= cfg.patience:
                log.info("early stopping at step %d: no lower validation loss in %d validations", step, cfg.patience)
            break

    report = TrainReport(
        output=str(out),
        start_step=start_step,
        steps=step,
        world_size=world,
        stopped_early=stopped_early,
        final_train_loss=final_train_loss,
        best_step=loop_state["best_step"],
        best_val=dict(loop_state["best_val"]),
        seconds=time.time() - started,
    )
    if main:
        _plot_curves(out)
        (out / "train_report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def _autocast(cfg: TrainConfig, device: torch.device) -> Any:
    """bf16 autocast of the forward pass (``cfg.precision == "bf16"``), else a disabled context."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=resolved_precision(cfg, device) == "bf16")


def resolved_precision(cfg: TrainConfig, device: torch.device) -> str:
    """``cfg.precision``, with ``auto`` resolved for ``device`` (:func:`emseg.ops.inference.default_precision`)."""
    if cfg.precision != "auto":
        return cfg.precision
    from emseg.ops.inference import default_precision

    return default_precision(device.type)


def _channels_last(ndim: int) -> torch.memory_format:
    return torch.channels_last if ndim == 2 else torch.channels_last_3d


def _load_init(model: nn.Module, init: str) -> tuple[float, float]:
    """Copy the weights of checkpoint ``init`` into ``model`` (same architecture and output channels);
    return its normalization ``(mean, std)``."""
    from emseg.models import load_checkpoint

    loaded = load_checkpoint(init)
    try:
        model.load_state_dict(loaded.model.state_dict())
    except RuntimeError as e:
        raise CheckpointError(f"--init {init}: its weights do not fit the configured model ({e}); use the same "
                              "--model, --base-channels, --depth, --padding and target") from e
    return loaded.config.normalization.mean, loaded.config.normalization.std


# ------------------------------------------------------------------------------------- outputs
def _provenance(cfg: TrainConfig, step: int, loop_state: dict[str, Any]) -> dict[str, Any]:
    return {
        "trained_with": "emseg train",
        "step": step,
        "train": [s.model_dump() for s in cfg.train],
        "val": [s.model_dump() for s in cfg.val],
        "validation": {k: v for k, v in loop_state.get("best_val", {}).items() if math.isfinite(v)},
        "train_config": cfg.model_dump(mode="json"),
    }


def _save_model(model: Any, out: Path, cfg: TrainConfig, normalization: tuple[float, float], step: int, loop_state: dict[str, Any]) -> None:
    """Write the model to ``out``'s top level: files written aside, then each moved in with os.replace."""
    from emseg.models import save_checkpoint

    tmp = out / ".tmp-best"
    shutil.rmtree(tmp, ignore_errors=True)
    _save_checkpoint_files(save_checkpoint, model, tmp, cfg, normalization, step, loop_state)
    for f in sorted(tmp.iterdir()):
        os.replace(f, out / f.name)
    tmp.rmdir()


def _save_checkpoint_files(
    save_checkpoint: Any, model: Any, directory: Path, cfg: TrainConfig, normalization: tuple[float, float], step: int, loop_state: dict[str, Any]
) -> None:
    activation = "sigmoid"
    save_checkpoint(
        _unwrap(model),
        directory,
        outputs=_outputs(cfg),
        activation=activation,
        normalization={"mean": normalization[0], "std": normalization[1]},
        voxel_size_nm=cfg.voxel_size_nm,
        offsets=_offsets(cfg),
        provenance=_provenance(cfg, step, loop_state),
    )


def _save_resumable(
    model: Any, optimizer: torch.optim.Optimizer, out: Path, cfg: TrainConfig, normalization: tuple[float, float], loop_state: dict[str, Any]
) -> None:
    from emseg.models import save_checkpoint

    step = int(loop_state["step"])

    def fill(directory: Path) -> None:
        _save_checkpoint_files(save_checkpoint, model, directory, cfg, normalization, step, loop_state)
        ckpt_state.save_optimizer(optimizer, directory)
        (directory / "state.json").write_text(json.dumps(loop_state, indent=2) + "\n")

    checkpoints = out / "checkpoints"
    checkpoints.mkdir(exist_ok=True)
    ckpt_state.write_atomic_dir(checkpoints / ckpt_state.step_dir_name(step), fill)
    ckpt_state.prune(checkpoints, cfg.keep_checkpoints)
    log.info("checkpoint at step %d: %s", step, checkpoints / ckpt_state.step_dir_name(step))


def _append_metrics(out: Path, record: dict[str, Any]) -> None:
    record = {**record, "time": round(time.time(), 3)}
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records after ``step`` (written after the checkpoint a resumed run restarts from)."""
    kept = [r for r in _read_metrics(path) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def _plot_curves(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = _read_metrics(out / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        axes[0].plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation loss")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    for key in ("dice", "iou", "pixel_error", "adapted_rand_error"):
        pts = [(r["step"], r[key]) for r in val if key in r]
        if pts:
            axes[1].plot(*zip(*pts, strict=True), "o-", label=key)
    axes[1].set_xlabel("step")
    axes[1].set_title("validation")
    if axes[1].lines:
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / ".curves.tmp.png", dpi=80)
    plt.close(fig)
    os.replace(out / ".curves.tmp.png", out / "curves.png")
