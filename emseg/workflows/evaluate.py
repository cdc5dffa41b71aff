"""Evaluation of label volumes on disk: one segmentation or a threshold sweep against ground truth.

The scores and their conventions are those of :mod:`emseg.ops.metrics`; this module reads the volumes
slab by slab (OME-Zarr images or label images, zarr arrays, TIFF/HDF5 stacks), turns the ground
truth into instances when it is a binary mask, and draws the split-vs-merge curve of a sweep.

**The definition** (what ``emseg evaluate`` reports)::

    ground truth kind      instances used                        scored
    -------------------    ----------------------------------    -----------------------------------
    instances              the ids (0 = unlabelled, ignored)     as one volume
    interior-mask (0/255)  4-connected components of the         per section: mean over sections of
    membrane-mask (0/1)    interior of each section (membrane    each section's scores (a segment
                           = 0, ignored)                         continuing to the next section is no merge)

``gt_kind="auto"`` reads the ground truth's values first: exactly ``{0, 1}`` or ``{0, 255}`` is a
mask (the rarer value is the membrane), anything else instance ids.  ``mode`` overrides the
scoring (``section`` for 2-D instance ground truth; ``volume`` with a mask takes 6-connected 3-D
components of the interior, reading the mask whole).

A *run output* holding several label images (one per agglomeration threshold, and the fragments)
expands into all of them, so ``emseg evaluate run.zarr gt.tif`` scores a whole sweep in one pass
over the ground truth.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import fastremap
import numpy as np
import numpy.typing as npt

from emseg.errors import ConfigError, VolumeShapeError
from emseg.geometry import Coordinate, Roi
from emseg.ops.metrics import (
    Contingency,
    GtKind,
    Scores,
    detect_gt_kind,
    evaluate_slabs,
    instances_from_mask,
    mean_scores,
)

log = logging.getLogger(__name__)

__all__ = [
    "Evaluation",
    "GtKindOption",
    "Mode",
    "Segmentation",
    "SweepReport",
    "evaluate_paths",
    "evaluate_sweep",
    "find_segmentations",
    "plot_sweep",
]

GtKindOption = Literal["auto", "instances", "interior-mask", "membrane-mask"]
Mode = Literal["auto", "section", "volume"]
Reader = Callable[[int, int], Any]

_THRESHOLD_IN_NAME = re.compile(r"(?:^|[_\-t@])(?P<value>[01](?:\.\d+)?|\.\d+)$")


@dataclass(frozen=True)
class Segmentation:
    """One label volume to score: its display name, path and agglomeration threshold (None if none)."""

    name: str
    path: Path
    threshold: float | None = None


@dataclass(frozen=True)
class Evaluation:
    """Scores of one segmentation; ``scores`` is the mean of ``sections`` in section mode."""

    segmentation: Segmentation
    scores: Scores
    sections: tuple[Scores, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"segmentation": self.segmentation.name, "path": str(self.segmentation.path),
                               "threshold": self.segmentation.threshold, **_json_safe(self.scores.as_dict())}
        if self.sections:
            out["sections"] = [_json_safe(s.as_dict()) for s in self.sections]
        return out


@dataclass(frozen=True)
class SweepReport:
    """Scores of several segmentations (e.g. one per threshold) against one ground truth."""

    ground_truth: Path
    gt_kind: GtKind
    mode: Literal["section", "volume"]
    results: tuple[Evaluation, ...]

    def best(self, by: Literal["adapted_rand_error", "voi", "sum"] = "sum") -> Evaluation:
        """The result with the lowest adapted Rand error, VOI, or their sum (NaN scores last)."""
        def key(e: Evaluation) -> float:
            s = e.scores
            value = {"adapted_rand_error": s.adapted_rand_error, "voi": s.voi}.get(by, s.adapted_rand_error + s.voi)
            return math.inf if math.isnan(value) else value

        return min(self.results, key=key)

    def definition(self) -> str:
        how = {
            "instances": "instance ids",
            "interior-mask": "binary mask, non-zero = interior",
            "membrane-mask": "binary mask, non-zero = membrane",
        }[self.gt_kind]
        if self.gt_kind != "instances":
            how += (", instances = 4-connected components of the interior per section" if self.mode == "section"
                    else ", instances = 6-connected components of the interior")
        scored = ("per section (scores: mean over sections with ground truth; segment counts: summed)"
                  if self.mode == "section" else "in 3-D, as one volume (a segment continuing into the next "
                  "section must be the same object there; --mode section for per-section scores)")
        return f"ground truth {self.ground_truth}: {how}; 0 ignored; scored {scored}"

    def table(self) -> str:
        """Plain-text table, one row per segmentation, and the best threshold by ARE + VOI."""
        rows = [("threshold", "segmentation", "ARE", "VOI split", "VOI merge", "VOI", "segments")]
        for e in self.results:
            s = e.scores
            t = "-" if e.segmentation.threshold is None else f"{e.segmentation.threshold:g}"
            rows.append((t, e.segmentation.name, f"{s.adapted_rand_error:.4f}", f"{s.voi_split:.4f}",
                         f"{s.voi_merge:.4f}", f"{s.voi:.4f}", str(s.segments)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        best = self.best()
        lines += ["", self.definition(),
                  f"lowest ARE + VOI: {best.segmentation.name}"
                  + ("" if best.segmentation.threshold is None else f" (threshold {best.segmentation.threshold:g})")]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"ground_truth": str(self.ground_truth), "gt_kind": self.gt_kind, "mode": self.mode,
                "results": [e.as_dict() for e in self.results]}


def _json_safe(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()}


# ---------------------------------------------------------------------------------------------
# reading


def _is_zarr(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("zarr.json", ".zarray", ".zgroup"))


def _is_group(path: Path) -> bool:
    if (path / ".zgroup").exists():
        return True
    meta = path / "zarr.json"
    try:
        return meta.exists() and json.loads(meta.read_text()).get("node_type") == "group"
    except (OSError, ValueError, AttributeError):  # unreadable metadata: not a group (open_volume says why)
        return False


def _slab_reader(path: Path) -> tuple[Coordinate, Reader]:
    """Shape and a ``read(z0, z1)`` of a label volume: OME-Zarr / zarr array, or TIFF/HDF5/PNG."""
    from emseg.io import open_source, open_volume

    if _is_zarr(path):
        volume = open_volume(path)
        if volume.has_channels:
            raise VolumeShapeError(f"{path}: a label volume has axes (z, y, x), got {volume.axes}; "
                                   "pass the label image (e.g. run.zarr/labels/segments) or the run output itself")

        def read(z0: int, z1: int) -> Any:
            return volume.read(Roi((z0, 0, 0), (z1 - z0, *volume.shape[1:])))

        return volume.shape, read
    source = open_source(path)
    shape = tuple(int(s) for s in source.shape)
    if len(shape) == 2:
        def read2(z0: int, z1: int) -> Any:
            return np.asarray(source.read(0, 1)).reshape(1, *shape)

        return (1, *shape), read2
    return shape, source.read


def _threshold_of(path: Path) -> float | None:
    """The agglomeration threshold a label image was made with: its status metadata, else its name."""
    from emseg.io import read_status

    if _is_group(path):
        value = read_status(path).get("threshold")
        if isinstance(value, (int, float)):
            return float(value)
    m = _THRESHOLD_IN_NAME.search(path.name)
    return float(m["value"]) if m else None


def find_segmentations(paths: Sequence[str | os.PathLike[str]]) -> list[Segmentation]:
    """The label volumes named by ``paths``; a run output (an OME-Zarr image with label images, not
    itself a label volume) stands for every label image it holds, sorted by threshold.

    Raises
    ------
    VolumeNotFoundError, NotAVolumeError
    """
    from emseg.errors import VolumeNotFoundError
    from emseg.io.volume import label_image_paths

    out: list[Segmentation] = []
    for p in map(Path, paths):
        if not p.exists():
            raise VolumeNotFoundError(f"{p}: no such file or directory")
        images = label_image_paths(p) if _is_zarr(p) else []
        if images:
            found = [Segmentation(f"{img.parent.name}/{img.name}", img, _threshold_of(img)) for img in images]
            # fragments (no threshold) first, then by threshold
            found.sort(key=lambda s: (s.threshold is not None, s.threshold or 0.0, s.name))
            out += found
        else:
            out.append(Segmentation(p.name, p, _threshold_of(p)))
    return out


# ---------------------------------------------------------------------------------------------
# scoring


def _resolve_kind(gt_kind: GtKindOption, read_gt: Reader, shape: Coordinate, depth: int) -> GtKind:
    if gt_kind != "auto":
        return gt_kind
    counts: dict[int, int] = {}
    for z in range(0, shape[0], depth):
        values, n = fastremap.unique(np.asarray(read_gt(z, min(z + depth, shape[0]))), return_counts=True)
        for v, c in zip(values.tolist(), n.tolist()):
            counts[v] = counts.get(v, 0) + c
        if len(counts) > 2:
            break
    kind = detect_gt_kind(counts)
    log.info("ground truth values %s: read as %s", sorted(counts)[:4], kind)
    return kind


def _gt_slabs(read_gt: Reader, shape: Coordinate, depth: int, kind: GtKind,
              mode: Literal["section", "volume"]) -> Iterator[tuple[int, int, npt.NDArray[Any]]]:
    if kind == "instances":
        for z in range(0, shape[0], depth):
            z1 = min(z + depth, shape[0])
            yield z, z1, np.asarray(read_gt(z, z1))
    elif mode == "section":
        for z in range(0, shape[0], depth):
            z1 = min(z + depth, shape[0])
            yield z, z1, instances_from_mask(np.asarray(read_gt(z, z1)), kind, per_section=True)
    else:  # 3-D components need the whole mask
        whole = instances_from_mask(np.asarray(read_gt(0, shape[0])), kind, per_section=False)
        for z in range(0, shape[0], depth):
            yield z, min(z + depth, shape[0]), whole[z:z + depth]


def evaluate_sweep(
    seg_paths: Sequence[str | os.PathLike[str]],
    gt_path: str | os.PathLike[str],
    *,
    gt_kind: GtKindOption = "auto",
    mode: Mode = "auto",
    slab_voxels: int = 1 << 26,
) -> SweepReport:
    """Scores of every segmentation in ``seg_paths`` (run outputs expand) against ``gt_path``.

    The ground truth is read once, slab by slab, and every segmentation is scored on each slab.
    See the module docstring for ``gt_kind`` and ``mode``.

    Raises
    ------
    VolumeNotFoundError, NotAVolumeError, VolumeShapeError, ConfigError
    """
    if gt_kind not in ("auto", "instances", "interior-mask", "membrane-mask"):
        raise ConfigError(f"gt_kind must be auto, instances, interior-mask or membrane-mask, got {gt_kind!r}")
    if mode not in ("auto", "section", "volume"):
        raise ConfigError(f"mode must be auto, section or volume, got {mode!r}")
    segmentations = find_segmentations(seg_paths)
    if not segmentations:
        raise ConfigError("no segmentation to evaluate")
    gt_shape, read_gt = _slab_reader(Path(gt_path))
    readers: list[Reader] = []
    for s in segmentations:
        shape, read = _slab_reader(s.path)
        if tuple(shape) != tuple(gt_shape):
            raise VolumeShapeError(f"segmentation {s.path} has shape {tuple(shape)} but ground truth {gt_path} "
                                   f"has {tuple(gt_shape)}; they must cover the same voxels")
        readers.append(read)
    depth = max(1, slab_voxels // max(1, int(np.prod(gt_shape[1:]))))
    kind = _resolve_kind(gt_kind, read_gt, gt_shape, depth)
    resolved: Literal["section", "volume"] = (
        mode if mode != "auto" else ("volume" if kind == "instances" else "section"))
    whole = [Contingency() for _ in segmentations]
    sections: list[list[Scores]] = [[] for _ in segmentations]
    for z0, z1, gt in _gt_slabs(read_gt, gt_shape, depth, kind, resolved):
        for i, read in enumerate(readers):
            seg = np.asarray(read(z0, z1))
            if resolved == "section":
                sections[i] += [evaluate_slabs([(seg[k:k + 1], gt[k:k + 1])]) for k in range(z1 - z0)]
            else:
                whole[i].add(seg, gt)
    results = tuple(
        Evaluation(s, mean_scores(sections[i]), tuple(sections[i])) if resolved == "section"
        else Evaluation(s, whole[i].scores())
        for i, s in enumerate(segmentations))
    return SweepReport(Path(gt_path), kind, resolved, results)


def evaluate_paths(
    seg_path: str | os.PathLike[str],
    gt_path: str | os.PathLike[str],
    *,
    gt_kind: GtKindOption = "auto",
    mode: Mode = "auto",
    slab_voxels: int = 1 << 26,
) -> Scores:
    """Scores of one segmentation (a label volume, not a run output) against ground truth.

    Both are label volumes ``(z, y, x)``: OME-Zarr images or label images, zarr arrays, TIFF stacks;
    see the module docstring for the definition.

    Raises
    ------
    VolumeNotFoundError, NotAVolumeError, VolumeShapeError, ConfigError
    """
    report = evaluate_sweep([seg_path], gt_path, gt_kind=gt_kind, mode=mode, slab_voxels=slab_voxels)
    if len(report.results) != 1:
        raise ConfigError(f"{seg_path} holds {len(report.results)} label images; pass one of them "
                          f"({', '.join(e.segmentation.name for e in report.results)})")
    return report.results[0].scores


# ---------------------------------------------------------------------------------------------
# plotting


def plot_sweep(report: SweepReport, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """PNG of a sweep: VOI split vs VOI merge (one point per segmentation, labelled with its
    threshold), and adapted Rand error / VOI against the threshold."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    swept = [e for e in report.results if e.segmentation.threshold is not None]
    others = [e for e in report.results if e.segmentation.threshold is None]
    if swept:
        ax1.plot([e.scores.voi_merge for e in swept], [e.scores.voi_split for e in swept], "o-", color="C0",
                 label="agglomeration thresholds")
        for e in swept:
            ax1.annotate(f"{e.segmentation.threshold:g}", (e.scores.voi_merge, e.scores.voi_split),
                         textcoords="offset points", xytext=(4, 4), fontsize=8)
    for i, e in enumerate(others):
        ax1.plot([e.scores.voi_merge], [e.scores.voi_split], "s", color=f"C{i + 1}", label=e.segmentation.name)
    ax1.set_xlabel("VOI merge (bits)")
    ax1.set_ylabel("VOI split (bits)")
    ax1.set_title("split vs merge")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    if swept:
        t = [e.segmentation.threshold for e in swept]
        ax2.plot(t, [e.scores.adapted_rand_error for e in swept], "o-", label="adapted Rand error")
        ax2.plot(t, [e.scores.voi for e in swept], "s-", label="VOI split + merge (bits)")
        ax2.set_xlabel("threshold")
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
        ax2.set_title("scores per threshold")
    else:
        names = [e.segmentation.name for e in report.results]
        ax2.bar(names, [e.scores.adapted_rand_error for e in report.results])
        ax2.set_ylabel("adapted Rand error")
        ax2.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.suptitle(title or f"{report.ground_truth.name}: {report.gt_kind}, scored "
                          f"{'per section' if report.mode == 'section' else 'as a volume'}", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    from emseg.io.safety import SOFTWARE

    fig.savefig(out, metadata={"Software": SOFTWARE} if out.suffix.lower() == ".png" else None)
    return out
