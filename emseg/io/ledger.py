"""Completion markers of blockwise stages, stored inside the output as a zarr array.

``OUT.zarr/emseg_state/<stage>`` is a 1-D string array with one chunk per block: the JSON result
of a finished block, or ``""`` while it is not done.  Chunk writes are atomic (write + rename),
so a block killed mid-write is simply not done.  The array's attributes hold the fingerprint of
the parameters that produced the markers; the output stays a clean zarr hierarchy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import zarr

from emseg.errors import ResumeMismatchError

STATE_GROUP = "emseg_state"


class Ledger:
    """Completion markers of one stage of one output."""

    def __init__(self, output: str | os.PathLike[str], stage: str) -> None:
        self.output = Path(output)
        self.stage = stage
        self.path = self.output / STATE_GROUP / stage

    def claim(self, n_blocks: int, fingerprint: str, params: Mapping[str, Any], *, overwrite: bool) -> None:
        """Bind the markers to ``fingerprint``: keep matching ones, clear others if ``overwrite``.

        Raises
        ------
        ResumeMismatchError
            Markers of other parameters exist and ``overwrite`` is false.
        """
        group = zarr.open_group(str(self.output), mode="a")
        state = group.require_group(STATE_GROUP)
        if self.stage in state:
            previous = state[self.stage]
            if previous.attrs.get("fingerprint") == fingerprint and previous.shape == (n_blocks,):
                return
            if not overwrite:
                raise ResumeMismatchError.between(
                    self.output, f"an earlier {self.stage} run", dict(previous.attrs.get("params", {})),
                    json.loads(json.dumps(params, sort_keys=True, default=str)))
            del state[self.stage]
        array = state.create_array(self.stage, shape=(n_blocks,), chunks=(1,), dtype=str, fill_value="")
        array.attrs.update({"fingerprint": fingerprint, "params": json.loads(json.dumps(params, sort_keys=True, default=str))})

    def done(self) -> dict[int, Any]:
        """block_id -> result of every finished block."""
        values = zarr.open_array(str(self.path), mode="r")[:]
        return {i: json.loads(v) for i, v in enumerate(values) if v}

    def record(self, block_id: int, result: Any) -> None:
        """Mark a block finished (call only after its data is written)."""
        zarr.open_array(str(self.path), mode="r+")[block_id] = json.dumps(result)

    def clear(self) -> None:
        group = zarr.open_group(str(self.output), mode="a")
        if STATE_GROUP in group and self.stage in group[STATE_GROUP]:
            del group[STATE_GROUP][self.stage]
