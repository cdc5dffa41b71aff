"""Compare two emseg outputs array by array: same arrays, shapes, dtypes, chunks and decoded bytes.

The recorded check behind issue 12's "outputs of ``emseg segment`` on the README demo are
byte-identical before and after the refactor" (how it was run: ``benchmarks/README.md``)::

    python benchmarks/compare_outputs.py OLD.zarr NEW.zarr

Exit 0 and one line per array when every array matches; exit 1 naming the first difference.
Metadata (attributes) is not compared: it records paths, dates and fingerprints that differ by design.
"""

from __future__ import annotations

import sys

import numpy as np
import zarr


def arrays(group: zarr.Group, prefix: str = "") -> dict[str, zarr.Array]:
    found: dict[str, zarr.Array] = {}
    for name, item in group.members():
        path = f"{prefix}{name}"
        if {"emseg_state", "emseg_scratch"} & set(path.split("/")):
            continue  # completion records and scratch space, not outputs
        if isinstance(item, zarr.Array):
            found[path] = item
        else:
            found.update(arrays(item, path + "/"))
    return found


def main(old_path: str, new_path: str) -> int:
    old, new = arrays(zarr.open_group(old_path, mode="r")), arrays(zarr.open_group(new_path, mode="r"))
    if sorted(old) != sorted(new):
        print(f"different arrays: only in {old_path}: {sorted(set(old) - set(new))}; only in {new_path}: {sorted(set(new) - set(old))}")
        return 1
    for name in sorted(old):
        a, b = old[name], new[name]
        if (a.shape, a.dtype, a.chunks) != (b.shape, b.dtype, b.chunks):
            print(f"{name}: shape/dtype/chunks {a.shape} {a.dtype} {a.chunks} vs {b.shape} {b.dtype} {b.chunks}")
            return 1
        x, y = a[...], b[...]
        if x.tobytes() != y.tobytes():
            print(f"{name}: values differ in {int(np.count_nonzero(x != y))} of {x.size} elements")
            return 1
        print(f"{name}: identical ({a.shape} {a.dtype}, {x.nbytes:,} bytes)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
