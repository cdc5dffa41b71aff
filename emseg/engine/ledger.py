"""Completion records of blockwise stages, stored inside the output as a zarr array.

``OUT.zarr/emseg_state/<stage>`` is a 1-D string array with one entry per block: the JSON record
of a finished block, or ``""`` while it is not done.  Entries are chunked by
:func:`blocks_per_chunk` blocks (1 up to 1,024 blocks, then a power of two keeping 513 to 1,024
chunks), and one runner task owns one chunk: it is the only writer of that chunk, and zarr writes a
chunk atomically (write + rename), so a task killed mid-write leaves the previous chunk intact.
Checking which of ``n`` wanted blocks are done reads ``n / blocks_per_chunk`` files, never a
directory scan.

A record is ``{"r": result, "w": [size digest, content digest, files, bytes, ..., stamp digest]}``:
besides the block's result, the storage objects (chunks or shards) its data went to, summarised by
63-bit digests (of their keys and sizes; of their keys, sizes and CRC-32s; of their keys, sizes and
modification times) and, per written array, their count and total size.  :func:`block_record`
computes them; a rerun (``verify="sizes"``) stats the objects: a block whose objects went missing or
changed size is recomputed, and one whose objects were written since it recorded them (same sizes,
other modification times) is read against its CRC-32s and recomputed if they differ.
``emseg info --verify`` (``"full"``) reads every block's bytes.  The per-array totals
(``census``) go to the image's ``emseg`` attributes, so that a reader can tell a chunk was
deleted by counting files (:func:`check_census`).

The array's attributes hold the fingerprint of the parameters that produced the records and the
arrays the stage writes; the output stays a clean zarr hierarchy.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import zarr

from emseg.errors import IncompleteOutputError
from emseg.geometry import Roi
from emseg.io.location import (
    PathOrUrl,
    absolute,
    filesystem,
    is_url,
    location,
    open_zarr_array,
    open_zarr_group,
    read_bytes,
    stat_of,
)

STATE_GROUP = "emseg_state"
TARGET_CHUNKS = 1024
RECORD_FORMAT = 2
STATUS_KEY = "emseg"
Verify = Literal["none", "sizes", "full"]
_MASK63 = (1 << 63) - 1


def blocks_per_chunk(n_blocks: int) -> int:
    """Blocks per ledger chunk: 1 up to ``TARGET_CHUNKS`` blocks, then a power of two."""
    k = 1
    while k * TARGET_CHUNKS < n_blocks:
        k *= 2
    return k


@dataclass(frozen=True)
class WriteSpec:
    """An array a stage writes blockwise: block ``b`` writes ``b.write_roi * scale`` (clipped) of it.

    ``path`` is the zarr array; ``scale`` maps the grid's voxels to the array's (``(2, 2, 2)`` for
    a level twice as fine as the grid, as in the pyramid's multi-level passes).
    """

    path: str
    scale: tuple[int, ...] = (1, 1, 1)


# ---------------------------------------------------------------------------------------------
# storage objects of a block


@functools.lru_cache(maxsize=64)
def _array_layout(path: str) -> tuple[tuple[int, ...], tuple[int, ...], Any]:
    """(shape, write-unit shape, chunk-key encoder) of a zarr array (the unit: shard, else chunk)."""
    array = open_zarr_array(path, mode="r")
    unit = array.shards if array.shards is not None else array.chunks
    return tuple(int(s) for s in array.shape), tuple(int(u) for u in unit), array.metadata.encode_chunk_key


def storage_keys(spec: WriteSpec, roi: Roi) -> list[Path]:
    """Files of the storage objects (chunks, or shards) of ``spec.path`` covering ``roi`` (grid voxels)."""
    shape, unit, encode = _array_layout(spec.path)
    lead = len(shape) - roi.ndim
    begin = [b * s for b, s in zip(roi.begin, spec.scale)]
    end = [min(e * s, n) for e, s, n in zip(roi.end, spec.scale, shape[lead:])]
    ranges = [range(-(-n // u)) for n, u in zip(shape[:lead], unit[:lead])]
    ranges += [range(b // u, -(-e // u)) for b, e, u in zip(begin, end, unit[lead:])]
    root = location(spec.path)
    return [root / encode(tuple(index)) for index in _product(ranges)]


def _product(ranges: Sequence[range]) -> Iterator[tuple[int, ...]]:
    import itertools

    return itertools.product(*ranges)


def block_record(writes: Sequence[WriteSpec], roi: Roi, *, content: bool = True) -> list[int]:
    """``[size digest, content digest, files_0, bytes_0, files_1, ..., stamp digest]`` of the objects a
    block wrote.

    ``files_i``/``bytes_i``: storage objects of ``writes[i]`` present and their total size.  Missing
    objects (zarr does not store chunks equal to the fill value) enter the digests as size ``-1``.
    The content digest (CRC-32 of every object) is ``0`` when ``content`` is false; the stamp digest
    holds the objects' modification times.
    """
    sizes = hashlib.blake2b(digest_size=8)
    crcs = hashlib.blake2b(digest_size=8)
    stamps = hashlib.blake2b(digest_size=8)
    counts: list[int] = []
    for spec_index, spec in enumerate(writes):
        files = total = 0
        for path in storage_keys(spec, roi):
            key = f"{spec_index}:{str(path)[len(spec.path):]}"
            found = stat_of(path)
            size, stamp, crc = (-1, "", 0) if found is None else (found[0], found[1], 0)
            if content and found is not None:
                data = read_bytes(path)
                size, crc = (-1, 0) if data is None else (len(data), zlib.crc32(data))
            if size >= 0:
                files += 1
                total += size
            sizes.update(f"{key}:{size};".encode())
            crcs.update(f"{key}:{size}:{crc};".encode())
            stamps.update(f"{key}:{size}:{stamp};".encode())
        counts += [files, total]
    return [int.from_bytes(sizes.digest(), "little") & _MASK63,
            int.from_bytes(crcs.digest(), "little") & _MASK63 if content else 0, *counts,
            int.from_bytes(stamps.digest(), "little") & _MASK63]


def record_matches(record: Sequence[int], writes: Sequence[WriteSpec], roi: Roi, mode: Verify) -> bool:
    """Whether a block's storage objects still match ``record``.

    ``"sizes"``: stat only, and where an object was written after the record (another modification
    time, a record that holds one) its bytes are read against the record's CRC-32s; ``"full"``: read."""
    if mode == "none" or not writes:
        return True
    now = block_record(writes, roi, content=mode == "full")
    if now[0] != record[0]:
        return False
    if mode == "full":
        return now[1] == record[1]
    stamp = 2 + 2 * len(writes)
    if len(record) > stamp and now[stamp] != record[stamp]:
        return block_record(writes, roi, content=True)[1] == record[1]
    return True


# ---------------------------------------------------------------------------------------------
# the ledger


def _jsonable(params: Mapping[str, Any]) -> Any:
    return json.loads(json.dumps(params, sort_keys=True, default=str))


class Ledger:
    """Completion records of one stage of one output."""

    def __init__(self, output: PathOrUrl, stage: str) -> None:
        self.output = location(output)
        self.stage = stage
        self.path = self.output / STATE_GROUP / stage

    def exists(self) -> bool:
        return (self.path / "zarr.json").exists() or (self.path / ".zarray").exists()

    def attrs(self) -> dict[str, Any]:
        """The records' attributes: ``fingerprint``, ``params``, ``format``, ``writes``."""
        return dict(self.open().attrs)

    def n_blocks(self) -> int:
        return int(self.open().shape[0])

    def create(self, n_blocks: int, fingerprint: str, params: Mapping[str, Any], *,
               writes: Sequence[WriteSpec] = ()) -> None:
        """Make empty records for ``n_blocks`` blocks, bound to ``fingerprint`` (whether existing ones
        may be kept is :func:`emseg.engine.runstate.claim_stage`'s decision)."""
        state = open_zarr_group(self.output, mode="a").require_group(STATE_GROUP)
        array = state.create_array(self.stage, shape=(n_blocks,), chunks=(blocks_per_chunk(n_blocks),), dtype=str,
                                   fill_value="")
        array.attrs.update({"fingerprint": fingerprint, "params": _jsonable(params), "format": RECORD_FORMAT,
                            "writes": self._writes_attr(writes)})

    def set_writes(self, writes: Sequence[WriteSpec]) -> None:
        """Record the arrays the stage writes (records made before they were recorded)."""
        self.open("r+").attrs["writes"] = self._writes_attr(writes)

    def _writes_attr(self, writes: Sequence[WriteSpec]) -> list[dict[str, Any]]:
        out = []
        root = str(absolute(self.output)).rstrip("/") + "/"
        for spec in writes:
            path = str(absolute(spec.path))
            rel = path[len(root):] if path.startswith(root) else path
            out.append({"path": rel, "scale": list(spec.scale)})
        return out

    def writes(self) -> list[WriteSpec]:
        """The arrays the stage writes (as recorded at claim)."""
        array = open_zarr_array(self.path, mode="r")
        out = []
        for w in array.attrs.get("writes") or []:
            path = str(w["path"])
            whole = is_url(path) or Path(path).is_absolute()
            out.append(WriteSpec(path if whole else str(self.output / path), tuple(w["scale"])))
        return out

    # --- reading ---------------------------------------------------------------------------

    def open(self, mode: Literal["r", "r+"] = "r") -> zarr.Array[Any]:
        return open_zarr_array(self.path, mode=mode)

    def iter_chunks(self, ids: npt.NDArray[np.int64] | None = None
                    ) -> Iterator[tuple[npt.NDArray[np.int64], npt.NDArray[Any]]]:
        """``(block ids, raw entries)`` chunk by chunk, for ``ids`` (sorted) or every block.

        Reads only the chunks holding wanted blocks: the cost is O(wanted blocks), in about
        ``wanted / blocks_per_chunk`` file reads.
        """
        array = self.open()
        n = int(array.shape[0])
        k = int(array.chunks[0])
        if ids is None:
            for c0 in range(0, n, k * 64):  # 64 chunks per read: zarr fetches them concurrently
                values = np.asarray(array[c0: min(c0 + k * 64, n)], dtype=object)
                yield np.arange(c0, c0 + len(values), dtype=np.int64), values
            return
        chunk_of = ids // k
        bounds = np.flatnonzero(np.diff(chunk_of)) + 1
        for part in np.split(ids, bounds):
            if not len(part):
                continue
            c = int(part[0]) // k
            values = np.asarray(array[c * k: min((c + 1) * k, n)], dtype=object)
            yield part, values[part - c * k]

    def done_mask(self, ids: npt.NDArray[np.int64] | None = None) -> npt.NDArray[np.bool_]:
        """Whether each of ``ids`` (default: every block) is done."""
        parts = [values != "" for _, values in self.iter_chunks(ids)]
        return np.concatenate(parts).astype(bool) if parts else np.zeros(0, dtype=bool)

    def done(self) -> dict[int, Any]:
        """block_id -> result of every finished block (small grids and tests; see :meth:`iter_chunks`)."""
        wrapped = self.open().attrs.get("format") == RECORD_FORMAT
        out: dict[int, Any] = {}
        for ids, values in self.iter_chunks():
            for i, v in zip(ids, values):
                if v:
                    record = json.loads(v)
                    out[int(i)] = record["r"] if wrapped else record
        return out

    def clear(self) -> None:
        group = open_zarr_group(self.output, mode="a")
        if STATE_GROUP in group and self.stage in group[STATE_GROUP]:
            del group[STATE_GROUP][self.stage]


def parse_records(values: npt.NDArray[Any], wrapped: bool) -> list[tuple[Any, list[int] | None]]:
    """``(result, storage record)`` of raw non-empty ledger entries, parsed in one call."""
    if not len(values):
        return []
    parsed = json.loads("[" + ",".join(values) + "]")
    if wrapped:
        return [(p["r"], p.get("w")) for p in parsed]
    return [(p, None) for p in parsed]


def encode_record(result: Any, record: list[int] | None) -> str:
    value: dict[str, Any] = {"r": result}
    if record is not None:
        value["w"] = record
    return json.dumps(value)


# ---------------------------------------------------------------------------------------------
# census: per-array totals for readers


def store_census(writes: Sequence[WriteSpec], files: Sequence[int], nbytes: Sequence[int]) -> None:
    """Record each written array's number of storage objects and bytes in its image's attributes."""
    for spec, f, b in zip(writes, files, nbytes):
        path = location(spec.path)
        parent = path.parent
        if not any((parent / m).exists() for m in ("zarr.json", ".zattrs", ".zgroup")):
            continue
        group = open_zarr_group(parent, mode="a")
        status = dict(group.attrs.get(STATUS_KEY) or {})
        census = dict(status.get("census") or {})
        census[path.name] = [int(f), int(b)]
        status["census"] = census
        group.attrs[STATUS_KEY] = status


def census_of(array_path: PathOrUrl) -> list[int]:
    """``[files, bytes]`` of the chunk objects stored for the array at ``array_path`` (for a census
    recorded by a writer that does not run blockwise, such as ``emseg import``)."""
    return list(_count_objects(location(array_path)))


def _count_objects(array_path: Any) -> tuple[int, int]:
    """Stored chunk objects of a zarr array (metadata files excluded) and their total size."""

    files = total = 0
    if is_url(array_path):
        fs, inner = filesystem(array_path)
        for name, info in fs.find(inner, detail=True).items():
            base = name.rsplit("/", 1)[-1]
            if base not in ("zarr.json", ".zarray", ".zattrs", ".zgroup") and ".partial" not in base:
                files += 1
                total += int(info.get("size") or 0)
        return files, total
    stack = [array_path]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.name not in ("zarr.json", ".zarray", ".zattrs", ".zgroup") and ".partial" not in entry.name:
                    files += 1
                    total += entry.stat(follow_symlinks=False).st_size
    return files, total


def check_census(image_path: PathOrUrl, array_name: str) -> None:
    """Refuse an array whose stored chunks differ from what its run wrote (deleted or truncated).

    Cost: one directory walk of the array (its chunk files, not its voxels).

    Raises
    ------
    IncompleteOutputError
        Files or bytes differ from the census the run recorded.
    """
    group = open_zarr_group(image_path, mode="r")
    census = (group.attrs.get(STATUS_KEY) or {}).get("census") or {}
    if array_name not in census:
        return
    want_files, want_bytes = census[array_name]
    files, total = _count_objects(location(image_path) / array_name)
    if (files, total) != (want_files, want_bytes):
        raise IncompleteOutputError(
            f"{location(image_path) / array_name}: {files} chunk files ({total} bytes) on disk, but the run that "
            f"wrote it left {want_files} ({want_bytes} bytes): chunks were deleted or damaged; rerun the "
            "command that made it to recompute them")


# ---------------------------------------------------------------------------------------------
# verification of a whole output (``emseg info --verify``)


@dataclass(frozen=True)
class Damage:
    """Blocks of one stage whose storage objects no longer match their records."""

    stage: str
    output: Path
    block_ids: tuple[int, ...]
    checked: int
    pending: tuple[int, ...] = ()
    """Blocks without a record: found damaged by an earlier check, or never finished; a rerun makes them."""


def stages_of(output: PathOrUrl) -> list[str]:
    """Stages with records under ``output``."""
    state = location(output) / STATE_GROUP
    if not state.is_dir():
        return []
    return sorted(p.name for p in state.iterdir() if p.is_dir() and _is_array(p))


def _is_array(path: Path) -> bool:
    """Whether ``path`` holds a zarr array (ledgers), not a group (the scratch of a run)."""
    if (path / ".zarray").exists():
        return True
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(meta, dict) and meta.get("node_type") == "array"


def grid_of(ledger: Ledger) -> Any:
    """The block grid a stage ran on (recorded in its parameters by the runner), or None."""
    from emseg.geometry import BlockGrid

    grid = (ledger.open().attrs.get("params") or {}).get("grid")
    if not grid:
        return None
    offset, shape, block, halo, *rest = (tuple(int(v) for v in g) for g in grid)
    if not rest:  # a symmetric halo, no snapping
        return BlockGrid(Roi(offset, shape), block, halo)
    halo_hi, snap = rest
    return BlockGrid(Roi(offset, shape), block, halo, None if halo_hi == halo else halo_hi, snap)


def verify_stage(output: PathOrUrl, stage: str, mode: Verify = "full") -> Damage:
    """Recompute the storage records of every done block of ``stage`` and list the mismatches."""
    ledger = Ledger(output, stage)
    writes = ledger.writes()
    wrapped = ledger.open().attrs.get("format") == RECORD_FORMAT
    grid = grid_of(ledger)
    bad: list[int] = []
    pending: list[int] = []
    checked = 0
    if writes and wrapped and grid is not None:
        for ids, values in ledger.iter_chunks():
            done = values != ""
            pending += [int(i) for i in ids[~done]]
            for block_id, (_, record) in zip(ids[done], parse_records(values[done], True)):
                if record is None:
                    continue
                checked += 1
                if not record_matches(record, writes, grid.block(int(block_id)).write_roi, mode):
                    bad.append(int(block_id))
    return Damage(stage, location(output), tuple(bad), checked, tuple(pending))


def forget_blocks(output: PathOrUrl, stage: str, block_ids: Sequence[int]) -> None:
    """Mark blocks not done (their data failed verification), so that a rerun recomputes them."""
    array = Ledger(output, stage).open("r+")
    for block_id in block_ids:
        array[int(block_id)] = ""


def verify_output(path: PathOrUrl, mode: Verify = "full") -> list[Damage]:
    """Check every recorded block of an output (an image and its label images) against its chunks.

    Blocks that fail are marked not done and their image incomplete, so that readers refuse the
    output and rerunning the command that made it recomputes exactly those blocks.  Returns the
    damage found per stage (empty lists of blocks when all is well).
    """
    root = location(path)
    roots = [root]
    labels = root / "labels"
    if labels.is_dir():
        roots += sorted(p for p in labels.iterdir() if (p / STATE_GROUP).is_dir())
    found: list[Damage] = []
    for image in roots:
        for stage in stages_of(image):
            damage = verify_stage(image, stage, mode)
            found.append(damage)
            if damage.block_ids:
                forget_blocks(image, stage, damage.block_ids)
                group = open_zarr_group(image, mode="a")
                status = dict(group.attrs.get(STATUS_KEY) or {})
                status.update(status="incomplete", damaged={stage: list(damage.block_ids)[:100]})
                group.attrs[STATUS_KEY] = status
    return found
