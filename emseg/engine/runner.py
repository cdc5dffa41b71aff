"""The one place that runs work: blocks of a :class:`~emseg.geometry.BlockGrid` on a Dask client.

A task carries coordinates, never data: the worker reads what it needs from the input store,
computes, writes its core to the output store, and only then records the block as done.  Rerunning
the same command skips done blocks; a rerun with other parameters is detected from a fingerprint of
the layout and parameters and refused unless ``overwrite``.

Scale: a task runs the blocks of one or more whole ledger chunks (:func:`emseg.engine.ledger.blocks_per_chunk`:
one block per chunk up to 1,024 blocks, then 513 to 1,024 chunks per stage); the first tasks
take one chunk each and later ones as many as make about ``TASK_SECONDS`` of work (cheap blocks
get big tasks, expensive ones stay one chunk per task), tasks are generated lazily and at most
``window`` are in flight, and per-block results come back as numpy columns
(:class:`BlockResults`), so client and scheduler memory stay flat as the block count grows.  The
task owning a chunk is its only writer; it records finished blocks at most every
``FLUSH_SECONDS`` and when it ends, so a killed task loses at most that much work.

Integrity: when a stage names the arrays it writes (``writes``), each block's record carries the
keys, sizes and CRC-32s of the storage objects it wrote (:func:`emseg.engine.ledger.block_record`).
A rerun re-checks the done blocks (``verify="sizes"``: stat only, ``"full"``: reads them) inside
the same tasks and recomputes exactly the blocks whose chunks went missing or changed.

Records live inside the output (see :mod:`emseg.engine.ledger`).  With ``client=None`` the same tasks
run in this process on a few threads (small jobs, tests, tools without a cluster).
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import pickle
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from emseg.engine.follow import Progress
from emseg.engine.ledger import (
    RECORD_FORMAT,
    Ledger,
    Verify,
    WriteSpec,
    block_record,
    encode_record,
    parse_records,
    record_matches,
    store_census,
)
from emseg.engine.runstate import OutputClaim, StageOutputs, claim_stage, fingerprint_of
from emseg.errors import InvalidDataError, RunIncompleteError
from emseg.geometry import Block, BlockGrid
from emseg.io.location import PathOrUrl

log = logging.getLogger(__name__)

BlockFn = Callable[[Block], Any]
FLUSH_SECONDS = 0.5
"""A task rewrites its ledger chunk at most this often (and when it ends)."""

__all__ = ["BlockResults", "StageReport", "WriteSpec", "fingerprint_of", "run_blockwise"]


class BlockResults(Mapping[int, Any]):
    """Results of the finished blocks of a stage, held as numpy columns over the grid.

    ``results[b]`` rebuilds block ``b``'s result (a dict of its fields); :meth:`column` gives one
    field for every block as an array (numbers: int64 or float64; anything else: object), so that
    callers that need, say, a count per block never build per-block Python objects.
    """

    def __init__(self, n_blocks: int) -> None:
        self.n_blocks = n_blocks
        self.done = np.zeros(n_blocks, dtype=bool)
        self._columns: dict[str, npt.NDArray[Any]] = {}
        self._plain: npt.NDArray[Any] | None = None  # results that are not dicts

    def _store(self, key: str, ids: npt.NDArray[np.int64], values: list[Any]) -> None:
        column = self._columns.get(key)
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        kind = (np.int64 if all(isinstance(v, int) for v in values) else np.float64) if numeric else object
        if column is None:
            column = np.zeros(self.n_blocks, dtype=kind) if kind is not object else np.full(self.n_blocks, None, object)
        elif column.dtype != object and kind is object:
            column = column.astype(object)
        elif column.dtype == np.int64 and kind is np.float64:
            column = column.astype(np.float64)
        column[ids] = np.asarray(values, dtype=column.dtype) if column.dtype != object else _object_array(values)
        self._columns[key] = column

    def update(self, ids: Sequence[int] | npt.NDArray[np.int64], results: Sequence[Any]) -> None:
        """Record the results of finished blocks ``ids``."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return
        self.done[ids] = True
        if all(isinstance(r, dict) for r in results):
            keys: dict[str, None] = {}
            for r in results:
                keys.update(dict.fromkeys(r))
            for key in keys:
                present = [i for i, r in enumerate(results) if key in r]
                self._store(key, ids[present], [results[i][key] for i in present])
        else:
            if self._plain is None:
                self._plain = np.full(self.n_blocks, None, object)
            self._plain[ids] = _object_array(list(results))

    def column(self, key: str) -> npt.NDArray[Any]:
        """Field ``key`` of every block's result (0 / None where a block lacks it or is not done)."""
        if key not in self._columns:
            raise KeyError(f"no block result has the field {key!r}; fields: {sorted(self._columns)}")
        return self._columns[key]

    def __getitem__(self, block_id: int) -> Any:
        if not 0 <= block_id < self.n_blocks or not self.done[block_id]:
            raise KeyError(block_id)
        if self._plain is not None and self._plain[block_id] is not None:
            return self._plain[block_id]
        return {key: _python(col[block_id]) for key, col in self._columns.items()}

    def __iter__(self) -> Iterator[int]:
        return (int(i) for i in np.flatnonzero(self.done))

    def __len__(self) -> int:
        return int(self.done.sum())


