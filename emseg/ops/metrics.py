"""Segmentation scores against ground truth: adapted Rand error, VOI, pixel error, IoU/Dice.

Compute only.  Every score is derived from a contingency table (voxel counts of each
(ground truth id, segment id) pair) and a few voxel counts, all of which add up over slabs of
sections, so :func:`evaluate_slabs` scores volumes larger than memory one slab at a time.

Conventions (those of ``skimage.metrics``, with which the numbers agree):

* **adapted Rand error** (SNEMI3D): voxels with ground truth 0 are ignored;
  ``error = 1 - sum(n_ij^2 - n) / (0.5 * sum(a_i^2 - n) + 0.5 * sum(b_j^2 - n))`` with ``a`` the
  ground-truth and ``b`` the segment sizes; precision and recall as ``skimage`` names them.
* **VOI** in bits, ground-truth 0 ignored: ``split = H(seg | gt)`` (over-segmentation),
  ``merge = H(gt | seg)`` (under-segmentation), = ``variation_of_information(gt, seg,
  ignore_labels=(0,))``.
* **pixel error**: fraction of voxels whose boundary state differs, boundaries drawn per 2D section
  from the labels (``skimage.segmentation.find_boundaries(mode="inner")`` plus label 0), the ISBI
  2012 convention.
* **IoU / Dice** of the foreground (label != 0); 1.0 when both are empty.

Ground truth of 2-D serial-section data such as ISBI 2012 is often a binary mask (``0`` = membrane,
``255`` = cell interior).  Its instances are the **4-connected components of the interior of each
section** (:func:`instances_from_mask`), and such data is scored **per section**: every section is
its own contingency table (a segment that continues into the next section is not a merge) and the
reported score is the mean over the sections that hold ground truth (:func:`mean_scores`), the
convention of the ISBI 2012 challenge and of ``emseg train``'s validation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import cc3d
import fastremap
import numpy as np
import numpy.typing as npt
from skimage.segmentation import find_boundaries

from emseg.errors import ConfigError, VolumeShapeError

__all__ = [
    "Contingency",
    "GtKind",
    "MASK_VALUES",
    "Scores",
    "boundaries",
    "detect_gt_kind",
    "evaluate",
    "evaluate_sections",
    "evaluate_slabs",
    "instances_from_mask",
    "mean_scores",
]

GtKind = Literal["instances", "interior-mask", "membrane-mask"]
"""What a ground-truth volume holds: instance ids (0 = unlabelled), or a binary mask whose non-zero
value is the cell interior (``interior-mask``, ISBI 2012's 0/255) or the membrane (``membrane-mask``)."""

MASK_VALUES: tuple[frozenset[int], ...] = (frozenset({0, 1}), frozenset({0, 255}))
"""Value sets that auto-detection reads as a binary mask (any other set is instance ids)."""


@dataclass(frozen=True)
class Scores:
    """Scores of a segmentation against ground truth (see the module docstring)."""

    adapted_rand_error: float
    rand_precision: float
    rand_recall: float
    voi_split: float
    voi_merge: float
    pixel_error: float
    iou: float
    dice: float
    voxels: int
    gt_segments: int
    segments: int

    @property
    def voi(self) -> float:
        return self.voi_split + self.voi_merge

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "voi": self.voi}

    def summary(self) -> str:
        return (
            f"adapted Rand error {self.adapted_rand_error:.4f} (precision {self.rand_precision:.4f}, "
            f"recall {self.rand_recall:.4f})\n"
            f"VOI {self.voi:.4f} (split {self.voi_split:.4f}, merge {self.voi_merge:.4f}) bits\n"
            f"pixel error {self.pixel_error:.4f}\n"
            f"foreground IoU {self.iou:.4f}, Dice {self.dice:.4f}\n"
            f"{self.voxels} voxels, {self.gt_segments} ground-truth segments, {self.segments} segments"
        )


