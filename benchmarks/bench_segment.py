"""Benchmark ``emseg segment`` end to end against its forward-only limit, and each post-processing
stage against the library baselines, on the same volumes, in one run, rounds interleaved.

Volumes (real EM):

* 2-D: the ISBI 2012 test volume (30 x 512 x 512, 50 x 4 x 4 nm) tiled 2 x 2 in (y, x) to ``--shape``
  (default 30 x 1024 x 1024 = 31.5 Mvoxel), imported as OME-Zarr; the bundled 2-D model.
* 3-D: the gala FIB-SEM ``raveler`` crop (50 x 200 x 100, 10 nm isotropic); the bundled 3-D affinity
  model (``--no-3d`` skips it).

Per round, in this order (rounds interleave the methods, so that a change in the machine's load hits
all of them):

1. ``segment``: :func:`emseg.workflows.segment.segment` with no options (what ``emseg segment VOL``
   does: the fragments run beside the prediction), on a local cluster started before timing; its run
   report gives each stage's seconds.  Beside it, the same with ``--no-overlap`` (every stage after
   the one before; the two orders alternate between rounds): the sum of its stages is what the
   overlapped wall time is compared with.
2. ``forward-only``: only the forward passes of that run's prediction plan, on the same workers
   (as :func:`bench_predict.forward_only`, 2-D and 3-D models): the limit of the whole run on this machine.
3. Per stage, in this process on one core (one thread for torch, numba and the libraries), over
   blocks of the prediction the run wrote, the stages' own compute (no storage):

   * ``fragments``: emseg's (:func:`emseg.ops.watershed.watershed_fragments` + the core's
     :func:`~emseg.ops.watershed.absorb_boundary_only`, as a block of ``emseg segment`` runs them);
     ``skimage``: the same distance-maxima seeds flooded section by section (2-D) or in 3-D with
     :func:`skimage.segmentation.watershed`, without any small-fragment merge; ``waterz``: waterz's
     watershed plus mean-affinity agglomeration on the affinities (3-D, its only mode) at threshold 0.5.
   * ``graph``: the region graph of a block with its hierarchical merge scores
     (:func:`emseg.ops.graph.block_edges` + :func:`emseg.ops.agglomerate.merge_scores`), linked across
     sections as ``emseg segment`` links them (also between the per-section fragments of the 2-D volume,
     with its section link weight).
   * ``agglomerate``: the union-find over all edges at the threshold
     (:class:`emseg.ops.agglomerate.UnionFind`, :func:`~emseg.ops.agglomerate.consecutive_lookup`).
   * ``relabel``: fragment ids -> segment ids through the lookup (a table lookup, as the relabel
     stage does).

Figures: seconds, Mvoxel/s (per core for the in-process stages), ratios to the baselines, and for the
end-to-end run its throughput over the forward-only limit's and the sum of its stages over its wall
time.  Best of the rounds.

    nice .venv/bin/python benchmarks/bench_segment.py                     # ~10 min on 2 quiet cores
    nice .venv/bin/python benchmarks/bench_segment.py --quick             # a smoke run (4 x 512 x 512)
    .venv/bin/python benchmarks/bench_segment.py --device cuda --json out.json   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import _forward_task, cores, load, make_volume, tiled, uptime  # noqa: E402

RAVELER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fib_gala" / "raveler-raw.tif"


def one_thread() -> None:
    """Single-threaded libraries in this process (the per-stage figures are per core)."""
    import numba
    import torch

    torch.set_num_threads(1)
    numba.set_num_threads(1)


def run_segment(volume: Path, out: Path, connection: Any, overlap: bool = True) -> Any:
    """``emseg segment VOL`` (``overlap``: its default, the fragments beside the prediction) or
    ``emseg segment VOL --no-overlap`` (every stage after the one before)."""
    from emseg.config import PipelineConfig, RunOptions
    from emseg.workflows.segment import segment

    return segment(volume, out, PipelineConfig(), run=RunOptions(client=connection, overwrite=True, progress=False,
                                                                 overlap=overlap))


def forward_only(plan: Any, connection: Any) -> float:
    """Seconds of exactly the forward passes of ``plan`` on the cluster's workers (each times its share
    after loading the model; they run at once, the slowest is the wall): 2-D tiles (z = 1) as the 2-D
    model takes them, 3-D tiles whole."""
    import math

    per_pass = plan.batch_size * math.prod(plan.tiling.input_shape)
    passes = max(1, plan.computed_voxels // per_pass)
    tile = tuple(plan.tiling.input_shape)
    shape = (plan.batch_size, 1, *(tile[1:] if tile[0] == 1 else tile))
    workers = list(connection.client.scheduler_info()["workers"])
    split = [passes // len(workers) + (i < passes % len(workers)) for i in range(len(workers))]
    futures = [connection.client.submit(_forward_task, str(plan.checkpoint), shape, n, plan.precision,
                                        connection.threads_per_worker, workers=[w], pure=False)
               for w, n in zip(workers, split) if n]
    return float(max(connection.client.gather(futures)))


def blocks_of(pred_image: Path, mode: str, limit: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Up to ``limit`` blocks of the prediction (the default block shape of its mode): (boundary in
    [0, 1] float32 (z, y, x), nearest-neighbour affinities float32 (3, z, y, x) of the fragments' mode,
    and those the region graph scores: linked across sections, weighted as ``emseg segment`` does)."""
    from emseg.config import AgglomerateOptions
    from emseg.geometry import Roi, plan_blocks
    from emseg.io import open_volume
    from emseg.ops.affinities import boundary_from_affinities, prediction_affinities
    from emseg.ops.threshold import probability
    from emseg.workflows.agglomerate import graph_mode, input_kind_of, section_block_shape, section_link_weight
    from emseg.workflows.label import default_block_shape

    pred = open_volume(pred_image)
    kind = input_kind_of(pred_image)
    block = section_block_shape(pred.chunks) if mode == "2d" else default_block_shape(pred.shape, pred.chunks)
    grid = plan_blocks(Roi.from_shape(pred.shape), tuple(min(b, s) for b, s in zip(block, pred.shape)), 0)
    linked = graph_mode("auto")
    weight = np.float32(section_link_weight(AgglomerateOptions(), kind, linked, pred.voxel_size))
    out = []
    for b in list(grid)[:limit]:
        data = pred.read(b.write_roi)
        if kind == "affinities":
            affs = probability(data[:3]).astype(np.float32)
            boundary = boundary_from_affinities(affs, mode=mode)  # type: ignore[arg-type]
        else:
            affs = prediction_affinities(data, kind, mode=mode).astype(np.float32)  # type: ignore[arg-type]
            boundary = probability(data[0]).astype(np.float32)
        graph_affs = affs.copy() if mode == linked else \
            prediction_affinities(data, kind, mode=linked).astype(np.float32)  # type: ignore[arg-type]
        graph_affs[0] *= weight
        out.append((np.ascontiguousarray(boundary, dtype=np.float32), np.ascontiguousarray(affs),
                    np.ascontiguousarray(graph_affs)))
    return out


