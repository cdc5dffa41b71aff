"""Degenerate results: a finished segmentation checked for the failures a user would not notice.

A model that meets data unlike its training data fails quietly: affinities high everywhere merge
the whole volume into one segment, boundaries everywhere leave the agglomeration nothing to merge.
:func:`diagnose` looks at what a run wrote (the coarsest level of the segments and of the
prediction, so it costs a few reads on any volume) and names what it finds, the likely cause and
what to try.  The findings go into the run's report (text and ``--json``); they do not fail the run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from emseg.io.location import PathOrUrl, location

log = logging.getLogger(__name__)

__all__ = ["Finding", "diagnose", "diagnose_arrays"]

LARGEST_SHARE = 0.5
"""A segment holding more than this share of the labelled voxels is reported as a merge of the volume."""
UNMERGED_SHARE = 0.9
"""Segments / fragments above this: the agglomeration merged (almost) nothing."""
MIN_FRAGMENTS = 20
"""Below this many fragments a volume may hold one or two objects for real: nothing is reported."""
BOUNDARY_RANGE = (0.03, 0.6)
"""Share of voxels with boundary probability >= 0.5 outside this range: the model sees (almost) no
boundaries, or boundaries everywhere.  EM sections of neural tissue hold roughly 10-35 % membrane."""

TRY = ("try: check the voxel size (--voxel-size) and the model choice (--model), sweep thresholds with "
       "`emseg agglomerate OUT --thresholds 0.5,0.6,0.7,0.8` and score them on a few labelled sections with "
       "`emseg evaluate`, or calibrate the model on them (`emseg calibrate`, `emseg finetune`)")
LINKS = ("; on serial sections the links across sections may also have joined thin neurites of neighbouring "
         "sections (weaker links: a recipe's [agglomerate] section_link_weight; per-section labels: --2d)")


@dataclass(frozen=True)
class Finding:
    """One degenerate property of a result.

    Attributes
    ----------
    code : str
        ``"one-segment"``, ``"nothing-merged"``, ``"no-boundaries"`` or ``"boundaries-everywhere"``.
    message : str
        What was found, its likely cause and what to try (one line).
    value : float
        The measured quantity (a share in [0, 1]).
    """

    code: str
    message: str
    value: float


def diagnose_arrays(
    segments: npt.NDArray[Any],
    boundary: npt.NDArray[np.floating[Any]] | None,
    *,
    n_fragments: int,
    n_segments: int,
    threshold: float,
    linked_sections: bool = False,
) -> tuple[Finding, ...]:
    """Findings of a segmentation ``(z, y, x)`` (any subsample of it) and its boundary probability in [0, 1].

    ``n_fragments`` and ``n_segments`` are the run's totals; ``threshold`` the merge threshold used;
    ``linked_sections``: the segments join per-section fragments across sections (serial sections in 3-D).
    """
    import fastremap

    findings: list[Finding] = []
    if n_fragments >= MIN_FRAGMENTS:
        ids, counts = fastremap.unique(np.asarray(segments), return_counts=True)
        counts = counts[ids != 0]
        total = int(counts.sum())
        share = float(counts.max()) / total if total else 0.0
        if share > LARGEST_SHARE:
            findings.append(Finding("one-segment", (
                f"one segment holds {share:.0%} of the volume ({n_segments} segments from {n_fragments} fragments "
                f"at threshold {threshold:g}): the model's boundaries are too weak here, so the agglomeration "
                f"merged across them; likely cause: the volume differs from the model's training data (contrast, "
                f"voxel size, tissue) or the threshold is too high"
                + (LINKS if linked_sections else "") + f"; {TRY}"), share))
        merged_share = n_segments / n_fragments
        if merged_share > UNMERGED_SHARE:
            findings.append(Finding("nothing-merged", (
                f"the agglomeration merged almost nothing ({n_segments} segments from {n_fragments} fragments at "
                f"threshold {threshold:g}): every edge scores above the threshold; likely cause: boundaries "
                f"predicted everywhere (noise, contrast) or a threshold too low for this model; {TRY}"),
                merged_share))
    if boundary is not None and boundary.size:
        on = float(np.count_nonzero(np.asarray(boundary) >= 0.5)) / boundary.size
        low, high = BOUNDARY_RANGE
        if on < low:
            findings.append(Finding("no-boundaries", (
                f"the prediction marks only {on:.1%} of the voxels as boundary (>= 0.5): far outside the model's "
                f"calibrated range ({low:.0%}-{high:.0%} on EM of neural tissue); the model sees almost no "
                f"membranes in this volume; likely cause: intensities or voxel size unlike its training data; {TRY}"),
                on))
        elif on > high:
            findings.append(Finding("boundaries-everywhere", (
                f"the prediction marks {on:.0%} of the voxels as boundary (>= 0.5): far outside the model's "
                f"calibrated range ({low:.0%}-{high:.0%} on EM of neural tissue); likely cause: intensities, noise "
                f"or voxel size unlike its training data; {TRY}"), on))
    return tuple(findings)


def _coarsest(path: PathOrUrl) -> Any:
    from emseg.io import open_volume

    volume = open_volume(path)
    levels = volume.levels or ()
    return open_volume(path, level=len(levels) - 1) if len(levels) > 1 else volume


def diagnose(
    image: PathOrUrl,
    segments: PathOrUrl,
    *,
    n_fragments: int,
    n_segments: int,
    threshold: float,
    boundary_kind: bool = True,
    linked_sections: bool = False,
) -> tuple[Finding, ...]:
    """Findings of a run's output: ``segments`` (a label image) and the prediction ``image`` (its
    coarsest levels; ``boundary_kind=False`` for affinity predictions, whose boundary share is the
    complement of the mean nearest-neighbour affinity; ``linked_sections``: see :func:`diagnose_arrays`).
    Each finding is also logged as a warning."""
    from emseg.ops.threshold import probability

    seg = _coarsest(location(segments))
    labels = np.asarray(seg.array[...])
    pred = _coarsest(location(image))
    data = np.asarray(pred.array[...])
    prob = probability(data)
    if prob.ndim == 4:
        prob = prob[0] if boundary_kind else 1.0 - prob[:3].mean(axis=0)
    findings = diagnose_arrays(labels, prob, n_fragments=n_fragments, n_segments=n_segments, threshold=threshold,
                               linked_sections=linked_sections)
    for f in findings:
        log.warning("%s", f.message)
    return findings
