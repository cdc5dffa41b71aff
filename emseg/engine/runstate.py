"""The run state of an output: may it be written, is it this run's to resume, or must it be replaced.

One mechanism for every stage, so that resume and ``--overwrite`` mean the same everywhere:

* :class:`OutputClaim`: an image (or a record inside an existing image) that a stage writes.  Its
  ``emseg`` attributes hold a *record* ``{"fingerprint", "params"}`` (under ``key``; a prediction
  keeps ``stage`` and ``params`` at the top level).  :meth:`OutputClaim.check` refuses what is not
  this kind of output (:class:`~emseg.errors.OutputExistsError`) or holds other parameters
  (:class:`~emseg.errors.ResumeMismatchError`) unless ``overwrite``; :meth:`OutputClaim.ensure`
  then resumes, or starts over through the stage's ``create`` callback (which removes only what
  emseg wrote, :func:`emseg.io.safety.made_by_emseg`), writes the record with status
  ``incomplete`` and registers the run's scratch arrays; :meth:`OutputClaim.complete` marks it
  complete and removes the scratch.  :func:`emseg.engine.runner.run_blockwise` ensures the claim it is
  given before its first block; stage code builds the claim and may :meth:`~OutputClaim.check` it
  early, before a cluster starts.
  An output written once (a synthetic volume, an export: ``once``) resumes only while it is
  unfinished and holds this very record; anything else there is an existing output, refused unless
  ``overwrite`` by the ``create`` callback (:func:`emseg.io.safety.prepare_output`).
* :func:`claim_stage`: the same decision for the completion records of one blockwise stage
  (:class:`emseg.engine.ledger.Ledger`), called by :func:`emseg.engine.runner.run_blockwise` alone.  What a
  stage writes outside an image record (pyramid levels, mesh fragments) is its
  :class:`StageOutputs`: made again whenever the records start over, and resumed only while intact.

Fingerprints are :func:`fingerprint_of` the parameters (a stable hash of their JSON); a file the run
depends on (a checkpoint's weights) enters them as its :func:`file_digest`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from emseg.engine.ledger import Ledger, WriteSpec
from emseg.engine.scratch import remove_scratch, require_scratch
from emseg.errors import OutputExistsError, ResumeMismatchError
from emseg.io.location import Location, is_dir
from emseg.io.safety import made_by_emseg, occupied, overwrite_hint, zarr_attrs
from emseg.io.volume import STATUS_KEY, mark_complete, update_status

log = logging.getLogger(__name__)

__all__ = ["OutputClaim", "Scratch", "StageOutputs", "claim_stage", "file_digest", "fingerprint_of", "record_complete"]


def fingerprint_of(params: Mapping[str, Any]) -> str:
    """Stable hash of JSON-able run parameters."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """Stable hash of a file's bytes (the first 16 hex digits of its SHA-256), read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _jsonable(params: Mapping[str, Any]) -> Any:
    return json.loads(json.dumps(params, sort_keys=True, default=str))