def boundaries(labels: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    """Boundary voxels of a label volume ``(z, y, x)``, per 2D section: label 0 or next to another id."""
    out = np.zeros(labels.shape, dtype=bool)
    for z in range(labels.shape[0]):
        out[z] = find_boundaries(labels[z], mode="inner") | (labels[z] == 0)  # type: ignore[no-untyped-call]
    return out


class Contingency:
    """Accumulates the (gt id, seg id) -> voxel count table and the voxel counts, slab by slab."""

    def __init__(self) -> None:
        self._tables: list[tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64], npt.NDArray[np.int64]]] = []
        self.voxels = 0
        self.boundary_mismatch = 0
        self.fg_both = 0
        self.fg_seg = 0
        self.fg_gt = 0
        self._gt_ids: set[int] = set()
        self._seg_ids: set[int] = set()

    def add(self, seg: npt.NDArray[Any], gt: npt.NDArray[Any]) -> None:
        """Count one slab (the same sections of both volumes)."""
        if seg.shape != gt.shape:
            raise VolumeShapeError(f"segmentation slab {seg.shape} and ground truth slab {gt.shape} differ in shape")
        seg = np.asarray(seg).astype(np.uint64, copy=False)
        gt = np.asarray(gt).astype(np.uint64, copy=False)
        self.voxels += seg.size
        self.boundary_mismatch += int(np.count_nonzero(boundaries(seg) != boundaries(gt)))
        fg_s, fg_g = seg != 0, gt != 0
        self.fg_both += int(np.count_nonzero(fg_s & fg_g))
        self.fg_seg += int(np.count_nonzero(fg_s))
        self.fg_gt += int(np.count_nonzero(fg_g))
        self._seg_ids.update(int(v) for v in fastremap.unique(seg) if v)
        g, s = gt[fg_g], seg[fg_g]
        if not g.size:
            return
        g_r, g_map = fastremap.renumber(g.copy(), preserve_zero=False)
        s_r, s_map = fastremap.renumber(s.copy(), preserve_zero=False)
        g_ids = np.zeros(len(g_map) + 1, dtype=np.uint64)
        s_ids = np.zeros(len(s_map) + 1, dtype=np.uint64)
        g_ids[np.fromiter(g_map.values(), np.int64)] = np.fromiter(g_map.keys(), np.uint64)
        s_ids[np.fromiter(s_map.values(), np.int64)] = np.fromiter(s_map.keys(), np.uint64)
        key = g_r.astype(np.int64) * (len(s_map) + 1) + s_r.astype(np.int64)
        keys, counts = np.unique(key, return_counts=True)
        self._tables.append((g_ids[keys // (len(s_map) + 1)], s_ids[keys % (len(s_map) + 1)], counts.astype(np.int64)))
        self._gt_ids.update(int(v) for v in g_map.keys())

    def table(self) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
        """(gt ids, seg ids, voxel counts) of every pair present, ground truth 0 excluded."""
        if not self._tables:
            empty = np.zeros(0, dtype=np.uint64)
            return empty, empty, np.zeros(0, dtype=np.int64)
        g = np.concatenate([t[0] for t in self._tables])
        s = np.concatenate([t[1] for t in self._tables])
        c = np.concatenate([t[2] for t in self._tables])
        pairs, inverse = np.unique(np.stack([g, s], axis=1), axis=0, return_inverse=True)
        counts = np.bincount(inverse.reshape(-1), weights=c, minlength=len(pairs)).astype(np.int64)
        return pairs[:, 0], pairs[:, 1], counts

    def scores(self) -> Scores:
        g, s, n_ij = self.table()
        n = int(n_ij.sum())
        _, g_inv = np.unique(g, return_inverse=True)
        _, s_inv = np.unique(s, return_inverse=True)
        a = np.bincount(g_inv.reshape(-1), weights=n_ij).astype(np.float64)  # ground-truth sizes
        b = np.bincount(s_inv.reshape(-1), weights=n_ij).astype(np.float64)  # segment sizes (gt != 0)
        nf = n_ij.astype(np.float64)
        if n:
            sum_p2 = float(nf @ nf) - n
            sum_a2 = float(a @ a) - n
            sum_b2 = float(b @ b) - n
            precision = sum_p2 / sum_a2 if sum_a2 else float("nan")
            recall = sum_p2 / sum_b2 if sum_b2 else float("nan")
            denominator = 0.5 * sum_a2 + 0.5 * sum_b2
            are = 1.0 - sum_p2 / denominator if denominator else float("nan")
            p = nf / n
            split = float(-(p * np.log2(nf / a[g_inv.reshape(-1)])).sum())
            merge = float(-(p * np.log2(nf / b[s_inv.reshape(-1)])).sum())
        else:
            precision = recall = are = split = merge = float("nan")
        union = self.fg_seg + self.fg_gt - self.fg_both
        iou = self.fg_both / union if union else 1.0
        dice = 2 * self.fg_both / (self.fg_seg + self.fg_gt) if (self.fg_seg + self.fg_gt) else 1.0
        return Scores(
            adapted_rand_error=are, rand_precision=precision, rand_recall=recall, voi_split=split + 0.0,
            voi_merge=merge + 0.0, pixel_error=self.boundary_mismatch / self.voxels if self.voxels else float("nan"),
            iou=iou, dice=dice, voxels=self.voxels, gt_segments=len(self._gt_ids), segments=len(self._seg_ids),
        )


def evaluate_slabs(slabs: Iterable[tuple[npt.NDArray[Any], npt.NDArray[Any]]]) -> Scores:
    """Scores from ``(segmentation, ground truth)`` slabs of whole sections, in any order."""
    table = Contingency()
    for seg, gt in slabs:
        table.add(seg, gt)
    return table.scores()


def evaluate_sections(seg: npt.NDArray[Any], gt: npt.NDArray[Any]) -> list[Scores]:
    """Scores of each section ``z`` of ``(z, y, x)`` volumes, every section its own contingency table."""
    if seg.shape != gt.shape:
        raise VolumeShapeError(f"segmentation shape {seg.shape} differs from ground truth shape {gt.shape}")
    return [evaluate_slabs([(seg[z:z + 1], gt[z:z + 1])]) for z in range(seg.shape[0])]


def mean_scores(sections: Sequence[Scores]) -> Scores:
    """Mean over sections of every score, skipping sections without ground truth; counts are summed.

    Sections whose ground truth is all 0 have NaN Rand/VOI scores and are left out of those means
    (a fully unlabelled section says nothing about the segmentation).
    """
    if not sections:
        raise ConfigError("no sections to average")
    values: dict[str, Any] = {}
    for f in fields(Scores):
        column = np.array([getattr(s, f.name) for s in sections], dtype=np.float64)
        if f.type in ("int", int):
            values[f.name] = int(column.sum())
        else:
            finite = column[~np.isnan(column)]
            values[f.name] = float(finite.mean()) if finite.size else float("nan")
    return Scores(**values)


def detect_gt_kind(counts: Mapping[int, int]) -> GtKind:
    """The kind of a ground-truth volume from its value -> voxel count table.

    Exactly the values ``{0, 1}`` or ``{0, 255}`` make a binary mask, any other set instance ids.
    In a mask the rarer value is the membrane, because membranes cover well under half of an EM
    section (ISBI 2012: ~22 %): zeros in the minority make an ``interior-mask`` (0 = membrane),
    otherwise a ``membrane-mask``.
    """
    if frozenset(int(v) for v in counts) not in MASK_VALUES:
        return "instances"
    zeros = sum(n for v, n in counts.items() if v == 0)
    nonzeros = sum(n for v, n in counts.items() if v != 0)
    return "interior-mask" if zeros <= nonzeros else "membrane-mask"


def instances_from_mask(
    mask: npt.NDArray[Any], kind: Literal["interior-mask", "membrane-mask"], *, per_section: bool
) -> npt.NDArray[np.uint64]:
    """Instance ground truth ``(z, y, x) uint64`` from a binary mask: connected components of the interior.

    ``per_section``: 4-connected components of each section (ids restart in every section: score
    such ground truth per section); otherwise 6-connected components in 3-D.  Membrane voxels get 0.
    """
    mask = np.asarray(mask)
    if mask.ndim == 2:
        mask = mask[None]
    interior = mask != 0 if kind == "interior-mask" else mask == 0
    if not per_section:
        return np.asarray(cc3d.connected_components(interior, connectivity=6), dtype=np.uint64)
    out = np.zeros(interior.shape, dtype=np.uint64)
    for z in range(interior.shape[0]):
        out[z] = cc3d.connected_components(interior[z], connectivity=4)
    return out


def evaluate(seg: npt.NDArray[Any], gt: npt.NDArray[Any]) -> Scores:
    """Scores of a segmentation ``(z, y, x)`` (or ``(y, x)``) against ground truth of the same shape."""
    if seg.shape != gt.shape:
        raise VolumeShapeError(f"segmentation shape {seg.shape} differs from ground truth shape {gt.shape}")
    if seg.ndim == 2:
        seg, gt = seg[None], gt[None]
    return evaluate_slabs([(seg, gt)])
