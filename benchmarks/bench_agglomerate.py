"""Scale of the region-graph and agglomeration stages: seconds and peak memory vs fragments and edges.

Synthetic fragment volumes, cheap to make and exact: a regular grid of boxes of 2x4x4 voxels, each
box one fragment (``ids 1..n``), stored as the ``labels/fragments`` label image of an OME-Zarr image
whose level 0 is a boundary map (uint8, one channel, like ``emseg predict`` writes): low inside the
boxes, and on the last plane of every box along each axis a wall of random strength, so that the
mean affinity of an edge is spread over (0, 0.8) and the thresholds merge different fractions.
Every box touches its 6 neighbours: about 3 edges per fragment (``--layouts grid``); ``brick``
shifts every other layer and row of boxes by half a box, about 6 edges per fragment, to tell
memory that grows with the fragments from memory that would grow with the edges.

For every size the real stages run on one LocalCluster (2 worker processes), through the library
calls that ``emseg agglomerate`` / ``emseg segment`` make:

* ``graph``: :func:`emseg.workflows.agglomerate.build_graph` (edges, mean affinity, hierarchical merge scores
  by waterz over each block plus context, one ``.npz`` per block);
* ``global``: :func:`emseg.workflows.agglomerate.global_lookups` alone, the client's global step (a union-find
  over the fragment ids streaming the blocks' edge files, one lookup per threshold), measured on
  its own so that its memory is not mixed with the relabel's;
* ``agglomerate``: :func:`emseg.workflows.agglomerate.agglomerate` with three thresholds: that global step
  again, the lookups stored, and the blockwise relabel of three label images.

Memory: the client's resident set (this process) and every worker's are sampled every 20 ms during
each stage; reported are the client's peak, its peak minus its level just before the stage
(``client +MiB``) and the highest worker peak.  The volume is made in one process and every case
is measured in a fresh one, so that no case inherits memory from another.

Usage::

    nice -n 10 .venv/bin/python benchmarks/bench_agglomerate.py --sizes 1e4,1e5,1e6 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

BOX = (2, 4, 4)
MiB = 1 << 20


def grid_for(n: int) -> tuple[int, int, int]:
    """A box grid (gz, gy, gx) of about ``n`` boxes: gy = gx a power of two near n^(1/3), gz a
    multiple of 8 (whole 16-voxel blocks along z)."""
    gy = gx = 1 << int(np.floor(np.log2(max(8.0, n ** (1 / 3) * 1.3))))
    gz = max(8, int(round(n / (gy * gx) / 8)) * 8)
    return gz, gy, gx


def box_ids(z0: int, z1: int, shape: tuple[int, int, int], layout: str) -> np.ndarray:
    """Box index (int64, C order over the box grid) of every voxel of sections ``z0:z1``.

    ``grid``: aligned boxes, 6 neighbours each.  ``brick``: every other layer of boxes is shifted
    by half a box along y, and within a layer every other row by half a box along x (like bricks in
    a wall, in 3-D): about twice the contacts per box, the same box size.
    """
    gy, gx = shape[1] // BOX[1] + 1, shape[2] // BOX[2] + 1
    z = np.arange(z0, z1)[:, None, None]
    y = np.arange(shape[1])[None, :, None]
    x = np.arange(shape[2])[None, None, :]
    bz = z // BOX[0]
    if layout == "grid":
        by, bx = y // BOX[1] + 0 * z, x // BOX[2] + 0 * y
    else:
        by = (y + (bz % 2) * (BOX[1] // 2)) // BOX[1]
        bx = (x + ((by + bz) % 2) * (BOX[2] // 2)) // BOX[2]
    return (bz * gy + by) * gx + bx


def make_volume(path: Path, layout: str, grid: tuple[int, int, int], block: tuple[int, int, int], seed: int
                ) -> dict[str, object]:
    """Write the OME-Zarr image (boundary map at 0, box fragments at labels/fragments), slab by slab.

    Boxes that a block face cuts (``brick``) become one fragment per block, as emseg's per-block
    fragments are.  The boundary map has a wall of random strength (one per box and axis) on the
    last plane of each box along each axis.
    """
    from emseg.geometry import Roi
    from emseg.io import create_labels, create_volume, mark_complete

    gz, gy, gx = grid
    shape = (gz * BOX[0], gy * BOX[1], gx * BOX[2])
    chunks = tuple(min(b, s) for b, s in zip(block, shape))
    pred = create_volume(path, shape=shape, dtype=np.uint8, chunks=chunks, voxel_size=(8.0, 8.0, 8.0), channels=1)
    frag = create_labels(path, "fragments", chunks=chunks)
    rng = np.random.default_rng(seed)
    strength = rng.uniform(0.2, 1.0, size=(3, (gz + 1) * (gy + 1) * (gx + 1) * 2)).astype(np.float32)
    n = 0
    for z0 in range(0, shape[0], chunks[0]):  # slabs of whole blocks along z; no box crosses a slab
        z1 = min(z0 + chunks[0], shape[0])
        boxes = box_ids(z0, z1, shape, layout)
        block_x = np.arange(shape[2]) // chunks[2]
        block_y = np.arange(shape[1]) // chunks[1]
        key = (boxes * (shape[1] // chunks[1] + 1) + block_y[None, :, None]) * (shape[2] // chunks[2] + 1) \
            + block_x[None, None, :]
        _, inverse = np.unique(key, return_inverse=True)
        ids = inverse.reshape(key.shape).astype(np.uint64) + np.uint64(n + 1)
        n = int(ids.max())
        frag.write(Roi((z0, 0, 0), ids.shape), ids)
        b = rng.uniform(0.0, 0.15, size=ids.shape).astype(np.float32)
        for axis in range(3):
            nxt = [slice(None)] * 3
            cur = [slice(None)] * 3
            nxt[axis], cur[axis] = slice(1, None), slice(None, -1)
            wall = np.zeros(ids.shape, dtype=bool)
            wall[tuple(cur)] = ids[tuple(cur)] != ids[tuple(nxt)]  # last voxel before another fragment
            w = strength[axis][boxes % strength.shape[1]]
            b[wall] = np.maximum(b[wall], w[wall])
        pred.write(Roi((z0, 0, 0), ids.shape), np.round(b * 255).astype(np.uint8)[None])
    mark_complete(path)
    mark_complete(path / "labels" / "fragments")
    return {"fragments": n, "voxels": int(np.prod(shape)), "shape": list(shape), "layout": layout}


# ---------------------------------------------------------------------------------------------
# memory sampling


class Sampler:
    """Peak resident set of this process while a ``with`` block runs (sampled every 20 ms)."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = 0
        self.before = 0
        self._stop = threading.Event()

    def __enter__(self) -> Sampler:
        self.before = self._proc.memory_info().rss
        self.peak = self.before
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(0.02)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _worker_sampler_start() -> int:
    """On a worker: (re)start a thread recording the process's peak RSS."""
    import builtins
    import threading

    import psutil

    old = getattr(builtins, "_emseg_bench_sampler", None)
    if old is not None:
        old["stop"].set()
    proc = psutil.Process()
    state = {"peak": proc.memory_info().rss, "stop": threading.Event()}

    def loop() -> None:
        while not state["stop"].is_set():
            state["peak"] = max(state["peak"], proc.memory_info().rss)
            state["stop"].wait(0.02)

    threading.Thread(target=loop, daemon=True).start()
    builtins._emseg_bench_sampler = state  # type: ignore[attr-defined]
    return int(state["peak"])