@dataclass(frozen=True)
class Scratch:
    """A 3-D scratch array of a run (``OUT/emseg_state/scratch/<name>``, :mod:`emseg.engine.scratch`)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]

    @classmethod
    def of(cls, name: str, shape: Sequence[int], dtype: npt.DTypeLike, chunks: Sequence[int]) -> Scratch:
        return cls(name, tuple(int(s) for s in shape), str(np.dtype(dtype)), tuple(int(c) for c in chunks))


@dataclass
class OutputClaim:
    """An output a stage writes, and whether this run may write, resume or replace it.

    Parameters
    ----------
    path : Path
        The image whose ``emseg`` attributes hold the run's record.
    params : mapping
        Everything that determines the output; its :func:`fingerprint_of` decides resume.
    kind : str
        What the output is, for messages: ``"prediction"`` ("... is not an emseg prediction").
    what : str
        What a record of other parameters holds, for :meth:`ResumeMismatchError.between`.
    create : callable
        ``create(record)`` makes the image when the run starts (over): the record is what the run
        stores in the image's ``emseg`` attributes (given so that the image's first metadata write
        can hold it).  Not called for a :attr:`within` claim's resume.
    key : str or None
        The record is ``status[key]`` (``{"fingerprint", "params"}``); None: the top-level status is
        the record, ``stage`` naming its kind (a prediction).
    stage : str or None
        With ``key=None``: the ``stage`` attribute of this kind of output.
    others : str or None
        Refuse an emseg image of another kind even with ``overwrite`` (it is an input of something):
        the message's description of what it may be, e.g. ``"a raw image or labels"``.
    within : bool
        The record lives inside an image that exists already (a region graph inside its fragments):
        the claim "exists" when the record does, starting over calls ``create`` to clear what the old
        record's run wrote, matching records resume even with ``overwrite``, and completion sets
        ``status: complete`` in the record instead of the image's status.
    overwrite : bool
        Replace a record of other parameters (and, unless ``within``, a matching one).
    scratch : sequence of Scratch
        Scratch arrays the run needs: created (or reused when resuming) by :meth:`ensure`, removed by
        :meth:`complete`.
    validate : callable, optional
        ``validate(path)`` before resuming: raise when the existing image cannot hold this run.
    once : bool
        An output written once (a synthetic volume, an export): only an unfinished one (status
        ``incomplete``) holding this record resumes; anything else at ``path`` is started over
        through ``create``, which refuses an existing output unless ``overwrite``
        (:func:`emseg.io.safety.prepare_output`).  :meth:`check` raises nothing then.
    """

    path: Location
    params: Mapping[str, Any]
    kind: str
    what: str
    create: Callable[[dict[str, Any]], Any]
    key: str | None = None
    stage: str | None = None
    others: str | None = None
    within: bool = False
    overwrite: bool = False
    scratch: Sequence[Scratch] = ()
    validate: Callable[[Any], None] | None = None
    once: bool = False
    started_over: bool = field(default=False, init=False)
    """Set by :meth:`ensure`: the run started over (the stages' records must start over too)."""
    _ready: bool = field(default=False, init=False, repr=False)

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.params)

    def record(self, **extra: Any) -> dict[str, Any]:
        """The ``emseg`` attributes that identify this run (plus ``extra`` in the record)."""
        if self.key is None:
            return {"stage": self.stage, "params": dict(self.params), **extra}
        return {self.key: {"fingerprint": self.fingerprint, "params": dict(self.params), **extra}}

    def _status(self) -> dict[str, Any] | None:
        attrs = zarr_attrs(self.path) if is_dir(self.path) else None
        status = (attrs or {}).get(STATUS_KEY)
        return status if isinstance(status, dict) else None

    def _of_kind(self, status: dict[str, Any]) -> bool:
        """Whether ``status`` is that of this kind of output (else another emseg image's)."""
        return status.get("stage") == self.stage if self.key is None else isinstance(status.get(self.key), dict)

    def _previous(self, status: dict[str, Any] | None) -> dict[str, Any] | None:
        """The record of this kind of run in ``status`` (None: none, or another kind of output)."""
        if status is None or not self._of_kind(status):
            return None
        record = status if self.key is None else status[self.key]
        return record if isinstance(record.get("params", {}), dict) and (self.key or "params" in record) else None

    def check(self) -> bool:
        """Whether the run resumes what is there; raises when it may not write the output at all.

        Touches nothing.

        Raises
        ------
        OutputExistsError
            The path holds something that is not this kind of output (and ``overwrite`` is false, or
            it is an emseg image of another kind and ``others`` is set).
        ResumeMismatchError
            The path holds this kind of output made with other parameters and ``overwrite`` is false.
        """
        status = self._status()
        previous = self._previous(status)
        if self.once:  # anything but this very unfinished run is create's to refuse or replace
            return (not self.overwrite and previous is not None and status is not None
                    and status.get("status") == "incomplete" and previous.get("fingerprint") == self.fingerprint)
        if self.within:
            if previous is None or not previous.get("fingerprint"):
                return False
            return _resumable(self.path, self.what, previous, self.fingerprint, self.params, self.overwrite)
        if not occupied(self.path):
            return False
        if self.others is not None and status is not None and not self._of_kind(status):
            # an emseg image of another kind (a raw import, labels): --overwrite must not replace it
            raise OutputExistsError(f"{self.path} already exists and is not an emseg {self.kind} but another emseg "
                                    f"image ({self.others}); choose another output path")
        if self.overwrite:
            if not made_by_emseg(self.path):  # refused before a cluster starts, not by create
                raise OutputExistsError(f"{self.path} already exists; {overwrite_hint(self.path)}")
            return False
        if previous is None:
            raise OutputExistsError(f"{self.path} already exists and is not an emseg {self.kind}; "
                                    f"{overwrite_hint(self.path)}")
        return _resumable(self.path, self.what, previous, self.fingerprint, self.params, overwrite=False)

    def ensure(self) -> Location:
        """Resume the output or (re)create it, then register the scratch arrays; once per claim."""
        if self._ready:
            return self.path
        if self.check():
            if self.validate is not None:
                self.validate(self.path)
            log.info("%s: resuming an earlier run", self.path)
        else:
            record = self.record(**({"status": "incomplete"} if self.within else {}))
            self.create(record)
            update_status(self.path, **(record if self.within else {"status": "incomplete", **record}))
            self.started_over = True
        for s in self.scratch:
            require_scratch(self.path, s.name, shape=s.shape, dtype=s.dtype, chunks=s.chunks)
        self._ready = True
        return self.path

    def complete(self, *, keep_scratch: bool = False, attrs: Mapping[str, Any] | None = None, **extra: Any) -> None:
        """Mark the run finished: its record gains ``extra`` (e.g. ``n_segments``), the image's status
        becomes ``complete`` (``within``: the record's ``status``) plus ``attrs``; the scratch (arrays
        and tables, :mod:`emseg.engine.scratch`) is removed unless ``keep_scratch``."""
        if self.within:
            record = self.record(status="complete", **extra)
            update_status(self.path, **(attrs or {}), **record)
        elif self.key is None:
            mark_complete(self.path, **(attrs or {}), **extra)
        else:
            mark_complete(self.path, **(attrs or {}), **self.record(**extra))
        if not keep_scratch and not self.within:  # the registered arrays and any tables the run stored
            remove_scratch(self.path)


