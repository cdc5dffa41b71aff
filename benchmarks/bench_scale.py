"""Orchestration at scale: the real ``run_blockwise`` over 1e4..1e6 blocks with a no-op kernel.

Each block count runs in a fresh process (so its peak memory is its own) that starts a local Dask
cluster (``--workers`` processes x 1 thread, scheduler inside the client process, as ``emseg``
runs it), creates a huge *empty* OME-Zarr output (metadata only: nothing is ever written to it)
whose grid of ``--block``-edged blocks has the wanted count, and runs one stage whose kernel does
nothing.  What remains is exactly the orchestration: task generation and submission, the
scheduler, the worker-side loop, the completion records, the results.  Reported:

* ``blocks/s``: blocks / stage wall time (the first run: everything is computed), and
  ``blk/cpu-s``: blocks per CPU second of the client, scheduler and workers together (user +
  system), which is what the rate would be per free core on a machine shared with other jobs;
* ``client MiB``: peak RSS (VmHWM) of the client process, which also holds the scheduler;
* ``sched tasks``: most tasks the scheduler held at once (sampled every 50 ms);
* ``worker MiB``: peak RSS of the busiest worker;
* ``ledger``: files and bytes of the stage's completion records;
* ``resume s``: the done-check of a rerun (:meth:`Ledger.done_mask` over every block), and
  ``rerun s``: a whole rerun of the stage, wall clock of the call (every block done: the ledger
  is read, results loaded, nothing submitted).

Usage::

    nice .venv/bin/python benchmarks/bench_scale.py                       # 1e4, 1e5, 1e6 blocks
    nice .venv/bin/python benchmarks/bench_scale.py --blocks 10000 --workers 2
    nice .venv/bin/python benchmarks/bench_scale.py --blocks 10000 --baseline 5cf30b9   # the design before
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def noop(block: object) -> None:
    """The kernel: nothing to read, compute or write."""
    return None


def _vmhwm_mib(pid: int | None = None) -> float:
    status = Path(f"/proc/{pid or os.getpid()}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process so far."""
    import psutil

    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


def _dir_size(path: Path) -> tuple[int, int]:
    files = size = 0
    for p in path.rglob("*"):
        if p.is_file():
            files += 1
            size += p.stat().st_size
    return files, size


def _baseline(rev: str, workdir: Path) -> tuple[Any, Any]:
    """``run_blockwise`` and ``Ledger`` as they were at git revision ``rev`` (for a same-machine ratio)."""
    import importlib.util

    repo = Path(__file__).resolve().parent.parent
    folder = workdir / f"baseline_{rev}"
    folder.mkdir(parents=True, exist_ok=True)

    def show(*paths: str) -> str:  # the first of ``paths`` that exists at ``rev`` (the engine moved)
        for path in paths:
            out = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, text=True)
            if out.returncode == 0:
                return out.stdout
        raise SystemExit(f"Error: none of {paths} at {rev}")

    ledger = show("emseg/engine/ledger.py", "emseg/io/ledger.py")
    runner = show("emseg/engine/runner.py", "emseg/runner.py")
    (folder / "baseline_ledger.py").write_text(ledger)
    for old in ("from emseg.engine.ledger import Ledger", "from emseg.io.ledger import Ledger"):
        runner = runner.replace(old, "from baseline_ledger import Ledger")
    (folder / "baseline_runner.py").write_text(runner)
    sys.path.insert(0, str(folder))
    modules = []
    for name in ("baseline_ledger", "baseline_runner"):
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        modules.append(module)
    return modules[1].run_blockwise, modules[0].Ledger


