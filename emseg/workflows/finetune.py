"""Bring your own volume: fine-tune a model on a labelled volume and calibrate its merge threshold.

:func:`finetune` (``emseg finetune``) goes from a user's raw + labels to a calibrated checkpoint:

1. the labelled volume is split: the last ``val_fraction`` of its longest axis (in nanometres) is held
   out for validation, the rest is trained on;
2. the starting model (the bundled one ``emseg segment`` would choose for the voxel size, or
   ``model``) is scored on the held-out part by the real pipeline: :func:`emseg.workflows.segment.segment`
   (predict -> fragments -> region graph -> agglomeration at every threshold of a sweep) and
   :func:`emseg.workflows.evaluate.evaluate_sweep` (adapted Rand error and VOI);
3. training (:func:`emseg.training.train`, warm-started from the model) runs in rounds within the time
   budget; after each round the newest weights are scored the same way;
4. the weights and threshold that score best on the held-out part *with a margin against merges* win
   (below); the threshold is written into the checkpoint's ``config.json`` as
   ``agglomeration_threshold``, which ``emseg segment --model CKPT`` uses.

:func:`calibrate` (``emseg calibrate``) is step 2 alone on all the labels: the model's weights are
kept (copied) and only the threshold is chosen, by the same rule.

The threshold rule. The score is ARE + VOI (split + merge), lower is better; each threshold ``t`` of
the sweep is judged by the *worse* of its own score and the score of the next threshold of the sweep
above it (:meth:`ModelScores.margin_total`), and the lowest of those wins, ties toward the lower
threshold.  Why not the plain optimum: the errors are not symmetric.  Above its optimum a threshold
soon falls off a merge cliff (whole neurites fuse; for the 2-D model the cliff sits 0.02-0.05 above the
optimum), below it the error grows slowly, as splits.  A false merge costs a proofreader more than a
split, and production pipelines err toward over-segmentation for that reason.  The held-out part is
a small strip of one crop; on the next volume the cliff can sit a little lower, and a threshold chosen
at the exact optimum of the strip then merges.  Requiring the next step up (0.05 on the default sweep
above 0.5) to score well as well keeps one sweep step between the chosen threshold and the cliff as
seen on the held-out data; where the curve is flat on both sides the optimum itself is kept.  The
rule is decided from the labelled volume alone: nothing of the volume to be segmented is used.
Checkpoints are compared by the same margin score at their chosen thresholds (:func:`choose_model`).

Work in progress lives in a hidden directory beside the output (``.NAME.finetune``): rerunning the
same command resumes there; the output directory appears only when complete (one rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from emseg.engine.lock import locked
from emseg.errors import (
    ConfigError,
    InvalidDataError,
    OutputExistsError,
    UnsupportedDtypeError,
    VolumeNotFoundError,
    VolumeShapeError,
)
from emseg.workflows.agglomerate import choose_mode

log = logging.getLogger(__name__)

__all__ = [
    "SWEEP",
    "CalibrationReport",
    "FinetuneReport",
    "LabelledVolume",
    "ModelScores",
    "calibrate",
    "choose_model",
    "finetune",
    "holdout_split",
    "load_labelled",
]

LabelsKind = Literal["auto", "instances", "membrane-mask", "interior-mask"]

#: Merge thresholds scored on the held-out labels (1 - mean affinity / membrane probability of an edge).
SWEEP = (0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)

#: Fine-tuning defaults on a CPU: small patches, a low constant learning rate (the weights start
#: trained), batch 2.  A 3-D patch of 40^3 costs ~1/1.7 of the 48^3 the bundled 3-D model trained on.
PATCH_3D = (40, 40, 40)
PATCH_2D = (256, 256)
LR = 1e-4
BATCH = 2
MAX_ROUNDS = 4


# ---------------------------------------------------------------------------------------------
# input


@dataclass(frozen=True)
class LabelledVolume:
    """A user's labelled volume: raw ``uint8 (z, y, x)``, labels of the same shape, voxel size in nm."""

    raw: npt.NDArray[np.uint8]
    labels: npt.NDArray[Any]
    voxel_size: tuple[float, float, float]
    raw_spec: str
    labels_spec: str