def record_complete(record: Mapping[str, Any]) -> bool:
    """Whether a record (an image's status, a record within one, a stored lookup's attributes) says
    its run finished: ``status`` ``"complete"``; records written before carry ``complete: true``
    instead, and still count."""
    return record.get("status") == "complete" or record.get("complete") is True


def _resumable(where: Location, what: str, previous: Mapping[str, Any], fingerprint: str, params: Mapping[str, Any],
               overwrite: bool) -> bool:
    """Whether ``previous`` (a record) holds the run of ``fingerprint``; a record of another one is
    refused unless ``overwrite`` (then False: start over)."""
    old = previous.get("fingerprint") or fingerprint_of(previous.get("params") or {})
    if old == fingerprint:
        return True
    if not overwrite:
        raise ResumeMismatchError.between(where, what, dict(previous.get("params") or {}), _jsonable(params))
    return False


@dataclass(frozen=True)
class StageOutputs:
    """What one blockwise stage writes outside an image record (pyramid levels, mesh fragments).

    Parameters
    ----------
    create : callable
        ``create()`` makes them afresh (removing what an earlier run of the stage left) whenever the
        stage's records start over: after the old records are cleared, before the new ones exist.
    intact : callable, optional
        ``intact()``: whether they can still hold the run (e.g. the level arrays have the planned
        shape); matching records are kept only while it holds, else the stage starts over.
    """

    create: Callable[[], Any]
    intact: Callable[[], bool] | None = None


def claim_stage(ledger: Ledger, n_blocks: int, fingerprint: str, params: Mapping[str, Any], *, overwrite: bool,
                writes: Sequence[WriteSpec] = (), outputs: StageOutputs | None = None) -> bool:
    """Bind a stage's completion records to ``fingerprint``: keep matching ones, else start them over
    (refused unless ``overwrite`` when they hold another run).  ``outputs`` are made again with the
    records, and matching records are kept only while ``outputs`` are intact.

    Returns
    -------
    bool
        Whether the records (and ``outputs``) started over.

    Raises
    ------
    ResumeMismatchError
        Records of other parameters exist and ``overwrite`` is false.
    """
    if ledger.exists():
        attrs = ledger.attrs()
        same = attrs.get("fingerprint") == fingerprint and ledger.n_blocks() == n_blocks
        if same and (outputs is None or outputs.intact is None or outputs.intact()):
            if writes and attrs.get("writes") is None:
                ledger.set_writes(writes)
            return False
        # no fingerprint: a claim cut short (disk full, kill) before its attributes were written;
        # nothing was recorded under it, so it is simply made again
        if not same and not overwrite and "fingerprint" in attrs:
            raise ResumeMismatchError.between(ledger.output, f"an earlier {ledger.stage} run",
                                              dict(attrs.get("params", {})), _jsonable(params))
        ledger.clear()
    if outputs is not None:
        outputs.create()
    ledger.create(n_blocks, fingerprint, _jsonable(params), writes=writes)
    return True
