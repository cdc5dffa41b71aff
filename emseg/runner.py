"""The one place that runs work: one Dask task per :class:`~emseg.geometry.Block`.

A task carries a block's coordinates, never its data: the worker reads what it needs from the
input store, computes, writes its core to the output store, and only then records a completion
marker.  Rerunning the same command skips blocks whose marker exists; a rerun with other
parameters is detected from a fingerprint of the layout and parameters and refused unless
``overwrite``.

Markers live inside the output (see :mod:`emseg.io.ledger`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from emseg.errors import RunIncompleteError
from emseg.geometry import Block, BlockGrid
from emseg.io.ledger import Ledger

log = logging.getLogger(__name__)

BlockFn = Callable[[Block], Any]


@dataclass(frozen=True)
class StageReport:
    """What a stage did.  ``results`` maps block_id to the JSON result of every finished block."""

    stage: str
    total: int
    computed: int
    skipped: int
    seconds: float
    voxels: int
    results: dict[int, Any] = field(repr=False)

    @property
    def voxels_per_second(self) -> float:
        return self.voxels / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        return (
            f"{self.stage}: {self.total} blocks ({self.computed} computed, {self.skipped} already done) "
            f"in {self.seconds:.1f} s, {self.voxels_per_second / 1e6:.2f} Mvoxel/s"
        )


def fingerprint_of(params: Mapping[str, Any]) -> str:
    """Stable hash of JSON-able run parameters."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _run_block(fn: BlockFn, block: Block, ledger: Ledger) -> Any:
    """Worker side: compute and write a block, then (and only then) record it as done."""
    result = fn(block)
    ledger.record(block.block_id, result)
    return result


def run_blockwise(
    client: Any,
    *,
    stage: str,
    grid: BlockGrid,
    fn: BlockFn,
    output: str | os.PathLike[str],
    params: Mapping[str, Any],
    overwrite: bool = False,
    resources: Mapping[str, float] | None = None,
    retries: int = 1,
    progress: bool = True,
    block_ids: Iterable[int] | None = None,
) -> StageReport:
    """Run ``fn(block)`` once for every block of ``grid`` that is not yet done.

    Parameters
    ----------
    client : distributed.Client
        Where the tasks run.
    stage : str
        Name of the stage (``predict``, ``label-cc`` ...): its markers live in ``output``.
    output : path
        The output zarr group the stage writes to.
    fn : callable
        Top-level (picklable) function of a Block that reads, computes and writes the block's core,
        returning a small JSON-able result.  It must be idempotent.
    params : mapping
        Everything that determines the output (layout, model, thresholds ...): its fingerprint
        decides whether existing markers may be reused.
    resources : mapping, optional
        Worker resources each task needs (``{"GPU": 1}`` on GPU clusters).
    block_ids : iterable of int, optional
        Restrict the stage to these blocks (default: all).

    Raises
    ------
    ResumeMismatchError
        Markers of a run with other parameters exist and ``overwrite`` is false.
    RunIncompleteError
        Some blocks failed after their retries; finished ones are kept for the rerun.
    """
    from distributed import as_completed
    from tqdm import tqdm

    ledger = Ledger(output, stage)
    params = {**params, "grid": [list(grid.total_roi.offset), list(grid.total_roi.shape), list(grid.block_shape), list(grid.halo)]}
    ledger.claim(len(grid), fingerprint_of(params), params, overwrite=overwrite)
    wanted_ids = set(range(len(grid))) if block_ids is None else set(block_ids)
    wanted = sorted(wanted_ids)
    results = {k: v for k, v in ledger.done().items() if k in wanted_ids}
    pending = [grid.block(i) for i in wanted if i not in results]
    skipped = len(results)
    start = time.perf_counter()
    voxels = 0
    failures: list[tuple[int, BaseException]] = []
    bar = tqdm(total=len(wanted), initial=skipped, desc=stage, unit="block", file=sys.stderr,
               disable=not progress, dynamic_ncols=True, smoothing=0.1)
    token = hashlib.sha1(str(ledger.path.resolve()).encode()).hexdigest()[:8]  # unique per output + stage
    futures = {
        client.submit(_run_block, fn, block, ledger, key=f"{stage}-{block.block_id}-{token}",
                      resources=dict(resources) if resources else None, retries=retries, pure=False): block
        for block in pending
    }
    try:
        for future in as_completed(futures):
            block = futures[future]
            if future.status == "error":
                failures.append((block.block_id, future.exception()))
                log.error("%s: block %d failed: %s", stage, block.block_id, future.exception())
            else:
                results[block.block_id] = future.result()
                voxels += block.write_roi.size
            bar.update(1)
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"{voxels / max(elapsed, 1e-9) / 1e6:.2f} Mvox/s", refresh=False)
            future.release()
    except BaseException:
        client.cancel(list(futures))
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    if failures:
        block_id, exc = failures[0]
        raise RunIncompleteError(
            f"{stage}: {len(failures)} of {len(wanted)} blocks failed (first: block {block_id}: "
            f"{type(exc).__name__}: {exc}); finished blocks are kept, rerun the same command to resume"
        ) from exc
    return StageReport(stage, len(wanted), len(pending), skipped, seconds, voxels, results)