def _read_spec(spec: str, what: str) -> tuple[npt.NDArray[Any], Path]:
    """A ``path[z0:z1]`` volume, with the section range checked against the volume (no silent clipping)."""
    from emseg.io import load_array
    from emseg.training.data import parse_data_path

    path, zslice = parse_data_path(spec)
    if not path.exists():
        raise VolumeNotFoundError(f"--{what} {path}: no such file or directory")
    array = load_array(path)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise VolumeShapeError(f"--{what} {spec}: expected a (z, y, x) volume, got shape {array.shape}")
    n = array.shape[0]
    z0 = 0 if zslice.start is None else zslice.start
    z1 = n if zslice.stop is None else zslice.stop
    if z0 < 0 or z1 < 0:
        raise VolumeShapeError(f"--{what} {spec}: negative section numbers; give [z0:z1] with 0 <= z0 < z1 <= {n}")
    if not z0 < z1 <= n:
        raise VolumeShapeError(f"--{what} {spec}: sections [{z0}:{z1}] are outside the volume's {n} sections "
                               f"(0..{n - 1}); give [z0:z1] with 0 <= z0 < z1 <= {n}")
    return array[z0:z1], path


def _voxel_size_of(path: Path) -> tuple[float, float, float] | None:
    from emseg.io import open_volume
    from emseg.io.sources import open_source

    try:
        size = tuple(float(v) for v in open_volume(path).voxel_size)
    except Exception:  # noqa: BLE001 - not a zarr volume: the file's own metadata, if any
        try:
            vs = open_source(path).voxel_size
        except Exception:  # noqa: BLE001
            return None
        size = tuple(float(v) for v in vs) if vs else ()
    if len(size) != 3 or all(v == 1.0 for v in size):  # 1 nm: none recorded
        return None
    return (size[0], size[1], size[2])


def load_labelled(raw: str, labels: str, *, voxel_size: Sequence[float] | None = None,
                  labels_kind: LabelsKind = "auto") -> LabelledVolume:
    """Read and check a labelled volume; every problem is one :class:`~emseg.errors.EmsegError`.

    Raises
    ------
    VolumeNotFoundError, VolumeShapeError, UnsupportedDtypeError, InvalidDataError, ConfigError
    """
    raw_array, raw_path = _read_spec(raw, "raw")
    label_array, _ = _read_spec(labels, "labels")
    if raw_array.shape != label_array.shape:
        raise VolumeShapeError(f"--raw {raw} has shape {raw_array.shape} but --labels {labels} has "
                               f"{label_array.shape}; they must cover the same voxels")
    if raw_array.dtype != np.uint8:
        raise UnsupportedDtypeError(f"--raw {raw}: expected uint8 EM, got {raw_array.dtype}; convert it first")
    if label_array.dtype.kind not in "biu":
        raise UnsupportedDtypeError(f"--labels {labels}: expected integer labels, got {label_array.dtype}")
    values = np.unique(label_array)
    ids = values[values != 0] if labels_kind == "instances" or (labels_kind == "auto" and len(values) > 2) else values
    if len(ids) < 2:
        raise InvalidDataError(f"--labels {labels}: holds a single {'id' if len(values) else 'value'} "
                               f"({values.tolist()[:3]}); label at least two segments (instance ids, or a "
                               "membrane mask with both values)")
    size = tuple(float(v) for v in voxel_size) if voxel_size is not None else _voxel_size_of(raw_path)
    if size is None:
        raise ConfigError(f"--raw {raw}: records no voxel size; pass --voxel-size Z,Y,X (nm), which picks the "
                          "model and the 2-D/3-D labelling as emseg segment does")
    if len(size) != 3 or not all(math.isfinite(v) and v > 0 for v in size):
        raise ConfigError(f"--voxel-size needs 3 positive values z,y,x in nm, got {size}")
    return LabelledVolume(raw_array, label_array, (size[0], size[1], size[2]), raw, labels)


