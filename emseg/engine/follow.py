"""One stage following another: a block starts as soon as the blocks of the stage before it that
it reads are written, not after that whole stage.

The producing stage's :func:`~emseg.engine.runner.run_blockwise` posts its finished blocks (those
an earlier run finished included) to a :class:`Progress`; the following stage's ``run_blockwise``,
in another thread of the same client process, submits a task only once the progress covers the
read regions (halo included) of the task's blocks.  Both stages keep their own records, so each
resumes on its own, and the client holds one boolean per producer block.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import numpy.typing as npt

from emseg.errors import RunIncompleteError
from emseg.geometry import BlockGrid, Roi

__all__ = ["Progress"]


class Progress:
    """The finished blocks of a running stage, shared by the threads of one process.

    The producing stage calls :meth:`start`, :meth:`mark` and, when it returns or raises,
    :meth:`end`; followers ask :meth:`covers` and block in :meth:`wait`.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.grid: BlockGrid | None = None
        self._done: npt.NDArray[np.bool_] | None = None
        self._ended = False
        self._error: BaseException | None = None
        self._changed = threading.Condition()

    def start(self, grid: BlockGrid) -> None:
        """The producing stage is planned: its output exists and its blocks are ``grid``."""
        with self._changed:
            self.grid = grid
            self._done = np.zeros(grid.grid_shape, dtype=bool)
            self._changed.notify_all()

    def mark(self, block_ids: npt.ArrayLike) -> None:
        """Blocks ``block_ids`` of the producing stage are written (and recorded)."""
        ids = np.asarray(block_ids, dtype=np.int64).ravel()
        if not len(ids):
            return
        with self._changed:
            assert self._done is not None, "mark() before start()"
            self._done.reshape(-1)[ids] = True
            self._changed.notify_all()

    def end(self, error: BaseException | None = None) -> None:
        """The producing stage returned (``error`` None) or raised ``error``."""
        with self._changed:
            self._ended = True
            self._error = error
            self._changed.notify_all()

    def wait_started(self) -> BlockGrid:
        """Block until the producing stage is planned; raise when it ended before that."""
        with self._changed:
            self._changed.wait_for(lambda: self.grid is not None or self._ended)
            if self.grid is None:
                raise self._failure()
            return self.grid

    def wait_ended(self) -> None:
        """Block until the producing stage returned; raise when it raised."""
        with self._changed:
            self._changed.wait_for(lambda: self._ended)
            if self._error is not None:
                raise self._failure()

    def covers(self, roi: Roi) -> bool:
        """Whether every producer block whose core meets ``roi`` (clipped to the volume) is written.

        Raises :class:`~emseg.errors.RunIncompleteError` when the producing stage ended without
        writing them: they will not come.
        """
        with self._changed:
            if self.grid is None or self._done is None:
                if self._ended:
                    raise self._failure()
                return False
            grid = self.grid
            clipped = roi.intersect(grid.total_roi)
            if clipped.empty:
                return True
            first = [(b - o) // s for b, o, s in zip(clipped.begin, grid.total_roi.offset, grid.block_shape)]
            last = [-(-(e - o) // s) for e, o, s in zip(clipped.end, grid.total_roi.offset, grid.block_shape)]
            done = bool(self._done[tuple(slice(f, t) for f, t in zip(first, last))].all())
            if not done and self._ended:
                raise self._failure()
            return done

    def wait(self, timeout: float) -> None:
        """Block until the progress changes or ``timeout`` seconds pass.

        Once the producing stage has ended nothing changes any more: the full ``timeout`` passes
        (a follower polling its own tasks in a loop must not spin).
        """
        with self._changed:
            if not self._ended:
                self._changed.wait(timeout)
                return
        time.sleep(timeout)

    def _failure(self) -> RunIncompleteError:
        why = f"{type(self._error).__name__}: {self._error}" if self._error is not None else "it stopped"
        return RunIncompleteError(f"{self.stage} did not write every block the next stage reads ({why}); "
                                  "rerun the same command to resume")