def _object_array(values: list[Any]) -> npt.NDArray[Any]:
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def _python(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


@dataclass(frozen=True)
class StageReport:
    """What a stage did.  ``results`` maps block_id to the result of every finished block.

    ``repaired``: blocks recorded as done whose stored chunks failed verification, recomputed now
    (counted in ``computed``).
    """

    stage: str
    total: int
    computed: int
    skipped: int
    seconds: float
    voxels: int
    results: BlockResults = field(repr=False)
    repaired: int = 0

    @property
    def voxels_per_second(self) -> float:
        return self.voxels / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        repaired = f", {self.repaired} with missing or damaged chunks recomputed" if self.repaired else ""
        return (
            f"{self.stage}: {self.total} blocks ({self.computed} computed, {self.skipped} already done{repaired}) "
            f"in {self.seconds:.1f} s, {self.voxels_per_second / 1e6:.2f} Mvoxel/s"
        )


def _with_grid(params: Mapping[str, Any], grid: BlockGrid) -> dict[str, Any]:
    """``params`` plus the grid: offset, shape, block shape, halo, and for a grid that reads
    asymmetrically or snapped to tiles also the high-side halo and the snap (see :func:`emseg.engine.ledger.grid_of`)."""
    record = [list(grid.total_roi.offset), list(grid.total_roi.shape), list(grid.block_shape), list(grid.halo)]
    if grid.halo_hi is not None or grid.snap is not None:
        record += [list(grid.halos[1]), list(grid.snap or (1,) * grid.ndim)]
    return {**params, "grid": record}


# ---------------------------------------------------------------------------------------------
# worker side


class _Batch(NamedTuple):
    """What one task did with the blocks of its ledger chunk."""

    ids: npt.NDArray[np.int64]
    results: list[Any]
    records: npt.NDArray[np.int64] | None
    failures: list[tuple[int, BaseException]]
    repaired: int
    voxels: int
    seconds: float
    found: tuple[npt.NDArray[np.int64], list[Any], list[Any]] = (np.zeros(0, np.int64), [], [])
    """Blocks of the task already recorded when it ran: ids, results, storage records.  The client
    counts those it did not know were done (a task that finished them was lost with its worker)."""


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.dumps(exc)
        return exc
    except Exception:  # noqa: BLE001 - any pickling failure: send a plain copy instead
        return RuntimeError(f"{type(exc).__name__}: {exc}")


@functools.lru_cache(maxsize=16)
def _ledger_array(output: str, stage: str, token: str) -> tuple[Any, bool]:
    """The ledger array a worker opened for the run ``token`` (opening costs more than a chunk write)."""
    array = Ledger(output, stage).open("r+")
    return array, array.attrs.get("format") == RECORD_FORMAT


def _run_batch(fn: BlockFn, grid: BlockGrid, output: str, stage: str,
               chunks: tuple[tuple[int, npt.NDArray[np.int64] | None], ...], writes: tuple[WriteSpec, ...],
               verify: Verify, retries: int, token: str) -> _Batch:
    """Worker side: the ledger chunks of one task, one after the other (see :func:`_run_chunk`)."""
    start = time.perf_counter()
    parts = [_run_chunk(fn, grid, output, stage, c, sel, writes, verify, retries, token) for c, sel in chunks]
    records = [p.records for p in parts if p.records is not None and len(p.records)]
    found = (np.concatenate([p.found[0] for p in parts]), [r for p in parts for r in p.found[1]],
             [w for p in parts for w in p.found[2]])
    return _Batch(np.concatenate([p.ids for p in parts]), [r for p in parts for r in p.results],
                  np.concatenate(records) if records else (np.zeros((0, 2 + 2 * len(writes)), np.int64)
                                                           if writes else None),
                  [f for p in parts for f in p.failures], sum(p.repaired for p in parts),
                  sum(p.voxels for p in parts), time.perf_counter() - start, found)


def _run_chunk(fn: BlockFn, grid: BlockGrid, output: str, stage: str, chunk: int, ids: npt.NDArray[np.int64] | None,
               writes: tuple[WriteSpec, ...], verify: Verify, retries: int, token: str) -> _Batch:
    """Run the not-done (or failing verification) blocks of one ledger chunk, this task its only writer.

    A block is recorded only after ``fn`` returned, i.e. after its data is written.
    """
    array, wrapped = _ledger_array(output, stage, token)
    k, n = int(array.chunks[0]), int(array.shape[0])
    c0, c1 = chunk * k, min((chunk + 1) * k, n)
    values = np.asarray(array[c0:c1], dtype=object)
    wanted = np.arange(c0, c1, dtype=np.int64) if ids is None else ids
    done_ids: list[int] = []
    results: list[Any] = []
    records: list[list[int]] = []
    failures: list[tuple[int, BaseException]] = []
    found_ids: list[int] = []
    found: list[str] = []
    repaired = voxels = 0
    dirty = False
    last_flush = time.monotonic()
    for block_id in wanted.tolist():
        entry = values[block_id - c0]
        block: Block | None = None
        if entry:
            if verify == "none" or not writes or not wrapped:
                found_ids.append(block_id)
                found.append(entry)
                continue
            block = grid.block(block_id)
            record = json.loads(entry).get("w")
            if record is None or record_matches(record, writes, block.write_roi, verify):
                found_ids.append(block_id)
                found.append(entry)
                continue
            log.warning("%s: block %d: stored chunks missing or changed since it was written; recomputing",
                        stage, block_id)
            values[block_id - c0] = ""
            dirty = True
            repaired += 1
        block = block or grid.block(block_id)
        for attempt in range(retries + 1):
            try:
                result = fn(block)
                break
            except Exception as e:  # noqa: BLE001 - reported per block; the client raises RunIncompleteError
                if attempt == retries:
                    failures.append((block_id, _picklable(e)))
                    result = e
        if isinstance(result, BaseException):
            continue
        record_w = block_record(writes, block.write_roi) if writes else None
        values[block_id - c0] = encode_record(result, record_w) if wrapped else json.dumps(result)
        dirty = True
        done_ids.append(block_id)
        results.append(result)
        if record_w is not None:
            records.append(record_w)
        voxels += block.write_roi.size
        if time.monotonic() - last_flush > FLUSH_SECONDS:
            array[c0:c1] = values
            dirty = False
            last_flush = time.monotonic()
    if dirty:
        array[c0:c1] = values
    parsed = parse_records(np.asarray(found, dtype=object), wrapped)
    return _Batch(np.asarray(done_ids, dtype=np.int64), results,
                  np.asarray(records, dtype=np.int64) if writes else None, failures, repaired, voxels, 0.0,
                  (np.asarray(found_ids, dtype=np.int64), [r for r, _ in parsed], [w for _, w in parsed]))


# ---------------------------------------------------------------------------------------------
# client side


class _InProcess:
    """A tiny stand-in for a Dask client: runs tasks on threads in this process (``client=None``)."""

    def __init__(self, threads: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=threads)
        self.threads = threads

    def submit(self, func: Callable[..., Any], *args: Any) -> Any:
        return self.pool.submit(func, *args)


def _window(client: Any) -> int:
    if isinstance(client, _InProcess):
        return 2 * client.threads
    try:
        threads = sum(client.nthreads().values())
    except Exception:  # noqa: BLE001 - an unusual client: a fixed window
        threads = 16
    return int(min(1024, max(64, 4 * threads)))


def run_blockwise(
    client: Any,
    *,
    stage: str,
    grid: BlockGrid,
    fn: BlockFn,
    output: PathOrUrl,
    params: Mapping[str, Any],
    overwrite: bool = False,
    resources: Mapping[str, float] | None = None,
    retries: int = 1,
    progress: bool = True,
    block_ids: Iterable[int] | None = None,
    writes: Sequence[WriteSpec | PathOrUrl] = (),
    verify: Verify = "sizes",
    window: int | None = None,
    placement: Callable[[int], list[str] | None] | None = None,
    claim: OutputClaim | None = None,
    outputs: StageOutputs | None = None,
    posts: Progress | None = None,
    follows: Progress | None = None,
) -> StageReport:
    """Run ``fn(block)`` once for every block of ``grid`` that is not yet done.

    Parameters
    ----------
    client : distributed.Client or None
        Where the tasks run; ``None`` runs them on threads in this process.
    stage : str
        Name of the stage (``predict``, ``label-cc`` ...): its records live in ``output``.
    output : path
        The output zarr group the stage writes to.
    fn : callable
        Top-level (picklable) function of a Block that reads, computes and writes the block's core,
        returning a small JSON-able result (a dict of numbers is stored as numpy columns).  It must
        be idempotent.
    params : mapping
        Everything that determines the output (layout, model, thresholds ...): its fingerprint
        decides whether existing records may be reused.
    resources : mapping, optional
        Worker resources each task needs (``{"GPU": 1}`` on GPU clusters).
    block_ids : iterable of int, optional
        Restrict the stage to these blocks (default: all).
    writes : sequence of WriteSpec or path
        The zarr arrays ``fn`` writes over ``block.write_roi``: their storage objects are recorded
        per block and verified on a rerun, and their census is stored for readers.
    verify : {"sizes", "full", "none"}
        How a rerun re-checks done blocks of ``writes``: stat their chunks (default), read them, or
        trust the records.
    window : int, optional
        Tasks in flight at most (default: 4 per worker thread, between 64 and 1024).
    placement : callable, optional
        Ledger chunk index -> worker addresses that should preferably run its task (a loose Dask
        restriction: other workers may still take it), e.g. to send a block back to the worker
        that holds data of it from an earlier stage.
    claim : OutputClaim, optional
        The output image the stage writes into: made (through the stage's ``create`` callback) or
        resumed before the first block, see :mod:`emseg.engine.runstate`.  When it starts over, so do
        the stage's records.
    outputs : StageOutputs, optional
        What the stage writes besides ``writes``' blocks and ``claim`` (pyramid levels, mesh
        fragments): made again whenever its records start over; the records are kept only while
        these are intact (:func:`emseg.engine.runstate.claim_stage`).
    posts : Progress, optional
        Where this stage announces its written blocks (those of an earlier run at the start, then
        each as it finishes) to a stage that follows it in another thread (:mod:`emseg.engine.follow`).
        The caller ends it (:meth:`~emseg.engine.follow.Progress.end`) when this call returns or raises.
    follows : Progress, optional
        The progress of the stage this one reads: a task is submitted only once that stage has
        written every block its blocks read (halo included).

    Raises
    ------
    ResumeMismatchError
        Records of a run with other parameters exist and ``overwrite`` is false.
    OutputExistsError
        ``claim``'s output holds something else.
    RunIncompleteError
        Some blocks failed after their retries; finished ones are kept for the rerun.
    """
    from tqdm import tqdm

    specs = tuple(w if isinstance(w, WriteSpec) else WriteSpec(str(w)) for w in writes)
    if claim is not None:
        claim.ensure()
        overwrite = overwrite or claim.started_over
    ledger = Ledger(output, stage)
    params = _with_grid(params, grid)
    n = len(grid)
    claim_stage(ledger, n, fingerprint_of(params), params, overwrite=overwrite, writes=specs, outputs=outputs)
    array = ledger.open()
    k = int(array.chunks[0])
    wrapped = array.attrs.get("format") == RECORD_FORMAT
    checking = verify != "none" and bool(specs) and wrapped
    ids = None if block_ids is None else np.unique(np.fromiter((int(b) for b in block_ids), dtype=np.int64))
    total = n if ids is None else len(ids)

    # resume: which wanted blocks are done (O(wanted) in wanted / k chunk reads), their results
    results = BlockResults(n)
    files = np.zeros((n, len(specs)), dtype=np.int64) if specs else None
    nbytes = np.zeros((n, len(specs)), dtype=np.int64) if specs else None
    known = np.zeros(n, dtype=bool)  # blocks whose result and storage record the client holds
    tasks: list[tuple[int, npt.NDArray[np.int64] | None]] = []
    skipped = 0
    for part, values in ledger.iter_chunks(ids):
        done = values != ""
        if done.any():
            known[part[done]] = True
            parsed = parse_records(values[done], wrapped)
            results.update(part[done], [r for r, _ in parsed])
            skipped += int(done.sum())
            if files is not None and nbytes is not None and parsed and parsed[0][1] is not None:
                _add_census(files, nbytes, part[done], [w for _, w in parsed], len(specs))
        if not done.all() or (checking and done.any()):
            for c in np.unique(part // k).tolist():
                sel = part[(part // k) == c]
                whole = ids is None and len(sel) == min(k, n - c * k)
                tasks.append((c, None if whole else sel))

    if posts is not None:
        posts.start(grid)
        posts.mark(np.flatnonzero(results.done))
    start = time.perf_counter()
    runner: Any = client if client is not None else _InProcess(max(1, min(4, os.cpu_count() or 1)))
    in_process = isinstance(runner, _InProcess)
    window = window or _window(runner)
    bar = tqdm(total=total, initial=skipped, desc=stage, unit="block", file=sys.stderr, disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    token = uuid.uuid4().hex[:8]
    computed = repaired = voxels = n_failed = 0
    failures: list[tuple[int, BaseException]] = []
    queue = collections.deque(tasks)
    in_flight: dict[Any, tuple[tuple[int, npt.NDArray[np.int64] | None], ...]] = {}
    per_chunk = [0.0, 0]  # task seconds and chunks finished: sizes the next tasks
    parallel = max(1, window // 4)

    readable = np.zeros(n, dtype=bool) if follows is not None else None  # blocks whose input is written

    def ready(task: tuple[int, npt.NDArray[np.int64] | None]) -> bool:
        if follows is None or readable is None:
            return True
        c, sel = task
        wanted = np.arange(c * k, min((c + 1) * k, n), dtype=np.int64) if sel is None else sel
        for b in wanted[~readable[wanted]].tolist():
            if not follows.covers(grid.block(b).read_roi):
                return False
            readable[b] = True
        return True

    def submit_next() -> Any:
        group = _group_size(per_chunk, len(queue), parallel)
        chunks_: list[tuple[int, npt.NDArray[np.int64] | None]] = []
        while queue and len(chunks_) < group and ready(queue[0]):
            chunks_.append(queue.popleft())
        if not chunks_:
            return None
        chunks = tuple(chunks_)
        args = (_run_batch, fn, grid, str(output), stage, chunks, specs, verify, retries, token)
        if in_process:
            future = runner.submit(*args)
        else:
            preferred = placement(chunks[0][0]) if placement is not None else None
            future = runner.submit(*args, key=f"{stage}-{chunks[0][0]}-{token}", pure=False, retries=retries,
                                   resources=dict(resources) if resources else None,
                                   **({"workers": preferred, "allow_other_workers": True} if preferred else {}))
        in_flight[future] = chunks
        return future

    completed: Any
    if follows is not None:
        completed = _followed(submit_next, lambda: bool(queue), follows, parallel, window)
    elif in_process:
        from concurrent.futures import FIRST_COMPLETED, wait

        def completed_iter() -> Iterator[Any]:
            pending = {f for f in (submit_next() for _ in range(parallel)) if f is not None}
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    yield f
                    for _ in range(window - len(pending)):
                        nxt = submit_next()
                        if nxt is None:
                            break
                        pending.add(nxt)

        completed = completed_iter()
    else:
        from distributed import as_completed

        # one task per thread until the first ones are timed, then up to ``window`` in flight
        completed = as_completed([f for f in (submit_next() for _ in range(parallel)) if f is not None])
    try:
        for future in completed:
            chunks = in_flight.pop(future)
            error = future.exception() if (in_process or future.status == "error") else None
            if error is not None:
                lost = sum(len(sel) if sel is not None else min(k, n - c * k) for c, sel in chunks)
                n_failed += lost
                c, sel = chunks[0]
                failures.append((int(sel[0]) if sel is not None else c * k, error))
                log.info("%s: blocks of ledger chunks %d.. failed: %s", stage, c, error)  # the Error line says it
                bar.update(lost)
            else:
                batch: _Batch = future.result()
                if posts is not None:
                    posts.mark(batch.ids)
                    posts.mark(batch.found[0])
                per_chunk[0] += batch.seconds
                per_chunk[1] += len(chunks)
                results.update(batch.ids, batch.results)
                known[batch.ids] = True
                if batch.records is not None and len(batch.ids) and files is not None and nbytes is not None:
                    _add_census(files, nbytes, batch.ids, batch.records.tolist(), len(specs))
                computed += len(batch.ids)
                # blocks finished by an earlier try of this task whose worker was lost before it returned
                found_ids, found_results, found_records = batch.found
                new = ~known[found_ids]
                if new.any():
                    take = np.flatnonzero(new).tolist()
                    results.update(found_ids[new], [found_results[i] for i in take])
                    known[found_ids[new]] = True
                    if files is not None and nbytes is not None and found_records and found_records[0] is not None:
                        _add_census(files, nbytes, found_ids[new], [found_records[i] for i in take], len(specs))
                    computed += len(take)
                    voxels += sum(grid.block(int(b)).write_roi.size for b in found_ids[new].tolist())
                    bar.update(len(take))
                repaired += batch.repaired
                voxels += batch.voxels
                n_failed += len(batch.failures)
                for block_id, exc in batch.failures:  # the Error line names the first; -v lists each
                    log.info("%s: block %d failed: %s", stage, block_id, exc)
                failures.extend(batch.failures[: max(0, 8 - len(failures))])
                bar.update(len(batch.ids) + len(batch.failures) - batch.repaired)
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"{voxels / max(elapsed, 1e-9) / 1e6:.2f} Mvox/s", refresh=False)
            if not in_process:
                future.release()
            if not in_process and follows is None:
                for _ in range(window - len(in_flight)):
                    nxt = submit_next()
                    if nxt is None:
                        break
                    completed.add(nxt)
    except BaseException:
        if in_process:
            runner.pool.shutdown(wait=True, cancel_futures=True)
        else:
            client.cancel(list(in_flight))
        raise
    finally:
        bar.close()
        if in_process:
            runner.pool.shutdown(wait=False)
    seconds = time.perf_counter() - start
    if failures:
        block_id, exc = failures[0]
        if all(isinstance(e, InvalidDataError) for _, e in failures):  # bad data: a rerun cannot help
            raise InvalidDataError(
                f"{stage}: {n_failed} of {total} blocks cannot be computed from their input (first: block "
                f"{block_id}: {exc}); the other blocks are kept"
            ) from exc
        raise RunIncompleteError(
            f"{stage}: {n_failed} of {total} blocks failed (first: block {block_id}: "
            f"{type(exc).__name__}: {exc}); finished blocks are kept, rerun the same command to resume"
        ) from exc
    if specs and files is not None and nbytes is not None and ids is None:
        store_census(specs, files.sum(axis=0).tolist(), nbytes.sum(axis=0).tolist())
    return StageReport(stage, total, computed, skipped - repaired, seconds, voxels, results, repaired)


POLL_SECONDS = 0.05
"""A following stage looks for finished tasks this often while it waits for its input."""


def _followed(submit_next: Callable[[], Any], waiting: Callable[[], bool], follows: Progress, parallel: int,
              window: int) -> Iterator[Any]:
    """Finished futures of a stage that follows another: tasks are submitted as their input is
    written (``submit_next`` returns None while the next one's is not), at most ``parallel`` until
    the first ones finished and ``window`` after that."""
    pending: list[Any] = []
    limit = parallel
    while True:
        while len(pending) < limit:
            future = submit_next()
            if future is None:
                break
            pending.append(future)
        done = [f.done() for f in pending]
        finished = [f for f, d in zip(pending, done) if d]
        if finished:
            pending = [f for f, d in zip(pending, done) if not d]
            limit = window
            yield from finished
            continue
        if not pending and not waiting():
            return
        if not pending:
            follows.wait(1.0)  # woken as soon as the stage it follows writes a block
        else:
            follows.wait(POLL_SECONDS)


TASK_SECONDS = 2.0
"""Chunks are grouped into tasks of about this many seconds, once the first tasks have been timed."""


def _group_size(per_chunk: list[float], left: int, parallel: int) -> int:
    """Ledger chunks in the next task: 1 until timed, then ~TASK_SECONDS of work, keeping the
    remaining work spread over at least 4 tasks per worker thread (``parallel``)."""
    seconds, finished = per_chunk
    if not finished:
        return 1
    per = seconds / finished
    size = int(TASK_SECONDS / per) if per > 0 else left
    return max(1, min(size, left // (4 * parallel) if left >= 4 * parallel else 1, 256))


def _add_census(files: npt.NDArray[np.int64], nbytes: npt.NDArray[np.int64], ids: npt.NDArray[np.int64],
                records: list[Any], n_specs: int) -> None:
    """Per block and written array, the storage objects and bytes it stored."""
    width = 2 + 2 * n_specs
    rec = np.asarray([r[:width] if r is not None else [0] * width for r in records], dtype=np.int64).reshape(-1, width)
    files[ids] = rec[:, 2::2]
    nbytes[ids] = rec[:, 3::2]