def holdout_split(shape: Sequence[int], voxel_size: Sequence[float], fraction: float) -> tuple[int, int]:
    """``(axis, cut)``: validation is ``[cut:]`` along ``axis``, the longest axis in nanometres.

    A thin stack of large sections (3 x 500 x 500 at 40 x 4 x 4 nm) keeps every section for training
    and holds out a strip of each; a deep stack holds out its last sections.
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"--val-fraction must lie between 0 and 1, got {fraction}")
    axis = int(np.argmax([n * v for n, v in zip(shape, voxel_size, strict=True)]))
    n = int(shape[axis])
    cut = n - max(1, round(n * fraction))
    if cut < 1:
        raise VolumeShapeError(f"the labelled volume {tuple(shape)} is too small to hold out a validation part "
                               f"along axis {'zyx'[axis]}; label a larger volume")
    return axis, cut


def _part(array: npt.NDArray[Any], axis: int, cut: int, which: Literal["train", "val"]) -> npt.NDArray[Any]:
    index: list[slice] = [slice(None)] * 3
    index[axis] = slice(None, cut) if which == "train" else slice(cut, None)
    return np.ascontiguousarray(array[tuple(index)])


def _write_zarr(path: Path, array: npt.NDArray[Any], voxel_size: Sequence[float]) -> None:
    from emseg.geometry import Roi
    from emseg.io import create_volume
    from emseg.io.convert import default_chunks
    from emseg.io.volume import mark_complete

    volume = create_volume(path, shape=array.shape, dtype=array.dtype, chunks=default_chunks(array.shape),
                           voxel_size=voxel_size, overwrite=True, name=path.stem)
    volume.write(Roi((0, 0, 0), array.shape), array)
    mark_complete(path, command="finetune")


# ---------------------------------------------------------------------------------------------
# scoring by the pipeline


@dataclass(frozen=True)
class ModelScores:
    """Pipeline scores of one model on labelled data: ARE, VOI split, VOI merge per merge threshold."""

    name: str
    """``bundled`` (the starting model) or ``step-N``."""
    step: int
    default_threshold: float
    """The threshold ``emseg segment`` uses for this model without flags."""
    scores: dict[str, tuple[float, float, float]]
    """``"0.8" -> (ARE, VOI split, VOI merge)``."""
    seconds: float

    def total(self, threshold: float) -> float:
        are, split, merge = self.scores[f"{threshold:g}"]
        return are + split + merge

    @property
    def thresholds(self) -> list[float]:
        return sorted(float(t) for t in self.scores)

    def margin_total(self, threshold: float) -> float:
        """The worse of ARE + VOI at ``threshold`` and at the next threshold of the sweep above it: what
        ``threshold`` scores if the merge cliff sits one sweep step lower on the next volume (the highest
        threshold of the sweep has no neighbour above and keeps its own score)."""
        above = [t for t in self.thresholds if t > threshold]
        return max(self.total(threshold), self.total(above[0])) if above else self.total(threshold)

    @property
    def best_threshold(self) -> float:
        """The plain optimum: lowest ARE + VOI (ties toward the default threshold). Reported, not chosen."""
        return min(self.thresholds, key=lambda t: (self.total(t), abs(t - self.default_threshold)))

    @property
    def best_total(self) -> float:
        return self.total(self.best_threshold)

    @property
    def chosen_threshold(self) -> float:
        """The threshold written into a checkpoint: lowest :meth:`margin_total`, ties toward the lower
        threshold (more splits, fewer merges)."""
        return min(self.thresholds, key=lambda t: (self.margin_total(t), t))

    @property
    def chosen_total(self) -> float:
        """:meth:`margin_total` at :attr:`chosen_threshold`: how checkpoints are compared."""
        return self.margin_total(self.chosen_threshold)

    def row(self, threshold: float) -> dict[str, float]:
        are, split, merge = self.scores[f"{threshold:g}"]
        return {"threshold": threshold, "adapted_rand_error": are, "voi_split": split, "voi_merge": merge,
                "sum": are + split + merge}


def choose_model(validations: Sequence[ModelScores]) -> ModelScores:
    """The scored weights to keep: lowest :attr:`ModelScores.chosen_total` (the score at the chosen
    threshold with its one-step margin), the earlier on a tie."""
    return min(validations, key=lambda v: v.chosen_total)


def _warm_worker() -> None:
    """Import what a prediction block needs (torch, the models) once, so the first scoring is not
    billed for it."""
    import emseg.models  # noqa: F401
    import emseg.workflows.predict  # noqa: F401


def warm(connection: Any) -> None:
    """Run :func:`_warm_worker` on every worker of ``connection``."""
    client = getattr(connection, "client", connection)
    client.run(_warm_worker)


def score_model(checkpoint: Path, volume: Path, ground_truth: Path, work: Path, *, name: str, step: int,
                thresholds: Sequence[float], gt_kind: LabelsKind, client: Any) -> ModelScores:
    """Segment ``volume`` with ``checkpoint`` as ``emseg segment --model`` does, at every threshold of the
    sweep, and score each against ``ground_truth``."""
    from emseg.config import RunOptions, load_pipeline, segment_overrides
    from emseg.io import read_status
    from emseg.workflows.evaluate import evaluate_sweep
    from emseg.workflows.segment import segment

    start = time.perf_counter()
    out = work / f"{name}_seg.zarr"
    shutil.rmtree(out, ignore_errors=True)
    config = load_pipeline(None, segment_overrides(model=str(checkpoint), thresholds=tuple(thresholds)))
    segment(volume, out, config, run=RunOptions(progress=False, client=client, overwrite=True))
    default = float(read_status(out / "labels" / "segments")["threshold"])
    sweep = evaluate_sweep([out], ground_truth, gt_kind=gt_kind, mode="auto")
    scores: dict[str, tuple[float, float, float]] = {}
    for e in sweep.results:
        t = e.segmentation.threshold
        if t is None:
            continue
        s = e.scores
        scores[f"{t:g}"] = (float(s.adapted_rand_error), float(s.voi_split), float(s.voi_merge))
    shutil.rmtree(out, ignore_errors=True)
    return ModelScores(name, step, default, scores, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# reports


@dataclass(frozen=True)
class FinetuneReport:
    """What :func:`finetune` did: the scores before and after on the held-out part, time, the command."""

    output: Path
    model: str
    """The starting checkpoint."""
    holdout: str
    """Which part was held out, e.g. ``x[150:200] of 50 x 100 x 200``."""
    before: dict[str, float]
    """The starting model on the held-out part at ``emseg segment``'s default threshold."""
    before_calibrated: dict[str, float]
    """The starting model at its best threshold on the held-out part."""
    after: dict[str, float]
    """The written checkpoint at the threshold written into it."""
    chosen: str
    """``step-N`` (fine-tuned weights) or ``bundled`` (the starting weights won)."""
    steps: int
    """Training steps run in all."""
    seconds: float
    """Wall time of this invocation."""
    validations: list[dict[str, Any]] = field(default_factory=list)
    command: str = ""

    def summary(self) -> str:
        def fmt(r: dict[str, float]) -> str:
            return (f"ARE {r['adapted_rand_error']:.4f}, VOI {r['voi_split']:.3f} + {r['voi_merge']:.3f} "
                    f"(sum {r['sum']:.3f}) at threshold {r['threshold']:g}")

        lines = [f"held out {self.holdout} for validation; started from {self.model}",
                 f"before (starting model, emseg segment defaults): {fmt(self.before)}",
                 f"before, threshold calibrated:                    {fmt(self.before_calibrated)}",
                 f"after ({self.chosen}, {self.steps} steps trained): {fmt(self.after)}"]
        if self.chosen == "bundled":
            lines.append("fine-tuning did not beat the starting weights on the held-out part: the checkpoint keeps "
                         "them, with the calibrated threshold")
        lines += [f"took {self.seconds / 60:.1f} min; wrote {self.output} (agglomeration_threshold "
                  f"{self.after['threshold']:g})", f"segment the whole volume: {self.command}"]
        return "\n".join(lines)