def stage_methods(mode: str, voxel_size: tuple[float, ...], threshold: float) -> dict[str, Any]:
    """name -> fn(boundary, affs, state) for one block; ``state`` carries fragments/edges between stages."""
    from scipy import ndimage
    from skimage.segmentation import watershed

    from emseg.config import AgglomerateOptions
    from emseg.ops.agglomerate import UnionFind, consecutive_lookup, merge_scores
    from emseg.ops.graph import block_edges
    from emseg.ops.watershed import WatershedParams, absorb_boundary_only, find_seeds, watershed_fragments
    from emseg.workflows.agglomerate import graph_mode

    opts = AgglomerateOptions()
    params = WatershedParams(threshold=opts.fragment_threshold, seeds=opts.seeds, min_distance=opts.min_distance,
                             min_size=opts.min_size)

    def emseg_fragments(boundary: np.ndarray, affs: np.ndarray, state: dict[str, Any]) -> None:
        labels, _ = watershed_fragments(boundary, params, mode=mode, voxel_size=voxel_size)  # type: ignore[arg-type]
        state["fragments"], _ = absorb_boundary_only(labels, boundary, params.threshold, mode=mode)  # type: ignore[arg-type]

    def skimage_fragments(boundary: np.ndarray, affs: np.ndarray, state: dict[str, Any]) -> None:
        seeds, _ = find_seeds(boundary, params, mode=mode, voxel_size=voxel_size)  # type: ignore[arg-type]
        if mode == "2d":
            np.stack([watershed(b, markers=s) for b, s in zip(boundary, seeds)])
        else:
            watershed(boundary, markers=seeds, connectivity=ndimage.generate_binary_structure(3, 1))

    def waterz_fragments(boundary: np.ndarray, affs: np.ndarray, state: dict[str, Any]) -> None:
        import waterz

        from emseg.ops.agglomerate import quiet_stdout

        with quiet_stdout():
            for _ in waterz.agglomerate(np.ascontiguousarray(affs), [0.5]):
                pass

    def graph(boundary: np.ndarray, affs: np.ndarray, state: dict[str, Any]) -> None:
        # as the pipeline's graph stage: linked across sections (also between per-section fragments)
        frags, linked = state["fragments"].astype(np.uint64), state["graph_affs"]
        edges = block_edges(frags, linked, frags.shape, mode=graph_mode("auto"))
        if len(edges):
            edges = edges.with_score(merge_scores(frags, linked, edges.u, edges.v))
        state["edges"] = edges

    def agglomerate(boundary: np.ndarray, affs: np.ndarray, state: dict[str, Any]) -> None:
        edges, n = state["edges"], int(state["fragments"].max())
        uf = UnionFind(n)
        keep = edges.score < threshold
        uf.union(edges.u[keep], edges.v[keep])
        state["lookup"], _ = consecutive_lookup(uf.roots())

    def relabel(boundary: np.ndarray, affs: np.ndarray, state: dict[str, Any]) -> None:
        state["segments"] = state["lookup"][state["fragments"]]

    return {"fragments": emseg_fragments, "fragments skimage": skimage_fragments, "fragments waterz": waterz_fragments,
            "graph": graph, "agglomerate": agglomerate, "relabel": relabel}