def _worker_sampler_peak() -> int:
    import builtins

    import psutil

    state = builtins._emseg_bench_sampler  # type: ignore[attr-defined]
    return int(max(state["peak"], psutil.Process().memory_info().rss))


def run_case(path: Path, workers: int, thresholds: tuple[float, ...], block: tuple[int, ...]) -> dict[str, object]:
    from emseg.cluster import connect
    from emseg.workflows.agglomerate import agglomerate, build_graph, global_lookups

    out: dict[str, object] = {}
    with connect(workers=workers) as connection:
        client = connection.client

        def stage(name: str, fn):  # type: ignore[no-untyped-def]
            client.run(_worker_sampler_start)
            with Sampler() as s:
                start = time.perf_counter()
                result = fn()
                seconds = time.perf_counter() - start
            worker_peaks = client.run(_worker_sampler_peak)
            out[name] = {"seconds": round(seconds, 2), "client_before_MiB": round(s.before / MiB, 1),
                         "client_peak_MiB": round(s.peak / MiB, 1),
                         "client_growth_MiB": round((s.peak - s.before) / MiB, 1),
                         "worker_peak_MiB": round(max(worker_peaks.values()) / MiB, 1)}
            return result

        graph = stage("graph", lambda: build_graph(path, path / "labels" / "fragments", block_size=block,
                                                   progress=False, client=connection))
        fragments = path / "labels" / "fragments"
        stage("global", lambda: len(global_lookups(fragments, thresholds, n_fragments=graph.n_fragments,
                                                   n_blocks=graph.blocks)))
        report = stage("agglomerate", lambda: agglomerate(path / "labels" / "fragments", threshold=thresholds[0],
                                                          thresholds=thresholds[1:], progress=False,
                                                          client=connection))
    out["n_fragments"] = graph.n_fragments
    out["n_edges"] = graph.n_edges
    out["blocks"] = graph.blocks
    out["global_seconds"] = round(report.seconds_global, 2)
    out["relabel_seconds"] = round(report.seconds - report.seconds_global, 2)
    out["segments"] = {f"{t:g}": n for t, n in sorted(report.n_segments.items())}
    edge_files = sorted((path / "labels" / "fragments" / "graph" / "blocks").glob("*.npz"))
    out["edge_files_MiB"] = round(sum(f.stat().st_size for f in edge_files) / MiB, 1)
    out["largest_block_edges"] = max(int(r["edges"]) for r in graph.stage.results.values()) if graph.stage else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e4,1e5,1e6", help="approximate numbers of fragments")
    parser.add_argument("--block", default="16,128,128", help="block (= chunk) shape z,y,x")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--thresholds", default="0.5,0.3,0.7", help="the first is labels/segments")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--make", type=Path, default=None, help=argparse.SUPPRESS)  # internal: make one volume
    parser.add_argument("--grid", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)  # internal: one case
    parser.add_argument("--layouts", default="grid", help="grid and/or brick (about 2x the edges per fragment)")
    args = parser.parse_args()
    block = tuple(int(v) for v in args.block.split(","))
    if args.make is not None:
        grid = tuple(int(v) for v in args.grid.split(","))
        print(json.dumps(make_volume(args.make, args.layouts, grid, block, args.seed)))  # type: ignore[arg-type]
        return

    thresholds = tuple(float(t) for t in args.thresholds.split(","))
    if args.measure is not None:
        print(json.dumps(run_case(args.measure, args.workers, thresholds, block)))
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="emseg-bench-agglo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        cases = [(layout, int(float(s))) for layout in args.layouts.split(",") for s in args.sizes.split(",")]
        for layout, n in cases:
            grid = grid_for(n)
            path = workdir / f"{layout}_{n}.zarr"
            if path.exists():
                shutil.rmtree(path)
            start = time.perf_counter()
            made = subprocess.run([sys.executable, __file__, "--make", str(path), "--grid", ",".join(map(str, grid)),
                                   "--block", args.block, "--seed", str(args.seed), "--layouts", layout],
                                  check=True, capture_output=True, text=True)
            info = json.loads(made.stdout.strip().splitlines()[-1])
            print(f"made {path.name}: {info['fragments']} fragments, shape {info['shape']} in "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
            # each case in a fresh client process: equal baselines, no memory kept from an earlier case
            measured = subprocess.run([sys.executable, __file__, "--measure", str(path), "--block", args.block,
                                       "--workers", str(args.workers), "--thresholds", args.thresholds],
                                      check=True, stdout=subprocess.PIPE, text=True)
            row = {"requested": n, **info, **json.loads(measured.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
            shutil.rmtree(path)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    header = ("| layout | fragments | edges | blocks | graph s | graph worker peak MiB | graph client +MiB | "
              "global step s | global client +MiB | agglomerate s (global / relabel) | agglomerate worker peak MiB | "
              "agglomerate client +MiB | client peak MiB (all stages) | edge files MiB |")
    print(header)
    print("|" + "|".join(["---"] * (header.count("|") - 1)) + "|")
    for r in rows:
        g, u, a = r["graph"], r["global"], r["agglomerate"]
        print(f"| {r['layout']} | {r['n_fragments']:,} | {r['n_edges']:,} | {r['blocks']} | {g['seconds']} | "
              f"{g['worker_peak_MiB']} | {g['client_growth_MiB']} | {u['seconds']} | {u['client_growth_MiB']} | "
              f"{a['seconds']} ({r['global_seconds']} / {r['relabel_seconds']}) | "
              f"{a['worker_peak_MiB']} | {a['client_growth_MiB']} | "
              f"{max(r[k]['client_peak_MiB'] for k in ('graph', 'global', 'agglomerate'))} | {r['edge_files_MiB']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