@dataclass(frozen=True)
class CalibrationReport:
    """What :func:`calibrate` did."""

    output: Path
    model: str
    before: dict[str, float]
    after: dict[str, float]
    sweep: list[dict[str, float]]
    seconds: float
    command: str = ""

    def summary(self) -> str:
        def fmt(r: dict[str, float]) -> str:
            return (f"ARE {r['adapted_rand_error']:.4f}, VOI {r['voi_split']:.3f} + {r['voi_merge']:.3f} "
                    f"(sum {r['sum']:.3f})")

        return "\n".join([
            f"{self.model} on the labelled volume:",
            f"  emseg segment default (threshold {self.before['threshold']:g}): {fmt(self.before)}",
            f"  calibrated (threshold {self.after['threshold']:g}):             {fmt(self.after)}",
            f"took {self.seconds:.0f} s; wrote {self.output}",
            f"segment with it: {self.command}"])


# ---------------------------------------------------------------------------------------------
# shared plumbing


def _resolve_model(model: str | None, voxel_size: Sequence[float]) -> Path:
    from emseg.models import load_checkpoint_config
    from emseg.models.zoo import choose_bundled

    if model is None:
        choice = choose_bundled(voxel_size)
        log.info("starting model %s: %s", choice.model.path, choice.reason)
        return Path(choice.model.path)
    path = Path(model)
    load_checkpoint_config(path)  # a clear CheckpointError when it is not one
    return path


def _work_dir(output: Path) -> Path:
    return output.parent / f".{output.name}.finetune"


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output}: already exists; choose another -o or pass --overwrite")
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"{output}: exists and is not a directory; choose another -o")


def _gt_kind(kind: LabelsKind) -> LabelsKind:
    return kind


def _command(output: Path, raw: str, voxel_size: Sequence[float]) -> str:
    from emseg.training.data import parse_data_path

    path, _ = parse_data_path(raw)
    size = ",".join(f"{v:g}" for v in voxel_size)
    if path.suffix == ".zarr" or (path / "zarr.json").exists() or (path / ".zattrs").exists():
        return f"emseg segment {path} --model {output}"
    stem = path.with_suffix("").name
    return (f"emseg import {path} {stem}.zarr --voxel-size {size} && "
            f"emseg segment {stem}.zarr --model {output}")