def bench_stages(blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]], mode: str, voxel_size: tuple[float, ...],
                 threshold: float, rounds: int) -> dict[str, dict[str, float]]:
    """Best-of-rounds seconds per method over all blocks, methods interleaved within each round."""
    methods = stage_methods(mode, voxel_size, threshold)
    voxels = sum(b.size for b, *_ in blocks)
    best: dict[str, float] = {}
    states: list[dict[str, Any]] = [{"graph_affs": linked} for *_, linked in blocks]
    for name in ("fragments",):  # warm-up (numba compiles; libraries load)
        methods[name](blocks[0][0][:1], blocks[0][1][:, :1], {})
    for r in range(rounds):
        for name, fn in methods.items():
            start = time.perf_counter()
            for (boundary, affs, _), state in zip(blocks, states):
                fn(boundary, affs, state)
            seconds = time.perf_counter() - start
            best[name] = min(best.get(name, float("inf")), seconds)
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in best.items()), flush=True)
    return {name: {"seconds": s, "mvoxel_per_s_per_core": voxels / s / 1e6, "voxels": voxels}
            for name, s in best.items()}


def bench_volume(name: str, volume: Path, out: Path, connection: Any, args: argparse.Namespace) -> dict[str, Any]:
    from emseg.io import open_volume
    from emseg.workflows.agglomerate import choose_mode

    source = open_volume(volume)
    mode = choose_mode(source.voxel_size)
    result: dict[str, Any] = {"volume": name, "shape": list(source.shape), "mode": mode, "rounds": []}
    best_wall = float("inf")
    stage_blocks = None
    best_apart: dict[str, Any] | None = None
    for r in range(args.rounds):
        if r % 2 == 0:  # the two orders alternate, so that neither always runs first (cold workers)
            apart = run_segment(volume, out, connection, overlap=False)
            report = run_segment(volume, out, connection)
        else:
            report = run_segment(volume, out, connection)
            apart = run_segment(volume, out, connection, overlap=False)
        apart_stages = {t.stage: t.seconds for t in apart.stages}
        seconds = {t.stage: t.seconds for t in report.stages}
        limit = forward_only(report.predict.plan, connection)
        wall = report.seconds
        row = {"wall": wall, "forward_only": limit, "stages": seconds, "limit_ratio": limit / wall,
               "sum_of_stages": sum(v for k, v in seconds.items() if k != "other"),
               "one_after_another": {"wall": apart.seconds, "stages": apart_stages,
                                     "sum_of_stages": sum(v for k, v in apart_stages.items() if k != "other")}}
        result["rounds"].append(row)
        print(f"{name} round {r + 1}: segment {wall:.1f} s (forward-only {limit:.1f} s, ratio {limit / wall:.2f}); "
              + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()), flush=True)
        print(f"{name} round {r + 1}: --no-overlap {apart.seconds:.1f} s, sum of its stages "
              f"{row['one_after_another']['sum_of_stages']:.1f} s; "
              + ", ".join(f"{k} {v:.1f}" for k, v in apart_stages.items()), flush=True)
        if wall < best_wall:
            best_wall, result["best"] = wall, row
        if best_apart is None or row["one_after_another"]["sum_of_stages"] < best_apart["sum_of_stages"]:
            best_apart = row["one_after_another"]
        result["best_one_after_another"] = best_apart
        if stage_blocks is None:
            one_thread_stages = bench_stages(blocks_of(out, mode, args.blocks), mode, source.voxel_size,
                                             float(report.label.agglomerate.threshold), 1)
            stage_blocks = one_thread_stages
        else:  # interleaved with the end-to-end rounds
            more = bench_stages(blocks_of(out, mode, args.blocks), mode, source.voxel_size,
                                float(report.label.agglomerate.threshold), 1)
            stage_blocks = {k: min(v, more[k], key=lambda x: x["seconds"]) for k, v in stage_blocks.items()}
    result["per_core"] = stage_blocks
    ours = stage_blocks["fragments"]["seconds"]
    result["fragments_speedup"] = {"vs skimage": stage_blocks["fragments skimage"]["seconds"] / ours,
                                   "vs waterz": stage_blocks["fragments waterz"]["seconds"] / ours}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="30,1024,1024", help="2-D volume z,y,x (ISBI test volume tiled)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=2, help="blocks of the prediction timed per stage")
    parser.add_argument("--workers", type=int, default=None, help="cluster workers (default: emseg's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-3d", dest="three_d", action="store_false")
    parser.add_argument("--quick", action="store_true", help="4 x 512 x 512, 1 round, 1 block")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.shape, args.rounds, args.blocks = "4,512,512", 1, 1
    shape = tuple(int(v) for v in args.shape.split(","))
    print(f"bench_segment: {cores()} cores, load {uptime()}, device {args.device}", flush=True)
    from emseg.cluster import connect

    results: dict[str, Any] = {"cores": cores(), "load_before": uptime(), "volumes": []}
    with tempfile.TemporaryDirectory(prefix="emseg-bench-segment-") as tmp, \
            connect("local-gpu" if args.device == "cuda" else None, workers=args.workers) as connection:
        one_thread()
        volumes = [("isbi tiled " + "x".join(map(str, shape)), make_volume(Path(tmp) / "isbi.zarr", tiled(load(), shape)))]
        if args.three_d:
            from emseg.geometry import Roi
            from emseg.io import create_volume, mark_complete

            raw = load(RAVELER)
            vol = create_volume(Path(tmp) / "raveler.zarr", shape=raw.shape, dtype="uint8", chunks=raw.shape,
                                voxel_size=(10, 10, 10))
            vol.write(Roi((0, 0, 0), raw.shape), raw)
            mark_complete(Path(tmp) / "raveler.zarr")
            volumes.append(("gala raveler 50x200x100", Path(tmp) / "raveler.zarr"))
        for name, volume in volumes:
            results["volumes"].append(bench_volume(name, volume, Path(tmp) / f"{volume.stem}_seg.zarr", connection, args))
    results["load_after"] = uptime()
    print(f"\nload before {results['load_before']}, after {results['load_after']}")
    for v in results["volumes"]:
        best = v["best"]
        print(f"\n{v['volume']} ({v['mode']}): segment {best['wall']:.1f} s, forward-only {best['forward_only']:.1f} s: "
              f"throughput {best['limit_ratio']:.2f} of the forward-only limit; sum of stages "
              f"{best['sum_of_stages']:.1f} s vs wall {best['wall']:.1f} s")
        for stage, s in best["stages"].items():
            print(f"  {stage:<12} {s:7.1f} s  {100 * s / best['wall']:5.1f} %")
        apart = v["best_one_after_another"]
        print(f"  stages one after another (--no-overlap, best round): wall {apart['wall']:.1f} s, sum of stages "
              f"{apart['sum_of_stages']:.1f} s: overlapped wall / that sum {best['wall'] / apart['sum_of_stages']:.2f}")
        print("  per core, in process (compute only):")
        for name, row in v["per_core"].items():
            print(f"  {name:<18} {row['seconds']:7.2f} s  {row['mvoxel_per_s_per_core']:7.2f} Mvoxel/s")
        print("  fragments speed-up: " + ", ".join(f"{k} {x:.2f}x" for k, x in v["fragments_speedup"].items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    main()