def one(n_blocks: int, workers: int, block: int, workdir: Path, baseline: str | None = None) -> dict[str, float]:
    import functools

    from emseg.cluster import connect
    from emseg.engine.ledger import Ledger
    from emseg.engine.runner import run_blockwise
    from emseg.geometry import Roi, plan_blocks
    from emseg.io import create_volume

    if baseline:
        run_blockwise, Ledger = _baseline(baseline, workdir)  # noqa: N806 - same names as the current ones

    # a z-slab of 100 x 100 blocks per layer (or fewer): n_blocks blocks of block^3 voxels
    side = 100 if n_blocks >= 10_000 else 10
    shape = (n_blocks // (side * side) * block, side * block, side * block)
    out = workdir / f"empty_{n_blocks}.zarr"
    create_volume(out, shape=shape, dtype="uint8", chunks=(block,) * 3, voxel_size=(8, 8, 8), overwrite=True)
    grid = plan_blocks(Roi.from_shape(shape), (block,) * 3, 0, chunk_shape=(block,) * 3)
    assert len(grid) == n_blocks, (len(grid), n_blocks)
    baseline = _vmhwm_mib()
    with connect(workers=workers) as connection:
        client = connection.client
        scheduler = client.cluster.scheduler
        peak_tasks = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak_tasks
            while not stop.is_set():
                peak_tasks = max(peak_tasks, len(scheduler.tasks))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        run = functools.partial(run_blockwise, client, stage="noop", grid=grid, fn=noop, output=out, params={},
                                progress=False)
        cpu0 = _cpu_seconds() + sum(client.run(_cpu_seconds).values())
        first = run()
        cpu = _cpu_seconds() + sum(client.run(_cpu_seconds).values()) - cpu0
        stop.set()
        sampler.join()
        worker_peak = max(client.run(lambda: _vmhwm_mib()).values())
        start = time.perf_counter()
        ledger = Ledger(out, "noop")
        done = ledger.done_mask() if hasattr(ledger, "done_mask") else ledger.done()
        resume = time.perf_counter() - start
        assert len(done) == n_blocks
        start = time.perf_counter()
        again = run()
        rerun = time.perf_counter() - start
        assert again.computed == 0 and again.skipped == n_blocks
    files, size = _dir_size(out / "emseg_state" / "noop")
    return {
        "blocks": n_blocks, "voxels": grid.total_roi.size, "seconds": first.seconds,
        "blocks_per_s": n_blocks / first.seconds, "cpu_s": cpu,
        "blocks_per_cpu_s": n_blocks / cpu, "client_peak_mib": _vmhwm_mib(), "client_before_mib": baseline,
        "scheduler_peak_tasks": peak_tasks, "worker_peak_mib": worker_peak, "ledger_files": files,
        "ledger_bytes": size, "resume_s": resume, "rerun_s": rerun,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--block", type=int, default=64, help="block (and chunk) edge, voxels")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--baseline", default=None, metavar="REV",
                        help="run the runner and ledger of this git revision instead (e.g. 5cf30b9, before issue 16)")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="emseg-bench-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.one is not None:
        print(json.dumps(one(args.one, args.workers, args.block, workdir, args.baseline)))
        return
    rows = []
    for n in args.blocks:
        load = os.getloadavg()[0]
        proc = subprocess.run([sys.executable, __file__, "--one", str(n), "--workers", str(args.workers),
                               "--block", str(args.block), "--workdir", str(workdir)]
                              + (["--baseline", args.baseline] if args.baseline else []),
                              capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.exit(f"{n} blocks failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["load"] = load
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    print(f"{'blocks':>9} {'Tvoxel':>7} {'s':>7} {'blocks/s':>9} {'blk/cpu-s':>10} {'client MiB':>11} {'sched tasks':>12} "
          f"{'worker MiB':>11} {'ledger files':>13} {'ledger MiB':>11} {'resume s':>9} {'rerun s':>8} {'load':>5}")
    for r in rows:
        print(f"{r['blocks']:>9} {r['voxels'] / 1e12:>7.3f} {r['seconds']:>7.1f} {r['blocks_per_s']:>9.0f} {r['blocks_per_cpu_s']:>10.0f} "
              f"{r['client_peak_mib']:>11.0f} {r['scheduler_peak_tasks']:>12} {r['worker_peak_mib']:>11.0f} "
              f"{r['ledger_files']:>13} {r['ledger_bytes'] / 2**20:>11.2f} {r['resume_s']:>9.2f} "
              f"{r['rerun_s']:>8.1f} {r['load']:>5.1f}")
    if len(rows) > 1:
        print(f"client peak RSS {rows[-1]['blocks']} / {rows[0]['blocks']} blocks: "
              f"{rows[-1]['client_peak_mib'] / rows[0]['client_peak_mib']:.2f}x")


if __name__ == "__main__":
    main()