def _publish(staged: Path, output: Path, overwrite: bool) -> None:
    """Move the finished checkpoint into place: one rename, after the old output (if replaced) is gone."""
    if output.exists():
        if not overwrite:
            raise OutputExistsError(f"{output}: appeared while the run was going; the result is kept in {staged}")
        shutil.rmtree(output)
    os.replace(staged, output)


def _write_checkpoint(source: Path, dest: Path, threshold: float, provenance_key: str,
                      provenance: dict[str, Any]) -> None:
    """Copy the weights of checkpoint ``source`` to ``dest`` with ``agglomeration_threshold`` set."""
    from emseg.models import load_checkpoint_config

    config = load_checkpoint_config(source)
    dest.mkdir(parents=True)
    shutil.copy2(source / "model.safetensors", dest / "model.safetensors")
    prov = dict(config.provenance)
    prov.pop("card", None)  # the starting model's card figures are not this checkpoint's
    prov[provenance_key] = provenance
    updated = config.model_copy(update={"agglomeration_threshold": float(threshold), "provenance": prov})
    (dest / "config.json").write_text(updated.model_dump_json(indent=2) + "\n")
    load_checkpoint_config(dest)  # what was written reads back


@contextmanager
def _bar(total_s: float, progress: bool) -> Iterator[Any]:
    from tqdm import tqdm

    with tqdm(total=round(total_s), desc="finetune", unit="s", file=sys.stderr, disable=not progress,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s [{postfix}]") as bar:
        yield bar


def _input_fingerprint(vol: LabelledVolume, model: Path, **params: Any) -> dict[str, Any]:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(vol.raw).tobytes())
    digest.update(np.ascontiguousarray(vol.labels).tobytes())
    weights = model / "model.safetensors"
    return {"data_sha256": digest.hexdigest(), "shape": list(vol.raw.shape), "voxel_size": list(vol.voxel_size),
            "model": str(model.resolve()), "model_bytes": weights.stat().st_size if weights.exists() else None,
            **params}


# ---------------------------------------------------------------------------------------------
# calibrate


@locked("output", "calibrate")
def calibrate(raw: str, labels: str, output: str | os.PathLike[str], *, model: str | None = None,
              voxel_size: Sequence[float] | None = None, labels_kind: LabelsKind = "auto",
              thresholds: Sequence[float] = SWEEP, workers: int = 1, scheduler: str | None = None,
              overwrite: bool = False) -> CalibrationReport:
    """Choose a model's merge threshold on labelled data; write a checkpoint carrying it.

    Segments the labelled volume with the model (the bundled one ``emseg segment`` picks, or
    ``model``) as ``emseg segment`` does, at every threshold of ``thresholds``; the one chosen by the
    module's threshold rule (lowest ARE + VOI with a one-step margin against merges,
    :attr:`ModelScores.chosen_threshold`) becomes the ``agglomeration_threshold`` of ``output`` (the
    weights copied).  The segmentation runs on ``workers`` local worker processes, or on the running
    cluster whose scheduler address is ``scheduler`` (then left running).
    """
    from emseg.cluster import connect
    from emseg.config import AgglomerateOptions

    started = time.perf_counter()
    out = Path(output)
    _check_output(out, overwrite)
    AgglomerateOptions.build(thresholds=tuple(thresholds))  # each in (0, 1): the options' validator
    vol = load_labelled(raw, labels, voxel_size=voxel_size, labels_kind=labels_kind)
    start_model = _resolve_model(model, vol.voxel_size)
    work = _work_dir(out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        _write_zarr(work / "raw.zarr", vol.raw, vol.voxel_size)
        _write_zarr(work / "labels.zarr", vol.labels, vol.voxel_size)
        with connect(workers=workers, scheduler=scheduler) as connection:
            warm(connection)
            scores = score_model(start_model, work / "raw.zarr", work / "labels.zarr", work, name="model", step=0,
                                 thresholds=thresholds, gt_kind=_gt_kind(labels_kind), client=connection)
        best = scores.chosen_threshold
        before = scores.row(scores.default_threshold) if f"{scores.default_threshold:g}" in scores.scores \
            else scores.row(best)
        sweep = [scores.row(float(t)) for t in sorted(scores.scores, key=float)]
        _write_checkpoint(start_model, work / "checkpoint", best, "calibration", {
            "calibrated_with": "emseg calibrate", "raw": raw, "labels": labels, "labels_kind": labels_kind,
            "voxel_size_nm": list(vol.voxel_size), "weights_of": str(start_model), "sweep": sweep,
            "chosen": scores.row(best)})
        _publish(work / "checkpoint", out, overwrite)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return CalibrationReport(out, str(start_model), before, scores.row(best), sweep, time.perf_counter() - started,
                             _command(out, raw, vol.voxel_size))


# ---------------------------------------------------------------------------------------------
# finetune


def _train_config(start: Path, run_dir: Path, train_raw: Path, train_labels: Path, *, labels_kind: LabelsKind,
                  voxel_size: Sequence[float], steps: int, minutes: float, resume: bool, patch_shape:
                  Sequence[int] | None, lr: float, batch_size: int, threads: int, precision: str, seed: int) -> Any:
    """The :class:`~emseg.training.TrainConfig` of one training round: the starting model's
    architecture, target and loss (from its config and recorded training options), fine-tuning
    patch, learning rate and batch."""
    from emseg.models import load_checkpoint_config
    from emseg.training import DataSource, load_train_config

    config = load_checkpoint_config(start)
    arch = dict(config.model)
    if arch.get("anisotropic_levels"):
        raise ConfigError(f"{start}: fine-tuning models with anisotropic levels is not supported; train one "
                          "with emseg train")
    recorded = dict(config.provenance.get("train_config") or {})
    ndim = int(arch["ndim"])
    outputs = tuple(config.outputs)
    target = "affinities" if outputs[0].startswith("aff") else ("mask" if outputs == ("mask",) else "membrane")
    loss = recorded.get("loss") or ("bce-dice" if target == "affinities" else "weighted-ce")
    offsets = None
    if target == "affinities" and config.offsets is not None:
        from emseg.training.data import nearest_offsets

        if tuple(tuple(o) for o in config.offsets) != nearest_offsets(ndim):
            offsets = [list(o) for o in config.offsets]
    fields: dict[str, Any] = {
        "train": [DataSource(raw=str(train_raw), labels=str(train_labels), labels_kind=labels_kind)],
        "target": target, "model": arch["name"], "ndim": ndim, "base_channels": arch["base_channels"],
        "depth": arch["depth"], "padding": arch["padding"], "batch_norm": arch.get("batch_norm", False),
        "dropout": arch.get("dropout", 0.0), "loss": loss, "affinity_offsets": offsets,
        "patch_shape": tuple(patch_shape) if patch_shape is not None else (PATCH_3D if ndim == 3 else PATCH_2D),
        "batch_size": batch_size, "lr": lr, "lr_schedule": "constant", "optimizer": "adam", "steps": steps,
        "checkpoint_every": steps, "keep_checkpoints": 1, "log_every": 10, "output": str(run_dir),
        "seed": seed, "resume": resume, "overwrite": not resume, "init": str(start), "threads": threads, "precision": precision,
        "voxel_size_nm": tuple(voxel_size), "time_limit_min": minutes,
    }
    for name in ("elastic_sigma", "foreground_prob", "affinity_balance", "defect_prob", "w0", "sigma",
                 "intensity"):
        if name in recorded:
            fields[name] = recorded[name]
    # this volume's own geometry: a near-isotropic one is seen in every orientation (sections along z, y
    # and x for a 2-D model), whatever the starting model was trained on
    fields["isotropic"] = choose_mode(voxel_size) == "3d"
    return load_train_config(None, fields)


def _read_validations(path: Path) -> list[ModelScores]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            out.append(ModelScores(r["name"], r["step"], r["default_threshold"],
                                   {k: tuple(v) for k, v in r["scores"].items()}, r["seconds"]))
    return out


def _append_validation(path: Path, s: ModelScores) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"name": s.name, "step": s.step, "default_threshold": s.default_threshold,
                            "scores": {k: list(v) for k, v in s.scores.items()}, "seconds": s.seconds}) + "\n")


@locked("output", "finetune")
def finetune(raw: str, labels: str, output: str | os.PathLike[str], *, model: str | None = None,
             voxel_size: Sequence[float] | None = None, labels_kind: LabelsKind = "auto",
             time_limit_min: float = 15.0, val_fraction: float = 0.25, max_steps: int = 5000,
             patch_shape: Sequence[int] | None = None, lr: float = LR, batch_size: int = BATCH,
             precision: Literal["auto", "fp32", "bf16"] = "auto", threads: int = 0, seed: int = 0,
             thresholds: Sequence[float] = SWEEP, workers: int = 1, scheduler: str | None = None,
             overwrite: bool = False, progress: bool = True) -> FinetuneReport:
    """Fine-tune a model on a labelled volume within ``time_limit_min`` minutes; see the module docstring.

    Rerunning the same call after an interruption resumes the run (its held-out scores and
    training checkpoints are kept beside the output until it finishes).  The scoring runs on
    ``workers`` local worker processes, or on the running cluster whose scheduler address is
    ``scheduler`` (then left running); the training runs in this process.

    Raises
    ------
    VolumeNotFoundError, VolumeShapeError, UnsupportedDtypeError, InvalidDataError, ConfigError,
    OutputExistsError
        Bad input, found before anything is written.
    ResourceLimitError
        ``time_limit_min`` leaves no time to train after one validation of the held-out part; the
        partial run is removed.
    """
    from emseg.cluster import connect
    from emseg.config import AgglomerateOptions
    from emseg.errors import ResourceLimitError
    from emseg.models import load_checkpoint_config
    from emseg.training import state as ckpt_state
    from emseg.training import train

    started = time.perf_counter()
    budget = 60.0 * time_limit_min
    if not budget > 0:
        raise ConfigError(f"--time-limit must be positive minutes, got {time_limit_min}")
    out = Path(output)
    _check_output(out, overwrite)
    AgglomerateOptions.build(thresholds=tuple(thresholds))  # each in (0, 1): the options' validator
    vol = load_labelled(raw, labels, voxel_size=voxel_size, labels_kind=labels_kind)
    start_model = _resolve_model(model, vol.voxel_size)
    axis, cut = holdout_split(vol.raw.shape, vol.voxel_size, val_fraction)
    n = vol.raw.shape[axis]
    holdout = f"{'zyx'[axis]}[{cut}:{n}] of {' x '.join(map(str, vol.raw.shape))}"
    fingerprint = _input_fingerprint(vol, start_model, val_fraction=val_fraction, labels_kind=labels_kind,
                                     patch_shape=list(patch_shape) if patch_shape else None, lr=lr,
                                     batch_size=batch_size, seed=seed, thresholds=[float(t) for t in thresholds])
    # the training options are checked (and the memory estimated) before anything is written
    from emseg.training.loop import check_training_memory

    check_training_memory(_train_config(start_model, out / "probe", Path(raw), Path(labels), labels_kind=labels_kind,
                                        voxel_size=vol.voxel_size, steps=1, minutes=1.0, resume=False,
                                        patch_shape=patch_shape, lr=lr, batch_size=batch_size, threads=threads,
                                        precision=precision, seed=seed))

    work = _work_dir(out)
    fresh = True
    if work.exists():
        recorded = json.loads((work / "inputs.json").read_text()) if (work / "inputs.json").exists() else None
        if recorded == fingerprint:
            fresh = False
            log.info("resuming the fine-tuning run in %s", work)
        else:
            log.info("%s holds a run of other inputs or options: starting again", work)
            shutil.rmtree(work)
    if fresh:
        work.mkdir(parents=True)
        (work / "inputs.json").write_text(json.dumps(fingerprint, indent=2) + "\n")
        for which in ("train", "val"):
            _write_zarr(work / f"{which}_raw.zarr", _part(vol.raw, axis, cut, which), vol.voxel_size)
            _write_zarr(work / f"{which}_labels.zarr", _part(vol.labels, axis, cut, which), vol.voxel_size)
    validations_path = work / "validations.jsonl"
    run_dir = work / "run"
    candidates = work / "candidates"
    candidates.mkdir(exist_ok=True)
    validations = _read_validations(validations_path)
    val_raw, val_gt = work / "val_raw.zarr", work / "val_labels.zarr"

    one_validation = 0.0  # seconds of the latest validation

    def remaining() -> float:
        return budget - (time.perf_counter() - started)

    with connect(workers=workers, scheduler=scheduler) as connection, _bar(budget, progress) as bar:
        warm(connection)
        def tick(text: str) -> None:
            bar.n = min(bar.total, round(time.perf_counter() - started))
            bar.set_postfix_str(text)

        def validate(name: str, step: int, checkpoint: Path) -> ModelScores:
            s = score_model(checkpoint, val_raw, val_gt, work, name=name, step=step, thresholds=thresholds,
                            gt_kind=_gt_kind(labels_kind), client=connection)
            _append_validation(validations_path, s)
            validations.append(s)
            nonlocal one_validation
            one_validation = s.seconds
            log.info("%s on the held-out part: threshold %g (ARE + VOI %.4f, %.4f one step above); optimum %.4f "
                     "at %g (%.0f s)", name, s.chosen_threshold, s.total(s.chosen_threshold), s.chosen_total,
                     s.best_total, s.best_threshold, s.seconds)
            return s

        one_validation = validations[-1].seconds if validations else 0.0
        if not validations:
            tick("scoring the starting model")
            validate("bundled", 0, start_model)
        if fresh and remaining() < 2 * one_validation:
            shutil.rmtree(work, ignore_errors=True)
            raise ResourceLimitError(
                f"--time-limit {time_limit_min:g} min is too small: one validation of the held-out part takes "
                f"{one_validation:.0f} s here, and training needs at least as long again; give --time-limit "
                f"{math.ceil(4 * one_validation / 60)} or more")
        done = max(v.step for v in validations)
        rounds_left = MAX_ROUNDS - (len(validations) - 1)
        while rounds_left > 0 and done < max_steps:
            # equal rounds in what is left of the budget, each one training at least twice as long as
            # one validation takes, then validating once: slow validations mean fewer, longer rounds
            rounds_left = max(1, min(rounds_left, int(remaining() // (3 * one_validation))))
            per_round = remaining() / rounds_left - one_validation
            if per_round < one_validation:
                break
            best = choose_model(validations)
            tick(f"training from step {done} (best {best.name}: {best.chosen_total:.3f})")
            latest = ckpt_state.latest_checkpoint(run_dir / "checkpoints")
            cfg = _train_config(start_model, run_dir, work / "train_raw.zarr", work / "train_labels.zarr",
                                labels_kind=labels_kind, voxel_size=vol.voxel_size, steps=max_steps,
                                minutes=per_round / 60.0, resume=latest is not None, patch_shape=patch_shape,
                                lr=lr, batch_size=batch_size, threads=threads, precision=precision, seed=seed)
            trained = train(cfg)
            done = trained.steps
            latest = ckpt_state.latest_checkpoint(run_dir / "checkpoints")
            if latest is None:
                break
            name = f"step-{done}"
            keep = candidates / name
            shutil.rmtree(keep, ignore_errors=True)
            keep.mkdir()
            for f in ("model.safetensors", "config.json"):
                shutil.copy2(latest / f, keep / f)
            tick(f"scoring step {done}")
            validate(name, done, keep)
            best = choose_model(validations)
            for old in candidates.iterdir():  # keep the best candidate's weights only
                if old.name != best.name:
                    shutil.rmtree(old)
            rounds_left -= 1
            log.info("fine-tuning: step %d, best %s (ARE + VOI %.4f with the margin), %.1f of %.1f min used", done,
                     best.name, best.chosen_total, (budget - remaining()) / 60, budget / 60)
        tick("writing the checkpoint")

    base = validations[0]
    best = choose_model(validations)
    weights = start_model if best.name == "bundled" else candidates / best.name
    threshold = best.chosen_threshold
    before_default = base.row(base.default_threshold) if f"{base.default_threshold:g}" in base.scores \
        else base.row(base.chosen_threshold)
    history = [{"name": v.name, "step": v.step, "chosen_threshold": v.chosen_threshold,
                "chosen_sum": v.total(v.chosen_threshold), "chosen_margin_sum": v.chosen_total,
                "best_threshold": v.best_threshold, "best_sum": v.best_total, "seconds": round(v.seconds, 1)}
               for v in validations]
    staged = work / "checkpoint"
    shutil.rmtree(staged, ignore_errors=True)
    _write_checkpoint(weights, staged, threshold, "finetune", {
        "finetuned_with": "emseg finetune", "raw": raw, "labels": labels, "labels_kind": labels_kind,
        "voxel_size_nm": list(vol.voxel_size), "started_from": str(start_model), "holdout": holdout,
        "chosen": best.name, "steps_trained": done, "validation_before": before_default,
        "validation_before_calibrated": base.row(base.chosen_threshold), "validation_after": best.row(threshold),
        "validations": history, "sweep": [best.row(float(t)) for t in sorted(best.scores, key=float)]})
    for extra in ("metrics.jsonl", "curves.png"):
        if (run_dir / extra).exists():
            shutil.copy2(run_dir / extra, staged / extra)
    load_checkpoint_config(staged)
    seconds = time.perf_counter() - started
    report = FinetuneReport(out, str(start_model), holdout, before_default, base.row(base.chosen_threshold),
                            best.row(threshold), best.name, done, seconds, history,
                            _command(out, raw, vol.voxel_size))
    (staged / "finetune_report.json").write_text(json.dumps(_jsonable(report), indent=2) + "\n")
    _publish(staged, out, overwrite)
    shutil.rmtree(work, ignore_errors=True)
    return report


def _jsonable(report: FinetuneReport) -> dict[str, Any]:
    from dataclasses import asdict

    data = asdict(report)
    data["output"] = str(report.output)
    return data
